"""``agent.host.btrfs.BtrfsTool``.

The first part runs it against a stand-in ``btrfs`` (a shell script replaying captured
output) to check the command lines, the runner and the error paths. The ``lab`` part
runs it on a real loop-backed btrfs (fixture ``loop_btrfs`` in conftest.py) and checks
every answer against the filesystem itself, once with the distro's btrfs-progs and once
with btrfs-progs 4.4.1 (fixture ``btrfs_binary`` in tests/conftest.py); the tests' own
set-up and checks run the distro's ``btrfs``. The listings (ioctls, no process) are
checked in test_btrfs_listing.py.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import agent.host.btrfs_ioctl as agent_ioctl
from agent.errors import BtrfsCommandError, BtrfsUnavailable
from agent.host.btrfs import BtrfsTimeout, BtrfsTool
from agent.host.btrfs_ioctl import otime_via_subvol_info, otime_via_tree_search
from agent.host.records import DeleteResult, FilesystemIdent, MountEntry, Qgroup
from tests.agent.conftest import LoopBtrfs
from tests.agent.host.test_btrfs_parse import VERSIONS, load_capture

_real_run = subprocess.run  # the tests' own commands, never seen by the spy below


def sh(*args: str, env: dict[str, str] | None = None) -> str:
    proc = _real_run(args, capture_output=True, text=True, check=False, timeout=120, env=env)
    assert proc.returncode == 0, f"{args}: {proc.stderr}"
    return proc.stdout


# --------------------------------------------------------------------------- a stand-in btrfs


class FakeBtrfs:
    """A ``btrfs`` that records its argv and LC_ALL, prints given text and exits."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.path = str(folder / "btrfs")

    def script(self, stdout: str = "", stderr: str = "", exit_code: int = 0, body: str = "") -> str:
        (self.folder / "out").write_text(stdout)
        (self.folder / "err").write_text(stderr)
        Path(self.path).write_text(
            "#!/bin/sh\n"
            f"printf '%s\\n' \"$@\" > '{self.folder}/argv'\n"
            f"printf '%s' \"$LC_ALL\" > '{self.folder}/lc_all'\n"
            f"{body}\n"
            f"cat '{self.folder}/out'\n"
            f"cat '{self.folder}/err' >&2\n"
            f"exit {exit_code}\n"
        )
        os.chmod(self.path, 0o755)
        return self.path

    def replay(self, version: str, name: str) -> str:
        cap = load_capture(version, name)
        return self.script(cap.stdout, cap.stderr, cap.exit_code)

    @property
    def argv(self) -> list[str]:
        return (self.folder / "argv").read_text().split("\n")[:-1]


@pytest.fixture
def fake(tmp_path: Path) -> FakeBtrfs:
    return FakeBtrfs(tmp_path / "fake-bin")


@pytest.mark.parametrize("version", VERSIONS)
def test_commands_and_answers(fake: FakeBtrfs, version: str) -> None:
    tool = BtrfsTool(binary=fake.path)
    fake.replay(version, "filesystem-show.txt")
    assert tool.filesystem("/volume1") == FilesystemIdent(
        "fb415bf3-dfe2-46e7-965f-840f6fe01817", None, ("/dev/loop1",)
    )
    assert fake.argv == ["filesystem", "show", "/volume1"]

    fake.replay(version, "filesystem-usage-b.txt")
    assert tool.usage("/volume1").used_bytes == 26877952
    assert fake.argv == ["filesystem", "usage", "-b", "/volume1"]

    fake.replay(version, "subvolume-get-default.txt")
    assert tool.default_subvolume("/volume1") == 5
    assert fake.argv == ["subvolume", "get-default", "/volume1"]

    fake.replay(version, "version.txt")
    assert tool.version() == version.removeprefix("v")
    assert fake.argv == ["--version"]


def test_changing_commands(fake: FakeBtrfs) -> None:
    tool = BtrfsTool(binary=fake.path)
    fake.script()
    tool.set_readonly("/volume1/a b", True)
    assert fake.argv == ["property", "set", "-t", "s", "/volume1/a b", "ro", "true"]
    tool.set_readonly("/volume1/a b", False)
    assert fake.argv == ["property", "set", "-t", "s", "/volume1/a b", "ro", "false"]
    fake.replay("v6.2", "subvolume-sync.txt")
    tool.sync("/volume1")
    assert fake.argv == ["subvolume", "sync", "/volume1"]  # the last of the two commands


