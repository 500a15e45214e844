"""``BtrfsTool.list_subvolumes`` and ``qgroups`` (tree-search ioctls) on a real btrfs.

Every test builds subvolumes for real on the loop-mounted btrfs (``loop_btrfs``) and
checks the listing against what was built, byte for byte, and against btrfs-progs'
own output (``btrfs subvolume list -a -p -u -q``, ``-r``, ``btrfs qgroup show --raw``,
parsed by tests/agent/host/textformats.py) where names are ordinary enough for text.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agent.host.btrfs_ioctl as agent_ioctl
from agent.errors import BtrfsCommandError
from agent.host.btrfs import BtrfsIoctlError, BtrfsTool
from agent.host.records import Qgroup, SubvolumeRecord
from tests.agent.conftest import LoopBtrfs
from tests.agent.host.test_btrfs import lab, make_tree, sh
from tests.agent.host.textformats import (
    parse_qgroup_show,
    parse_readonly_list,
    parse_subvolume_list,
)
from tests.strategies import SAMPLE_HOSTILE_NAMES, hostile_names

_real_run = subprocess.run


def run(*args: bytes | str) -> str:
    proc = _real_run(list(args), capture_output=True, check=False, timeout=120)
    assert proc.returncode == 0, f"{args!r}: {proc.stderr!r}"
    return proc.stdout.decode("utf-8", "surrogateescape")


def create(path: bytes) -> bytes:
    run(b"btrfs", b"subvolume", b"create", path)
    return path


def rootid(path: bytes) -> int:
    return int(run(b"btrfs", b"inspect-internal", b"rootid", path))


def by_path(records: list[SubvolumeRecord]) -> dict[bytes, SubvolumeRecord]:
    out = {}
    for r in records:
        assert r.path is not None, r
        out[os.fsencode(r.path)] = r
    return out


@pytest.fixture
def tool() -> BtrfsTool:
    return BtrfsTool()


@pytest.fixture
def ioctls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The request number of every ioctl BtrfsTool makes (the real ones: a spy)."""
    seen: list[int] = []
    real = fcntl.ioctl

    def spy(fd: int, request: int, *args: object) -> object:
        seen.append(request)
        return real(fd, request, *args)  # type: ignore[call-overload]

    monkeypatch.setattr(agent_ioctl.fcntl, "ioctl", spy)
    yield seen


# --------------------------------------------------------------------------- names


@lab
def test_hostile_names_are_listed_byte_for_byte(loop_btrfs: LoopBtrfs, tool: BtrfsTool) -> None:
    """Every kind of hostile name, at the top level, nested, below a real folder named
    ``<FS_TREE>``, in folders with hostile names, inside a read-only subvolume, and a
    snapshot: the listing is exactly what was made (paths, ids, parents, flags)."""
    m = os.fsencode(loop_btrfs.mount)
    made: dict[bytes, bytes | None] = {}  # path -> the path of the subvolume holding it

    os.mkdir(m + b"/<FS_TREE>")  # a real folder with btrfs-progs' marker as its name
    for name in SAMPLE_HOSTILE_NAMES:
        path = name if name != b"<FS_TREE>" else b"<FS_TREE>/<FS_TREE>"
        made[create(m + b"/" + path)[len(m) + 1 :]] = None
    docker = b"<FS_TREE>/docker"
    made[create(m + b"/" + docker)[len(m) + 1 :]] = None
    for i, name in enumerate(SAMPLE_HOSTILE_NAMES[:8]):
        folder = docker + b"/" + name + b"/" + SAMPLE_HOSTILE_NAMES[-i - 1][:100]
        os.makedirs(m + b"/" + folder)
        made[create(m + b"/" + folder + b"/" + name)[len(m) + 1 :]] = docker
    ro = b"ro \n parent"
    made[create(m + b"/" + ro)[len(m) + 1 :]] = None
    for name in (b"child\nID 5 gen 1 top level 5 path x", b"-r", b"\xff"):
        made[create(m + b"/" + ro + b"/" + name)[len(m) + 1 :]] = ro
    run(b"btrfs", b"property", b"set", m + b"/" + ro, b"ro", b"true")
    src, snap = SAMPLE_HOSTILE_NAMES[0], b"snap of " + SAMPLE_HOSTILE_NAMES[0]
    run(b"btrfs", b"subvolume", b"snapshot", b"-r", m + b"/" + src, m + b"/" + snap)
    made[snap] = None

    listed = by_path(tool.list_subvolumes(loop_btrfs.mount))
    assert set(listed) == set(made)
    for path, holder in made.items():
        rec = listed[path]
        full = m + b"/" + path
        assert rec.id == rootid(full)
        assert rec.parent_id == (rootid(m + b"/" + holder) if holder else 5)
        assert os.lstat(full).st_ino == 256  # the path is the subvolume's, exactly
        assert rec.read_only is (path in (ro, snap))
    assert listed[snap].parent_uuid == listed[src].uuid is not None
    assert listed[src].parent_uuid is None


