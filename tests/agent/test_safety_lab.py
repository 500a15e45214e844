"""Nothing outside a leftover is ever lost: each class of issue 10 on the real lab.

Real btrfs on a loop device, the lab's real dockerd, real mounts made below the lab's
folder (tmpfs, bind mounts of host folders, ``subvol=`` mounts), real containers, real odd
names made with btrfs-progs and ``os.mkdir`` on bytes paths. For each class the guarded
data sits next to a plain leak; a plan under the broadest policy (every kind,
``min_age_seconds`` 0, named volumes included) is applied and direct DELETEs are aimed at
the guarded targets; afterwards the guarded data is intact byte for byte (every file,
those on the mounted filesystems included) and the plain leak is gone.

The agent is the real app over the real backends (the tests' client calls it in
process; its jobs run in its threads). One lab of this module's own serves every test
(broad plans would otherwise clean what other modules' tests expect on the shared one);
each test seeds fresh leftovers and unmounts what it mounted.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import secrets
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from agent.http.app import create_app
from agent.runtime import real_backends
from lab import BUSYBOX_IMAGE, Lab, SeededDind
from shared.policy import FINDING_KINDS
from shared.wirepath import from_wire
from tests.agent.http.apphelpers import BOTH, CLEAN, agent_config, auth

BROAD: dict[str, Any] = {
    "kinds": list(FINDING_KINDS),
    "min_age_seconds": 0,
    "include_named_volumes": True,
}


# --------------------------------------------------------------------------- the world


def run(*args: str | bytes | Path, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run([os.fsencode(a) for a in args], capture_output=True, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}: {proc.stderr!r}")
    return proc


def rootid(path: str | bytes | Path) -> int:
    """The subvolume id of ``path`` (btrfs-progs, not the agent)."""
    return int(run("btrfs", "inspect-internal", "rootid", path).stdout.strip())


def subvolume(path: str | bytes | Path, files: int = 3) -> bytes:
    """Make a subvolume at ``path`` with a few files; its path as bytes."""
    p = os.fsencode(path)
    run("btrfs", "subvolume", "create", p)
    for i in range(files):
        with open(os.path.join(p, b"f%d" % i), "wb") as f:
            f.write(secrets.token_bytes(1000 + i))
    return p


def digest(root: str | bytes | Path) -> tuple[int, str]:
    """(file count, sha256) of every name, file's bytes and link target under ``root``,
    across every mount below it."""
    base = os.fsencode(root)
    h = hashlib.sha256()
    count = 0
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        h.update(b"D" + os.path.relpath(dirpath, base) + b"\0")
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            h.update(b"F" + name + b"\0")
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    h.update(f.read())
            count += 1
    return count, h.hexdigest()


@dataclass
class Guarded:
    """Folders whose every byte must survive, checked against their first digest."""

    before: dict[bytes, tuple[int, str]] = field(default_factory=dict)

    def add(self, *paths: str | bytes | Path) -> None:
        for p in paths:
            d = digest(p)
            assert d[0] > 0, f"nothing to guard in {p!r}"
            self.before[os.fsencode(p)] = d

    def assert_intact(self) -> None:
        now = {p: digest(p) if os.path.isdir(p) else None for p in self.before}
        lost = {p: (self.before[p], d) for p, d in now.items() if d != self.before[p]}
        assert not lost, f"guarded data changed: {lost}"


class Mounts:
    """Mounts a test makes below the lab's folder; all undone at its end (deepest first)."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.made: list[bytes] = []

    def _at(self, at: str | bytes | Path) -> bytes:
        p = os.fsencode(at)
        assert p.startswith(os.fsencode(self.lab.root) + b"/"), p
        os.makedirs(p, exist_ok=True)
        self.made.append(p)
        return p

    def tmpfs(self, at: str | bytes | Path, files: int = 3) -> bytes:
        p = self._at(at)
        run("mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", p)
        for i in range(files):
            with open(os.path.join(p, b"t%d" % i), "wb") as f:
                f.write(secrets.token_bytes(500))
        return p

    def bind(self, source: str | bytes | Path, at: str | bytes | Path) -> bytes:
        p = self._at(at)
        run("mount", "--bind", source, p)
        return p

    def subvol(self, in_fs: str | bytes, at: str | bytes | Path) -> bytes:
        p = self._at(at)
        run("mount", "-t", "btrfs", "-o", b"subvol=" + os.fsencode(in_fs), self.lab.loop_device, p)
        return p

    def undo(self) -> None:
        for p in sorted(self.made, key=lambda m: m.count(b"/"), reverse=True):
            if run("umount", p, check=False).returncode != 0:
                run("umount", "-l", p, check=False)
        self.made.clear()


