"""What processes and the kernel hold open, from ``/proc`` and ``/sys``: a target that
holds any of it is in use (``agent.domain.holders`` places each path in its filesystem).

Read for every process but the agent's own, in every mount namespace:
``/proc/<pid>/cwd``, ``root`` and ``exe`` (``readlink``), each thread's ``cwd`` and
``root`` (``/proc/<pid>/task/<tid>/``), every ``/proc/<pid>/fd/*``
(``readlink``) and the files in ``/proc/<pid>/maps`` (a file mapped and closed). Kernel
threads hold nothing of their own and are passed over. Read of the kernel: each
``/sys/block/loop*/loop/backing_file`` (a loop device's file: the filesystem on it may
be mounted anywhere, and the mount table shows ``/dev/loopN``, not the file),
``/proc/swaps`` (active swap files) and the ``lowerdir``, ``upperdir`` and ``workdir``
of every overlay mount in every namespace's mount table (absolute ones: a relative one,
as Docker's overlay2 driver gives a long lower list, is relative to where its mounting
process was, which no table tells).

The kernel prints each path for the reader (``d_path``): a path of the agent's view when
the agent can reach it, else one from the root of the holder's mount namespace. So each
process's paths come with the mount table of its own namespace (``HolderTable``), as a
process of it whose root is that namespace's sees it (a chrooted process's table shows
only what lies below its root). Where the kernel itself holds a file (a loop device, a
swap file), which namespace its path is of is not told; nor for a namespace whose every
process is chrooted: those are ``Holders.everywhere``, placed in every table. Threads
are read too: one may have a working folder of its own (``unshare(CLONE_FS)``).

Bounds: at most ``MAX_HELD`` links, mapped files and mounts are read in one look (a NAS
has a few thousand); beyond it, or when anything cannot be read (``EACCES``: an agent in
a container without ``CAP_SYS_PTRACE``), the read raises ``HoldersUnavailable``: what
is in use cannot be told, and every delete is refused. A process named in
``allowed_unreadable`` that cannot be read is passed over instead (``Holders.skipped``
names it). A process that ends while it is read is passed over: what it held is free.
Works the same on Linux 4.4 (every file above is older).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Collection

from agent.errors import HoldersUnavailable, HostMountsUnavailable
from agent.host.btrfs_parse import parse_mountinfo, unescape_mountinfo
from agent.host.mounttables import (
    TextMemo,
    enter_and_read,
    first_mount_id,
    parse_mounts,
    read_proc_file,
)
from agent.host.records import HeldPath, Holders, HolderTable, MountEntry, NamespaceTable

__all__ = [
    "MAX_HELD",
    "overlay_dirs",
    "parse_maps",
    "parse_stat",
    "parse_swaps",
    "read_holders",
    "server_pids",
    "serving",
]

# Links, mapped files and mounts read at most in one look.
MAX_HELD = 500_000

# include/linux/proc_ns.h: the inode number of the initial pid namespace (Linux >= 3.8)
PROC_PID_INIT_INO = 0xEFFFFFFC
PF_KTHREAD = 0x00200000  # include/linux/sched.h: a kernel thread

# The gunicorn master serving the agent (``serving``; its workers are forked from it and
# inherit this): it and its workers are the agent's own processes.
_SERVER_PIDS: set[int] = set()

_DELETED = " (deleted)"
_GONE = (errno.ENOENT, errno.ESRCH)
_DENIED = (errno.EACCES, errno.EPERM)


# ---------------------------------------------------------------------- parsing (pure)


def _clean(path: str) -> str | None:
    """An absolute path as a holder names it, without the kernel's ``" (deleted)"``
    (the file is gone from its folder but not from its subvolume); None for what is
    not a file's path (``socket:[12]``, ``anon_inode:[eventfd]``, ``[heap]``)."""
    if not path.startswith("/"):
        return None
    if path.endswith(_DELETED):
        path = path[: -len(_DELETED)]
    return path or None


