"""What is mounted where, and what containers use: the in-use rules read these.

``MountIndex`` holds every mount of the host, of this process and of every other mount
namespace, by host path; ``UseIndex`` every volume and bind mount of every container, by
source path (as written and as it resolves on the host). ``read_mounts`` reads them as
they are now (the executor does, before each step, and ``container_uses`` the
containers' uses); ``take_snapshot`` builds the ones a ``Snapshot`` carries.
"""

from __future__ import annotations

import bisect
import posixpath
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from agent.domain.holders import HeldIndex
from agent.domain.paths import PathMap, is_under
from agent.errors import Unavailable
from agent.host.backend import Btrfs
from agent.host.records import (
    ContainerMount,
    ContainerRecord,
    Holders,
    MountEntry,
    NamespaceTable,
    ResolvedPath,
)

T = TypeVar("T")


@dataclass(frozen=True)
class MountView:
    """One mount, of any type, as the in-use rules read it."""

    mountpoint: str  # host path
    fstype: str
    source: str
    root: str  # what is mounted there: a path inside its filesystem ("/" = its top)
    dev: str  # the filesystem's "major:minor"

    def describe(self) -> str:
        what = self.fstype if self.root == "/" else f"{self.fstype} {self.root}"
        return f"{self.mountpoint} ({what} from {self.source})"

    def place(self) -> str:
        return self.mountpoint


@dataclass(frozen=True)
class ForeignMount:
    """A mount in another mount namespace (a service with private mounts, a
    container), placed by what it sits on: ``on_dev``/``on_path``, the filesystem and
    the path inside it of the folder it covers (its parent mount's root and the rest of
    its mount point). That is where removing a folder or deleting a subvolume would
    detach it in that namespace: the kernel does, since Linux 3.18."""

    pid: int  # a process of that namespace
    mountpoint: str  # as that process sees it
    fstype: str
    source: str
    root: str
    dev: str
    on_dev: str
    on_path: str
    pinned_at: str | None = None  # a namespace no process is in: its nsfs file

    def describe(self) -> str:
        return f"{self.mountpoint} ({self.fstype} from {self.source}) in {self.namespace()}"

    def namespace(self) -> str:
        if self.pinned_at is not None:
            return f"the mount namespace kept at {self.pinned_at} (no process is in it)"
        return f"the mount namespace of pid {self.pid}"

    def place(self) -> str:
        return f"{self.mountpoint} in {self.namespace()}"


def foreign_mounts(tables: Iterable[NamespaceTable]) -> list[ForeignMount]:
    """The mounts of other namespaces' tables, each placed by its parent mount (a
    namespace's root mount sits on nothing that table shows: left out)."""
    out = []
    for table in tables:
        by_id = {m.mount_id: m for m in table.mounts}
        for m in table.mounts:
            parent = by_id.get(m.parent_id)
            if parent is None or parent is m or not is_under(m.mountpoint, parent.mountpoint):
                continue
            rest = m.mountpoint[len(parent.mountpoint.rstrip("/")) :]
            on_path = posixpath.normpath(parent.root.rstrip("/") + rest) if rest else parent.root
            out.append(
                ForeignMount(
                    table.pid,
                    m.mountpoint,
                    m.fstype,
                    m.source,
                    m.root,
                    m.dev,
                    parent.dev,
                    on_path,
                    table.pinned_at,
                )
            )
    return out


def _prefixed(items: Sequence[str], path: str) -> range:
    """Indexes of the sorted ``items`` equal to ``path`` or below it (``path/...``)."""
    base = path.rstrip("/")
    lo = bisect.bisect_left(items, base)
    hi = bisect.bisect_left(items, base + "0")  # "0" sorts right after "/"
    return range(lo, hi)


