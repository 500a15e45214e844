"""The real ``agent.host.backend.Btrfs``: btrfs-progs commands, btrfs ioctls
(``agent.host.btrfs_ioctl``), ``/proc``, ``/sys``, and plain files (``agent.host.files``).

Listings are read from the kernel with ioctls, not from the text of btrfs-progs: a
name holding a newline, a tab, ``<FS_TREE>`` or bytes that are not UTF-8 cannot forge or
break a line that is never printed. What still runs btrfs-progs 4.4.1 ... 6.x, with
commands and flags that all exist in 4.4.1:

    filesystem show MOUNT (when sysfs cannot name the filesystem)
    filesystem usage -b MOUNT            subvolume get-default MOUNT
    subvolume delete PATH...             property set -t s PATH ro true|false
    qgroup destroy 0/ID MOUNT            filesystem sync MOUNT, subvolume sync MOUNT

Nothing here enables quotas, deletes with rmdir, or relies on a newer-only flag or
ioctl without a fallback.

``BtrfsTool._run`` is the only place a process is started: an argument list (never a
shell), ``LC_ALL=C`` so messages are the English ones the parsers know, stdin closed, and
a timeout. A missing binary raises ``BtrfsUnavailable``; a command that ran and failed
raises ``BtrfsCommandError`` with the command, exit code, stdout and stderr; output that
cannot be parsed raises ``agent.host.btrfs_parse.BtrfsParseError``.

Every path and mount point given must be absolute, so that no argument can be taken for
an option.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
from collections.abc import Collection, Sequence
from datetime import datetime

from agent.errors import BtrfsCommandError, BtrfsUnavailable
from agent.host import files, holders, hostpaths, mounttables
from agent.host.btrfs_ioctl import (
    SUBVOLUME_ROOT_INO,
    BtrfsIoctlError,
    Ioctls,
    _arg,
    destroy_subvolume,
)
from agent.host.btrfs_ioctl import set_readonly as set_readonly_by_ioctl
from agent.host.btrfs_parse import (
    DeleteMessage,
    DeleteOutput,
    PathFacts,
    delete_results,
    parse_filesystem_show,
    parse_filesystem_usage,
    parse_get_default,
    parse_subvolume_delete,
    parse_version,
)
from agent.host.files import TreeRemoval
from agent.host.records import (
    ChangeMark,
    DeleteResult,
    FilesystemIdent,
    FolderEntry,
    FsUsage,
    Holders,
    MountEntry,
    NamespaceTable,
    QgroupReport,
    ResolvedPath,
    ScopeRecords,
    SubvolumeRecord,
)

__all__ = ["BtrfsIoctlError", "BtrfsTimeout", "BtrfsTool"]

# Where btrfs-progs lives when the agent's PATH lacks the sbin directories.
_EXTRA_PATH = ("/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin")


class BtrfsTimeout(BtrfsCommandError):
    """A btrfs command did not finish within its timeout and was killed.

    ``stderr`` starts with a "timed out" line (so the problem detail says so), followed
    by what the command had printed; ``partial_stderr`` is only the latter.
    """

    def __init__(self, cmd: Sequence[str], timeout: float, stdout: str, stderr: str) -> None:
        self.timeout = timeout
        self.partial_stderr = stderr
        note = f"timed out after {timeout:g}s and was killed"
        super().__init__(cmd, -signal.SIGKILL, stdout, f"{note}\n{stderr}")


class BtrfsTool:
    """``agent.host.backend.Btrfs`` on the real system.

    ``proc_root`` and ``sys_root`` let tests point the file-reading parts at fixtures.
    ``timeout`` bounds every command but ``sync``, which waits for the kernel's cleaner
    and gets ``sync_timeout``. ``max_args_bytes`` bounds the argument bytes of one
    ``btrfs subvolume delete`` process (long batches are split to stay under ARG_MAX).
    ``search_buffer_bytes`` is the result buffer of one BTRFS_IOC_TREE_SEARCH_V2 (the
    items of 10,000 subvolumes take about 6 MB, so about 25 searches at 256 KiB).
    ``host_root``: where this process sees the host's ``/`` (the configured
    ``host_prefix``), used to resolve host paths when pid 1's root cannot be entered.
    """

    def __init__(
        self,
        *,
        binary: str = "btrfs",
        proc_root: str = "/proc",
        sys_root: str = "/sys",
        timeout: float = 120.0,
        sync_timeout: float = 3600.0,
        max_args_bytes: int = 128 * 1024,
        search_buffer_bytes: int = 256 * 1024,
        unreadable_pids_allowed: Collection[int] = (),
        host_root: str = "/",
        subvolume_ioctls: bool = False,
    ) -> None:
        if timeout <= 0 or sync_timeout <= 0 or max_args_bytes <= 0:
            raise ValueError("timeouts and max_args_bytes must be positive")
        self._ioctls = Ioctls(search_buffer_bytes=search_buffer_bytes)
        self._binary = binary
        self._proc_root = proc_root
        self._sys_root = sys_root
        self._timeout = timeout
        self._sync_timeout = sync_timeout
        self._max_args_bytes = max_args_bytes
        self._resolved: str | None = None
        self._unreadable_allowed = tuple(unreadable_pids_allowed)
        self._local_host_root = host_root or "/"
        # True: read-only flags and subvolume deletes by ioctl (no process); False: by
        # btrfs-progs (``property set``, ``subvolume delete``)
        self._subvolume_ioctls = subvolume_ioctls

    # ------------------------------------------------------------------ the one runner

    def _executable(self) -> str:
        if self._resolved is not None:
            return self._resolved
        if "/" in self._binary:
            self._resolved = self._binary
            return self._binary
        search = os.pathsep.join([os.environ.get("PATH", os.defpath), *_EXTRA_PATH])
        found = shutil.which(self._binary, path=search)
        if found is None:
            raise BtrfsUnavailable(f"{self._binary!r} not found (searched {search})")
        self._resolved = found
        return found

    def _run(
        self, args: Sequence[str], *, timeout: float | None = None, check: bool = True
    ) -> tuple[int, str, str]:
        """Run ``btrfs ARGS``; return (exit code, stdout, stderr).

        Raises ``BtrfsUnavailable`` when the binary cannot be started, ``BtrfsTimeout``
        when it runs past the timeout (it is killed; the error carries what it printed
        so far), and with ``check`` ``BtrfsCommandError`` for a non-zero exit.
        """
        cmd = [self._executable(), *args]
        limit = self._timeout if timeout is None else timeout
        env = dict(os.environ, LC_ALL="C", LANG="C")
        try:
            proc = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                encoding="utf-8",
                errors="surrogateescape",
                env=env,
                timeout=limit,
                check=False,
            )
        except (FileNotFoundError, NotADirectoryError, PermissionError) as e:
            self._resolved = None
            raise BtrfsUnavailable(f"cannot run {cmd[0]}: {e.strerror or e}") from e
        except subprocess.TimeoutExpired as e:
            raise BtrfsTimeout(cmd, limit, _text(e.stdout), _text(e.stderr)) from e
        if check and proc.returncode != 0:
            raise BtrfsCommandError(cmd, proc.returncode, proc.stdout, proc.stderr)
        return proc.returncode, proc.stdout, proc.stderr

    def _output(self, args: Sequence[str]) -> str:
        return self._run(args)[1]

    # ------------------------------------------------------------------ facts

    def version(self) -> str:
        return parse_version(self._output(["--version"]))

    def tool_present(self) -> bool:
        try:
            return os.access(self._executable(), os.X_OK)
        except BtrfsUnavailable:
            return False

    def kernel_release(self) -> str:
        return os.uname().release

    def rmdir_deletes_subvolumes(self) -> bool:
        # The kernel (>= 4.18) announces the feature by the file's presence.
        return os.path.exists(os.path.join(self._sys_root, "fs/btrfs/features/rmdir_subvol"))

    def mounts(self) -> list[MountEntry]:
        """Every mount this process sees, of any type (local paths)."""
        return mounttables.read_mounts(self._proc_root)

    def host_mounts(self) -> list[MountEntry]:
        """The host's mount table (``agent.host.mounttables.read_host_mounts``)."""
        return mounttables.read_host_mounts(self._proc_root)

    def namespace_mounts(self) -> list[NamespaceTable]:
        """Every other mount namespace's table (``read_namespace_mounts``)."""
        return mounttables.read_namespace_mounts(self._proc_root)

    def holders(self) -> Holders:
        """What every other process and the kernel hold open
        (``agent.host.holders.read_holders``), the agent's own processes left out: the
        server and its workers, and the btrfs-progs processes they run."""
        try:
            helpers = {os.path.realpath(self._executable())}
        except BtrfsUnavailable:
            helpers = set()
        return holders.read_holders(
            self._proc_root,
            self._sys_root,
            agent_pids=holders.server_pids(),
            helper_exes=helpers,
            allowed_unreadable=self._unreadable_allowed,
        )

    def resolve_host_paths(self, paths: Collection[str]) -> dict[str, ResolvedPath]:
        """Each host path with every symlink on the way followed on the host
        (``agent.host.hostpaths``), under the host's root: pid 1's (``/proc/1/root``)
        when this process shares the host's pid namespace and may enter it, else the
        host's ``/`` as this process sees it (``host_root``: the configured
        ``host_prefix``, or ``/``), as every other path the agent reads."""
        return hostpaths.resolve_on_host(paths, host_root=self._host_root())

    def _host_root(self) -> str:
        try:
            if mounttables.in_initial_pid_namespace(self._proc_root):
                pid1 = os.path.join(self._proc_root, "1/root")
                os.listdir(pid1)  # a supervisor may forbid even root to enter it
                return pid1
        except OSError:
            pass
        return self._local_host_root

    def filesystem(self, mount: str) -> FilesystemIdent:
        # The kernel names the filesystem of each device in sysfs: no process, and no
        # device scan (``filesystem show`` scans every block device and fails when an
        # unrelated one cannot be read, e.g. a dying disk or a detached loop device).
        ident = self._filesystem_from_sysfs(mount)
        if ident is not None:
            return ident
        code, out, err = self._run(["filesystem", "show", _arg(mount)], check=False)
        try:
            return parse_filesystem_show(out)
        except ValueError:
            if code != 0:
                raise BtrfsCommandError(
                    [self._binary, "filesystem", "show", mount], code, out, err
                ) from None
            raise

    def _filesystem_from_sysfs(self, mount: str) -> FilesystemIdent | None:
        source = next((m.source for m in self.mounts() if m.mountpoint == mount), None)
        if not source or not source.startswith("/dev/"):
            return None
        dev = os.path.basename(os.path.realpath(source))
        base = os.path.join(self._sys_root, "fs/btrfs")
        try:
            uuids = sorted(os.listdir(base))
        except OSError:
            return None
        for uuid in uuids:
            if os.path.lexists(os.path.join(base, uuid, "devices", dev)):
                try:
                    with open(os.path.join(base, uuid, "label"), encoding="utf-8") as f:
                        label = f.read().strip() or None
                except OSError:
                    label = None
                return FilesystemIdent(uuid=uuid, label=label, devices=(source,))
        return None

    def usage(self, mount: str) -> FsUsage:
        out = self._output(["filesystem", "usage", "-b", _arg(mount)])
        return parse_filesystem_usage(out)

    def list_subvolumes(self, mount: str) -> list[SubvolumeRecord]:
        """Every subvolume but the top level (``agent.host.btrfs_ioctl``: a tree search
        of the root tree, names as bytes)."""
        return self._ioctls.list_subvolumes(_arg(mount))

    def list_scope(
        self, mount: str, *, ids: Collection[int] = (), folder: str | None = None
    ) -> ScopeRecords:
        """What a delete touches (``agent.host.btrfs_ioctl.Ioctls.list_scope``) and the
        default subvolume (the root tree's "default" entry), by tree search."""
        m = _arg(mount)
        records = self._ioctls.list_scope(
            m, ids=ids, folder=_arg(folder) if folder is not None else None
        )
        return ScopeRecords(records, self._ioctls.default_subvolume(m))

    def qgroups(self, mount: str) -> QgroupReport | None:
        """Every level-0 qgroup (stale ones included) and the quota status; None when
        quotas are off. Never enables quotas."""
        return self._ioctls.qgroups(_arg(mount))

    def created_at(self, path: str) -> datetime | None:
        return self._ioctls.created_at(path)

    def still_dropping(self, mount: str, ids: Collection[int]) -> set[int]:
        return self._ioctls.still_dropping(_arg(mount), ids)

    def change_mark(self, mount: str, since: ChangeMark | None = None) -> ChangeMark:
        """See ``agent.host.btrfs_ioctl.Ioctls.change_mark``: a few tree searches."""
        return self._ioctls.change_mark(_arg(mount), since)

    def folder_stamp(self, path: str) -> tuple[int, int, int, int] | None:
        """(device, inode, mtime ns, ctime ns) of the folder at ``path`` (not followed
        when a symlink): moves when a name in it is made, removed or renamed. None when
        it is not there."""
        try:
            st = os.lstat(path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)

    def default_subvolume(self, mount: str) -> int:
        out = self._output(["subvolume", "get-default", _arg(mount)])
        return parse_get_default(out)

    # ------------------------------------------------------------------ changes

    def set_readonly(self, path: str, value: bool) -> None:
        """Set or clear the subvolume's read-only flag: by ioctl (``subvolume_ioctls``),
        else ``btrfs property set -t s PATH ro true|false``."""
        if not self._subvolume_ioctls:
            self._run(
                ["property", "set", "-t", "s", _arg(path), "ro", "true" if value else "false"]
            )
            return
        try:
            set_readonly_by_ioctl(_arg(path), value)
        except OSError as e:
            reason = e.strerror or str(e)
            raise BtrfsCommandError(
                ["BTRFS_IOC_SUBVOL_SETFLAGS", path], e.errno or 1, "", reason
            ) from e

    def commit(self, mount: str) -> None:
        self._ioctls.commit(_arg(mount))

    def kernel_drops_qgroups(self) -> bool:
        return kernel_at_least(self.kernel_release(), (6, 11))

    def destroy_qgroup(self, mount: str, qgroup_id: int) -> None:
        if type(qgroup_id) is not int or qgroup_id < 0:
            raise ValueError(f"not a qgroup id: {qgroup_id!r}")
        self._run(["qgroup", "destroy", f"0/{qgroup_id}", _arg(mount)])

    def sync(self, mount: str) -> None:
        """Commit the transaction (``btrfs filesystem sync``: it also wakes the kernel's
        cleaner, which otherwise starts on the next periodic commit, up to 30 s later),
        then wait for every deleted subvolume to be cleaned (``btrfs subvolume sync``)."""
        self._run(["filesystem", "sync", _arg(mount)])
        self._run(["subvolume", "sync", _arg(mount)], timeout=self._sync_timeout)

    # ------------------------------------------------------------------ plain files

    def remove_tree(self, path: str, *, keep_top: bool = False) -> TreeRemoval:
        return files.remove_tree(path, keep_top=keep_top)

    def last_change(self, path: str) -> datetime | None:
        return files.last_change(path)

    def plain_folders(self, path: str) -> list[FolderEntry]:
        return files.plain_folders(path)

    def delete(self, paths: Sequence[str]) -> list[DeleteResult]:
        """Delete a batch with ``btrfs subvolume delete P1 P2 ...``: one process (more only
        when the arguments would not fit ARG_MAX), paths handled in the given order; or,
        with ``subvolume_ioctls``, with one ``BTRFS_IOC_SNAP_DESTROY`` per path in the
        given order, no process (``agent.host.btrfs_ioctl.destroy_subvolume``: the name
        must still be the subvolume root seen before).

        The result of each path comes from the filesystem, not from the text: before the
        run each path is lstat'ed (missing? a subvolume root, i.e. a directory with inode
        256?) and resolved (realpath); after it, a path that was a subvolume and no longer
        exists was deleted. The messages btrfs printed only supply the reason of the
        failures (see ``agent.host.btrfs_parse.delete_results``).

        A path that resolves elsewhere through a symlink is not handed to btrfs (which
        would delete the symlink's target) and fails with the reason. Paths must be
        absolute and distinct (ValueError otherwise). When a run times out, or btrfs can
        no longer be started after a first chunk ran, the paths of the later chunks fail
        as "not attempted" (BtrfsUnavailable is raised only when nothing ran).
        """
        seen: set[str] = set()
        for p in paths:
            _arg(p)
            key = os.path.normpath(p)
            if key in seen:
                raise ValueError(f"path given twice in one delete batch: {p!r}")
            seen.add(key)

        results: dict[int, DeleteResult] = {}
        runnable: list[tuple[int, PathFacts]] = []
        for i, p in enumerate(paths):
            facts = _facts_before(p)
            if facts.real != os.path.normpath(p):
                results[i] = DeleteResult(
                    path=p, ok=False, error=f"refused: the path resolves to {facts.real!r}"
                )
            else:
                runnable.append((i, facts))

        if self._subvolume_ioctls:
            for i, f in runnable:
                results[i] = _destroy(f)
            return [results[i] for i in range(len(paths))]

        stopped: str | None = None  # why the remaining chunks are not run
        for n, chunk in enumerate(self._chunks(runnable)):
            if stopped is not None:
                for i, f in chunk:
                    results[i] = DeleteResult(f.path, ok=False, error=f"not attempted: {stopped}")
                continue
            args = ["subvolume", "delete", *(f.path for _, f in chunk)]
            try:
                _, out, err = self._run(args, check=False)
                output = parse_subvolume_delete(out, err)
            except BtrfsUnavailable as e:
                if n == 0:
                    raise  # nothing was run: the caller sees why
                stopped = f"btrfs became unavailable: {e.detail}"
                for i, f in chunk:
                    results[i] = DeleteResult(f.path, ok=False, error=f"not attempted: {stopped}")
                continue
            except BtrfsTimeout as e:
                stopped = "an earlier btrfs subvolume delete timed out"
                parsed = parse_subvolume_delete(e.stdout, e.partial_stderr)
                note_text = f"timed out after {e.timeout:g}s and was killed"
                note = DeleteMessage(None, note_text, "other", note_text)
                output = DeleteOutput(parsed.announced, (*parsed.messages, note))
            after = [
                PathFacts(f.path, f.real, f.existed, f.was_subvolume, gone=not _lexists(f.path))
                for _, f in chunk
            ]
            for (i, _), result in zip(chunk, delete_results(after, output), strict=True):
                results[i] = result
        return [results[i] for i in range(len(paths))]

    def _chunks(self, items: list[tuple[int, PathFacts]]) -> list[list[tuple[int, PathFacts]]]:
        budget = self._max_args_bytes
        try:
            arg_max = os.sysconf("SC_ARG_MAX")
        except (ValueError, OSError):
            arg_max = 128 * 1024
        env_bytes = sum(len(k) + len(v) + 2 + 8 for k, v in os.environb.items())
        budget = min(budget, max(4096, arg_max // 2 - env_bytes))
        chunks: list[list[tuple[int, PathFacts]]] = []
        current: list[tuple[int, PathFacts]] = []
        used = 0
        for item in items:
            cost = len(os.fsencode(item[1].path)) + 1 + 8  # the string, its NUL, argv[] slot
            if current and used + cost > budget:
                chunks.append(current)
                current, used = [], 0
            current.append(item)
            used += cost
        if current:
            chunks.append(current)
        return chunks


# ---------------------------------------------------------------------- helpers


def kernel_at_least(release: str, want: tuple[int, int]) -> bool:
    """``"4.4.180+"`` >= (4, 18)? False when the release does not start with numbers."""
    parts = release.split(".", 2)
    try:
        major = int(parts[0])
        minor = int("".join(ch for ch in parts[1].split("-")[0] if ch.isdigit()) or "x")
    except (IndexError, ValueError):
        return False
    return (major, minor) >= want


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return value


def _lexists(path: str) -> bool:
    return os.path.lexists(path)


def _destroy(f: PathFacts) -> DeleteResult:
    """One subvolume destroyed by ioctl; the result from the filesystem (gone or not)."""
    if not f.existed:
        return DeleteResult(f.path, ok=False, error="No such file or directory")
    if not f.was_subvolume:
        return DeleteResult(f.path, ok=False, error="Not a btrfs subvolume")
    try:
        destroy_subvolume(f.path, os.lstat(f.path))
    except OSError as e:
        if not _lexists(f.path):
            return DeleteResult(f.path, ok=False, error="No such file or directory")
        return DeleteResult(f.path, ok=False, error=e.strerror or str(e))
    if _lexists(f.path):
        return DeleteResult(f.path, ok=False, error="not deleted (the kernel gave no reason)")
    return DeleteResult(f.path, ok=True)


def _facts_before(path: str) -> PathFacts:
    real = os.path.realpath(path)
    try:
        st = os.lstat(path)
    except OSError:
        return PathFacts(path, real, existed=False, was_subvolume=False, gone=False)
    is_subvolume = stat.S_ISDIR(st.st_mode) and st.st_ino == SUBVOLUME_ROOT_INO
    return PathFacts(path, real, existed=True, was_subvolume=is_subvolume, gone=False)
