"""The fakes behave like the real tools, as the lab showed them (lab.md, the captures).

Other tests trust these fakes to stand for btrfs and Docker, so their rules are pinned
down here: what ``btrfs subvolume delete`` refuses and why, what dockerd's volume removal
leaves behind, what Docker's layer records reference.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.errors import (
    BtrfsCommandError,
    BtrfsUnavailable,
    DockerUnavailable,
    HoldersUnavailable,
    InUse,
    NotFound,
    ToolFailed,
)
from agent.host.backend import Btrfs, Docker
from agent.host.records import DeleteResult, LayerRefs
from tests.fakes import (
    DEFAULT_SUBVOLUME,
    ENOENT,
    ENOTEMPTY,
    EPERM,
    EROFS,
    NOT_ON_BTRFS,
    NOT_SUBVOLUME,
    TOP_LEVEL,
    FakeBtrfs,
    FakeDocker,
    KiB,
    MiB,
    make_leak_scenario,
)

V = "/volume1"


@pytest.fixture
def fs() -> FakeBtrfs:
    fake = FakeBtrfs()
    fake.add_filesystem(mount=V, uuid="fb415bf3-dfe2-46e7-965f-840f6fe01817")
    fake.create_subvolume(f"{V}/docker")
    return fake


# --------------------------------------------------------------------------- Protocols


@pytest.mark.parametrize(("fake", "protocol"), [(FakeBtrfs, Btrfs), (FakeDocker, Docker)])
def test_fakes_have_every_protocol_method_with_its_parameters(
    fake: type[object], protocol: type[object]
) -> None:
    members = [
        name
        for name, value in vars(protocol).items()
        if callable(value) and not name.startswith("_")
    ]
    assert members, "the protocol lists no methods?"
    for name in members:
        want = list(inspect.signature(getattr(protocol, name)).parameters)
        got = list(inspect.signature(getattr(fake, name)).parameters)
        assert got == want, name


def test_fakes_type_check_as_the_protocols() -> None:
    btrfs: Btrfs = FakeBtrfs()  # mypy checks these assignments
    docker: Docker = FakeDocker()
    assert btrfs.kernel_release() and docker.info().storage_driver == "btrfs"


# --------------------------------------------------------------------------- btrfs listing


def test_ids_parents_and_paths_as_the_kernel_gives_them(fs: FakeBtrfs) -> None:
    fs.create_subvolume(f"{V}/docker/btrfs/subvolumes/layer")
    fs.create_subvolume(f"{V}/docker/volumes/v/_data/btrfs/subvolumes/inner")
    fs.create_subvolume(f"{V}/docker/volumes/v/_data/btrfs/subvolumes/inner/nested")

    records = fs.list_subvolumes(V)
    listed = {r.path: r for r in records}

    assert [r.id for r in records] == [256, 257, 258, 259]
    assert listed["docker"].parent_id == TOP_LEVEL
    # plain folders do not count: the parent is the subvolume whose tree holds it
    assert listed["docker/btrfs/subvolumes/layer"].parent_id == 256
    assert listed["docker/volumes/v/_data/btrfs/subvolumes/inner"].parent_id == 256
    assert listed["docker/volumes/v/_data/btrfs/subvolumes/inner/nested"].parent_id == 258
    assert len({r.uuid for r in listed.values()}) == 4
    assert all(r.created_at == fs.now and not r.read_only for r in records)
    assert fs.calls_to("tree search") == [(V,)]  # an ioctl, not a process


def test_a_new_name_moves_the_ctime_and_ctransid_of_the_subvolume_holding_it(
    fs: FakeBtrfs,
) -> None:
    docker = fs.subvolume(f"{V}/docker")
    assert docker is not None
    before = next(r for r in fs.list_subvolumes(V) if r.id == docker.id)
    fs.now += timedelta(hours=1)
    fs.make_dirs(f"{V}/docker/new-folder")
    after = next(r for r in fs.list_subvolumes(V) if r.id == docker.id)
    assert before.changed_at is not None and after.changed_at == before.changed_at + timedelta(
        hours=1
    )
    assert before.ctransid is not None and after.ctransid is not None
    assert after.ctransid > before.ctransid and after.generation == after.ctransid
    assert after.created_at == before.created_at


def test_a_path_the_kernel_cannot_give_is_listed_as_none(fs: FakeBtrfs) -> None:
    deep = fs.create_subvolume(f"{V}/docker/deep")
    fs.hide_path(f"{V}/docker/deep")
    [rec] = [r for r in fs.list_subvolumes(V) if r.id == deep.id]
    assert rec.path is None and rec.parent_id == 256


def test_a_subvolume_made_before_linux_3_6_is_listed_without_uuids_or_times(
    fs: FakeBtrfs,
) -> None:
    old = fs.create_subvolume(f"{V}/docker/old")
    fs.make_legacy(f"{V}/docker/old")
    [rec] = [r for r in fs.list_subvolumes(V) if r.id == old.id]
    assert (rec.uuid, rec.parent_uuid, rec.created_at, rec.changed_at, rec.ctransid) == (
        None,
        None,
        None,
        None,
        None,
    )
    assert rec.generation == old.generation and rec.path == "docker/old"
    assert fs.created_at(f"{V}/docker/old") is None


def test_a_folder_time_forgotten_until_the_next_change(fs: FakeBtrfs) -> None:
    fs.make_dirs(f"{V}/docker/layers/a")
    fs.forget_folder_time(f"{V}/docker/layers/a")
    assert [e.changed_at for e in fs.plain_folders(f"{V}/docker/layers")] == [None]
    fs.now += timedelta(minutes=5)
    fs.make_dirs(f"{V}/docker/layers/a/etc")
    assert [e.changed_at for e in fs.plain_folders(f"{V}/docker/layers")] == [fs.now]
    with pytest.raises(ValueError, match="not a plain folder"):
        fs.forget_folder_time(f"{V}/docker")


def test_a_new_child_moves_the_generation_of_the_subvolume_holding_it(fs: FakeBtrfs) -> None:
    before = fs.subvolume(f"{V}/docker")
    assert before is not None
    gen = before.generation
    child = fs.create_subvolume(f"{V}/docker/a/b")
    assert child.generation == child.cgen > gen
    assert before.generation == child.generation
    assert fs.touch(f"{V}/docker/a/b/file") > child.cgen


def test_snapshots_carry_their_source_uuid(fs: FakeBtrfs) -> None:
    base = fs.create_subvolume(f"{V}/docker/base")
    snap = fs.create_subvolume(f"{V}/docker/snap", snapshot_of=f"{V}/docker/base")
    assert snap.parent_uuid == base.uuid and base.parent_uuid is None


def test_read_only_flags_qgroups_and_default(fs: FakeBtrfs) -> None:
    ro = fs.create_subvolume(f"{V}/docker/ro", read_only=True, exclusive_bytes=8 * MiB)
    assert {r.id for r in fs.list_subvolumes(V) if r.read_only} == {ro.id}
    groups = fs.qgroups(V)
    assert groups is not None and groups[ro.id].exclusive == 8 * MiB and TOP_LEVEL in groups
    assert not groups.inconsistent and not groups.rescanning
    fs.set_quota_inconsistent(V)
    groups = fs.qgroups(V)
    assert groups is not None and groups.inconsistent
    fs.enable_quota(V, False)
    assert fs.qgroups(V) is None
    assert fs.default_subvolume(V) == TOP_LEVEL
    fs.set_default(f"{V}/docker")
    assert fs.default_subvolume(V) == 256


# --------------------------------------------------------------------------- btrfs delete


def test_one_process_per_batch_which_goes_on_past_bad_paths(fs: FakeBtrfs) -> None:
    fs.create_subvolume(f"{V}/docker/q")
    fs.create_subvolume(f"{V}/docker/q/c")
    batch = [f"{V}/docker/missing", f"{V}/docker/q", f"{V}/docker/q/c", f"{V}/docker/q"]

    results = fs.delete(batch)

    assert results == [
        DeleteResult(f"{V}/docker/missing", ok=False, error=ENOENT),
        DeleteResult(f"{V}/docker/q", ok=False, error=ENOTEMPTY),
        DeleteResult(f"{V}/docker/q/c", ok=True),
        DeleteResult(f"{V}/docker/q", ok=True),
    ]
    assert fs.calls_to("subvolume delete") == [tuple(batch)]
    assert [r.path for r in fs.list_subvolumes(V)] == ["docker"]


def test_a_child_of_a_read_only_subvolume_cannot_go_until_the_flag_is_cleared(
    fs: FakeBtrfs,
) -> None:
    fs.create_subvolume(f"{V}/docker/p")
    fs.create_subvolume(f"{V}/docker/p/child")
    fs.set_readonly(f"{V}/docker/p", True)

    assert fs.delete([f"{V}/docker/p/child"])[0].error == EROFS
    assert fs.delete([f"{V}/docker/p"])[0].error == ENOTEMPTY

    fs.set_readonly(f"{V}/docker/p", False)
    assert [r.ok for r in fs.delete([f"{V}/docker/p/child", f"{V}/docker/p"])] == [True, True]
    assert fs.calls_to("property set ro") == [(f"{V}/docker/p",), (f"{V}/docker/p",)]


def test_a_read_only_leaf_deletes_fine(fs: FakeBtrfs) -> None:
    fs.create_subvolume(f"{V}/docker/leaf", read_only=True)
    assert fs.delete([f"{V}/docker/leaf"]) == [DeleteResult(f"{V}/docker/leaf", ok=True)]
    assert fs.subvolume(f"{V}/docker/leaf") is None and not fs.exists(f"{V}/docker/leaf")


def test_folders_the_top_level_and_the_default_subvolume_are_refused(fs: FakeBtrfs) -> None:
    fs.make_dirs(f"{V}/docker/plain")
    fs.create_subvolume(f"{V}/boot")
    fs.set_default(f"{V}/boot")
    results = fs.delete([f"{V}/docker/plain", V, f"{V}/boot", "/elsewhere/x"])
    assert [r.error for r in results] == [NOT_SUBVOLUME, NOT_ON_BTRFS, DEFAULT_SUBVOLUME, ENOENT]
    assert fs.exists(f"{V}/docker/plain") and fs.subvolume(f"{V}/boot") is not None


def test_delete_frees_exclusive_bytes_and_forgets_the_subvolume(fs: FakeBtrfs) -> None:
    sub = fs.create_subvolume(f"{V}/docker/big", exclusive_bytes=40 * MiB, read_only=True)
    fs.make_dirs(f"{V}/docker/big/etc")
    before = fs.usage(V)

    assert fs.delete([f"{V}/docker/big"])[0].ok

    after = fs.usage(V)
    assert before.used_bytes - after.used_bytes == 40 * MiB
    assert after.free_bytes - before.free_bytes == 40 * MiB
    assert after.size_bytes == before.size_bytes
    # Linux 6.11 and later (the fake's default) drop a deleted subvolume's qgroup
    assert sub.id not in (fs.qgroups(V) or {})
    assert sub.id not in {r.id for r in fs.list_subvolumes(V)}
    assert not fs.exists(f"{V}/docker/big/etc")


def test_kernels_before_6_11_keep_a_deleted_subvolumes_qgroup() -> None:
    fs = FakeBtrfs(kernel="4.4.302+")
    fs.add_filesystem(mount=V)
    sub = fs.create_subvolume(f"{V}/docker/old")
    assert fs.delete([f"{V}/docker/old"])[0].ok
    assert sub.id in (fs.qgroups(V) or {}) and sub.id in fs.filesystem_at(V).stale_qgroups
    fs.qgroup_busy = 1
    with pytest.raises(BtrfsCommandError, match="busy"):
        fs.destroy_qgroup(V, sub.id)
    fs.destroy_qgroup(V, sub.id)
    assert sub.id not in (fs.qgroups(V) or {})
    with pytest.raises(BtrfsCommandError, match="No such file"):
        fs.destroy_qgroup(V, sub.id)


@pytest.mark.parametrize(
    ("kernel", "stale"), [("4.4.302+", True), ("6.1.0-28-amd64", True), ("6.11.0", False)]
)
def test_qgroups_of_dropped_subvolumes_stay_before_linux_6_11(kernel: str, stale: bool) -> None:
    fs = FakeBtrfs(kernel=kernel)
    fs.add_filesystem(mount=V)
    sub = fs.create_subvolume(f"{V}/gone", exclusive_bytes=4 * MiB)
    assert fs.delete([f"{V}/gone"])[0].ok
    groups = fs.qgroups(V)
    assert groups is not None
    assert (sub.id in groups) is stale
    if stale:
        assert (groups[sub.id].referenced, groups[sub.id].exclusive) == (0, 0)
    fs.enable_quota(V, False)
    fs.enable_quota(V)
    assert sub.id not in (fs.qgroups(V) or {})  # a new quota tree starts empty


def test_lazy_free_keeps_the_bytes_used_until_sync(fs: FakeBtrfs) -> None:
    fs.lazy_free = True
    fs.create_subvolume(f"{V}/docker/big", exclusive_bytes=40 * MiB)
    used = fs.usage(V).used_bytes
    fs.delete([f"{V}/docker/big"])
    assert fs.usage(V).used_bytes == used
    fs.sync(V)
    assert fs.usage(V).used_bytes == used - 40 * MiB


def test_refused_and_injected_failures(fs: FakeBtrfs) -> None:
    fs.create_subvolume(f"{V}/docker/x")
    fs.refuse_delete(f"{V}/docker/x")
    assert fs.delete([f"{V}/docker/x"])[0].error == EPERM
    fs.refuse_delete(f"{V}/docker/x", "")
    boom = BtrfsCommandError(("btrfs", "subvolume", "delete"), 1, "", "ERROR: boom")
    fs.fail_next("subvolume delete", boom)
    with pytest.raises(BtrfsCommandError):
        fs.delete([f"{V}/docker/x"])
    assert fs.delete([f"{V}/docker/x"])[0].ok


# --------------------------------------------------------------------------- btrfs errors


def test_a_missing_tool_is_unavailable_and_runs_nothing(fs: FakeBtrfs) -> None:
    fs.missing = True
    for call in (
        fs.version,
        lambda: fs.delete([f"{V}/docker"]),
        lambda: fs.usage(V),
        lambda: fs.set_readonly(f"{V}/docker", True),
    ):
        with pytest.raises(BtrfsUnavailable):
            call()
    assert fs.calls == []
    assert fs.mounts()  # /proc/self/mountinfo needs no tool
    # the listings are ioctls: no binary needed
    assert [r.path for r in fs.list_subvolumes(V)] == ["docker"]
    assert fs.qgroups(V) is not None


def test_a_path_on_no_btrfs_is_a_command_error(fs: FakeBtrfs) -> None:
    with pytest.raises(BtrfsCommandError) as caught:
        fs.list_subvolumes("/tmp")
    assert "not a btrfs filesystem" in caught.value.stderr
    with pytest.raises(BtrfsCommandError):
        fs.set_readonly(f"{V}/docker/nothing", True)
    fs.make_dirs(f"{V}/docker/plain")
    with pytest.raises(BtrfsCommandError):
        fs.set_readonly(f"{V}/docker/plain", True)


def test_the_kernel_decides_whether_rmdir_removes_subvolumes() -> None:
    assert FakeBtrfs(kernel="6.1.0-28-amd64").rmdir_deletes_subvolumes()
    assert FakeBtrfs(kernel="4.18.0").rmdir_deletes_subvolumes()
    assert not FakeBtrfs(kernel="4.4.302+").rmdir_deletes_subvolumes()


def test_created_at_only_when_supported(fs: FakeBtrfs) -> None:
    sub = fs.create_subvolume(f"{V}/docker/x", created_at=fs.now - timedelta(days=2))
    assert fs.created_at(f"{V}/docker/x") == sub.created_at
    assert fs.created_at(f"{V}/docker/missing") is None
    fs.created_at_supported = False
    assert fs.created_at(f"{V}/docker/x") is None


# --------------------------------------------------------------------------- mounts


def test_mounts_and_paths_through_subvolume_and_bind_mounts(fs: FakeBtrfs) -> None:
    fs.create_subvolume(f"{V}/docker/btrfs/subvolumes/layer")
    sub_mount = fs.mount_subvolume(f"{V}/docker", "/var/lib/docker")
    bind = fs.bind_mount(f"{V}/docker/btrfs", f"{V}/docker/btrfs")

    assert fs.mounts()[0].root == "/" and "subvolid=5" in fs.mounts()[0].options
    assert sub_mount.root == "/docker" and "subvolid=256,subvol=/docker" in sub_mount.options
    assert bind.root == "/docker/btrfs" and "subvolid=256" in bind.options
    # the same subvolume, whichever way it is reached
    via_top = fs.subvolume(f"{V}/docker/btrfs/subvolumes/layer")
    assert via_top is fs.subvolume("/var/lib/docker/btrfs/subvolumes/layer")
    assert fs.filesystem("/var/lib/docker").uuid == fs.filesystem(V).uuid
    assert fs.subvolume_paths(f"{V}/docker") == [f"{V}/docker/btrfs/subvolumes/layer"]


def test_deleting_a_mounted_subvolume_takes_its_mounts_along(fs: FakeBtrfs) -> None:
    # measured on Linux 6: no EBUSY, the mount disappears with the subvolume
    fs.create_subvolume(f"{V}/t2")
    fs.mount_subvolume(f"{V}/t2", "/mnt/t2")
    assert fs.delete([f"{V}/t2"])[0].ok
    assert all(m.mountpoint != "/mnt/t2" for m in fs.mounts())


def test_what_is_held_open_and_what_a_delete_destroys_under_it(fs: FakeBtrfs) -> None:
    """Like the kernel: a delete succeeds under a holder (``btrfs subvolume delete``
    does on a subvolume with open files); the fake records the loss."""
    fs.create_subvolume(f"{V}/docker/held")
    fs.create_subvolume(f"{V}/docker/img")
    fs.hold(f"{V}/docker/held/db", "pid 9 (db), open file")
    fs.back_loop(f"{V}/docker/img/disk.img", "/dev/loop3")
    held = fs.holders()
    (table,) = held.tables
    assert [(h.path, h.who) for h in table.held] == [
        (f"{V}/docker/held/db", "pid 9 (db), open file")
    ]
    assert [h.who for h in held.everywhere] == ["loop device /dev/loop3 (its backing file)"]
    assert any(m.mountpoint == V for m in table.mounts)  # to place by
    assert fs.delete([f"{V}/docker/held"])[0].ok
    assert fs.lost_held == [f"{V}/docker/held/db"]
    fs.release(f"{V}/docker/img/disk.img")
    assert fs.holders().everywhere == ()
    fs.holders_error = "cannot read what pid 1 holds (fd): Permission denied"
    with pytest.raises(HoldersUnavailable, match="pid 1"):
        fs.holders()


def test_several_filesystems() -> None:
    fs = FakeBtrfs()
    one = fs.add_filesystem(mount="/volume1")
    two = fs.add_filesystem(mount="/volume2", quota=False)
    fs.create_subvolume("/volume2/a")
    assert one.uuid != two.uuid and fs.filesystem("/volume2/a").uuid == two.uuid
    assert fs.list_subvolumes("/volume1") == []
    assert [r.id for r in fs.list_subvolumes("/volume2")] == [256]
    assert fs.qgroups("/volume2") is None and fs.qgroups("/volume1") is not None


# --------------------------------------------------------------------------- rm -rf


def test_rm_rf_on_linux_6_removes_writable_subvolumes_and_stops_at_read_only(
    fs: FakeBtrfs,
) -> None:
    base = f"{V}/docker/volumes/v/_data"
    fs.create_subvolume(f"{base}/a")
    fs.create_subvolume(f"{base}/b", read_only=True)
    fs.create_subvolume(f"{base}/p")
    fs.create_subvolume(f"{base}/p/c")
    fs.set_readonly(f"{base}/p", True)

    error = fs.remove_all(base)

    assert error is not None and "read-only file system" in error
    assert fs.subvolume_paths(base) == [f"{base}/b", f"{base}/p", f"{base}/p/c"]


def test_rm_rf_before_linux_4_18_removes_no_subvolume() -> None:
    fs = FakeBtrfs(kernel="4.4.302+")
    fs.add_filesystem(mount=V)
    fs.create_subvolume(f"{V}/docker/volumes/v/_data/a")
    error = fs.remove_all(f"{V}/docker/volumes/v/_data")
    assert error is not None and "operation not permitted" in error
    assert fs.subvolume_paths() == [f"{V}/docker/volumes/v/_data/a"]


# --------------------------------------------------------------------------- Docker


@pytest.fixture
def docker(fs: FakeBtrfs) -> FakeDocker:
    return FakeDocker(btrfs=fs, data_root=f"{V}/docker")


def test_docker_lists_what_was_added(docker: FakeDocker) -> None:
    image = docker.add_image("busybox", layers=2)
    web = docker.add_container("web", image=image, volumes=["data"])
    anon = docker.add_volume()
    done = docker.add_container("done", running=False, volumes=[anon.name])

    assert docker.info().data_root == f"{V}/docker"
    volumes = {v.name: v for v in docker.volumes()}
    assert set(volumes) == {"data", anon.name}
    assert volumes[anon.name].anonymous and not volumes["data"].anonymous
    assert volumes["data"].mountpoint == f"{V}/docker/volumes/data/_data"
    containers = {c.name: c for c in docker.containers()}
    assert containers["web"].running and containers["web"].volume_names == ("data",)
    assert not containers["done"].running and containers["done"].volume_names == (anon.name,)
    assert containers["web"].image_id == image.id == web.image_id
    assert done.id in {c.id for c in docker.containers()}
    assert docker.calls == ["info", "volumes", "containers", "containers"]


def test_docker_23_labels_anonymous_volumes(fs: FakeBtrfs) -> None:
    docker = FakeDocker(btrfs=fs, anonymous_label=True)
    anon = docker.add_volume()
    assert anon.labels == {"com.docker.volume.anonymous": ""} and anon.anonymous


def test_linked_docker_makes_layer_subvolumes_and_references_them(
    fs: FakeBtrfs, docker: FakeDocker
) -> None:
    image = docker.add_image("busybox", layers=2)
    web = docker.add_container("web", image=image)
    layers = f"{V}/docker/btrfs/subvolumes"

    refs = docker.layer_refs(f"{V}/docker")

    assert refs.image_cache_ids == frozenset(image.cache_ids)
    assert refs.container_mount_ids == {web.mount_id}
    assert refs.container_init_ids == {web.mount_id + "-init"}
    assert sorted(fs.subvolume_paths(layers)) == docker.layer_paths()
    # each layer is a snapshot of the one below, as dockerd's btrfs driver makes them
    init = fs.subvolume(f"{layers}/{web.init_id}")
    top = fs.subvolume(f"{layers}/{image.cache_ids[-1]}")
    assert init is not None and top is not None and init.parent_uuid == top.uuid
    # dockerd bind-mounts its data root and btrfs/ onto themselves
    assert {f"{V}/docker", f"{V}/docker/btrfs"} <= {m.mountpoint for m in fs.mounts()}


def test_removing_a_container_removes_its_layers(fs: FakeBtrfs, docker: FakeDocker) -> None:
    web = docker.add_container("web", volumes=["data"])
    anon = docker.add_volume()
    job = docker.add_container("job", running=False, volumes=[anon.name])

    docker.remove_container("web")
    docker.remove_container(job.id, volumes=True)

    assert fs.subvolume(f"{V}/docker/btrfs/subvolumes/{web.mount_id}") is None
    assert web.mount_id not in docker.layer_refs(f"{V}/docker").container_mount_ids
    assert docker.volume("data") is not None  # docker rm keeps named volumes
    assert docker.volume(anon.name) is None  # docker rm -v removes the anonymous one
    assert not fs.exists(anon.mountpoint)


def test_remove_volume_refuses_one_in_use_even_by_a_stopped_container(
    docker: FakeDocker,
) -> None:
    job = docker.add_container("job", running=False, volumes=["data"])
    with pytest.raises(InUse) as caught:
        docker.remove_volume("data")
    assert caught.value.extra["in_use_by"] == [job.id]
    assert "volume is in use" in caught.value.detail
    assert docker.volume("data") is not None


def test_remove_volume_of_an_unknown_volume(docker: FakeDocker) -> None:
    with pytest.raises(NotFound):
        docker.remove_volume("nope")


def test_remove_volume_removes_it_and_its_folder(fs: FakeBtrfs, docker: FakeDocker) -> None:
    docker.add_volume("data")
    docker.remove_volume("data")
    assert docker.volume("data") is None
    assert not fs.exists(f"{V}/docker/volumes/data")


def test_a_daemon_that_is_down(docker: FakeDocker) -> None:
    docker.add_volume("data")
    docker.down = True
    for call in (docker.ping, docker.info, docker.volumes, docker.containers):
        with pytest.raises(DockerUnavailable):
            call()
    with pytest.raises(DockerUnavailable):
        docker.remove_volume("data")
    # layer records are files, not API: still readable
    assert docker.layer_refs(f"{V}/docker") == LayerRefs()
    docker.down = False
    assert docker.volume("data") is not None


def test_layer_refs_of_other_data_roots(fs: FakeBtrfs, docker: FakeDocker) -> None:
    inner = f"{V}/docker/volumes/v/_data"
    fs.make_dirs(inner)
    assert docker.layer_refs(inner) == LayerRefs()
    docker.set_layer_refs(inner, LayerRefs(image_cache_ids=frozenset({"abc"})))
    assert docker.layer_refs(inner).all == {"abc"}
    with pytest.raises(DockerUnavailable):
        docker.layer_refs("/nowhere/docker")


# --------------------------------------------------------------------------- the scenario


def test_scenario_layer_refs_cover_every_layer_but_the_orphan() -> None:
    s = make_leak_scenario()
    refs = s.docker.layer_refs(s.data_root)
    names = {p.rsplit("/", 1)[1] for p in s.layers}

    assert refs.all == names
    in_layer_folder = s.btrfs.subvolume_paths(f"{s.data_root}/btrfs/subvolumes")
    assert sorted(in_layer_folder) == sorted([*s.layers, s.orphan_layer])
    assert s.orphan_layer.rsplit("/", 1)[1] not in refs.all


def test_scenario_volumes_and_their_users() -> None:
    s = make_leak_scenario()
    volumes = {v.name: v for v in s.docker.volumes()}
    users = {n for c in s.docker.containers() for n in c.volume_names}
    running = {c.id: c.running for c in s.docker.containers()}

    assert set(volumes) == {
        s.dind_volume,
        s.keep_volume,
        s.named_volume,
        s.in_use_volume,
        s.stopped_anonymous_volume,
    }
    assert volumes[s.dind_volume].anonymous and s.dind_volume not in users
    assert volumes[s.stopped_anonymous_volume].anonymous
    assert s.stopped_anonymous_volume in users and not running[s.stopped_container]
    assert s.in_use_volume in users and running[s.running_container]
    assert volumes[s.keep_volume].labels == {"keep": "true"}
    assert not volumes[s.named_volume].anonymous and s.named_volume not in users
    assert all(v.created_at == s.now - timedelta(days=3) for v in volumes.values())


def test_scenario_dind_volume_holds_nested_subvolumes_as_the_lab_does() -> None:
    s = make_leak_scenario()
    fs = s.btrfs
    assert fs.calls == []  # building is not counted
    records = fs.list_subvolumes(s.mount)
    by_path = {f"{s.mount}/{r.path}": r for r in records}
    ro = {r.id for r in records if r.read_only}

    assert fs.subvolume_paths(s.dind_mountpoint) == list(s.dind_nested)
    inner_layers = [p for p in s.dind_nested if p.startswith(f"{s.dind_mountpoint}/btrfs/")]
    assert len(inner_layers) == 5 and s.dind_ro_leaf in inner_layers
    assert {by_path[p].id for p in s.dind_read_only} == ro
    assert by_path[s.dind_ro_parent_child].parent_id == by_path[s.dind_ro_parent].id
    assert by_path[s.dind_ro_leaf].parent_id == by_path[s.data_root].id
    assert s.share not in fs.subvolume_paths(s.data_root)


def test_scenario_docker_volume_rm_half_deletes_the_dind_volume() -> None:
    # lab.md: "docker volume rm <dind volume> fails ... after deleting the other nested
    # subvolumes: the volume is left half-deleted."
    s = make_leak_scenario()
    with pytest.raises(ToolFailed) as caught:
        s.docker.remove_volume(s.dind_volume)
    assert "read-only file system" in caught.value.detail
    assert caught.value.extra["docker_status"] == 500
    assert s.docker.volume(s.dind_volume) is not None
    left = s.btrfs.subvolume_paths(s.dind_mountpoint)
    assert left == [s.dind_ro_leaf, s.dind_ro_parent, s.dind_ro_parent_child]


def test_scenario_on_synology_kernel_docker_removes_no_nested_subvolume() -> None:
    s = make_leak_scenario(kernel="4.4.302+")
    with pytest.raises(ToolFailed) as caught:
        s.docker.remove_volume(s.dind_volume)
    assert "operation not permitted" in caught.value.detail
    assert s.btrfs.subvolume_paths(s.dind_mountpoint) == list(s.dind_nested)


def test_scenario_the_right_fix_children_first_then_docker() -> None:
    s = make_leak_scenario()
    fs = s.btrfs
    used = fs.usage(s.mount).used_bytes
    nested_bytes = sum(
        sub.exclusive_bytes for p in s.dind_nested if (sub := fs.subvolume(p)) is not None
    )

    fs.set_readonly(s.dind_ro_parent, False)
    results = fs.delete(list(reversed(s.dind_nested)))  # children first
    s.docker.remove_volume(s.dind_volume)

    assert all(r.ok for r in results)
    assert fs.calls_to("subvolume delete") == [tuple(reversed(s.dind_nested))]
    assert s.docker.volume(s.dind_volume) is None
    assert not fs.exists(s.dind_mountpoint)
    assert fs.usage(s.mount).used_bytes == used - nested_bytes
    assert nested_bytes >= 8 * MiB + 5 * 16 * KiB
    # nothing else moved
    assert all(fs.subvolume(p) is not None for p in (*s.layers, s.orphan_layer, s.share))


# --------------------------------------------------------------------------- vs real btrfs

_LIST_LINE = re.compile(r"ID (\d+) gen \d+ parent (\d+) top level \d+ path (.+)")


def _btrfs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LC_ALL": "C"}
    return subprocess.run(["btrfs", *args], capture_output=True, text=True, check=check, env=env)


def _real_tree(mount: Path, under: str) -> tuple[dict[str, str | None], set[str]]:
    """Subvolumes below top-level path ``under``: path -> the path of the subvolume
    holding it (None for one held by a subvolume outside), and the read-only ones."""
    rows = [
        _LIST_LINE.fullmatch(line)
        for line in _btrfs("subvolume", "list", "-p", str(mount)).stdout.splitlines()
    ]
    paths = {int(m.group(1)): m.group(3) for m in rows if m}
    parents = {int(m.group(1)): int(m.group(2)) for m in rows if m}
    ro_lines = _btrfs("subvolume", "list", "-r", str(mount)).stdout.splitlines()
    ro = {line.split(" path ", 1)[1] for line in ro_lines if " path " in line}
    mine = {i: p for i, p in paths.items() if p.startswith(under + "/")}
    tree = {p: paths.get(parents[i]) if parents[i] in mine else None for i, p in mine.items()}
    return tree, {p for p in ro if p.startswith(under + "/")}


def _fake_tree(fs: FakeBtrfs, mount: Path, under: str) -> tuple[dict[str, str | None], set[str]]:
    records = fs.list_subvolumes(str(mount))
    paths = {r.id: r.path or "" for r in records}
    mine = {r.id: r for r in records if (r.path or "").startswith(under + "/")}
    tree = {paths[i]: paths[r.parent_id] if r.parent_id in mine else None for i, r in mine.items()}
    ro = {paths[i] for i, r in mine.items() if r.read_only}
    return tree, ro


def _build_both(fs: FakeBtrfs, base: Path, shape: list[tuple[str, str]]) -> None:
    """Make ``shape`` ((kind, relative path): kind is dir, sub, ro-sub, file) for real
    under ``base`` and in the fake."""
    for kind, rel in shape:
        path = base / rel
        if kind == "dir":
            path.mkdir(parents=True)
            fs.make_dirs(str(path))
        elif kind == "file":
            path.write_text("data\n")
            fs.touch(str(path))
        elif kind in ("sub", "empty-sub"):
            path.parent.mkdir(parents=True, exist_ok=True)
            _btrfs("subvolume", "create", str(path))
            fs.create_subvolume(str(path), holds_files=kind == "sub")
            if kind == "sub":
                (path / "bin").write_text("a file\n")
        elif kind == "ro":
            _btrfs("property", "set", str(path), "ro", "true")
            fs.set_readonly(str(path), True)


def _tear_down_real(base: Path) -> None:
    """Whatever is left of ``base``: clear read-only flags, delete children first."""
    if not base.exists():
        return
    mount = base.parent
    tree, ro = _real_tree(mount, base.name)
    for rel in ro:
        _btrfs("property", "set", str(mount / rel), "ro", "false")
    for rel in sorted(tree, key=lambda p: p.count("/"), reverse=True):
        _btrfs("subvolume", "delete", str(mount / rel))
    subprocess.run(["rm", "-rf", str(base)], check=True)


@pytest.fixture
def scratch(lab: Any) -> Iterator[tuple[Path, FakeBtrfs]]:
    """A fresh folder at the top of the lab's filesystem and a fake of the same mount."""
    mount = Path(lab.mnt)
    base = mount / f"nj-fake-conformance-{os.getpid()}-{time.monotonic_ns()}"
    fs = FakeBtrfs(kernel=os.uname().release)
    fs.add_filesystem(mount=str(mount))
    try:
        yield base, fs
    finally:
        _tear_down_real(base)


