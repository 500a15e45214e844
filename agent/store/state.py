"""Plans, jobs and per-action results, persisted in SQLite in the agent's state directory.

The store keeps each plan, job and result as a JSON document (``body``) whose shape the
domain decides; the store itself only knows the columns it needs to keep its promises:

- a plan is written once and never changed (``save_plan`` of the same id with other
  content is a ``Conflict``);
- a plan has at most one job, and an ``Idempotency-Key`` names at most one job:
  ``create_job_for_plan`` is atomic, and asking again (same plan, or same key) returns
  the existing job with ``created=False``; a key already used for another plan is a
  ``Conflict``;
- an action's result is recorded at most once: ``record_result`` of a ``(job_id, seq)``
  already recorded changes nothing and returns ``False``;
- ``update_job(..., expect_state=...)`` is a compare-and-set, so two requests cannot both
  resume the same interrupted job;
- at start-up ``mark_interrupted`` turns every ``queued`` or ``running`` job into
  ``interrupted``;
- at most ``max_plans`` plans are kept: ``reserve_plan_slot`` (called before a plan is
  saved) purges expired plans without a job, oldest first and a bounded number at a
  time, and raises ``TooMany`` when the cap is still reached;
- the audit log the agent last saw (its ``log_id`` and head) is remembered
  (``audit_mark``), so that a restart can tell a fresh or other audit log from its own.

The ``state`` column is the job's state of record; the store never looks inside
``body``, so a ``state`` the domain keeps in the body is not rewritten by
``mark_interrupted``.

Durability and concurrency are those of ``agent.store.sqlite``: WAL with ``synchronous=FULL``,
every write committed before the method returns, a process-local lock plus
``BEGIN IMMEDIATE`` around each read-check-write, so threads and processes sharing the
file see each write whole or not at all.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agent.errors import Conflict, NotFound, TooMany
from agent.store.entries import format_time, normalize_json_object, parse_time
from agent.store.sqlite import SqliteFile
from shared.auditchain import canonical_json

__all__ = [
    "ACTIVE_JOB_STATES",
    "JOB_STATES",
    "MAX_PLANS",
    "RESULT_OUTCOMES",
    "StateStore",
    "StoredJob",
    "StoredPlan",
    "StoredResult",
]

SCHEMA_VERSION = 1
JOB_STATES = frozenset(
    {"queued", "running", "succeeded", "partial", "failed", "skipped", "interrupted"}
)
ACTIVE_JOB_STATES = frozenset({"queued", "running"})  # what a crash cuts short (SQL below)
RESULT_OUTCOMES = frozenset({"deleted", "skipped", "failed"})
MAX_PLANS = 1000  # plans kept at most (config: max_stored_plans)
PURGE_BATCH = 500  # expired plans purged at most per plan creation


@dataclass(frozen=True)
class StoredPlan:
    id: str
    created_at: datetime
    expires_at: datetime
    body: dict[str, Any]


@dataclass(frozen=True)
class StoredJob:
    id: str
    plan_id: str
    idempotency_key: str | None
    state: str
    body: dict[str, Any]
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class StoredResult:
    job_id: str
    seq: int
    outcome: str
    body: dict[str, Any]
    recorded_at: datetime


_PLAN_COLUMNS = "SELECT id, created_at, expires_at, body FROM plans"
_JOB_COLUMNS = "SELECT id, plan_id, idempotency_key, state, body, created_at, updated_at FROM jobs"
_RESULT_COLUMNS = "SELECT job_id, seq, outcome, body, recorded_at FROM job_results"


class StateStore(SqliteFile):
    """Plans, jobs and results in one SQLite file. Safe to share between threads; several
    processes may open the same file."""

    def _init_schema(self) -> None:
        with self._writing() as conn:
            conn.execute(
                """CREATE TABLE IF NOT EXISTS plans (
                    id TEXT PRIMARY KEY,
                    created_at TEXT NOT NULL,
                    expires_at TEXT NOT NULL,
                    body TEXT NOT NULL
                )"""
            )
            conn.execute(
                """CREATE TABLE IF NOT EXISTS jobs (
                    id TEXT PRIMARY KEY,
                    plan_id TEXT NOT NULL UNIQUE REFERENCES plans (id),
                    idempotency_key TEXT UNIQUE,
                    state TEXT NOT NULL,
                    body TEXT NOT NULL,
                    created_at TEXT NOT NULL,
                    updated_at TEXT NOT NULL
                )"""
            )
            conn.execute("CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state)")
            # Keys first used on a plan that already had its job (a job's own key is in
            # jobs.idempotency_key): a key names one job from its first use on.
            conn.execute(
                """CREATE TABLE IF NOT EXISTS idempotency_keys (
                    key TEXT PRIMARY KEY,
                    job_id TEXT NOT NULL REFERENCES jobs (id)
                )"""
            )
            conn.execute(
                """CREATE TABLE IF NOT EXISTS job_results (
                    job_id TEXT NOT NULL REFERENCES jobs (id),
                    seq INTEGER NOT NULL,
                    outcome TEXT NOT NULL,
                    body TEXT NOT NULL,
                    recorded_at TEXT NOT NULL,
                    PRIMARY KEY (job_id, seq)
                )"""
            )
            conn.execute("CREATE INDEX IF NOT EXISTS plans_by_expiry ON plans (expires_at)")
            conn.execute(
                """CREATE TABLE IF NOT EXISTS audit_mark (
                    id INTEGER PRIMARY KEY CHECK (id = 1),
                    log_id TEXT NOT NULL,
                    seq INTEGER NOT NULL,
                    hash TEXT NOT NULL
                )"""
            )
            if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # --- plans ---

    def save_plan(
        self, id: str, created_at: datetime, expires_at: datetime, body: Mapping[str, Any]
    ) -> StoredPlan:
        """Store a new plan. Saving the same plan again is a no-op; another plan under an
        id already taken is a ``Conflict``."""
        _check_id("plan id", id)
        row = (id, format_time(created_at), format_time(expires_at), _body_text(body))
        with self._writing() as conn:
            existing = conn.execute(_PLAN_COLUMNS + " WHERE id = ?", (id,)).fetchone()
            if existing is None:
                conn.execute(
                    "INSERT INTO plans (id, created_at, expires_at, body) VALUES (?, ?, ?, ?)", row
                )
            elif tuple(existing) != row:
                raise Conflict(f"plan {id} already exists with other content")
        return _plan(row)

    def get_plan(self, id: str) -> StoredPlan | None:
        with self._reading() as conn:
            row = conn.execute(_PLAN_COLUMNS + " WHERE id = ?", (id,)).fetchone()
        return None if row is None else _plan(row)

    def reserve_plan_slot(
        self, now: datetime, *, max_plans: int, purge_batch: int = PURGE_BATCH
    ) -> int:
        """Make room for one more plan: purge plans expired at or before ``now`` that
        have no job, oldest expiry first, at most ``purge_batch`` of them (bounded work
        per call: called on every plan creation, the backlog goes in a few calls).
        ``TooMany`` (422 too_many) when ``max_plans`` plans are still stored. Returns
        how many were purged."""
        if max_plans < 1 or purge_batch < 1:
            raise ValueError("max_plans and purge_batch must be at least 1")
        with self._writing() as conn:
            purged = conn.execute(
                "DELETE FROM plans WHERE id IN (SELECT id FROM plans WHERE expires_at <= ? "
                "AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.plan_id = plans.id) "
                "ORDER BY expires_at, id LIMIT ?)",
                (format_time(now), purge_batch),
            ).rowcount
            stored = conn.execute("SELECT count(*) FROM plans").fetchone()[0]
        if stored >= max_plans:
            raise TooMany(
                f"{stored} plans are stored, the most this agent keeps ({max_plans}), and "
                "none has expired without a job: apply or wait for one to expire",
                extra={"max_plans": max_plans},
            )
        return purged

    def delete_plan(self, id: str) -> bool:
        """Remove a plan that has no job (a plan whose audit entry could not be written
        must not stay). ``Conflict`` when it has a job; ``False`` when there was none."""
        with self._writing() as conn:
            if conn.execute("SELECT 1 FROM jobs WHERE plan_id = ?", (id,)).fetchone():
                raise Conflict(f"plan {id} has a job and is kept")
            return conn.execute("DELETE FROM plans WHERE id = ?", (id,)).rowcount == 1

    def count_plans(self) -> int:
        with self._reading() as conn:
            return int(conn.execute("SELECT count(*) FROM plans").fetchone()[0])

    # --- the audit log the agent last saw ---

    def audit_mark(self) -> tuple[str, int, str] | None:
        """``(log_id, seq, hash)`` of the audit log as last seen, or None (never)."""
        with self._reading() as conn:
            row = conn.execute("SELECT log_id, seq, hash FROM audit_mark").fetchone()
        return None if row is None else (str(row[0]), int(row[1]), str(row[2]))

    def set_audit_mark(self, log_id: str, seq: int, hash: str) -> None:
        with self._writing() as conn:
            conn.execute(
                "INSERT INTO audit_mark (id, log_id, seq, hash) VALUES (1, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET log_id = excluded.log_id, "
                "seq = excluded.seq, hash = excluded.hash",
                (log_id, seq, hash),
            )

    # --- jobs ---

    def create_job_for_plan(
        self,
        *,
        job_id: str,
        plan_id: str,
        idempotency_key: str | None,
        body: Mapping[str, Any],
        state: str = "queued",
    ) -> tuple[StoredJob, bool]:
        """The job for ``plan_id``, created if there is none: ``(job, created)``.

        Atomic across threads and processes. When the plan already has a job, that job
        comes back (``created=False``) whatever key is given, and a new key is recorded
        as naming that job, so that the same request later gets the same answer. When
        ``idempotency_key`` already names the job of another plan, the answer is
        ``Conflict``: one key, one request. ``NotFound`` when the plan does not exist.
        Expiry is the caller's to check: a plan that already has a job returns it even
        after it expired."""
        _check_id("job id", job_id)
        _check_id("plan id", plan_id)
        if idempotency_key is not None:
            _check_id("idempotency key", idempotency_key)
        _check_state(state)
        body_text = _body_text(body)
        now = format_time(self._clock())
        with self._writing() as conn:
            if idempotency_key is not None:
                row = conn.execute(
                    _JOB_COLUMNS + " WHERE idempotency_key = ?", (idempotency_key,)
                ).fetchone()
                if row is None:
                    named = conn.execute(
                        "SELECT job_id FROM idempotency_keys WHERE key = ?", (idempotency_key,)
                    ).fetchone()
                    if named is not None:
                        row = conn.execute(_JOB_COLUMNS + " WHERE id = ?", named).fetchone()
                if row is not None:
                    job = _job(row)
                    if job.plan_id != plan_id:
                        raise Conflict(
                            "Idempotency-Key was already used to apply another plan",
                            extra={"job_id": job.id, "plan_id": job.plan_id},
                        )
                    return job, False
            row = conn.execute(_JOB_COLUMNS + " WHERE plan_id = ?", (plan_id,)).fetchone()
            if row is not None:
                if idempotency_key is not None:
                    conn.execute(
                        "INSERT INTO idempotency_keys (key, job_id) VALUES (?, ?)",
                        (idempotency_key, row[0]),
                    )
                return _job(row), False
            if conn.execute("SELECT 1 FROM plans WHERE id = ?", (plan_id,)).fetchone() is None:
                raise NotFound(f"no plan {plan_id}")
            if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is not None:
                raise Conflict(f"job id {job_id} is already taken by another plan")
            row = (job_id, plan_id, idempotency_key, state, body_text, now, now)
            conn.execute(
                "INSERT INTO jobs (id, plan_id, idempotency_key, state, body, created_at, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                row,
            )
        return _job(row), True

    def get_job(self, id: str) -> StoredJob | None:
        with self._reading() as conn:
            row = conn.execute(_JOB_COLUMNS + " WHERE id = ?", (id,)).fetchone()
        return None if row is None else _job(row)

    def get_job_for_plan(self, plan_id: str) -> StoredJob | None:
        with self._reading() as conn:
            row = conn.execute(_JOB_COLUMNS + " WHERE plan_id = ?", (plan_id,)).fetchone()
        return None if row is None else _job(row)

    def update_job(
        self,
        id: str,
        *,
        state: str,
        body: Mapping[str, Any],
        expect_state: str | Collection[str] | None = None,
    ) -> StoredJob:
        """Replace the job's state and body. With ``expect_state``, only when the job is
        in (one of) that state(s) now, else ``Conflict``: a compare-and-set, e.g.
        ``expect_state="interrupted"`` to resume a job exactly once. ``NotFound`` when
        there is no such job."""
        _check_state(state)
        expected = _states(expect_state)
        body_text = _body_text(body)
        now = format_time(self._clock())
        with self._writing() as conn:
            row = conn.execute(_JOB_COLUMNS + " WHERE id = ?", (id,)).fetchone()
            if row is None:
                raise NotFound(f"no job {id}")
            if expected is not None and row[3] not in expected:
                raise Conflict(
                    f"job {id} is {row[3]}, not {' or '.join(sorted(expected))}",
                    extra={"state": row[3]},
                )
            conn.execute(
                "UPDATE jobs SET state = ?, body = ?, updated_at = ? WHERE id = ?",
                (state, body_text, now, id),
            )
        return _job((row[0], row[1], row[2], state, body_text, row[5], now))

    def mark_interrupted(self) -> list[str]:
        """At start-up, before any job runs: every ``queued`` or ``running`` job becomes
        ``interrupted``. Returns their ids, oldest first. Call it once per agent start,
        not from each of several worker processes sharing the file: it cannot tell a job
        cut short by a crash from one another live process is running."""
        now = format_time(self._clock())
        with self._writing() as conn:
            ids = [
                row[0]
                for row in conn.execute(
                    "SELECT id FROM jobs WHERE state IN ('queued', 'running') "
                    "ORDER BY created_at, id"
                )
            ]
            conn.execute(
                "UPDATE jobs SET state = 'interrupted', updated_at = ? "
                "WHERE state IN ('queued', 'running')",
                (now,),
            )
        return ids

    # --- results ---

    def record_result(
        self,
        job_id: str,
        seq: int,
        outcome: str,
        body: Mapping[str, Any],
        *,
        job_body: Mapping[str, Any] | None = None,
    ) -> bool:
        """Record the result of action ``seq`` of a job, once: ``True`` when this call
        recorded it, ``False`` when a result for ``(job_id, seq)`` was already there (it
        is left as it was). With ``job_body``, the job's body is replaced in the same
        transaction, only when the result is new (progress never runs ahead of or lags
        behind the results). ``NotFound`` when there is no such job."""
        if type(seq) is not int:
            raise ValueError("seq must be an integer")
        if outcome not in RESULT_OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(RESULT_OUTCOMES)}, not {outcome!r}")
        body_text = _body_text(body)
        job_text = None if job_body is None else _body_text(job_body)
        now = format_time(self._clock())
        with self._writing() as conn:
            if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
                raise NotFound(f"no job {job_id}")
            cursor = conn.execute(
                "INSERT INTO job_results (job_id, seq, outcome, body, recorded_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (job_id, seq) DO NOTHING",
                (job_id, seq, outcome, body_text, now),
            )
            inserted = cursor.rowcount == 1
            if inserted and job_text is not None:
                conn.execute(
                    "UPDATE jobs SET body = ?, updated_at = ? WHERE id = ?",
                    (job_text, now, job_id),
                )
        return inserted

    def results(self, job_id: str) -> list[StoredResult]:
        """The job's recorded results in ``seq`` order (empty for an unknown job)."""
        with self._reading() as conn:
            rows = conn.execute(
                _RESULT_COLUMNS + " WHERE job_id = ? ORDER BY seq", (job_id,)
            ).fetchall()
        return [_result(row) for row in rows]


