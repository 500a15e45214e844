"""The one way views reach the domain: ``runtime()`` (the agent's ``Runtime``) and
``http()`` (the HTTP edge's own parts: tokens, metrics)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from flask import current_app

from agent.http.auth import TokenRegistry
from agent.http.metrics import Metrics
from agent.http.pages import PagesAhead
from agent.runtime import Runtime

EXTENSION = "nas_janitor"


class AnswerCache:
    """The last answer made from a value, kept while the same value (the very object:
    e.g. the findings of the kept scan) is asked for again. Only answers of one scan
    (``epoch``) are kept, at most ``MAX`` of them: an answer of an older scan goes when
    one of a newer is put, so it never outlives its scan by more than one read."""

    MAX = 16

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[Any, bytes, int]] = {}

    def get(self, name: str, source: Any) -> bytes | None:
        with self._lock:
            entry = self._entries.get(name)
        return entry[1] if entry is not None and entry[0] is source else None

    def put(self, name: str, source: Any, body: bytes, *, epoch: int = 0) -> None:
        with self._lock:
            for old in [n for n, e in self._entries.items() if e[2] != epoch or n == name]:
                del self._entries[old]
            while len(self._entries) >= self.MAX:
                del self._entries[next(iter(self._entries))]  # the oldest
            self._entries[name] = (source, body, epoch)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class HttpContext:
    runtime: Runtime
    tokens: TokenRegistry
    metrics: Metrics
    answers: AnswerCache = field(default_factory=AnswerCache)
    pages: PagesAhead = field(default_factory=PagesAhead)  # listings' next pages


def http() -> HttpContext:
    ctx: HttpContext = current_app.extensions[EXTENSION]
    return ctx


def runtime() -> Runtime:
    return http().runtime
