"""What processes and the kernel hold open, placed inside their filesystems: the
in-use rule ``agent.domain.safety.check_not_held`` reads it.

Each held path is placed the way ``agent.domain.mounts`` places mounts: by the mount of
its own namespace's table that covers it (the deepest mount point holding the path; of
several at the same point, the one mounted last, which hides the others), as that
mount's filesystem (``dev``) and the path inside it (the mount's ``root`` and the rest
of the path). A target holds it when the filesystem is the target's and that path is the
target's path inside it or below it: a file opened through a ``subvol=`` or bind mount
elsewhere is found, and a path that merely looks like one under the target is not.
What is held where no table tells whose path it is (loop devices' backing files, swap
files, what chrooted processes hold: ``Holders.everywhere``) is placed in every table.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from agent.domain.paths import is_under
from agent.host.records import HeldPath, Holders, MountEntry


@dataclass(frozen=True)
class HeldPlace:
    """One held path inside its filesystem."""

    dev: str  # the filesystem's "major:minor"
    in_fs: str  # the path inside it, from its top level
    path: str  # as the kernel printed it
    who: str
    kernel: bool  # held by the kernel (a loop device, swap, an overlay), not a process
    namespace: int | None = None  # a process of the other mount namespace it is a path of

    def describe(self) -> str:
        where = f" (in the mount namespace of pid {self.namespace})" if self.namespace else ""
        return f"{self.who} holds {self.path}{where}"


class _Table:
    """One namespace's mounts by mount point (the last mounted at a point wins), with
    the places of the folders looked up so far (many held paths share a folder)."""

    def __init__(self, mounts: Sequence[MountEntry]) -> None:
        self.by_point: dict[str, MountEntry] = {}
        for m in mounts:
            self.by_point[m.mountpoint.rstrip("/") or "/"] = m
        self._folders: dict[str, tuple[str, str] | None] = {}

    def place(self, path: str) -> tuple[str, str] | None:
        """(dev, path inside the filesystem) of ``path`` (absolute, normal: as the
        kernel prints it), by the mount that covers it."""
        m = self.by_point.get(path)
        if m is not None:
            return m.dev, m.root
        cut = path.rfind("/")
        if cut < 0:
            return None
        folder = path[:cut] or "/"
        if folder in self._folders:
            got = self._folders[folder]
        else:
            got = self._folders[folder] = self._walk(folder)
        if got is None:
            return None
        return got[0], got[1].rstrip("/") + path[cut:]

    def _walk(self, path: str) -> tuple[str, str] | None:
        cur = path
        while True:
            m = self.by_point.get(cur)
            if m is not None:
                rest = path[len(cur.rstrip("/")) :]
                return m.dev, (m.root.rstrip("/") + rest) or "/"
            if cur == "/":
                return None
            cur = cur[: cur.rfind("/")] or "/"


def place_holders(holders: Holders) -> list[HeldPlace]:
    """Every held path inside its filesystem (a path no mount covers is left out)."""
    out: dict[tuple[str, str, str], HeldPlace] = {}
    tables = [(_Table(t.mounts), t) for t in holders.tables]

    def add(table: _Table, held: HeldPath, ns: int | None) -> None:
        placed = table.place(held.path)
        if placed is not None:
            key = (placed[0], placed[1], held.who)
            kernel = not held.who.startswith("pid ")
            out.setdefault(key, HeldPlace(placed[0], placed[1], held.path, held.who, kernel, ns))

    for table, t in tables:
        for h in t.held:
            add(table, h, None if t.own else t.pid)
    for table, t in tables:
        for h in holders.everywhere:
            add(table, h, None if t.own else t.pid)
    return list(out.values())


class HeldIndex:
    """Held paths by filesystem and path inside it. ``known`` is False when what is
    held could not be read; ``unknown_reason`` says why (every delete is refused)."""

    def __init__(
        self, places: Iterable[HeldPlace] = (), *, unknown_reason: str | None = None
    ) -> None:
        by_dev: dict[str, list[HeldPlace]] = {}
        for p in places:
            by_dev.setdefault(p.dev, []).append(p)
        self._by_dev = {d: sorted(ps, key=lambda p: p.in_fs) for d, ps in by_dev.items()}
        self._paths = {d: [p.in_fs for p in ps] for d, ps in self._by_dev.items()}
        self.unknown_reason = unknown_reason

    @classmethod
    def of(cls, holders: Holders) -> HeldIndex:
        return cls(place_holders(holders))

    @property
    def known(self) -> bool:
        return self.unknown_reason is None

    def inside(self, dev: str, in_fs: str) -> list[HeldPlace]:
        """What is held at or below ``in_fs`` inside filesystem ``dev``."""
        paths = self._paths.get(dev)
        if not paths:
            return []
        base = in_fs.rstrip("/")
        lo = bisect.bisect_left(paths, base)
        hi = bisect.bisect_left(paths, base + "0")  # "0" sorts right after "/"
        return [p for p in self._by_dev[dev][lo:hi] if is_under(p.in_fs, in_fs)]
