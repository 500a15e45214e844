"""The mount tables from ``/proc`` (``agent.host.mounttables``), over proc trees made
in a temporary folder from a real captured table, and this machine's own."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import BtrfsUnavailable, HostMountsUnavailable
from agent.host import mounttables
from agent.host.mounttables import (
    PROC_PID_INIT_INO,
    read_host_mounts,
    read_mounts,
    read_namespace_mounts,
)
from agent.host.records import MountEntry
from tests.agent.host.test_btrfs_parse import CAPTURES
from tests.namespaces import pinned_namespace_tmpfs


def test_mounts_from_proc_root(tmp_path: Path) -> None:
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "mountinfo").write_bytes(
        (CAPTURES / "linux" / "mountinfo.txt").read_bytes()
    )
    mounts = read_mounts(str(tmp_path))
    # every type: a tmpfs or a bind mount of another filesystem can hold a target too
    assert len(mounts) == 9
    assert {m.fstype for m in mounts} >= {"tmpfs", "ext4", "btrfs", "proc"}
    btrfs = [m for m in mounts if m.fstype == "btrfs"]
    assert [m.mountpoint for m in btrfs] == [
        "/srv/lab/volume 1",
        "/srv/lab/back\\slash",
        "/srv/lab/tab\tdir",
    ]
    assert btrfs[1].root == "/docker" and btrfs[1].dev == "0:43"


def test_a_table_read_again_is_parsed_again_only_when_it_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "self").mkdir()
    table = tmp_path / "self" / "mountinfo"
    text = (CAPTURES / "linux" / "mountinfo.txt").read_text()
    table.write_text(text)
    parsed: list[str] = []
    real_parse = mounttables.parse_mountinfo

    def counting_parse(text: str, fstype: str | None = None) -> list[MountEntry]:
        parsed.append(text)
        return real_parse(text, fstype)

    monkeypatch.setattr(mounttables, "parse_mountinfo", counting_parse)
    monkeypatch.setattr(mounttables.parse_mounts, "known", {})  # what earlier tests parsed
    first = read_mounts(str(tmp_path))
    first.clear()  # what a caller does with its list is its own
    again = read_mounts(str(tmp_path))
    assert len(parsed) == 1 and len(again) == 9
    # one mount fewer: read as it is now
    table.write_text("".join(text.splitlines(keepends=True)[:-1]))
    assert len(read_mounts(str(tmp_path))) == 8 and len(parsed) == 2


def test_the_parsed_tables_remembered_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mounttables.parse_mounts, "known", {})
    line = "{0} 1 0:{0} / /m{0} rw - tmpfs t rw\n"
    for i in range(3 * mounttables.parse_mounts.limit):
        (entry,) = mounttables.parse_mounts(line.format(i + 1))
        assert entry.mountpoint == f"/m{i + 1}"
        assert len(mounttables.parse_mounts.known) <= mounttables.parse_mounts.limit


def test_mounts_unreadable_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(BtrfsUnavailable, match="mount table"):
        read_mounts(str(tmp_path / "nowhere"))


def _fake_proc(tmp_path: Path, *, pid_ns: int) -> Path:
    """A proc tree with pid 1's mountinfo and this process's pid namespace link."""
    proc = tmp_path / "proc"
    (proc / "1").mkdir(parents=True)
    (proc / "self" / "ns").mkdir(parents=True)
    (proc / "1" / "mountinfo").write_bytes((CAPTURES / "linux" / "mountinfo.txt").read_bytes())
    (proc / "self" / "ns" / "pid").symlink_to(f"pid:[{pid_ns}]")
    return proc


def test_host_mounts_are_pid_1s(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path, pid_ns=PROC_PID_INIT_INO)
    host = read_host_mounts(str(proc))
    assert len(host) == 9 and host[0].mountpoint == "/proc"


def test_host_mounts_need_the_hosts_pid_namespace(tmp_path: Path) -> None:
    # a container without `pid: host`: pid 1 is the container's own first process
    proc = _fake_proc(tmp_path, pid_ns=4026532201)
    with pytest.raises(HostMountsUnavailable, match="pid: host"):
        read_host_mounts(str(proc))


def test_host_mounts_unreadable_is_unavailable(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path, pid_ns=PROC_PID_INIT_INO)
    (proc / "1" / "mountinfo").unlink()
    with pytest.raises(HostMountsUnavailable, match="host's mount table"):
        read_host_mounts(str(proc))


def test_host_mounts_of_this_machine() -> None:
    """Outside a pid namespace, pid 1's table is the host's: it holds / itself; and
    this process's pid namespace is recognised as the initial one."""
    if os.readlink("/proc/self/ns/pid") != f"pid:[{PROC_PID_INIT_INO}]":
        pytest.skip("runs in a pid namespace of its own")
    assert any(m.mountpoint == "/" for m in read_host_mounts("/proc"))


def _table(first_id: int) -> str:
    return (
        f"{first_id} 1 0:90 / / rw - overlay overlay rw\n"
        f"{first_id + 1} {first_id} 0:91 / /in rw - tmpfs tmpfs rw\n"
    )


