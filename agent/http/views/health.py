"""Unauthenticated liveness and readiness."""

from __future__ import annotations

from typing import Any

from flask_smorest import Blueprint

from agent.http.context import runtime
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
    """Docker and btrfs are reachable (503 problem naming which is not)."""
    runtime().inventory.readiness()
    return {"status": "ready"}