def test_arguments_reach_btrfs_verbatim_without_a_shell(fake: FakeBtrfs, tmp_path: Path) -> None:
    fake.script()
    marker = tmp_path / "pwned"
    nasty = f"/volume1/$(touch {marker}); `touch {marker}` 'q\" *"
    BtrfsTool(binary=fake.path).sync(nasty)
    assert fake.argv == ["subvolume", "sync", nasty]
    assert not marker.exists()


def test_messages_are_asked_for_in_english(fake: FakeBtrfs) -> None:
    fake.script()
    BtrfsTool(binary=fake.path).sync("/volume1")
    assert (fake.folder / "lc_all").read_text() == "C"


def test_failure_carries_command_code_and_output(fake: FakeBtrfs) -> None:
    fake.script("partial out\n", "ERROR: something broke\nmore detail\n", exit_code=3)
    with pytest.raises(BtrfsCommandError) as exc:
        BtrfsTool(binary=fake.path).set_readonly("/volume1/x", True)
    err = exc.value
    assert err.cmd == (fake.path, "property", "set", "-t", "s", "/volume1/x", "ro", "true")
    assert err.returncode == 3
    assert err.stdout == "partial out\n"
    assert err.stderr == "ERROR: something broke\nmore detail\n"
    assert "ERROR: something broke" in err.detail
    assert err.status == 502


def test_unparseable_output_is_a_clear_error(fake: FakeBtrfs) -> None:
    fake.script("this is not what get-default prints\n")
    with pytest.raises(ValueError, match="btrfs subvolume get-default: unexpected line"):
        BtrfsTool(binary=fake.path).default_subvolume("/volume1")


def test_timeout_kills_and_reports(fake: FakeBtrfs) -> None:
    fake.script(body="echo started; exec sleep 30")
    started = time.monotonic()
    with pytest.raises(BtrfsTimeout) as exc:
        BtrfsTool(binary=fake.path, timeout=0.5).usage("/volume1")
    assert time.monotonic() - started < 10
    assert exc.value.returncode == -9
    assert exc.value.stderr.startswith("timed out after 0.5s")
    assert isinstance(exc.value, BtrfsCommandError)


@pytest.mark.parametrize("binary", ["/nonexistent/btrfs", "nas-janitor-no-such-btrfs"])
def test_missing_binary_is_unavailable(binary: str) -> None:
    tool = BtrfsTool(binary=binary)
    with pytest.raises(BtrfsUnavailable):
        tool.version()
    with pytest.raises(BtrfsUnavailable):
        tool.usage("/volume1")


def test_binary_that_cannot_be_executed_is_unavailable(tmp_path: Path) -> None:
    not_exec = tmp_path / "btrfs"
    not_exec.write_text("#!/bin/sh\n")
    not_exec.chmod(0o644)
    if os.geteuid() == 0 and os.access(not_exec, os.X_OK):
        pytest.fail("root can execute a 0644 file here; the test needs another way")
    with pytest.raises(BtrfsUnavailable):
        BtrfsTool(binary=str(not_exec)).version()


def test_paths_must_be_absolute_and_distinct() -> None:
    tool = BtrfsTool(binary="/nonexistent/btrfs")  # any process would raise BtrfsUnavailable
    assert tool.delete([]) == []
    with pytest.raises(ValueError, match="absolute"):
        tool.delete(["relative/path"])
    with pytest.raises(ValueError, match="twice"):
        tool.delete(["/x/a", "/x/b", "/x/a/"])
    with pytest.raises(ValueError, match="absolute"):
        tool.list_subvolumes("-r")
    with pytest.raises(ValueError, match="absolute"):
        tool.qgroups("relative")
    with pytest.raises(ValueError, match="NUL"):
        tool.sync("/x\0y")


def test_rmdir_feature_from_sys_root(tmp_path: Path) -> None:
    features = tmp_path / "fs" / "btrfs" / "features"
    features.mkdir(parents=True)
    tool = BtrfsTool(sys_root=str(tmp_path))
    assert tool.rmdir_deletes_subvolumes() is False  # Linux < 4.18 has no such file
    (features / "rmdir_subvol").write_text("0\n")  # its content is not the signal
    assert tool.rmdir_deletes_subvolumes() is True


def test_kernel_release() -> None:
    with open("/proc/sys/kernel/osrelease") as f:
        assert BtrfsTool().kernel_release() == f.read().strip()


def test_rmdir_feature_of_this_kernel() -> None:
    major, minor = (int(x) for x in re.findall(r"\d+", os.uname().release)[:2])
    if not os.path.isdir("/sys/fs/btrfs/features"):
        pytest.skip("btrfs module not loaded: no /sys/fs/btrfs/features")
    assert BtrfsTool().rmdir_deletes_subvolumes() == ((major, minor) >= (4, 18))


# --------------------------------------------------------------------------- on a real btrfs

