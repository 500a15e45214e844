"""The controller's memory: one SQLite file, created on first use.

- ``audit_entries``: every audit entry pulled from each agent, as the API showed it (``raw``), by
  ``(agent, epoch, seq)``. An epoch starts when an operator accepts that an agent's
  history was rewritten (a reinstalled agent); older epochs stay as evidence.
- ``audit_state``: per agent, the epoch and the last entry kept (``last_seq``,
  ``last_hash``), what the agent said of its own chain at the last pull, and the
  status of that pull (``ok``, ``rewritten``, ``broken``) with the problem in words.
- ``audit_events``: what was noticed (history rewritten, chain broken, rewrite accepted).
- ``runs`` and ``run_agents``: one row per ``run``/``apply`` and per agent in it: what
  was found, planned, deleted, skipped, failed and reclaimed; ``report`` reads them.
- ``plans``: plans made by ``plan``, so that ``apply`` applies exactly what was shown.

Only the thread that opened the store uses it: workers return values, the CLI writes.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from controller.errors import ConfigError
from shared.models import AuditEntry, Plan, dump

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_entries (
    agent TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    at TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    raw TEXT NOT NULL,
    pulled_at TEXT NOT NULL,
    PRIMARY KEY (agent, epoch, seq)
);
CREATE TABLE IF NOT EXISTS audit_state (
    agent TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL DEFAULT 0,
    last_seq INTEGER NOT NULL DEFAULT 0,
    last_hash TEXT,
    agent_count INTEGER,
    agent_head TEXT,
    checked_at TEXT,
    status TEXT,
    problem TEXT
);
CREATE TABLE IF NOT EXISTS audit_events (
    id INTEGER PRIMARY KEY,
    agent TEXT NOT NULL,
    at TEXT NOT NULL,
    kind TEXT NOT NULL,
    seq INTEGER,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    dry_run INTEGER NOT NULL,
    policy TEXT,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    exit_code INTEGER
);
CREATE TABLE IF NOT EXISTS run_agents (
    run_id INTEGER NOT NULL REFERENCES runs (id),
    agent TEXT NOT NULL,
    reachable INTEGER NOT NULL,
    error TEXT,
    findings INTEGER,
    findings_by_kind TEXT,
    planned INTEGER NOT NULL DEFAULT 0,
    plan_skipped INTEGER NOT NULL DEFAULT 0,
    plan_id TEXT,
    job_id TEXT,
    job_state TEXT,
    deleted INTEGER NOT NULL DEFAULT 0,
    skipped INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    reclaimable_bytes INTEGER,
    reclaimed_bytes INTEGER NOT NULL DEFAULT 0,
    audit_ok INTEGER,
    pending_bytes INTEGER,
    PRIMARY KEY (run_id, agent)
);
CREATE TABLE IF NOT EXISTS plans (
    agent TEXT NOT NULL,
    plan_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    actions INTEGER NOT NULL,
    reclaimable_bytes INTEGER,
    recorded_at TEXT NOT NULL,
    job_id TEXT,
    PRIMARY KEY (agent, plan_id)
);
"""


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class AuditState:
    agent: str
    epoch: int = 0
    last_seq: int = 0
    last_hash: str | None = None
    agent_count: int | None = None
    agent_head: str | None = None
    checked_at: str | None = None
    status: str | None = None
    problem: str | None = None


@dataclass(frozen=True)
class AuditEvent:
    agent: str
    at: str
    kind: str
    seq: int | None
    detail: str


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Columns added since a store was made (kept on a volume from run to run)."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(run_agents)")}
    if "pending_bytes" not in have:
        conn.execute("ALTER TABLE run_agents ADD COLUMN pending_bytes INTEGER")