def host_folder(lab: Lab, files: int = 3) -> bytes:
    """A folder outside every root (below the lab's folder, not on its btrfs)."""
    p = os.fsencode(lab.root / f"host-{secrets.token_hex(4)}")
    os.mkdir(p)
    for i in range(files):
        with open(os.path.join(p, b"h%d" % i), "wb") as f:
            f.write(secrets.token_bytes(700))
    return p


def in_fs(lab: Lab, path: str | bytes | Path) -> bytes:
    """A path's place inside the lab's filesystem (the lab mounts its top level)."""
    return os.fsencode(path)[len(os.fsencode(lab.mnt)) :]


def volume_names(lab: Lab) -> set[str]:
    return set(lab.docker("volume", "ls", "-q").stdout.split())


def assert_dind_gone(lab: Lab, dind: SeededDind) -> None:
    assert dind.volume not in volume_names(lab), dind.volume
    assert not any(p.exists() for p in dind.subvolumes)
    assert not dind.mountpoint.parent.exists()


# --------------------------------------------------------------------------- the agent


def make_app(lab: Lab, state_dir: Path, btrfs_binary: str = "btrfs", **cfg: Any) -> Flask:
    cfg.setdefault("orphan_min_age_seconds", 0)  # the lab's orphans are seconds old
    config = agent_config(
        state_dir, docker_host=lab.docker_host, btrfs_binary=btrfs_binary, **cfg
    )
    app = create_app(config, backend=real_backends(config))
    app.testing = True
    return app