lab = pytest.mark.lab


def subvol(path: str) -> str:
    sh("btrfs", "subvolume", "create", path)
    return path


def rootid(path: str) -> int:
    return int(sh("btrfs", "inspect-internal", "rootid", path))


def show(path: str) -> dict[str, str]:
    fields = {}
    for line in sh("btrfs", "subvolume", "show", path, env=dict(os.environ, TZ="UTC")).split("\n"):
        key, sep, value = line.strip().partition(":")
        if sep and value.strip():
            fields[key.strip()] = value.strip()
    return fields


def write_random(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    os.sync()


@pytest.fixture
def tool(btrfs_binary: str) -> BtrfsTool:
    return BtrfsTool(binary=btrfs_binary)


@pytest.fixture(params=["btrfs-progs", "ioctl"])
def changer(request: pytest.FixtureRequest, btrfs_binary: str) -> BtrfsTool:
    """A tool that sets read-only flags and deletes subvolumes with btrfs-progs (the
    one under test), or by ioctl."""
    return BtrfsTool(binary=btrfs_binary, subvolume_ioctls=request.param == "ioctl")


@pytest.fixture
def processes(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every command BtrfsTool starts (the tests' own ``sh`` is not counted)."""
    calls: list[list[str]] = []

    def spy(args: list[str], *a: object, **kw: object) -> object:
        calls.append(list(args))
        return _real_run(args, *a, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr(subprocess, "run", spy)  # the module agent.host.btrfs calls
    return calls


def deletes(calls: list[list[str]]) -> list[list[str]]:
    return [c[3:] for c in calls if c[1:3] == ["subvolume", "delete"]]


@lab
def test_version_is_the_installed_one(tool: BtrfsTool, btrfs_binary: str) -> None:
    version = tool.version()
    assert re.fullmatch(r"\d+\.\d+(\.\d+)*", version)
    assert f"btrfs-progs v{version}" in sh(btrfs_binary, "--version")


@lab
def test_mounts_top_level_and_subvolume_mounts(loop_btrfs: LoopBtrfs, tool: BtrfsTool) -> None:
    subvol(f"{loop_btrfs.mount}/sub vol")
    sub_id = rootid(f"{loop_btrfs.mount}/sub vol")
    at = loop_btrfs.mount_subvolume("sub vol", str(loop_btrfs.workdir / "mounted here"))
    mine = {m.mountpoint: m for m in tool.mounts() if m.source == loop_btrfs.device}
    assert set(mine) == {loop_btrfs.mount, at}
    top = mine[loop_btrfs.mount]
    assert top.root == "/"
    assert "subvolid=5" in top.options.split(",")
    assert mine[at].root == "/sub vol"
    assert f"subvolid={sub_id}" in mine[at].options.split(",")
    assert all(isinstance(m, MountEntry) for m in tool.mounts())


@lab
def test_filesystem_ident(loop_btrfs: LoopBtrfs, tool: BtrfsTool) -> None:
    expected = FilesystemIdent(loop_btrfs.uuid, loop_btrfs.label, (loop_btrfs.device,))
    assert tool.filesystem(loop_btrfs.mount) == expected
    subvol(f"{loop_btrfs.mount}/s")
    at = loop_btrfs.mount_subvolume("s", str(loop_btrfs.workdir / "s-mount"))
    assert tool.filesystem(at) == expected


@lab
def test_usage_in_bytes(loop_btrfs: LoopBtrfs, tool: BtrfsTool) -> None:
    before = tool.usage(loop_btrfs.mount)
    assert before.size_bytes == 1 << 30
    assert 0 < before.used_bytes < 64 << 20
    assert 0 < before.free_bytes <= before.size_bytes
    write_random(f"{loop_btrfs.mount}/blob", 64 << 20)
    after = tool.usage(loop_btrfs.mount)
    assert after.size_bytes == before.size_bytes
    assert after.used_bytes - before.used_bytes >= 63 << 20
    assert before.free_bytes - after.free_bytes >= 63 << 20


def make_tree(mount: str) -> dict[str, str]:
    """a, a/b, a/b/c nested; 'dir x/sub y' in a plain folder; snap (of a); snap-ro."""
    paths = {name: f"{mount}/{name}" for name in ["a", "a/b", "a/b/c", "dir x/sub y"]}
    for name in ["a", "a/b", "a/b/c"]:
        subvol(paths[name])
    os.mkdir(f"{mount}/dir x")
    subvol(paths["dir x/sub y"])
    paths["snap"] = f"{mount}/snap"
    sh("btrfs", "subvolume", "snapshot", paths["a"], paths["snap"])
    paths["snap-ro"] = f"{mount}/snap-ro"
    sh("btrfs", "subvolume", "snapshot", "-r", paths["a"], paths["snap-ro"])
    return paths


@lab
def test_list_nested_subvolumes(loop_btrfs: LoopBtrfs, tool: BtrfsTool) -> None:
    paths = make_tree(loop_btrfs.mount)
    ids = {name: rootid(p) for name, p in paths.items()}
    records = {r.path: r for r in tool.list_subvolumes(loop_btrfs.mount)}
    assert set(records) == set(paths)
    expected_parent = {
        "a": 5,
        "a/b": ids["a"],
        "a/b/c": ids["a/b"],
        "dir x/sub y": 5,
        "snap": 5,
        "snap-ro": 5,
    }
    for name, rec in records.items():
        shown = show(paths[name])
        assert rec.id == ids[name] == int(shown["Subvolume ID"])
        assert rec.parent_id == expected_parent[name] == int(shown["Parent ID"])
        assert rec.generation == int(shown["Generation"])
        assert rec.uuid == shown["UUID"]
        assert rec.read_only is (name == "snap-ro")
        assert rec.created_at is not None and rec.created_at.tzinfo == UTC
        assert rec.created_at == BtrfsTool().created_at(paths[name])  # the same otime
        created = datetime.strptime(shown["Creation time"], "%Y-%m-%d %H:%M:%S %z")
        assert rec.created_at.replace(microsecond=0) == created
        assert rec.changed_at is not None
        if name not in ("snap", "snap-ro"):  # a snapshot starts with its source's ctime
            assert rec.changed_at >= rec.created_at
        assert rec.ctransid is not None and rec.ctransid <= rec.generation
    assert records["a"].parent_uuid is None
    assert records["snap"].parent_uuid == records["a"].uuid
    assert records["snap-ro"].parent_uuid == records["a"].uuid
    assert len({r.uuid for r in records.values()}) == len(records)


@lab
def test_list_from_a_subvolume_mount_gives_top_level_paths(
    loop_btrfs: LoopBtrfs, tool: BtrfsTool
) -> None:
    make_tree(loop_btrfs.mount)
    at = loop_btrfs.mount_subvolume("a", str(loop_btrfs.workdir / "a-mount"))
    from_top = tool.list_subvolumes(loop_btrfs.mount)
    assert tool.list_subvolumes(at) == from_top


def readonly_ids(tool: BtrfsTool, mount: str) -> set[int]:
    return {r.id for r in tool.list_subvolumes(mount) if r.read_only}


@lab
def test_read_only_flags_and_set_readonly(loop_btrfs: LoopBtrfs, changer: BtrfsTool) -> None:
    paths = make_tree(loop_btrfs.mount)
    assert readonly_ids(changer, loop_btrfs.mount) == {rootid(paths["snap-ro"])}

    changer.set_readonly(paths["a/b"], True)
    assert readonly_ids(changer, loop_btrfs.mount) == {
        rootid(paths["snap-ro"]),
        rootid(paths["a/b"]),
    }
    assert sh("btrfs", "property", "get", paths["a/b"], "ro").strip() == "ro=true"
    with pytest.raises(OSError) as exc:
        Path(paths["a/b"], "file").write_text("x")
    assert exc.value.errno == errno.EROFS

    changer.set_readonly(paths["a/b"], False)
    assert readonly_ids(changer, loop_btrfs.mount) == {rootid(paths["snap-ro"])}
    Path(paths["a/b"], "file").write_text("x")


@lab
def test_qgroups_none_when_off_and_real_sizes_when_on(
    loop_btrfs: LoopBtrfs, tool: BtrfsTool
) -> None:
    data = subvol(f"{loop_btrfs.mount}/data")
    empty = subvol(f"{loop_btrfs.mount}/empty")
    assert tool.qgroups(loop_btrfs.mount) is None
    assert tool.qgroups(loop_btrfs.mount) is None  # asking did not turn quotas on
    assert not os.path.exists(f"/sys/fs/btrfs/{loop_btrfs.uuid}/qgroups")

    sh("btrfs", "quota", "enable", loop_btrfs.mount)
    write_random(f"{data}/blob", 3 << 20)
    sh("btrfs", "quota", "rescan", "-w", loop_btrfs.mount)
    groups = tool.qgroups(loop_btrfs.mount)
    assert groups is not None
    data_id, empty_id = rootid(data), rootid(empty)
    assert {5, data_id, empty_id} <= set(groups)
    nodesize = loop_btrfs.nodesize
    assert groups[empty_id] == Qgroup(empty_id, nodesize, nodesize)
    assert 3 << 20 <= groups[data_id].exclusive < 4 << 20
    assert groups[data_id].referenced == groups[data_id].exclusive
    assert not groups.inconsistent


@lab
def test_default_subvolume(loop_btrfs: LoopBtrfs, tool: BtrfsTool) -> None:
    assert tool.default_subvolume(loop_btrfs.mount) == 5
    s = subvol(f"{loop_btrfs.mount}/new default")
    sh("btrfs", "subvolume", "set-default", str(rootid(s)), loop_btrfs.mount)
    assert tool.default_subvolume(loop_btrfs.mount) == rootid(s)


@lab
def test_delete_children_first_in_one_process(
    loop_btrfs: LoopBtrfs, tool: BtrfsTool, processes: list[list[str]]
) -> None:
    paths = make_tree(loop_btrfs.mount)
    batch = [paths["a/b/c"], paths["a/b"], paths["a"], paths["dir x/sub y"], paths["snap-ro"]]
    results = tool.delete(batch)
    assert results == [DeleteResult(p, ok=True) for p in batch]
    assert deletes(processes) == [batch]
    assert not any(os.path.lexists(p) for p in batch)
    assert os.path.isdir(f"{loop_btrfs.mount}/dir x")  # only the subvolume went
    assert [r.path for r in tool.list_subvolumes(loop_btrfs.mount)] == ["snap"]


@lab
def test_delete_parent_before_child_is_enotempty(loop_btrfs: LoopBtrfs, changer: BtrfsTool) -> None:
    paths = make_tree(loop_btrfs.mount)
    results = changer.delete([paths["a/b"], paths["a/b/c"]])
    assert results == [
        DeleteResult(paths["a/b"], ok=False, error="Directory not empty"),
        DeleteResult(paths["a/b/c"], ok=True),
    ]
    assert os.path.isdir(paths["a/b"])
    assert changer.delete([paths["a/b"]]) == [DeleteResult(paths["a/b"], ok=True)]


@lab
def test_delete_child_of_readonly_parent_is_erofs(
    loop_btrfs: LoopBtrfs, changer: BtrfsTool
) -> None:
    paths = make_tree(loop_btrfs.mount)
    changer.set_readonly(paths["a/b"], True)
    assert changer.delete([paths["a/b/c"]]) == [
        DeleteResult(paths["a/b/c"], ok=False, error="Read-only file system")
    ]
    assert os.path.isdir(paths["a/b/c"])
    changer.set_readonly(paths["a/b"], False)
    assert changer.delete([paths["a/b/c"], paths["a/b"]]) == [
        DeleteResult(paths["a/b/c"], ok=True),
        DeleteResult(paths["a/b"], ok=True),
    ]


@lab
def test_delete_readonly_leaf(loop_btrfs: LoopBtrfs, changer: BtrfsTool) -> None:
    leaf = subvol(f"{loop_btrfs.mount}/leaf")
    changer.set_readonly(leaf, True)
    assert changer.delete([leaf]) == [DeleteResult(leaf, ok=True)]
    assert not os.path.lexists(leaf)


@lab
def test_delete_mixed_batch_says_what_happened_to_each_path(
    loop_btrfs: LoopBtrfs, tool: BtrfsTool, processes: list[list[str]]
) -> None:
    m = loop_btrfs.mount
    x = subvol(f"{m}/x")
    q = subvol(f"{m}/q")
    subvol(f"{m}/q/c")
    p = subvol(f"{m}/p")
    child = subvol(f"{m}/p/child")
    tool.set_readonly(p, True)
    y = subvol(f"{m}/y with space")
    plain = f"{m}/plain"
    os.mkdir(plain)
    missing = f"{m}/missing"
    batch = [x, missing, q, child, y, plain]
    assert tool.delete(batch) == [
        DeleteResult(x, ok=True),
        DeleteResult(missing, ok=False, error="No such file or directory"),
        DeleteResult(q, ok=False, error="Directory not empty"),
        DeleteResult(child, ok=False, error="Read-only file system"),
        DeleteResult(y, ok=True),
        DeleteResult(plain, ok=False, error="Not a btrfs subvolume"),
    ]
    assert deletes(processes) == [batch]
    assert [os.path.lexists(path) for path in batch] == [False, False, True, True, False, True]


@lab
def test_delete_refuses_paths_through_symlinks(
    loop_btrfs: LoopBtrfs, tool: BtrfsTool, processes: list[list[str]]
) -> None:
    m = loop_btrfs.mount
    target = subvol(f"{m}/target")
    subvol(f"{m}/target/inner")
    os.symlink(target, f"{m}/link")
    results = tool.delete([f"{m}/link", f"{m}/link/inner"])
    assert [r.ok for r in results] == [False, False]
    assert all(r.error is not None and r.error.startswith("refused") for r in results)
    assert os.path.isdir(f"{target}/inner")
    assert deletes(processes) == []


@lab
def test_delete_long_batches_are_split_in_order(
    loop_btrfs: LoopBtrfs, processes: list[list[str]], btrfs_binary: str
) -> None:
    m = loop_btrfs.mount
    parents = [subvol(f"{m}/parent-{i:02d}") for i in range(8)]
    children = [subvol(f"{p}/child") for p in parents]
    batch = children + parents  # every child before its parent, across the chunks
    tool = BtrfsTool(binary=btrfs_binary, max_args_bytes=len(batch[0]) * 4)
    assert tool.delete(batch) == [DeleteResult(p, ok=True) for p in batch]
    chunks = deletes(processes)
    assert len(chunks) > 2
    assert [p for chunk in chunks for p in chunk] == batch


@lab
def test_sync_waits_for_the_cleaner(
    loop_btrfs: LoopBtrfs, tool: BtrfsTool, processes: list[list[str]]
) -> None:
    s = subvol(f"{loop_btrfs.mount}/big")
    write_random(f"{s}/blob", 32 << 20)
    assert tool.delete([s]) == [DeleteResult(s, ok=True)]
    tool.sync(loop_btrfs.mount)
    assert [c[1:] for c in processes if c[2:3] == ["sync"]] == [
        ["filesystem", "sync", loop_btrfs.mount],
        ["subvolume", "sync", loop_btrfs.mount],
    ]
    assert sh("btrfs", "subvolume", "list", "-d", loop_btrfs.mount).strip() == ""


@lab
def test_created_at_is_the_subvolumes_own_creation_time(
    loop_btrfs: LoopBtrfs, tool: BtrfsTool
) -> None:
    before = datetime.now(UTC)
    src = subvol(f"{loop_btrfs.mount}/src")
    after = datetime.now(UTC)
    created = tool.created_at(src)
    assert created is not None
    assert created.tzinfo == UTC
    assert before - timedelta(seconds=1) <= created <= after + timedelta(seconds=1)
    shown = datetime.strptime(show(src)["Creation time"], "%Y-%m-%d %H:%M:%S %z")
    assert created.replace(microsecond=0) == shown

    time.sleep(1.5)
    snap = f"{loop_btrfs.mount}/snap"
    sh("btrfs", "subvolume", "snapshot", src, snap)
    snap_created = tool.created_at(snap)
    assert snap_created is not None
    assert snap_created - created >= timedelta(seconds=1.4)
    assert abs(snap_created - datetime.now(UTC)) < timedelta(seconds=5)


@lab
def test_statx_birth_time_of_a_snapshot_is_its_sources(loop_btrfs: LoopBtrfs) -> None:
    """Why created_at does not use statx: a snapshot inherits its source's birth time."""
    src = subvol(f"{loop_btrfs.mount}/src")
    time.sleep(1.5)
    snap = f"{loop_btrfs.mount}/snap"
    sh("btrfs", "subvolume", "snapshot", src, snap)
    assert sh("stat", "-c", "%W", snap) == sh("stat", "-c", "%W", src)


@lab
def test_created_at_old_kernel_path_matches_the_new_one(loop_btrfs: LoopBtrfs) -> None:
    """The Linux 4.4 route (INO_LOOKUP + TREE_SEARCH on the root item) reads the same
    time as the >= 4.18 ioctl, to the nanosecond's microsecond."""
    paths = make_tree(loop_btrfs.mount)
    for path in paths.values():
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            new = otime_via_subvol_info(fd)
            old = otime_via_tree_search(fd)
        finally:
            os.close(fd)
        assert new is not None
        assert old == new


@lab
def test_created_at_none_when_not_a_subvolume(loop_btrfs: LoopBtrfs, tool: BtrfsTool) -> None:
    m = loop_btrfs.mount
    os.mkdir(f"{m}/plain")
    s = subvol(f"{m}/s")
    os.symlink(s, f"{m}/link")
    assert tool.created_at(f"{m}/plain") is None
    assert tool.created_at(f"{m}/missing") is None
    assert tool.created_at(f"{m}/link") is None
    assert tool.created_at(s) is not None


@lab
def test_failed_command_carries_its_output(tmp_path: Path, tool: BtrfsTool) -> None:
    with pytest.raises(BtrfsCommandError) as exc:
        tool.usage(str(tmp_path))
    assert exc.value.cmd[1:] == ("filesystem", "usage", "-b", str(tmp_path))
    assert exc.value.returncode == 1
    assert "not a btrfs filesystem" in exc.value.stderr


@lab
def test_missing_binary_deletes_nothing(loop_btrfs: LoopBtrfs) -> None:
    s = subvol(f"{loop_btrfs.mount}/kept")
    tool = BtrfsTool(binary="/nonexistent/btrfs")
    calls: list[Callable[[], object]] = [
        lambda: tool.delete([s]),
        lambda: tool.usage(loop_btrfs.mount),
        lambda: tool.set_readonly(s, True),
    ]
    for call in calls:
        with pytest.raises(BtrfsUnavailable):
            call()
    assert os.path.isdir(s)
    assert os.stat(s).st_ino == 256  # still a subvolume
    # the listings are ioctls: no binary needed
    assert [r.path for r in tool.list_subvolumes(loop_btrfs.mount)] == ["kept"]
    assert tool.qgroups(loop_btrfs.mount) is None


def test_delete_stops_when_btrfs_disappears_after_a_chunk(fake: FakeBtrfs, tmp_path: Path) -> None:
    fake.script(body='rm -f "$0"')  # runs once, then there is no btrfs any more
    dirs = [str(tmp_path / f"d{i}") for i in range(6)]
    for d in dirs:
        os.mkdir(d)
    tool = BtrfsTool(binary=fake.path, max_args_bytes=len(dirs[0]) * 3)
    results = tool.delete(dirs)
    assert fake.argv[:2] == ["subvolume", "delete"]
    ran = len(fake.argv) - 2
    assert 0 < ran < len(dirs)
    assert [r.error for r in results[:ran]] == ["Not a btrfs subvolume"] * ran
    for r in results[ran:]:
        assert not r.ok
        assert r.error is not None and r.error.startswith("not attempted: btrfs became unavailable")
    with pytest.raises(BtrfsUnavailable):  # nothing ran this time
        tool.delete(dirs)


@lab
def test_delete_timeout_reports_and_stops(loop_btrfs: LoopBtrfs, fake: FakeBtrfs) -> None:
    subvols = [subvol(f"{loop_btrfs.mount}/s{i}") for i in range(4)]
    fake.script(body="exec sleep 30")
    tool = BtrfsTool(binary=fake.path, timeout=0.5, max_args_bytes=len(subvols[0]) * 3)
    results = tool.delete(subvols)
    assert not any(r.ok for r in results)
    ran = len(fake.argv) - 2
    assert 0 < ran < len(subvols)
    for r in results[:ran]:
        assert r.error == "not deleted; btrfs said: timed out after 0.5s and was killed"
    for r in results[ran:]:
        assert r.error == "not attempted: an earlier btrfs subvolume delete timed out"
    assert all(os.path.isdir(s) for s in subvols)


@lab
def test_created_at_on_kernels_without_get_subvol_info(
    loop_btrfs: LoopBtrfs, tool: BtrfsTool, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = subvol(f"{loop_btrfs.mount}/s")
    expected = tool.created_at(s)
    assert expected is not None

    def enotty(fd: int) -> None:
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))

    monkeypatch.setattr(agent_ioctl, "otime_via_subvol_info", enotty)
    assert tool.created_at(s) == expected  # through INO_LOOKUP + TREE_SEARCH

    def eperm(fd: int) -> None:  # not root on an old kernel
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(agent_ioctl, "otime_via_tree_search", eperm)
    assert tool.created_at(s) is None


@lab
def test_delete_refusals_of_btrfs_itself(loop_btrfs: LoopBtrfs, tool: BtrfsTool) -> None:
    m = loop_btrfs.mount
    default = subvol(f"{m}/default")
    leaf = subvol(f"{m}/leaf")
    sh("btrfs", "subvolume", "set-default", str(rootid(default)), m)
    # btrfs-progs 5+ refuses the default subvolume itself; 4.4.1 tries, and the kernel
    # refuses it (EPERM)
    old = tool.version().startswith("4.")
    refused = "Operation not permitted" if old else "It is the default subvolume"
    assert tool.delete([m, default, leaf]) == [
        DeleteResult(m, ok=False, error="Not on a btrfs filesystem"),
        DeleteResult(default, ok=False, error=refused),
        DeleteResult(leaf, ok=True),
    ]
    assert os.path.isdir(default)


@lab
def test_a_delete_scope_lists_what_the_full_listing_does_for_it(
    loop_btrfs: LoopBtrfs, tool: BtrfsTool, tmp_path: Path
) -> None:
    """On a real filesystem: the subvolumes in a volume's folder (nested at several
    depths, read-only ones, one holding a child), the subvolumes holding them, and no
    other, each record exactly as the full listing gives it; by id too."""
    m = loop_btrfs.mount
    root = subvol(f"{m}/docker")
    vols = f"{root}/volumes"
    data = f"{vols}/v1/_data/btrfs/subvolumes"
    os.makedirs(data)
    a, b = subvol(f"{data}/a"), subvol(f"{data}/b")
    child = subvol(f"{a}/child")
    os.makedirs(f"{child}/deep")
    grand = subvol(f"{child}/deep/grand")
    sh("btrfs", "property", "set", a, "ro", "true")
    os.makedirs(f"{vols}/v2/_data")
    other_vol = subvol(f"{vols}/v2/_data/x")
    os.makedirs(f"{vols}/v1x")  # a name that starts like v1's
    near = subvol(f"{vols}/v1x/s")
    whole = subvol(f"{vols}/v3")  # a volume's folder that is a subvolume itself
    inner = subvol(f"{whole}/_data")
    os.makedirs(f"{m}/others")
    others = [subvol(f"{m}/others/s{i:02d}") for i in range(20)]
    layers = f"{root}/btrfs/subvolumes"
    os.makedirs(layers)
    layer = subvol(f"{layers}/l1")
    full = {r.id: r for r in tool.list_subvolumes(m)}
    ids = {p: rootid(p) for p in (root, a, b, child, grand, other_vol, near, whole, inner, layer)}

    def scoped(**kw: object) -> dict[int, object]:
        got = tool.list_scope(m, **kw)  # type: ignore[arg-type]
        assert got.default_id == 5
        return {r.id: r for r in got.records}

    v1 = scoped(folder=f"{vols}/v1")
    assert set(v1) == {ids[root], ids[a], ids[b], ids[child], ids[grand]}
    assert all(v1[i] == full[i] for i in v1)
    assert [full[i].read_only for i in (ids[a], ids[b])] == [True, False]
    v3 = scoped(folder=whole)
    assert set(v3) == {ids[root], ids[whole], ids[inner]}
    assert scoped(folder=f"{vols}/gone") == {}
    assert scoped(folder=str(tmp_path)) == {}  # not this filesystem
    by_id = scoped(ids=(ids[child],))
    assert set(by_id) == {ids[root], ids[a], ids[child], ids[grand]}
    assert all(by_id[i] == full[i] for i in by_id)
    assert scoped(ids=(rootid(others[3]),)) == {rootid(others[3]): full[rootid(others[3])]}
    assert scoped(ids=(999_999,)) == {}
    sh("btrfs", "subvolume", "set-default", str(ids[b]), m)
    assert tool.list_scope(m, ids=()).default_id == ids[b] == tool.default_subvolume(m)


@lab
def test_ioctl_changes_start_no_process_and_say_what_happened(
    loop_btrfs: LoopBtrfs, btrfs_binary: str, processes: list[list[str]]
) -> None:
    """By ioctl: the same answers as btrfs-progs for each path of a mixed batch, the
    kernel's refusal of the default subvolume, nothing through a symlink, no process."""
    tool = BtrfsTool(binary=btrfs_binary, subvolume_ioctls=True)
    m = loop_btrfs.mount
    x = subvol(f"{m}/x")
    q = subvol(f"{m}/q")
    subvol(f"{m}/q/c")
    p = subvol(f"{m}/p")
    child = subvol(f"{m}/p/child")
    tool.set_readonly(p, True)
    tool.set_readonly(p, True)  # already: nothing changes
    assert sh("btrfs", "property", "get", p, "ro").strip() == "ro=true"
    plain = f"{m}/plain"
    os.mkdir(plain)
    missing = f"{m}/missing"
    default = subvol(f"{m}/default")
    sh("btrfs", "subvolume", "set-default", str(rootid(default)), m)
    os.symlink(x, f"{m}/link")
    batch = [f"{m}/link", x, missing, q, child, plain, default]
    assert tool.delete(batch) == [
        DeleteResult(f"{m}/link", ok=False, error=f"refused: the path resolves to {x!r}"),
        DeleteResult(x, ok=True),
        DeleteResult(missing, ok=False, error="No such file or directory"),
        DeleteResult(q, ok=False, error="Directory not empty"),
        DeleteResult(child, ok=False, error="Read-only file system"),
        DeleteResult(plain, ok=False, error="Not a btrfs subvolume"),
        DeleteResult(default, ok=False, error="Operation not permitted"),
    ]
    with pytest.raises(BtrfsCommandError):
        tool.set_readonly(plain, True)
    tool.set_readonly(p, False)
    assert tool.delete([child, p]) == [DeleteResult(child, ok=True), DeleteResult(p, ok=True)]
    assert processes == []
