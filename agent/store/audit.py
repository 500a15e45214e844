"""The agent's tamper-evident audit log: a hash chain persisted in SQLite.

Every entry carries ``seq`` (1, 2, 3, ... with no gaps), the time, who did what to which
target with what outcome, a JSON ``detail`` object, the previous entry's hash and its own
hash. An entry's hash is the SHA-256 of the canonical JSON encoding (see
``canonical_json``) of all its fields except ``hash``, ``prev_hash`` included, so each
entry vouches for the whole chain before it. The first entry's ``prev_hash`` is
``GENESIS`` (64 zeros).

Durability and concurrency: ``append`` commits before it returns, in WAL mode with
``synchronous=FULL``, so an acknowledged entry survives a crash of the process and, as far
as the disk honours fsync, of the machine. Appends take a process-local lock and a SQLite
write lock (``BEGIN IMMEDIATE``) around "read the head, insert the next entry", so threads
and processes sharing one file never fork the chain.

Next to the rows the log keeps a one-row record of its head (last ``seq`` and ``hash``),
written in the same transaction as each entry, and a random ``log_id`` made with the
file.

The file itself: the log remembers the device and inode of the file it opened and,
before each append and in ``verify``, checks that its path still names that file. A log
removed or replaced under the running agent is reported (``check_file`` raises
``AuditUnavailable``, ``verify`` is not ok with the reason) instead of being written
into a file no one will read again. Across a restart the state store remembers the
``log_id`` and head the agent last saw (``agent.store.continuity``): a fresh or other
log in its place is reported the same way (``mark_broken``).

What ``verify`` detects, and what it cannot:

- an edited row (any field, even an edit that keeps the value's meaning, such as another
  spelling of the same time): the row's hash no longer matches its content, reported at
  that ``seq``;
- an edited row whose ``hash`` was recomputed too: the next row's ``prev_hash`` no longer
  links, reported at the next ``seq`` (or, for the last row, the head record disagrees);
- a dropped row: a gap in ``seq``, reported at the first entry after the gap;
- reordered rows: ``seq`` is hashed, so a row moved to another position fails its hash;
- a truncated tail: the head record still names the old head, reported at the first
  missing ``seq``.

Anyone who can write the database file can also rewrite the chain from the edit onwards
and the head record with it: a hash chain kept in one place cannot stop that. Such a
rewrite, or a truncation that also rewrites the head record, shows only to someone who
remembered an earlier ``(seq, hash)``: that is why the controller pulls entries, keeps
the head it last saw and checks it again (with ``shared.auditchain.ChainCheck``, the walk
this log's ``verify`` uses too).
"""

from __future__ import annotations

import json
import os
import sqlite3
import urllib.parse
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from agent.errors import AgentError, AuditUnavailable
from agent.store.entries import (
    AuditEntry,
    VerifyResult,
    format_time,
    normalize_json_object,
    parse_time,
)
from agent.store.sqlite import SqliteFile, read_transaction, storage_errors
from shared.auditchain import GENESIS, ChainCheck, canonical_json, entry_hash
from shared.wirepath import safe_json, safe_text

__all__ = ["AuditCorrupt", "AuditLog"]

SCHEMA_VERSION = 1


class AuditCorrupt(AgentError):
    """A stored row cannot be decoded, or the head cannot be extended: the log was
    tampered with. ``verify`` says where."""

    code, title = "audit_corrupt", "The audit log is corrupt"


# --- storage ------------------------------------------------------------------------