@dataclass
class Api:
    client: FlaskClient
    lab: Lab

    def get(self, url: str, **query: Any) -> Any:
        r = self.client.get(url, query_string=query, headers=auth(BOTH))
        assert r.status_code == 200, (url, r.status_code, r.get_data(as_text=True))
        return r.get_json()

    @property
    def fs_uuid(self) -> str:
        fss = self.get("/v1/filesystems")["items"]
        return str(next(f["uuid"] for f in fss if str(self.lab.mnt) in f["mountpoints"]))

    def findings(self, **query: Any) -> list[dict[str, Any]]:
        query.setdefault("min_age_seconds", 0)
        return list(self.get("/v1/findings", **query)["items"])

    def plan(self, **policy: Any) -> dict[str, Any]:
        r = self.client.post("/v1/plans", json=policy, headers=auth(CLEAN))
        assert r.status_code == 201, r.get_data(as_text=True)
        body: dict[str, Any] = r.get_json()
        return body

    def apply(self, plan: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
        r = self.client.post(f"/v1/plans/{plan['id']}/apply", headers=auth(CLEAN))
        assert r.status_code == 202, r.get_data(as_text=True)
        job_id = r.get_json()["job_id"]
        deadline = time.monotonic() + timeout
        while True:
            job: dict[str, Any] = self.get(f"/v1/jobs/{job_id}")
            if job["state"] not in ("queued", "running"):
                return job
            assert time.monotonic() < deadline, job
            time.sleep(0.1)

    def broad(self, **extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """A plan under the broadest policy, applied: (plan, job)."""
        plan = self.plan(**{**BROAD, **extra})
        return plan, self.apply(plan)

    def delete_volume(self, name: str, *, dry_run: bool = False) -> tuple[int, Any]:
        r = self.client.delete(
            f"/v1/volumes/{name}?dry_run={'true' if dry_run else 'false'}", headers=auth(CLEAN)
        )
        return r.status_code, r.get_json()

    def delete_subvolume(self, sub_id: int, *, dry_run: bool = False) -> tuple[int, Any]:
        r = self.client.delete(
            f"/v1/filesystems/{self.fs_uuid}/subvolumes/{sub_id}"
            f"?dry_run={'true' if dry_run else 'false'}",
            headers=auth(CLEAN),
        )
        return r.status_code, r.get_json()

    def subvolumes(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            query: dict[str, Any] = {"limit": 1000}
            if cursor:
                query["cursor"] = cursor
            page = self.get(f"/v1/filesystems/{self.fs_uuid}/subvolumes", **query)
            out.extend(page["items"])
            cursor = page.get("next_cursor")
            if not cursor:
                return out

    def audit(self) -> list[dict[str, Any]]:
        return list(self.get("/v1/audit", limit=5000)["items"])


def refused(answer: tuple[int, Any], code: str, *needles: str) -> None:
    status, body = answer
    assert status == 409, (status, body)
    assert body["code"] == code, body
    for n in needles:
        assert n in body["detail"], (n, body["detail"])


def finding_for(api: Api, name: str) -> dict[str, Any]:
    return next(f for f in api.findings() if f["target"]["name"] == name)


def action_for(plan: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((a for a in plan["actions"] if a["target"]["name"] == name), None)


def skip_for(plan: dict[str, Any], finding: dict[str, Any]) -> str:
    return str(next(s["reason"] for s in plan["skipped"] if s["finding_id"] == finding["id"]))


def result_for(job: dict[str, Any], plan: dict[str, Any], name: str) -> dict[str, Any]:
    action = action_for(plan, name)
    assert action is not None, name
    return dict(next(r for r in job["results"] if r["seq"] == action["seq"]))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def slab(lab_factory: Callable[..., Lab]) -> Lab:
    return lab_factory(seed=True)


@pytest.fixture
def mounts(slab: Lab) -> Iterator[Mounts]:
    m = Mounts(slab)
    try:
        yield m
    finally:
        m.undo()


@pytest.fixture
def guarded(slab: Lab) -> Iterator[Guarded]:
    """The lab's never-touch volumes and layers are guarded in every test too."""
    g = Guarded()
    nt = slab.seeded.never_touch
    g.add(*(v.mountpoint for v in nt.volumes))
    g.add(*(p for p in nt.subvolumes if any(p.iterdir())))
    yield g


@pytest.fixture
def api(slab: Lab, tmp_path: Path) -> Api:
    return Api(make_app(slab, tmp_path / "state").test_client(), slab)


# =========================================================================== class 1


def test_class1_mounts_of_any_type_inside_targets(
    slab: Lab, api: Api, mounts: Mounts, guarded: Guarded
) -> None:
    """A tmpfs inside a nested subvolume of a leaked volume, a host folder bind-mounted
    into another, a tmpfs inside an orphan layer, and a tmpfs mounted into a planned
    orphan between plan and apply: all refused, every byte kept; the plain leak goes."""
    a = slab.seed_dind_volume()
    b = slab.seed_dind_volume()
    c = slab.seed_orphan_subvolume()
    leak = slab.seed_dind_volume()
    leak_orphan = slab.seed_orphan_subvolume()
    late = slab.seed_orphan_subvolume()
    nested = a.inner_container_subvolumes[1]
    tmp_a = mounts.tmpfs(nested / "cache")
    outside = host_folder(slab)
    share = mounts.bind(outside, b.mountpoint / "share")
    tmp_c = mounts.tmpfs(c / "scratch")
    guarded.add(a.mountpoint, tmp_a, b.mountpoint, outside, c, tmp_c)

    for f in (finding_for(api, a.volume), finding_for(api, b.volume), finding_for(api, c.name)):
        assert any(x.startswith("in_use:") for x in f["blocked_by"]), f
    plan = api.plan(**BROAD)
    assert skip_for(plan, finding_for(api, a.volume)).startswith("in_use:")
    assert os.fsdecode(tmp_a) in skip_for(plan, finding_for(api, a.volume))
    assert os.fsdecode(share) in skip_for(plan, finding_for(api, b.volume))
    assert os.fsdecode(tmp_c) in skip_for(plan, finding_for(api, c.name))
    assert action_for(plan, late.name) is not None
    # a mount that appears after the plan is seen right before the action
    tmp_late = mounts.tmpfs(late / "arrived")
    guarded.add(late)
    job = api.apply(plan)
    late_result = result_for(job, plan, late.name)
    assert late_result["outcome"] == "skipped" and late_result["detail"].startswith("in_use:")
    assert os.fsdecode(tmp_late) in late_result["detail"]
    assert result_for(job, plan, leak.volume)["outcome"] == "deleted"
    assert result_for(job, plan, leak_orphan.name)["outcome"] == "deleted"

    refused(api.delete_volume(a.volume), "in_use", os.fsdecode(tmp_a))
    refused(api.delete_subvolume(rootid(nested)), "in_use", os.fsdecode(tmp_a))
    refused(api.delete_volume(b.volume), "in_use", os.fsdecode(share))
    refused(api.delete_subvolume(rootid(c)), "in_use", os.fsdecode(tmp_c))
    refused(api.delete_subvolume(rootid(late)), "in_use", os.fsdecode(tmp_late))

    guarded.assert_intact()
    assert {a.volume, b.volume} <= volume_names(slab)
    assert_dind_gone(slab, leak)
    assert not leak_orphan.exists()
    assert api.get("/v1/audit/verify")["ok"] is True


# =========================================================================== class 2


def test_class2_nested_subvolume_mounted_elsewhere(
    slab: Lab, api: Api, mounts: Mounts, guarded: Guarded
) -> None:
    """A nested subvolume mounted elsewhere with ``subvol=``, another one bind-mounted
    elsewhere: each keeps its place in its volume (the widest view), so the volume and
    the subvolume are refused as also mounted elsewhere; the plain leak goes."""
    g = slab.seed_dind_volume()
    h = slab.seed_dind_volume()
    leak = slab.seed_dind_volume()
    y = g.inner_container_subvolumes[1]
    z = h.ro_parent_child
    at_y = mounts.subvol(in_fs(slab, y), slab.root / f"elsewhere-{secrets.token_hex(3)}")
    at_z = mounts.bind(z, slab.root / f"bound-{secrets.token_hex(3)}")
    guarded.add(g.mountpoint, h.mountpoint, at_y, at_z)

    # the agent lists them at their place inside their volumes, not at the other mount
    by_id = {s["id"]: s for s in api.subvolumes()}
    assert by_id[rootid(y)]["path"] == str(y)
    assert by_id[rootid(z)]["path"] == str(z)
    assert by_id[rootid(y)]["owner"] == {"kind": "docker-volume", "ref": g.volume}

    plan, job = api.broad()
    for vol, at in ((g, at_y), (h, at_z)):
        reason = skip_for(plan, finding_for(api, vol.volume))
        assert reason.startswith("protected:") and "mounted elsewhere" in reason, reason
        assert os.fsdecode(at) in reason
    assert result_for(job, plan, leak.volume)["outcome"] == "deleted"

    refused(api.delete_volume(g.volume), "protected", "mounted elsewhere", os.fsdecode(at_y))
    refused(api.delete_subvolume(rootid(y)), "protected", "mounted elsewhere")
    refused(api.delete_volume(h.volume), "protected", "mounted elsewhere", os.fsdecode(at_z))
    refused(api.delete_subvolume(rootid(z)), "protected", "mounted elsewhere")
    # the read-only parent holding the bound child: refused for its child's sake
    refused(api.delete_subvolume(rootid(h.ro_parent)), "protected", "mounted elsewhere")

    guarded.assert_intact()
    assert {g.volume, h.volume} <= volume_names(slab)
    assert_dind_gone(slab, leak)


# =========================================================================== class 3


def test_class3_containers_bind_mounts_are_use(
    slab: Lab, api: Api, guarded: Guarded
) -> None:
    """A running container bind-mounting a nested subvolume of a leaked volume, a
    created (never started) one bind-mounting an orphan layer: both in use; the plain
    leak goes."""
    j = slab.seed_dind_volume()
    k = slab.seed_orphan_subvolume()
    leak = slab.seed_dind_volume()
    leak_orphan = slab.seed_orphan_subvolume()
    nested = j.inner_container_subvolumes[1]
    tag = secrets.token_hex(3)
    names = [f"bind-run-{tag}", f"bind-created-{tag}"]
    try:
        slab.docker(
            "run", "-d", "--name", names[0], "--network", "none", "-v", f"{nested}:/data",
            BUSYBOX_IMAGE, "sleep", "2147483647",
        )  # fmt: skip
        slab.docker(
            "create", "--name", names[1], "--network", "none", "-v", f"{k}:/data",
            BUSYBOX_IMAGE, "true",
        )  # fmt: skip
        guarded.add(j.mountpoint, k)

        plan, job = api.broad()
        reason = skip_for(plan, finding_for(api, j.volume))
        assert reason.startswith("in_use:") and f"container {names[0]} (running)" in reason
        reason = skip_for(plan, finding_for(api, k.name))
        assert reason.startswith("in_use:") and f"container {names[1]} (stopped)" in reason
        assert result_for(job, plan, leak.volume)["outcome"] == "deleted"
        assert result_for(job, plan, leak_orphan.name)["outcome"] == "deleted"

        refused(api.delete_volume(j.volume), "in_use", names[0])
        refused(api.delete_subvolume(rootid(nested)), "in_use", names[0])
        refused(api.delete_subvolume(rootid(k)), "in_use", names[1])
        guarded.assert_intact()
        assert j.volume in volume_names(slab)
        assert_dind_gone(slab, leak)
        assert not leak_orphan.exists()
    finally:
        slab.docker("rm", "-f", *names, check=False)