@lab
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    folders=st.lists(hostile_names(), max_size=3),
    names=st.lists(hostile_names(), min_size=1, max_size=3, unique=True),
)
def test_generated_hostile_names_round_trip(
    loop_btrfs: LoopBtrfs, tool: BtrfsTool, folders: list[bytes], names: list[bytes]
) -> None:
    m = os.fsencode(loop_btrfs.mount)
    base = m + b"/case"
    folder = b"/".join([base, *[f[:60] for f in folders]])
    os.makedirs(folder)
    made = [create(folder + b"/" + name) for name in names]
    try:
        listed = by_path(tool.list_subvolumes(loop_btrfs.mount))
        assert set(listed) == {p[len(m) + 1 :] for p in made}
        for p in made:
            assert listed[p[len(m) + 1 :]].id == rootid(p)
    finally:
        run(b"btrfs", b"subvolume", b"delete", *made)
        run(b"rm", b"-rf", b"--", base)


@lab
def test_listing_agrees_with_btrfs_progs_on_ordinary_names(
    loop_btrfs: LoopBtrfs, tool: BtrfsTool
) -> None:
    """ids, parents, generations, uuids, snapshot sources, read-only flags and paths,
    against ``btrfs subvolume list -a -p -u -q`` and ``-r``; qgroups against
    ``btrfs qgroup show --raw``."""
    mnt = loop_btrfs.mount
    make_tree(mnt)
    root = f"{mnt}/docker"
    sh("btrfs", "subvolume", "create", root)
    os.makedirs(f"{root}/btrfs/subvolumes")
    sh("btrfs", "subvolume", "create", f"{root}/btrfs/subvolumes/base")
    for i in range(5):
        sh(
            "btrfs", "subvolume", "snapshot", f"{root}/btrfs/subvolumes/base",
            f"{root}/btrfs/subvolumes/layer-{i}",
        )  # fmt: skip
    os.makedirs(f"{root}/volumes/v1/_data/btrfs/subvolumes")
    sh("btrfs", "subvolume", "create", f"{root}/volumes/v1/_data/btrfs/subvolumes/inner")
    sh("btrfs", "property", "set", f"{root}/btrfs/subvolumes/layer-3", "ro", "true")
    sh("btrfs", "quota", "enable", mnt)
    sh("btrfs", "quota", "rescan", "-w", mnt)
    sh("btrfs", "filesystem", "sync", mnt)

    mine = tool.list_subvolumes(mnt)
    theirs = parse_subvolume_list(sh("btrfs", "subvolume", "list", "-a", "-p", "-u", "-q", mnt))
    assert len(mine) == len(theirs) == 14
    assert [(r.id, r.parent_id, r.generation, r.uuid, r.parent_uuid, r.path) for r in mine] == [
        (r.id, r.parent_id, r.generation, r.uuid, r.parent_uuid, r.path) for r in theirs
    ]
    assert {r.id for r in mine if r.read_only} == parse_readonly_list(
        sh("btrfs", "subvolume", "list", "-r", mnt)
    )
    assert len({r.id for r in mine if r.read_only}) == 2

    groups = tool.qgroups(mnt)
    assert groups is not None and not groups.inconsistent
    assert dict(groups) == parse_qgroup_show(sh("btrfs", "qgroup", "show", "--raw", mnt))
    assert set(groups) == {5} | {r.id for r in mine}