@pytest.mark.lab
def test_fake_matches_real_btrfs_on_delete(scratch: tuple[Path, FakeBtrfs]) -> None:
    base, fs = scratch
    _build_both(
        fs,
        base,
        [
            ("dir", "plain/x"),
            ("sub", "q"),
            ("sub", "q/c"),
            ("sub", "p"),
            ("sub", "p/child"),
            ("ro", "p"),
            ("sub", "leaf"),
            ("ro", "leaf"),
            ("sub", "vol/_data/btrfs/subvolumes/layer"),
        ],
    )
    mount = base.parent
    assert _fake_tree(fs, mount, base.name) == _real_tree(mount, base.name)

    steps = ["missing", "q", "q/c", "q", "p/child", "p", "leaf", "plain", "plain/x"]
    for step in [*steps, "unset-ro p", "p/child", "p", "vol/_data/btrfs/subvolumes/layer"]:
        if step.startswith("unset-ro "):
            target = str(base / step.split()[1])
            _btrfs("property", "set", target, "ro", "false")
            fs.set_readonly(target, False)
            continue
        path = str(base / step)
        real = _btrfs("subvolume", "delete", path, check=False)
        fake = fs.delete([path])[0]
        assert fake.ok == (real.returncode == 0 and not os.path.lexists(path)), (step, real)
        if not fake.ok:
            assert fake.error is not None and fake.error.lower() in real.stderr.lower(), (
                step,
                fake.error,
                real.stderr,
            )
        assert _fake_tree(fs, mount, base.name) == _real_tree(mount, base.name), step


