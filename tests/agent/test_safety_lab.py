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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from agent.http.app import create_app
from agent.runtime import real_backends
from lab import BUSYBOX_IMAGE, Lab, SeededDind
from lab.agentproc import pids_root_may_not_read
from shared.policy import FINDING_KINDS
from shared.wirepath import from_wire
from tests.agent.http.apphelpers import BOTH, CLEAN, agent_config, auth
from tests.namespaces import fd_held_namespace_tmpfs, pinned_namespace_tmpfs

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
    # the lab's orphans are seconds old: no age floor, unless the test keeps the agent's
    # own default (None)
    floor = cfg.pop("orphan_min_age_seconds", 0)
    if floor is not None:
        cfg["orphan_min_age_seconds"] = floor
    cfg.setdefault("unreadable_pids_allowed", pids_root_may_not_read())
    config = agent_config(state_dir, docker_host=lab.docker_host, btrfs_binary=btrfs_binary, **cfg)
    app = create_app(config, backend=real_backends(config))
    app.testing = True
    return app


@dataclass
class Api:
    client: FlaskClient
    lab: Lab
    plans: list[str] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)

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
        self.plans.append(body["id"])
        return body

    def apply(self, plan: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
        r = self.client.post(f"/v1/plans/{plan['id']}/apply", headers=auth(CLEAN))
        assert r.status_code == 202, r.get_data(as_text=True)
        job_id = r.get_json()["job_id"]
        self.jobs.append(job_id)
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

    def walk_every_endpoint(self) -> int:
        """GET every endpoint the app serves, with every subvolume id, volume name, plan
        and job it knows; dry-run DELETE every subvolume and volume. Fails on any 5xx.
        Returns the number of requests."""
        app = self.client.application
        fs = self.fs_uuid
        ids = [s["id"] for s in self.subvolumes()]
        names = [v["name"] for v in self.get("/v1/volumes")["items"]]
        fill = {
            "fs_uuid": [fs],
            "sub_id": [str(i) for i in ids],
            "name": names,
            "plan_id": self.plans,
            "job_id": self.jobs,
        }
        urls: list[str] = []
        for rule in app.url_map.iter_rules():
            if "GET" not in (rule.methods or ()) or rule.rule.startswith(("/static", "/docs/")):
                continue
            todo = [rule.rule]
            for arg in rule.arguments:
                todo = [
                    u.replace(f"<{conv}:{arg}>", value)
                    for u in todo
                    for conv in ("string", "int")
                    for value in fill[arg]
                    if f"<{conv}:{arg}>" in u
                ]
            urls.extend(todo)
        urls += [
            "/v1/findings?min_age_seconds=0",
            "/v1/findings?min_age_seconds=0&" + "&".join(f"kind={k}" for k in FINDING_KINDS),
            f"/v1/filesystems/{fs}/subvolumes?limit=1",
            "/v1/audit?limit=5000",
        ]
        asked = 0
        for url in urls:
            r = self.client.get(url, headers=auth(BOTH))
            assert r.status_code < 500, (url, r.status_code, r.get_data(as_text=True))
            asked += 1
        for i in ids:
            r = self.client.delete(f"/v1/filesystems/{fs}/subvolumes/{i}", headers=auth(CLEAN))
            assert r.status_code < 500, (i, r.status_code, r.get_data(as_text=True))
            asked += 1
        for n in names:
            r = self.client.delete(f"/v1/volumes/{n}", headers=auth(CLEAN))
            assert r.status_code < 500, (n, r.status_code, r.get_data(as_text=True))
            asked += 1
        return asked


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


def test_class3_containers_bind_mounts_are_use(slab: Lab, api: Api, guarded: Guarded) -> None:
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


# =========================================================================== classes 4-6


def listed_right(api: Api, *paths: bytes) -> dict[bytes, dict[str, Any]]:
    """Each subvolume at ``paths`` is listed by its id with exactly its bytes
    (``path`` + ``path_b64``); the items by path."""
    by_id = {s["id"]: s for s in api.subvolumes()}
    out = {}
    for p in paths:
        item = by_id[rootid(p)]
        assert os.fsencode(from_wire(item["path"], item["path_b64"])) == p, (p, item)
        try:
            p.decode("utf-8")
        except UnicodeDecodeError:
            assert item["path_b64"] == base64.b64encode(p).decode()
        else:
            assert item["path_b64"] is None and item["path"] == p.decode()
        out[p] = item
    return out


def deleted_paths(items: list[dict[str, Any]]) -> set[bytes]:
    return {os.fsencode(from_wire(d["path"], d["path_b64"])) for d in items}


def audit_shows(api: Api, *, job_id: str) -> list[dict[str, Any]]:
    entries = [e for e in api.audit() if e["detail"].get("job_id") == job_id]
    finish = [e for e in api.audit() if e["action"] == "job.finish" and job_id in e["target"]]
    assert len(finish) == 1, finish
    assert api.get("/v1/audit/verify")["ok"] is True
    return entries


@pytest.fixture
def roots_api(slab: Lab, tmp_path: Path, btrfs_binary: str) -> Api:
    """The agent with its roots covering the filesystem's top level."""
    app = make_app(slab, tmp_path / "state", btrfs_binary, roots=[str(slab.mnt)])
    return Api(app.test_client(), slab)


@pytest.fixture
def odd_api(slab: Lab, tmp_path: Path, btrfs_binary: str) -> Api:
    return Api(make_app(slab, tmp_path / "state", btrfs_binary).test_client(), slab)


def test_class4_a_newline_cannot_forge_a_subvolume(
    slab: Lab, roots_api: Api, guarded: Guarded
) -> None:
    """Roots cover the top level. A nested subvolume of a leaked volume whose name holds
    a newline and a whole ``btrfs subvolume list`` line naming a subvolume outside the
    volume: listed as itself, planned and deleted as itself (plan, and direct DELETE of
    another such one); the subvolume it names is untouched; every endpoint answers."""
    api = roots_api
    tag = secrets.token_hex(3)
    precious = subvolume(slab.mnt / f"precious-{tag}")
    pid = rootid(precious)
    line = b"ID %d gen 7 top level 5 path precious-%s" % (pid, tag.encode())
    leak = slab.seed_dind_volume()
    other = slab.seed_dind_volume()
    forge = subvolume(os.fsencode(leak.mountpoint / "btrfs" / "subvolumes") + b"/x\n" + line)
    forge2 = subvolume(os.fsencode(other.mountpoint) + b"/\n" + line + b"\n")
    outside = subvolume(os.fsencode(slab.mnt) + b"/odd\n" + line)
    guarded.add(precious, outside)
    slab.settle()
    listed_right(api, forge, forge2, outside, precious)
    assert api.walk_every_endpoint() > 0

    status, body = api.delete_volume(leak.volume, dry_run=True)
    assert status == 200
    assert forge in deleted_paths(body["deleted"])
    assert pid not in {d["id"] for d in body["deleted"]}
    status, body = api.delete_subvolume(rootid(forge2))
    assert status == 200, body
    assert deleted_paths(body["deleted"]) == {forge2}
    assert not os.path.lexists(forge2)

    plan, job = api.broad()
    action = action_for(plan, leak.volume)
    assert action is not None and rootid(precious) not in action["subvolume_ids"]
    result = result_for(job, plan, leak.volume)
    assert result["outcome"] == "deleted", result
    assert forge in deleted_paths(result["deleted"])
    assert result_for(job, plan, other.volume)["outcome"] == "deleted"
    assert_dind_gone(slab, leak)
    assert_dind_gone(slab, other)
    guarded.assert_intact()
    audit_shows(api, job_id=job["id"])
    assert api.walk_every_endpoint() > 0


ODD_NAMES = (b"caf\xe9\xff", b"tab\there", b"back\\slash", b"-rf", b"--help", b"\xfe\n\tx\\")


def test_class5_names_that_are_not_utf8_and_other_odd_bytes(
    slab: Lab, odd_api: Api, guarded: Guarded
) -> None:
    """Nested subvolumes, orphan layers and an orphan layer folder named with bytes that
    are not UTF-8, tabs, backslashes, leading dashes: listed with their exact bytes,
    dry-run and real DELETEs answer (never 500), planned, deleted and audited; a
    subvolume so named outside every leftover is untouched."""
    api = odd_api
    leak = slab.seed_dind_volume()
    layers = os.fsencode(slab.layer_dir)
    nested = [
        subvolume(os.fsencode(leak.mountpoint / "btrfs" / "subvolumes") + b"/" + n)
        for n in ODD_NAMES
    ]
    orphans = [subvolume(layers + b"/" + n) for n in ODD_NAMES]
    folder = layers + b"/folder-\xff\x01"
    os.mkdir(folder)
    with open(folder + b"/\xe9", "wb") as f:
        f.write(b"left by a copy")
    outside = subvolume(os.fsencode(slab.mnt) + b"/keep-\xff\n" + secrets.token_hex(3).encode())
    guarded.add(outside)
    slab.settle()
    listed_right(api, *nested, *orphans, outside)
    assert api.walk_every_endpoint() > 0

    # direct DELETEs, dry run then real, of one nested and one orphan
    for target in (nested[0], orphans[0]):
        status, body = api.delete_subvolume(rootid(target), dry_run=True)
        assert status == 200 and deleted_paths(body["deleted"]) == {target}, body
    status, body = api.delete_volume(leak.volume, dry_run=True)
    assert status == 200 and set(nested) <= deleted_paths(body["deleted"])
    status, body = api.delete_subvolume(rootid(orphans[0]))
    assert status == 200 and deleted_paths(body["deleted"]) == {orphans[0]}, body
    assert not os.path.lexists(orphans[0])
    audit = api.audit()
    assert audit[-1]["outcome"] == "deleted" and "\ufffd" in str(audit[-1]["detail"])

    plan, job = api.broad()
    assert job["state"] == "succeeded", job
    result = result_for(job, plan, leak.volume)
    assert set(nested) <= deleted_paths(result["deleted"])
    for p in orphans[1:]:
        name = os.fsdecode(os.path.basename(p))
        action = next(
            a
            for a in plan["actions"]
            if a["target"]["id"] is not None
            and os.fsencode(from_wire(a["target"]["path"], a["target"]["path_b64"])) == p
        )
        got = next(r for r in job["results"] if r["seq"] == action["seq"])
        assert got["outcome"] == "deleted" and deleted_paths(got["deleted"]) == {p}, name
        assert not os.path.lexists(p)
    folder_action = next(a for a in plan["actions"] if a["op"] == "remove_folder")
    assert (
        os.fsencode(from_wire(folder_action["target"]["path"], folder_action["target"]["path_b64"]))
        == folder
    )
    assert not os.path.lexists(folder)
    assert_dind_gone(slab, leak)
    entries = audit_shows(api, job_id=job["id"])
    assert {e["outcome"] for e in entries if "seq" in e["detail"]} == {"started", "deleted"}
    guarded.assert_intact()
    assert api.walk_every_endpoint() > 0


def test_class6_a_real_folder_named_fs_tree(slab: Lab, odd_api: Api, guarded: Guarded) -> None:
    """A real folder ``<FS_TREE>`` at the top level holding a subvolume at a path that
    mimics one inside a leaked volume, and one inside the leaked volume holding a
    nested subvolume: the mimic is not the volume's and stays; the volume goes whole."""
    api = odd_api
    leak = slab.seed_dind_volume()
    rel = leak.mountpoint.relative_to(slab.mnt)
    mimic_dir = slab.mnt / "<FS_TREE>" / rel / "btrfs" / "subvolumes"
    mimic_dir.mkdir(parents=True)
    mimic = subvolume(mimic_dir / "mimic")
    (leak.mountpoint / "<FS_TREE>").mkdir()
    inner = subvolume(leak.mountpoint / "<FS_TREE>" / "inner")
    guarded.add(mimic)
    slab.settle()
    items = listed_right(api, mimic, inner)
    assert items[mimic]["owner"]["kind"] == "other"
    assert items[inner]["owner"] == {"kind": "docker-volume", "ref": leak.volume}
    assert api.walk_every_endpoint() > 0

    refused(api.delete_subvolume(rootid(mimic)), "outside_roots")
    status, body = api.delete_volume(leak.volume, dry_run=True)
    assert status == 200 and inner in deleted_paths(body["deleted"])
    assert mimic not in deleted_paths(body["deleted"])

    inner_id, mimic_id = rootid(inner), rootid(mimic)
    plan, job = api.broad()
    action = action_for(plan, leak.volume)
    assert action is not None
    assert inner_id in action["subvolume_ids"] and mimic_id not in action["subvolume_ids"]
    result = result_for(job, plan, leak.volume)
    assert result["outcome"] == "deleted", result
    assert inner in deleted_paths(result["deleted"])
    assert_dind_gone(slab, leak)  # whole: not half-deleted
    guarded.assert_intact()
    audit_shows(api, job_id=job["id"])


# =========================================================================== class 7


def tar_of_big(data: bytes) -> bytes:
    """A tar holding ``data`` as the file ``big`` (what ``docker import`` takes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("big")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@contextlib.contextmanager
def importing(lab: Lab, image: str, data: bytes) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``docker import`` of a tar holding ``data`` as the file ``big``, stopped half way
    through its input: yields (the import, the name of the layer subvolume Docker is
    writing); the rest is sent when the block ends."""
    tar = tar_of_big(data)
    before = set(os.listdir(lab.layer_dir))
    proc = subprocess.Popen(
        ["docker", "import", "-", image],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=lab.env,
    )
    assert proc.stdin is not None
    try:
        proc.stdin.write(tar[: len(tar) // 2])
        proc.stdin.flush()
        deadline = time.monotonic() + 30
        while True:
            new = set(os.listdir(lab.layer_dir)) - before
            if new and (lab.layer_dir / next(iter(new)) / "big").exists():
                break
            assert time.monotonic() < deadline, "Docker made no layer subvolume"
            time.sleep(0.05)
        assert len(new) == 1, new
        lab.settle()
        yield proc, new.pop()
        _, err = proc.communicate(tar[len(tar) // 2 :], timeout=60)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_class7_a_layer_docker_is_importing_is_never_an_orphan(
    slab: Lab, tmp_path: Path, guarded: Guarded
) -> None:
    """While ``docker import`` writes a layer: the agent's default floor (one hour,
    ``orphan_min_age_seconds`` 3600) blocks it even at ``min_age_seconds`` 0, and so
    does Docker's own process writing it (working in the layer, holding its files
    open: ``held_by_process``); a broad plan skips it, a direct DELETE is refused; an
    agent without a floor does not plan it either while that process holds it. The
    import completes, byte for byte; the plain orphan next to it goes. (That a layer
    recorded between plan and apply is skipped is ``tests/agent/domain/test_recheck``'s.)"""
    default = Api(make_app(slab, tmp_path / "d", orphan_min_age_seconds=None).test_client(), slab)
    no_floor = Api(make_app(slab, tmp_path / "z").test_client(), slab)
    data = secrets.token_bytes(24 << 20)
    image = f"inflight-{secrets.token_hex(3)}"
    leak = slab.seed_orphan_subvolume()
    with importing(slab, image, data) as (proc, name):
        assert proc.poll() is None, "the import must still be running"
        layer = slab.layer_dir / name
        f = finding_for(default, name)
        assert f["kind"] == "orphan-layer"
        assert any(b.startswith("too_young:") for b in f["blocked_by"]), f["blocked_by"]
        assert any(b.startswith("held_by_process:") for b in f["blocked_by"]), f["blocked_by"]
        plan = default.plan(**BROAD)
        reason = skip_for(plan, f)
        assert reason.startswith("held_by_process:") and "too_young:" in reason, reason
        refused(default.delete_subvolume(rootid(layer)), "held_by_process")
        unfloored = finding_for(no_floor, name)
        early = no_floor.plan(**{**BROAD, "finding_ids": [unfloored["id"]]})
        assert action_for(early, name) is None
        assert skip_for(early, unfloored).startswith("held_by_process:")
        refused(no_floor.delete_subvolume(rootid(layer)), "held_by_process")
        leak_plan = no_floor.plan(
            **{**BROAD, "finding_ids": [finding_for(no_floor, leak.name)["id"]]}
        )
    # the import is done: Docker has recorded the layer
    assert name in slab.layer_refs()
    assert (layer / "big").read_bytes() == data
    assert no_floor.apply(leak_plan)["state"] == "succeeded"
    assert not leak.exists()
    guarded.assert_intact()
    slab.docker("image", "rm", image)


# =========================================================================== class 8


def test_class8_a_write_between_plan_and_apply_is_seen(
    slab: Lab, api: Api, guarded: Guarded
) -> None:
    """After the plan, a file is written into a planned orphan and into a nested
    subvolume of a planned volume, with no sync: btrfs has not committed it when the
    job starts, yet both actions are skipped as changed; the untouched leak next to
    them goes."""
    written_orphan = slab.seed_orphan_subvolume()
    written_dind = slab.seed_dind_volume()
    leak = slab.seed_dind_volume()
    leak_orphan = slab.seed_orphan_subvolume()
    # the written ones first: a delete before them would make btrfs commit (its cleaner
    # does), and hide whether the job commits itself
    names = (written_orphan.name, written_dind.volume, leak.volume, leak_orphan.name)
    ids = [finding_for(api, n)["id"] for n in names]
    plan = api.plan(**{**BROAD, "finding_ids": ids})
    assert [a["target"]["name"] for a in plan["actions"]] == list(names)
    for target in (written_orphan, written_dind.inner_container_subvolumes[1]):
        fd = os.open(target / "late-write", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, secrets.token_bytes(4096))
        os.close(fd)  # no fsync, no sync: still in the running transaction
    guarded.add(written_orphan, written_dind.mountpoint)
    job = api.apply(plan)
    for name in (written_orphan.name, written_dind.volume):
        result = result_for(job, plan, name)
        assert result["outcome"] == "skipped", result
        assert result["detail"].startswith("changed:") and "generation moved" in result["detail"]
    assert result_for(job, plan, leak.volume)["outcome"] == "deleted"
    assert result_for(job, plan, leak_orphan.name)["outcome"] == "deleted"
    assert job["state"] == "succeeded"
    guarded.assert_intact()
    assert written_dind.volume in volume_names(slab)
    assert_dind_gone(slab, leak)
    assert not leak_orphan.exists()


# =========================================================================== class 9


def test_class9_a_named_volume_holding_subvolumes(slab: Lab, api: Api, guarded: Guarded) -> None:
    """``docker volume create ci-dind-cache`` used as a dind container's data root, the
    container then removed: a dind-volume finding with ``named`` true, never planned
    unless the plan includes named volumes or names it, and aged from its last write
    (a layer the inner daemon made seconds later), not from what Docker calls its
    creation (the change time of ``_data``); the anonymous leak next to it goes."""
    name = f"ci-dind-cache-{secrets.token_hex(3)}"
    slab.docker("volume", "create", name)
    cache = slab.seed_dind_volume(volume=name)
    leak = slab.seed_dind_volume()
    assert cache.volume == name
    time.sleep(3)
    later = subvolume(cache.mountpoint / "btrfs" / "subvolumes" / "a-later-layer")
    slab.settle()
    guarded.add(cache.mountpoint)

    f = finding_for(api, name)
    assert f["kind"] == "dind-volume" and f["named"] is True and f["blocked_by"] == []
    assert rootid(later) in f["subvolume_ids"]
    created = datetime.fromisoformat(api.get(f"/v1/volumes/{name}")["created_at"])
    docker_age = (datetime.now(UTC) - created).total_seconds()
    assert f["age_seconds"] is not None and f["age_seconds"] + 2 <= docker_age, (f, created)
    assert any("last write" in e for e in f["evidence"]), f["evidence"]

    # every kind, any age, but named volumes not asked for: skipped as named
    plan, job = api.broad(include_named_volumes=False)
    assert skip_for(plan, f).startswith("named:")
    assert result_for(job, plan, leak.volume)["outcome"] == "deleted"
    # named volumes asked for, with an age its creation has and its last write has not
    plan = api.plan(**{**BROAD, "min_age_seconds": int(docker_age) - 1})
    assert skip_for(plan, finding_for(api, name)).startswith("too_young:")
    guarded.assert_intact()
    assert name in volume_names(slab)
    assert_dind_gone(slab, leak)
    # named by its finding id, it is planned (a person chose it)
    chosen = api.plan(**{**BROAD, "include_named_volumes": False, "finding_ids": [f["id"]]})
    assert action_for(chosen, name) is not None


def test_inner_volumes_labelled_keep_protect_their_leaked_volume(
    slab: Lab, api: Api, guarded: Guarded
) -> None:
    """A CI runner's docker-in-docker daemon made volumes of its own; one is labelled
    keep (``docker volume create --label keep=true results`` inside it). When the outer
    volume leaks, the inner daemon's ``volumes/metadata.db`` (a real bolt file it wrote)
    is read: the leak that holds a kept inner volume is refused ``protected``, in its
    finding, a direct DELETE and a broad plan, and stays byte for byte; one whose volume
    store cannot be read is refused too; the leak next to them whose inner volumes carry
    other labels goes."""
    kept = slab.seed_dind_volume(inner_volumes={"results": {"keep": "true"}, "scratch": {}})
    plain = slab.seed_dind_volume(inner_volumes={"ci-cache": {"team": "ci"}})
    broken = slab.seed_dind_volume(inner_volumes={"other": {}})
    (broken.mountpoint / "volumes" / "metadata.db").write_bytes(b"not bolt" * 1024)
    guarded.add(kept.mountpoint, broken.mountpoint)

    f = finding_for(api, kept.volume)
    assert any("results" in b and "keep=true" in b for b in f["blocked_by"]), f
    assert finding_for(api, plain.volume)["blocked_by"] == []
    refused(api.delete_volume(kept.volume), "protected", "holds results", "keep=true")
    refused(api.delete_volume(broken.volume), "protected", "cannot be read")
    plan, job = api.broad()
    assert skip_for(plan, f).startswith("protected:"), plan["skipped"]
    assert action_for(plan, broken.volume) is None
    assert result_for(job, plan, plain.volume)["outcome"] == "deleted"
    guarded.assert_intact()
    assert {kept.volume, broken.volume} <= volume_names(slab)
    assert (kept.mountpoint / "volumes" / "results" / "_data" / "data.txt").exists()
    assert_dind_gone(slab, plain)


# =========================================================================== class 10


def test_class10_partial_failures_are_told(slab: Lab, api: Api, guarded: Guarded) -> None:
    """Steps that fail for real part way: a nested subvolume the kernel refuses to
    delete (immutable: EPERM), a file in ``_data`` that cannot be unlinked (immutable).
    The job goes on with the other actions; each failed action's result, its audit
    entry and the job's reclaimed bytes list what it destroyed before it stopped; a
    direct DELETE that fails part way answers 409 with the same; a job with nothing
    done reads ``skipped``."""
    slab.enable_quotas()
    p = slab.seed_dind_volume()
    q = slab.seed_dind_volume()
    p2 = slab.seed_dind_volume()
    r = slab.seed_orphan_subvolume()
    s = slab.seed_dind_volume()
    stuck, stuck2 = p.inner_container_subvolumes[1], p2.inner_container_subvolumes[1]
    pinned = q.mountpoint / "pinned"
    pinned.write_bytes(secrets.token_bytes(2048))
    immutable = [stuck, stuck2, pinned]
    try:
        for path in immutable:
            run("chattr", "+i", path)
        slab.settle()
        run("btrfs", "quota", "rescan", "-w", slab.mnt)
        guarded.add(stuck, stuck2)
        names = (p.volume, q.volume, r.name, s.volume)
        plan = api.plan(**{**BROAD, "finding_ids": [finding_for(api, n)["id"] for n in names]})
        assert [a["target"]["name"] for a in plan["actions"]] == list(names)
        job = api.apply(plan)
        assert job["state"] == "partial", job

        got_p = result_for(job, plan, p.volume)
        assert got_p["outcome"] == "failed" and "Operation not permitted" in got_p["detail"]
        p_gone = {os.fsencode(x) for x in p.subvolumes if x != stuck}
        assert deleted_paths(got_p["deleted"]) == p_gone
        assert not any(os.path.lexists(x) for x in p_gone) and stuck.exists()
        assert got_p["reclaimed_bytes"] and got_p["reclaimed_bytes"] > 0
        assert p.volume in volume_names(slab)

        got_q = result_for(job, plan, q.volume)
        assert got_q["outcome"] == "failed" and "pinned" in got_q["detail"], got_q
        assert deleted_paths(got_q["deleted"]) == {os.fsencode(x) for x in q.subvolumes}
        assert got_q["reclaimed_bytes"] and got_q["reclaimed_bytes"] > 0
        assert pinned.exists() and q.volume in volume_names(slab)

        assert result_for(job, plan, r.name)["outcome"] == "deleted" and not r.exists()
        assert result_for(job, plan, s.volume)["outcome"] == "deleted"
        assert_dind_gone(slab, s)
        assert job["reclaimed_bytes"] == sum(x["reclaimed_bytes"] or 0 for x in job["results"])
        assert job["reclaimed_bytes"] >= got_p["reclaimed_bytes"] + got_q["reclaimed_bytes"]

        entries = audit_shows(api, job_id=job["id"])
        for got, vol in ((got_p, p), (got_q, q)):
            entry = next(
                e
                for e in entries
                if e["target"] == f"volume {vol.volume}" and e["outcome"] == "failed"
            )
            assert {d["path"] for d in entry["detail"]["deleted"]} == {
                d["path"] for d in got["deleted"]
            }
            assert entry["detail"]["reclaimed_bytes"] == got["reclaimed_bytes"]
            assert entry["detail"]["failed"], entry
        finish = next(
            e for e in api.audit() if e["action"] == "job.finish" and job["id"] in e["target"]
        )
        assert finish["outcome"] == "partial"
        assert finish["detail"]["reclaimed_bytes"] == job["reclaimed_bytes"]

        status, body = api.delete_volume(p2.volume)
        assert status == 409 and body["code"] == "conflict", body
        assert deleted_paths(body["deleted"]) == {
            os.fsencode(x) for x in p2.subvolumes if x != stuck2
        }
        assert body["reclaimed_bytes"] and body["audit_seq"]
        entry = next(e for e in api.audit() if e["seq"] == body["audit_seq"])
        assert entry["outcome"] == "failed" and len(entry["detail"]["deleted"]) == len(
            body["deleted"]
        )

        # nothing done at all: skipped
        t = slab.seed_orphan_subvolume()
        only = api.plan(**{**BROAD, "finding_ids": [finding_for(api, t.name)["id"]]})
        (t / "late").write_bytes(b"written after the plan")
        nothing = api.apply(only)
        assert nothing["state"] == "skipped", nothing
        assert nothing["reclaimed_bytes"] == 0 and t.exists()
        guarded.assert_intact()
    finally:
        for path in immutable:
            run("chattr", "-i", path, check=False)
        slab.disable_quotas()


# =========================================================================== attacks


def test_attack_a_subvolume_moved_after_the_plan(
    slab: Lab, roots_api: Api, mounts: Mounts, guarded: Guarded
) -> None:
    """Roots cover the top level. After the plan, the planned orphan layer is renamed
    to a folder of someone's next to it (a rename keeps the moved subvolume's id and its
    generation), a nested subvolume is moved out of a planned volume, and another
    subvolume is moved into a second planned volume: none of the three actions runs;
    the plain leak goes. (The last two renames go through a mount of the top level, as
    a person on the NAS sees it: the daemon's own mounts of its data root refuse a
    rename across them, EXDEV.) Files are read for their checksums before the plan:
    a first read updates their access time, which moves the generation."""
    api = roots_api
    tag = secrets.token_hex(3)
    top = Path(os.fsdecode(mounts.subvol("/", slab.root / f"top-{tag}")))

    def via_top(p: Path) -> Path:
        return top / p.relative_to(slab.mnt)

    orphan = slab.seed_orphan_subvolume()
    emptied = slab.seed_dind_volume()
    filled = slab.seed_dind_volume()
    leak = slab.seed_orphan_subvolume()
    mine = slab.mnt / f"photos-{tag}"
    mine.mkdir()
    stranger = Path(os.fsdecode(subvolume(mine / "album")))
    nested = emptied.inner_container_subvolumes[1]
    before = {p: digest(p) for p in (orphan, nested, stranger)}
    slab.settle()
    names = (orphan.name, emptied.volume, filled.volume, leak.name)
    plan = api.plan(**{**BROAD, "finding_ids": [finding_for(api, n)["id"] for n in names]})
    assert [a["target"]["name"] for a in plan["actions"]] == list(names)
    kept = slab.data_root / "btrfs" / f"kept-{tag}"
    kept.mkdir()
    moved = kept / "moved-layer"
    orphan_id = rootid(orphan)
    gen = api.get(f"/v1/filesystems/{api.fs_uuid}/subvolumes/{orphan_id}")["generation"]
    os.rename(orphan, moved)
    out = mine / "moved-nested"
    os.rename(via_top(nested), via_top(out))
    into = filled.mountpoint / "moved-in"
    os.rename(via_top(stranger), via_top(into))
    slab.settle()
    assert api.get(f"/v1/filesystems/{api.fs_uuid}/subvolumes/{orphan_id}")["generation"] == gen
    job = api.apply(plan)
    for name in names[:3]:
        result = result_for(job, plan, name)
        assert result["outcome"] == "skipped" and result["detail"].startswith("changed:"), result
    assert result_for(job, plan, leak.name)["outcome"] == "deleted" and not leak.exists()
    assert {p: digest(q) for p, q in ((orphan, moved), (nested, out), (stranger, into))} == before
    guarded.assert_intact()
    assert {emptied.volume, filled.volume} <= volume_names(slab)


@contextlib.contextmanager
def private_namespace_tmpfs(*points: Path) -> Iterator[tuple[int, list[Path]]]:
    """A process in a mount namespace of its own (``unshare -m``, private propagation:
    a service with private mounts) with a tmpfs holding a file at each of ``points``:
    invisible in the host's mount table and the agent's. Yields (its pid, the paths
    through which its files are read from here)."""
    script = "".join(
        f"mount -t tmpfs -o size=4m tmpfs '{p}' && head -c 3000 /dev/urandom > '{p}/only-here' && "
        for p in points
    )
    for p in points:
        p.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            script + "echo ready && exec sleep 600",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        seen = [Path(f"/proc/{proc.pid}/root{p}") for p in points]
        assert all((s / "only-here").exists() for s in seen)
        assert not any((p / "only-here").exists() for p in points)  # not here
        yield proc.pid, seen
    finally:
        proc.kill()
        proc.wait()


def test_attack_a_mount_in_another_mount_namespace(slab: Lab, api: Api, guarded: Guarded) -> None:
    """A tmpfs mounted inside a leaked volume's data, and one inside an orphan layer, by
    a process in a mount namespace of its own: the host's mount table and the agent's
    do not show them, but removing the folder (or deleting the subvolume) they sit on
    would detach them there and their files would be gone. Both are in use; the plain
    leak goes."""
    vol = slab.seed_dind_volume()
    orphan = slab.seed_orphan_subvolume()
    leak = slab.seed_dind_volume()
    leak_orphan = slab.seed_orphan_subvolume()
    with private_namespace_tmpfs(vol.mountpoint / "private", orphan / "private") as (pid, seen):
        guarded.add(*seen)
        plan, job = api.broad()
        for name in (vol.volume, orphan.name):
            reason = skip_for(plan, finding_for(api, name))
            assert reason.startswith("in_use:") and f"pid {pid}" in reason, reason
        assert result_for(job, plan, leak.volume)["outcome"] == "deleted"
        assert result_for(job, plan, leak_orphan.name)["outcome"] == "deleted"
        refused(api.delete_volume(vol.volume), "in_use", f"pid {pid}")
        refused(api.delete_subvolume(rootid(orphan)), "in_use", f"pid {pid}")
        guarded.assert_intact()
    assert vol.volume in volume_names(slab) and orphan.exists()
    assert_dind_gone(slab, leak)


def test_attack_a_mount_in_a_namespace_no_process_is_in(slab: Lab, api: Api) -> None:
    """The same, in a namespace that no process is in: a tmpfs mounted inside a leaked
    volume's data and one inside an orphan layer, in a namespace kept only by a bind
    mount of its nsfs file. Removing the folders would detach them there (their files
    gone). The agent enters that namespace to read its mounts: both are in use; the
    plain leak goes."""
    vol = slab.seed_dind_volume()
    orphan = slab.seed_orphan_subvolume()
    leak = slab.seed_dind_volume()
    with pinned_namespace_tmpfs(slab.root, vol.mountpoint / "pinned", orphan / "pinned") as (
        pin,
        read,
    ):
        before = read()
        plan, job = api.broad()
        for name in (vol.volume, orphan.name):
            assert action_for(plan, name) is None, f"{name} was planned"
            reason = skip_for(plan, finding_for(api, name))
            assert reason.startswith("in_use:") and f"kept at {pin}" in reason, reason
        assert result_for(job, plan, leak.volume)["outcome"] == "deleted"
        refused(api.delete_volume(vol.volume), "in_use", f"kept at {pin}")
        refused(api.delete_subvolume(rootid(orphan)), "in_use", f"kept at {pin}")
        assert read() == before
    assert vol.volume in volume_names(slab) and orphan.exists()
    assert_dind_gone(slab, leak)


def test_attack_a_mount_in_a_namespace_only_an_open_file_keeps(slab: Lab, api: Api) -> None:
    """And in a namespace that only another process's open file keeps (its processes
    ended): the agent enters it through that file; the leak holding its tmpfs is in
    use, the plain leak goes."""
    vol = slab.seed_dind_volume()
    leak = slab.seed_dind_volume()
    with fd_held_namespace_tmpfs(vol.mountpoint / "held") as (keeper, read):
        before = read()
        plan, job = api.broad()
        assert action_for(plan, vol.volume) is None, "planned"
        reason = skip_for(plan, finding_for(api, vol.volume))
        assert reason.startswith("in_use:") and f"of pid {keeper}" in reason, reason
        assert result_for(job, plan, leak.volume)["outcome"] == "deleted"
        refused(api.delete_volume(vol.volume), "in_use", f"of pid {keeper}")
        assert read() == before
    assert vol.volume in volume_names(slab)
    assert_dind_gone(slab, leak)


def test_attacks_that_hold(slab: Lab, api: Api, mounts: Mounts, guarded: Guarded) -> None:
    """What else was tried, in one broad run: a hard link from a leaked volume to a file
    outside it, a symlink in a leaked volume to a host folder, a folder of a planned
    volume swapped for a symlink to a host folder between plan and apply, a volume whose
    ``_data`` is itself a mount point, the data root bind-mounted into a leaked volume,
    plain folders in the daemon's ``btrfs/subvolumes/`` holding a subvolume or a mount.
    The leaked volumes that hold nothing foreign go (their links as links); everything
    they pointed at stays; the others are refused with the reason."""
    tag = secrets.token_hex(3)
    linked = slab.seed_dind_volume()
    swapped = slab.seed_dind_volume()
    mounted = slab.seed_dind_volume()
    rooted = slab.seed_dind_volume()
    # a hard link: the same file under a name outside the volume (same subvolume)
    keep = slab.data_root / f"keep-{tag}"
    keep.mkdir()
    (linked.mountpoint / "shared.bin").write_bytes(secrets.token_bytes(5000))
    os.link(linked.mountpoint / "shared.bin", keep / "shared.bin")
    outside = Path(os.fsdecode(host_folder(slab)))
    (linked.mountpoint / "to-host").symlink_to(outside)
    (swapped.mountpoint / "sub").mkdir()
    (swapped.mountpoint / "sub" / "x").write_bytes(b"x")
    at_data = mounts.tmpfs(mounted.mountpoint)
    at_root = mounts.bind(slab.data_root, rooted.mountpoint / "root-view")
    holds_sub = slab.layer_dir / f"folder-sub-{tag}"
    holds_sub.mkdir()
    subvolume(holds_sub / "inner")
    holds_mount = slab.layer_dir / f"folder-mount-{tag}"
    holds_mount.mkdir()
    at_folder = mounts.tmpfs(holds_mount / "m")
    guarded.add(keep, outside, at_data, holds_sub, at_folder)
    slab.settle()

    plan = api.plan(**BROAD)
    assert action_for(plan, linked.volume) is not None
    assert action_for(plan, swapped.volume) is not None
    assert os.fsdecode(at_data) in skip_for(plan, finding_for(api, mounted.volume))
    reason = skip_for(plan, finding_for(api, rooted.volume))
    assert reason.startswith("in_use:") and os.fsdecode(at_root) in reason
    folders = {f["target"]["path"]: f for f in api.findings() if f["kind"] == "orphan-layer-folder"}
    assert skip_for(plan, folders[str(holds_sub)]).startswith("protected:")
    assert skip_for(plan, folders[str(holds_mount)]).startswith("in_use:")
    # between plan and apply, a planned folder becomes a symlink to a host folder
    shutil_target = swapped.mountpoint / "sub"
    for child in shutil_target.iterdir():
        child.unlink()
    shutil_target.rmdir()
    shutil_target.symlink_to(outside)
    job = api.apply(plan)
    assert result_for(job, plan, linked.volume)["outcome"] == "deleted"
    assert result_for(job, plan, swapped.volume)["outcome"] == "deleted"
    assert_dind_gone(slab, linked)
    assert_dind_gone(slab, swapped)
    assert os.stat(keep / "shared.bin").st_nlink == 1
    refused(api.delete_volume(mounted.volume), "in_use", os.fsdecode(at_data))
    refused(api.delete_volume(rooted.volume), "in_use", os.fsdecode(at_root))
    guarded.assert_intact()
    assert {mounted.volume, rooted.volume} <= volume_names(slab)


def test_attack_a_container_made_after_the_plan(slab: Lab, api: Api, guarded: Guarded) -> None:
    """A container created after the plan that bind-mounts a nested subvolume of a
    planned volume, another that uses a planned volume by name: both actions skipped as
    in use when they come; the plain leak goes."""
    bound = slab.seed_dind_volume()
    used = slab.seed_dind_volume()
    leak = slab.seed_orphan_subvolume()
    names = (bound.volume, used.volume, leak.name)
    plan = api.plan(**{**BROAD, "finding_ids": [finding_for(api, n)["id"] for n in names]})
    tag = secrets.token_hex(3)
    made = [f"late-bind-{tag}", f"late-use-{tag}"]
    try:
        nested = bound.inner_container_subvolumes[1]
        slab.docker("create", "--name", made[0], "-v", f"{nested}:/d", BUSYBOX_IMAGE, "true")
        late = slab.docker(
            "create", "--name", made[1], "-v", f"{used.volume}:/d", BUSYBOX_IMAGE, "true"
        ).stdout.strip()
        guarded.add(bound.mountpoint, used.mountpoint)
        job = api.apply(plan)
        for name, who in zip(names[:2], (made[0], late[:12]), strict=True):
            result = result_for(job, plan, name)
            assert result["outcome"] == "skipped" and result["detail"].startswith("in_use:"), result
            assert who in result["detail"], result
        assert result_for(job, plan, leak.name)["outcome"] == "deleted"
        guarded.assert_intact()
    finally:
        slab.docker("rm", "-f", *made, check=False)


def test_attack_subvolumes_inside_layers(
    slab: Lab, api: Api, guarded: Guarded, tmp_path: Path
) -> None:
    """A docker-in-docker container run without a volume keeps its daemon's subvolumes in
    its own container layer; stopped, nothing mounts them. Such a subvolume (one in a
    stopped container's layer) is refused as protected by a direct DELETE and left by a
    broad plan while the plain leak goes. With the agent's default age floor, a
    subvolume made just now in an orphan layer (Docker may be writing the layer) is
    refused as too young."""
    tag = secrets.token_hex(3)
    cid = slab.docker("create", "--name", f"held-{tag}", BUSYBOX_IMAGE, "true").stdout.strip()
    made: list[bytes] = []
    try:
        _, layer = slab._container_layers(cid)
        in_layer = subvolume(layer / "var-lib-docker")
        made.append(in_layer)
        guarded.add(in_layer)
        leak = slab.seed_orphan_subvolume()
        slab.settle()
        refused(api.delete_subvolume(rootid(in_layer)), "protected", "a Docker layer")
        api.broad()
        assert not leak.exists()
        guarded.assert_intact()
        # an orphan layer Docker may be writing, holding a subvolume
        young = slab.seed_orphan_subvolume()
        in_young = subvolume(young / "inner")
        made += [in_young, os.fsencode(young)]
        guarded.add(in_young)
        slab.settle()
        default = Api(
            make_app(slab, tmp_path / "default", orphan_min_age_seconds=None).test_client(), slab
        )
        refused(default.delete_subvolume(rootid(in_young)), "too_young", "inside orphan layer")
        refused(default.delete_subvolume(rootid(young)), "too_young", "orphan layer")
        guarded.assert_intact()
    finally:
        for p in reversed(made):
            run("btrfs", "subvolume", "delete", p, check=False)
        slab.docker("rm", "-f", cid, check=False)


# =========================================================================== held open


@contextlib.contextmanager
def holding(*commands: tuple[str, Path]) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes started here, each a shell command run in a folder (``(command, cwd)``)
    that prints ``ready`` once it holds what it should; ended by pid afterwards."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for command, cwd in commands:
            proc = subprocess.Popen(
                ["sh", "-c", f"{command} && echo ready && exec sleep 600"],
                cwd=cwd,
                stdout=subprocess.PIPE,
            )
            procs.append(proc)
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_class11_processes_holding_files_inside_targets(
    slab: Lab, api: Api, guarded: Guarded
) -> None:
    """A process whose working folder is inside a nested subvolume of a leaked volume, one
    holding a file of an orphan layer open (``exec 3<file``), and one that starts holding
    a planned orphan's file between plan and apply: ``btrfs subvolume delete`` would
    succeed under them and their data would be gone. All refused as held by a process,
    every byte kept; the plain leak goes."""
    vol = slab.seed_dind_volume()
    orphan = slab.seed_orphan_subvolume()
    late = slab.seed_orphan_subvolume()
    leak = slab.seed_dind_volume()
    leak_orphan = slab.seed_orphan_subvolume()
    nested = vol.inner_container_subvolumes[1]
    (orphan / "held.bin").write_bytes(secrets.token_bytes(4000))
    (late / "held.bin").write_bytes(secrets.token_bytes(4000))
    slab.settle()
    guarded.add(vol.mountpoint, orphan, late)
    with holding(("true", nested), (f"exec 3< '{orphan}/held.bin'", slab.root)) as (cwd, fd):
        plan = api.plan(**BROAD)
        reason = skip_for(plan, finding_for(api, vol.volume))
        assert reason.startswith("held_by_process:") and f"pid {cwd.pid} " in reason, reason
        assert os.fsdecode(nested) in reason, reason
        reason = skip_for(plan, finding_for(api, orphan.name))
        assert reason.startswith("held_by_process:") and f"pid {fd.pid} " in reason, reason
        assert "open file" in reason and str(orphan / "held.bin") in reason, reason
        assert action_for(plan, late.name) is not None
        with holding((f"exec 4< '{late}/held.bin'", slab.root)) as (arrived,):
            job = api.apply(plan)
            result = result_for(job, plan, late.name)
            assert result["outcome"] == "skipped", result
            assert result["detail"].startswith("held_by_process:"), result
            assert f"pid {arrived.pid} " in result["detail"], result
            refused(api.delete_subvolume(rootid(late)), "held_by_process", f"pid {arrived.pid} ")
        assert result_for(job, plan, leak.volume)["outcome"] == "deleted"
        assert result_for(job, plan, leak_orphan.name)["outcome"] == "deleted"
        refused(api.delete_volume(vol.volume), "held_by_process", f"pid {cwd.pid} ")
        refused(api.delete_subvolume(rootid(nested)), "held_by_process", f"pid {cwd.pid} ")
        refused(api.delete_subvolume(rootid(orphan)), "held_by_process", f"pid {fd.pid} ")
        guarded.assert_intact()
    assert vol.volume in volume_names(slab) and orphan.exists() and late.exists()
    assert_dind_gone(slab, leak)
    assert not leak_orphan.exists()
    assert api.get("/v1/audit/verify")["ok"] is True


@contextlib.contextmanager
def loop_filesystem(image: Path, at: Path) -> Iterator[str]:
    """An ext4 filesystem in the file ``image`` on a loop device of its own, mounted at
    ``at`` with a few files; unmounted and the device detached afterwards. Yields the
    device."""
    run("truncate", "-s", "16M", image)
    run("mkfs.ext4", "-q", "-F", image)
    device = run("losetup", "--find", "--show", image).stdout.decode().strip()
    try:
        at.mkdir(parents=True, exist_ok=True)
        run("mount", device, at)
        try:
            for i in range(3):
                (at / f"f{i}").write_bytes(secrets.token_bytes(2000 + i))
            yield device
        finally:
            run("umount", at)
    finally:
        run("losetup", "-d", device)


def test_class12_a_loop_device_backed_by_a_file_inside_targets(
    slab: Lab, api: Api, guarded: Guarded
) -> None:
    """A loop device whose backing file is in an orphan layer, another whose file is in
    a nested subvolume of a leaked volume, each with a filesystem mounted under the
    lab's folder: the mount table shows ``/dev/loopN`` there, not the file, and
    deleting the subvolume would destroy a mounted filesystem's image. Both refused as
    held by the kernel, the mounted files intact; the plain leak goes."""
    tag = secrets.token_hex(3)
    vol = slab.seed_dind_volume()
    orphan = slab.seed_orphan_subvolume()
    leak = slab.seed_dind_volume()
    leak_orphan = slab.seed_orphan_subvolume()
    nested = vol.inner_container_subvolumes[0]
    with (
        loop_filesystem(orphan / "disk.img", slab.root / f"loop-a-{tag}") as dev_a,
        loop_filesystem(nested / "disk.img", slab.root / f"loop-b-{tag}") as dev_b,
    ):
        slab.settle()
        guarded.add(slab.root / f"loop-a-{tag}", slab.root / f"loop-b-{tag}")
        plan, job = api.broad()
        for name, dev, image in ((orphan.name, dev_a, orphan), (vol.volume, dev_b, nested)):
            reason = skip_for(plan, finding_for(api, name))
            assert reason.startswith("held_by_kernel:") and f"loop device {dev} " in reason
            assert str(image / "disk.img") in reason, reason
        assert result_for(job, plan, leak.volume)["outcome"] == "deleted"
        assert result_for(job, plan, leak_orphan.name)["outcome"] == "deleted"
        refused(api.delete_volume(vol.volume), "held_by_kernel", f"loop device {dev_b} ")
        refused(api.delete_subvolume(rootid(nested)), "held_by_kernel", f"loop device {dev_b} ")
        refused(api.delete_subvolume(rootid(orphan)), "held_by_kernel", f"loop device {dev_a} ")
        guarded.assert_intact()
        assert (orphan / "disk.img").is_file() and (nested / "disk.img").is_file()
    assert vol.volume in volume_names(slab) and orphan.exists()
    assert_dind_gone(slab, leak)
    assert not leak_orphan.exists()


# ====================================================================== layer folders


def test_layers_that_are_plain_folders(
    slab: Lab, api: Api, guarded: Guarded, tmp_path: Path
) -> None:
    """What copying Docker's data root leaves, made for real: a plain folder in
    ``btrfs/subvolumes/`` that no layer references is an ``orphan-layer-folder`` finding
    and a broad plan removes it; an imported image's layer replaced by a plain folder of
    the same files (what ``cp -a`` of ``@docker`` makes of a subvolume) is a
    ``layer-folder`` finding, blocked as protected, skipped by the plan and intact byte
    for byte after the apply."""
    tag = secrets.token_hex(3)
    plain = slab.layer_dir / secrets.token_hex(32)
    (plain / "usr" / "lib").mkdir(parents=True)
    for i in range(3):
        (plain / "usr" / "lib" / f"lib{i}.so").write_bytes(secrets.token_bytes(3000 + i))
    # an image of one layer, then that layer made a plain folder holding the same files
    data = secrets.token_bytes(1 << 20)
    image = f"moved-{tag}"
    before = set(os.listdir(slab.layer_dir))
    slab.docker("import", "-", image, input=tar_of_big(data))
    (name,) = set(os.listdir(slab.layer_dir)) - before - {plain.name}
    layer = slab.layer_dir / name
    assert name in slab.layer_refs()
    copy = tmp_path / "copy"
    run("cp", "-a", layer, copy)
    run("btrfs", "subvolume", "delete", layer)
    run("cp", "-a", copy, layer)
    assert rootid(layer) == rootid(slab.layer_dir), "the layer must be a plain folder now"
    guarded.add(layer)
    slab.settle()
    try:
        found = {
            f["target"]["path"]: f
            for f in api.findings()
            if f["kind"] in ("orphan-layer-folder", "layer-folder")
        }
        orphan, referenced = found[str(plain)], found[str(layer)]
        assert orphan["kind"] == "orphan-layer-folder" and orphan["blocked_by"] == [], orphan
        assert referenced["kind"] == "layer-folder", referenced
        assert referenced["blocked_by"][0].startswith("protected:"), referenced
        assert any("invalid argument" in e for e in referenced["evidence"]), referenced
        plan = api.plan(**BROAD)
        assert action_for(plan, plain.name) is not None
        assert action_for(plan, name) is None
        assert skip_for(plan, referenced).startswith("protected:")
        job = api.apply(plan)
        assert result_for(job, plan, plain.name)["outcome"] == "deleted", job
        assert not plain.exists()
        assert (layer / "big").read_bytes() == data
        guarded.assert_intact()
        assert name in slab.layer_refs()
    finally:
        # put a subvolume back in the layer's place so that Docker can remove the image
        run("rm", "-rf", layer)
        subvolume(layer, files=0)
        run("cp", "-a", f"{copy}/.", layer)
        slab.docker("image", "rm", image)


# ================================================================ binds through symlinks


def test_attack_stopped_containers_binding_volumes_through_symlinks(
    slab: Lab, api: Api, guarded: Guarded
) -> None:
    """Created (never started) containers bind-mount leaked volumes through real
    symlinks in a host folder: an absolute link to one volume's data, a relative link
    as a middle component of the other's source. Docker keeps each source as written;
    the agent resolves it on the host and both volumes are in use. A third container
    binding through a dangling link blocks every delete, saying why, until it goes. The
    plain leaks go."""
    j = slab.seed_dind_volume()
    j2 = slab.seed_dind_volume()
    leak = slab.seed_dind_volume()
    links = slab.root / f"links-{secrets.token_hex(3)}"
    links.mkdir()
    os.symlink(j.mountpoint, links / "ci")  # absolute
    os.symlink(os.path.relpath(j2.mountpoint.parent, links), links / "rel")  # relative
    os.symlink(slab.root / "not-made-yet", links / "dangling")
    tag = secrets.token_hex(3)
    names = [f"via-link-{tag}", f"via-rel-{tag}", f"via-dangling-{tag}"]
    try:
        slab.docker("create", "--name", names[0], "-v", f"{links}/ci:/d", BUSYBOX_IMAGE, "true")
        slab.docker(
            "create", "--name", names[1], "-v", f"{links}/rel/_data:/d", BUSYBOX_IMAGE, "true"
        )
        # Docker keeps the sources as written: nothing but the agent's resolving sees them
        sources = slab.docker("inspect", "-f", "{{range .Mounts}}{{.Source}}{{end}}", *names[:2])
        assert sources.stdout.split() == [f"{links}/ci", f"{links}/rel/_data"]
        guarded.add(j.mountpoint, j2.mountpoint)

        plan, job = api.broad()
        assert {j.volume, j2.volume} <= volume_names(slab), "a volume in use was removed"
        for vol, who in ((j, names[0]), (j2, names[1])):
            reason = skip_for(plan, finding_for(api, vol.volume))
            assert reason.startswith("in_use:") and f"container {who} (stopped)" in reason
            assert f"resolves to {vol.mountpoint}" in reason, reason
            refused(api.delete_volume(vol.volume), "in_use", who, "resolves to")
        assert result_for(job, plan, leak.volume)["outcome"] == "deleted"
        assert_dind_gone(slab, leak)

        later = slab.seed_dind_volume()
        slab.docker(
            "create", "--name", names[2], "-v", f"{links}/dangling/x:/d", BUSYBOX_IMAGE, "true"
        )
        refused(
            api.delete_volume(later.volume), "in_use", names[2], "cannot be resolved", "dangling"
        )
        assert later.volume in volume_names(slab)
        slab.docker("rm", "-f", names[2])
        status, body = api.delete_volume(later.volume)
        assert status == 200, body
        assert_dind_gone(slab, later)
        guarded.assert_intact()
        assert {j.volume, j2.volume} <= volume_names(slab)
    finally:
        slab.docker("rm", "-f", *names, check=False)


# ====================================================== resuming a named dind volume


def test_resuming_a_named_dind_volume_whose_subvolumes_all_went_finishes_it(
    slab: Lab, tmp_path: Path, guarded: Guarded
) -> None:
    """A plan names the named docker-in-docker volume ``ci-resume-*``; the agent is cut
    short after every nested subvolume went and before ``docker volume rm`` (emulated:
    the job is left ``running`` with its action audited as started, and the subvolumes
    are deleted with btrfs-progs as that attempt did). A new agent on the same state
    directory reads the job interrupted, and applying the plan again finishes it: the
    inner daemon's plain files and the volume go. A second named volume emptied by
    other hands, planned afresh, stays (a named volume holding nothing)."""
    name = f"ci-resume-{secrets.token_hex(3)}"
    other = f"ci-other-{secrets.token_hex(3)}"
    for n in (name, other):
        slab.docker("volume", "create", n)
    cache = slab.seed_dind_volume(volume=name)
    emptied = slab.seed_dind_volume(volume=other)
    state = tmp_path / "state"
    api = Api(make_app(slab, state).test_client(), slab)
    plan = api.plan(**{**BROAD, "finding_ids": [finding_for(api, name)["id"]]})
    other_plan = api.plan(**{**BROAD, "finding_ids": [finding_for(api, other)["id"]]})
    action = action_for(plan, name)
    assert action is not None and action["op"] == "remove_volume"
    rt = api.client.application.extensions["nas_janitor"].runtime
    job, _ = rt.state.create_job_for_plan(
        job_id="r" * 32,
        plan_id=plan["id"],
        idempotency_key=None,
        body={"total": 1, "audit_from": rt.audit.head_entry()[0]},
        state="running",
    )
    rt.audit.append(
        actor="cleaner",
        action="remove_volume",
        target=f"volume {name}",
        outcome="started",
        detail={"job_id": job.id, "seq": action["seq"]},
    )
    for vol in (cache, emptied):  # what the first attempt (or other hands) did
        for p in vol.subvolumes:
            run("btrfs", "property", "set", p, "ro", "false")
        for p in sorted(vol.subvolumes, key=lambda p: len(p.parts), reverse=True):
            run("btrfs", "subvolume", "delete", p)
    assert any(cache.mountpoint.iterdir()), "the inner daemon's plain files are left"
    slab.settle()

    again = Api(make_app(slab, state).test_client(), slab)
    assert again.get(f"/v1/jobs/{job.id}")["state"] == "interrupted"
    done = again.apply(plan)
    assert done["id"] == job.id and done["state"] == "succeeded", done["results"]
    assert name not in volume_names(slab)
    assert not cache.mountpoint.parent.exists()

    fresh = again.apply(other_plan)
    [result] = fresh["results"]
    assert result["outcome"] == "skipped" and result["detail"].startswith("protected:"), result
    assert "named volume holding no btrfs subvolume" in result["detail"]
    assert other in volume_names(slab) and emptied.mountpoint.is_dir()
    guarded.assert_intact()
    slab.docker("volume", "rm", other)


# ============================================== the volumes folder on another filesystem


def test_attack_dockers_volumes_folder_on_another_filesystem(
    slab: Lab, api: Api, guarded: Guarded, tmp_path: Path
) -> None:
    """An ext4 filesystem (an image on a loop device of its own) mounted over Docker's
    ``<data_root>/volumes`` (a NAS owner moving volumes to another disk), and Docker
    making volumes there: an anonymous one no container uses, with files, and a named
    one. Their folders lie on ext4, not on the btrfs filesystem their paths are on:
    every plan skips them and every direct DELETE is refused as protected, and nothing
    on the ext4 filesystem is touched (every file, the volumes' own too)."""
    volumes = Path(slab.docker("info", "-f", "{{.DockerRootDir}}").stdout.strip()) / "volumes"
    made: list[str] = []
    with loop_filesystem(tmp_path / "ext4.img", volumes) as device:
        try:
            anon = slab.docker("volume", "create").stdout.strip()
            named = f"on-ext4-{secrets.token_hex(3)}"
            slab.docker("volume", "create", named)
            made += [anon, named]
            for n in made:
                data = volumes / n / "_data"
                assert data.is_dir(), data
                (data / "library.db").write_bytes(secrets.token_bytes(5000))
            assert (
                run("findmnt", "-n", "-o", "FSTYPE", "--target", volumes / anon).stdout.strip()
                == b"ext4"
            )
            slab.settle()
            on_ext4 = Guarded()  # the btrfs volumes folder is hidden under it meanwhile
            on_ext4.add(volumes)

            plan, _job = api.broad()
            for n in made:
                assert action_for(plan, n) is None, plan
            # the anonymous one is a dangling-volume finding, blocked for where it lies
            [f] = [f for f in api.findings() if f["target"]["name"] == anon]
            reason = skip_for(plan, f)
            assert reason.startswith("protected:"), reason
            assert "not on the btrfs filesystem" in reason and device in reason, reason
            refused(api.delete_volume(anon), "protected", "not on the btrfs filesystem", device)
            # the named one is refused too (first as a named volume holding nothing)
            refused(api.delete_volume(named), "protected")
            assert anon in [f["target"]["name"] for f in api.findings()]
            assert set(made) <= volume_names(slab)
            on_ext4.assert_intact()
        finally:
            for n in made:
                slab.docker("volume", "rm", n, check=False)
    guarded.assert_intact()  # and what the ext4 filesystem hid


# ======================================== the layers folder while no layer record is read


def test_attack_the_layers_folder_while_dockers_layer_records_cannot_be_read(
    slab: Lab, api: Api, guarded: Guarded
) -> None:
    """Docker's layer records (``image/btrfs/layerdb``) cannot be read (moved aside
    for a moment, as on a fresh daemon's first pull none exist yet): a layer being
    written cannot be told from an orphan. An orphan seeded before, and an image's
    real layer, are neither planned nor deleted directly (``protected``); with the
    records back the orphan is an orphan again."""
    orphan = slab.seed_orphan_subvolume()
    layer = slab.seeded.never_touch.images[0].layer_subvolumes[-1]
    assert finding_for(api, orphan.name)["kind"] == "orphan-layer"  # the control
    layerdb = slab.data_root / "image" / "btrfs" / "layerdb"
    aside = layerdb.with_name(f"layerdb-aside-{secrets.token_hex(3)}")
    guarded.add(orphan)
    os.rename(layerdb, aside)
    try:
        plan, _job = api.broad()
        planned = {a["target"].get("path") for a in plan["actions"]}
        assert str(orphan) not in planned and str(layer) not in planned, planned
        for path in (orphan, layer):
            refused(api.delete_subvolume(rootid(path)), "protected", "layer records")
        assert orphan.exists() and layer.exists()
    finally:
        os.rename(aside, layerdb)
    guarded.assert_intact()
    slab.settle()
    assert finding_for(api, orphan.name)["kind"] == "orphan-layer"
