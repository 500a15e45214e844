"""SQLite files the agent keeps in its state directory (the audit log, plans and jobs):
durable connections, explicit transactions, and the open/close boilerplate.

Durability: WAL journal with ``synchronous=FULL``, every write committed before the
method returns. Concurrency: a process-local lock plus ``BEGIN IMMEDIATE`` around each
read-check-write, so threads and processes sharing a file see each write whole or not
at all.

Faults: another process holding the write lock is waited for ``DEFAULT_TIMEOUT``
(2 s), not 30; then, like a full disk, an I/O error or a file that cannot be opened,
the operation fails with ``agent.errors.StorageUnavailable`` (503 with
``Retry-After``), its transaction rolled back: nothing of it is stored. The mapping is
done once, here (``storage_errors``), for every method of every store.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Self

from agent.errors import StorageUnavailable

DEFAULT_TIMEOUT = 2.0


@contextlib.contextmanager
def storage_errors(path: Path) -> Iterator[None]:
    """SQLite's and the file system's faults as ``StorageUnavailable``. Integrity and
    programming errors stay what they are: they are bugs or tampering, not faults."""
    try:
        yield
    except (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError):
        raise
    except sqlite3.DatabaseError as exc:  # OperationalError: locked, full, I/O, open
        raise StorageUnavailable(f"{path.name}: {exc}") from exc
    except OSError as exc:
        raise StorageUnavailable(f"{path.name}: {exc.strerror or exc}") from exc


def utcnow() -> datetime:
    return datetime.now(UTC)


def connect_durable(path: Path, *, timeout: float) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL journal,
    ``synchronous=FULL``, waiting up to ``timeout`` seconds for another writer. A new
    database file is created readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot use WAL journal on {path} (got {mode})")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        conn.close()
        raise
    return conn


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on any exception). The caller
    holds its process-local lock."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        # SQLite may have rolled back by itself already (a full disk, an I/O error)
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


@contextlib.contextmanager
def read_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One consistent snapshot for several reads."""
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")


class SqliteFile:
    """One SQLite file with a durable connection; subclasses create their tables in
    ``_init_schema``. Safe to share between threads; several processes may open the
    same file."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.path = Path(path)
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        with storage_errors(self.path):
            self._conn = connect_durable(self.path, timeout=timeout)
        try:
            with storage_errors(self.path):
                self._init_schema()
        except BaseException:
            self._conn.close()
            raise

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """The connection under the process-local lock, faults mapped."""
        with self._lock, storage_errors(self.path):
            yield self._conn

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """``_reading`` in one read transaction."""
        with self._lock, storage_errors(self.path), read_transaction(self._conn) as conn:
            yield conn

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """A write transaction under the process-local lock, faults mapped."""
        with self._lock, storage_errors(self.path), write_transaction(self._conn) as conn:
            yield conn

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], datetime] = utcnow,
    ) -> Self:
        return cls(path, timeout=timeout, clock=clock)

    def _init_schema(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
