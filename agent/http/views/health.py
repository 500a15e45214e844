"""Unauthenticated liveness and readiness.

``/readyz`` names which dependency is down by its code (``docker_unavailable``,
``btrfs_unavailable``, ``holders_unavailable``, ``audit_unavailable``, ...) to anyone;
where it lives (a socket path, a binary, a file) and what it said only to a caller with
a ``read`` token."""

from __future__ import annotations

from typing import Any

from flask import request
from flask_smorest import Blueprint

from agent.errors import AgentError, Unavailable
from agent.http.context import http, runtime
from shared.schemas import HealthSchema

blp = Blueprint("health", __name__, description="Liveness and readiness (no token)")


@blp.get("/healthz")
@blp.response(200, HealthSchema)
def healthz() -> dict[str, Any]:
    """The process is alive."""
    return {"status": "ok"}


@blp.get("/readyz")
@blp.response(200, HealthSchema)
@blp.alt_response(503, response="SERVICE_UNAVAILABLE")
def readyz() -> dict[str, Any]:
    """Docker and btrfs are reachable, the host's mount table and what processes hold
    open can be read, and the audit log is the one the agent opened (503 problem naming
    by code which is not; details for ``read`` tokens only)."""
    rt = runtime()
    down: list[Unavailable] = []
    for probe in (rt.inventory.readiness, rt.audit.check_file):
        try:
            probe()
        except Unavailable as exc:
            down.append(exc)
    if not down:
        return {"status": "ready"}
    codes: list[str] = []
    for fault in down:
        for code in fault.extra.get("unavailable") or [fault.code]:
            if code not in codes:
                codes.append(code)
    if _may_see_details():
        detail = "; ".join(e.detail for e in down)
    else:
        detail = "not ready: " + ", ".join(codes)
    raise type(down[0])(detail, extra={"unavailable": codes})


def _may_see_details() -> bool:
    """A caller with a valid ``read`` token (no 401 or 403 here: none is needed)."""
    if not request.headers.get("Authorization"):
        return False
    tokens = http().tokens
    try:
        principal = tokens.authenticate(request.headers.get("Authorization"))
    except AgentError:
        return False
    return "read" in principal.scopes