_SELECT_ROWS = "SELECT seq, at, actor, action, target, outcome, detail, prev_hash, hash FROM audit"
_INSERT_ROW = (
    "INSERT INTO audit (seq, at, actor, action, target, outcome, detail, prev_hash, hash) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_TEXT_COLUMNS = ("at", "actor", "action", "target", "outcome", "detail", "prev_hash", "hash")


class AuditLog(SqliteFile):
    """The audit log in one SQLite file. Safe to share between threads; several
    processes may open the same file. Not for ``:memory:``: ``verify`` reads through a
    connection of its own."""

    def _init_schema(self) -> None:
        with self._writing() as conn:
            conn.execute(
                """CREATE TABLE IF NOT EXISTS audit (
                    seq INTEGER PRIMARY KEY,
                    at TEXT NOT NULL,
                    actor TEXT NOT NULL,
                    action TEXT NOT NULL,
                    target TEXT NOT NULL,
                    outcome TEXT NOT NULL,
                    detail TEXT NOT NULL,
                    prev_hash TEXT NOT NULL,
                    hash TEXT NOT NULL
                )"""
            )
            conn.execute(
                """CREATE TABLE IF NOT EXISTS audit_head (
                    id INTEGER PRIMARY KEY CHECK (id = 1),
                    seq INTEGER NOT NULL,
                    hash TEXT NOT NULL
                )"""
            )
            conn.execute(
                """CREATE TABLE IF NOT EXISTS audit_meta (
                    id INTEGER PRIMARY KEY CHECK (id = 1),
                    log_id TEXT NOT NULL
                )"""
            )
            conn.execute(
                "INSERT INTO audit_meta (id, log_id) VALUES (1, ?) ON CONFLICT (id) DO NOTHING",
                (uuid.uuid4().hex,),
            )
            self.log_id = str(conn.execute("SELECT log_id FROM audit_meta").fetchone()[0])
            has_head = conn.execute("SELECT 1 FROM audit_head").fetchone() is not None
            has_rows = conn.execute("SELECT 1 FROM audit LIMIT 1").fetchone() is not None
            # A log with rows but no head record was tampered with: do not paper over it.
            if not has_head and not has_rows:
                conn.execute("INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, ?)", (GENESIS,))
            if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)
        self._broken: str | None = None

    # --- the file ---

    def mark_broken(self, reason: str) -> None:
        """Refuse appends and fail ``verify`` with ``reason`` from now on (the agent
        found at start-up that this is not the log it kept: see
        ``agent.store.continuity``)."""
        self._broken = reason

    def file_problem(self) -> str | None:
        """Why this log cannot be trusted to record anything now, or None: its path no
        longer names the file that was opened (removed, replaced), or ``mark_broken``."""
        if self._broken is not None:
            return self._broken
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return f"the audit log {self.path} was removed while the agent runs"
        except OSError as exc:
            return f"the audit log {self.path} cannot be checked: {exc.strerror or exc}"
        if (st.st_dev, st.st_ino) != self._identity:
            return f"the audit log {self.path} was replaced by another file"
        return None

    def check_file(self) -> None:
        """``AuditUnavailable`` when ``file_problem`` finds one."""
        problem = self.file_problem()
        if problem is not None:
            raise AuditUnavailable(problem)

    def append(
        self,
        *,
        actor: str,
        action: str,
        target: str,
        outcome: str,
        detail: Mapping[str, Any] | str,
        at: datetime | None = None,
    ) -> AuditEntry:
        """Append one entry and return it once it is committed to disk. A string
        ``detail`` is stored as ``{"message": detail}``. ``ValueError`` for a naive
        ``at``, a non-string field or a detail that is not a JSON object; ``AuditCorrupt``
        when the stored head cannot be extended (the log was tampered with);
        ``AuditUnavailable`` when the file is not the one opened (``check_file``),
        ``StorageUnavailable`` when it cannot be written (locked, full, I/O)."""
        for name, value in (
            ("actor", actor),
            ("action", action),
            ("target", target),
            ("outcome", outcome),
        ):
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a string, not {type(value).__name__}")
            _check_text(name, value)
        body = {"message": detail} if isinstance(detail, str) else detail
        # A file name may hold bytes that are not UTF-8 (surrogate escapes in ``str``):
        # the log keeps them readable (U+FFFD) rather than refuse the entry.
        normalized = normalize_json_object(safe_json(body), what="detail")
        actor, action, target, outcome = (safe_text(v) for v in (actor, action, target, outcome))
        detail_text = canonical_json(normalized)
        at_text = format_time(self._clock() if at is None else at)
        self.check_file()
        with self._writing() as conn:
            prev_seq, prev_hash = self._head_locked(conn)
            seq = prev_seq + 1
            digest = entry_hash(
                seq=seq,
                at=at_text,
                actor=actor,
                action=action,
                target=target,
                outcome=outcome,
                detail=normalized,
                prev_hash=prev_hash,
            )
            try:
                conn.execute(
                    _INSERT_ROW,
                    (seq, at_text, actor, action, target, outcome, detail_text, prev_hash, digest),
                )
            except sqlite3.IntegrityError as exc:
                raise AuditCorrupt(
                    f"entry {seq} already exists beyond the recorded head {prev_seq}"
                ) from exc
            conn.execute(
                "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                (seq, digest),
            )
        return AuditEntry(
            seq=seq,
            at=parse_time(at_text),
            actor=actor,
            action=action,
            target=target,
            outcome=outcome,
            detail=normalized,
            prev_hash=prev_hash,
            hash=digest,
        )

    @staticmethod
    def _head_locked(conn: sqlite3.Connection) -> tuple[int, str]:
        row = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
        if row is None:
            row = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        if row is None:
            return 0, GENESIS
        seq, digest = row
        if type(seq) is not int or not isinstance(digest, str):
            raise AuditCorrupt("the recorded head is malformed")
        return seq, digest

    # --- reading ---

    def head(self) -> str:
        """The hash of the last entry (``GENESIS`` for an empty log)."""
        return self.head_entry()[1]

    def head_entry(self) -> tuple[int, str]:
        """``(seq, hash)`` of the last entry; ``(0, GENESIS)`` for an empty log."""
        with self._snapshot() as conn:
            return self._head_locked(conn)

    def page(self, *, after_seq: int = 0, limit: int = 500) -> list[AuditEntry]:
        """Up to ``limit`` entries with ``seq > after_seq``, oldest first, as stored (no
        checking: that is ``verify``'s job). ``AuditCorrupt`` when a row cannot be
        decoded at all."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if after_seq < 0:
            raise ValueError("after_seq must not be negative")
        with self._reading() as conn:
            rows = conn.execute(
                _SELECT_ROWS + " WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        entries = []
        for row in rows:
            try:
                entries.append(_decode_row(row))
            except ValueError as exc:
                raise AuditCorrupt(f"audit entry {row[0]} cannot be read: {exc}") from exc
        return entries

    def verify(self) -> VerifyResult:
        """Walk the whole log, one row at a time, on a snapshot taken through a connection
        of its own (appends go on meanwhile). See the module docstring for what is
        detected. A log whose file is not the one opened (``file_problem``) is not ok,
        with that reason; nothing is read from whatever is at its path now."""
        problem = self.file_problem()
        if problem is not None:
            seq, digest = self.head_entry()  # the open file is still readable
            return VerifyResult(
                ok=False, count=seq, head=digest, first_bad_seq=None, reason=problem
            )
        with storage_errors(self.path):
            return self._verify()

    def _verify(self) -> VerifyResult:
        # read-only, never creating a file that is not there
        conn = sqlite3.connect(
            f"file:{urllib.parse.quote(str(self.path))}?mode=ro",
            timeout=self._timeout,
            isolation_level=None,
            uri=True,
        )
        try:
            conn.execute("PRAGMA query_only = ON")
            with read_transaction(conn):
                check = ChainCheck(after_seq=0, after_hash=GENESIS)
                for row in conn.execute(_SELECT_ROWS + " ORDER BY seq"):
                    _check_row(check, row)
                recorded = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
        finally:
            conn.close()
        if recorded is None:
            check.bad(check.last_seq + 1, "the head record is missing")
        else:
            head_seq, head_hash = recorded
            if type(head_seq) is not int or not isinstance(head_hash, str):
                check.bad(check.last_seq + 1, "the head record is malformed")
            elif head_seq > check.last_seq:
                check.bad(
                    check.last_seq + 1,
                    f"entries {check.last_seq + 1}..{head_seq} are missing (truncated)",
                )
            elif head_seq < check.last_seq:
                check.bad(head_seq + 1, f"entries after the recorded head {head_seq}")
            elif head_hash != check.head:
                check.bad(check.last_seq, "the last entry differs from the recorded head")
        return VerifyResult(
            ok=check.ok,
            count=check.count,
            head=check.head,
            first_bad_seq=check.first_bad,
            reason=check.reason,
        )


def _check_text(name: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} is not valid Unicode text: {exc}") from exc


def _decode_row(row: tuple[Any, ...]) -> AuditEntry:
    """A stored row as an entry; ``ValueError`` when a column has the wrong type or a
    spelling that ``append`` would not have written."""
    seq, at, actor, action, target, outcome, detail, prev_hash, digest = row
    if type(seq) is not int:
        raise ValueError("seq is not an integer")
    for name, value in zip(_TEXT_COLUMNS, row[1:], strict=True):
        if not isinstance(value, str):
            raise ValueError(f"{name} is not text")
    try:
        loaded = json.loads(detail)
    except ValueError as exc:
        raise ValueError(f"detail is not JSON: {exc}") from exc
    if not isinstance(loaded, dict) or canonical_json(loaded) != detail:
        raise ValueError("detail is not a canonical JSON object")
    return AuditEntry(
        seq=seq,
        at=parse_time(at),
        actor=actor,
        action=action,
        target=target,
        outcome=outcome,
        detail=loaded,
        prev_hash=prev_hash,
        hash=digest,
    )


def _check_row(check: ChainCheck, row: tuple[Any, ...]) -> None:
    seq, prev_hash, digest = row[0], row[7], row[8]
    try:
        entry = _decode_row(row)
        content_ok = entry.computed_hash() == digest
    except ValueError:
        content_ok = False
    check.feed(
        seq=int(seq),  # an INTEGER PRIMARY KEY always reads back as an integer
        prev_hash=prev_hash if isinstance(prev_hash, str) else "",
        stored_hash=digest if isinstance(digest, str) else "",
        content_ok=content_ok,
    )
