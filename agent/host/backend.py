"""The two interfaces the domain depends on. ``agent.host.btrfs.BtrfsTool`` and
``agent.host.dockerd.DockerClient`` implement them for real; the tests' fakes keep state.

All paths are local paths (as this process sees them). Errors: methods raise
``BtrfsUnavailable`` / ``DockerUnavailable`` when the tool or daemon cannot be reached
(or the btrfs ioctls are not permitted), ``BtrfsCommandError`` when a btrfs command or
ioctl ran and failed, ``NotFound`` for a missing
Docker object.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from datetime import datetime
from typing import Protocol

from agent.host.files import TreeRemoval
from agent.host.records import (
    ChangeMark,
    ContainerRecord,
    DeleteResult,
    DockerEvent,
    DockerInfo,
    FilesystemIdent,
    FolderEntry,
    FsUsage,
    Holders,
    LayerRefs,
    MountEntry,
    NamespaceTable,
    QgroupReport,
    ResolvedPath,
    ScopeRecords,
    SubvolumeRecord,
    VolumeRecord,
    VolumeStores,
)


class Btrfs(Protocol):
    def version(self) -> str:
        """btrfs-progs version, e.g. ``"4.4.1"``."""

    def kernel_release(self) -> str: ...

    def tool_present(self) -> bool:
        """True when the btrfs-progs binary is there to be started (a lookup and a
        stat, no process)."""

    def rmdir_deletes_subvolumes(self) -> bool:
        """True when the kernel lets rmdir remove an empty subvolume (Linux >= 4.18),
        read from ``/sys/fs/btrfs/features/rmdir_subvol``."""

    def mounts(self) -> list[MountEntry]:
        """Every mount this process sees, of any type (local paths)."""

    def host_mounts(self) -> list[MountEntry]:
        """Every mount of the host's mount namespace, of any type (host paths).
        ``HostMountsUnavailable`` when it cannot be seen."""

    def namespace_mounts(self) -> list[NamespaceTable]:
        """The mount tables of every other mount namespace on the host (services with
        private mounts, containers), one process's view of each.
        ``HostMountsUnavailable`` when they cannot all be seen."""

    def holders(self) -> Holders:
        """What every process but the agent's own, and the kernel, hold open: working
        folders, roots, programs, open and mapped files by mount namespace, with that
        namespace's mount table; loop devices' backing files and swap files.
        ``HoldersUnavailable`` when it cannot all be seen."""

    def resolve_host_paths(self, paths: Collection[str]) -> dict[str, ResolvedPath]:
        """Each of ``paths`` (host paths, not local ones) with every symlink on the way
        followed on the host, never out of the host's root; unresolved, with the
        reason, when that cannot be told (a dangling symlink, a loop, a part that
        cannot be read, the host's root not visible). Never raises for one path."""

    def filesystem(self, mount: str) -> FilesystemIdent: ...

    def usage(self, mount: str) -> FsUsage: ...

    def list_subvolumes(self, mount: str) -> list[SubvolumeRecord]:
        """Every subvolume of the filesystem mounted at ``mount`` (the whole filesystem,
        whatever is mounted there) but the top level, by id, read-only flags included:
        identified by the kernel's ids, paths built from name bytes (None when not
        known for sure). No process: a few tree-search ioctls."""

    def list_scope(
        self, mount: str, *, ids: Collection[int] = (), folder: str | None = None
    ) -> ScopeRecords:
        """The records ``list_subvolumes`` gives of the subvolumes ``ids``, of those at
        or inside the folder ``folder`` (a local path; none when it is not on this
        filesystem), of everything nested in them and of every subvolume holding one
        of them up to the top level; and the default subvolume's id. No process, and no
        walk of the whole filesystem's subvolumes."""

    def qgroups(self, mount: str) -> QgroupReport | None:
        """Level-0 qgroup sizes by subvolume id, stale ones (subvolume gone) included,
        with the quota status (``inconsistent``: do not trust the numbers); None when
        quotas are off. Never enables quotas."""

    def default_subvolume(self, mount: str) -> int: ...

    def created_at(self, path: str) -> datetime | None:
        """Creation time of the subvolume at ``path`` when it can be had without a
        process per subvolume, else None."""

    def change_mark(self, mount: str, since: ChangeMark | None = None) -> ChangeMark:
        """A mark of what ``list_subvolumes``, ``qgroups`` and ``default_subvolume``
        read on the filesystem at ``mount``, equal to ``since`` (an earlier mark of it)
        when none of that changed; cheap when nothing did (no process, a few block
        reads). Writes inside a subvolume count once committed."""

    def folder_stamp(self, path: str) -> tuple[int, int, int, int] | None:
        """A value that changes when a name in the folder ``path`` is made, removed or
        renamed (None when it is not there)."""

    def set_readonly(self, path: str, value: bool) -> None: ...

    def destroy_qgroup(self, mount: str, qgroup_id: int) -> None:
        """``btrfs qgroup destroy 0/<id> <mount>``; ``BtrfsCommandError`` on failure
        (its stderr says "busy" while the kernel still needs it)."""

    def delete(self, paths: Sequence[str]) -> list[DeleteResult]:
        """``btrfs subvolume delete`` for a whole batch in one process. The caller
        orders it (children first); the result says what happened to each path."""

    def still_dropping(self, mount: str, ids: Collection[int]) -> set[int]:
        """Which of the deleted subvolumes ``ids`` the kernel's cleaner has not dropped
        yet: their space is not free yet."""

    def commit(self, mount: str) -> None:
        """Commit the filesystem's transaction now (what ``btrfs filesystem sync`` does):
        afterwards every subvolume's generation reflects the writes made before."""

    def sync(self, mount: str) -> None:
        """Wait until deleted subvolumes are really cleaned (space freed)."""

    def kernel_drops_qgroups(self) -> bool:
        """True when the kernel removes a deleted subvolume's level-0 qgroup itself
        (Linux >= 6.11); older kernels leave it behind."""

    # -- plain files and folders (``agent.host.files``) ---------------------------------

    def remove_tree(self, path: str, *, keep_top: bool = False) -> TreeRemoval:
        """Remove a folder (or only what is in it) without following a symlink and
        without crossing into another filesystem, subvolume or mount."""

    def last_change(self, path: str) -> datetime | None:
        """The newest mtime/ctime of the folder ``path`` and the folders directly in it."""

    def plain_folders(self, path: str) -> list[FolderEntry]:
        """The folders directly in ``path`` that are not subvolumes."""


class Docker(Protocol):
    def ping(self) -> None: ...

    def info(self) -> DockerInfo: ...

    def daemon_identity(self) -> str | None:
        """Which daemon process answers right now (the same string while the same
        process does, another once it restarted); None when it cannot be told."""

    def volumes(self) -> list[VolumeRecord]: ...

    def containers(self) -> list[ContainerRecord]:
        """All containers, running and stopped."""

    def layer_refs(self, data_root: str) -> LayerRefs:
        """Subvolume names that image layers and containers reference, read from
        ``<data_root>/image/btrfs/layerdb`` (a local path)."""

    def volume_stores(self, data_root: str) -> VolumeStores:
        """The volumes a Docker daemon whose data root was ``data_root`` (a local path,
        e.g. a leaked docker-in-docker volume's ``_data``) recorded, with their labels,
        read from its ``volumes/metadata.db``."""

    def remove_volume(self, name: str) -> None: ...

    def events(self) -> EventStream:
        """Docker's events from now on, of the kinds that change what the agent lists
        (containers made, removed, started or stopped; volumes; images; the daemon's
        configuration): one long-lived request. ``DockerUnavailable`` when it cannot be
        opened."""


class EventStream(Protocol):
    """An open event stream: iterating it blocks until the next event, and ends (or
    raises ``DockerUnavailable``) when the connection is lost. ``close`` (from any
    thread) ends it."""

    def __iter__(self) -> Iterator[DockerEvent]: ...

    def close(self) -> None: ...
