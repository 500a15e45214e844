"""The controller's client against the REAL agent app, in-process (``httpx.WSGITransport``),
over the stateful btrfs and Docker fakes of ``tests.fakes``: a change on either side of
the contract that breaks the other fails here."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from agent.http.app import Backends, create_app
from controller import auditsync, errors
from controller.cli import main
from controller.client import AgentClient, Readiness
from controller.fleet import AgentSpec
from controller.store import Store
from shared import auditchain
from shared.models import Policy
from tests.agent.http.apphelpers import BOTH, CLEAN, READ, AgentUnderTest, agent_config, build
from tests.fakes import make_leak_scenario


@pytest.fixture
def agent(tmp_path: Path) -> AgentUnderTest:
    return build(tmp_path / "state")


def client(a: AgentUnderTest, token: str | None = BOTH, **kw: Any) -> AgentClient:
    kw.setdefault("sleep", time.sleep)
    return AgentClient(
        "http://agent.test",
        name="nas1",
        token=token,
        transport=httpx.WSGITransport(app=a.app),
        **kw,
    )


def test_every_read_answer_loads(agent: AgentUnderTest) -> None:
    c = client(agent, page_size=3)
    sc = agent.sc
    assert c.healthz().status == "ok"
    assert c.readyz() == Readiness(ready=True)
    host = c.host()
    assert host.kernel.release == "6.12.48-amd64" and host.kernel.rmdir_deletes_subvolumes
    assert host.docker.storage_driver == "btrfs" and host.docker.data_root == sc.data_root
    (fs,) = c.filesystems()
    assert fs.uuid == sc.fs_uuid and "/volume1" in fs.mountpoints
    subs = c.subvolumes(fs.uuid)  # more than one page of 3
    assert {s.path for s in subs} >= set(sc.dind_nested) | {sc.orphan_layer}
    assert len({s.id for s in subs}) == len(subs) > 3
    one = c.subvolume(fs.uuid, subs[0].id)
    assert one == subs[0]
    under = c.subvolumes(fs.uuid, under=sc.dind_mountpoint)
    assert {s.path for s in under} == set(sc.dind_nested)
    volumes = {v.name: v for v in c.volumes()}
    assert volumes[sc.dind_volume].in_use_by == ()
    assert len(volumes[sc.dind_volume].nested_subvolumes) == len(sc.dind_nested)
    assert volumes[sc.keep_volume].protected is not None
    assert c.volume(sc.in_use_volume).in_use_by
    assert {v.name for v in c.volumes(dangling=True)} >= {sc.dind_volume, sc.keep_volume}
    findings = c.findings()
    assert {(f.kind, f.target.type) for f in findings} == {
        ("dind-volume", "volume"),
        ("orphan-layer", "subvolume"),
    }
    assert [f.kind for f in c.findings(kinds=["orphan-layer"])] == ["orphan-layer"]
    assert "nas_janitor_findings" in c.metrics()
    assert c.audit_verify().ok and c.audit_verify().count == 0


def test_errors_map_from_the_agents_problems(agent: AgentUnderTest) -> None:
    sc = agent.sc
    with pytest.raises(errors.Unauthorized) as info:
        client(agent, token="nj_wrong").host()
    assert info.value.code == "unauthorized"
    with pytest.raises(errors.Unauthorized):
        client(agent, token=None).findings()
    with pytest.raises(errors.Forbidden):
        client(agent, token=READ).create_plan()
    with pytest.raises(errors.Forbidden):
        client(agent, token=CLEAN).findings()
    with pytest.raises(errors.NotFound):
        client(agent).volume("no-such-volume")
    with pytest.raises(errors.NotFound):
        client(agent).get_job("no-such-job")
    with pytest.raises(errors.Conflict) as conflict:
        client(agent).delete_volume(sc.in_use_volume, dry_run=False)
    assert conflict.value.code == "in_use"
    with pytest.raises(errors.Conflict) as protected:
        client(agent).delete_subvolume(sc.fs_uuid, 5, dry_run=False)
    assert protected.value.code in ("protected", "outside_roots")
    with pytest.raises(errors.ValidationFailed) as invalid:
        client(agent).create_plan(finding_ids=[""])
    assert "finding_ids" in invalid.value.errors
    sc.docker.down = True
    assert client(agent).readyz().code == "docker_unavailable"
    with pytest.raises(errors.Unavailable) as down:
        client(agent, retries=1, sleep=lambda s: None).findings()
    assert down.value.code == "docker_unavailable"


def test_deletes_are_dry_runs_unless_told(agent: AgentUnderTest) -> None:
    sc = agent.sc
    c = client(agent)
    before = sc.btrfs.subvolume_paths()
    r = c.delete_volume(sc.dind_volume)
    assert r.dry_run and r.volume == sc.dind_volume
    assert {d.path for d in r.deleted} == set(sc.dind_nested)
    assert sc.btrfs.subvolume_paths() == before
    orphan = next(f for f in c.findings() if f.kind == "orphan-layer")
    assert orphan.target.id is not None
    r = c.delete_subvolume(sc.fs_uuid, orphan.target.id, dry_run=False)
    assert not r.dry_run and not sc.btrfs.exists(sc.orphan_layer)
    assert r.audit_seq >= 1


def test_plan_apply_wait_and_apply_again(agent: AgentUnderTest) -> None:
    sc = agent.sc
    c = client(agent)
    plan = c.create_plan(Policy())
    assert {a.op for a in plan.actions} == {"remove_volume", "delete_subvolumes"}
    assert c.get_plan(plan.id) == plan
    seen: list[str] = []
    started = c.apply_plan(plan.id)
    job = c.wait_job(
        started.job_id, poll=0.01, timeout=30, on_progress=lambda j: seen.append(j.state)
    )
    assert job.state == "succeeded" and job.count("deleted") == 2 and job.reclaimed_bytes > 0
    assert seen[-1] == "succeeded"
    assert c.findings() == []
    assert not sc.btrfs.exists(sc.orphan_layer) and sc.docker.volume(sc.dind_volume) is None
    # applied again (a retry after a lost answer): the same job, nothing run twice
    assert c.apply_plan(plan.id).job_id == started.job_id
    assert c.apply_plan(plan.id, idempotency_key=f"apply-{plan.id}").job_id == started.job_id


def test_an_expired_plan_is_plan_expired(agent: AgentUnderTest) -> None:
    plan = client(agent).create_plan(Policy())
    later = create_app(
        agent_config(agent.state_dir),
        backend=Backends(btrfs=agent.sc.btrfs, docker=agent.sc.docker),
        clock=lambda: agent.sc.now + timedelta(days=2),
    )
    c = AgentClient("http://agent.test", token=BOTH, transport=httpx.WSGITransport(app=later))
    with pytest.raises(errors.PlanExpired):
        c.apply_plan(plan.id)


def test_audit_pulled_verified_and_tampering_noticed(agent: AgentUnderTest, tmp_path: Path) -> None:
    sc = agent.sc
    c = client(agent, page_size=2)
    for _ in range(3):
        c.delete_volume(sc.dind_volume)  # dry runs are audited too
    plan = c.create_plan(Policy())
    c.wait_job(c.apply_plan(plan.id).job_id, poll=0.01, timeout=30)
    entries = c.audit()
    assert len(entries) >= 5 and all(e.hash_ok for e in entries)
    assert auditchain.first_bad_seq([{**e.hashed(), "hash": e.hash} for e in entries]) is None
    with Store.open(tmp_path / "controller.db") as store:
        status = auditsync.reconcile(store, "nas1", auditsync.pull(c, last_seq=0))
        assert (status.status, status.new) == ("ok", len(entries))
        with pytest.raises(errors.Conflict):
            c.delete_volume(sc.in_use_volume)  # refused, and audited: one more entry
        status = auditsync.reconcile(store, "nas1", auditsync.pull(c, last_seq=status.last_seq))
        assert (status.status, status.new) == ("ok", 1)
        # someone edits a row in the agent's database: both sides see it
        with sqlite3.connect(agent.state_dir / "audit.db") as db:
            db.execute("UPDATE audit SET outcome = 'nothing' WHERE seq = 2")
        status = auditsync.reconcile(store, "nas1", auditsync.pull(c, last_seq=status.last_seq))
        assert status.status == "broken" and not status.agent_ok
        status = auditsync.reconcile(store, "nas1", auditsync.pull(c, last_seq=0, full=True))
        assert status.status == "broken" and "entry 2 does not chain" in status.problems[0]
        # with its hash recomputed too: the hash the controller kept shows the rewrite
        item = {**entries[1].hashed(), "outcome": "nothing"}
        with sqlite3.connect(agent.state_dir / "audit.db") as db:
            db.execute("UPDATE audit SET hash = ? WHERE seq = 2", (auditchain.item_hash(item),))
        status = auditsync.reconcile(store, "nas1", auditsync.pull(c, last_seq=0, full=True))
        assert status.status == "rewritten" and "entry 2 differs" in status.problems[0]
        assert c.audit_verify().first_bad_seq == 3  # the agent sees the next link break


def test_janitorctl_run_against_two_real_agents(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    agents = {n: build(tmp_path / n, make_leak_scenario()) for n in ("nas1", "nas2")}
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        yaml.safe_dump(
            {
                "timeouts": {"poll": 0.01, "job": 30},
                "store": "controller.db",
                "agents": [
                    {"name": n, "url": f"http://{n}.lan:8443", "token_env": "NJ_TOKEN"}
                    for n in agents
                ],
            }
        ),
        encoding="utf-8",
    )

    def transport(spec: AgentSpec) -> httpx.BaseTransport:
        return httpx.WSGITransport(app=agents[spec.name].app)

    def janitorctl(*argv: str) -> int:
        return main(
            ["--fleet", str(fleet), *argv], environ={"NJ_TOKEN": BOTH}, transport_factory=transport
        )

    assert janitorctl("agents") == 0
    assert janitorctl("findings", "--json") == 0
    capsys.readouterr()
    assert janitorctl("run", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    for row in summary["agents"]:
        assert (row["findings"], row["planned"], row["deleted"], row["failed"]) == (2, 2, 2, 0)
        assert row["reclaimed_bytes"] > 0 and row["audit_ok"] is True
    for a in agents.values():
        assert not a.sc.btrfs.exists(a.sc.orphan_layer)
    assert janitorctl("audit") == 0
    assert janitorctl("run") == 0  # nothing left: still all well
    assert janitorctl("report") == 0
