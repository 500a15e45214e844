"""Plain values that the btrfs and Docker wrappers return and the domain consumes.

Every value is a frozen dataclass: the wrappers (``agent.btrfs``, ``agent.dockerd``)
build them from tool output or the Docker API, the fakes in the tests build them by
hand, and nothing else needs to know where they came from.

Paths in these records are *local* paths, as this process sees them. When the agent
runs in a container with the host mounted under a prefix, ``agent.paths`` maps them
to and from host paths; everything the API shows is a host path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple


class SubvolumeRecord(NamedTuple):
    """One subvolume, as the kernel's root tree describes it.

    A named tuple: immutable, and small and quick to build by the ten thousand.
    """

    id: int
    parent_id: int  # the subvolume whose tree holds this one
    generation: int
    uuid: str | None  # None on a filesystem made before Linux 3.6
    parent_uuid: str | None  # the snapshot source, not the containing subvolume
    read_only: bool
    created_at: datetime | None  # otime, aware UTC; None before Linux 3.6
    # ctime: moved whenever a name is created, renamed or removed anywhere in the
    # subvolume, aware UTC
    changed_at: datetime | None
    ctransid: int | None  # the transaction of that change
    # Relative to the filesystem's top level (subvolume 5), decoded with os.fsdecode;
    # None when the path cannot be known for sure: never act on such a subvolume by path.
    path: str | None


@dataclass(frozen=True)
class Qgroup:
    """Sizes of one level-0 qgroup (``btrfs qgroup show --raw``)."""

    id: int
    referenced: int
    exclusive: int


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
class LayerRefs:
    """Names under ``<data_root>/btrfs/subvolumes/`` that Docker's own metadata
    (``image/btrfs/layerdb``) references."""

    image_cache_ids: frozenset[str] = field(default_factory=frozenset)
    container_mount_ids: frozenset[str] = field(default_factory=frozenset)
    container_init_ids: frozenset[str] = field(default_factory=frozenset)

    @property
    def all(self) -> frozenset[str]:
        return self.image_cache_ids | self.container_mount_ids | self.container_init_ids
