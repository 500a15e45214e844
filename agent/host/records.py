"""Plain values that the btrfs and Docker wrappers return and the domain consumes.

Every value is immutable (frozen dataclasses; ``SubvolumeRecord`` is a named tuple, built
by the ten thousand): the wrappers (``agent.host.btrfs``, ``agent.host.dockerd``) build
them from the kernel's answers, tool output or the Docker API, the fakes in the tests
build them by hand, and nothing else needs to know where they came from.

Paths in these records are *local* paths, as this process sees them. When the agent
runs in a container with the host mounted under a prefix, ``agent.domain.paths`` maps them
to and from host paths; everything the API shows is a host path.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple


class SubvolumeRecord(NamedTuple):
    """One subvolume, as the kernel's root tree describes it (``agent.host.btrfs_listing``).

    A named tuple: immutable, and small and quick to build by the ten thousand.
    ``generation``, ``ctransid`` and the times are those of the last committed
    transaction (the root tree's copy of the subvolume's root item).
    """

    id: int
    parent_id: int  # the subvolume whose tree holds this one (its ROOT_BACKREF's offset)
    generation: int
    uuid: str | None  # None on a filesystem made before Linux 3.6
    parent_uuid: str | None  # the snapshot source, not the containing subvolume
    read_only: bool
    created_at: datetime | None  # otime, aware UTC; None before Linux 3.6
    # ctime: moved whenever a name is created, renamed or removed anywhere in the
    # subvolume (the kernel's btrfs_update_root_times), aware UTC. A snapshot starts
    # with its source's, so it can be older than created_at.
    changed_at: datetime | None
    ctransid: int | None  # the transaction of that change
    # Relative to the filesystem's top level (subvolume 5), built from the kernel's name
    # bytes and decoded with os.fsdecode: os.fsencode(path) gives the exact bytes back.
    # None when the path cannot be known for sure (longer than BTRFS_IOC_INO_LOOKUP
    # returns, or a lookup failed): never act on such a subvolume by path.
    path: str | None


@dataclass(frozen=True, slots=True)
class Qgroup:
    """Sizes of one level-0 qgroup (the quota tree's QGROUP_INFO item)."""

    id: int  # the subvolume id (qgroup 0/id); its subvolume may no longer exist
    referenced: int
    exclusive: int


class QgroupReport(Mapping[int, Qgroup]):
    """Every level-0 qgroup of a filesystem by subvolume id, with the quota status.

    Includes qgroups whose subvolume is gone: kernels before 6.11 (Synology's 4.4
    among them) leave them behind when a subvolume is dropped. ``inconsistent``
    (BTRFS_QGROUP_STATUS_FLAG_INCONSISTENT, or no status item at all): the kernel says
    the numbers are out of date until a rescan; do not trust them. ``rescanning``: a
    rescan is running (the numbers are moving).
    """

    __slots__ = ("_groups", "_inconsistent", "_rescanning")

    def __init__(
        self, groups: Mapping[int, Qgroup], *, inconsistent: bool = False, rescanning: bool = False
    ) -> None:
        self._groups = dict(groups)
        self._inconsistent = inconsistent
        self._rescanning = rescanning

    @property
    def inconsistent(self) -> bool:
        return self._inconsistent

    @property
    def rescanning(self) -> bool:
        return self._rescanning

    def __getitem__(self, key: int) -> Qgroup:
        return self._groups[key]

    def __iter__(self) -> Iterator[int]:
        return iter(self._groups)

    def __len__(self) -> int:
        return len(self._groups)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, QgroupReport):
            return (self._groups, self._inconsistent, self._rescanning) == (
                other._groups,
                other._inconsistent,
                other._rescanning,
            )
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"QgroupReport({self._groups!r}, inconsistent={self.inconsistent},"
            f" rescanning={self.rescanning})"
        )


