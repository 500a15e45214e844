"""What processes and the kernel hold open (``agent.host.holders``): the parsers on real
captured text (tests/agent/captures/linux/), and ``read_holders`` on this machine's own
``/proc`` with processes this test starts."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import HoldersUnavailable
from agent.host import holders
from agent.host.btrfs_parse import parse_mountinfo
from agent.host.holders import (
    overlay_dirs,
    parse_maps,
    parse_stat,
    parse_swaps,
    read_holders,
)
from agent.host.records import Holders
from tests.agent.host.test_btrfs_parse import CAPTURES
from tests.namespaces import fd_held_namespace_tmpfs

LINUX = CAPTURES / "linux"


def test_maps_gives_each_mapped_file_once_without_the_deleted_mark() -> None:
    files = parse_maps((LINUX / "maps.txt").read_text())
    assert sorted(files) == sorted(
        [
            "/usr/bin/python3.11",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "/srv/lab/tail",  # "tail (deleted)": a file of that name, or "tail" unlinked
            "/srv/lab/new\\012line",
            "/srv/lab/new\nline",  # a backslash is not escaped there: both readings
            "/srv/lab/gone",
            "/srv/lab/mapped file",
        ]
    )
    assert not any(f.startswith("[") for f in files)  # [heap], [stack], [vdso]


def test_swaps_unescapes_the_name() -> None:
    assert parse_swaps((LINUX / "swaps.txt").read_text()) == ["/srv/lab/swap file"]
    assert parse_swaps("Filename\tType\tSize\tUsed\tPriority\n") == []


def test_overlay_dirs_of_a_real_mount_line_with_escaped_colon_comma_and_space() -> None:
    (entry,) = parse_mountinfo((LINUX / "overlay-mountinfo.txt").read_text())
    assert overlay_dirs(entry) == [
        "/srv/lab/lo,w1",
        "/srv/lab/lo:w2",
        "/srv/lab/up per",
        "/srv/lab/work",
    ]


def test_overlay_relative_and_data_only_layers() -> None:
    (entry,) = parse_mountinfo(
        "7 1 0:9 / /m rw - overlay overlay rw,lowerdir=l/ABC:/a::/data,upperdir=/u,workdir=/w\n"
    )
    # a relative lower folder cannot be placed (relative to its mounter's folder)
    assert overlay_dirs(entry) == ["/a", "/data", "/u", "/w"]
    (btrfs,) = parse_mountinfo("8 1 0:43 / /b rw - btrfs /dev/loop1 rw,subvol=/\n")
    assert overlay_dirs(btrfs) == []


def test_stat_with_a_name_holding_parentheses_and_spaces() -> None:
    assert parse_stat("812 (a) b (c)) S 77 812 812 0 -1 4194560 12 0") == (77, 4194560)
    assert parse_stat((Path("/proc/self/stat")).read_text())[0] == os.getppid()


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A process of this test's with its working folder in ``tmp_path`` and a file there
    open on fd 3; ended by pid."""
    held = tmp_path / "held file"
    held.write_bytes(b"x" * 100)
    proc = subprocess.Popen(
        ["sh", "-c", "exec 3<'held file' && echo ready && exec sleep 600"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    comm = Path(f"/proc/{proc.pid}/comm")
    while comm.read_text().strip() != "sleep":  # the shell's exec is done
        time.sleep(0.01)
    try:
        yield proc, held
    finally:
        proc.kill()
        proc.wait()


def _unreadable_here() -> list[int]:
    try:
        os.readlink("/proc/1/cwd")
    except PermissionError:
        return [1]
    return []


def _held_by(found: Holders, pid: int) -> dict[str, str]:
    return {h.path: h.who for t in found.tables for h in t.held if h.who.startswith(f"pid {pid} ")}


def test_read_holders_sees_a_real_process_working_folder_and_open_file(
    sleeper: tuple[subprocess.Popen[bytes], Path],
) -> None:
    proc, held = sleeper
    found = read_holders(allowed_unreadable=_unreadable_here())
    mine = _held_by(found, proc.pid)
    assert mine[str(held.parent)].endswith("(sleep), working folder")
    assert mine[str(held)].endswith("(sleep), open file")
    # its program too (named once per namespace: by the first process holding it)
    program = os.readlink(f"/proc/{proc.pid}/exe")
    assert any(h.path == program for t in found.tables for h in t.held)
    # this process is the agent here: what it holds is not counted
    assert not _held_by(found, os.getpid())
    # each namespace's paths come with its table to place them by
    (table,) = [t for t in found.tables if any(h.path == str(held) for h in t.held)]
    assert any(m.mountpoint == "/" for m in table.mounts)


def test_the_agents_own_btrfs_children_and_server_do_not_count(
    sleeper: tuple[subprocess.Popen[bytes], Path],
) -> None:
    proc, _ = sleeper
    exe = os.path.realpath(f"/proc/{proc.pid}/exe")
    # a child of ours running the "helper" program is the agent's own
    found = read_holders(allowed_unreadable=_unreadable_here(), helper_exes={exe})
    assert not _held_by(found, proc.pid)
    # so is every child of the server process
    found = read_holders(allowed_unreadable=_unreadable_here(), agent_pids={os.getpid()})
    assert not _held_by(found, proc.pid)


def test_an_unreadable_process_refuses_unless_allowed() -> None:
    """This machine's pid 1 denies even root (``EACCES``): where it does, the read is
    refused, naming it, unless that pid is allowed to be unreadable. (Root reads a
    folder of mode 000 anyway, so no made-up tree can show the kernel's EACCES.)"""
    if not _unreadable_here():
        pytest.skip("every process is readable here: no EACCES to see")
    with pytest.raises(HoldersUnavailable, match=r"pid 1 .*CAP_SYS_PTRACE"):
        read_holders()
    assert read_holders(allowed_unreadable=[1]).skipped == (1,)


def test_not_in_the_hosts_pid_namespace_is_refused(tmp_path: Path) -> None:
    (tmp_path / "self" / "ns").mkdir(parents=True)
    os.symlink("pid:[4026532999]", tmp_path / "self" / "ns" / "pid")
    with pytest.raises(HoldersUnavailable, match="pid: host"):
        read_holders(str(tmp_path), str(tmp_path))


def test_more_than_the_bound_is_refused(
    monkeypatch: pytest.MonkeyPatch, sleeper: tuple[subprocess.Popen[bytes], Path]
) -> None:
    monkeypatch.setattr(holders, "MAX_HELD", 5)
    with pytest.raises(HoldersUnavailable, match="more than 5"):
        read_holders(allowed_unreadable=_unreadable_here())


def test_a_loop_devices_backing_file_from_sysfs(tmp_path: Path) -> None:
    """A sys tree made here (a loop device bound to a file, one unbound) and this
    machine's own /proc."""
    bound = tmp_path / "sys" / "block" / "loop3" / "loop"
    bound.mkdir(parents=True)
    (bound / "backing_file").write_text("/srv/lab/v/disk.img\n")
    (tmp_path / "sys" / "block" / "loop4").mkdir()
    (tmp_path / "sys" / "block" / "sda").mkdir()
    found = read_holders("/proc", str(tmp_path / "sys"), allowed_unreadable=_unreadable_here())
    assert [(h.path, h.who) for h in found.everywhere if "loop" in h.who] == [
        ("/srv/lab/v/disk.img", "loop device /dev/loop3 (its backing file)")
    ]


_THREAD_CWD = """
import ctypes, os, sys, threading, time
def run():
    ctypes.CDLL(None, use_errno=True).unshare(0x200)  # CLONE_FS: a folder of its own
    os.chdir(sys.argv[1])
    print(threading.get_native_id(), flush=True)
    time.sleep(600)
threading.Thread(target=run, daemon=True).start()
time.sleep(600)
"""


def test_a_threads_own_working_folder(tmp_path: Path) -> None:
    """A thread that unshared its filesystem context (as Samba's do) and went into a
    folder: the process's own working folder is elsewhere."""
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", _THREAD_CWD, str(tmp_path)], stdout=subprocess.PIPE, cwd="/"
    )
    try:
        assert proc.stdout is not None
        tid = int(proc.stdout.readline())
        found = read_holders(allowed_unreadable=_unreadable_here())
        assert _held_by(found, proc.pid)[str(tmp_path)].endswith(f"working folder of thread {tid}")
    finally:
        proc.kill()
        proc.wait()


def test_what_a_namespace_of_only_chrooted_processes_holds_is_placed_everywhere(
    tmp_path: Path,
) -> None:
    """``unshare -m chroot``: the only process of its namespace has a root of its own;
    its table shows nothing its paths could be placed by."""
    box = tmp_path / "box"
    (box / "bin").mkdir(parents=True)
    busybox = box / "bin" / "busybox"
    busybox.write_bytes(Path("/usr/bin/busybox").read_bytes())  # static
    busybox.chmod(0o755)
    (box / "work").mkdir()
    proc = subprocess.Popen(
        [
            "unshare", "-m", "chroot", str(box),
            "/bin/busybox", "sh", "-c", "cd /work && echo ready && exec /bin/busybox sleep 600",
        ],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        comm = Path(f"/proc/{proc.pid}/comm")
        while comm.read_text().strip() != "busybox" or Path(
            f"/proc/{proc.pid}/cwd"
        ).resolve() == Path("/"):
            time.sleep(0.01)
        found = read_holders(allowed_unreadable=_unreadable_here())
        assert not _held_by(found, proc.pid)  # in no table
        mine = {h.path: h.who for h in found.everywhere if h.who.startswith(f"pid {proc.pid} ")}
        assert mine[str(box / "work")].endswith("working folder")
        assert mine[str(box)].endswith(", root")
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def held_namespace(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A mount namespace that no process is in, held open by a process's fd, with a
    tmpfs at a folder that is a plain folder here."""
    target = tmp_path / "target"
    with fd_held_namespace_tmpfs(target) as (keeper, _read):
        yield keeper, target


def test_a_namespace_held_open_by_an_fd_is_read_by_entering_it(
    held_namespace: tuple[int, Path],
) -> None:
    keeper, target = held_namespace
    assert not os.path.ismount(target)
    found = read_holders(allowed_unreadable=_unreadable_here())
    (table,) = [t for t in found.hidden_namespaces if f"of pid {keeper}" in (t.pinned_at or "")]
    assert table.pid == 0
    assert any(m.mountpoint == str(target) and m.fstype == "tmpfs" for m in table.mounts)


def test_the_mapped_files_remembered_are_bounded_and_follow_the_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(holders._mapped_files, "known", {})
    line = "7f00-7f01 r--p 00000000 08:01 {0} /lib/m{0}.so\n"
    for i in range(3 * holders._mapped_files.limit):
        assert holders._mapped_files(line.format(i)) == (f"/lib/m{i}.so",)
        assert len(holders._mapped_files.known) <= holders._mapped_files.limit
    assert holders._mapped_files(line.format(7) + line.format(8)) == ("/lib/m7.so", "/lib/m8.so")