@pytest.mark.lab
def test_fake_rm_rf_matches_real_rm_rf(scratch: tuple[Path, FakeBtrfs]) -> None:
    base, fs = scratch
    _build_both(
        fs,
        base,
        [
            ("sub", "v/_data/writable"),
            ("sub", "v/_data/writable/inner"),
            ("sub", "v/_data/ro-leaf"),
            ("ro", "v/_data/ro-leaf"),
            ("empty-sub", "v/_data/ro-empty"),
            ("ro", "v/_data/ro-empty"),
            ("sub", "v/_data/ro-parent"),
            ("sub", "v/_data/ro-parent/child"),
            ("ro", "v/_data/ro-parent"),
            ("dir", "v/_data/plain/deeper"),
            ("file", "v/_data/plain/deeper/f"),
        ],
    )
    target = base / "v" / "_data"
    real = subprocess.run(["rm", "-rf", str(target)], capture_output=True, text=True)
    error = fs.remove_all(str(target))

    assert (real.returncode != 0) == (error is not None)
    assert error is not None and "read-only file system" in error
    assert "Read-only file system" in real.stderr
    mount = base.parent
    assert _fake_tree(fs, mount, base.name) == _real_tree(mount, base.name)
    for rel in ("plain", "writable", "ro-empty", "ro-leaf", "ro-parent"):
        assert fs.exists(str(target / rel)) == (target / rel).exists(), rel
