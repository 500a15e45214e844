"""Attacks on the safety rules that the rules do not stop yet (each test fails until
the hole is closed): what a busy NAS, or a person, can do that ends in a delete of
something that is not a Docker leftover."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.domain.inventory import Inventory
from agent.domain.safety import plan_subvolume_delete, plan_volume_delete
from agent.domain.snapshot import Snapshot
from agent.errors import HeldByProcess, Protected, TooYoung
from agent.host.records import VolumeRecord
from shared.policy import DEFAULT_PROTECT_LABELS
from tests.agent.http.apphelpers import agent_config
from tests.fakes import FakeBtrfs, FakeDocker, LeakScenario, fake_hex, make_leak_scenario

LABELS = DEFAULT_PROTECT_LABELS


def snapshot(sc: LeakScenario, tmp_path: Path) -> Snapshot:
    return Inventory(agent_config(tmp_path), btrfs=sc.btrfs, docker=sc.docker).take()


def test_a_layer_being_pulled_on_a_daemon_with_no_layer_records_yet_is_not_deletable(
    tmp_path: Path,
) -> None:
    """A fresh (or fully pruned) daemon pulls its first image: the layer's subvolume is
    made in ``btrfs/subvolumes/`` first, and Docker writes its ``layerdb`` record only
    when the layer is complete. Until then no record exists at all, so the agent cannot
    tell layers from orphans (``layerdb_known`` is False) and files the subvolume as
    ``other``: no layer rule and no age floor apply, and a direct delete of it, seconds
    old, is allowed (rule 3 says: not until it has been unchanged for an hour)."""
    sc = make_leak_scenario()  # for its clock only
    fs = FakeBtrfs(now=sc.now)
    filesystem = fs.add_filesystem(mount="/volume1")
    fs.create_subvolume("/volume1/docker")
    docker = FakeDocker(btrfs=fs, data_root="/volume1/docker", now=sc.now)
    pulling = f"/volume1/docker/btrfs/subvolumes/{fake_hex('first-pull')}"
    fs.create_subvolume(pulling)  # made right now, no record yet
    inv = Inventory(agent_config(tmp_path), btrfs=fs, docker=docker)
    snap = inv.take()
    sub = fs.subvolume(pulling)
    assert sub is not None
    assert snap.subvolume(filesystem.uuid, sub.id).owner_kind == "other"  # type: ignore[union-attr]
    with pytest.raises((TooYoung, Protected)):
        plan_subvolume_delete(snap, filesystem.uuid, sub.id, protect_labels=LABELS)


# ------------------------------------------------ Docker's volumes folder on another disk

EXT4 = "8:17"  # /dev/sdb1, an ext4 disk


def _volumes_on_another_disk() -> tuple[LeakScenario, str, VolumeRecord]:
    """``<data_root>/volumes`` bind-mounted from an ext4 disk (a NAS owner moving
    volumes to a bigger disk: ``mount --bind /volumeUSB1/docker-volumes
    /volume1/docker/volumes``), and a dangling anonymous volume there."""
    sc = make_leak_scenario()
    sc.btrfs.add_mount(
        f"{sc.data_root}/volumes",
        fstype="ext4",
        source="/dev/sdb1",
        root="/docker-volumes",
        dev=EXT4,
    )
    vol = sc.docker.add_volume()  # anonymous, no container
    return sc, vol.name, vol


def test_a_volume_on_another_disk_exposed_elsewhere_is_not_emptied(tmp_path: Path) -> None:
    """The dangling volume's ``_data`` is also bind-mounted elsewhere (shared over SMB
    at ``/volume1/public/exports``): rule 4 says "nothing mounted elsewhere too (a bind
    mount of it or of anything in it)". The agent places the volume's folder in the
    btrfs filesystem whose mount point holds its path by string (``fs_for_host_path``),
    not in the ext4 disk that is mounted there, so the bind mount of it (a mount of the
    ext4 disk) is not seen: the volume's files, which the share serves, are removed."""
    sc, name, _ = _volumes_on_another_disk()
    sc.btrfs.make_dirs("/volume1/public/exports")
    sc.btrfs.add_mount(
        "/volume1/public/exports",
        fstype="ext4",
        source="/dev/sdb1",
        root=f"/docker-volumes/{name}/_data",
        dev=EXT4,
    )
    snap = snapshot(sc, tmp_path)
    with pytest.raises(Protected, match="mounted elsewhere"):
        plan_volume_delete(snap, name, protect_labels=LABELS)


def test_a_file_held_open_in_a_volume_on_another_disk_blocks_it(tmp_path: Path) -> None:
    """A process (not a container: a backup job, a media indexer) has a file open in the
    dangling volume's ``_data``. The held path is placed, rightly, in the ext4 disk; the
    volume's folder, wrongly, in the btrfs filesystem under it: they never meet, and
    the volume is emptied under the open file."""
    sc, name, vol = _volumes_on_another_disk()
    sc.btrfs.hold(f"{vol.mountpoint}/library.db", "pid 777 (indexer), open file")
    snap = snapshot(sc, tmp_path)
    with pytest.raises(HeldByProcess):
        plan_volume_delete(snap, name, protect_labels=LABELS)


def test_the_same_volume_on_the_btrfs_filesystem_is_blocked(tmp_path: Path) -> None:
    """The control: without the ext4 disk, the same open file blocks the same volume."""
    sc = make_leak_scenario()
    vol = sc.docker.add_volume()
    sc.btrfs.hold(f"{vol.mountpoint}/library.db", "pid 777 (indexer), open file")
    snap = snapshot(sc, tmp_path)
    with pytest.raises(HeldByProcess):
        plan_volume_delete(snap, vol.name, protect_labels=LABELS)
