"""Run schemathesis' engine (every phase, every check) and collect what it saw.

``run(schema)`` drives ``schemathesis.engine.from_schema(schema).execute()``, the same
engine ``st run`` uses: examples, coverage, fuzzing (positive and negative data) and the
stateful phase, with all built-in checks (``not_a_server_error``, the conformance checks,
``negative_data_rejection``, ``positive_data_acceptance``, ``ignored_auth``,
``use_after_free``, ``unsupported_method``, ...). The report holds every failure with a
curl line to reproduce it, every engine error, and per operation the status codes the
agent answered, so a test can also check that each operation was really exercised.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import schemathesis
from schemathesis.engine import Status, events, from_schema
from schemathesis.hooks import GLOBAL_HOOK_DISPATCHER
from schemathesis.transport import wsgi as st_wsgi


@dataclass
class FuzzReport:
    failures: dict[tuple[str, str, str], list[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    statuses: dict[str, collections.Counter[int]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    checks: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    phases: dict[str, str] = field(default_factory=dict)
    # requests by (phase, operation)
    per_phase: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    requests: int = 0
    stop_reason: str = ""

    def describe_failures(self, limit: int = 30) -> str:
        lines = []
        for (op, check, title), samples in sorted(self.failures.items())[:limit]:
            lines.append(f"- {op}: {check}: {title} (x{len(samples)})")
            lines.extend(f"    {s}" for s in samples[:2])
        lines.extend(f"- engine error: {e}" for e in self.errors[:limit])
        return "\n".join(lines)

    def exercised(self) -> dict[str, list[int]]:
        return {op: sorted(c) for op, c in sorted(self.statuses.items())}


def run(schema: Any) -> FuzzReport:
    report = FuzzReport()
    for ev in from_schema(schema).execute():
        if isinstance(ev, events.ScenarioFinished):
            _scenario(report, ev.recorder, ev.phase.value)
        elif isinstance(ev, events.NonFatalError):
            report.errors.append(f"{ev.label}: {ev.info.title}: {ev.info.message}"[:2000])
        elif isinstance(ev, events.FatalError):
            report.errors.append(f"fatal: {ev.exception!r}"[:2000])
        elif isinstance(ev, events.PhaseFinished):
            report.phases[ev.phase.name.value] = ev.status.value
        elif isinstance(ev, events.EngineFinished):
            report.stop_reason = ev.stop_reason.value
    return report


def _scenario(report: FuzzReport, recorder: Any, phase: str) -> None:
    for case_id, interaction in recorder.interactions.items():
        node = recorder.cases.get(case_id)
        op = node.value.operation.label if node is not None else recorder.label
        report.requests += 1
        # checks send probes of other methods (OPTIONS, TRACE) under the same operation
        same_method = op.split(" ", 1)[0] == interaction.request.method.upper()
        if interaction.response is not None and same_method:
            report.statuses[op][interaction.response.status_code] += 1
            report.per_phase[(phase, op)] += 1
    for case_id, checks in recorder.checks.items():
        node = recorder.cases.get(case_id)
        op = node.value.operation.label if node is not None else recorder.label
        for check in checks:
            report.checks[(check.name, check.status.value)] += 1
            if check.status == Status.FAILURE and check.failure_info is not None:
                failure = check.failure_info.failure
                key = (op, check.name, failure.title)
                sample = check.failure_info.code_sample.replace("\n", " ")[:600]
                report.failures.setdefault(key, []).append(sample)


@contextlib.contextmanager
def global_hook(name: str, fn: Callable[..., Any]) -> Iterator[None]:
    """A schemathesis hook for the duration of a block (hooks are process-wide)."""
    schemathesis.hook(name)(fn)
    try:
        yield
    finally:
        GLOBAL_HOOK_DISPATCHER.unregister(fn)


@contextlib.contextmanager
def wsgi_probe_fix() -> Iterator[None]:
    """schemathesis 4.32.5 sends the ``ignored_auth`` probe to a WSGI app with the run's
    socket settings (``max_redirects``, ``verify``, ...), which werkzeug's test client
    refuses (TypeError), so the auth check errors instead of running. Drop them, as the
    transport already does when a requests session is given."""
    transport = st_wsgi.WSGI_TRANSPORT
    original = transport.send

    def send(case: Any, *, session: Any = None, **kwargs: Any) -> Any:
        for name in ("max_redirects", "verify", "cert", "proxies"):
            kwargs.pop(name, None)
        return original(case, session=session, **kwargs)

    transport.send = send  # type: ignore[method-assign]
    try:
        yield
    finally:
        del transport.send  # back to the class's method
