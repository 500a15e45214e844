"""kill -9 at chosen points of an apply, on the real agent under gunicorn on the lab.

No hook in the agent: its ``btrfs_binary`` setting names a stand-in script
(``agents.DyingBtrfs``) that runs the real btrfs for everything (the distro's, then
btrfs-progs 4.4.1: fixture ``btrfs_binary`` in tests/conftest.py), logs every
``subvolume delete``, and on the Nth one SIGKILLs the agent's whole process group
(gunicorn master and worker) either *before* running the real delete, or *after* it
returned, which is also before the agent could write the outcome to its audit log.
Then the agent is started again on the same state (with the stand-in disarmed: it only
logs and runs the real btrfs), the plan is applied again, and:

- everything planned is gone, each path handed to the real ``btrfs subvolume delete``
  exactly once (the log), and nothing else on the lab changed;
- the job read ``interrupted`` after the restart and ``succeeded`` after the second
  apply, every action ``deleted`` exactly once;
- ``/v1/audit/verify`` is ok, every action has one ``deleted`` outcome in the audit,
  and every deleted path is in the audit (in the outcome, or for the action killed
  after its delete, in the ``started`` entry written before the delete).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lab import Lab
from tests.agent.test_lab_agent import never_touch_digests, subvolume_paths
from tests.robustness import knobs
from tests.robustness.agents import (
    DyingBtrfs,
    audit_entries,
    get,
    launch,
    wait_dead,
    wait_job,
)


@pytest.mark.parametrize("point", ["before", "after"])
@pytest.mark.parametrize("nth", knobs.KILL_ON_DELETE)
def test_kill_9_at_a_chosen_delete_then_resume(
    lab: Lab, tmp_path: Path, point: str, nth: int, btrfs_binary: str
) -> None:
    count = nth + 2
    orphans = [lab.seed_orphan_subvolume(files=2) for _ in range(count)]
    names = {p.name for p in orphans}
    digests = never_touch_digests(lab)
    paths_before = subvolume_paths(lab)
    btrfs = DyingBtrfs(tmp_path / "btrfs", real=btrfs_binary)
    workdir = tmp_path / "agent"
    extra = {"btrfs_binary": str(btrfs.path)}

    agent = launch(workdir, docker_host=lab.docker_host, extra=extra)
    try:
        found = [
            f["id"]
            for f in get(agent, "/v1/findings", min_age_seconds=0)["items"]
            if f["kind"] == "orphan-layer" and f["target"]["name"] in names
        ]
        assert len(found) == count
        with agent.client() as c:
            plan = c.post("/v1/plans", json={"min_age_seconds": 0, "finding_ids": found}).json()
            assert len(plan["actions"]) == count
            order = [a["target"]["path"] for a in plan["actions"]]
            btrfs.arm(point, nth, agent.proc.pid)
            r = c.post(f"/v1/plans/{plan['id']}/apply")
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
        wait_dead(agent)
    finally:
        agent.kill()

    # the kill landed where it was asked to
    log = btrfs.log()
    ran = [paths for what, paths in log if what == "ran"]
    assert log[-1][0] == f"killed-{point}", log
    assert ran == [[p] for p in order[: nth if point == "after" else nth - 1]], log
    gone = [p for p in order if not Path(p).exists()]
    assert gone == order[: len(ran)]

    btrfs.disarm()
    again = launch(
        workdir, docker_host=lab.docker_host, extra=extra, token=agent.token, pki=agent.pki
    )
    try:
        job = get(again, f"/v1/jobs/{job_id}")
        assert job["state"] == "interrupted", job
        # results recorded before the kill: the killed action has none
        assert job["progress"] == {"done": nth - 1, "total": count}, job
        with again.client() as c:
            r = c.post(f"/v1/plans/{plan['id']}/apply")
            assert r.status_code == 202 and r.json()["job_id"] == job_id, r.text
        job = wait_job(again, job_id)
        assert job["state"] == "succeeded", job
        assert job["progress"] == {"done": count, "total": count}
        assert sorted(res["seq"] for res in job["results"]) == list(range(1, count + 1))
        assert {res["outcome"] for res in job["results"]} == {"deleted"}
        killed = next(res for res in job["results"] if res["seq"] == nth)
        if point == "after":
            assert "before the agent restarted" in killed["detail"], killed

        # everything planned is gone, once; nothing else changed
        assert not any(Path(p).exists() for p in order)
        handed = sorted(p for what, paths in btrfs.log() if what == "ran" for p in paths)
        assert handed == sorted(order), btrfs.log()
        rel = {p.removeprefix(str(lab.mnt) + "/") for p in order}
        assert subvolume_paths(lab) == paths_before - rel
        assert never_touch_digests(lab) == digests

        # the audit: intact, one outcome per action, every deleted path in it
        assert get(again, "/v1/audit/verify")["ok"] is True
        _check_audit(audit_entries(again), job_id, order, nth, point)
    finally:
        again.kill()


def _check_audit(
    entries: list[dict[str, Any]], job_id: str, order: list[str], nth: int, point: str
) -> None:
    assert any(e["action"] == "job.interrupted" and e["target"] == f"job {job_id}" for e in entries)
    assert any(e["action"] == "plan.apply" and e["outcome"] == "resumed" for e in entries)
    mine = [e for e in entries if e["detail"].get("job_id") == job_id and "seq" in e["detail"]]
    for seq, path in enumerate(order, start=1):
        outcomes = [e["outcome"] for e in mine if e["detail"]["seq"] == seq]
        started = [e for e in mine if e["detail"]["seq"] == seq and e["outcome"] == "started"]
        assert outcomes.count("deleted") == 1, (seq, outcomes)
        assert started and all(e["detail"]["subvolumes"] == [path] for e in started)
        deleted = next(e for e in mine if e["detail"]["seq"] == seq and e["outcome"] == "deleted")
        if seq == nth and point == "after":
            # the delete ran, the agent died before writing its outcome: the started
            # entry holds the path; after the restart the outcome says what happened
            assert outcomes == ["started", "deleted"], outcomes
            assert "before the agent restarted" in deleted["detail"]["reason"]
        else:
            assert _paths(deleted["detail"]["deleted"]) == [path]
            # killed before the delete: started twice (the attempt the kill cut off,
            # then the one that ran), deleted once
            want = 2 if (seq == nth and point == "before") else 1
            assert len(started) == want, outcomes


def _paths(deleted: list[Any]) -> list[str]:
    """Deleted subvolumes as the audit names them: ``{"id", "path"}`` or a path."""
    return [d["path"] if isinstance(d, dict) else d for d in deleted]


@pytest.mark.parametrize("point", ["after", "before"] if knobs.LONG else ["after"])
def test_kill_9_around_a_volume_removal_then_resume(
    lab: Lab, tmp_path: Path, point: str, btrfs_binary: str
) -> None:
    """A dind volume is one batch (its subvolumes, children first, read-only parent
    flag cleared on the way), then ``docker volume rm``. Killed after the batch, the
    resumed job must finish the volume, not skip it as changed."""
    dind = lab.seed_dind_volume(containers=1)
    digests = never_touch_digests(lab)
    paths_before = subvolume_paths(lab)
    btrfs = DyingBtrfs(tmp_path / "btrfs", real=btrfs_binary)
    workdir = tmp_path / "agent"
    extra = {"btrfs_binary": str(btrfs.path)}
    agent = launch(workdir, docker_host=lab.docker_host, extra=extra)
    try:
        found = [
            f["id"]
            for f in get(agent, "/v1/findings", min_age_seconds=0)["items"]
            if f["target"]["name"] == dind.volume
        ]
        with agent.client() as c:
            plan = c.post("/v1/plans", json={"min_age_seconds": 0, "finding_ids": found}).json()
            (action,) = plan["actions"]
            btrfs.arm(point, 1, agent.proc.pid)
            job_id = c.post(f"/v1/plans/{plan['id']}/apply").json()["job_id"]
        wait_dead(agent)
    finally:
        agent.kill()
    log = btrfs.log()
    assert log[-1][0] == f"killed-{point}", log
    nested = {str(p) for p in dind.subvolumes}
    assert all(Path(p).exists() != (point == "after") for p in nested)
    assert dind.volume in lab.docker("volume", "ls", "-q").stdout.split()

    btrfs.disarm()
    again = launch(
        workdir, docker_host=lab.docker_host, extra=extra, token=agent.token, pki=agent.pki
    )
    try:
        assert get(again, f"/v1/jobs/{job_id}")["state"] == "interrupted"
        with again.client() as c:
            assert c.post(f"/v1/plans/{plan['id']}/apply").json()["job_id"] == job_id
        job = wait_job(again, job_id)
        assert job["state"] == "succeeded", job
        assert [r["outcome"] for r in job["results"]] == ["deleted"], job
        assert dind.volume not in lab.docker("volume", "ls", "-q").stdout.split()
        assert not dind.mountpoint.exists()
        handed = [p for what, paths in btrfs.log() if what == "ran" for p in paths]
        assert sorted(handed) == sorted(nested), btrfs.log()  # each path once
        rel = {p.removeprefix(str(lab.mnt) + "/") for p in nested}
        assert subvolume_paths(lab) == paths_before - rel
        assert never_touch_digests(lab) == digests
        assert get(again, "/v1/audit/verify")["ok"] is True
        mine = [
            e
            for e in audit_entries(again)
            if e["detail"].get("job_id") == job_id and "seq" in e["detail"]
        ]
        assert [e["outcome"] for e in mine].count("deleted") == 1
        final = next(e for e in mine if e["outcome"] == "deleted")
        assert final["detail"]["volume_removed"] is True
        audited = set(_paths(final["detail"]["deleted"]))
        if point == "after":  # the paths are in the started entry written before the kill
            assert set(mine[0]["detail"]["subvolumes"]) == nested
            assert sorted(final["detail"]["deleted_before_restart"]) == sorted(
                action["subvolume_ids"]
            )
            assert not audited
        else:
            assert audited == nested
    finally:
        again.kill()
