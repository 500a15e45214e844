"""Prometheus metrics: request counts and latencies, actions and bytes reclaimed, and
findings by kind (computed when scraped, from a fresh snapshot)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Flask, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shared.schemas import FINDING_KINDS

# Label values come from the agent, never from the request: a method outside these is
# counted as "other", a path no route matches as "unmatched" (a route's rule otherwise),
# and the status is the agent's own answer.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "other"


class FindingsCollector(Collector):
    def __init__(self, compute: Callable[[], list[dict[str, Any]]]) -> None:
        self._compute = compute

    def collect(self) -> Iterator[GaugeMetricFamily]:
        count = GaugeMetricFamily(
            "nas_janitor_findings", "Current findings by kind", labels=["kind"]
        )
        size = GaugeMetricFamily(
            "nas_janitor_reclaimable_bytes",
            "Bytes the current findings would free, by kind (known sizes only)",
            labels=["kind"],
        )
        up = GaugeMetricFamily("nas_janitor_scan_ok", "1 when the last scan for metrics succeeded")
        try:
            found = self._compute()
        except Exception:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        for kind in FINDING_KINDS:
            mine = [f for f in found if f["kind"] == kind]
            count.add_metric([kind], len(mine))
            size.add_metric([kind], sum(f["reclaimable_bytes"] or 0 for f in mine))
        yield count
        yield size
        yield up


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "nas_janitor_http_requests",
            "HTTP requests by endpoint, method and status",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "nas_janitor_http_request_seconds",
            "HTTP request latency by endpoint",
            ["endpoint"],
            registry=self.registry,
        )
        self.actions = Counter(
            "nas_janitor_actions",
            "Clean-up actions by operation and outcome",
            ["op", "outcome"],
            registry=self.registry,
        )
        self.reclaimed = Counter(
            "nas_janitor_reclaimed_bytes",
            "Bytes reclaimed by deletes (known sizes only)",
            registry=self.registry,
        )

    def count_action(self, op: str, outcome: str, reclaimed: int | None) -> None:
        self.actions.labels(op, outcome).inc()
        if reclaimed:
            self.reclaimed.inc(reclaimed)

    def watch_findings(self, compute: Callable[[], list[dict[str, Any]]]) -> None:
        self.registry.register(FindingsCollector(compute))

    def init_app(self, app: Flask) -> None:
        @app.before_request
        def _start() -> None:
            g.metrics_t0 = time.perf_counter()

        @app.after_request
        def _count(response: Any) -> Any:
            endpoint = request.url_rule.rule if request.url_rule else "unmatched"
            status = str(response.status_code)
            self.requests.labels(endpoint, method_label(request.method), status).inc()
            t0 = g.get("metrics_t0")
            if t0 is not None:
                self.latency.labels(endpoint).observe(time.perf_counter() - t0)
            return response
