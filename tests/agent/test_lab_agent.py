"""The agent with its real backends (btrfs-progs, dockerd) on the real lab: findings,
safe deletes, plans and jobs, space really freed, nothing else touched, traversal
vectors, kill -9 in the middle of a job, and a tampered audit row. Each test runs with the
distro's btrfs-progs and with 4.4.1 as the agent's ``btrfs_binary`` (tests/conftest.py);
the tests' own checks list subvolumes with the distro's."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from agent.host.btrfs import BtrfsTool
from agent.http.app import create_app
from agent.runtime import real_backends
from lab import DIND_IMAGE, Lab
from lab.agentproc import pids_root_may_not_read
from tests.agent.http.apphelpers import BOTH, CLEAN, agent_config, auth
from tests.agent.http.test_app import TRAVERSAL
from tests.agentproc import AgentProcess, start_agent


def make_app(lab: Lab, state_dir: Path, btrfs_binary: str = "btrfs") -> Flask:
    # the lab's orphans are seconds old: no age floor (tests/agent/test_safety_lab.py
    # checks the default one)
    cfg = agent_config(
        state_dir,
        docker_host=lab.docker_host,
        btrfs_binary=btrfs_binary,
        orphan_min_age_seconds=0,
        unreadable_pids_allowed=pids_root_may_not_read(),
    )
    app = create_app(cfg, backend=real_backends(cfg))
    app.testing = True
    return app


@pytest.fixture
def client(lab: Lab, tmp_path: Path, btrfs_binary: str) -> Iterator[FlaskClient]:
    yield make_app(lab, tmp_path / "state", btrfs_binary).test_client()


def findings(c: FlaskClient, **query: Any) -> list[dict[str, Any]]:
    query.setdefault("min_age_seconds", 0)
    r = c.get("/v1/findings", query_string=query, headers=auth(BOTH))
    assert r.status_code == 200, r.get_data(as_text=True)
    return list(r.get_json()["items"])


def subvolume_paths(lab: Lab) -> set[str]:
    tool = BtrfsTool()
    return {r.path for r in tool.list_subvolumes(str(lab.mnt))}


def tree_digest(root: Path) -> str:
    """A checksum of every file name and byte under ``root``."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            h.update(str(p.relative_to(root)).encode())
            if p.is_file() and not p.is_symlink():
                h.update(p.read_bytes())
    return h.hexdigest()


def never_touch_digests(lab: Lab) -> dict[str, str]:
    nt = lab.seeded.never_touch
    out = {f"volume {v.name}": tree_digest(v.mountpoint) for v in nt.volumes}
    out.update({f"layer {p.name}": tree_digest(p) for p in nt.subvolumes})
    return out


@pytest.fixture(scope="module")
def untouched_lab(lab_factory: Callable[..., Lab]) -> Lab:
    """A lab of its own, only ever read: the session's lab holds whatever the tests run
    before took from it or added to it (volumes seeded, leftovers deleted)."""
    return lab_factory()


def test_findings_are_exactly_what_the_lab_seeded(
    untouched_lab: Lab, tmp_path: Path, btrfs_binary: str
) -> None:
    lab = untouched_lab
    client = make_app(lab, tmp_path / "state", btrfs_binary).test_client()
    seeded = lab.seeded
    got = {(f["kind"], f["target"]["name"]) for f in findings(client)}
    assert got == {
        ("dind-volume", seeded.dind.volume),
        ("orphan-layer", seeded.orphan.name),
    }
    dind = next(f for f in findings(client) if f["kind"] == "dind-volume")
    paths = {
        s["path"]
        for s in client.get(f"/v1/volumes/{seeded.dind.volume}", headers=auth(BOTH)).get_json()[
            "nested_subvolumes"
        ]
    }
    assert paths == {str(p) for p in seeded.dind.subvolumes}
    assert len(dind["subvolume_ids"]) == len(seeded.dind.subvolumes)
    assert any("read-only" in e for e in dind["evidence"])
    assert all(f["blocked_by"] == [] for f in findings(client))
    # by default (min age one day) the fresh lab leftovers are too young to clean
    young = findings(client, min_age_seconds=86400)
    assert all(any(b.startswith("too_young") for b in f["blocked_by"]) for f in young)
    orphan = next(f for f in findings(client) if f["kind"] == "orphan-layer")
    assert orphan["age_seconds"] is not None and orphan["age_seconds"] < 3600


