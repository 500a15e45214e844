"""Held paths placed inside their filesystems (``agent.domain.holders``): by the mount
of the holder's own namespace that covers each path, never by the path's text alone."""

from __future__ import annotations

from agent.domain.holders import HeldIndex, place_holders
from agent.host.records import HeldPath, Holders, HolderTable, MountEntry

BTRFS = "0:43"


def _mount(point: str, root: str = "/", dev: str = BTRFS, mid: int = 10) -> MountEntry:
    fstype = "btrfs" if dev == BTRFS else "ext4"
    return MountEntry(point, root, "/dev/loop2", "rw", fstype, dev, mid, 1)


HOST = (
    _mount("/", dev="254:0", mid=1),
    _mount("/volume1", mid=2),  # the top level
    _mount("/srv/docker", "/docker", mid=3),  # subvol=/docker
    _mount("/volume1/docker/volumes/v/_data/x", "/", dev="0:90", mid=4),  # a tmpfs
)


def _places(held: list[HeldPath], table: tuple[MountEntry, ...] = HOST) -> set[tuple[str, str]]:
    return {(p.dev, p.in_fs) for p in place_holders(Holders((HolderTable(1, table, tuple(held)),)))}


def test_a_path_is_placed_by_the_deepest_mount_that_covers_it() -> None:
    assert _places([HeldPath("/volume1/docker/volumes/v/_data/f", "p")]) == {
        (BTRFS, "/docker/volumes/v/_data/f")
    }
    # through a subvol= mount elsewhere: the same place inside the filesystem
    assert _places([HeldPath("/srv/docker/volumes/v/_data/f", "p")]) == {
        (BTRFS, "/docker/volumes/v/_data/f")
    }
    # inside a tmpfs mounted in the volume: the tmpfs's, not the volume's
    assert _places([HeldPath("/volume1/docker/volumes/v/_data/x/f", "p")]) == {("0:90", "/f")}


def test_a_path_that_only_looks_like_one_under_the_target_is_elsewhere() -> None:
    # /volume10 is not under /volume1: the root filesystem's
    assert _places([HeldPath("/volume10/docker/volumes/v/_data/f", "p")]) == {
        ("254:0", "/volume10/docker/volumes/v/_data/f")
    }


def test_the_last_mount_at_a_point_hides_the_ones_under_it() -> None:
    table = (*HOST, _mount("/volume1", dev="0:77", mid=9))
    assert _places([HeldPath("/volume1/docker/x", "p")], table) == {("0:77", "/docker/x")}


def test_each_namespace_by_its_own_table_and_the_kernel_by_every_table() -> None:
    container = (
        _mount("/", dev="0:55", mid=1),
        _mount("/data", "/docker/volumes/v/_data", mid=2),  # a bind of the volume's data
    )
    holders = Holders(
        (
            HolderTable(1, HOST, ()),
            HolderTable(
                812, container, (HeldPath("/data/db", "pid 812 (db), open file"),), own=False
            ),
        ),
        everywhere=(HeldPath("/data/disk.img", "loop device /dev/loop3 (its backing file)"),),
    )
    places = {(p.dev, p.in_fs, p.kernel) for p in place_holders(holders)}
    assert (BTRFS, "/docker/volumes/v/_data/db", False) in places
    # the loop device's file, in the container's coordinates, and in the host's
    assert (BTRFS, "/docker/volumes/v/_data/disk.img", True) in places
    assert ("254:0", "/data/disk.img", True) in places
    index = HeldIndex.of(holders)
    found = index.inside(BTRFS, "/docker/volumes/v")
    assert sorted(p.who for p in found) == [
        "loop device /dev/loop3 (its backing file)",
        "pid 812 (db), open file",
    ]
    by_who = {p.who: p.describe() for p in found}
    assert by_who["pid 812 (db), open file"] == (
        "pid 812 (db), open file holds /data/db (in the mount namespace of pid 812)"
    )
    assert index.inside(BTRFS, "/docker/volumes/w") == []
    assert index.inside(BTRFS, "/docker/volumes/v/_data/db") != []  # the path itself
    assert index.inside("0:99", "/docker/volumes/v") == []  # another filesystem


def test_an_index_of_nothing_read_is_unknown() -> None:
    assert not HeldIndex(unknown_reason="no CAP_SYS_PTRACE").known
    assert HeldIndex.of(Holders(())).known
