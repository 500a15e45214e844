"""Stored plans are capped and expired ones purged (issue 12, case 5), over the real
app and the stateful fakes with a clock the test moves. Before: 1,000 plans were all
kept, expired or not, and there was no cap."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from agent.http.app import Backends, create_app
from agent.store.state import StateStore
from tests.agent.http.apphelpers import agent_config, auth, join_job_thread
from tests.fakes import make_leak_scenario
from tests.robustness import knobs


def test_plans_are_capped_and_expired_ones_purged(tmp_path: Path) -> None:
    cap = 200 if knobs.LONG else 20
    sc = make_leak_scenario()
    now = [sc.now]

    def clock() -> datetime:
        return now[0]

    app = create_app(
        agent_config(tmp_path / "state", max_stored_plans=cap, plan_ttl_seconds=60),
        backend=Backends(btrfs=sc.btrfs, docker=sc.docker),
        clock=clock,
    )
    client = app.test_client()
    state: StateStore = app.extensions["nas_janitor"].runtime.state

    def plan() -> tuple[int, dict]:  # type: ignore[type-arg]
        r = client.post("/v1/plans", json={"min_age_seconds": 0}, headers=auth())
        return r.status_code, r.get_json()

    first = [plan()[1]["id"] for _ in range(cap)]
    job = client.post(f"/v1/plans/{first[0]}/apply", headers=auth())
    assert job.status_code == 202, job.get_json()
    join_job_thread(job.get_json()["job_id"])
    assert state.count_plans() == cap

    status, body = plan()
    assert status == 422 and body["code"] == "too_many", body
    assert body["max_plans"] == cap
    assert state.count_plans() == cap

    now[0] += timedelta(seconds=61)  # every plan expired; the applied one has a job
    status, body = plan()
    assert status == 201, body
    assert state.count_plans() == 2  # the applied plan (kept for its job) and the new one
    assert client.get(f"/v1/plans/{first[0]}", headers=auth()).status_code == 200
    assert client.get(f"/v1/plans/{first[1]}", headers=auth()).status_code == 404


def test_purge_is_bounded_per_call(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    t0 = datetime.fromisoformat("2026-01-01T00:00:00+00:00")
    for i in range(25):
        store.save_plan(f"p{i:03d}", t0, t0 + timedelta(seconds=i), {"i": i})
    later = t0 + timedelta(days=1)
    assert store.reserve_plan_slot(later, max_plans=100, purge_batch=10) == 10
    # oldest expiry first
    assert store.get_plan("p009") is None and store.get_plan("p010") is not None
    assert store.reserve_plan_slot(later, max_plans=100, purge_batch=10) == 10
    assert store.reserve_plan_slot(later, max_plans=100, purge_batch=10) == 5
    assert store.count_plans() == 0