# --------------------------------------------------------------------------- the kernel's view


@lab
def test_a_subvolume_being_deleted_is_not_listed(loop_btrfs: LoopBtrfs, tool: BtrfsTool) -> None:
    m = loop_btrfs.mount
    kept = f"{m}/kept"
    sh("btrfs", "subvolume", "create", kept)
    gone = f"{m}/gone"
    sh("btrfs", "subvolume", "create", gone)
    for i in range(2000):
        Path(gone, f"f{i}").touch()
    gone_id = rootid(os.fsencode(gone))
    sh("btrfs", "filesystem", "sync", m)
    sh("btrfs", "subvolume", "delete", gone)  # no commit: the root item stays for now
    records = tool.list_subvolumes(m)
    # the kernel still holds its root item (``list -d``: deleted, not yet cleaned)
    assert f"ID {gone_id} " in sh("btrfs", "subvolume", "list", "-d", m)
    assert [r.path for r in records] == ["kept"]
    assert os.path.isdir(kept)
    sh("btrfs", "filesystem", "sync", m)  # wakes the cleaner
    sh("btrfs", "subvolume", "sync", m)
    assert [r.path for r in tool.list_subvolumes(m)] == ["kept"]


def make_flat(mount: str, parents: int, children: int) -> list[str]:
    """``parents`` subvolumes of ``children`` nested subvolumes each, made with the
    kernel's BTRFS_IOC_SUBVOL_CREATE (a process each would take minutes); names of
    varying length so that items straddle the pages differently."""
    made = []
    args = bytearray(4096)  # struct btrfs_ioctl_vol_args {__s64 fd; char name[4088];}
    create_ioc = agent_ioctl._ioc(agent_ioctl._IOC_WRITE, 14, 4096)

    def mk(folder: str, name: str) -> None:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            args[:] = bytes(4096)
            args[8 : 8 + len(name)] = name.encode()
            fcntl.ioctl(fd, create_ioc, args)
        finally:
            os.close(fd)
        made.append(f"{folder}/{name}"[len(mount) + 1 :])

    for p in range(parents):
        mk(mount, f"p{p}")
        os.makedirs(f"{mount}/p{p}/_data/btrfs/subvolumes")
        for c in range(children):
            mk(f"{mount}/p{p}/_data/btrfs/subvolumes", f"layer-{c}-" + "x" * (c % 37))
    return made


