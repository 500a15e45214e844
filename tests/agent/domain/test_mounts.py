"""The mount and use indexes the in-use rules read (``agent.domain.mounts``)."""

from __future__ import annotations

from concurrent.futures import Future

from agent.domain.mounts import MountIndex, MountView, UseIndex, mount_index
from agent.domain.paths import PathMap
from agent.errors import HostMountsUnavailable
from agent.host.records import (
    ContainerMount,
    ContainerRecord,
    Holders,
    MountEntry,
    NamespaceTable,
)


def _view(mountpoint: str, root: str = "/", dev: str = "0:43") -> MountView:
    return MountView(mountpoint, "btrfs", "/dev/loop2", root, dev)


def test_at_or_under_is_the_path_and_below_never_a_sibling_with_the_same_prefix() -> None:
    index = MountIndex(
        [_view("/v/a"), _view("/v/a/b"), _view("/v/ab"), _view("/v/a-b"), _view("/w")]
    )
    assert [m.mountpoint for m in index.at_or_under("/v/a")] == ["/v/a", "/v/a/b"]
    assert [m.mountpoint for m in index.at_or_under("/v/a/")] == ["/v/a", "/v/a/b"]
    assert index.at_or_under("/v/c") == []


def test_exposing_finds_a_mount_of_the_path_or_inside_it_on_the_same_filesystem_only() -> None:
    index = MountIndex(
        [
            _view("/mnt/x", root="/docker/volumes/v/_data/sub"),
            _view("/mnt/y", root="/docker/volumes/vv"),  # a sibling sharing the prefix
            _view("/mnt/z", root="/docker/volumes/v", dev="0:99"),  # another filesystem
        ]
    )
    assert [m.place() for m in index.exposing("0:43", "/docker/volumes/v")] == ["/mnt/x"]
    assert index.exposing("0:43", "/docker/volumes/w") == []


def test_duplicate_lines_of_the_same_mount_count_once() -> None:
    index = MountIndex([_view("/v/a"), _view("/v/a")])
    assert len(index.at_or_under("/v")) == 1


def test_a_container_use_overlaps_its_source_what_is_inside_and_what_holds_it() -> None:
    c = ContainerRecord(
        "c" * 64,
        "web",
        True,
        "running",
        "sha256:i",
        mounts=(
            ContainerMount("bind", "/srv/data/app", "/app"),
            ContainerMount("volume", "/d/volumes/v/_data", "/v", name="v"),
            ContainerMount("bind", "/d", "/host-docker"),  # a view of the whole data root
        ),
    )
    uses = UseIndex([c])
    assert [u.mount.destination for u in uses.overlapping("/srv/data")] == ["/app"]
    assert [u.mount.destination for u in uses.overlapping("/srv/data/app/x")] == ["/app"]
    assert uses.overlapping("/srv/data-old") == []
    inside = uses.overlapping("/d/volumes/v", wide=("/d",))
    assert [u.mount.destination for u in inside] == ["/v"]
    # without the data root as a wide path, the bind of /d holds the volume too
    assert {u.mount.destination for u in uses.overlapping("/d/volumes/v")} == {"/v", "/host-docker"}
    assert "web (running) mounts volume v at /v" in inside[0].describe()


def _done(value: object) -> Future:  # type: ignore[type-arg]
    f: Future = Future()  # type: ignore[type-arg]
    f.set_result(value)
    return f


def test_an_unreadable_host_table_makes_the_index_unknown_with_the_reason() -> None:
    host: Future[list[MountEntry]] = Future()
    host.set_exception(HostMountsUnavailable("the host's mount table is out of reach"))
    local = [MountEntry("/d", "/docker", "/dev/loop2", "rw", dev="0:43")]
    index = mount_index(local, host, PathMap(), _done([]), _done(Holders(())))
    assert not index.known
    assert index.unknown_reason is not None and "out of reach" in index.unknown_reason
    assert [m.mountpoint for m in index.at_or_under("/d")] == ["/d"]


def test_local_mounts_outside_the_host_view_are_left_out_and_host_ones_kept() -> None:
    local = [
        MountEntry("/host/d", "/docker", "/dev/loop2", "rw", dev="0:43"),
        MountEntry("/proc", "/", "proc", "rw", fstype="proc", dev="0:5"),
    ]
    host = [MountEntry("/srv/x", "/docker/volumes/v/_data", "/dev/loop2", "rw", dev="0:43")]
    table = NamespaceTable(
        9,
        (
            MountEntry("/", "/", "overlay", "rw", "overlay", "0:90", 10, 10),
            MountEntry("/in", "/", "tmpfs", "rw", "tmpfs", "0:91", 11, 10),
        ),
    )
    index = mount_index(local, _done(host), PathMap("/host"), _done([table]), _done(Holders(())))
    assert index.known
    assert [m.mountpoint for m in index.all] == ["/d", "/srv/x"]
    assert [f.place() for f in index.foreign] == ["/in in the mount namespace of pid 9"]
    assert [m.place() for m in index.exposing("0:43", "/docker/volumes/v")] == ["/srv/x"]
