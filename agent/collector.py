"""Python's cyclic garbage collector held off while a scan builds its records.

A cold scan of 10,000 subvolumes makes some hundred thousand containers (the root
tree's items, the records, the views, the findings) that reference counting frees and
that are in no cycle. Each collection the allocations set off walks every young
container and what it references: three or four of them per scan, some 10 % of its time.
``paused()`` holds collections off around such work: only around code that computes
(it may make system calls on local files, never waits for a daemon or the network),
so the pause lasts as long as that work, and the collector runs again right after
(the first allocation then starts a collection of what is left). Re-entrant and for
any number of threads: collections are held off while any of them is inside, and only
turned back on if they were on when the first went in.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_inside = 0
_was_enabled = False


@contextmanager
def paused() -> Iterator[None]:
    """No cyclic collection runs while any thread is inside."""
    global _inside, _was_enabled
    with _lock:
        if _inside == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _inside += 1
    try:
        yield
    finally:
        with _lock:
            _inside -= 1
            if _inside == 0 and _was_enabled:
                gc.enable()
