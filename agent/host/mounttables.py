"""The mount tables: this process's, the host's (pid 1's) and every other mount
namespace's, from ``/proc`` (any filesystem type; parsing in
``agent.host.btrfs_parse.parse_mountinfo``)."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Generic, TypeVar

from agent.errors import BtrfsUnavailable, HostMountsUnavailable
from agent.host.btrfs_parse import parse_mountinfo
from agent.host.records import MountEntry, NamespaceTable

T = TypeVar("T")

# Mount namespaces read at most (every container has one; beyond: not all are seen).
MAX_MOUNT_NAMESPACES = 4096

_CHUNK = 65536


class TextMemo(Generic[T]):
    """``parse(text)`` remembered for the same text, for the ``/proc`` files read again
    and again unchanged (a delete reads every namespace's mount table and every
    process's ``maps`` four times). Keyed by the whole text, so a changed file is always
    parsed again; at most ``limit`` texts are kept (all are dropped when full)."""

    def __init__(self, parse: Callable[[str], T], limit: int) -> None:
        self._parse, self.limit = parse, limit
        self.known: dict[str, T] = {}

    def __call__(self, text: str) -> T:
        known = self.known.get(text)
        if known is None:
            known = self._parse(text)
            if len(self.known) >= self.limit:
                self.known.clear()
            self.known[text] = known
        return known


parse_mounts = TextMemo(lambda text: tuple(parse_mountinfo(text)), 256)


def read_proc_file(path: str, *, record: bool = False) -> str:
    """The whole of a ``/proc`` file, by ``os.read`` (no buffered text file around it:
    the holders' read runs this for every process, several times per delete).
    ``OSError`` as the kernel says.

    Read to its end: a read of a seq_file (a mount table, ``maps``) gives at most about
    a page whatever was asked, so a short read is no end. ``record``: a file of one
    short record (``stat``): the kernel gives a whole record in one read when it fits,
    so a first read shorter than a page is all of it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        first = os.read(fd, 4096 if record else _CHUNK)
        parts = [first]
        if first and not (record and len(first) < 4096):
            while chunk := os.read(fd, _CHUNK):
                parts.append(chunk)
    finally:
        os.close(fd)
    return b"".join(parts).decode("utf-8", "surrogateescape")


def read_mounts(proc_root: str) -> list[MountEntry]:
    """Every mount this process sees, of any type (local paths)."""
    path = os.path.join(proc_root, "self/mountinfo")
    try:
        text = read_proc_file(path)
    except OSError as e:
        raise BtrfsUnavailable(f"cannot read the mount table {path}: {e.strerror}") from e
    return list(parse_mounts(text))


def read_host_mounts(proc_root: str) -> list[MountEntry]:
    """Every mount of the host's mount namespace, of any type, with host paths: the
    table of pid 1 (``/proc/1/mountinfo``; its paths are relative to pid 1's root).

    That is the host's only when this process is in the host's (the initial) pid
    namespace: in a container with a pid namespace of its own, pid 1 is the
    container's first process and its table the container's, where a mount made on
    the host is invisible. That is refused (``HostMountsUnavailable``)."""
    path = os.path.join(proc_root, "1/mountinfo")
    try:
        if not in_initial_pid_namespace(proc_root):
            raise HostMountsUnavailable(
                "the agent runs in a pid namespace of its own (a container without "
                "the host's pid namespace): pid 1 is not the host's and mounts made "
                "on the host are invisible; run it with `pid: host` (docker-compose) "
                "or `--pid host`"
            )
        text = read_proc_file(path)
    except OSError as e:
        raise HostMountsUnavailable(
            f"cannot read the host's mount table {path}: {e.strerror}"
        ) from e
    return list(parse_mounts(text))


def read_namespace_mounts(proc_root: str) -> list[NamespaceTable]:
    """The mount tables of every mount namespace but the host's (pid 1's) and this
    process's: one ``/proc/<pid>/mountinfo`` per namespace. A mount belongs to one
    namespace only, so the id on the first line of a process's table names its
    namespace; only that line is read for the others in it. No capability is needed
    (``/proc/<pid>/ns/mnt`` would need CAP_SYS_PTRACE for other users' processes).

    Needs the host's pid namespace, as ``read_host_mounts`` does. A process that ends
    meanwhile is passed over; a table that cannot be read, or more than
    ``MAX_MOUNT_NAMESPACES`` namespaces, raise ``HostMountsUnavailable`` (what is
    mounted there cannot be told)."""
    if not in_initial_pid_namespace(proc_root):
        raise HostMountsUnavailable(
            "the agent runs in a pid namespace of its own: the mount namespaces of the "
            "host's processes are invisible; run it with `pid: host`"
        )
    # this process's table and the host's, read whole once: their first mount ids name
    # the namespaces not to list again, their nsfs mounts may pin others
    own: list[tuple[str, list[MountEntry]]] = []
    seen: set[bytes | None] = set()
    for who in ("self", "1"):
        path = os.path.join(proc_root, who, "mountinfo")
        try:
            text = read_proc_file(path)
        except OSError as e:
            raise HostMountsUnavailable(f"cannot read the mount table {path}: {e.strerror}") from e
        seen.add(text.split(" ", 1)[0].encode() or None)
        own.append((who, list(parse_mounts(text))))
    tables: list[NamespaceTable] = []
    try:
        pids = sorted(int(p) for p in os.listdir(proc_root) if p.isdigit())
    except OSError as e:
        raise HostMountsUnavailable(f"cannot list {proc_root}: {e.strerror}") from e
    for pid in pids:
        path = f"{proc_root}/{pid}/mountinfo"
        key = first_mount_id(path)
        if key is None or key in seen:
            continue
        seen.add(key)
        if len(tables) >= MAX_MOUNT_NAMESPACES:
            raise HostMountsUnavailable(
                f"more than {MAX_MOUNT_NAMESPACES} mount namespaces: not all can be read"
            )
        try:
            text = read_proc_file(path)
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended meanwhile
        except OSError as e:
            raise HostMountsUnavailable(
                f"cannot read the mount table of pid {pid} ({path}): {e.strerror}"
            ) from e
        tables.append(NamespaceTable(pid, parse_mounts(text)))
    tables.extend(_pinned_tables(proc_root, seen, own, tables))
    return tables


_MNT_NS_ROOT = re.compile(r"mnt:\[\d+\]")
# Enters the mount namespace of the nsfs file argv[1] and prints that namespace's mount
# table. A process of its own: setns(CLONE_NEWNS) needs a single-threaded caller, and
# the agent's worker has threads. /proc/self is opened before the switch: the
# namespace entered may have no /proc of its own.
_ENTER_AND_READ = """
import ctypes, os, sys
ns = os.open(sys.argv[1], os.O_RDONLY | os.O_CLOEXEC)
me = os.open("/proc/self", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
libc = ctypes.CDLL(None, use_errno=True)
if libc.setns(ns, 0x00020000) != 0:
    sys.stderr.write(os.strerror(ctypes.get_errno()))
    sys.exit(3)
fd = os.open("mountinfo", os.O_RDONLY | os.O_CLOEXEC, dir_fd=me)
out = bytearray()
while chunk := os.read(fd, 1 << 20):
    out += chunk
sys.stdout.buffer.write(bytes(out))
"""
ENTER_TIMEOUT = 10.0


def enter_and_read(nsfs_path: str) -> str:
    """The mount table of the mount namespace whose nsfs file is at ``nsfs_path`` (a
    path this process can open), read from inside it. ``OSError`` when it cannot be
    entered (no CAP_SYS_ADMIN / CAP_SYS_CHROOT, a file gone meanwhile)."""
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _ENTER_AND_READ, nsfs_path],
            capture_output=True,
            timeout=ENTER_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise OSError(errno.ETIMEDOUT, f"no answer in {ENTER_TIMEOUT:g} s") from exc
    if done.returncode != 0:
        why = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise OSError(errno.EPERM, why[-1] if why else f"exit {done.returncode}")
    return done.stdout.decode("utf-8", "surrogateescape")


def _pinned_tables(
    proc_root: str,
    seen: set[bytes | None],
    own: list[tuple[str, list[MountEntry]]],
    tables: list[NamespaceTable],
) -> list[NamespaceTable]:
    """The tables of mount namespaces that no process is in, each kept alive by a bind
    mount of its nsfs file (``unshare --mount=FILE``, what tools that keep a
    namespace for later do): found as ``nsfs`` mounts whose root is ``mnt:[...]`` in
    this process's table, the host's and every other namespace's (also those found
    this way), and read by entering them. One that cannot be entered raises
    ``HostMountsUnavailable``: what is mounted there cannot be told."""
    todo = list(own)
    todo.extend((str(t.pid), list(t.mounts)) for t in tables)
    out: list[NamespaceTable] = []
    entered: set[str] = set()
    while todo:
        who, mounts = todo.pop(0)
        for m in mounts:
            if m.fstype != "nsfs" or not _MNT_NS_ROOT.fullmatch(m.root) or m.root in entered:
                continue
            entered.add(m.root)
            if who.startswith("/"):  # shown only by a pinned namespace's own table
                raise HostMountsUnavailable(
                    f"a mount namespace ({m.root}) is pinned at {m.mountpoint} inside "
                    f"another one that no process is in ({who}): it cannot be read"
                )
            if who == "self":
                opener = m.mountpoint
            else:
                opener = os.path.join(proc_root, who, "root") + m.mountpoint
            try:
                text = enter_and_read(opener)
            except OSError as e:
                raise HostMountsUnavailable(
                    f"a mount namespace ({m.root}) that no process is in is kept at "
                    f"{m.mountpoint}, and it cannot be entered to read its mounts: "
                    f"{e.strerror or e}"
                ) from e
            key = text.split(" ", 1)[0].encode() or None
            if key in seen:
                continue  # a namespace some process is in: read already
            seen.add(key)
            if len(tables) + len(out) >= MAX_MOUNT_NAMESPACES:
                raise HostMountsUnavailable(
                    f"more than {MAX_MOUNT_NAMESPACES} mount namespaces: not all can be read"
                )
            table = NamespaceTable(0, parse_mounts(text), pinned_at=m.mountpoint)
            out.append(table)
            todo.append((m.mountpoint, list(table.mounts)))
    return out


# include/linux/proc_ns.h: the inode number of the initial pid namespace (Linux >= 3.8)
PROC_PID_INIT_INO = 0xEFFFFFFC


def first_mount_id(path: str) -> bytes | None:
    """The mount id on the first line of a mount table (it names the namespace); None
    when the process is gone or holds no table (a zombie). ``HostMountsUnavailable``
    when it exists and cannot be read."""
    try:
        # 64 bytes by one read: the kernel makes only the first line for it (a
        # buffered readline would have it print a whole buffer's worth of mounts)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            head = os.read(fd, 64)
        finally:
            os.close(fd)
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError as e:
        if e.errno in (errno.ESRCH, errno.ENOENT, errno.EINVAL):
            return None
        raise HostMountsUnavailable(f"cannot read the mount table {path}: {e.strerror}") from e
    return head.split(b"\n", 1)[0].split(b" ", 1)[0] or None


def in_initial_pid_namespace(proc_root: str) -> bool:
    """``/proc/self/ns/pid`` names the initial pid namespace (``pid:[4026531836]``)."""
    link = os.readlink(os.path.join(proc_root, "self/ns/pid"))
    return link == f"pid:[{PROC_PID_INIT_INO}]"
