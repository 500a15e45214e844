"""The one way views reach the domain: ``runtime()`` (the agent's ``Runtime``) and
``http()`` (the HTTP edge's own parts: tokens, metrics)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from flask import current_app

from agent.http.auth import TokenRegistry
from agent.http.metrics import Metrics
from agent.runtime import Runtime

EXTENSION = "nas_janitor"


class AnswerCache:
    """The last answer made from a value, kept while the same value (the very object:
    e.g. the findings of the kept scan) is asked for again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[Any, bytes]] = {}

    def get(self, name: str, source: Any) -> bytes | None:
        with self._lock:
            entry = self._entries.get(name)
        return entry[1] if entry is not None and entry[0] is source else None

    def put(self, name: str, source: Any, body: bytes) -> None:
        with self._lock:
            self._entries[name] = (source, body)


@dataclass(frozen=True)
class HttpContext:
    runtime: Runtime
    tokens: TokenRegistry
    metrics: Metrics
    answers: AnswerCache = field(default_factory=AnswerCache)


def http() -> HttpContext:
    ctx: HttpContext = current_app.extensions[EXTENSION]
    return ctx


def runtime() -> Runtime:
    return http().runtime