@dataclass(frozen=True)
class AgentRunRecord:
    """One agent's part of a run, as ``run_agents`` keeps it."""

    agent: str
    reachable: bool
    error: str | None = None
    findings: int | None = None
    findings_by_kind: dict[str, int] = field(default_factory=dict)
    planned: int = 0
    plan_skipped: int = 0
    plan_id: str | None = None
    job_id: str | None = None
    job_state: str | None = None
    deleted: int = 0
    skipped: int = 0
    failed: int = 0
    reclaimable_bytes: int | None = None
    reclaimed_bytes: int = 0
    audit_ok: bool | None = None
    pending_bytes: int | None = None  # of what was deleted, not freed yet when it ended


@dataclass(frozen=True)
class PlanRecord:
    agent: str
    plan_id: str
    created_at: str
    expires_at: str
    actions: int
    reclaimable_bytes: int | None
    job_id: str | None


@dataclass(frozen=True)
class ReportRow:
    """One agent over one period (a day, or one run)."""

    agent: str
    period: str
    runs: int
    found: int  # the most findings seen in one run of the period
    planned: int
    deleted: int
    refused: int  # skipped at plan time and at apply time: the agent said no
    failed: int
    errors: int  # runs in which the agent could not be driven to the end
    reclaimed_bytes: int


