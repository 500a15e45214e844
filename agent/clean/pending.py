"""Deleted is not freed: the kernel's cleaner drops a deleted subvolume in the background
(its root item stays until then), and only then is its space free again.

``PendingSpace`` keeps what the agent deleted per filesystem until the kernel is done
with it (``btrfs.still_dropping``), for ``/metrics``; ``pending_bytes`` says the same for
one job's deletions. Both ask only about the ids they hold: never a scan of the host.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from agent.domain.plans import Deleted
from agent.errors import AgentError
from agent.host.backend import Btrfs

MountOf = Callable[[str], str | None]  # filesystem uuid -> where this process sees it


def pending_bytes(
    btrfs: Btrfs, mount_of: MountOf, deleted: Iterable[tuple[str, Deleted]]
) -> int | None:
    """Of ``deleted`` (filesystem uuid, what was deleted), the bytes not freed yet; None
    when it cannot be told (a filesystem not seen, a size not known, btrfs failing)."""
    by_fs: dict[str, dict[int, int | None]] = {}
    for fs_uuid, d in deleted:
        by_fs.setdefault(fs_uuid, {})[d.id] = d.bytes
    total = 0
    for fs_uuid, sizes in by_fs.items():
        mount = mount_of(fs_uuid)
        if mount is None:
            return None
        try:
            left = btrfs.still_dropping(mount, sizes)
        except AgentError:
            return None
        for sid in left:
            size = sizes[sid]
            if size is None:
                return None
            total += size
    return total


class PendingSpace:
    """What the agent deleted and the kernel has not freed yet, per filesystem."""

    def __init__(self, btrfs: Btrfs, mount_of: MountOf) -> None:
        self._btrfs = btrfs
        self._mount_of = mount_of
        self._lock = threading.Lock()
        self._held: dict[str, dict[int, int | None]] = {}

    def add(self, fs_uuid: str, deleted: Iterable[Deleted]) -> None:
        with self._lock:
            held = self._held.setdefault(fs_uuid, {})
            for d in deleted:
                held[d.id] = d.bytes

    def bytes_by_filesystem(self) -> dict[str, int]:
        """Pending bytes (known sizes) per filesystem; what the kernel has freed since is
        forgotten. A filesystem that cannot be asked now keeps what it holds."""
        with self._lock:
            held = {fs: dict(ids) for fs, ids in self._held.items()}
        out: dict[str, int] = {}
        for fs_uuid, sizes in held.items():
            mount = self._mount_of(fs_uuid)
            if mount is None:
                continue
            try:
                left = self._btrfs.still_dropping(mount, sizes)
            except AgentError:
                out[fs_uuid] = sum(s or 0 for s in sizes.values())
                continue
            with self._lock:
                mine = self._held.get(fs_uuid, {})
                for sid in set(sizes) - left:
                    mine.pop(sid, None)
                if not mine:
                    self._held.pop(fs_uuid, None)
            out[fs_uuid] = sum(sizes[s] or 0 for s in left)
        return out
