"""The metrics the alert rules need beyond findings: the audit chain's state (set by
every verify and at start-up, never by a scrape) and jobs by final state. The real app
over the stateful fakes."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.agent.http.apphelpers import CLEAN, READ, AgentUnderTest, auth, build


def samples(agent: AgentUnderTest) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = agent.get("/metrics", token=READ)
    assert r.status_code == 200
    out = {}
    for family in text_string_to_metric_families(r.get_data(as_text=True)):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def chain_ok(agent: AgentUnderTest) -> float:
    return samples(agent)[("nas_janitor_audit_chain_ok", ())]


def make_entries(agent: AgentUnderTest) -> None:
    """A dry-run delete: one audit entry."""
    r = agent.client.delete(f"/v1/volumes/{agent.sc.dind_volume}", headers=auth(CLEAN))
    assert r.status_code == 200


def test_audit_chain_gauge_follows_verify_not_scrapes(tmp_path: Path) -> None:
    agent = build(tmp_path)
    assert chain_ok(agent) == 1.0  # checked at start-up
    checked = samples(agent)[("nas_janitor_audit_verify_timestamp_seconds", ())]
    assert checked > 0
    make_entries(agent)
    make_entries(agent)
    with sqlite3.connect(tmp_path / "audit.db") as conn:
        conn.execute("UPDATE audit SET outcome = 'refused' WHERE seq = 1")
    # a scrape does not walk the log: the gauge still holds the last verdict
    assert chain_ok(agent) == 1.0
    verdict = agent.get("/v1/audit/verify").get_json()
    assert verdict["ok"] is False and verdict["first_bad_seq"] == 1
    assert chain_ok(agent) == 0.0
    assert samples(agent)[("nas_janitor_audit_verify_timestamp_seconds", ())] >= checked
    # a restart checks the log again before the first scrape
    assert chain_ok(agent.restart()) == 0.0


def test_audit_chain_gauge_is_zero_when_the_log_cannot_be_read(tmp_path: Path) -> None:
    agent = build(tmp_path)
    make_entries(agent)
    with sqlite3.connect(tmp_path / "audit.db") as conn:
        conn.execute("DROP TABLE audit")
    again = agent.restart()  # starts all the same
    assert again.client.get("/healthz").status_code == 200
    assert chain_ok(again) == 0.0


def test_jobs_are_counted_by_final_state(tmp_path: Path) -> None:
    agent = build(tmp_path)
    before = samples(agent)
    for state in ("succeeded", "partial", "failed", "skipped", "interrupted"):
        assert before[("nas_janitor_jobs_finished_total", (("state", state),))] == 0.0
    r = agent.client.post("/v1/plans", json={"min_age_seconds": 0}, headers=auth(CLEAN))
    plan = r.get_json()
    agent.sc.btrfs.refuse_delete(agent.sc.orphan_layer, "Operation not permitted")
    job_id = agent.client.post(f"/v1/plans/{plan['id']}/apply", headers=auth(CLEAN)).get_json()[
        "job_id"
    ]
    agent.wait_job(job_id)
    assert agent.get(f"/v1/jobs/{job_id}").get_json()["state"] == "partial"
    after = samples(agent)
    assert after[("nas_janitor_jobs_finished_total", (("state", "partial"),))] == 1.0
    assert after[("nas_janitor_jobs_finished_total", (("state", "succeeded"),))] == 0.0
    assert re.search(
        r'^nas_janitor_actions_total\{op="delete_subvolumes",outcome="failed"\} 1\.0$',
        agent.get("/metrics", token=READ).get_data(as_text=True),
        re.M,
    )


def test_a_job_cut_short_by_a_restart_counts_as_interrupted(tmp_path: Path) -> None:
    agent = build(tmp_path)
    plan = agent.client.post("/v1/plans", json={"min_age_seconds": 0}, headers=auth(CLEAN))
    state = agent.runtime.state
    state.create_job_for_plan(
        job_id="j" * 32,
        plan_id=plan.get_json()["id"],
        idempotency_key=None,
        body={"total": 2},
        state="running",
    )  # what a crash mid-job leaves
    restarted = agent.restart()
    got = samples(restarted)
    assert got[("nas_janitor_jobs_finished_total", (("state", "interrupted"),))] == 1.0
    assert got[("nas_janitor_jobs_finished_total", (("state", "failed"),))] == 0.0
