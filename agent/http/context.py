"""The one way views reach the domain: ``runtime()`` (the agent's ``Runtime``) and
``http()`` (the HTTP edge's own parts: tokens, metrics)."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app

from agent.http.auth import TokenRegistry
from agent.http.metrics import Metrics
from agent.runtime import Runtime

EXTENSION = "nas_janitor"


@dataclass(frozen=True)
class HttpContext:
    runtime: Runtime
    tokens: TokenRegistry
    metrics: Metrics


def http() -> HttpContext:
    ctx: HttpContext = current_app.extensions[EXTENSION]
    return ctx


def runtime() -> Runtime:
    return http().runtime