def parse_maps(text: str) -> list[str]:
    """The files in ``/proc/<pid>/maps`` (each once). The kernel escapes only a
    newline in a name there (``\\012``), not a backslash: a name holding ``\\012``
    is given both ways."""
    out: dict[str, None] = {}
    for line in text.split("\n"):
        fields = line.split(None, 5)
        if len(fields) != 6:
            continue
        for name in {fields[5], fields[5].replace("\\012", "\n")}:
            path = _clean(name)
            if path is not None:
                out[path] = None
    return list(out)


# the files of each ``maps`` text parsed lately (a process's mappings rarely change
# between two reads a few milliseconds apart)
_mapped_files = TextMemo(lambda text: tuple(parse_maps(text)), 1024)


def parse_swaps(text: str) -> list[str]:
    """The swap files and partitions in ``/proc/swaps`` (names escaped as in a mount
    table: space, tab, newline and backslash in octal)."""
    out = []
    for line in text.split("\n")[1:]:
        fields = line.split()
        if fields:
            path = _clean(unescape_mountinfo(fields[0]))
            if path is not None:
                out.append(path)
    return out


def parse_stat(text: str) -> tuple[int, int]:
    """(parent pid, flags) from ``/proc/<pid>/stat`` (the name in parentheses may hold
    spaces and parentheses: the fields start after the last ``)``)."""
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[6])


_OVERLAY_KEYS = ("lowerdir", "upperdir", "workdir", "lowerdir+", "datadir+")


def _overlay_split(value: str, *, many: bool) -> list[str]:
    """An overlay option's value (already unescaped from the mount table) -> its
    folders: a backslash makes the next character plain (``\\:``, ``\\,``); an unescaped
    ``:`` separates the folders of a lower list (``::`` before data-only layers)."""
    parts: list[str] = []
    cur: list[str] = []
    chars = iter(value)
    for ch in chars:
        if ch == "\\":
            cur.append(next(chars, ""))
        elif ch == ":" and many:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p for p in parts if p]


def overlay_dirs(entry: MountEntry) -> list[str]:
    """The folders an overlay mount is made of (its super options ``lowerdir``,
    ``upperdir``, ``workdir``, and ``lowerdir+``/``datadir+`` of newer kernels),
    absolute ones only: a relative one is relative to where the mounting process was."""
    if entry.fstype != "overlay":
        return []
    out = []
    for option in entry.options.split(","):  # a comma in a value is escaped (\054)
        key, _, value = option.partition("=")
        if key not in _OVERLAY_KEYS or not value:
            continue
        for part in _overlay_split(unescape_mountinfo(value), many=key == "lowerdir"):
            path = _clean(part)
            if path is not None:
                out.append(path)
    return out


# ---------------------------------------------------------------------- reading


class _Budget:
    def __init__(self) -> None:
        self.left = MAX_HELD

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise HoldersUnavailable(
                f"more than {MAX_HELD} open files, mapped files and mounts: what is in use "
                "cannot be told"
            )


class _Unreadable(Exception):
    def __init__(self, pid: int, what: str, exc: OSError) -> None:
        super().__init__(pid, what, exc)
        self.pid, self.what, self.exc = pid, what, exc

    def refusal(self) -> HoldersUnavailable:
        hint = (
            " (an agent in a container needs CAP_SYS_PTRACE, and no security profile "
            "that forbids it, to see what other processes hold)"
            if self.exc.errno in _DENIED
            else ""
        )
        return HoldersUnavailable(
            f"cannot read what pid {self.pid} holds ({self.what}): {self.exc.strerror}{hint}"
        )


def _readlink(base: str, name: str, pid: int) -> str | None:
    try:
        return os.readlink(f"{base}/{name}")
    except OSError as exc:
        if exc.errno in _GONE:
            return None  # closed meanwhile, a kernel thread's exe, a zombie
        raise _Unreadable(pid, name, exc) from exc


