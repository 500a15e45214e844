"""Stateful fakes of ``agent.host.backend.Btrfs`` and ``agent.host.backend.Docker`` for unit
tests.

They keep state and behave like the real tools as the lab showed them (the lab tests in
``tests/lab`` and ``tests/agent`` check the same behaviour on the real ones, and the
captures of btrfs-progs output in ``tests/agent/captures``):

- ``FakeBtrfs`` holds one or more filesystems, each with its subvolumes (ids from 256,
  parent ids, generations, uuids, read-only flags), quotas on or off, a default subvolume,
  and the usage they add up to; qgroups outlive their subvolume on kernels before 6.11
  (``stale_qgroups``), as Synology's 4.4 leaves them. ``delete`` has btrfs' real rules:
  a batch is one process that goes on past a bad path; a subvolume that still holds
  subvolumes fails with "Directory not empty", one inside a read-only subvolume with
  "Read-only file system", a missing path with "No such file or directory"; a read-only
  leaf deletes fine.
  Every method that would run a ``btrfs`` process appends to ``calls``, and so do the
  listings, which the real tool reads with ioctls (ops ``"tree search"`` and
  ``"tree search quota"``): those do not need the binary, so ``missing`` does not stop
  them.
- ``FakeDocker`` holds images, containers (running or stopped) and volumes. Linked to a
  ``FakeBtrfs`` (``FakeDocker(btrfs=fs)``), images and containers get their layer
  subvolumes under ``<data_root>/btrfs/subvolumes/`` and ``remove_volume`` does what
  dockerd's ``os.RemoveAll`` does to a volume full of subvolumes: it removes what it
  can and fails, leaving the volume listed and half-deleted, while a subvolume remains.

Paths: what the ``Btrfs`` methods take and return are local paths (``/volume1/docker``);
``SubvolumeRecord.path`` is relative to the filesystem's top level (``docker``). A
filesystem added with ``add_filesystem(mount="/volume1")`` is mounted there at its top
level, so local path = mount + "/" + path.

A typical test::

    fs = FakeBtrfs()
    fs.add_filesystem(mount="/volume1")
    fs.create_subvolume("/volume1/docker")
    fs.create_subvolume("/volume1/docker/volumes/v/_data/p", read_only=True)
    fs.create_subvolume("/volume1/docker/volumes/v/_data/p/c")
    fs.delete(["/volume1/docker/volumes/v/_data/p/c"])   # -> Read-only file system

or the whole lab at once: ``s = make_leak_scenario()``, then ``s.btrfs``, ``s.docker``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import re
import threading
import uuid as uuidlib
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from agent.errors import (
    BtrfsCommandError,
    BtrfsUnavailable,
    DockerUnavailable,
    HoldersUnavailable,
    HostMountsUnavailable,
    InUse,
    NotFound,
    ToolFailed,
)
from agent.host.btrfs import BtrfsIoctlError
from agent.host.dockerd import ANONYMOUS_LABEL, is_anonymous
from agent.host.files import TreeRemoval
from agent.host.hostpaths import resolve_path
from agent.host.records import (
    ChangeMark,
    ContainerMount,
    ContainerRecord,
    DeleteResult,
    DockerEvent,
    DockerInfo,
    FilesystemIdent,
    FolderEntry,
    FsUsage,
    HeldPath,
    Holders,
    HolderTable,
    LayerRefs,
    MountEntry,
    NamespaceTable,
    Qgroup,
    QgroupReport,
    ResolvedPath,
    ScopeRecords,
    StoredVolume,
    SubvolumeRecord,
    VolumeRecord,
    VolumeStores,
)

TOP_LEVEL = 5  # btrfs' FS_TREE: the top-level subvolume of every filesystem
FIRST_ID = 256

# Why ``delete`` failed for one path: the reasons ``agent.host.btrfs`` reads from btrfs' output.
ENOENT = "No such file or directory"
ENOTEMPTY = "Directory not empty"
EROFS = "Read-only file system"
EPERM = "Operation not permitted"
NOT_SUBVOLUME = "Not a btrfs subvolume"  # a plain folder
DEFAULT_SUBVOLUME = "It is the default subvolume"  # btrfs-progs refuses it
NOT_ON_BTRFS = "Not on a btrfs filesystem"  # a top level: its mount point's parent is not btrfs

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

DEFAULT_NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
_NAMESPACE = uuidlib.UUID("5b0a9c1e-7c1e-4d8e-9a53-2f1d6f3c0b7a")


def fake_hex(*seed: object) -> str:
    """A deterministic 64-hex-digit id (what Docker uses for ids and layer names)."""
    return hashlib.sha256("/".join(map(str, seed)).encode()).hexdigest()


def _kernel_at_least(release: str, want: tuple[int, int]) -> bool:
    numbers = [int(n) for n in re.findall(r"\d+", release)[:2]]
    return len(numbers) == 2 and (numbers[0], numbers[1]) >= want


def _ancestors(rel: str) -> Iterator[str]:
    """Proper ancestors of a top-level-relative path, nearest first, ending with ""."""
    while rel:
        rel = posixpath.dirname(rel)
        yield rel


def _under(rel: str, prefix: str) -> bool:
    return prefix == "" or rel == prefix or rel.startswith(prefix + "/")


# --------------------------------------------------------------------------- btrfs


@dataclass(frozen=True)
class Call:
    """One ``btrfs`` process the fake stood in for: ``op`` is the subcommand
    (``"subvolume delete"``), ``args`` its path arguments."""

    op: str
    args: tuple[str, ...] = ()


@dataclass
class FakeSubvolume:
    """A subvolume's whole state. ``FakeBtrfs.subvolume(path)`` returns the live object:
    changing a field changes the fake (e.g. ``.exclusive_bytes = 10 * MiB``)."""

    id: int
    parent_id: int  # the subvolume whose tree holds it
    path: str  # relative to the top level; "" for the top level itself
    generation: int
    cgen: int
    uuid: str
    parent_uuid: str | None  # the snapshot source
    read_only: bool
    created_at: datetime
    exclusive_bytes: int
    referenced_bytes: int
    holds_files: bool = True  # rm -rf of a read-only subvolume fails on its files
    # The root item's ctime / ctransid: moved when a name is made or removed in it.
    changed_at: datetime | None = None
    ctransid: int = 0
    # False: the kernel cannot give its path (ENAMETOOLONG...): listed with path None.
    path_known: bool = True
    # True: made before Linux 3.6, its root item lacks what was added then (uuids,
    # otime, ctime, ctransid): listed with those None.
    legacy: bool = False

    def record(self) -> SubvolumeRecord:
        if self.legacy:
            return SubvolumeRecord(
                id=self.id,
                parent_id=self.parent_id,
                generation=self.generation,
                uuid=None,
                parent_uuid=None,
                read_only=self.read_only,
                created_at=None,
                changed_at=None,
                ctransid=None,
                path=self.path if self.path_known else None,
            )
        return SubvolumeRecord(
            id=self.id,
            parent_id=self.parent_id,
            generation=self.generation,
            uuid=self.uuid,
            parent_uuid=self.parent_uuid,
            read_only=self.read_only,
            created_at=self.created_at,
            changed_at=self.changed_at or self.created_at,
            ctransid=self.ctransid or self.cgen,
            path=self.path if self.path_known else None,
        )

    def changed(self, gen: int, when: datetime) -> None:
        """A name was made or removed in it: its generation, ctime and ctransid move."""
        self.generation = gen
        self.changed_at = when
        self.ctransid = gen


@dataclass
class FakeFilesystem:
    """One btrfs filesystem. Built by ``FakeBtrfs.add_filesystem``."""

    dev: str  # "major:minor", as mount tables show it
    uuid: str
    label: str | None
    device: str
    size_bytes: int
    base_used_bytes: int  # metadata and whatever is not in a subvolume the fake tracks
    quota_enabled: bool
    quota_inconsistent: bool = False  # the quota status says: rescan needed
    default_id: int = TOP_LEVEL
    generation: int = 7
    next_id: int = FIRST_ID
    pending_free_bytes: int = 0  # deleted but not cleaned yet (``lazy_free``)
    dropping: set[int] = field(default_factory=set)  # their ids: root items still there
    subvolumes: dict[int, FakeSubvolume] = field(default_factory=dict)
    by_path: dict[str, int] = field(default_factory=dict)
    directories: set[str] = field(default_factory=set)  # plain folders, top-level-relative
    inodes: dict[str, int] = field(default_factory=dict)  # plain folder -> inode number
    next_inode: int = 1000  # a folder made (again) gets a new one, as on btrfs
    files: set[str] = field(default_factory=set)  # plain files, top-level-relative
    times: dict[str, datetime] = field(default_factory=dict)  # folder -> last change
    # level-0 qgroups of deleted subvolumes that a kernel before 6.11 leaves behind
    stale_qgroups: dict[int, Qgroup] = field(default_factory=dict)
    uncommitted: set[int] = field(default_factory=set)  # written, not yet committed

    def commit(self) -> int:
        """A new transaction: returns its generation. Writes made with
        ``FakeBtrfs.touch(..., committed=False)`` get it now, as btrfs moves a subvolume's
        generation only when the transaction holding the write commits."""
        self.generation += 1
        for sid in self.uncommitted:
            if sid in self.subvolumes:
                self.subvolumes[sid].generation = self.generation
        self.uncommitted.clear()
        return self.generation

    def exists(self, rel: str) -> bool:
        return rel == "" or rel in self.by_path or rel in self.directories

    def containing(self, rel: str) -> FakeSubvolume:
        """The subvolume whose tree holds ``rel`` (not ``rel`` itself)."""
        for ancestor in _ancestors(rel):
            if ancestor in self.by_path:
                return self.subvolumes[self.by_path[ancestor]]
        return self.subvolumes[TOP_LEVEL]

    def children(self, sid: int) -> list[FakeSubvolume]:
        return [s for s in self.subvolumes.values() if s.parent_id == sid and s.id != sid]

    def used_bytes(self) -> int:
        live = sum(s.exclusive_bytes for s in self.subvolumes.values())
        return self.base_used_bytes + live + self.pending_free_bytes


class FakeBtrfs:
    """``agent.host.backend.Btrfs`` over in-memory filesystems.

    Switches: ``missing`` (every btrfs process raises ``BtrfsUnavailable``), ``lazy_free``
    (deleted bytes stay used until ``sync``, as on a real filesystem), ``kernel`` (e.g.
    ``"4.4.302+"`` for Synology's; ``rmdir_deletes_subvolumes`` follows it unless
    ``rmdir_subvol`` is set), ``created_at_supported``, ``progs_version``.
    ``fail_next(op, error)`` makes the next process ``op`` raise; ``refuse_delete(path,
    reason)`` makes ``delete`` fail for that path with ``reason``.
    """

    def __init__(
        self,
        *,
        kernel: str = "6.12.48-amd64",
        progs_version: str = "6.2",
        now: datetime = DEFAULT_NOW,
    ) -> None:
        self.kernel = kernel
        self.progs_version = progs_version
        self.now = now
        self.missing = False
        self.lazy_free = False
        self.created_at_supported = True
        self.rmdir_subvol: bool | None = None
        self.calls: list[Call] = []
        self.filesystems: list[FakeFilesystem] = []
        self._mounts: list[tuple[MountEntry, FakeFilesystem]] = []
        # mounts that are not this fake's btrfs (tmpfs, ext4, ...): (entry, host only)
        self._other_mounts: list[tuple[MountEntry, bool]] = []
        self.host_mounts_error: str | None = None  # host_mounts() raises with it
        # mounts made in mount namespaces of their own: (table, filesystem, the
        # top-level-relative folder the mount sits on); namespace_mounts() shows them
        self._private: list[tuple[NamespaceTable, FakeFilesystem, str]] = []
        self.namespace_mounts_error: str | None = None  # namespace_mounts() raises with it
        # private mounts whose folder was removed under them: the kernel detaches them
        # in their namespace (Linux 3.18+), and what they held is gone
        self.detached: list[NamespaceTable] = []
        # mount points whose other filesystem a RemoveAll emptied (what must never happen)
        self.emptied_mounts: list[str] = []
        self.qgroup_busy = 0  # the next N qgroup destroys fail with "busy"
        # what processes and the kernel hold open (``hold``, ``back_loop``): (filesystem,
        # top-level-relative path, local path, who, held by the kernel)
        self._held: list[tuple[FakeFilesystem, str, str, str, bool]] = []
        self.holders_error: str | None = None  # holders() raises with it
        # held paths a delete or a removal destroyed under their holder (what must never
        # happen: the process or the loop device loses its data)
        self.lost_held: list[str] = []
        # symlinks (local path -> target as written) and paths that cannot be read, as
        # ``resolve_host_paths`` sees them (the fake's host and local paths are one)
        self.links: dict[str, str] = {}
        self.unreadable: set[str] = set()
        self._next_mount_id = 100
        self._failures: dict[str, list[Exception]] = {}
        self._refusals: dict[str, str] = {}
        self._lock = threading.RLock()

    # ----------------------------------------------------------------- building

    def add_filesystem(
        self,
        *,
        mount: str,
        uuid: str | None = None,
        label: str | None = None,
        device: str | None = None,
        size_bytes: int = 6 * GiB,
        base_used_bytes: int = 16 * MiB,
        quota: bool = True,
    ) -> FakeFilesystem:
        """A new filesystem mounted at its top level on ``mount``."""
        with self._lock:
            mount = self._norm(mount)
            if any(entry.mountpoint == mount for entry, _ in self._mounts):
                raise ValueError(f"something is already mounted on {mount}")
            fs = FakeFilesystem(
                dev=f"0:{40 + len(self.filesystems)}",
                uuid=uuid or str(uuidlib.uuid5(_NAMESPACE, f"fs:{mount}")),
                label=label,
                device=device or f"/dev/loop{len(self.filesystems)}",
                size_bytes=size_bytes,
                base_used_bytes=base_used_bytes,
                quota_enabled=quota,
            )
            fs.subvolumes[TOP_LEVEL] = FakeSubvolume(
                id=TOP_LEVEL,
                parent_id=0,
                path="",
                generation=fs.generation,
                cgen=0,
                uuid=str(uuidlib.uuid5(_NAMESPACE, f"{fs.uuid}:5")),
                parent_uuid=None,
                read_only=False,
                created_at=self.now,
                exclusive_bytes=16 * KiB,
                referenced_bytes=16 * KiB,
            )
            self.filesystems.append(fs)
            self._add_mount(fs, mount, "")
            return fs

    def mount_subvolume(self, subvolume: str, mountpoint: str) -> MountEntry:
        """Mount the subvolume at local path ``subvolume`` also on ``mountpoint``
        (``mount -o subvol=...``)."""
        with self._lock:
            fs, rel = self._resolve(subvolume)
            if rel not in fs.by_path:
                raise ValueError(f"{subvolume} is not a subvolume")
            return self._add_mount(fs, self._norm(mountpoint), rel)

    def bind_mount(self, source: str, mountpoint: str) -> MountEntry:
        """``mount --bind source mountpoint`` of a folder or subvolume: what dockerd
        does to its data root and ``<data_root>/btrfs`` (each onto itself)."""
        with self._lock:
            fs, rel = self._resolve(source)
            if not fs.exists(rel):
                raise FileNotFoundError(source)
            return self._add_mount(fs, self._norm(mountpoint), rel)

    def add_mount(
        self,
        mountpoint: str,
        *,
        fstype: str = "tmpfs",
        source: str = "tmpfs",
        root: str = "/",
        host_only: bool = False,
        dev: str | None = None,
    ) -> MountEntry:
        """A mount of another filesystem (a tmpfs, a bind mount of a host folder from an
        ext4 root, ...) at local ``mountpoint``. ``host_only``: mounted in the host's mount
        namespace only (the agent's own table does not show it, as for an agent in a
        container). ``dev``: the filesystem's "major:minor" (two mounts of one filesystem
        share it); a new one by default."""
        with self._lock:
            self._next_mount_id += 1
            entry = MountEntry(
                mountpoint=self._norm(mountpoint),
                root=root,
                source=source,
                options="rw",
                fstype=fstype,
                dev=dev or f"0:{200 + self._next_mount_id}",
                mount_id=self._next_mount_id,
            )
            self._other_mounts.append((entry, host_only))
            return entry

    def add_private_mount(
        self, path: str, *, pid: int = 4242, fstype: str = "tmpfs", source: str = "tmpfs"
    ) -> NamespaceTable:
        """A mount on the folder at local ``path`` (on a fake btrfs) made by process
        ``pid`` in a mount namespace of its own (``unshare -m``, private propagation):
        neither the host's table nor the agent's shows it. That process sees the
        filesystem's top level at ``/`` and the mount at the folder's place below it."""
        with self._lock:
            fs, rel = self._resolve(path)
            if not fs.exists(rel):
                raise FileNotFoundError(path)
            self._next_mount_id += 2
            root_id, mount_id = self._next_mount_id - 1, self._next_mount_id
            top = MountEntry("/", "/", fs.device, "rw", "btrfs", fs.dev, root_id, root_id)
            on = MountEntry(
                "/" + rel, "/", source, "rw", fstype, f"0:{300 + mount_id}", mount_id, root_id
            )
            table = NamespaceTable(pid, (top, on))
            self._private.append((table, fs, rel))
            return table

    def _detach_gone(self) -> None:
        """Private mounts whose folder is gone are detached (and lost)."""
        for item in list(self._private):
            table, fs, rel = item
            if not fs.exists(rel):
                self._private.remove(item)
                self.detached.append(table)

    def unmount(self, mountpoint: str) -> None:
        """Take away whatever is mounted on local ``mountpoint`` (the last mount there)."""
        with self._lock:
            mountpoint = self._norm(mountpoint)
            for i in range(len(self._other_mounts) - 1, -1, -1):
                if self._other_mounts[i][0].mountpoint == mountpoint:
                    del self._other_mounts[i]
                    return
            for i in range(len(self._mounts) - 1, -1, -1):
                if self._mounts[i][0].mountpoint == mountpoint:
                    del self._mounts[i]
                    return
            raise ValueError(f"nothing is mounted on {mountpoint}")

    def create_subvolume(
        self,
        path: str,
        *,
        read_only: bool = False,
        exclusive_bytes: int = 16 * KiB,
        referenced_bytes: int | None = None,
        created_at: datetime | None = None,
        snapshot_of: str | None = None,
        holds_files: bool = True,
    ) -> FakeSubvolume:
        """A subvolume at local ``path``; missing parent folders are made (mkdir -p).
        ``snapshot_of`` (a local path) sets its ``parent_uuid``. ``holds_files=False``
        makes an empty one (which ``remove_all`` can rmdir even when read-only)."""
        with self._lock:
            fs, rel = self._resolve(path)
            if rel == "" or fs.exists(rel):
                raise FileExistsError(path)
            self._make_dirs(fs, posixpath.dirname(rel))
            source_uuid = None
            if snapshot_of is not None:
                src_fs, src_rel = self._resolve(snapshot_of)
                if src_fs is not fs or src_rel not in fs.by_path:
                    raise ValueError(f"{snapshot_of} is not a subvolume of the same filesystem")
                source_uuid = fs.subvolumes[fs.by_path[src_rel]].uuid
            holder = fs.containing(rel)
            gen = fs.commit()
            sid = fs.next_id
            fs.next_id += 1
            sub = FakeSubvolume(
                id=sid,
                parent_id=holder.id,
                path=rel,
                generation=gen,
                cgen=gen,
                uuid=str(uuidlib.uuid5(_NAMESPACE, f"{fs.uuid}:{sid}")),
                parent_uuid=source_uuid,
                read_only=read_only,
                created_at=created_at or self.now,
                exclusive_bytes=exclusive_bytes,
                referenced_bytes=(
                    referenced_bytes if referenced_bytes is not None else exclusive_bytes
                ),
                holds_files=holds_files,
            )
            fs.subvolumes[sid] = sub
            fs.by_path[rel] = sid
            holder.changed(gen, self.now)
            fs.times[posixpath.dirname(rel)] = sub.created_at
            return sub

    def make_dirs(self, path: str) -> None:
        """A plain folder (and its parents) at local ``path``: new names in the
        subvolume holding it, whose generation, ctime and ctransid move."""
        with self._lock:
            fs, rel = self._resolve(path)
            if fs.exists(rel):
                return
            self._make_dirs(fs, rel)
            fs.containing(rel).changed(fs.commit(), self.now)

    def touch(
        self, path: str, *, add_bytes: int = 0, committed: bool = True, new_name: bool = False
    ) -> int:
        """Write into the subvolume holding local ``path``: moves its generation (and
        grows it by ``add_bytes``). Returns its generation. ``committed=False``: the
        generation moves only at the next commit (as btrfs does until its periodic
        commit). ``new_name``: a file was created too (the subvolume's ctime moves)."""
        with self._lock:
            fs, rel = self._resolve(path)
            sub = fs.subvolumes[fs.by_path[rel]] if rel in fs.by_path else fs.containing(rel)
            if committed:
                sub.generation = fs.commit()
            else:
                fs.uncommitted.add(sub.id)
            if new_name:
                sub.changed(sub.generation, self.now)
                fs.times[rel if fs.exists(rel) else posixpath.dirname(rel)] = self.now
            sub.holds_files = True
            sub.exclusive_bytes += add_bytes
            sub.referenced_bytes += add_bytes
            return sub.generation

    def rename(self, old: str, new: str) -> None:
        """``mv old new`` of a subvolume (with what is nested in it) to a folder of the
        same filesystem, as the lab showed it on Linux 6.x: the moved subvolume keeps
        its id and its generation (the folders that lose and gain the name are in the
        subvolume(s) holding them, whose generations move)."""
        with self._lock:
            fs, src = self._resolve(old)
            fs2, dst = self._resolve(new)
            if fs2 is not fs:
                raise OSError(18, "Invalid cross-device link")
            if src not in fs.by_path or fs.exists(dst):
                raise FileNotFoundError(old) if src not in fs.by_path else FileExistsError(new)
            if not fs.exists(posixpath.dirname(dst)) and posixpath.dirname(dst):
                raise FileNotFoundError(posixpath.dirname(dst))
            moved = fs.subvolumes[fs.by_path[src]]
            source_holder = (
                fs.containing(posixpath.dirname(src))
                if posixpath.dirname(src)
                else fs.subvolumes[TOP_LEVEL]
            )
            target_holder = (
                fs.containing(posixpath.dirname(dst))
                if posixpath.dirname(dst)
                else fs.subvolumes[TOP_LEVEL]
            )

            def moved_path(p: str) -> str:
                return dst + p[len(src) :] if _under(p, src) else p

            fs.by_path = {moved_path(p): i for p, i in fs.by_path.items()}
            for sub in fs.subvolumes.values():
                sub.path = moved_path(sub.path)
            fs.directories = {moved_path(d) for d in fs.directories}
            fs.inodes = {moved_path(d): i for d, i in fs.inodes.items()}
            fs.files = {moved_path(f) for f in fs.files}
            moved.parent_id = target_holder.id
            gen = fs.commit()
            for holder in {
                source_holder.id: source_holder,
                target_holder.id: target_holder,
            }.values():
                holder.changed(gen, self.now)

    def set_default(self, path: str) -> None:
        """``btrfs subvolume set-default`` (a builder: not logged in ``calls``)."""
        with self._lock:
            fs, rel = self._resolve(path)
            fs.default_id = fs.by_path[rel] if rel else TOP_LEVEL

    def enable_quota(self, mount: str, enabled: bool = True) -> None:
        with self._lock:
            fs = self._resolve(mount)[0]
            fs.quota_enabled = enabled
            if not enabled:
                fs.stale_qgroups.clear()  # disabling quotas deletes the quota tree

    def set_quota_inconsistent(self, mount: str, value: bool = True) -> None:
        """The quota status's INCONSISTENT flag (set by the kernel when the numbers are
        out of date, e.g. after a qgroup assign without rescan)."""
        with self._lock:
            self._resolve(mount)[0].quota_inconsistent = value

    def hide_path(self, path: str) -> None:
        """The subvolume at local ``path`` is listed with ``path=None``, as when its
        path is longer than BTRFS_IOC_INO_LOOKUP can return."""
        with self._lock:
            sub = self.subvolume(path)
            if sub is None or sub.id == TOP_LEVEL:
                raise ValueError(f"{path} is not a subvolume")
            sub.path_known = False

    def make_legacy(self, path: str) -> None:
        """The subvolume at local ``path`` as a filesystem made before Linux 3.6 keeps
        it: its root item has no uuids, creation or change time, nor ctransid, so it is
        listed with them None and ``created_at`` answers None."""
        with self._lock:
            sub = self.subvolume(path)
            if sub is None or sub.id == TOP_LEVEL:
                raise ValueError(f"{path} is not a subvolume")
            sub.legacy = True

    def forget_folder_time(self, path: str) -> None:
        """``plain_folders`` lists the plain folder at local ``path`` with no change time
        (``FolderEntry.changed_at`` None, which the ``Btrfs`` protocol allows though
        ``agent.host.files`` always reads one) until a name is next made in it."""
        with self._lock:
            fs, rel = self._resolve(path)
            if rel not in fs.directories:
                raise ValueError(f"{path} is not a plain folder")
            fs.times.pop(rel, None)

    def hold(self, path: str, who: str = "pid 4242 (sleep), working folder") -> None:
        """A process holds local ``path`` open (its working folder, an open file...)."""
        with self._lock:
            fs, rel = self._resolve(path)
            self._held.append((fs, rel, self._norm(path), who, False))

    def back_loop(self, path: str, device: str = "/dev/loop7") -> None:
        """A loop device is bound to the file at local ``path`` (the filesystem on it
        may be mounted anywhere)."""
        with self._lock:
            fs, rel = self._resolve(path)
            who = f"loop device {device} (its backing file)"
            self._held.append((fs, rel, self._norm(path), who, True))

    def release(self, path: str) -> None:
        """Nothing holds local ``path`` any longer."""
        with self._lock:
            self._held = [h for h in self._held if h[2] != self._norm(path)]

    def _lose_held(self, fs: FakeFilesystem, rel: str) -> None:
        self.lost_held.extend(h[2] for h in self._held if h[0] is fs and _under(h[1], rel))

    def fail_next(self, op: str, error: Exception) -> None:
        """The next process ``op`` (e.g. ``"subvolume list"``) raises ``error``."""
        with self._lock:
            self._failures.setdefault(op, []).append(error)

    def refuse_delete(self, path: str, reason: str = EPERM) -> None:
        """``delete`` fails for local ``path`` with ``reason`` until cleared with
        ``refuse_delete(path, "")``."""
        with self._lock:
            if reason:
                self._refusals[self._norm(path)] = reason
            else:
                self._refusals.pop(self._norm(path), None)

    def destroy(self, path: str) -> None:
        """Remove the subvolume at local ``path`` whatever its flags, as a program using
        the destroy ioctl directly would (dockerd's btrfs driver removing a layer). It
        must hold no subvolume. Not logged in ``calls``: the agent did not run it."""
        with self._lock:
            fs, rel = self._resolve(path)
            if rel not in fs.by_path:
                raise ValueError(f"{path} is not a subvolume")
            sub = fs.subvolumes[fs.by_path[rel]]
            if fs.children(sub.id):
                raise ValueError(f"{path} still holds subvolumes")
            self._destroy(fs, sub)

    def remove_all(self, path: str) -> str | None:
        """What ``rm -rf path`` (Go's ``os.RemoveAll``, which dockerd uses) does: remove
        everything it can, deepest first, and return the first error in Go's words, or
        None when ``path`` is gone. A subvolume goes only when the kernel lets rmdir
        remove subvolumes (Linux >= 4.18), its files can be unlinked (it is writable, or
        empty), the subvolume holding it is writable, and nothing is left in it."""
        with self._lock:
            fs, top = self._resolve(path)
            if top == "" or top in fs.by_path:
                raise ValueError(f"remove_all({path}): the fake removes folders, not {path}")
            if not fs.exists(top):
                return None
            # Go's RemoveAll follows into whatever is mounted inside and empties it
            # before failing on the mount point with EBUSY: what must never happen.
            local_top = self._norm(path).rstrip("/") + "/"
            crossed = [e.mountpoint for e in self.mounts() if e.mountpoint.startswith(local_top)]
            if crossed:
                self.emptied_mounts.extend(crossed)
                return f"unlinkat {crossed[0]}: device or resource busy"
            self._lose_held(fs, top)
            inside = sorted(
                (s for s in fs.subvolumes.values() if _under(s.path, top)),
                key=lambda s: s.path.count("/"),
                reverse=True,
            )
            first_error: str | None = None
            for sub in inside:
                local = self._local(fs, sub.path) or sub.path
                if not self.rmdir_deletes_subvolumes():
                    reason = f"unlinkat {local}: operation not permitted"
                elif sub.read_only and sub.holds_files:
                    reason = f"unlinkat {local}/bin: read-only file system"
                elif fs.containing(sub.path).read_only:
                    reason = f"unlinkat {local}: read-only file system"
                elif fs.children(sub.id):
                    reason = f"unlinkat {local}: directory not empty"
                else:
                    self._destroy(fs, sub)
                    continue
                first_error = first_error or reason
            left = [s.path for s in fs.subvolumes.values() if _under(s.path, top)]
            fs.directories = {
                d for d in fs.directories if not _under(d, top) or any(_under(p, d) for p in left)
            }
            self._detach_gone()
            return first_error

    # ----------------------------------------------------------------- inspecting

    def subvolume(self, path: str) -> FakeSubvolume | None:
        """The live subvolume at local ``path``, or None."""
        with self._lock:
            try:
                fs, rel = self._resolve(path)
            except ValueError:
                return None
            sid = fs.by_path.get(rel, TOP_LEVEL if rel == "" else None)
            return fs.subvolumes[sid] if sid is not None else None

    def exists(self, path: str) -> bool:
        with self._lock:
            try:
                fs, rel = self._resolve(path)
            except ValueError:
                return False
            return fs.exists(rel)

    def subvolume_paths(self, under: str | None = None) -> list[str]:
        """Local paths of every subvolume (not the top levels), by id, optionally only
        those strictly under local path ``under``."""
        with self._lock:
            out: list[str] = []
            for fs in self.filesystems:
                for sub in sorted(fs.subvolumes.values(), key=lambda s: s.id):
                    local = self._local(fs, sub.path)
                    if sub.id == TOP_LEVEL or local is None:
                        continue
                    if under is None or local.startswith(self._norm(under).rstrip("/") + "/"):
                        out.append(local)
            return out

    def filesystem_at(self, path: str) -> FakeFilesystem:
        with self._lock:
            return self._resolve(path)[0]

    def calls_to(self, op: str) -> list[tuple[str, ...]]:
        """The argument tuples of every ``op`` process run so far."""
        return [c.args for c in self.calls if c.op == op]

    # ----------------------------------------------------------------- agent.host.backend.Btrfs

    def version(self) -> str:
        self._process("version")
        return self.progs_version

    def tool_present(self) -> bool:
        return not self.missing

    def kernel_release(self) -> str:
        return self.kernel

    def rmdir_deletes_subvolumes(self) -> bool:
        if self.rmdir_subvol is not None:
            return self.rmdir_subvol
        return _kernel_at_least(self.kernel, (4, 18))

    def mounts(self) -> list[MountEntry]:
        with self._lock:
            own = [entry for entry, host_only in self._other_mounts if not host_only]
            return [entry for entry, _ in self._mounts] + own

    def host_mounts(self) -> list[MountEntry]:
        with self._lock:
            if self.host_mounts_error is not None:
                raise HostMountsUnavailable(self.host_mounts_error)
            return [entry for entry, _ in self._mounts] + [e for e, _ in self._other_mounts]

    def namespace_mounts(self) -> list[NamespaceTable]:
        with self._lock:
            if self.namespace_mounts_error is not None:
                raise HostMountsUnavailable(self.namespace_mounts_error)
            if self.host_mounts_error is not None:
                raise HostMountsUnavailable(self.host_mounts_error)
            return [table for table, _, _ in self._private]

    def holders(self) -> Holders:
        """What ``hold`` and ``back_loop`` made, as the host's namespace holds it (the
        host's mount table, local paths: the fake's host and local paths are one)."""
        with self._lock:
            if self.holders_error is not None:
                raise HoldersUnavailable(self.holders_error)
            table = tuple(entry for entry, _ in self._mounts) + tuple(
                e for e, _ in self._other_mounts
            )
            procs = tuple(HeldPath(h[2], h[3]) for h in self._held if not h[4])
            kernel = tuple(HeldPath(h[2], h[3]) for h in self._held if h[4])
            return Holders((HolderTable(1, table, procs),), kernel)

    def resolve_host_paths(self, paths: Collection[str]) -> dict[str, ResolvedPath]:
        """The real walk (``agent.host.hostpaths.resolve_path``) over the fake's
        folders, files, mount points and ``symlink``s."""
        with self._lock:
            return {p: resolve_path(p, self._lookup) for p in paths}

    def symlink(self, path: str, target: str) -> None:
        """A symlink at local ``path`` (its folders are made) pointing at ``target``
        (absolute or relative, as written; it need not exist). Only
        ``resolve_host_paths`` follows the fake's links."""
        with self._lock:
            path = self._norm(path)
            try:
                fs, rel = self._resolve(path)
                self._make_dirs(fs, posixpath.dirname(rel))
            except ValueError:
                pass
            self.links[path] = target

    def _lookup(self, path: str) -> tuple[bool, str | None]:
        if path in self.unreadable:
            raise PermissionError(errno.EACCES, "Permission denied")
        if path in self.links:
            return True, self.links[path]
        mounts = [e.mountpoint for e, _ in self._mounts] + [
            e.mountpoint for e, _ in self._other_mounts
        ]
        if any(_under(m.strip("/"), path.strip("/")) for m in mounts):
            return True, None  # a mount point, or a folder on the way to one
        try:
            fs, rel = self._resolve(path)
        except ValueError:
            return False, None
        return fs.exists(rel) or rel in fs.files, None

    def filesystem(self, mount: str) -> FilesystemIdent:
        with self._lock:
            fs = self._fs_for("filesystem show", mount)
            return FilesystemIdent(uuid=fs.uuid, label=fs.label, devices=(fs.device,))

    def usage(self, mount: str) -> FsUsage:
        with self._lock:
            fs = self._fs_for("filesystem usage", mount)
            used = fs.used_bytes()
            return FsUsage(
                size_bytes=fs.size_bytes, used_bytes=used, free_bytes=fs.size_bytes - used
            )

    def list_subvolumes(self, mount: str) -> list[SubvolumeRecord]:
        with self._lock:
            fs = self._fs_for("tree search", mount, ioctl=True)
            return [
                s.record()
                for s in sorted(fs.subvolumes.values(), key=lambda s: s.id)
                if s.id != TOP_LEVEL
            ]

    def list_scope(
        self, mount: str, *, ids: Collection[int] = (), folder: str | None = None
    ) -> ScopeRecords:
        """What the real one reads: the subvolumes ``ids`` and those at or inside
        ``folder`` (on this filesystem only), everything nested in them (by parent id,
        as the forward refs give it), and every subvolume holding one of them."""
        with self._lock:
            fs = self._fs_for("tree search scope", mount, ioctl=True)
            roots = {i for i in ids if i in fs.subvolumes and i != TOP_LEVEL}
            if folder is not None:
                try:
                    on, rel = self._resolve(folder)
                except ValueError:
                    on, rel = None, ""
                if on is fs:
                    roots |= {
                        s.id
                        for s in fs.subvolumes.values()
                        if s.id != TOP_LEVEL and _under(s.path, rel)
                    }
            seen: set[int] = set()
            todo = set(roots)
            while todo:
                sid = todo.pop()
                seen.add(sid)
                todo |= {c.id for c in fs.children(sid)} - seen
            for sid in list(seen):
                cur = fs.subvolumes[sid].parent_id
                while cur != TOP_LEVEL and cur in fs.subvolumes and cur not in seen:
                    seen.add(cur)
                    cur = fs.subvolumes[cur].parent_id
            records = [fs.subvolumes[i].record() for i in sorted(seen)]
            return ScopeRecords(records, fs.default_id)

    def qgroups(self, mount: str) -> QgroupReport | None:
        with self._lock:
            fs = self._fs_for("tree search quota", mount, ioctl=True)
            if not fs.quota_enabled:
                return None
            live = {
                s.id: Qgroup(id=s.id, referenced=s.referenced_bytes, exclusive=s.exclusive_bytes)
                for s in fs.subvolumes.values()
            }
            return QgroupReport({**fs.stale_qgroups, **live}, inconsistent=fs.quota_inconsistent)

    def default_subvolume(self, mount: str) -> int:
        with self._lock:
            return self._fs_for("subvolume get-default", mount).default_id

    def created_at(self, path: str) -> datetime | None:
        if not self.created_at_supported:
            return None
        sub = self.subvolume(path)
        if sub is None or sub.id == TOP_LEVEL or sub.legacy:
            return None
        return sub.created_at

    def change_mark(self, mount: str, since: ChangeMark | None = None) -> ChangeMark:
        """A digest of what ``list_subvolumes``, ``qgroups`` and ``default_subvolume``
        would answer now (the real mark digests the tree blocks holding the same)."""
        with self._lock:
            fs = self._fs_for("tree search", mount, ioctl=True)
            subs = sorted((s.record() for s in fs.subvolumes.values()), key=lambda r: r.id)
            quota = (
                fs.quota_enabled,
                fs.quota_inconsistent,
                sorted(
                    (s.id, s.exclusive_bytes, s.referenced_bytes) for s in fs.subvolumes.values()
                ),
                sorted(fs.stale_qgroups),
            )
            ranges = []
            for part in (subs, fs.default_id, quota):
                digest = hashlib.blake2b(repr(part).encode(), digest_size=16).digest()
                ranges.append((0, digest))
            return ChangeMark(tuple(ranges))

    def folder_stamp(self, path: str) -> tuple[int, int, int, int] | None:
        """(device, inode, a value that moves when a name is made or removed in the
        folder, 0): a folder made again has another inode."""
        with self._lock:
            try:
                fs, rel = self._resolve(path)
            except ValueError:
                return None
            if not fs.exists(rel):
                return None
            inside = sorted(
                n
                for n in (*fs.directories, *fs.files, *fs.by_path)
                if posixpath.dirname(n) == rel and n != rel
            )
            inode = 256 if rel in fs.by_path else fs.inodes.get(rel, 0)  # 256: a subvolume
            return (int(fs.dev.split(":")[1]), inode, hash(tuple(inside)), 0)

    def set_readonly(self, path: str, value: bool) -> None:
        with self._lock:
            cmd = ("btrfs", "property", "set", path, "ro", "true" if value else "false")
            fs = self._fs_for("property set ro", path, cmd=cmd)
            rel = self._resolve(path)[1]
            if rel not in fs.by_path and rel != "":
                stderr = (
                    "ERROR: object is not compatible with property: ro\n"
                    if fs.exists(rel)
                    else f"ERROR: cannot access '{path}': {ENOENT}\n"
                )
                raise BtrfsCommandError(cmd, 1, "", stderr)
            sub = fs.subvolumes[fs.by_path[rel]] if rel else fs.subvolumes[TOP_LEVEL]
            sub.read_only = value
            sub.generation = fs.commit()

    def delete(self, paths: Sequence[str]) -> list[DeleteResult]:
        with self._lock:
            self._process("subvolume delete", tuple(paths))
            return [self._delete_one(path) for path in paths]

    def sync(self, mount: str) -> None:
        with self._lock:
            fs = self._fs_for("subvolume sync", mount)
            fs.pending_free_bytes = 0
            fs.dropping.clear()

    def still_dropping(self, mount: str, ids: Collection[int]) -> set[int]:
        with self._lock:
            fs = self._resolve(mount)[0]  # a tree search: no process
            return fs.dropping & set(ids)

    def commit(self, mount: str) -> None:
        with self._lock:
            self._resolve(mount)[0].commit()  # an ioctl, not a process: not in ``calls``

    def kernel_drops_qgroups(self) -> bool:
        return _kernel_at_least(self.kernel, (6, 11))

    def destroy_qgroup(self, mount: str, qgroup_id: int) -> None:
        with self._lock:
            cmd = ("btrfs", "qgroup", "destroy", f"0/{qgroup_id}", mount)
            fs = self._fs_for("qgroup destroy", mount, cmd=cmd)
            if self.qgroup_busy > 0 or qgroup_id in fs.subvolumes:
                self.qgroup_busy = max(0, self.qgroup_busy - 1)
                stderr = "ERROR: unable to destroy quota group: Device or resource busy\n"
                raise BtrfsCommandError(cmd, 1, "", stderr)
            if qgroup_id not in fs.stale_qgroups:
                stderr = "ERROR: unable to destroy quota group: No such file or directory\n"
                raise BtrfsCommandError(cmd, 1, "", stderr)
            del fs.stale_qgroups[qgroup_id]

    # ----------------------------------------------------------------- plain files

    def write_file(self, path: str) -> None:
        """A plain file at local ``path`` (its folders are made)."""
        with self._lock:
            fs, rel = self._resolve(path)
            self._make_dirs(fs, posixpath.dirname(rel))
            fs.files.add(rel)
            fs.times[posixpath.dirname(rel)] = self.now
            fs.containing(rel).holds_files = True

    def remove_tree(self, path: str, *, keep_top: bool = False) -> TreeRemoval:
        """What ``agent.host.files.remove_tree`` does: plain files and folders only;
        stops at a subvolume or a mount inside, touching nothing more."""
        with self._lock:
            fs, top = self._resolve(path)
            if not fs.exists(top):
                return TreeRemoval(path, 0, 0)
            if top in fs.by_path or top == "":
                return TreeRemoval(path, 0, 0, f"{path} is a btrfs subvolume")
            local_top = self._norm(path)
            for entry in self.mounts():
                if entry.mountpoint.startswith(local_top.rstrip("/") + "/"):
                    return TreeRemoval(path, 0, 0, f"{entry.mountpoint} is a mount point")
            for sub in fs.subvolumes.values():
                if _under(sub.path, top) and sub.path != top:
                    where = self._local(fs, sub.path) or sub.path
                    return TreeRemoval(path, 0, 0, f"{where} is a btrfs subvolume")
            holder = fs.containing(top)
            if holder.read_only:
                return TreeRemoval(path, 0, 0, f"{path}: Read-only file system")
            files = {f for f in fs.files if _under(f, top)}
            dirs = {d for d in fs.directories if _under(d, top) and (d != top or not keep_top)}
            self._lose_held(fs, top)
            fs.files -= files
            fs.directories -= dirs
            self._detach_gone()
            return TreeRemoval(path, len(files), len(dirs))

    def last_change(self, path: str) -> datetime | None:
        with self._lock:
            try:
                fs, rel = self._resolve(path)
            except ValueError:
                return None
            if not fs.exists(rel):
                return None
            known = [
                when for d, when in fs.times.items() if d == rel or posixpath.dirname(d) == rel
            ]
            return max(known) if known else None

    def plain_folders(self, path: str) -> list[FolderEntry]:
        with self._lock:
            fs, rel = self._resolve(path)
            return [
                FolderEntry(name=posixpath.basename(d), changed_at=fs.times.get(d))
                for d in sorted(fs.directories)
                if posixpath.dirname(d) == rel and d not in fs.by_path
            ]

    # ----------------------------------------------------------------- internals

    def _delete_one(self, path: str) -> DeleteResult:
        def fail(reason: str) -> DeleteResult:
            return DeleteResult(path=path, ok=False, error=reason)

        try:
            fs, rel = self._resolve(path)
        except ValueError:
            return fail(ENOENT)
        if not fs.exists(rel):
            return fail(ENOENT)
        if rel != "" and rel not in fs.by_path:
            return fail(NOT_SUBVOLUME)
        refusal = self._refusals.get(self._norm(path))
        if refusal:
            return fail(refusal)
        sub = fs.subvolumes[fs.by_path[rel]] if rel else fs.subvolumes[TOP_LEVEL]
        if sub.id == TOP_LEVEL:
            return fail(NOT_ON_BTRFS)
        if sub.id == fs.default_id:
            return fail(DEFAULT_SUBVOLUME)
        # A subvolume mounted or bind-mounted somewhere deletes fine on Linux 6 (the
        # mounts go with it): keeping mount points is the caller's rule, not btrfs'.
        if fs.containing(rel).read_only:
            return fail(EROFS)
        if fs.children(sub.id):
            return fail(ENOTEMPTY)
        self._destroy(fs, sub)
        return DeleteResult(path=path, ok=True)

    def _destroy(self, fs: FakeFilesystem, sub: FakeSubvolume) -> None:
        """Remove ``sub`` (which holds no subvolume) and the folders in it."""
        self._lose_held(fs, sub.path)
        del fs.subvolumes[sub.id]
        del fs.by_path[sub.path]
        fs.directories = {d for d in fs.directories if not _under(d, sub.path)}
        self._mounts = [
            (entry, entry_fs)
            for entry, entry_fs in self._mounts
            if entry_fs is not fs or not _under(entry.root.strip("/"), sub.path)
        ]
        if self.lazy_free:
            fs.pending_free_bytes += sub.exclusive_bytes
            fs.dropping.add(sub.id)
        if fs.quota_enabled and not self.kernel_drops_qgroups():
            # The cleaner frees the extents; the qgroup stays, counting nothing.
            fs.stale_qgroups[sub.id] = Qgroup(sub.id, 0, 0)
        fs.files = {f for f in fs.files if not _under(f, sub.path)}
        holder = fs.subvolumes.get(sub.parent_id)
        gen = fs.commit()
        if holder is not None:
            holder.changed(gen, self.now)
        self._detach_gone()

    def _process(self, op: str, args: tuple[str, ...] = (), *, ioctl: bool = False) -> None:
        """Bookkeeping for one btrfs process (or ioctl, which needs no binary: the
        ``missing`` switch spares it): the log, injected failures."""
        if self.missing and not ioctl:
            raise BtrfsUnavailable("btrfs: command not found")
        self.calls.append(Call(op, args))
        queued = self._failures.get(op)
        if queued:
            raise queued.pop(0)

    def _fs_for(
        self, op: str, path: str, *, cmd: tuple[str, ...] | None = None, ioctl: bool = False
    ) -> FakeFilesystem:
        self._process(op, (path,), ioctl=ioctl)
        try:
            return self._resolve(path)[0]
        except ValueError:
            if ioctl:  # what agent.host.btrfs raises when the kernel says ENOTTY
                raise BtrfsIoctlError(
                    "BTRFS_IOC_TREE_SEARCH_V2",
                    path,
                    OSError(errno.ENOTTY, os.strerror(errno.ENOTTY)),
                    f"not a btrfs filesystem: {path} (BTRFS_IOC_TREE_SEARCH_V2: ENOTTY)",
                ) from None
            raise BtrfsCommandError(
                cmd or ("btrfs", *op.split(), path),
                1,
                "",
                f"ERROR: not a btrfs filesystem: {path}\nERROR: can't access '{path}'\n",
            ) from None

    def _add_mount(self, fs: FakeFilesystem, mountpoint: str, rel: str) -> MountEntry:
        holder = fs.subvolumes[fs.by_path[rel]] if rel in fs.by_path else fs.containing(rel)
        if rel == "":
            holder = fs.subvolumes[TOP_LEVEL]
        self._next_mount_id += 1
        entry = MountEntry(
            mountpoint=mountpoint,
            root="/" + rel,
            source=fs.device,
            options=(f"rw,relatime,space_cache=v2,subvolid={holder.id},subvol=/{holder.path}"),
            fstype="btrfs",
            dev=fs.dev,
            mount_id=self._next_mount_id,
        )
        self._mounts.append((entry, fs))
        return entry

    @staticmethod
    def _norm(path: str) -> str:
        if not path.startswith("/"):
            raise ValueError(f"not an absolute path: {path!r}")
        return posixpath.normpath(path) if path != "/" else path

    def _resolve(self, path: str) -> tuple[FakeFilesystem, str]:
        """(filesystem, top-level-relative path) of a local path, through the mount with
        the longest matching mount point. ValueError when no fake filesystem holds it."""
        path = self._norm(path)
        best: tuple[MountEntry, FakeFilesystem] | None = None
        for entry, fs in self._mounts:
            mp = entry.mountpoint
            if path == mp or path.startswith(mp.rstrip("/") + "/"):
                if best is None or len(mp) > len(best[0].mountpoint):
                    best = (entry, fs)
        if best is None:
            raise ValueError(f"{path} is on no fake btrfs filesystem")
        entry, fs = best
        inside = path[len(entry.mountpoint) :].strip("/")
        rel = posixpath.join(entry.root.strip("/"), inside).strip("/")
        return fs, rel

    def _local(self, fs: FakeFilesystem, rel: str) -> str | None:
        """The local path of ``rel`` through the first mount that shows it."""
        for entry, entry_fs in self._mounts:
            root = entry.root.strip("/")
            if entry_fs is fs and _under(rel, root):
                inside = rel[len(root) :].strip("/")
                return posixpath.join(entry.mountpoint, inside) if inside else entry.mountpoint
        return None

    def _make_dirs(self, fs: FakeFilesystem, rel: str) -> None:
        while rel and not fs.exists(rel):
            fs.directories.add(rel)
            fs.inodes[rel] = fs.next_inode
            fs.next_inode += 1
            fs.times[rel] = self.now
            fs.times[posixpath.dirname(rel)] = self.now
            rel = posixpath.dirname(rel)


# --------------------------------------------------------------------------- Docker


@dataclass
class FakeImage:
    id: str  # "sha256:<hex>"
    name: str
    cache_ids: tuple[str, ...]  # its layers' subvolume names, bottom first


@dataclass
class FakeContainer:
    id: str
    name: str
    image_id: str
    running: bool
    volume_names: list[str]
    mount_id: str  # its layer's subvolume name; the -init layer is mount_id + "-init"
    created: bool = False  # created and never started
    binds: list[tuple[str, str]] = field(default_factory=list)  # (host source, destination)
    volume_sources: dict[str, str] = field(default_factory=dict)  # volume name -> _data

    @property
    def init_id(self) -> str:
        return self.mount_id + "-init"

    def record(self) -> ContainerRecord:
        if self.running:
            state = "Up 2 hours"
        elif self.created:
            state = "Created"
        else:
            state = "Exited (0) 2 hours ago"
        mounts = [
            ContainerMount("volume", self.volume_sources.get(v, ""), f"/v{i}", v)
            for i, v in enumerate(self.volume_names)
        ]
        mounts += [ContainerMount("bind", src, dst) for src, dst in self.binds]
        return ContainerRecord(
            id=self.id,
            name=self.name,
            running=self.running,
            status=state,
            image_id=self.image_id,
            volume_names=tuple(self.volume_names),
            mounts=tuple(mounts),
        )


class FakeEventStream:
    """``agent.host.backend.EventStream`` of a ``FakeDocker``: events are handed over
    one at a time; ``FakeDocker`` waits (briefly) until the reader has taken each, so a
    change made through the fake is seen by the agent before the call returns, as a
    real daemon's event arrives a moment after the change. ``cut`` ends it the way a
    daemon that goes away does."""

    def __init__(self, owner: FakeDocker) -> None:
        self._owner = owner
        self._cond = threading.Condition()
        self._queue: list[DockerEvent] = []
        self._taken = 0
        self._put = 0
        self._closed = False
        self.broken = False

    def __iter__(self) -> Iterator[DockerEvent]:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait(0.5)
                if self._closed and not self._queue:
                    break
                event = self._queue.pop(0)
            yield event
            with self._cond:  # the reader is back for the next one: it handled this
                self._taken += 1
                self._cond.notify_all()
        with self._cond:
            self._taken = self._put
            self._cond.notify_all()
        if self.broken:
            raise DockerUnavailable("Docker's event stream was cut")

    def put(self, event: DockerEvent, *, wait: float = 2.0) -> None:
        with self._cond:
            if self._closed:
                return
            self._queue.append(event)
            self._put += 1
            target = self._put
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._taken >= target or self._closed, wait)

    def cut(self) -> None:
        self.broken = True
        self.close()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._owner._streams.discard(self)