class MountIndex:
    """Mounts of any type, looked up by host path and by what they show.

    ``known`` is False when the host's mount table could not be read: then only this
    process's mounts are in it, and ``unknown_reason`` says why (every delete is refused).
    ``foreign``: the mounts of every other mount namespace, looked up by what they sit
    on and by what they show (their mount points mean nothing on the host).
    ``held``: what processes and the kernel hold open, read with the tables (by default
    nothing is known of it: every delete is refused).
    """

    def __init__(
        self,
        mounts: Iterable[MountView],
        *,
        unknown_reason: str | None = None,
        foreign: Iterable[ForeignMount] = (),
        held: HeldIndex | None = None,
    ) -> None:
        unique = {(m.mountpoint, m.dev, m.root): m for m in mounts}
        self.all: tuple[MountView, ...] = tuple(sorted(unique.values(), key=lambda m: m.mountpoint))
        self._points = [m.mountpoint for m in self.all]
        by_dev: dict[str, list[MountView]] = {}
        for m in self.all:
            by_dev.setdefault(m.dev, []).append(m)
        self._by_dev = {d: sorted(ms, key=lambda m: m.root) for d, ms in by_dev.items()}
        self._roots = {d: [m.root for m in ms] for d, ms in self._by_dev.items()}
        self.unknown_reason = unknown_reason
        self.held = held or HeldIndex(unknown_reason="what processes hold was not read")
        self.foreign = tuple(foreign)
        on: dict[str, list[ForeignMount]] = {}
        shows: dict[str, list[ForeignMount]] = {}
        for f in self.foreign:
            on.setdefault(f.on_dev, []).append(f)
            shows.setdefault(f.dev, []).append(f)
        self._on = {d: sorted(fs, key=lambda f: f.on_path) for d, fs in on.items()}
        self._on_paths = {d: [f.on_path for f in fs] for d, fs in self._on.items()}
        self._shows = {d: sorted(fs, key=lambda f: f.root) for d, fs in shows.items()}
        self._shows_roots = {d: [f.root for f in fs] for d, fs in self._shows.items()}

    @property
    def known(self) -> bool:
        return self.unknown_reason is None

    def at_or_under(self, path: str) -> list[MountView]:
        """Mounts whose mount point is ``path`` or inside it (``path`` a host path)."""
        hits = [self.all[i] for i in _prefixed(self._points, path)]
        return [m for m in hits if is_under(m.mountpoint, path)]

    def covering(self, path: str) -> list[MountView]:
        """The mounts (host's or this process's) at the deepest mount point that is
        ``path`` or holds it: the filesystem(s) ``path`` lies on."""
        cur = path.rstrip("/") or "/"
        while True:
            i = bisect.bisect_left(self._points, cur)
            found = []
            while i < len(self._points) and self._points[i] == cur:
                found.append(self.all[i])
                i += 1
            if found or cur == "/":
                return found
            cur = posixpath.dirname(cur)

    def exposing(self, dev: str, in_fs: str) -> list[MountView | ForeignMount]:
        """Mounts of filesystem ``dev``, in any mount namespace, that show ``in_fs`` or
        something inside it: what deleting ``in_fs`` would take away from under another
        mount point."""
        out: list[MountView | ForeignMount] = []
        for by_dev, roots_by_dev in ((self._by_dev, self._roots), (self._shows, self._shows_roots)):
            roots = roots_by_dev.get(dev)
            if roots:
                mounts: Sequence[MountView | ForeignMount] = by_dev[dev]
                hits = [mounts[i] for i in _prefixed(roots, in_fs)]
                out.extend(m for m in hits if is_under(m.root, in_fs))
        return out

    def sitting_in(self, dev: str, in_fs: str) -> list[ForeignMount]:
        """Mounts of other mount namespaces that sit at or inside ``in_fs`` (a path
        inside filesystem ``dev``): what removing it would detach there."""
        paths = self._on_paths.get(dev)
        if not paths:
            return []
        hits = [self._on[dev][i] for i in _prefixed(paths, in_fs)]
        return [f for f in hits if is_under(f.on_path, in_fs)]


@dataclass(frozen=True)
class ContainerUse:
    """One volume or bind mount of one container (any state). ``resolved``: what its
    source resolves to on the host when that is not the source as written (a symlink
    on the way); ``unresolved``: why what it resolves to cannot be told."""

    container_id: str
    container_name: str
    running: bool
    mount: ContainerMount
    resolved: str | None = None
    unresolved: str | None = None

    def describe(self) -> str:
        state = "running" if self.running else "stopped"
        what = f"volume {self.mount.name}" if self.mount.type == "volume" else self.mount.source
        text = (
            f"container {self.container_name or self.container_id[:12]} ({state}) mounts "
            f"{what} at {self.mount.destination}"
        )
        if self.resolved is not None:
            text += f", which resolves to {self.resolved} on the host"
        if self.unresolved is not None:
            text += (
                f", whose source cannot be resolved on the host ({self.unresolved}): what "
                "it will use when it starts cannot be told"
            )
        return text


