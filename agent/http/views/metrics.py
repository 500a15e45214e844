"""``GET /metrics`` (``read`` scope): Prometheus text exposition."""

from __future__ import annotations

from flask import Response
from flask_smorest import Blueprint
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.http.api import needs
from agent.http.context import http

blp = Blueprint("metrics", __name__, description="Prometheus metrics")


@blp.get("/metrics")
@needs(blp, "read")
@blp.response(200, content_type="text/plain", description="Prometheus text exposition")
def metrics() -> Response:
    """Findings and reclaimable bytes by kind, actions, bytes reclaimed, jobs by final
    state, the audit chain as last checked, requests."""
    registry = http().metrics.registry
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST.split(";")[0])
