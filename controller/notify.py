"""Notifications after ``janitorctl run``: the per-agent summary, POSTed to each entry
of the fleet's ``notify:`` list, as JSON or as an ntfy message.

- ``json``: ``Content-Type: application/json``, the body ``summary_json`` builds
  (shape in controller/README.md, "Notifications").
- ``ntfy``: ntfy's publish API (``POST https://ntfy.sh/<topic>``, or any ntfy server):
  a plain text body, one line per agent, and the headers ``Title``, ``Priority``
  (``default``, or ``high`` when the run failed) and ``Tags`` (``broom``, and
  ``warning`` first when it failed).

An entry with ``on: failure`` is sent only when the run's exit code is not 0. A webhook
that fails (refused, slow, an error status) never changes the run's result: each
attempt ends within ``timeouts.notify`` seconds, whole (the same per-socket deadline as
requests to agents), is made once, and its outcome is reported. What is reported of a
webhook is its scheme and host only (``NotifyTarget.shown``): its path or query often
carries a secret.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from controller import __version__
from controller.fleet import NotifyTarget
from controller.fleetops import for_each
from controller.transport import DeadlineBackend, deadline_transport
from shared.humanize import bytes_exact

MAX_REPLY_BYTES = 64 << 10  # what is read of a webhook's answer, at most
USER_AGENT = f"nas-janitor-controller/{__version__}"


@dataclass(frozen=True)
class AgentSummary:
    """One agent's line of a run's notification."""

    agent: str
    reachable: bool
    deleted: int
    reclaimed_bytes: int
    failed: int  # actions that failed
    audit: str  # ok, rewritten, broken, or "not pulled"
    problem: str | None  # why the agent or its audit failed, in words


@dataclass(frozen=True)
class RunSummary:
    run: int
    dry_run: bool
    exit_code: int
    agents: tuple[AgentSummary, ...]

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def reclaimed_bytes(self) -> int:
        return sum(a.reclaimed_bytes for a in self.agents)

    @property
    def failed_agents(self) -> int:
        return sum(1 for a in self.agents if a.problem is not None or a.failed)


@dataclass(frozen=True)
class NotifyResult:
    target: str  # NotifyTarget.shown
    format: str
    sent: bool
    skipped: bool  # on: failure, and the run went well
    error: str | None
    seconds: float


def summary_json(summary: RunSummary) -> dict[str, Any]:
    """The ``json`` format's body."""
    return {
        "source": "nas-janitor",
        "version": __version__,
        "kind": "run",
        "run": summary.run,
        "dry_run": summary.dry_run,
        "ok": summary.ok,
        "exit_code": summary.exit_code,
        "agents_total": len(summary.agents),
        "agents_failed": summary.failed_agents,
        "reclaimed_bytes": summary.reclaimed_bytes,
        "agents": [asdict(a) for a in summary.agents],
    }


def ntfy_message(summary: RunSummary) -> tuple[dict[str, str], str]:
    """The ``ntfy`` format's headers and plain text body (headers in ASCII)."""
    dry = " (dry run)" if summary.dry_run else ""
    n = len(summary.agents)
    if summary.ok:
        title = f"nas-janitor run {summary.run}{dry}: ok, {n} agent{'s' * (n != 1)}"
        headers = {"Title": title, "Priority": "default", "Tags": "broom"}
    else:
        title = (
            f"nas-janitor run {summary.run}{dry}: FAILED on {summary.failed_agents} of {n} "
            f"agent{'s' * (n != 1)}"
        )
        headers = {"Title": title, "Priority": "high", "Tags": "warning,broom"}
    lines = []
    for a in summary.agents:
        head = f"{a.agent}: " + ("reachable" if a.reachable else "UNREACHABLE")
        parts = [
            head,
            f"deleted {a.deleted}",
            f"reclaimed {bytes_exact(a.reclaimed_bytes)}",
            f"{a.failed} failed",
            f"audit {a.audit}",
        ]
        line = ", ".join(parts)
        if a.problem:
            line += f"; problem: {a.problem}"
        lines.append(line)
    lines.append(f"reclaimed in all: {bytes_exact(summary.reclaimed_bytes)}")
    return headers, "\n".join(lines) + "\n"


def send_all(
    targets: Sequence[NotifyTarget],
    summary: RunSummary,
    *,
    timeout: float,
    transport: httpx.BaseTransport | None = None,
) -> list[NotifyResult]:
    """Every target that asks for this run, at once; each within ``timeout`` seconds.
    Never raises: each outcome is in the result."""
    if not targets:
        return []
    outcomes = for_each(
        list(targets),
        lambda t: send(t, summary, timeout=timeout, transport=transport),
        concurrency=len(targets),
    )
    results = []
    for o in outcomes:
        if o.value is not None:
            results.append(o.value)
        else:
            results.append(
                NotifyResult(o.item.shown, o.item.format, False, False, o.message, o.seconds)
            )
    return results


def send(
    target: NotifyTarget,
    summary: RunSummary,
    *,
    timeout: float,
    transport: httpx.BaseTransport | None = None,
) -> NotifyResult:
    """One notification (or none, for ``on: failure`` after a run that went well)."""
    start = time.monotonic()
    if target.on == "failure" and summary.ok:
        return NotifyResult(target.shown, target.format, False, True, None, 0.0)
    if target.format == "ntfy":
        headers, text = ntfy_message(summary)
        body = text.encode("utf-8")
        headers["Content-Type"] = "text/plain; charset=utf-8"
    else:
        body = json.dumps(summary_json(summary), separators=(",", ":")).encode("utf-8")
        headers = {"Content-Type": "application/json"}
    error = _post(target.url, body, headers, timeout=timeout, transport=transport)
    return NotifyResult(
        target.shown, target.format, error is None, False, error, time.monotonic() - start
    )


def _post(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    timeout: float,
    transport: httpx.BaseTransport | None,
) -> str | None:
    """POST within ``timeout`` seconds, whole; the problem in words, or None."""
    backend = DeadlineBackend()
    own = transport or deadline_transport(backend, verify=True)
    deadline = time.monotonic() + timeout
    try:
        with (
            httpx.Client(transport=own, timeout=timeout, trust_env=False) as client,
            backend.until(deadline),
        ):
            request = client.build_request(
                "POST", url, content=body, headers={"User-Agent": USER_AGENT, **headers}
            )
            response = client.send(request, stream=True)
            try:
                read = 0
                for chunk in response.iter_raw():  # a little of the answer, then hang up
                    read += len(chunk)
                    if read >= MAX_REPLY_BYTES or time.monotonic() >= deadline:
                        break
            finally:
                response.close()
    except httpx.TimeoutException:
        return f"no answer within {timeout:g}s"
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if not response.is_success:
        return f"answered {response.status_code} {response.reason_phrase}".rstrip()
    return None
