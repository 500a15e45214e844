"""Prometheus metrics: request counts and latencies, actions and bytes reclaimed, jobs
by final state, the audit chain's state as last checked, and findings by kind (those of
the inventory's kept scan: a scrape never waits for a scan of the host, see
``Inventory.kept_findings``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from flask import Flask, g, request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shared.models import TERMINAL_JOB_STATES
from shared.policy import FINDING_KINDS

if TYPE_CHECKING:
    from agent.store.audit import AuditLog
    from agent.store.entries import VerifyResult

# Label values come from the agent, never from the request: a method outside these is
# counted as "other", a path no route matches as "unmatched" (a route's rule otherwise),
# and the status is the agent's own answer.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "other"


class PendingCollector(Collector):
    """``nas_janitor_pending_bytes{filesystem}``: what the agent deleted and the kernel
    has not freed yet (asked about those subvolumes only, at each scrape)."""

    def __init__(self, compute: Callable[[], dict[str, int]]) -> None:
        self._compute = compute

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "nas_janitor_pending_bytes",
            "Bytes the agent deleted that the kernel's cleaner has not freed yet",
            labels=["filesystem"],
        )
        for fs_uuid, size in sorted(self._compute().items()):
            gauge.add_metric([fs_uuid], size)
        yield gauge


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
        stale = GaugeMetricFamily(
            "nas_janitor_stale_qgroups",
            "Level-0 qgroups whose subvolume is gone, by filesystem (kernels before 6.11 "
            "leave them behind)",
            labels=["filesystem"],
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
        for f in found:
            if f["kind"] == "stale-qgroups":
                stale.add_metric([f["fs_uuid"]], f["qgroups"])
        yield count
        yield size
        yield stale
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
        self.audit_chain_ok = Gauge(
            "nas_janitor_audit_chain_ok",
            "1 when the last check of the audit log's hash chain (at start-up or by "
            "GET /v1/audit/verify) found it intact, 0 when it did not",
            registry=self.registry,
        )
        self.audit_checked_at = Gauge(
            "nas_janitor_audit_verify_timestamp_seconds",
            "Unix time of the last check of the audit log's hash chain",
            registry=self.registry,
        )
        self.jobs = Counter(
            "nas_janitor_jobs_finished",
            "Jobs that reached a final state, by that state",
            ["state"],
            registry=self.registry,
        )
        for state in sorted(TERMINAL_JOB_STATES):
            self.jobs.labels(state)  # every state has a series from the start

    def verify_audit(self, audit: AuditLog) -> VerifyResult:
        """``audit.verify()``, with its verdict kept for scrapes (a failure to read the
        log counts as a broken chain, and is raised)."""
        self.audit_checked_at.set_to_current_time()
        try:
            result = audit.verify()
        except Exception:
            self.audit_chain_ok.set(0)
            raise
        self.audit_chain_ok.set(1 if result.ok else 0)
        return result

    def count_job(self, state: str) -> None:
        self.jobs.labels(state).inc()

    def count_action(self, op: str, outcome: str, reclaimed: int | None) -> None:
        self.actions.labels(op, outcome).inc()
        if reclaimed:
            self.reclaimed.inc(reclaimed)

    def watch_findings(self, compute: Callable[[], list[dict[str, Any]]]) -> None:
        self.registry.register(FindingsCollector(compute))

    def watch_pending(self, compute: Callable[[], dict[str, int]]) -> None:
        self.registry.register(PendingCollector(compute))

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