class FakeDocker:
    """``agent.host.backend.Docker`` over in-memory images, containers and volumes.

    Linked to a ``FakeBtrfs`` (``btrfs=fs``), the data root must lie on one of its
    filesystems: volumes get their ``_data`` folder there, images and containers their
    layer subvolumes in ``<data_root>/btrfs/subvolumes/``, and ``remove_volume`` meets
    the subvolumes inside a volume the way dockerd does.

    Switches: ``down`` (every API call raises ``DockerUnavailable``; ``layer_refs``
    reads files, so it still works), ``anonymous_label`` (label anonymous volumes the
    way Docker 23+ does; 20.10 only gives them a 64-hex name). ``calls`` logs the
    Protocol methods called.
    """

    def __init__(
        self,
        *,
        btrfs: FakeBtrfs | None = None,
        data_root: str = "/volume1/docker",
        server_version: str = "20.10.24+dfsg1",
        api_version: str = "1.41",
        storage_driver: str = "btrfs",
        anonymous_label: bool = False,
        now: datetime | None = None,
    ) -> None:
        self.btrfs = btrfs
        self.data_root = data_root.rstrip("/")
        self.server_version = server_version
        self.api_version = api_version
        self.storage_driver = storage_driver
        self.anonymous_label = anonymous_label
        self.now = now or (btrfs.now if btrfs is not None else DEFAULT_NOW)
        self.down = False
        self.identity_known = True
        self.restarts = 0
        self.calls: list[str] = []
        self.images: dict[str, FakeImage] = {}
        self.containers_by_id: dict[str, FakeContainer] = {}
        self.volumes_by_name: dict[str, VolumeRecord] = {}
        self.extra_layer_refs: dict[str, LayerRefs] = {}
        # volume stores (``volumes/metadata.db``) of daemons whose data root was a folder
        # here, by that folder: set by ``record_inner_volumes`` / ``break_volume_store``
        self.volume_stores_by_root: dict[str, VolumeStores] = {}
        self._counter = 0
        self._lock = threading.RLock()
        self._streams: set[FakeEventStream] = set()
        self.events_opened = 0
        self.quiet = False  # True: changes send no event (an event the agent missed)
        if btrfs is not None:
            # dockerd bind-mounts its data root and <data_root>/btrfs onto themselves.
            if not btrfs.exists(self.data_root):
                btrfs.make_dirs(self.data_root)  # ValueError when on no fake filesystem
            btrfs.make_dirs(f"{self.data_root}/btrfs/subvolumes")
            for mountpoint in (self.data_root, f"{self.data_root}/btrfs"):
                btrfs.bind_mount(mountpoint, mountpoint)

    # ----------------------------------------------------------------- building

    def add_image(
        self, name: str = "busybox", *, layers: int = 1, layer_bytes: int = 2 * MiB
    ) -> FakeImage:
        """An image of ``layers`` layers; linked, each layer is a subvolume snapshotted
        from the one below."""
        with self._lock:
            image_id = "sha256:" + self._hex("image", name)
            cache_ids = tuple(self._hex("layer", name, i) for i in range(layers))
            below: str | None = None
            for cache_id in cache_ids:
                below = self._layer_subvolume(
                    cache_id, snapshot_of=below, size=layer_bytes if below is None else 16 * KiB
                )
            image = FakeImage(id=image_id, name=name, cache_ids=cache_ids)
            self.images[image_id] = image
        self.emit("image", "pull", image_id)
        return image

    def add_volume(
        self,
        name: str | None = None,
        *,
        labels: dict[str, str] | None = None,
        created_at: datetime | None = None,
        driver: str = "local",
    ) -> VolumeRecord:
        """A volume; without a name, an anonymous one (64 hex digits, as Docker names
        them). Linked, its ``_data`` folder is made."""
        with self._lock:
            anonymous = name is None
            name = name if name is not None else self._hex("volume")
            if name in self.volumes_by_name:
                raise ValueError(f"volume {name} exists")
            labels = dict(labels or {})
            if anonymous and self.anonymous_label:
                labels[ANONYMOUS_LABEL] = ""
            mountpoint = f"{self.data_root}/volumes/{name}/_data"
            if self.btrfs is not None:
                self.btrfs.make_dirs(mountpoint)
            record = VolumeRecord(
                name=name,
                driver=driver,
                mountpoint=mountpoint,
                labels=labels,
                created_at=created_at or self.now,
                anonymous=is_anonymous(name, labels),
            )
            self.volumes_by_name[name] = record
        self.emit("volume", "create", name)
        return record

    def add_container(
        self,
        name: str,
        *,
        image: FakeImage | None = None,
        running: bool = True,
        created: bool = False,
        volumes: Iterable[str] = (),
        binds: Iterable[tuple[str, str]] = (),
    ) -> FakeContainer:
        """A container (running, stopped, or ``created`` and never started) using the
        named ``volumes`` (missing ones are made, like ``docker run -v name:/x``).
        Without ``image``, the first image, made if there is none. Linked, its layer
        and ``-init`` layer subvolumes are made."""
        volumes = list(volumes)
        with self._lock:
            if any(c.name == name for c in self.containers_by_id.values()):
                raise ValueError(f"container {name} exists")
            if image is None:
                image = next(iter(self.images.values()), None) or self.add_image()
            for volume in volumes:
                if volume not in self.volumes_by_name:
                    self.add_volume(volume)
            mount_id = self._hex("mount", name)
            top = image.cache_ids[-1] if image.cache_ids else None
            self._layer_subvolume(mount_id + "-init", snapshot_of=top, size=16 * KiB)
            self._layer_subvolume(mount_id, snapshot_of=mount_id + "-init", size=16 * KiB)
            container = FakeContainer(
                id=self._hex("container", name),
                name=name,
                image_id=image.id,
                running=running and not created,
                volume_names=list(volumes),
                mount_id=mount_id,
                created=created,
                binds=list(binds),
                volume_sources={v: self.volumes_by_name[v].mountpoint for v in volumes},
            )
            self.containers_by_id[container.id] = container
        self.emit("container", "create", container.id)
        if container.running:
            self.emit("container", "start", container.id)
        return container

    def stop_container(self, ref: str) -> None:
        with self._lock:
            container = self._container(ref)
            container.running = False
        self.emit("container", "die", container.id)

    def start_container(self, ref: str) -> None:
        with self._lock:
            container = self._container(ref)
            container.running, container.created = True, False
        self.emit("container", "start", container.id)

    def remove_container(self, ref: str, *, volumes: bool = False) -> None:
        """``docker rm [-v]``: the container and its layer subvolumes go; with
        ``volumes``, its anonymous volumes too when nothing else uses them (errors
        ignored, as dockerd does)."""
        with self._lock:
            container = self._container(ref)
            del self.containers_by_id[container.id]
            if self.btrfs is not None:
                for layer in (container.mount_id, container.init_id):
                    self._drop_layer(layer)
            if volumes:
                for name in container.volume_names:
                    record = self.volumes_by_name.get(name)
                    if record is not None and record.anonymous and not self._users(name):
                        try:
                            self._remove_volume_data(record)
                        except ToolFailed:
                            continue
                        del self.volumes_by_name[name]
        self.emit("container", "destroy", container.id)

    def set_layer_refs(self, data_root: str, refs: LayerRefs) -> None:
        """What ``layer_refs`` answers for another data root (e.g. an inner daemon's)."""
        with self._lock:
            self.extra_layer_refs[data_root.rstrip("/")] = refs

    def volume(self, name: str) -> VolumeRecord | None:
        return self.volumes_by_name.get(name)

    def container(self, ref: str) -> FakeContainer:
        with self._lock:
            return self._container(ref)

    def layer_paths(self) -> list[str]:
        """Local paths of every layer subvolume Docker references (images and
        containers) in its own data root."""
        refs = self._own_refs()
        return sorted(f"{self.data_root}/btrfs/subvolumes/{name}" for name in refs.all)

    # ----------------------------------------------------------------- agent.host.backend.Docker

    def ping(self) -> None:
        self._api("ping")

    def daemon_identity(self) -> str | None:
        """The daemon process: another after ``restart()``, and after any change of
        the settings ``info`` answers (a real daemon changes them only by restarting);
        None while down or when ``identity_known`` is off (a tcp:// daemon)."""
        self.calls.append("daemon_identity")
        if self.down or not self.identity_known:
            return None
        settings = (self.data_root, self.storage_driver, self.server_version, self.api_version)
        return f"fake-{self.restarts}:{settings!r}"

    def restart(self) -> None:
        """The daemon restarts: another process answers from now on."""
        self.restarts += 1

    def info(self) -> DockerInfo:
        self._api("info")
        return DockerInfo(
            server_version=self.server_version,
            api_version=self.api_version,
            storage_driver=self.storage_driver,
            data_root=self.data_root,
        )

    def volumes(self) -> list[VolumeRecord]:
        with self._lock:
            self._api("volumes")
            return list(self.volumes_by_name.values())

    def containers(self) -> list[ContainerRecord]:
        with self._lock:
            self._api("containers")
            return [c.record() for c in self.containers_by_id.values()]

    def layer_refs(self, data_root: str) -> LayerRefs:
        with self._lock:
            self.calls.append("layer_refs")
            root = data_root.rstrip("/")
            if root in self.extra_layer_refs:
                return self.extra_layer_refs[root]
            if root == self.data_root:
                return self._own_refs()
            if self.btrfs is not None and self.btrfs.exists(root):
                return LayerRefs()
            raise DockerUnavailable(f"Docker's data root {data_root} is not a folder visible here")

    def volume_stores(self, data_root: str) -> VolumeStores:
        with self._lock:
            self.calls.append("volume_stores")
            return self.volume_stores_by_root.get(data_root.rstrip("/"), VolumeStores())

    def record_inner_volumes(self, data_root: str, volumes: dict[str, dict[str, str]]) -> None:
        """A daemon whose data root was ``data_root`` recorded these volumes (name to
        labels) in its volume store."""
        root = data_root.rstrip("/")
        store = f"{root}/volumes/metadata.db"
        with self._lock:
            old = self.volume_stores_by_root.get(root, VolumeStores())
            added = tuple(
                StoredVolume(name=n, labels=dict(labels), store=store)
                for n, labels in volumes.items()
            )
            self.volume_stores_by_root[root] = VolumeStores(
                volumes=old.volumes + added, unreadable=old.unreadable
            )

    def break_volume_store(self, data_root: str, why: str = "not a bolt file") -> None:
        """The volume store under ``data_root`` exists and cannot be read."""
        root = data_root.rstrip("/")
        with self._lock:
            old = self.volume_stores_by_root.get(root, VolumeStores())
            self.volume_stores_by_root[root] = VolumeStores(
                volumes=old.volumes,
                unreadable=(*old.unreadable, (f"{root}/volumes/metadata.db", why)),
            )

    def events(self) -> FakeEventStream:
        if self.down:
            raise DockerUnavailable(
                "Docker at unix:///var/run/docker.sock is unreachable: connection refused"
            )
        stream = FakeEventStream(self)
        self._streams.add(stream)
        self.events_opened += 1
        return stream

    def emit(self, type: str, action: str, actor: str = "") -> None:
        """Send an event to every open stream (the building methods do, as dockerd)."""
        if self.quiet:
            return
        event = DockerEvent(type, action, actor, 0)
        for stream in list(self._streams):
            stream.put(event)

    def cut_event_streams(self) -> None:
        """Every open event stream ends with an error (the daemon restarted)."""
        for stream in list(self._streams):
            stream.cut()

    def remove_volume(self, name: str) -> None:
        with self._lock:
            self._api("remove_volume")
            record = self.volumes_by_name.get(name)
            if record is None:
                raise NotFound(f"get {name}: no such volume")
            users = self._users(name)
            if users:
                raise InUse(
                    f"remove {name}: volume is in use - [{', '.join(users)}]",
                    extra={"in_use_by": users},
                )
            self._remove_volume_data(record)
            del self.volumes_by_name[name]
        self.emit("volume", "destroy", name)

    # ----------------------------------------------------------------- internals

    def _api(self, method: str) -> None:
        if self.down:
            raise DockerUnavailable(
                "Docker at unix:///var/run/docker.sock is unreachable: connection refused"
            )
        self.calls.append(method)

    def _users(self, volume: str) -> list[str]:
        return [c.id for c in self.containers_by_id.values() if volume in c.volume_names]

    def _own_refs(self) -> LayerRefs:
        return LayerRefs(
            image_cache_ids=frozenset(i for img in self.images.values() for i in img.cache_ids),
            container_mount_ids=frozenset(c.mount_id for c in self.containers_by_id.values()),
            container_init_ids=frozenset(c.init_id for c in self.containers_by_id.values()),
        )

    def _remove_volume_data(self, record: VolumeRecord) -> None:
        """dockerd removes ``<mountpoint>`` with ``os.RemoveAll``, then the volume's
        folder; a failure leaves the volume listed, half-deleted."""
        fs = self.btrfs
        if fs is None or not fs.exists(record.mountpoint):
            return
        error = fs.remove_all(record.mountpoint)
        if error is not None:
            raise ToolFailed(
                f"docker remove volume {record.name}: remove {record.name}: error removing "
                f"volume path '{record.mountpoint}': {error}",
                extra={"docker_status": 500},
            )
        fs.remove_all(posixpath.dirname(record.mountpoint))

    def _layer_subvolume(self, name: str, *, snapshot_of: str | None, size: int) -> str:
        path = f"{self.data_root}/btrfs/subvolumes/{name}"
        if self.btrfs is not None:
            source = f"{self.data_root}/btrfs/subvolumes/{snapshot_of}" if snapshot_of else None
            self.btrfs.create_subvolume(
                path, snapshot_of=source, exclusive_bytes=size, created_at=self.now
            )
        return name

    def _drop_layer(self, name: str) -> None:
        path = f"{self.data_root}/btrfs/subvolumes/{name}"
        if self.btrfs is not None and self.btrfs.subvolume(path) is not None:
            self.btrfs.destroy(path)

    def _container(self, ref: str) -> FakeContainer:
        for container in self.containers_by_id.values():
            if ref in (container.id, container.name):
                return container
        raise NotFound(f"No such container: {ref}")

    def _hex(self, *seed: object) -> str:
        self._counter += 1
        return fake_hex(self.data_root, self._counter, *seed)


