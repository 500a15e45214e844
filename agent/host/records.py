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


@dataclass(frozen=True)
class SubvolumeRecord:
    """One line of ``btrfs subvolume list -p -u -q``."""

    id: int
    parent_id: int  # the subvolume whose tree holds this one ("parent" column)
    top_level: int
    generation: int
    uuid: str | None
    parent_uuid: str | None  # the snapshot source, not the containing subvolume
    path: str  # relative to the filesystem's top level (subvolume 5), as btrfs prints it


@dataclass(frozen=True)
class Qgroup:
    """Sizes of one level-0 qgroup (``btrfs qgroup show --raw``)."""

    id: int
    referenced: int
    exclusive: int


@dataclass(frozen=True)
class MountEntry:
    """One btrfs line of ``/proc/self/mountinfo``."""

    mountpoint: str  # local path where it is mounted
    root: str  # path inside the filesystem that is mounted there ("/" = top level)
    source: str  # the device
    options: str  # super options, e.g. "rw,subvolid=5,subvol=/"


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
class ContainerRecord:
    id: str
    name: str
    running: bool
    status: str
    image_id: str
    volume_names: tuple[str, ...] = ()


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