# --- helpers ------------------------------------------------------------------------


def _check_id(what: str, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid Unicode text") from exc


def _check_state(state: str) -> None:
    if state not in JOB_STATES:
        raise ValueError(f"job state must be one of {sorted(JOB_STATES)}, not {state!r}")


def _states(states: str | Collection[str] | None) -> frozenset[str] | None:
    if states is None:
        return None
    wanted = frozenset({states} if isinstance(states, str) else states)
    for state in wanted:
        _check_state(state)
    if not wanted:
        raise ValueError("an empty set of states matches nothing")
    return wanted


def _body_text(body: Mapping[str, Any]) -> str:
    return canonical_json(normalize_json_object(body, what="body"))


def _plan(row: tuple[Any, ...]) -> StoredPlan:
    id, created_at, expires_at, body = row
    return StoredPlan(
        id=id,
        created_at=parse_time(created_at),
        expires_at=parse_time(expires_at),
        body=_load(body),
    )


def _job(row: tuple[Any, ...]) -> StoredJob:
    id, plan_id, key, state, body, created_at, updated_at = row
    return StoredJob(
        id=id,
        plan_id=plan_id,
        idempotency_key=key,
        state=state,
        body=_load(body),
        created_at=parse_time(created_at),
        updated_at=parse_time(updated_at),
    )


def _result(row: tuple[Any, ...]) -> StoredResult:
    job_id, seq, outcome, body, recorded_at = row
    return StoredResult(
        job_id=job_id,
        seq=seq,
        outcome=outcome,
        body=_load(body),
        recorded_at=parse_time(recorded_at),
    )


def _load(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("stored body is not a JSON object")
    return value