class Store:
    """Open with ``Store.open(path)``; use as a context manager or ``close()``."""

    def __init__(self, conn: sqlite3.Connection, *, clock: Callable[[], datetime]) -> None:
        self._conn = conn
        self._clock = clock

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, clock: Callable[[], datetime] = _utcnow
    ) -> Store:
        """Open the store, creating the file (owner-only) and its tables on first use."""
        target = Path(path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not target.exists():
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o600))
            conn = sqlite3.connect(target, timeout=30.0)
            conn.execute("PRAGMA foreign_keys = ON")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                conn.close()
                raise ConfigError(
                    f"store has schema version {version}, newer than this controller's "
                    f"{SCHEMA_VERSION}",
                    where=str(target),
                )
            with conn:
                conn.executescript(_SCHEMA)
                _add_missing_columns(conn)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the store: {exc}", where=str(target)) from exc
        return cls(conn, clock=clock)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def now(self) -> str:
        return _iso(self._clock())

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._conn:
            yield self._conn

    # -- audit --------------------------------------------------------------------------

    def audit_state(self, agent: str) -> AuditState:
        names = [f.name for f in fields(AuditState)]
        row = self._conn.execute(
            f"SELECT {', '.join(names)} FROM audit_state WHERE agent = ?",  # noqa: S608
            (agent,),
        ).fetchone()
        return AuditState(*row) if row else AuditState(agent)

    def audit_hashes(self, agent: str, *, first: int, last: int) -> dict[int, str]:
        """Stored ``seq -> hash`` of the current epoch, for ``first <= seq <= last``."""
        epoch = self.audit_state(agent).epoch
        rows = self._conn.execute(
            "SELECT seq, hash FROM audit_entries WHERE agent = ? AND epoch = ? "
            "AND seq BETWEEN ? AND ?",
            (agent, epoch, first, last),
        )
        return {int(seq): str(h) for seq, h in rows}

    def audit_entries(self, agent: str, *, epoch: int | None = None) -> list[dict[str, Any]]:
        """Stored entries of an agent (current epoch unless told), in the API's shape."""
        if epoch is None:
            epoch = self.audit_state(agent).epoch
        rows = self._conn.execute(
            "SELECT raw FROM audit_entries WHERE agent = ? AND epoch = ? ORDER BY seq",
            (agent, epoch),
        )
        return [json.loads(raw) for (raw,) in rows]

    def save_audit(
        self,
        agent: str,
        entries: Sequence[AuditEntry],
        *,
        status: str,
        problem: str | None,
        agent_count: int | None,
        agent_head: str | None,
    ) -> None:
        """Add entries that follow the last one kept and record the pull's status."""
        now = self.now()
        state = self.audit_state(agent)
        last_seq, last_hash = state.last_seq, state.last_hash
        with self._tx() as conn:
            for e in entries:
                if e.seq != last_seq + 1:
                    raise ValueError(f"entry {e.seq} does not follow {last_seq}")
                conn.execute(
                    "INSERT INTO audit_entries (agent, epoch, seq, at, actor, action, target, "
                    "outcome, prev_hash, hash, raw, pulled_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        agent,
                        state.epoch,
                        e.seq,
                        e.at,
                        e.actor,
                        e.action,
                        e.target,
                        e.outcome,
                        e.prev_hash,
                        e.hash,
                        json.dumps(dump(e), sort_keys=True),
                        now,
                    ),
                )
                last_seq, last_hash = e.seq, e.hash
            conn.execute(
                "INSERT INTO audit_state (agent, epoch, last_seq, last_hash, agent_count, "
                "agent_head, checked_at, status, problem) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (agent) DO UPDATE SET last_seq = excluded.last_seq, "
                "last_hash = excluded.last_hash, agent_count = excluded.agent_count, "
                "agent_head = excluded.agent_head, checked_at = excluded.checked_at, "
                "status = excluded.status, problem = excluded.problem",
                (
                    agent,
                    state.epoch,
                    last_seq,
                    last_hash,
                    agent_count,
                    agent_head,
                    now,
                    status,
                    problem,
                ),
            )

    def new_audit_epoch(self, agent: str, *, reason: str) -> int:
        """Start over for an agent whose rewritten history an operator accepts. The
        entries kept so far stay, under their old epoch."""
        state = self.audit_state(agent)
        epoch = state.epoch + 1
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO audit_state (agent, epoch, last_seq) VALUES (?, ?, 0) "
                "ON CONFLICT (agent) DO UPDATE SET epoch = excluded.epoch, last_seq = 0, "
                "last_hash = NULL, status = NULL, problem = NULL",
                (agent, epoch),
            )
        self.add_audit_event(agent, "accepted", state.last_seq or None, reason)
        return epoch

    def add_audit_event(self, agent: str, kind: str, seq: int | None, detail: str) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO audit_events (agent, at, kind, seq, detail) VALUES (?, ?, ?, ?, ?)",
                (agent, self.now(), kind, seq, detail),
            )

    def audit_outcomes(
        self, outcome: str, *, since: datetime | None = None, agents: Iterable[str] | None = None
    ) -> list[tuple[str, str, int]]:
        """``(agent, day, count)`` of the audit entries kept with this outcome (e.g.
        ``refused``: every refusal an agent recorded, a script's direct DELETEs too)."""
        query = (
            "SELECT agent, substr(at, 1, 10) AS day, count(*) FROM audit_entries WHERE outcome = ?"
        )
        args: list[Any] = [outcome]
        if since is not None:
            query += " AND at >= ?"
            args.append(_iso(since))
        names = list(agents) if agents is not None else None
        if names is not None:
            query += f" AND agent IN ({', '.join('?' for _ in names)})"
            args.extend(names)
        query += " GROUP BY agent, day ORDER BY day, agent"
        return [(str(a), str(d), int(n)) for a, d, n in self._conn.execute(query, args)]

    def audit_events(self, agent: str | None = None) -> list[AuditEvent]:
        query = "SELECT agent, at, kind, seq, detail FROM audit_events"
        args: tuple[str, ...] = ()
        if agent is not None:
            query += " WHERE agent = ?"
            args = (agent,)
        return [AuditEvent(*row) for row in self._conn.execute(query + " ORDER BY id", args)]

    # -- plans ----------------------------------------------------------------------------

    def record_plan(self, agent: str, plan: Plan) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO plans (agent, plan_id, created_at, expires_at, actions, "
                "reclaimable_bytes, recorded_at, job_id) VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                (
                    agent,
                    plan.id,
                    _iso(plan.created_at),
                    _iso(plan.expires_at),
                    len(plan.actions),
                    plan.reclaimable_bytes,
                    self.now(),
                ),
            )

    def pending_plan(self, agent: str) -> PlanRecord | None:
        """The agent's newest recorded plan, unless it was applied already."""
        row = self._conn.execute(
            "SELECT agent, plan_id, created_at, expires_at, actions, reclaimable_bytes, job_id "
            "FROM plans WHERE agent = ? ORDER BY recorded_at DESC, rowid DESC LIMIT 1",
            (agent,),
        ).fetchone()
        if row is None:
            return None
        record = PlanRecord(*row)
        return None if record.job_id is not None else record

    def mark_plan_applied(self, agent: str, plan_id: str, job_id: str) -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE plans SET job_id = ? WHERE agent = ? AND plan_id = ?",
                (job_id, agent, plan_id),
            )

    # -- runs -------------------------------------------------------------------------------

    def start_run(self, kind: str, *, dry_run: bool, policy: dict[str, Any] | None) -> int:
        with self._tx() as conn:
            cur = conn.execute(
                "INSERT INTO runs (kind, dry_run, policy, started_at) VALUES (?, ?, ?, ?)",
                (kind, int(dry_run), json.dumps(policy) if policy else None, self.now()),
            )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def add_run_agent(self, run_id: int, record: AgentRunRecord) -> None:
        values = asdict(record)
        values["findings_by_kind"] = json.dumps(values["findings_by_kind"], sort_keys=True)
        names = list(values)
        with self._tx() as conn:
            conn.execute(
                f"INSERT INTO run_agents (run_id, {', '.join(names)}) "  # noqa: S608
                f"VALUES (?, {', '.join('?' for _ in names)})",
                (run_id, *values.values()),
            )

    def finish_run(self, run_id: int, exit_code: int) -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE runs SET finished_at = ?, exit_code = ? WHERE id = ?",
                (self.now(), exit_code, run_id),
            )

    def run_agents(self, run_id: int) -> list[AgentRunRecord]:
        names = [f.name for f in fields(AgentRunRecord)]
        rows = self._conn.execute(
            f"SELECT {', '.join(names)} FROM run_agents WHERE run_id = ? "  # noqa: S608
            "ORDER BY agent",
            (run_id,),
        ).fetchall()
        records = []
        for row in rows:
            values = dict(zip(names, row, strict=True))
            values["findings_by_kind"] = json.loads(values["findings_by_kind"] or "{}")
            values["reachable"] = bool(values["reachable"])
            if values["audit_ok"] is not None:
                values["audit_ok"] = bool(values["audit_ok"])
            records.append(AgentRunRecord(**values))
        return records

    def report(
        self,
        *,
        since: datetime | None = None,
        by: str = "day",
        agents: Iterable[str] | None = None,
    ) -> list[ReportRow]:
        """Per agent and per period (``day`` or ``run``): runs, findings, deletions,
        refusals, failures and bytes reclaimed, oldest first. Dry runs reclaim nothing
        and delete nothing, but their findings count."""
        if by not in ("day", "run"):
            raise ValueError("by must be 'day' or 'run'")
        period = "substr(r.started_at, 1, 10)" if by == "day" else "r.started_at || ' #' || r.id"
        query = (
            f"SELECT a.agent, {period} AS period, count(*), "  # noqa: S608
            "coalesce(max(a.findings), 0), sum(a.planned), sum(a.deleted), "
            "sum(a.plan_skipped + a.skipped), sum(a.failed), "
            "sum(a.error IS NOT NULL), sum(a.reclaimed_bytes) "
            "FROM run_agents a JOIN runs r ON r.id = a.run_id WHERE 1 = 1"
        )
        args: list[Any] = []
        if since is not None:
            query += " AND r.started_at >= ?"
            args.append(_iso(since))
        names = list(agents) if agents is not None else None
        if names is not None:
            query += f" AND a.agent IN ({', '.join('?' for _ in names)})"
            args.extend(names)
        query += " GROUP BY a.agent, period ORDER BY period, a.agent"
        return [ReportRow(*row) for row in self._conn.execute(query, args)]