@dataclass(frozen=True)
class MountEntry:
    """One line of a mount table (``/proc/<pid>/mountinfo``), of any filesystem type.

    ``mountpoint`` is a path as the table's own process sees it: a local path for this
    process's table, a host path for the host's. Paths are ``str`` holding the kernel's
    bytes (``os.fsdecode``: bytes that are not UTF-8 stay surrogate escapes)."""

    mountpoint: str
    root: str  # path inside the filesystem that is mounted there ("/" = top level)
    source: str  # the device, or what the filesystem type calls its source ("tmpfs")
    options: str  # super options, e.g. "rw,subvolid=5,subvol=/"
    fstype: str = "btrfs"
    dev: str = ""  # the filesystem's st_dev as "major:minor" (one per btrfs filesystem)
    mount_id: int = 0
    parent_id: int = 0  # the mount it sits on (its own id for a namespace's root mount)


@dataclass(frozen=True)
class NamespaceTable:
    """The mount table of one mount namespace other than the host's and this
    process's, as one of its processes (``pid``) sees it: mount points are paths of that
    process's view, meaningless on the host; what each mount sits on is told by its
    parent's filesystem (``dev``) and ``root``."""

    pid: int  # 0 for a namespace no process is in (``pinned_at`` says how it was found)
    mounts: tuple[MountEntry, ...]
    # a namespace that no process is in, kept alive by a bind mount of its nsfs file
    # (``unshare --mount=FILE``: that file, as the table that shows it sees it) or by a
    # process's open file (``fd N of pid P``)
    pinned_at: str | None = None


@dataclass(frozen=True)
class HeldPath:
    """A path that something holds open: a process's working folder, root, program,
    open file or mapped file, a loop device's backing file, an active swap file, a
    folder an overlay mount is made of. The path is as the kernel prints it for the
    agent (``d_path``): a path of the agent's view when the agent can reach it, else
    one from the root of the holder's mount namespace."""

    path: str  # absolute; the kernel's bytes as ``os.fsdecode`` keeps them
    who: str  # "pid 812 (rsync), open file", "loop device /dev/loop3 (its backing file)"


@dataclass(frozen=True)
class HolderTable:
    """What the processes of one mount namespace hold (``held``), with that
    namespace's mount table (``mounts``, as process ``pid`` of it sees it) to place
    each path inside its filesystem. ``own``: the agent's or the host's namespace, whose
    paths are the ones a person on the host reads."""

    pid: int
    mounts: tuple[MountEntry, ...]
    held: tuple[HeldPath, ...]
    own: bool = True


@dataclass(frozen=True)
class Holders:
    """What every process holds, by mount namespace (``tables``: the agent's own and
    the host's among them); what is held where no table tells which namespace's path it
    is (``everywhere``: loop devices' backing files and swap files, what the processes
    of a namespace whose every process is chrooted hold), placed in every table; the
    processes that could not be read and were passed over as configured
    (``skipped``); and the mount tables of namespaces that no process is in and a
    process holds open (``hidden_namespaces``), read by entering them."""

    tables: tuple[HolderTable, ...]
    everywhere: tuple[HeldPath, ...] = ()
    skipped: tuple[int, ...] = ()
    # the mount tables of namespaces no process is in that a process holds open
    hidden_namespaces: tuple[NamespaceTable, ...] = ()


@dataclass(frozen=True)
class FilesystemIdent:
    """``btrfs filesystem show <mount>``."""

    uuid: str
    label: str | None
    devices: tuple[str, ...] = ()


@dataclass(frozen=True)
class FsUsage:
    """``btrfs filesystem usage -b <mount>``."""

    size_bytes: int
    used_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class DeleteResult:
    """What ``btrfs subvolume delete`` said of one path in a batch."""

    path: str
    ok: bool
    error: str | None = None  # e.g. "Read-only file system", "Directory not empty"


@dataclass(frozen=True)
class DockerInfo:
    server_version: str
    api_version: str
    storage_driver: str
    data_root: str