def _namespaces(tmp_path: Path) -> Path:
    """pid 1 and this process in the host's namespace, pid 100 too, pid 200 and 201 in
    one other namespace, pid 300 gone (no table)."""
    proc = _fake_proc(tmp_path, pid_ns=PROC_PID_INIT_INO)
    host = (proc / "1" / "mountinfo").read_text()
    (proc / "self" / "mountinfo").write_text(host)
    for pid, text in (("100", host), ("200", _table(500)), ("201", _table(500))):
        (proc / pid).mkdir()
        (proc / pid / "mountinfo").write_text(text)
    (proc / "300").mkdir()
    return proc


def test_other_namespaces_are_read_once_each(tmp_path: Path) -> None:
    tables = read_namespace_mounts(str(_namespaces(tmp_path)))
    assert [t.pid for t in tables] == [200]
    assert [m.mountpoint for m in tables[0].mounts] == ["/", "/in"]


def test_other_namespaces_need_the_hosts_pid_namespace(tmp_path: Path) -> None:
    proc = _namespaces(tmp_path)
    (proc / "self" / "ns" / "pid").unlink()
    (proc / "self" / "ns" / "pid").symlink_to("pid:[4026532201]")
    with pytest.raises(HostMountsUnavailable, match="pid: host"):
        read_namespace_mounts(str(proc))


def test_too_many_namespaces_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = _namespaces(tmp_path)
    (proc / "400").mkdir()
    (proc / "400" / "mountinfo").write_text(_table(700))
    monkeypatch.setattr(mounttables, "MAX_MOUNT_NAMESPACES", 1)
    with pytest.raises(HostMountsUnavailable, match="more than 1 mount namespaces"):
        read_namespace_mounts(str(proc))


def test_an_unreadable_table_of_another_namespace_is_unavailable(tmp_path: Path) -> None:
    proc = _namespaces(tmp_path)
    (proc / "200" / "mountinfo").unlink()
    (proc / "200" / "mountinfo").mkdir()  # reading it fails (EISDIR), even for root
    with pytest.raises(HostMountsUnavailable, match="200/mountinfo"):
        read_namespace_mounts(str(proc))


# ----------------------------------------------- namespaces no process is in (pinned)


def test_a_pinned_namespace_that_cannot_be_entered_is_unavailable(tmp_path: Path) -> None:
    """An ``nsfs`` mount of a mount namespace in a table, whose file is not one (here a
    plain file): it cannot be entered, so what it mounts cannot be told."""
    proc = _namespaces(tmp_path)
    fake_pin = tmp_path / "not-an-ns"
    fake_pin.write_text("")
    line = f"900 1 0:4 mnt:[4026532999] {fake_pin} rw - nsfs nsfs rw\n"
    with open(proc / "self" / "mountinfo", "a") as f:
        f.write(line)
    with pytest.raises(HostMountsUnavailable, match=r"mnt:\[4026532999\].*cannot be entered"):
        read_namespace_mounts(str(proc))


def test_pins_of_other_namespace_kinds_are_not_mount_namespaces(tmp_path: Path) -> None:
    proc = _namespaces(tmp_path)
    with open(proc / "self" / "mountinfo", "a") as f:
        f.write(f"901 1 0:4 net:[4026532181] {tmp_path}/netns rw - nsfs nsfs rw\n")
    assert [t.pid for t in read_namespace_mounts(str(proc))] == [200]


@pytest.fixture
def pinned(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A real mount namespace no process is in (``unshare --mount=FILE``), holding a
    tmpfs at a folder that is a plain folder here."""
    target = tmp_path / "target"
    with pinned_namespace_tmpfs(tmp_path, target) as (pin, _read):
        yield pin, target


def test_a_namespace_no_process_is_in_is_read_by_entering_it(
    pinned: tuple[Path, Path],
) -> None:
    pin, target = pinned
    assert not os.path.ismount(target)  # invisible here
    tables = [t for t in read_namespace_mounts("/proc") if t.pinned_at is not None]
    (table,) = [t for t in tables if t.pinned_at == str(pin)]
    assert table.pid == 0
    assert any(m.mountpoint == str(target) and m.fstype == "tmpfs" for m in table.mounts)


def test_a_proc_file_longer_than_a_page_is_read_whole() -> None:
    """A seq_file (a mount table, ``maps``) gives about a page per read, whatever was
    asked: a short read is no end. This process's ``maps`` is several pages long."""
    for _ in range(5):  # the interpreter may map something between the two reads
        whole = Path("/proc/self/maps").read_bytes().decode("utf-8", "surrogateescape")
        got = mounttables.read_proc_file("/proc/self/maps")
        if got == whole:
            break
    assert len(whole) > 2 * 4096
    assert got == whole


def test_a_one_record_proc_file_is_read_in_one_go_and_a_long_one_whole(tmp_path: Path) -> None:
    stat = Path("/proc/self/stat").read_text()
    got = mounttables.read_proc_file("/proc/self/stat", record=True)
    assert got.split(")", 1)[0] == stat.split(")", 1)[0]  # the same process, its name
    assert got.endswith("\n") and len(got.split()) == len(stat.split())
    long = tmp_path / "long"
    long.write_bytes(b"x" * 10_000 + b"\n")  # longer than a page: read to its end
    assert mounttables.read_proc_file(str(long), record=True) == "x" * 10_000 + "\n"