def _process_held(
    proc_root: str, pid: int, budget: _Budget, ns_held: dict[str, tuple[int, str]] | None = None
) -> tuple[dict[str, str], str | None] | None:
    """What ``pid`` holds (path -> how), and its root; None when it is gone. A thread
    may have a working folder of its own (``unshare(CLONE_FS)``, as Samba's do). Mount
    namespaces it holds open (an fd whose link is ``mnt:[...]``) go to ``ns_held``
    (link -> (pid, fd))."""
    base = f"{proc_root}/{pid}"
    found: dict[str, str] = {}
    root = _readlink(base, "root", pid)
    for link, what in (("cwd", "working folder"), ("exe", "program")):
        path = _clean(_readlink(base, link, pid) or "")
        if path is not None:
            found.setdefault(path, what)
    if root is not None and root.startswith("/"):
        found.setdefault(root, "root")
    try:
        tids = [t for t in os.listdir(f"{base}/task") if t != str(pid)]
    except OSError as exc:
        if exc.errno in _GONE:
            return None
        raise _Unreadable(pid, "task", exc) from exc
    budget.spend(len(tids))
    for tid in tids:
        task = f"{base}/task/{tid}"
        for link, what in (("cwd", "working folder"), ("root", "root")):
            path = _clean(_readlink(task, link, pid) or "")
            if path is not None:
                found.setdefault(path, f"{what} of thread {tid}")
    fd_dir = f"{base}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError as exc:
        if exc.errno in _GONE:
            return None
        raise _Unreadable(pid, "fd", exc) from exc
    budget.spend(len(fds) + 3)
    for fd in fds:
        raw = _readlink(fd_dir, fd, pid) or ""
        if raw.startswith("mnt:[") and ns_held is not None:
            ns_held.setdefault(raw, (pid, fd))
            continue
        path = _clean(raw)
        if path is not None:
            found.setdefault(path, "open file")
    try:
        maps = read_proc_file(f"{base}/maps")
    except OSError as exc:
        if exc.errno in _GONE:
            return None
        raise _Unreadable(pid, "maps", exc) from exc
    mapped = _mapped_files(maps)
    budget.spend(len(mapped))
    for path in mapped:
        found.setdefault(path, "mapped file")
    return found, root


def _read_text(path: str, *, record: bool = False) -> str | None:
    """A small /proc file (``record``: of one short record, as ``stat``); None when its
    process is gone (or a zombie's)."""
    try:
        return read_proc_file(path, record=record)
    except OSError as exc:
        if exc.errno in _GONE or exc.errno == errno.EINVAL:
            return None
        raise HoldersUnavailable(f"cannot read {path}: {exc.strerror}") from exc


def _first_mount_id(path: str) -> bytes | None:
    """The mount id on the first line of a mount table (it names the namespace)."""
    try:
        return first_mount_id(path)
    except HostMountsUnavailable as exc:
        raise HoldersUnavailable(exc.detail) from exc