def test_read_endpoints_on_the_lab(lab: Lab, client: FlaskClient, btrfs_binary: str) -> None:
    h = auth(BOTH)
    host = client.get("/v1/host", headers=h).get_json()
    # the agent runs the btrfs it was given
    shown = subprocess.run([btrfs_binary, "--version"], capture_output=True, text=True).stdout
    assert shown.split() == ["btrfs-progs", f"v{host['btrfs_progs_version']}"]
    assert host["docker"]["storage_driver"] == "btrfs"
    assert host["docker"]["data_root"] == str(lab.data_root)
    assert host["roots"] == [str(lab.data_root)]
    assert host["kernel"]["release"] == os.uname().release
    fss = client.get("/v1/filesystems", headers=h).get_json()["items"]
    fs = next(f for f in fss if str(lab.mnt) in f["mountpoints"])
    subs = client.get(f"/v1/filesystems/{fs['uuid']}/subvolumes?limit=5000", headers=h).get_json()[
        "items"
    ]
    by_path = {s["path"]: s for s in subs}
    assert by_path[str(lab.seeded.orphan.path)]["owner"]["kind"] == "orphan-layer"
    for p in lab.seeded.never_touch.subvolumes:
        assert by_path[str(p)]["owner"]["kind"] == "docker-layer", p
    for p in lab.seeded.dind.read_only:
        assert by_path[str(p)]["read_only"] is True
    assert all(s["created_at"] for s in subs)
    vols = {v["name"]: v for v in client.get("/v1/volumes", headers=h).get_json()["items"]}
    nt = lab.seeded.never_touch
    assert vols[nt.keep_volume.name]["protected"] == "label keep=true"
    assert vols[nt.in_use_volume.name]["in_use_by"] == [nt.running_container.id]
    assert vols[nt.stopped_anonymous_volume.name]["in_use_by"] == [nt.stopped_container.id]


def test_traversal_vectors_change_nothing_on_the_lab(lab: Lab, client: FlaskClient) -> None:
    before = subvolume_paths(lab)
    fs = next(
        f["uuid"]
        for f in client.get("/v1/filesystems", headers=auth(BOTH)).get_json()["items"]
        if str(lab.mnt) in f["mountpoints"]
    )
    for vector in TRAVERSAL:
        for url in (
            f"/v1/volumes/{vector}?dry_run=false",
            f"/v1/filesystems/{fs}/subvolumes/{vector}?dry_run=false",
            f"/v1/filesystems/{vector}/subvolumes/256?dry_run=false",
        ):
            r = client.delete(url, headers=auth(CLEAN))
            assert 400 <= r.status_code < 500, (url, r.status_code)
    # and the protected things, for real
    nt = lab.seeded.never_touch
    for name in (nt.keep_volume.name, nt.in_use_volume.name, nt.stopped_anonymous_volume.name):
        r = client.delete(f"/v1/volumes/{name}?dry_run=false", headers=auth(CLEAN))
        assert r.status_code == 409, r.get_json()
    for sub_id in (5, 256):
        r = client.delete(
            f"/v1/filesystems/{fs}/subvolumes/{sub_id}?dry_run=false", headers=auth(CLEAN)
        )
        assert r.status_code == 409
    assert subvolume_paths(lab) == before


def _usage_used(lab: Lab) -> int:
    """Used bytes once every deleted subvolume is cleaned and the transaction is on disk."""
    subprocess.run(["btrfs", "subvolume", "sync", str(lab.mnt)], check=True, capture_output=True)
    subprocess.run(["btrfs", "filesystem", "sync", str(lab.mnt)], check=True, capture_output=True)
    return BtrfsTool().usage(str(lab.mnt)).used_bytes