@dataclass(frozen=True)
class VolumeRecord:
    name: str
    driver: str
    mountpoint: str
    labels: dict[str, str]
    created_at: datetime | None
    anonymous: bool


@dataclass(frozen=True)
class FolderEntry:
    """A plain folder (not a subvolume) found in a folder: its name and the newest of
    its modification and change times."""

    name: str
    changed_at: datetime | None


@dataclass(frozen=True)
class ContainerMount:
    """One entry of a container's ``Mounts``: a volume or a bind mount (tmpfs and other
    mounts with no source on the host are not kept)."""

    type: str  # "volume" | "bind"
    source: str  # host path (a volume's is its ``_data`` folder)
    destination: str  # where the container sees it
    name: str | None = None  # the volume's name (type "volume")
    rw: bool = True


@dataclass(frozen=True)
class ContainerRecord:
    id: str
    name: str
    running: bool
    status: str
    image_id: str
    volume_names: tuple[str, ...] = ()
    mounts: tuple[ContainerMount, ...] = ()  # every volume and bind mount, any state


@dataclass(frozen=True)
class StoredVolume:
    """A volume that a Docker daemon recorded in its ``volumes/metadata.db``: one whose
    data root lies inside another volume (docker-in-docker)."""

    name: str
    labels: Mapping[str, str]
    store: str  # local path of the metadata.db that records it


@dataclass(frozen=True)
class VolumeStores:
    """The volumes recorded by the Docker volume stores inside a folder (its
    ``volumes/metadata.db``, and those of the volumes it records, a few levels deep);
    ``unreadable``: (path, why) of each store that exists but cannot be read."""

    volumes: tuple[StoredVolume, ...] = ()
    unreadable: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class LayerRefs:
    """Names under ``<data_root>/btrfs/subvolumes/`` that Docker's own metadata
    (``image/btrfs/layerdb``) references."""

    image_cache_ids: frozenset[str] = field(default_factory=frozenset)
    container_mount_ids: frozenset[str] = field(default_factory=frozenset)
    container_init_ids: frozenset[str] = field(default_factory=frozenset)

    @property
    def all(self) -> frozenset[str]:
        return self.image_cache_ids | self.container_mount_ids | self.container_init_ids


class ScopeRecords(NamedTuple):
    """What ``Btrfs.list_scope`` read: the records of the subvolumes a delete touches
    (as ``list_subvolumes`` gives them) and the filesystem's default subvolume."""

    records: list[SubvolumeRecord]
    default_id: int


@dataclass(frozen=True)
class ChangeMark:
    """What a filesystem's trees looked like at one moment, cheaply compared: for each
    range of the trees the agent lists (the root tree's subvolume items, its default
    subvolume entry, the quota tree's qgroups), the newest generation of the tree
    blocks holding them and a digest of the items in the blocks of that generation.
    Two marks of the same filesystem are equal when nothing in those ranges changed
    in between (``agent.host.btrfs_ioctl.Ioctls.change_mark``)."""

    ranges: tuple[tuple[int, bytes], ...]  # (newest block generation, digest) per range


@dataclass(frozen=True)
class DockerEvent:
    """One entry of Docker's event stream (``GET /events``)."""

    type: str  # container | image | volume | daemon | ...
    action: str  # create, destroy, start, die, pull, delete, ...
    actor: str  # the object's id or name
    time_nano: int  # when the daemon recorded it (ns since the epoch; 0 when not said)


@dataclass(frozen=True)
class ResolvedPath:
    """A host path and what it resolves to on the host (``agent.host.hostpaths``):
    ``real`` is the path with every symlink on the way followed, as the kernel would
    follow them when something (a container starting) uses it; None when that cannot
    be told, and ``reason`` says why (a dangling symlink, a loop, a part that cannot be
    read)."""

    path: str
    real: str | None
    reason: str | None = None
