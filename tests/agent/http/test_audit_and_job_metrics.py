"""The metrics the alert rules need beyond findings: the audit chain's state (set by
every verify and at start-up, never by a scrape). The real app over the stateful
fakes."""

from __future__ import annotations

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