def test_plan_and_apply_reclaim_for_real(lab: Lab, client: FlaskClient) -> None:
    """A fresh leak (dind volume with a read-only parent holding a child, and an orphan
    layer), cleaned by plan + apply; the space comes back; nothing else is touched."""
    dind = lab.seed_dind_volume()
    big = dind.ro_parent_child / "big.bin"
    subprocess.run(["btrfs", "property", "set", str(dind.ro_parent), "ro", "false"], check=True)
    big.write_bytes(os.urandom(48 << 20))
    subprocess.run(["btrfs", "property", "set", str(dind.ro_parent), "ro", "true"], check=True)
    orphan = lab.seed_orphan_subvolume(files=50)
    (orphan / "blob").write_bytes(os.urandom(16 << 20))
    subprocess.run(["sync"], check=True)
    before_digests = never_touch_digests(lab)
    before_paths = subvolume_paths(lab)

    # docker cannot do it (the baseline the product beats)
    rm = lab.docker("volume", "rm", dind.volume, check=False)
    assert rm.returncode != 0

    mine = [f for f in findings(client) if f["target"]["name"] in (dind.volume, orphan.name)]
    assert len(mine) == 2
    used_before = _usage_used(lab)
    r = client.post(
        "/v1/plans",
        json={"min_age_seconds": 0, "finding_ids": [f["id"] for f in mine]},
        headers=auth(CLEAN),
    )
    assert r.status_code == 201
    plan = r.get_json()
    assert len(plan["actions"]) == 2
    job_id = client.post(f"/v1/plans/{plan['id']}/apply", headers=auth(CLEAN)).get_json()["job_id"]
    deadline = time.monotonic() + 120
    while True:
        job = client.get(f"/v1/jobs/{job_id}", headers=auth(BOTH)).get_json()
        if job["state"] not in ("queued", "running") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert job["state"] == "succeeded", job
    assert [r["outcome"] for r in job["results"]] == ["deleted", "deleted"]

    gone = {str(p) for p in dind.subvolumes} | {str(orphan)}
    rel = {p.removeprefix(str(lab.mnt) + "/") for p in gone}
    assert not (rel & subvolume_paths(lab))
    assert subvolume_paths(lab) == before_paths - rel
    assert dind.volume not in lab.docker("volume", "ls", "-q").stdout.split()
    used_after = _usage_used(lab)
    assert used_before - used_after >= 60 << 20, (used_before, used_after)

    assert never_touch_digests(lab) == before_digests
    for image in lab.seeded.never_touch.images:
        # the dind image runs the host's /usr (as the lab runs it), busybox its own
        usr = ["-v", "/usr:/usr:ro"] if image.name == DIND_IMAGE else []
        out = lab.docker("run", "--rm", "--network", "none", *usr, image.name, "true", check=False)
        assert out.returncode == 0, out.stderr
    verify = client.get("/v1/audit/verify", headers=auth(BOTH)).get_json()
    assert verify["ok"] is True


def test_direct_volume_delete_on_old_kernel_layout(lab: Lab, client: FlaskClient) -> None:
    """DELETE /v1/volumes/{name}: dry run first (nothing changes), then for real, with a
    read-only parent whose child must go first."""
    dind = lab.seed_dind_volume(containers=1)
    before = subvolume_paths(lab)
    r = client.delete(f"/v1/volumes/{dind.volume}", headers=auth(CLEAN))
    assert r.status_code == 200 and r.get_json()["dry_run"] is True
    assert subvolume_paths(lab) == before
    r = client.delete(f"/v1/volumes/{dind.volume}?dry_run=false", headers=auth(CLEAN))
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert {d["path"] for d in body["deleted"]} == {str(p) for p in dind.subvolumes}
    assert dind.volume not in lab.docker("volume", "ls", "-q").stdout.split()
    assert not dind.mountpoint.exists()


# -- crash safety under real gunicorn ---------------------------------------------------------


def _get(agent: AgentProcess, path: str) -> Any:
    with agent.client() as c:
        r = c.get(path)
        assert r.status_code == 200, r.text
        return r.json()


