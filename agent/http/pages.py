"""The next page of a subvolume listing, made while the client reads the one it was sent.

A client pages through a listing one request at a time: while it reads and decodes a
page (a page of 500 is some 280 KB of JSON), the agent has nothing to do, and then it
makes the next page after the request for it arrives. ``PagesAhead`` makes that next
page in a thread of its own as soon as the page before it is answered (from the second
page on: a client that reads only the first makes nothing be made ahead): the answer for
the very same page of the very same snapshot (the object: a listing's pages are cut from
one snapshot, ``Inventory.listing_snapshot``), with the same query. A request finds it
made, or waits for it to be done, or (another snapshot, another query, an error, or
too old) makes its page itself, as without it. Bounded: at most ``MAX`` pages ahead (one
per listing being read), each dropped when taken or after ``MAX_AGE`` seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from agent.domain.inventory import PAGE_SNAPSHOT_SECONDS

# (the body, the next page's cursor)
Page = tuple[bytes, str | None]


class PagesAhead:
    MAX = 4
    MAX_AGE = PAGE_SNAPSHOT_SECONDS  # as long as a listing's pages share its snapshot

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (the snapshot it is of, when it was started, the page being made)
        self._ahead: dict[Hashable, tuple[Any, float, Future[Page]]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self.taken = 0  # pages answered from what was made ahead

    def take(self, snapshot: Any, key: Hashable) -> Page | None:
        """The page made ahead for ``key`` of this very ``snapshot`` (waiting for it if
        it is being made), once; None when there is none, or it failed."""
        with self._lock:
            entry = self._ahead.pop(key, None)
        if entry is None or entry[0] is not snapshot:
            return None
        if self._clock() - entry[1] > self.MAX_AGE:
            return None
        try:
            page = entry[2].result()
        except Exception:  # made again by the request, which answers its error
            return None
        self.taken += 1
        return page

    def start(self, snapshot: Any, key: Hashable, make: Callable[[], Page]) -> None:
        """Make the page ``key`` of ``snapshot`` now, in the background (``make``)."""
        now = self._clock()
        with self._lock:
            for old in [k for k, e in self._ahead.items() if now - e[1] > self.MAX_AGE]:
                del self._ahead[old]
            while len(self._ahead) >= self.MAX:
                del self._ahead[next(iter(self._ahead))]  # the oldest
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="page-ahead")
            self._ahead[key] = (snapshot, now, self._pool.submit(make))

    def __len__(self) -> int:
        return len(self._ahead)