class UseIndex:
    """What containers mount from the host, by source path: each use under its source
    as written and, when a symlink on the way makes it another, under what that
    resolves to on the host (``resolved``: ``Btrfs.resolve_host_paths``). A use whose
    source cannot be resolved overlaps every path."""

    def __init__(
        self,
        containers: Iterable[ContainerRecord],
        resolved: Mapping[str, ResolvedPath] | None = None,
    ) -> None:
        resolved = resolved or {}
        entries: list[tuple[str, ContainerUse]] = []
        self.unresolved: tuple[ContainerUse, ...] = ()
        unresolved: list[ContainerUse] = []
        for c in containers:
            for m in c.mounts:
                if not m.source.startswith("/"):
                    continue
                written = posixpath.normpath(m.source)
                r = resolved.get(m.source)
                if r is not None and r.real is None:
                    use = ContainerUse(c.id, c.name, c.running, m, unresolved=r.reason)
                    unresolved.append(use)
                    entries.append((written, use))
                    continue
                entries.append((written, ContainerUse(c.id, c.name, c.running, m)))
                real = posixpath.normpath(r.real) if r is not None and r.real else written
                if real != written:
                    entries.append((real, ContainerUse(c.id, c.name, c.running, m, resolved=real)))
        entries.sort(key=lambda e: e[0])
        self.unresolved = tuple(unresolved)
        self._uses = [u for _, u in entries]
        self._sources = [src for src, _ in entries]
        self._by_source: dict[str, list[ContainerUse]] = {}
        for src, use in entries:
            self._by_source.setdefault(src, []).append(use)

    def overlapping(self, path: str, *, wide: Sequence[str] = ()) -> list[ContainerUse]:
        """Uses whose source (as written, or as it resolves on the host) is ``path``,
        inside it, or holds it, and every use whose source cannot be resolved. A source
        that holds one of the ``wide`` paths (Docker's data root, a configured root: a
        view of everything, as a monitoring or backup container has) does not count as
        a use of what is inside it."""
        ranged = _prefixed(self._sources, path)
        out = [self._uses[i] for i in ranged if is_under(self._sources[i], path)]
        parent = posixpath.dirname(path)
        while True:
            for use in self._by_source.get(parent, ()):
                if not any(is_under(w, parent) for w in wide):
                    out.append(use)
            if parent == "/":
                break
            parent = posixpath.dirname(parent)
        out.extend(self.unresolved)
        # One answer per container mount, the one that says most: unresolved first,
        # then resolved (the written source alone says least).
        unique: dict[tuple[str, str, str], ContainerUse] = {}
        for use in sorted(out, key=lambda u: (u.unresolved is None, u.resolved is None)):
            unique.setdefault((use.container_id, use.mount.destination, use.mount.source), use)
        return list(unique.values())


def container_uses(btrfs: Btrfs, containers: Sequence[ContainerRecord]) -> UseIndex:
    """The containers' uses, each source also resolved on the host now."""
    sources = sorted({m.source for c in containers for m in c.mounts if m.source.startswith("/")})
    return UseIndex(containers, btrfs.resolve_host_paths(sources) if sources else {})


def read_mounts(btrfs: Btrfs, pathmap: PathMap) -> MountIndex:
    """The mount tables as they are now (the host's, this process's, every other
    namespace's), and what processes and the kernel hold open now."""
    host: Future[list[MountEntry]] = Future()
    others: Future[list[NamespaceTable]] = Future()
    held: Future[Holders] = Future()
    # the reads are independent: side by side (each one's own faults stay its own)
    tables = _POOL.submit(_settle, host, btrfs.host_mounts)
    spaces = _POOL.submit(_settle, others, btrfs.namespace_mounts)
    _settle(held, btrfs.holders)
    local = btrfs.mounts()
    tables.result()
    spaces.result()
    return mount_index(local, host, pathmap, others, held)


_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mounts")


def _settle(future: Future[T], read: Callable[[], T]) -> None:
    try:
        future.set_result(read())
    except Unavailable as exc:
        future.set_exception(exc)


def mount_index(
    local: Sequence[MountEntry],
    host: Future[list[MountEntry]],
    pathmap: PathMap,
    others: Future[list[NamespaceTable]],
    held: Future[Holders],
) -> MountIndex:
    """The host's mounts (host paths already), this process's (mapped to host paths;
    those outside the host's view are left out) and every other namespace's (placed by
    what they sit on), with what is held open (``agent.domain.holders``). When the
    host's table, or another namespace's, cannot be read, the index says why and holds
    this process's mounts only; when what is held cannot be read, its ``held`` says
    why."""
    views = [
        MountView(hp, m.fstype, m.source, m.root, m.dev)
        for m in local
        if (hp := pathmap.to_host(m.mountpoint)) is not None
    ]
    try:
        host_mounts = host.result()
        tables = others.result()
    except Unavailable as exc:
        return MountIndex(views, unknown_reason=exc.detail)
    views.extend(MountView(m.mountpoint, m.fstype, m.source, m.root, m.dev) for m in host_mounts)
    try:
        holders = held.result()
        held_index = HeldIndex.of(holders)
        # namespaces no process is in that a process holds open: their mounts count
        tables = [*tables, *holders.hidden_namespaces]
    except Unavailable as exc:
        held_index = HeldIndex(unknown_reason=exc.detail)
    return MountIndex(views, foreign=foreign_mounts(tables), held=held_index)