def test_kill_9_during_apply_then_resume(lab: Lab, tmp_path: Path, btrfs_binary: str) -> None:
    orphans = [lab.seed_orphan_subvolume(files=2) for _ in range(40)]
    names = {p.name for p in orphans}
    before_digests = never_touch_digests(lab)
    before = subvolume_paths(lab)
    extra = {"btrfs_binary": btrfs_binary}
    agent = start_agent(tmp_path / "a", docker_host=lab.docker_host, extra=extra)
    try:
        with agent.client() as c:
            found = [
                f
                for f in c.get("/v1/findings", params={"min_age_seconds": 0}).json()["items"]
                if f["kind"] == "orphan-layer" and f["target"]["name"] in names
            ]
            assert len(found) == 40
            plan = c.post(
                "/v1/plans",
                json={"min_age_seconds": 0, "finding_ids": [f["id"] for f in found]},
            ).json()
            job_id = c.post(f"/v1/plans/{plan['id']}/apply").json()["job_id"]
            deadline = time.monotonic() + 60
            while c.get(f"/v1/jobs/{job_id}").json()["progress"]["done"] < 5:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        agent.kill(signal.SIGKILL)
    finally:
        agent.kill()
    cut = {p.name for p in orphans if not p.exists()}
    assert 5 <= len(cut) < 40, "the kill should land mid-job"

    again = start_agent(tmp_path / "a", docker_host=lab.docker_host, token=agent.token, extra=extra)
    try:
        job = _get(again, f"/v1/jobs/{job_id}")
        assert job["state"] == "interrupted"
        assert job["progress"]["done"] < 40
        with again.client() as c:
            r = c.post(f"/v1/plans/{plan['id']}/apply")
            assert r.status_code == 202 and r.json()["job_id"] == job_id
            deadline = time.monotonic() + 120
            while c.get(f"/v1/jobs/{job_id}").json()["state"] in ("queued", "running"):
                assert time.monotonic() < deadline
                time.sleep(0.2)
            job = c.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] == "succeeded", job
        assert job["progress"] == {"done": 40, "total": 40}
        assert all(r["outcome"] == "deleted" for r in job["results"])
        assert not any(p.exists() for p in orphans)
        rel = {str(p).removeprefix(str(lab.mnt) + "/") for p in orphans}
        assert subvolume_paths(lab) == before - rel
        assert never_touch_digests(lab) == before_digests
        audit = _get(again, "/v1/audit?limit=5000")["items"]
        assert any(e["action"] == "job.interrupted" for e in audit)
        mine = [e for e in audit if e["detail"].get("job_id") == job_id and "seq" in e["detail"]]
        started = {e["detail"]["seq"] for e in mine if e["outcome"] == "started"}
        deleted = {e["detail"]["seq"] for e in mine if e["outcome"] == "deleted"}
        # every action is in the audit as deleted; each one this agent deleted itself was
        # recorded as started before it ran (none lost to the kill)
        assert deleted == set(range(1, 41))
        assert started == deleted
        assert _get(again, "/v1/audit/verify")["ok"] is True
    finally:
        again.kill()

    # editing one audit row by hand shows in verify
    with sqlite3.connect(again.state_dir / "audit.db") as db:
        db.execute("UPDATE audit SET outcome = 'skipped' WHERE seq = 3")
    third = start_agent(tmp_path / "a", docker_host=lab.docker_host, token=agent.token, extra=extra)
    try:
        bad = _get(third, "/v1/audit/verify")
        assert bad["ok"] is False and bad["first_bad_seq"] == 3
    finally:
        third.kill()


@pytest.mark.lab
def test_the_served_agent_scans_at_start_up_before_any_read(lab: Lab, tmp_path: Path) -> None:
    """Under gunicorn, the worker makes its kept scan as soon as it serves: before any
    read, the log says so, and the first read and scrape are answered by it."""
    extra = {"unreadable_pids_allowed": pids_root_may_not_read(), "orphan_min_age_seconds": 0}
    agent = start_agent(tmp_path / "a", docker_host=lab.docker_host, extra=extra)
    try:
        deadline = time.monotonic() + 60
        while "start-up scan: " not in agent.log() and time.monotonic() < deadline:
            assert "start-up scan failed" not in agent.log(), agent.log()
            time.sleep(0.1)
        assert "start-up scan: " in agent.log(), agent.log()
        with agent.client() as c:
            r = c.get("/v1/findings", params={"min_age_seconds": 0})
            assert r.status_code == 200, r.text
            assert any(f["kind"] == "dind-volume" for f in r.json()["items"])
            assert "nas_janitor_scan_ok 1.0" in c.get("/metrics").text
    finally:
        agent.kill()
