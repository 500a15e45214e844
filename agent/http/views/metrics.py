"""``GET /metrics`` (``read`` scope): Prometheus text exposition."""

from __future__ import annotations

from flask import Response, current_app
from flask_smorest import Blueprint
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.http.api import needs

blp = Blueprint("metrics", __name__, description="Prometheus metrics")


@blp.get("/metrics")
@needs(blp, "read")
@blp.response(200, content_type="text/plain", description="Prometheus text exposition")
def metrics() -> Response:
    """Findings and reclaimable bytes by kind, actions, bytes reclaimed, jobs by final
    state, the audit chain as last checked, requests."""
    registry = current_app.extensions["nas_janitor"].metrics.registry
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST.split(";")[0])