# --------------------------------------------------------------------------- the lab


@dataclass(frozen=True)
class LeakScenario:
    """What ``make_leak_scenario`` built, by name. Paths are local paths."""

    btrfs: FakeBtrfs
    docker: FakeDocker
    now: datetime
    mount: str  # "/volume1"
    fs_uuid: str
    data_root: str  # "/volume1/docker", a subvolume
    image: FakeImage
    image_layers: tuple[str, ...]  # the image's layer subvolumes
    container_layers: tuple[str, ...]  # layer and -init layer of every container
    orphan_layer: str  # in <data_root>/btrfs/subvolumes/, referenced by nothing
    dind_volume: str  # name: anonymous, dangling, full of subvolumes
    dind_mountpoint: str
    dind_nested: tuple[str, ...]  # every subvolume in the dind volume, parents first
    dind_ro_leaf: str  # read-only, holds no subvolume
    dind_ro_parent: str  # read-only, holds dind_ro_parent_child
    dind_ro_parent_child: str  # a writable subvolume inside dind_ro_parent
    keep_volume: str  # labelled keep=true, dangling
    named_volume: str  # dangling, not anonymous
    in_use_volume: str  # used by the running container
    running_container: str  # id
    stopped_container: str  # id
    stopped_anonymous_volume: str  # anonymous volume of the stopped container
    share: str  # a user's share subvolume outside the data root

    @property
    def layers(self) -> tuple[str, ...]:
        """Every layer subvolume Docker references: images' and containers'."""
        return self.image_layers + self.container_layers

    @property
    def dind_read_only(self) -> tuple[str, ...]:
        return (self.dind_ro_leaf, self.dind_ro_parent)


