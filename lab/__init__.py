"""A real btrfs + Docker lab for tests, benchmarks and demos.

``Lab.up(folder)`` puts a btrfs filesystem on a loop file, runs a private dockerd with the
btrfs storage driver on it (its own containerd, socket, exec-root, pidfile and cgroup),
imports locally made images, and seeds what nas-janitor exists to find, for real:

- a leaked docker-in-docker volume: anonymous, dangling, holding the nested subvolumes its
  inner daemon made, one of them read-only, plus a read-only subvolume with a child;
- an orphaned layer subvolume in ``<data_root>/btrfs/subvolumes/`` that nothing references;
- things that must never be touched: a ``keep=true`` volume, a named volume, a volume used by
  a running container, the anonymous volume of a stopped container, the images.

``lab.seeded`` describes all of it. ``lab.down()`` (or ``python -m lab down FOLDER`` from
any process) removes everything again. Quotas stay off unless ``lab.enable_quotas()``.
"""

from lab.core import DEFAULT_SIZE, Lab, chain_ids, fill, is_subvolume, layer_refs
from lab.errors import CommandError, LabError, LabUnavailable, TeardownError
from lab.host import host_problems
from lab.images import BUSYBOX_IMAGE, DIND_IMAGE, INNER_IMAGE
from lab.manifest import (
    NeverTouch,
    Seeded,
    SeededContainer,
    SeededDind,
    SeededImage,
    SeededOrphan,
    SeededVolume,
)
from lab.registry import install_cleanup_handlers, teardown_all, track, untrack
from lab.teardown import TeardownReport, down

__all__ = [
    "BUSYBOX_IMAGE",
    "DEFAULT_SIZE",
    "DIND_IMAGE",
    "INNER_IMAGE",
    "CommandError",
    "Lab",
    "LabError",
    "LabUnavailable",
    "NeverTouch",
    "Seeded",
    "SeededContainer",
    "SeededDind",
    "SeededImage",
    "SeededOrphan",
    "SeededVolume",
    "TeardownError",
    "TeardownReport",
    "chain_ids",
    "down",
    "fill",
    "host_problems",
    "install_cleanup_handlers",
    "is_subvolume",
    "layer_refs",
    "teardown_all",
    "track",
    "untrack",
]
