"""The controller's SQLite store: made on first use, runs and plans kept, report sums."""

from __future__ import annotations

import sqlite3
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from controller.errors import ConfigError
from controller.store import AgentRunRecord, Store
from shared.models import Plan, load
from tests.shared.test_models import PLAN


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2024, 5, 1, 12, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def test_created_on_first_use_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "controller.db"
    with Store.open(path):
        pass
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    tables = {
        r[0]
        for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type='table'")
    }
    assert {"audit_entries", "audit_state", "audit_events", "runs", "run_agents", "plans"} <= tables
    with Store.open(path) as again:  # opening again keeps what is there
        assert again.audit_state("nas1").last_seq == 0


def test_a_store_that_cannot_be_opened_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot open the store"):
        Store.open(tmp_path / "file" / "controller.db")
    newer = tmp_path / "newer.db"
    sqlite3.connect(newer).execute("PRAGMA user_version = 99")
    with pytest.raises(ConfigError, match="newer than this controller"):
        Store.open(newer)


def test_plans_pending_until_applied(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.db") as store:
        assert store.pending_plan("nas1") is None
        p1 = load(Plan, PLAN)
        p2 = load(Plan, {**PLAN, "id": "p2"})
        store.record_plan("nas1", p1)
        store.record_plan("nas1", p2)
        pending = store.pending_plan("nas1")
        assert pending is not None and pending.plan_id == "p2" and pending.actions == 1
        assert store.pending_plan("nas2") is None
        store.mark_plan_applied("nas1", "p2", "j1")
        assert store.pending_plan("nas1") is None  # the newest was applied: nothing pending


def test_report_sums_per_agent_per_day(tmp_path: Path) -> None:
    clock = Clock()
    with Store.open(tmp_path / "s.db", clock=clock) as store:
        for day in range(3):
            clock.now = datetime(2024, 5, 1 + day, 3, tzinfo=UTC)
            run = store.start_run("run", dry_run=False, policy={"kinds": ["dind-volume"]})
            store.add_run_agent(
                run,
                AgentRunRecord(
                    agent="nas1",
                    reachable=True,
                    findings=5 - day,
                    findings_by_kind={"dind-volume": 5 - day},
                    planned=2,
                    plan_skipped=1,
                    deleted=2,
                    skipped=1,
                    reclaimed_bytes=1000 * (day + 1),
                    audit_ok=True,
                ),
            )
            store.add_run_agent(run, AgentRunRecord(agent="nas2", reachable=False, error="down"))
            store.finish_run(run, 1)
        # a second run on the last day
        run = store.start_run("apply", dry_run=False, policy=None)
        store.add_run_agent(
            run,
            AgentRunRecord(agent="nas1", reachable=True, planned=1, deleted=0, failed=1),
        )
        rows = store.report(since=datetime(2024, 5, 2, tzinfo=UTC))
        assert [(r.period, r.agent) for r in rows] == [
            ("2024-05-02", "nas1"),
            ("2024-05-02", "nas2"),
            ("2024-05-03", "nas1"),
            ("2024-05-03", "nas2"),
        ]
        last = rows[2]
        assert (last.runs, last.found, last.planned, last.deleted) == (2, 3, 3, 2)
        assert (last.refused, last.failed, last.errors, last.reclaimed_bytes) == (2, 1, 0, 3000)
        assert (rows[1].runs, rows[1].errors, rows[1].reclaimed_bytes) == (1, 1, 0)
        by_run = store.report(by="run", agents=["nas1"])
        assert len(by_run) == 4 and {r.agent for r in by_run} == {"nas1"}
        records = store.run_agents(1)
        assert records[0].findings_by_kind == {"dind-volume": 5} and records[0].audit_ok is True
        assert records[1] == AgentRunRecord(agent="nas2", reachable=False, error="down")
        with pytest.raises(ValueError):
            store.report(by="week")
        assert store.report(since=clock.now + timedelta(days=1)) == []


def test_a_store_made_before_pending_bytes_gets_the_column(tmp_path: Path) -> None:
    """A k3s store lives on a volume from version to version: an older file opens, and
    keeps its runs."""
    path = tmp_path / "old.db"
    with Store.open(path) as store:
        run = store.start_run("run", dry_run=False, policy=None)
        store.add_run_agent(run, AgentRunRecord(agent="nas1", reachable=True, deleted=2))
    with sqlite3.connect(path) as conn:  # as the store was before the column
        conn.execute("ALTER TABLE run_agents DROP COLUMN pending_bytes")
    with Store.open(path) as store:
        (old,) = store.run_agents(run)
        assert old.deleted == 2 and old.pending_bytes is None
