"""The safety rules over snapshots of the stateful fakes: every rule, and the attack that
would break it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from agent.domain.inventory import Inventory
from agent.domain.safety import (
    check_no_mounts,
    plan_folder_delete,
    plan_qgroup_destroy,
    plan_subvolume_delete,
    plan_volume_delete,
)
from agent.domain.snapshot import Snapshot
from agent.errors import (
    HeldByKernel,
    HeldByProcess,
    HoldersUnavailable,
    HostMountsUnavailable,
    InUse,
    NotFound,
    OutsideRoots,
    Protected,
    TooYoung,
    ValidationFailed,
)
from shared.policy import DEFAULT_PROTECT_LABELS
from tests.agent.http.apphelpers import agent_config
from tests.fakes import LeakScenario, make_leak_scenario

LABELS = DEFAULT_PROTECT_LABELS


def snapshot(sc: LeakScenario, tmp_path: Path, **cfg: object) -> Snapshot:
    inv = Inventory(agent_config(tmp_path, **cfg), btrfs=sc.btrfs, docker=sc.docker)
    return inv.take()


def sub_id(sc: LeakScenario, path: str) -> int:
    sub = sc.btrfs.subvolume(path)
    assert sub is not None, path
    return sub.id


@pytest.fixture
def sc() -> LeakScenario:
    return make_leak_scenario()


def volume(snap: Snapshot, sc: LeakScenario) -> object:
    return plan_volume_delete(snap, sc.dind_volume, protect_labels=LABELS)


def orphan(snap: Snapshot, sc: LeakScenario) -> object:
    return plan_subvolume_delete(
        snap, sc.fs_uuid, sub_id(sc, sc.orphan_layer), protect_labels=LABELS
    )


# --------------------------------------------------------------------------- the plain leak


def test_the_plain_leak_may_go(sc: LeakScenario, tmp_path: Path) -> None:
    snap = snapshot(sc, tmp_path)
    ds = plan_volume_delete(snap, sc.dind_volume, protect_labels=LABELS)
    ids = [s.id for s in ds.subvolumes]
    assert sorted(ids) == sorted(sub_id(sc, p) for p in sc.dind_nested)
    # children first: the read-only parent's child before it
    child, parent = sub_id(sc, sc.dind_ro_parent_child), sub_id(sc, sc.dind_ro_parent)
    assert ids.index(child) < ids.index(parent)
    assert [s.id for s in ds.clear_readonly] == [parent]
    assert ds.guard and ds.guard[0][0] == f"{sc.data_root}/volumes/{sc.dind_volume}"
    assert [s.id for s in orphan(snap, sc).subvolumes] == [sub_id(sc, sc.orphan_layer)]  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- mounts of any type


def _private_tmpfs(sc: LeakScenario, at: str) -> None:
    sc.btrfs.make_dirs(at)
    sc.btrfs.add_private_mount(at)


MOUNTERS: dict[str, Callable[[LeakScenario, str], None]] = {
    "tmpfs": lambda sc, at: sc.btrfs.add_mount(at),
    "tmpfs on the host only": lambda sc, at: sc.btrfs.add_mount(at, host_only=True),
    "bind of a host folder": lambda sc, at: sc.btrfs.add_mount(
        at, fstype="ext4", source="/dev/vda", root="/home/alice/photos"
    ),
    "tmpfs in a mount namespace of its own": lambda sc, at: _private_tmpfs(sc, at),
}


@pytest.mark.parametrize("how", MOUNTERS)
def test_a_mount_inside_a_leaked_volume_blocks_it(
    sc: LeakScenario, tmp_path: Path, how: str
) -> None:
    MOUNTERS[how](sc, f"{sc.dind_ro_parent}/tmp-mount")
    snap = snapshot(sc, tmp_path)
    with pytest.raises(InUse, match="mounted inside"):
        volume(snap, sc)
    # the nested subvolume holding it is blocked on its own too
    with pytest.raises(InUse, match="mounted inside"):
        plan_subvolume_delete(
            snap, sc.fs_uuid, sub_id(sc, sc.dind_ro_parent), protect_labels=LABELS
        )


@pytest.mark.parametrize("how", MOUNTERS)
def test_a_mount_inside_an_orphan_layer_blocks_it(
    sc: LeakScenario, tmp_path: Path, how: str
) -> None:
    MOUNTERS[how](sc, f"{sc.orphan_layer}/run")
    with pytest.raises(InUse, match="mounted inside"):
        orphan(snapshot(sc, tmp_path), sc)


def test_a_mount_on_a_nested_subvolume_blocks_its_volume_and_it(
    sc: LeakScenario, tmp_path: Path
) -> None:
    sc.btrfs.add_mount(sc.dind_ro_leaf)  # something mounted over the subvolume itself
    snap = snapshot(sc, tmp_path)
    with pytest.raises(InUse):
        volume(snap, sc)
    with pytest.raises(Protected, match="mount point"):
        plan_subvolume_delete(snap, sc.fs_uuid, sub_id(sc, sc.dind_ro_leaf), protect_labels=LABELS)


def test_without_every_mount_namespace_nothing_goes(sc: LeakScenario, tmp_path: Path) -> None:
    sc.btrfs.namespace_mounts_error = "cannot read the mount table of pid 4242"
    snap = snapshot(sc, tmp_path)
    assert not snap.mounts.known
    with pytest.raises(HostMountsUnavailable, match="pid 4242"):
        volume(snap, sc)


def test_without_the_hosts_mount_table_nothing_goes(sc: LeakScenario, tmp_path: Path) -> None:
    sc.btrfs.host_mounts_error = "the agent runs in a pid namespace of its own"
    snap = snapshot(sc, tmp_path)
    assert not snap.mounts.known
    with pytest.raises(HostMountsUnavailable, match="pid namespace"):
        volume(snap, sc)
    with pytest.raises(HostMountsUnavailable):
        orphan(snap, sc)


# --------------------------------------------------------------------------- mounted elsewhere


@pytest.mark.parametrize(
    "kind", ["subvol mount", "subvol mount under the root", "bind mount", "bind of a folder inside"]
)
def test_a_nested_subvolume_mounted_elsewhere_blocks_its_volume(
    sc: LeakScenario, tmp_path: Path, kind: str
) -> None:
    nested = sc.dind_ro_parent
    elsewhere = "/mnt/elsewhere"
    if kind == "subvol mount":
        sc.btrfs.mount_subvolume(nested, elsewhere)
    elif kind == "subvol mount under the root":
        elsewhere = f"{sc.data_root}/cache-view"
        sc.btrfs.make_dirs(elsewhere)
        sc.btrfs.mount_subvolume(nested, elsewhere)
    elif kind == "bind mount":
        sc.btrfs.bind_mount(nested, "/mnt/elsewhere")
    else:
        sc.btrfs.make_dirs(f"{sc.dind_mountpoint}/image/layerdb")
        sc.btrfs.bind_mount(f"{sc.dind_mountpoint}/image/layerdb", "/mnt/elsewhere")
    snap = snapshot(sc, tmp_path)
    # it keeps the path it has inside its volume (the widest view, not the deepest)
    sv = snap.subvolume(sc.fs_uuid, sub_id(sc, nested))
    assert sv is not None and sv.path == nested and sv.owner_kind == "docker-volume"
    with pytest.raises(Protected, match=f"also mounted elsewhere.*{elsewhere}"):
        volume(snap, sc)


def test_an_orphan_mounted_elsewhere_is_blocked(sc: LeakScenario, tmp_path: Path) -> None:
    sc.btrfs.mount_subvolume(sc.orphan_layer, "/srv/cache")
    snap = snapshot(sc, tmp_path)
    sv = snap.subvolume(sc.fs_uuid, sub_id(sc, sc.orphan_layer))
    assert sv is not None and sv.path == sc.orphan_layer and sv.owner_kind == "orphan-layer"
    with pytest.raises(Protected, match="also mounted elsewhere"):
        orphan(snap, sc)


def test_mounts_of_what_holds_the_target_do_not_block(sc: LeakScenario, tmp_path: Path) -> None:
    """dockerd bind-mounts its data root and btrfs/ onto themselves; a second view of the
    whole filesystem elsewhere shows the target but exposes nothing of it alone."""
    sc.btrfs.mount_subvolume(sc.data_root, "/var/lib/docker-view")
    snap = snapshot(sc, tmp_path)
    volume(snap, sc)
    orphan(snap, sc)


# --------------------------------------------------------------------------- containers' use


@pytest.mark.parametrize("running", [True, False])
def test_a_container_bind_mounting_a_nested_subvolume_blocks_the_volume(
    sc: LeakScenario, tmp_path: Path, running: bool
) -> None:
    sc.docker.add_container(
        "ci-cache-user", running=running, binds=[(sc.dind_ro_parent_child, "/cache")]
    )
    snap = snapshot(sc, tmp_path)
    with pytest.raises(InUse, match="ci-cache-user"):
        volume(snap, sc)
    with pytest.raises(InUse, match="ci-cache-user"):
        plan_subvolume_delete(
            snap, sc.fs_uuid, sub_id(sc, sc.dind_ro_parent_child), protect_labels=LABELS
        )


def test_a_container_bind_mounting_an_orphan_layer_blocks_it(
    sc: LeakScenario, tmp_path: Path
) -> None:
    sc.docker.add_container("debug", running=False, binds=[(f"{sc.orphan_layer}/etc", "/x")])
    with pytest.raises(InUse, match="debug"):
        orphan(snapshot(sc, tmp_path), sc)


def test_a_container_bind_mounting_a_folder_holding_the_target_blocks_it(
    sc: LeakScenario, tmp_path: Path
) -> None:
    sc.docker.add_container("inner-peek", binds=[(f"{sc.data_root}/volumes", "/volumes")])
    with pytest.raises(InUse, match="inner-peek"):
        volume(snapshot(sc, tmp_path), sc)


def test_a_container_seeing_the_whole_data_root_uses_nothing_in_particular(
    sc: LeakScenario, tmp_path: Path
) -> None:
    sc.docker.add_container("monitor", binds=[(sc.data_root, "/var/lib/docker:ro")])
    sc.docker.add_container("backup", binds=[("/volume1", "/source")])
    snap = snapshot(sc, tmp_path)
    volume(snap, sc)
    orphan(snap, sc)


# --------------------------------------------------------------------------- the rest


def test_protected_and_in_use_volumes(sc: LeakScenario, tmp_path: Path) -> None:
    snap = snapshot(sc, tmp_path)
    with pytest.raises(Protected, match="keep"):
        plan_volume_delete(snap, sc.keep_volume, protect_labels=LABELS)
    with pytest.raises(InUse):
        plan_volume_delete(snap, sc.in_use_volume, protect_labels=LABELS)
    with pytest.raises(InUse):
        plan_volume_delete(snap, sc.stopped_anonymous_volume, protect_labels=LABELS)
    with pytest.raises(Protected, match="named volume holding no"):
        plan_volume_delete(snap, sc.named_volume, protect_labels=LABELS)
    with pytest.raises(ValidationFailed):
        plan_volume_delete(snap, "../x", protect_labels=LABELS)
    with pytest.raises(NotFound):
        plan_volume_delete(snap, "nothere", protect_labels=LABELS)


def test_layers_the_top_level_the_default_and_outside_the_roots(
    sc: LeakScenario, tmp_path: Path
) -> None:
    snap = snapshot(sc, tmp_path)
    layer = sub_id(sc, sc.layers[0])
    with pytest.raises(Protected, match="Docker layer"):
        plan_subvolume_delete(snap, sc.fs_uuid, layer, protect_labels=LABELS)
    with pytest.raises(Protected, match="top level"):
        plan_subvolume_delete(snap, sc.fs_uuid, 5, protect_labels=LABELS)
    with pytest.raises(Protected, match="configured root itself"):
        plan_subvolume_delete(snap, sc.fs_uuid, sub_id(sc, sc.data_root), protect_labels=LABELS)
    with pytest.raises(OutsideRoots):
        plan_subvolume_delete(snap, sc.fs_uuid, sub_id(sc, sc.share), protect_labels=LABELS)
    sc.btrfs.set_default(sc.orphan_layer)
    with pytest.raises(Protected, match="default subvolume"):
        orphan(snapshot(sc, tmp_path), sc)


def test_a_mount_appearing_later_is_seen_by_a_fresh_table(sc: LeakScenario, tmp_path: Path) -> None:
    """The executor checks the guard against tables read right before each step."""
    snap = snapshot(sc, tmp_path)
    ds = plan_volume_delete(snap, sc.dind_volume, protect_labels=LABELS)
    sc.btrfs.add_mount(f"{sc.dind_mountpoint}/late", host_only=True)
    fresh = snapshot(sc, tmp_path).mounts
    (path, dev, in_fs) = ds.guard[0]
    with pytest.raises(InUse, match="late"):
        check_no_mounts(fresh, path, dev=dev, in_fs=in_fs)


def test_a_subvolume_made_inside_a_referenced_layer_is_protected(
    sc: LeakScenario, tmp_path: Path
) -> None:
    """A docker-in-docker container without a volume keeps its daemon's subvolumes in
    its own container layer: with the container stopped nothing mounts them, yet they
    are its data."""
    old = sc.now - timedelta(days=2)
    for layer in (sc.container_layers[0], sc.image_layers[0]):
        inner = sc.btrfs.create_subvolume(
            f"{layer}/var/lib/docker/btrfs/subvolumes/abc", created_at=old
        )
        snap = snapshot(sc, tmp_path)
        with pytest.raises(Protected, match=f"inside {layer}, a Docker layer"):
            plan_subvolume_delete(snap, sc.fs_uuid, inner.id, protect_labels=LABELS)


def test_inside_an_orphan_layer_the_floor_holds_for_it_and_for_the_layer(
    sc: LeakScenario, tmp_path: Path
) -> None:
    old = sc.now - timedelta(hours=2)
    inner = sc.btrfs.create_subvolume(f"{sc.orphan_layer}/inner", created_at=old)

    def snap() -> Snapshot:  # taken at the fake NAS's own time
        inv = Inventory(
            agent_config(tmp_path), btrfs=sc.btrfs, docker=sc.docker, clock=lambda: sc.now
        )
        return inv.take()

    # making it changed the layer just now: Docker may be writing the layer
    with pytest.raises(TooYoung, match=f"orphan layer {sc.orphan_layer}, which holds it"):
        plan_subvolume_delete(snap(), sc.fs_uuid, inner.id, protect_labels=LABELS)
    layer = sc.btrfs.subvolume(sc.orphan_layer)
    assert layer is not None
    layer.changed_at = old
    plan_subvolume_delete(snap(), sc.fs_uuid, inner.id, protect_labels=LABELS)
    inner.changed_at = sc.now - timedelta(minutes=5)
    with pytest.raises(TooYoung, match="this subvolume inside orphan layer"):
        plan_subvolume_delete(snap(), sc.fs_uuid, inner.id, protect_labels=LABELS)
    # no floor configured: nothing is too young
    plan_subvolume_delete(snap(), sc.fs_uuid, inner.id, protect_labels=LABELS, orphan_floor=0)
    # a plain folder in the layers' place (a copied data root) counts as the layer
    loose = f"{sc.data_root}/btrfs/subvolumes/{'b' * 64}"
    in_folder = sc.btrfs.create_subvolume(f"{loose}/inner", created_at=old)
    plan_subvolume_delete(snap(), sc.fs_uuid, in_folder.id, protect_labels=LABELS)
    sc.btrfs.make_dirs(f"{loose}/etc")  # a name made in the folder just now
    with pytest.raises(TooYoung, match=f"orphan layer {loose}, which holds it"):
        plan_subvolume_delete(snap(), sc.fs_uuid, in_folder.id, protect_labels=LABELS)


def test_plain_folder_layers(sc: LeakScenario, tmp_path: Path) -> None:
    layer_dir = f"{sc.data_root}/btrfs/subvolumes"
    loose = f"{layer_dir}/{'a' * 64}"
    sc.btrfs.make_dirs(f"{loose}/etc")
    snap = snapshot(sc, tmp_path)
    folder = next(f for f in snap.layer_folders if f.path == loose)
    assert folder.referenced_by is None
    assert plan_folder_delete(snap, loose).folder == folder
    sc.btrfs.add_mount(f"{loose}/etc")
    with pytest.raises(InUse):
        plan_folder_delete(snapshot(sc, tmp_path), loose)


def test_qgroups_of_live_subvolumes_are_never_destroyed(sc: LeakScenario, tmp_path: Path) -> None:
    snap = snapshot(sc, tmp_path)
    with pytest.raises(Protected, match="belong to a subvolume"):
        plan_qgroup_destroy(snap, sc.fs_uuid, [sub_id(sc, sc.orphan_layer)])
    with pytest.raises(Protected):
        plan_qgroup_destroy(snap, sc.fs_uuid, [5])


def test_a_mount_of_another_namespace_is_placed_by_what_it_sits_on() -> None:
    """A container that bind-mounts the data root (/docker of the btrfs) at /host and
    mounts a tmpfs below it: the tmpfs sits in the btrfs at /docker/volumes/v/_data/p."""
    from agent.domain.mounts import MountIndex, foreign_mounts
    from agent.host.records import MountEntry, NamespaceTable

    table = NamespaceTable(
        77,
        (
            MountEntry("/", "/", "overlay", "rw", "overlay", "0:90", 10, 9),
            MountEntry("/host", "/docker", "/dev/loop2", "rw", "btrfs", "0:43", 11, 10),
            MountEntry("/host/volumes/v/_data/p", "/", "tmpfs", "rw", "tmpfs", "0:91", 12, 11),
        ),
    )
    placed = {f.mountpoint: (f.on_dev, f.on_path) for f in foreign_mounts([table])}
    assert placed == {
        "/host": ("0:90", "/host"),
        "/host/volumes/v/_data/p": ("0:43", "/docker/volumes/v/_data/p"),
    }
    index = MountIndex([], foreign=foreign_mounts([table]))
    with pytest.raises(InUse, match="pid 77"):
        check_no_mounts(index, "/d/volumes/v", dev="0:43", in_fs="/docker/volumes/v")
    # the bind of the whole data root shows the volume from above: not a use of it
    check_no_mounts(index, "/d/volumes/w", dev="0:43", in_fs="/docker/volumes/w")


# --------------------------------------------------------------------------- held open


def test_a_process_holding_a_file_inside_a_nested_subvolume_blocks_it_and_its_volume(
    sc: LeakScenario, tmp_path: Path
) -> None:
    sc.btrfs.hold(f"{sc.dind_ro_parent_child}/etc", "pid 812 (rsync), working folder")
    snap = snapshot(sc, tmp_path)
    with pytest.raises(HeldByProcess, match=r"pid 812 \(rsync\), working folder holds"):
        volume(snap, sc)
    with pytest.raises(HeldByProcess, match="pid 812"):
        plan_subvolume_delete(
            snap, sc.fs_uuid, sub_id(sc, sc.dind_ro_parent), protect_labels=LABELS
        )
    orphan(snap, sc)  # what holds nothing still goes


def test_a_loop_devices_backing_file_inside_an_orphan_layer_blocks_it(
    sc: LeakScenario, tmp_path: Path
) -> None:
    sc.btrfs.back_loop(f"{sc.orphan_layer}/disk.img", "/dev/loop9")
    with pytest.raises(HeldByKernel, match="loop device /dev/loop9"):
        orphan(snapshot(sc, tmp_path), sc)


def test_a_process_is_named_before_the_kernel(sc: LeakScenario, tmp_path: Path) -> None:
    sc.btrfs.back_loop(f"{sc.orphan_layer}/disk.img")
    sc.btrfs.hold(f"{sc.orphan_layer}/log", "pid 9 (tail), open file")
    with pytest.raises(HeldByProcess, match="pid 9"):
        orphan(snapshot(sc, tmp_path), sc)


def test_a_held_path_beside_the_target_does_not_block(sc: LeakScenario, tmp_path: Path) -> None:
    sc.btrfs.hold(f"{sc.data_root}/volumes", "pid 7 (ls), working folder")
    sc.btrfs.hold(f"{sc.data_root}/btrfs/subvolumes", "pid 8 (ls), working folder")
    snap = snapshot(sc, tmp_path)
    volume(snap, sc)
    orphan(snap, sc)


def test_without_what_is_held_open_nothing_goes(sc: LeakScenario, tmp_path: Path) -> None:
    sc.btrfs.holders_error = "cannot read what pid 1 holds (fd): Permission denied"
    snap = snapshot(sc, tmp_path)
    assert snap.mounts.known and not snap.mounts.held.known
    with pytest.raises(HoldersUnavailable, match="pid 1"):
        volume(snap, sc)
    with pytest.raises(HoldersUnavailable):
        orphan(snap, sc)


# ------------------------------------------- the volumes of a daemon that lived in a volume


def test_an_inner_volume_labelled_keep_protects_the_leaked_volume(
    sc: LeakScenario, tmp_path: Path
) -> None:
    sc.docker.record_inner_volumes(
        sc.dind_mountpoint, {"ci-cache": {"team": "ci"}, "results": {"keep": "true"}}
    )
    snap = snapshot(sc, tmp_path)
    with pytest.raises(Protected, match=r"holds results, a volume of the Docker daemon.*keep=true"):
        volume(snap, sc)
    # what a broad plan would take is told why not
    inv = Inventory(agent_config(tmp_path), btrfs=sc.btrfs, docker=sc.docker)
    (finding,) = [f for f in inv.compute_findings(snap) if f.target.name == sc.dind_volume]
    assert any("results" in b and "protected" in b for b in finding.blocked_by), finding


def test_an_inner_volume_with_other_labels_or_none_does_not(
    sc: LeakScenario, tmp_path: Path
) -> None:
    sc.docker.record_inner_volumes(
        sc.dind_mountpoint, {"ci-cache": {"team": "ci"}, "x": {}, "y": {"keep": "false"}}
    )
    assert volume(snapshot(sc, tmp_path), sc)


def test_a_protect_label_of_the_policy_counts_inside_too(sc: LeakScenario, tmp_path: Path) -> None:
    sc.docker.record_inner_volumes(sc.dind_mountpoint, {"db": {"com.example.backup": "yes"}})
    snap = snapshot(sc, tmp_path)
    assert volume(snap, sc)
    with pytest.raises(Protected, match=r"com\.example\.backup=yes"):
        plan_volume_delete(snap, sc.dind_volume, protect_labels=(*LABELS, "com.example.backup"))


def test_a_volume_store_that_cannot_be_read_protects_the_volume(
    sc: LeakScenario, tmp_path: Path
) -> None:
    sc.docker.break_volume_store(sc.dind_mountpoint, "not a bolt file")
    with pytest.raises(Protected, match=r"cannot be read \(not a bolt file\)"):
        volume(snapshot(sc, tmp_path), sc)


def test_inner_stores_are_read_only_for_volumes_no_container_uses(
    sc: LeakScenario, tmp_path: Path
) -> None:
    snap = snapshot(sc, tmp_path)
    assert snap.volumes[sc.dind_volume].inner is not None
    assert snap.volumes[sc.in_use_volume].inner is None
