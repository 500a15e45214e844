"""The mount tables: this process's, the host's (pid 1's) and every other mount
namespace's, from ``/proc`` (any filesystem type; parsing in
``agent.host.btrfs_parse.parse_mountinfo``)."""

from __future__ import annotations

import errno
import os

from agent.errors import BtrfsUnavailable, HostMountsUnavailable
from agent.host.btrfs_parse import parse_mountinfo
from agent.host.records import MountEntry, NamespaceTable

# Mount namespaces read at most (every container has one; beyond: not all are seen).
MAX_MOUNT_NAMESPACES = 4096

# The last table read from each path and its mounts: a table read again unchanged (the
# kept scan's checks read two per request) is not parsed again.
_parsed: dict[str, tuple[str, tuple[MountEntry, ...]]] = {}


def _parse(path: str, text: str) -> list[MountEntry]:
    last = _parsed.get(path)
    if last is not None and last[0] == text:
        return list(last[1])
    mounts = parse_mountinfo(text)
    _parsed[path] = (text, tuple(mounts))
    return mounts


def read_mounts(proc_root: str) -> list[MountEntry]:
    """Every mount this process sees, of any type (local paths)."""
    path = os.path.join(proc_root, "self/mountinfo")
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError as e:
        raise BtrfsUnavailable(f"cannot read the mount table {path}: {e.strerror}") from e
    return _parse(path, text)


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
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError as e:
        raise HostMountsUnavailable(
            f"cannot read the host's mount table {path}: {e.strerror}"
        ) from e
    return _parse(path, text)


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
    seen = {_first_mount_id(os.path.join(proc_root, p, "mountinfo")) for p in ("self", "1")}
    tables: list[NamespaceTable] = []
    try:
        pids = sorted(int(p) for p in os.listdir(proc_root) if p.isdigit())
    except OSError as e:
        raise HostMountsUnavailable(f"cannot list {proc_root}: {e.strerror}") from e
    for pid in pids:
        path = os.path.join(proc_root, str(pid), "mountinfo")
        key = _first_mount_id(path)
        if key is None or key in seen:
            continue
        seen.add(key)
        if len(tables) >= MAX_MOUNT_NAMESPACES:
            raise HostMountsUnavailable(
                f"more than {MAX_MOUNT_NAMESPACES} mount namespaces: not all can be read"
            )
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                text = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended meanwhile
        except OSError as e:
            raise HostMountsUnavailable(
                f"cannot read the mount table of pid {pid} ({path}): {e.strerror}"
            ) from e
        tables.append(NamespaceTable(pid, tuple(parse_mountinfo(text))))
    return tables


# include/linux/proc_ns.h: the inode number of the initial pid namespace (Linux >= 3.8)
PROC_PID_INIT_INO = 0xEFFFFFFC


def _first_mount_id(path: str) -> bytes | None:
    """The mount id on the first line of a mount table (it names the namespace); None
    when the process is gone or holds no table (a zombie). ``HostMountsUnavailable``
    when it exists and cannot be read."""
    try:
        with open(path, "rb") as f:
            head = f.readline(64)
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError as e:
        if e.errno in (errno.ESRCH, errno.ENOENT, errno.EINVAL):
            return None
        raise HostMountsUnavailable(f"cannot read the mount table {path}: {e.strerror}") from e
    return head.split(b" ", 1)[0] or None


def in_initial_pid_namespace(proc_root: str) -> bool:
    """``/proc/self/ns/pid`` names the initial pid namespace (``pid:[4026531836]``)."""
    link = os.readlink(os.path.join(proc_root, "self/ns/pid"))
    return link == f"pid:[{PROC_PID_INIT_INO}]"