@lab
def test_thousands_of_subvolumes_page_after_page(
    loop_btrfs: LoopBtrfs, ioctls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """2,121 subvolumes: many pages of BTRFS_IOC_TREE_SEARCH_V2 (at 256 KiB and at
    4 KiB), and BTRFS_IOC_TREE_SEARCH (v1) where the kernel refuses v2 (emulated: an
    ioctl number this kernel does not know answers ENOTTY, as v2 would before 3.15)."""
    m = loop_btrfs.mount
    made = make_flat(m, 21, 100)
    sh("btrfs", "filesystem", "sync", m)
    theirs = parse_subvolume_list(sh("btrfs", "subvolume", "list", "-a", "-p", "-u", "-q", m))
    expected = [(r.id, r.parent_id, r.generation, r.uuid, r.path) for r in theirs]
    assert sorted(p for *_, p in expected) == sorted(made)

    def shape(records: list[SubvolumeRecord]) -> list[tuple[object, ...]]:
        return [(r.id, r.parent_id, r.generation, r.uuid, r.path) for r in records]

    v2 = agent_ioctl.BTRFS_IOC_TREE_SEARCH_V2
    v1 = agent_ioctl.BTRFS_IOC_TREE_SEARCH
    lookup = agent_ioctl.BTRFS_IOC_INO_LOOKUP

    assert shape(BtrfsTool().list_subvolumes(m)) == expected
    assert 4 <= ioctls.count(v2) <= 12 and v1 not in ioctls
    assert ioctls.count(lookup) == 21  # one per folder holding subvolumes, not per subvolume

    ioctls.clear()
    assert shape(BtrfsTool(search_buffer_bytes=4096).list_subvolumes(m)) == expected
    assert ioctls.count(v2) > 300  # 3992 bytes of results a search

    ioctls.clear()
    monkeypatch.setattr(agent_ioctl, "BTRFS_IOC_TREE_SEARCH_V2", agent_ioctl._ioc(3, 250, 112))
    old_kernel = BtrfsTool()
    assert shape(old_kernel.list_subvolumes(m)) == expected
    assert ioctls.count(agent_ioctl._ioc(3, 250, 112)) == 1  # tried once, then v1 only
    assert ioctls.count(v1) > 300
    ioctls.clear()
    assert shape(old_kernel.list_subvolumes(m)) == expected
    assert agent_ioctl._ioc(3, 250, 112) not in ioctls


@lab
def test_a_subvolume_mount_lists_the_whole_filesystem(
    loop_btrfs: LoopBtrfs, tool: BtrfsTool
) -> None:
    m = os.fsencode(loop_btrfs.mount)
    create(m + b"/vol")
    os.mkdir(m + b"/vol/<FS_TREE>")
    create(m + b"/vol/<FS_TREE>/a\nb")
    create(m + b"/outside")
    at = loop_btrfs.mount_subvolume("vol", str(loop_btrfs.workdir / "vol-mount"))
    from_top = tool.list_subvolumes(loop_btrfs.mount)
    assert set(by_path(from_top)) == {b"vol", b"vol/<FS_TREE>/a\nb", b"outside"}
    assert tool.list_subvolumes(at) == from_top
    assert tool.list_subvolumes(f"{at}/<FS_TREE>") == from_top  # any folder of it will do


@lab
def test_a_path_longer_than_ino_lookup_returns_is_none(
    loop_btrfs: LoopBtrfs, tool: BtrfsTool
) -> None:
    """A folder path inside a subvolume longer than BTRFS_IOC_INO_LOOKUP's 4080 bytes:
    that subvolume is listed with path None, never a guess; the others are intact."""
    m = loop_btrfs.mount
    sh("btrfs", "subvolume", "create", f"{m}/s")
    chain = "/".join(["d"] * 17)
    os.makedirs(f"{m}/s/{chain}")
    sh("btrfs", "subvolume", "create", f"{m}/s/{chain}/deep")
    sh("btrfs", "subvolume", "create", f"{m}/s/d/shallow")
    fds = [os.open(f"{m}/s", os.O_RDONLY | os.O_DIRECTORY)]
    try:
        for _ in range(17):
            fds.append(os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
        for fd in fds[:-1]:  # 17 names of 255 bytes: 4352 bytes of folders
            os.rename("d", "L" * 255, src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        for fd in fds:
            os.close(fd)
    records = {r.id: r for r in tool.list_subvolumes(m)}
    s_id = rootid(os.fsencode(f"{m}/s"))
    below = sorted((r for r in records.values() if r.parent_id == s_id), key=lambda r: r.id)
    deep, shallow = below
    assert deep.path is None
    assert shallow.path == f"s/{'L' * 255}/shallow"
    assert records[s_id].path == "s"


@lab
def test_changed_at_moves_when_a_name_is_made_in_the_subvolume(
    loop_btrfs: LoopBtrfs, tool: BtrfsTool
) -> None:
    m = loop_btrfs.mount
    sh("btrfs", "subvolume", "create", f"{m}/s")
    sh("btrfs", "filesystem", "sync", m)
    [before] = tool.list_subvolumes(m)
    Path(m, "s", "new file").write_text("x")
    sh("btrfs", "filesystem", "sync", m)  # the root tree's copy moves at the commit
    [after] = tool.list_subvolumes(m)
    assert before.changed_at is not None and after.changed_at is not None
    assert after.changed_at > before.changed_at
    assert before.ctransid is not None and after.ctransid is not None
    assert after.ctransid > before.ctransid
    assert after.created_at == before.created_at


@lab
def test_listing_needs_cap_sys_admin(loop_btrfs: LoopBtrfs) -> None:
    """Without CAP_SYS_ADMIN (as a NAS user that is not root) the tree search is EPERM:
    a clear BtrfsUnavailable (503), as for a missing btrfs binary."""
    code = (
        "from agent.host.btrfs import BtrfsTool\n"
        "from agent.errors import BtrfsUnavailable\n"
        "try:\n"
        f"    BtrfsTool().list_subvolumes({loop_btrfs.mount!r})\n"
        "except BtrfsUnavailable as e:\n"
        "    print(e.status, e.detail)\n"
    )
    out = run(
        "setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin", "--",
        sys.executable, "-c", code,
    )  # fmt: skip
    assert out.startswith("503 ") and "CAP_SYS_ADMIN" in out


@lab
def test_not_btrfs_is_a_clear_error(tmp_path: Path, tool: BtrfsTool) -> None:
    calls: list[Callable[[], object]] = [
        lambda: tool.list_subvolumes(str(tmp_path)),
        lambda: tool.qgroups(str(tmp_path)),
    ]
    for call in calls:
        with pytest.raises(BtrfsIoctlError) as exc:
            call()
        assert isinstance(exc.value, BtrfsCommandError) and exc.value.status == 502
        assert f"not a btrfs filesystem: {tmp_path}" in exc.value.stderr
    with pytest.raises(BtrfsIoctlError, match="No such file"):
        tool.list_subvolumes(str(tmp_path / "missing"))


# --------------------------------------------------------------------------- qgroups


@lab
def test_qgroups_say_when_the_numbers_are_inconsistent(
    loop_btrfs: LoopBtrfs, tool: BtrfsTool
) -> None:
    m = loop_btrfs.mount
    sh("btrfs", "subvolume", "create", f"{m}/a")
    Path(m, "a", "blob").write_bytes(os.urandom(1 << 20))
    sh("btrfs", "quota", "enable", m)
    sh("btrfs", "quota", "rescan", "-w", m)
    sh("btrfs", "subvolume", "snapshot", f"{m}/a", f"{m}/b")  # shares a's extents
    sh("btrfs", "filesystem", "sync", m)
    groups = tool.qgroups(m)
    assert groups is not None and not groups.inconsistent and not groups.rescanning
    b_id = rootid(os.fsencode(f"{m}/b"))
    assert groups[b_id].exclusive < groups[b_id].referenced

    # A relation the kernel cannot account quickly (shared extents) and no rescan: the
    # kernel sets BTRFS_QGROUP_STATUS_FLAG_INCONSISTENT.
    sh("btrfs", "qgroup", "create", "1/1", m)
    sh("btrfs", "qgroup", "assign", "--no-rescan", f"0/{b_id}", "1/1", m)
    sh("btrfs", "filesystem", "sync", m)
    groups = tool.qgroups(m)
    assert groups is not None and groups.inconsistent
    assert set(groups) == {5, rootid(os.fsencode(f"{m}/a")), b_id}  # level 1 is not listed
    assert (
        "inconsistent"
        in _real_run(
            ["btrfs", "qgroup", "show", "--raw", m], capture_output=True, text=True, check=False
        ).stderr
    )

    sh("btrfs", "quota", "rescan", "-w", m)
    sh("btrfs", "filesystem", "sync", m)
    groups = tool.qgroups(m)
    assert groups is not None and not groups.inconsistent
    assert groups[b_id] == Qgroup(b_id, groups[b_id].referenced, groups[b_id].exclusive)


# --------------------------------------------------------------------------- deleted, not freed


def test_a_deleted_subvolume_is_dropping_until_the_cleaner_is_done(loop_btrfs: LoopBtrfs) -> None:
    m = loop_btrfs.mount
    sh("btrfs", "subvolume", "create", f"{m}/big")
    for i in range(200):  # some work for the cleaner
        with open(f"{m}/big/f{i}", "wb") as f:
            f.write(b"x" * 4096)
    sh("btrfs", "filesystem", "sync", m)
    tool = BtrfsTool()
    (big,) = [r.id for r in tool.list_subvolumes(m) if r.path == "big"]
    assert tool.still_dropping(m, [big]) == set()  # alive: not being dropped
    sh("btrfs", "subvolume", "delete", f"{m}/big")  # no commit: the cleaner has not run
    assert tool.still_dropping(m, [big, big + 1000]) == {big}
    assert big not in {r.id for r in tool.list_subvolumes(m)}
    tool.sync(m)  # commits (which wakes the cleaner), then waits for it
    assert tool.still_dropping(m, [big]) == set()
