"""The cold scan's shortcuts (``agent.domain.snapshot``) give the snapshot the plain way
gives: the filesystems listed while Docker is asked for its data root, the volumes
whose folders are read for their age."""

from __future__ import annotations

from pathlib import Path

from agent.domain.snapshot import Snapshot, take_snapshot
from agent.host.records import SubvolumeRecord
from tests.agent.domain.scenes import findings, snapshot
from tests.fakes import LeakScenario, make_leak_scenario


def _same(a: Snapshot, b: Snapshot) -> None:
    assert a.filesystems == b.filesystems
    assert a.subvolumes == b.subvolumes
    assert a.volumes == b.volumes
    assert a.layer_folders == b.layer_folders


def _take(sc: LeakScenario, hint: str | None, cache: dict[str, tuple[str, str | None]]) -> Snapshot:
    return take_snapshot(sc.btrfs, sc.docker, now=sc.now, fs_cache=cache, data_root_hint=hint)


def test_a_listing_started_on_the_hint_gives_the_same_snapshot() -> None:
    sc = make_leak_scenario()
    cache: dict[str, tuple[str, str | None]] = {}
    plain = _take(sc, None, cache)
    _same(_take(sc, sc.data_root, cache), plain)
    # a hint that picks no filesystem, or another one: the same answer
    _same(_take(sc, "/elsewhere/docker", cache), plain)


def test_a_wrong_hint_listing_that_fails_is_not_read() -> None:
    sc = make_leak_scenario()
    sc.btrfs.add_filesystem(mount="/volumeUSB")
    cache: dict[str, tuple[str, str | None]] = {}
    plain = _take(sc, None, cache)
    usb = {m.source: ("usb", None) for m in sc.btrfs.mounts() if m.mountpoint == "/volumeUSB"}
    cache.update(usb)
    listed: list[str] = []
    real_listing = sc.btrfs.list_subvolumes

    def listing(mount: str) -> list[SubvolumeRecord]:
        listed.append(mount)
        if mount == "/volumeUSB":
            raise OSError("the disk went away")
        return real_listing(mount)

    sc.btrfs.list_subvolumes = listing  # type: ignore[method-assign]
    hinted = _take(sc, "/volumeUSB/docker", cache)  # a data root Docker had before
    assert sorted(listed) == ["/volume1", "/volumeUSB"]
    _same(hinted, plain)
    assert set(hinted.filesystems) == {sc.fs_uuid}


def test_only_a_volume_that_can_be_a_finding_has_its_folders_read(tmp_path: Path) -> None:
    sc = make_leak_scenario()
    dangling_name = sc.docker.add_volume().name  # anonymous, holding nothing, unused
    snap = snapshot(sc, tmp_path)
    # a named volume holding no subvolume (never a finding) is not aged; an anonymous
    # dangling one and the dind volume are
    assert snap.volumes[sc.named_volume].last_write is None
    assert snap.volumes[sc.keep_volume].last_write is None
    assert snap.volumes[sc.dind_volume].last_write is not None
    assert snap.volumes[dangling_name].last_write is not None
    assert snap.volumes[sc.in_use_volume].last_write is None
    kinds = {f.target.name: f.kind for f in findings(snap, sc, min_age_seconds=0)}
    assert sc.named_volume not in kinds and sc.keep_volume not in kinds
    assert kinds[sc.dind_volume] == "dind-volume"
    assert kinds[dangling_name] == "dangling-volume"


def test_where_each_subvolume_lies_inside_its_filesystem_is_told_as_listed() -> None:
    """``Snapshot.in_fs`` gives every subvolume's path inside its filesystem as the
    listing has it: from the local path for those shown through the top-level mount
    (the path itself is not kept twice), kept for those shown only through another."""
    sc = make_leak_scenario()
    fs2 = sc.btrfs.add_filesystem(mount="/volume2")
    sc.btrfs.create_subvolume("/volume2/data")
    sc.btrfs.create_subvolume("/volume2/data/inner")
    sc.btrfs.mount_subvolume("/volume2/data", "/srv/data")
    sc.btrfs.unmount("/volume2")  # only the subvol= mount shows it now
    snap = take_snapshot(sc.btrfs, sc.docker, now=sc.now, roots=(sc.docker.data_root, "/srv/data"))
    assert fs2.uuid in snap.subvolumes
    for uuid, subs in snap.subvolumes.items():
        fs = snap.filesystems[uuid]
        listed = {r.id: r.path for r in sc.btrfs.list_subvolumes(fs.local_mount)}
        for sv in subs.values():
            path = listed[sv.id]
            assert snap.in_fs(sv) == ("/" + path.strip("/") if path is not None else None)
            if fs.top_view is not None and sv.local_path is not None:
                assert sv.in_fs_apart is None  # given from the local path
    assert snap.filesystems[fs2.uuid].top_view is None
    inner = next(s for s in snap.subvolumes[fs2.uuid].values() if s.local_path == "/srv/data/inner")
    assert inner.in_fs_apart == "/data/inner"  # kept: no top-level mount to give it
    assert snap.in_fs(inner) == "/data/inner"
