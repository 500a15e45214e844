"""A bounded load generator: N concurrent HTTPS clients (each its own connection) loop
over a list of GET paths until a deadline or a request cap, and record every status,
transport error and latency. Loopback only; it stops by itself."""

from __future__ import annotations

import asyncio
import json
import ssl
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class LoadResult:
    clients: int
    seconds: float
    statuses: Counter[int] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)  # transport errors by type
    latencies: list[float] = field(default_factory=list)
    by_path: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    elapsed: float = 0.0

    @property
    def requests(self) -> int:
        return sum(self.statuses.values()) + sum(self.failures.values())

    @property
    def errors(self) -> int:
        bad = sum(n for s, n in self.statuses.items() if not 200 <= s < 300)
        return bad + sum(self.failures.values())

    @property
    def server_errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500)

    @staticmethod
    def _pct(values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]

    def summary(self) -> dict[str, Any]:
        ms = [x * 1000 for x in self.latencies]
        return {
            "clients": self.clients,
            "seconds": round(self.elapsed, 1),
            "requests": self.requests,
            "throughput_rps": round(self.requests / self.elapsed, 1) if self.elapsed else 0,
            "errors": self.errors,
            "error_rate": self.errors / self.requests if self.requests else None,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "transport_errors": dict(self.failures),
            "latency_ms": {
                "p50": round(self._pct(ms, 50), 1),
                "p90": round(self._pct(ms, 90), 1),
                "p99": round(self._pct(ms, 99), 1),
                "max": round(max(ms), 1) if ms else None,
                "mean": round(statistics.fmean(ms), 1) if ms else None,
            },
            "by_path_ms": {
                path: {
                    "n": len(v),
                    "p50": round(self._pct([x * 1000 for x in v], 50), 1),
                    "p99": round(self._pct([x * 1000 for x in v], 99), 1),
                }
                for path, v in sorted(self.by_path.items())
            },
        }

    def __str__(self) -> str:
        return json.dumps(self.summary(), indent=2)


async def _one_client(
    index: int,
    url: str,
    token: str,
    ctx: ssl.SSLContext,
    paths: list[str],
    deadline: float,
    cap: int,
    out: LoadResult,
) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, verify=ctx, timeout=60.0, limits=limits
    ) as client:
        i = index
        while time.monotonic() < deadline and out.requests < cap:
            path = paths[i % len(paths)]
            i += 1
            started = time.perf_counter()
            try:
                r = await client.get(path)
            except httpx.HTTPError as exc:
                out.failures[type(exc).__name__] += 1
                continue
            took = time.perf_counter() - started
            out.statuses[r.status_code] += 1
            out.latencies.append(took)
            out.by_path[path.split("?", 1)[0]].append(took)


def run(
    url: str,
    token: str,
    ctx: ssl.SSLContext,
    paths: list[str],
    *,
    clients: int,
    seconds: float,
    cap: int = 500_000,
) -> LoadResult:
    """``clients`` concurrent clients for ``seconds`` (at most ``cap`` requests)."""
    out = LoadResult(clients=clients, seconds=seconds)

    async def main() -> None:
        deadline = time.monotonic() + seconds
        await asyncio.gather(
            *(_one_client(i, url, token, ctx, paths, deadline, cap, out) for i in range(clients))
        )

    started = time.monotonic()
    asyncio.run(main())
    out.elapsed = time.monotonic() - started
    return out
