"""Doing one thing on every agent at once, with a bound, so that one slow or dead agent
never stops the rest: each call's outcome (a value or the error it raised) is collected
and reported, in the order the items were given."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from controller.errors import ControllerError, message_for

K = TypeVar("K")
T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome(Generic[K, T]):
    item: K
    value: T | None
    error: Exception | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def message(self) -> str:
        """The error as a user reads it next to the agent's name ("" when ok)."""
        return "" if self.error is None else message_for(self.error)


def for_each(
    items: Sequence[K],
    fn: Callable[[K], T],
    *,
    concurrency: int,
    clock: Callable[[], float] = time.monotonic,
) -> list[Outcome[K, T]]:
    """``fn(item)`` for every item, at most ``concurrency`` at a time. Never raises for
    one item's failure: a ``ControllerError`` is an expected outcome; anything else (a
    bug, or a ``MemoryError``) is still only that item's, reported as an internal error
    (its traceback is logged at debug level only: ``-vv``)."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")

    def call(item: K) -> Outcome[K, T]:
        start = clock()
        try:
            value = fn(item)
        except ControllerError as exc:
            return Outcome(item, None, exc, clock() - start)
        except Exception as exc:
            log.debug("unexpected error for %r", item, exc_info=True)
            return Outcome(item, None, exc, clock() - start)
        return Outcome(item, value, None, clock() - start)

    if not items:
        return []
    workers = min(concurrency, len(items))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="agent") as pool:
        return list(pool.map(call, items))