def make_leak_scenario(
    *,
    now: datetime = DEFAULT_NOW,
    age: timedelta = timedelta(days=3),
    kernel: str = "6.12.48-amd64",
    quota: bool = True,
) -> LeakScenario:
    """A ``FakeBtrfs`` + ``FakeDocker`` pair shaped like the real lab (lab.md): one
    filesystem on ``/volume1``, Docker's data root the subvolume ``docker``, and in it:

    - a 2-layer image and two containers (one running using volume ``used``, one
      stopped with an anonymous volume), their layers under ``btrfs/subvolumes/``;
    - one orphan layer subvolume there that nothing references;
    - the leaked docker-in-docker volume: anonymous, no container, and under its
      ``_data/btrfs/subvolumes/`` the inner daemon's image layer (read-only), two
      containers' layers and -init layers; next to them ``_data/ro-parent``, read-only,
      holding the writable ``_data/ro-parent/child`` (as ``lab.Lab.seed_dind_volume``);
    - a ``keep=true`` labelled volume and a plain named volume, both dangling;
    - a share subvolume ``photo`` next to ``docker``.

    Everything was made ``age`` before ``now``; the fakes' clocks read ``now``.
    """
    made = now - age
    fs = FakeBtrfs(kernel=kernel, now=made)
    filesystem = fs.add_filesystem(mount="/volume1", quota=quota)
    fs.create_subvolume("/volume1/docker", exclusive_bytes=552 * KiB)
    share = fs.create_subvolume("/volume1/photo", exclusive_bytes=64 * MiB)
    docker = FakeDocker(btrfs=fs, data_root="/volume1/docker", now=made)
    image = docker.add_image("busybox", layers=2)

    used = docker.add_volume("used")
    running = docker.add_container("web", image=image, running=True, volumes=[used.name])
    anonymous = docker.add_volume()
    stopped = docker.add_container("batch", image=image, running=False, volumes=[anonymous.name])

    orphan = f"{docker.data_root}/btrfs/subvolumes/{fake_hex('orphan')}"
    fs.create_subvolume(orphan, exclusive_bytes=4 * MiB)

    dind_image = docker.add_image("dind", layers=1, layer_bytes=1 * MiB)
    dind = docker.add_volume()
    inner = f"{dind.mountpoint}/btrfs/subvolumes"
    inner_layer = f"{inner}/{fake_hex('inner-layer')}"
    fs.create_subvolume(inner_layer, read_only=True, exclusive_bytes=8 * MiB)
    nested: list[str] = [inner_layer]
    for n in (1, 2):
        mount_id = fake_hex("inner-container", n)
        fs.create_subvolume(f"{inner}/{mount_id}-init", snapshot_of=inner_layer)
        fs.create_subvolume(f"{inner}/{mount_id}", snapshot_of=f"{inner}/{mount_id}-init")
        nested += [f"{inner}/{mount_id}-init", f"{inner}/{mount_id}"]
    # as snapshot tools leave them: a read-only subvolume holding a writable child
    readonly_parent = f"{dind.mountpoint}/ro-parent"
    child = f"{readonly_parent}/child"
    fs.create_subvolume(readonly_parent)
    fs.create_subvolume(child)
    fs.set_readonly(readonly_parent, True)
    nested += [readonly_parent, child]
    fs.calls.clear()  # building is not what tests count

    keep = docker.add_volume("keep-me", labels={"keep": "true"})
    named = docker.add_volume("named")

    fs.now = docker.now = now
    container_layers = tuple(
        f"{docker.data_root}/btrfs/subvolumes/{layer}"
        for c in (running, stopped)
        for layer in (c.init_id, c.mount_id)
    )
    image_layers = tuple(
        f"{docker.data_root}/btrfs/subvolumes/{layer}"
        for img in (image, dind_image)
        for layer in img.cache_ids
    )
    return LeakScenario(
        btrfs=fs,
        docker=docker,
        now=now,
        mount="/volume1",
        fs_uuid=filesystem.uuid,
        data_root=docker.data_root,
        image=image,
        image_layers=image_layers,
        container_layers=container_layers,
        orphan_layer=orphan,
        dind_volume=dind.name,
        dind_mountpoint=dind.mountpoint,
        dind_nested=tuple(nested),
        dind_ro_leaf=inner_layer,
        dind_ro_parent=readonly_parent,
        dind_ro_parent_child=child,
        keep_volume=keep.name,
        named_volume=named.name,
        in_use_volume=used.name,
        running_container=running.id,
        stopped_container=stopped.id,
        stopped_anonymous_volume=anonymous.name,
        share="/volume1/" + share.path,
    )


__all__ = [
    "DEFAULT_SUBVOLUME",
    "ENOENT",
    "ENOTEMPTY",
    "EPERM",
    "EROFS",
    "NOT_ON_BTRFS",
    "NOT_SUBVOLUME",
    "TOP_LEVEL",
    "Call",
    "FakeBtrfs",
    "FakeContainer",
    "FakeDocker",
    "FakeFilesystem",
    "FakeImage",
    "FakeSubvolume",
    "LeakScenario",
    "fake_hex",
    "make_leak_scenario",
]