def _kernel_held(proc_root: str, sys_root: str) -> list[HeldPath]:
    out = []
    block = os.path.join(sys_root, "block")
    try:
        names = sorted(n for n in os.listdir(block) if n.startswith("loop"))
    except OSError as exc:
        raise HoldersUnavailable(f"cannot list {block}: {exc.strerror}") from exc
    for name in names:
        try:
            with open(
                os.path.join(block, name, "loop", "backing_file"),
                encoding="utf-8",
                errors="surrogateescape",
            ) as f:
                text = f.read()
        except FileNotFoundError:
            continue  # not bound to a file (or detached meanwhile)
        except OSError as exc:
            raise HoldersUnavailable(
                f"cannot read the backing file of /dev/{name}: {exc.strerror}"
            ) from exc
        path = _clean(text[:-1] if text.endswith("\n") else text)
        if path is not None:
            out.append(HeldPath(path, f"loop device /dev/{name} (its backing file)"))
    swaps = os.path.join(proc_root, "swaps")
    try:
        with open(swaps, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except FileNotFoundError:
        text = ""  # a kernel without swap support
    except OSError as exc:
        raise HoldersUnavailable(f"cannot read {swaps}: {exc.strerror}") from exc
    out.extend(HeldPath(p, "the kernel (an active swap file)") for p in parse_swaps(text))
    return out


def _own_namespace(proc_root: str) -> str:
    try:
        return os.readlink(os.path.join(proc_root, "self/ns/mnt"))
    except OSError as exc:
        raise HoldersUnavailable(f"cannot read {proc_root}/self/ns/mnt: {exc.strerror}") from exc


def _host_namespace(proc_root: str, own: str) -> str:
    """pid 1's mount namespace; where its link may not be read (a pid 1 allowed to be
    unreadable), told apart from this process's by the first line of its table."""
    try:
        return os.readlink(os.path.join(proc_root, "1/ns/mnt"))
    except OSError as exc:
        if exc.errno not in _DENIED:
            raise HoldersUnavailable(f"cannot read {proc_root}/1/ns/mnt: {exc.strerror}") from exc
    first = _first_mount_id(os.path.join(proc_root, "1/mountinfo"))
    if first is None:
        raise HoldersUnavailable(f"cannot read the mount table {proc_root}/1/mountinfo")
    same = first == _first_mount_id(os.path.join(proc_root, "self/mountinfo"))
    return own if same else "the host's (pid 1)"


def _in_initial_pid_namespace(proc_root: str) -> bool:
    try:
        link = os.readlink(os.path.join(proc_root, "self/ns/pid"))
    except OSError as exc:
        raise HoldersUnavailable(f"cannot read {proc_root}/self/ns/pid: {exc.strerror}") from exc
    return link == f"pid:[{PROC_PID_INIT_INO}]"


def read_holders(
    proc_root: str = "/proc",
    sys_root: str = "/sys",
    *,
    agent_pids: Collection[int] = (),
    helper_exes: Collection[str] = (),
    allowed_unreadable: Collection[int] = (),
) -> Holders:
    """What every process holds, by mount namespace, and what the kernel holds.

    Not counted (the agent's own processes, and what holds nothing): this process,
    ``agent_pids`` (the gunicorn master serving the agent) and their children (its
    workers), a child of any of those whose program is one of ``helper_exes`` (the
    btrfs-progs the agent runs: they open the paths the agent names), kernel threads.
    A process in ``allowed_unreadable`` that cannot be read is passed over
    (``Holders.skipped``). Needs the host's pid namespace; ``HoldersUnavailable`` when
    anything else cannot be read."""
    if not _in_initial_pid_namespace(proc_root):
        raise HoldersUnavailable(
            "the agent runs in a pid namespace of its own: what the host's processes "
            "hold is invisible; run it with `pid: host`"
        )
    try:
        pids = sorted(int(p) for p in os.listdir(proc_root) if p.isdigit())
    except OSError as exc:
        raise HoldersUnavailable(f"cannot list {proc_root}: {exc.strerror}") from exc
    parents: dict[int, int] = {}
    names: dict[int, str] = {}  # the program's name, as /proc/<pid>/comm has it
    for pid in pids:
        stat = _read_text(f"{proc_root}/{pid}/stat", record=True)
        if stat is not None:
            try:
                ppid, flags = parse_stat(stat)
            except (ValueError, IndexError):
                raise HoldersUnavailable(f"/proc/{pid}/stat cannot be read: {stat!r}") from None
            if not flags & PF_KTHREAD:
                parents[pid] = ppid
                names[pid] = stat[stat.find("(") + 1 : stat.rindex(")")]
    server = set(agent_pids)
    own = {os.getpid(), *server, *(p for p, pp in parents.items() if pp in server)}
    helpers = set(helper_exes)
    budget = _Budget()
    # mount namespace -> (its processes at its root, path -> who holds it)
    spaces: dict[str, tuple[list[int], dict[str, str]]] = {}
    ns_held: dict[str, tuple[int, str]] = {}  # mount namespaces held open by an fd
    skipped: list[int] = []
    for pid, ppid in parents.items():
        if pid in own:
            continue
        base = f"{proc_root}/{pid}"
        if ppid in own and helpers:
            exe = _readlink_quiet(f"{base}/exe")
            if exe is not None and exe in helpers:
                continue  # a btrfs process of the agent's
        try:
            # the namespace by its link (a chrooted process's mount table may be empty)
            key = _readlink(base, "ns/mnt", pid)
            if key is None:
                continue  # gone, or a zombie
            held = _process_held(proc_root, pid, budget, ns_held)
        except _Unreadable as exc:
            if exc.exc.errno in _DENIED and pid in allowed_unreadable:
                skipped.append(pid)
                continue
            raise exc.refusal() from exc.exc
        if held is None:
            continue
        comm = names[pid].strip() or "?"
        pids_of, found = spaces.setdefault(key, ([], {}))
        # the table to place by is that of a process at the namespace's root: the
        # kernel prints paths from there, and a chrooted process's table from its root
        if held[1] == "/":
            pids_of.append(pid)
        for path, what in held[0].items():
            found.setdefault(path, f"pid {pid} ({comm}), {what}")
    # the agent's and the host's tables, held or not
    own_ns = _own_namespace(proc_root)
    spaces.setdefault(own_ns, ([], {}))[0].insert(0, os.getpid())
    spaces.setdefault(_host_namespace(proc_root, own_ns), ([], {}))[0].insert(0, 1)
    tables = []
    everywhere: list[HeldPath] = []
    for pids_of, found in spaces.values():
        mounts: tuple[MountEntry, ...] | None = None
        for pid in pids_of:  # the first that is still there
            who = "self" if pid == os.getpid() else str(pid)
            text = _read_text(f"{proc_root}/{who}/mountinfo")
            if text is not None:
                mounts = tuple(parse_mounts(text))
                break
        if mounts is None:
            # every process of it has a root of its own (a chroot: its table shows only
            # what lies below that root), or ended meanwhile: placed in every table
            everywhere.extend(HeldPath(path, who) for path, who in found.items())
            continue
        budget.spend(len(mounts))
        listed = [HeldPath(path, who) for path, who in found.items()]
        listed.extend(
            HeldPath(d, f"the overlay mounted at {m.mountpoint} (a folder it is made of)")
            for m in mounts
            for d in overlay_dirs(m)
        )
        own_table = os.getpid() in pids_of or 1 in pids_of
        tables.append(HolderTable(pid, mounts, tuple(listed), own=own_table))
    kernel = _kernel_held(proc_root, sys_root)
    hidden = _namespaces_held_open(proc_root, ns_held, set(spaces))
    return Holders(tuple(tables), (*kernel, *everywhere), tuple(skipped), hidden)


def _namespaces_held_open(
    proc_root: str, ns_held: dict[str, tuple[int, str]], with_processes: set[str]
) -> tuple[NamespaceTable, ...]:
    """The mount tables of the namespaces that no process is in and a process holds
    open (an fd on ``/proc/<pid>/ns/mnt`` of a process that ended, or a namespace
    file), read by entering each through that fd; ``HoldersUnavailable`` when one
    cannot be entered: what is mounted there cannot be told."""
    out = []
    for link, (pid, fd) in sorted(ns_held.items()):
        if link in with_processes:
            continue
        try:
            text = enter_and_read(os.path.join(proc_root, str(pid), "fd", fd))
        except OSError as exc:
            raise HoldersUnavailable(
                f"pid {pid} holds open (fd {fd}) a mount namespace ({link}) that no "
                f"process is in, and it cannot be entered to read its mounts: "
                f"{exc.strerror or exc}"
            ) from exc
        out.append(
            NamespaceTable(0, tuple(parse_mountinfo(text)), pinned_at=f"fd {fd} of pid {pid}")
        )
    return tuple(out)


def serving(pid: int) -> None:
    """Record that ``pid`` is the server process whose workers are the agent (called by
    ``janitor-agent serve`` before gunicorn forks them)."""
    _SERVER_PIDS.add(pid)


def server_pids() -> frozenset[int]:
    return frozenset(_SERVER_PIDS)


def _readlink_quiet(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None
