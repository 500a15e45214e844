"""The state directory's mutation lease: one process at a time changes the NAS through a
state directory.

The per-filesystem locks (``Executor.fs_lock``) order the mutations of one process. A
running agent and a local ``janitor-agent clean`` are two processes on the same state
directory (the same plans, jobs and audit log): the lease orders them. It is an
advisory lock (``flock``) on ``<state_dir>/mutation.lock``, counted within the process:

- the agent holds it while any of its jobs runs and during a direct delete; asked to
  mutate while another process holds it, it refuses with ``Busy`` (409 ``busy``);
- a local clean holds it for its whole run (plan, apply, the job to its end), waiting
  up to ``--wait`` seconds for it.

Whoever takes the lease from free (no holder in any process) runs ``on_first`` first:
the runtime marks jobs a crash cut short as ``interrupted`` there. That is sound only
then: a job that is still running somewhere belongs to a process that holds the lease.

The kernel drops the lock when its holder exits, however it exits (``kill -9``
included). The file names the holder (pid, what, since) for the ``Busy`` message; it
holds no secret.

    lease = StateLease(state_dir, holder="janitor-agent clean by root")
    with lease.held(wait=60):      # Busy when another process keeps it past 60 s
        ...
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from agent.errors import Busy, StorageUnavailable

log = logging.getLogger("nas_janitor.agent.lease")
LEASE_FILE = "mutation.lock"
WAIT_STEP_SECONDS = 0.2
MAX_HOLDER_BYTES = 4096


class StateLease:
    """The lease of ``state_dir``. Thread safe; ``acquire`` and ``release`` may happen in
    different threads (a job's thread releases what ``apply`` took for it)."""

    def __init__(
        self,
        state_dir: str,
        *,
        holder: str,
        on_first: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.path = os.path.join(state_dir, LEASE_FILE)
        self.holder = holder
        self._on_first = on_first
        self._clock = clock
        self._sleep = sleep
        self._guard = threading.Lock()
        self._count = 0
        self._fd: int | None = None

    @property
    def held_here(self) -> bool:
        """This process holds the lease now."""
        with self._guard:
            return self._count > 0

    def acquire(self, *, wait: float = 0.0) -> None:
        """Hold the lease (once more, when this process holds it already). Raises
        ``Busy`` when another process holds it for longer than ``wait`` seconds, and
        ``StorageUnavailable`` when the lock file cannot be opened."""
        with self._guard:
            if self._count > 0:
                self._count += 1
                return
            fd = self._open()
            deadline = self._clock() + max(0.0, wait)
            try:
                while not _try_lock(fd):
                    if self._clock() >= deadline:
                        raise Busy(self._busy_detail())
                    self._sleep(WAIT_STEP_SECONDS)
                self._write_holder(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            self._count = 1
            try:
                self._on_first()
            except BaseException:
                self._count = 0
                self._fd = None
                os.close(fd)  # closing the file drops the lock
                raise

    def release(self) -> None:
        with self._guard:
            if self._count <= 0:
                raise RuntimeError("the state lease is not held")
            self._count -= 1
            if self._count == 0 and self._fd is not None:
                fd, self._fd = self._fd, None
                try:
                    os.ftruncate(fd, 0)
                except OSError:
                    pass
                os.close(fd)

    @contextmanager
    def held(self, *, wait: float = 0.0) -> Iterator[None]:
        self.acquire(wait=wait)
        try:
            yield
        finally:
            self.release()

    def try_once(self) -> bool:
        """Take the lease and give it back at once, if no other process holds it
        (``on_first`` runs then); False when another process does."""
        try:
            self.acquire(wait=0.0)
        except Busy:
            return False
        self.release()
        return True

    def current_holder(self) -> str | None:
        """Who holds the lease, as the holder wrote it (None: unknown or nobody)."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_HOLDER_BYTES)
            data = json.loads(raw.decode("utf-8")) if raw.strip() else None
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict):
            return None
        what, pid, since = data.get("holder"), data.get("pid"), data.get("since")
        return f"{what} (pid {pid}, since {since})"

    # -- internals ------------------------------------------------------------------------
    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise StorageUnavailable(
                f"the lock file {self.path} cannot be opened: {exc.strerror or exc}"
            ) from exc

    def _write_holder(self, fd: int) -> None:
        record = {
            "holder": self.holder,
            "pid": os.getpid(),
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode("utf-8") + b"\n", 0)
        except OSError as exc:  # the lock is what counts; the name only helps people
            log.warning("could not name the lease's holder in %s: %s", self.path, exc)

    def _busy_detail(self) -> str:
        who = self.current_holder() or "another process"
        return (
            f"{who} is changing this NAS through the state directory "
            f"{os.path.dirname(self.path)}; try again when it is done"
        )


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise StorageUnavailable(f"the state directory cannot be locked: {exc}") from exc
    return True
