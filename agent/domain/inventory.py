"""The read side: what is on this NAS and what is left over, as domain values (the HTTP
views and the local CLI turn them into their own shapes).

``Inventory`` asks the backends through ``take_snapshot`` and keeps what never changes
(a subvolume's creation time, a filesystem's uuid), and Docker's info while the daemon
process that gave it answers (``agent.domain.snapshot.DaemonInfo``: checked before and
after every snapshot). Every delete decides on a snapshot taken for it
(``fresh_snapshot``); nothing kept for the reads is ever used to delete.

The reads (and ``/metrics``) share one kept scan (``agent.domain.keptscan``): used
again while nothing says the host changed.
"""

from __future__ import annotations

import bisect
import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from agent import __version__, collector
from agent.config import AgentConfig
from agent.domain.changes import DockerWatch
from agent.domain.findings import Finding, compute_findings
from agent.domain.keptscan import KeptScan
from agent.domain.paths import PathMap, PathRefused, check_abs, is_under
from agent.domain.snapshot import (
    DaemonInfo,
    FsView,
    Scope,
    Snapshot,
    SubvolView,
    VolumeView,
    take_snapshot,
)
from agent.errors import AgentError, NotFound, Unavailable, ValidationFailed
from agent.host.backend import Btrfs, Docker
from agent.host.records import DockerInfo
from shared.policy import DEFAULT_MIN_AGE_SECONDS, DEFAULT_PROTECT_LABELS, FINDING_KINDS

Clock = Callable[[], datetime]
log = logging.getLogger("nas_janitor.agent.inventory")

# How long the pages after the first of a subvolume listing reuse the first page's
# snapshot (seconds).
PAGE_SNAPSHOT_SECONDS = 30.0


def utcnow() -> datetime:
    return datetime.now(UTC)


def resolve_roots(roots: Sequence[str], pathmap: PathMap) -> tuple[tuple[str, ...], dict[str, str]]:
    """The roots with every symlink on their way resolved (host paths), and which were
    resolved (configured path -> real path). A root whose real path lies outside the
    host's view (under a prefix the agent cannot see) is kept as configured: everything
    under it is then refused as reached through a symlink."""
    out: list[str] = []
    links: dict[str, str] = {}
    for root in roots:
        real = pathmap.to_host(os.path.realpath(pathmap.to_local(root)))
        if real is None or real == root:
            out.append(root)
            continue
        links[root] = real
        out.append(real)
    return tuple(dict.fromkeys(out)), links


@dataclass(frozen=True)
class HostFacts:
    hostname: str
    agent_version: str
    kernel_release: str
    rmdir_deletes_subvolumes: bool
    btrfs_progs_version: str
    docker: DockerInfo
    roots: tuple[str, ...]


class Inventory:
    def __init__(
        self,
        config: AgentConfig,
        *,
        btrfs: Btrfs,
        docker: Docker,
        clock: Clock = utcnow,
    ) -> None:
        self.config = config
        self.btrfs = btrfs
        self.docker = docker
        self.clock = clock
        self.pathmap = PathMap(config.host_prefix)
        # A configured root reached through a symlink (DSM 7's
        # /var/packages/ContainerManager/var/docker -> /volume1/@docker) is resolved once,
        # here: the agent acts under, and reports, the real path. A symlink on the way
        # from a root to a target stays refused (agent.domain.safety).
        self.roots, self.root_links = resolve_roots(config.roots, self.pathmap)
        for link, real in self.root_links.items():
            log.warning("root %s is a symbolic link: acting under its real path %s", link, real)
        self._fs_cache: dict[str, tuple[str, str | None]] = {}
        self._data_root: str | None = None  # Docker's data root as the last scan saw it
        self.daemon_info = DaemonInfo()  # Docker's info, while the same daemon answers
        # A subvolume's creation time never changes: keep it by (filesystem, subvolume
        # uuid), so a listing asks the kernel once per subvolume, not once per request.
        self._created: dict[tuple[str, str], datetime] = {}
        self._lock = threading.Lock()
        self._paged: tuple[float, Snapshot] | None = None  # (monotonic time, snapshot)
        self.kept = KeptScan(
            btrfs,
            DockerWatch(docker),
            take=self.take,
            compute=lambda snap, kinds, min_age: self.compute_findings(
                snap, kinds=kinds, min_age_seconds=min_age
            ),
            max_age=float(config.inventory_max_age_seconds),
        )

    # -- snapshots -------------------------------------------------------------------
    def fresh_snapshot(
        self, *, commit: Sequence[str] | bool = (), scope: Scope | None = None
    ) -> Snapshot:
        """A snapshot taken now. ``commit``: filesystems (uuids, or True for every one
        the agent looks at) whose transaction is committed first, so that the
        generations read reflect every write made before this call (btrfs moves a
        subvolume's generation only when it commits). ``scope``: only the subvolumes
        one delete touches are listed (``agent.domain.snapshot.Scope``); everything
        else is read whole, as for any snapshot."""
        if commit is True and not self._fs_cache:
            self.take()  # learn the filesystems first
        wanted = {u for u, _ in self._fs_cache.values()} if commit is True else set(commit or ())
        done: set[str] = set()
        if wanted:
            for m in self.btrfs.mounts():
                uuid = self._fs_cache.get(m.source, (None, None))[0]
                if m.fstype == "btrfs" and uuid in wanted and uuid not in done:
                    self.btrfs.commit(m.mountpoint)
                    done.add(uuid)
            for uuid in wanted - done:  # not seen before: find its mount first
                fs = self.take().filesystems.get(uuid)
                if fs is not None:
                    self.btrfs.commit(fs.local_mount)
        return self.take(scope=scope)

    def take(self, *, scope: Scope | None = None) -> Snapshot:
        snap = take_snapshot(
            self.btrfs,
            self.docker,
            now=self.clock(),
            roots=self.roots,
            pathmap=self.pathmap,
            fs_cache=self._fs_cache,
            data_root_hint=self._data_root,
            scope=scope,
            daemon_info=self.daemon_info,
        )
        self._data_root = snap.docker.data_root  # the next scan lists its filesystem early
        return snap

    # -- the kept scan ----------------------------------------------------------------
    def current(self) -> Snapshot:
        """The snapshot the reads use: the kept one while nothing says the host changed
        (``agent.domain.keptscan``), else a new scan (kept for the next reads)."""
        return self.kept.current().snap

    @property
    def scans(self) -> int:
        """Scans made for the reads (kept or not)."""
        return self.kept.scans

    @property
    def watch(self) -> DockerWatch:
        return self.kept.watch

    def kept_findings(self) -> list[Finding]:
        """The default findings for ``/metrics``, which never waits for a scan
        (``KeptScan.kept_findings``)."""
        return self.kept.kept_findings()

    def refresh_in_background(self) -> None:
        self.kept.refresh_in_background()

    def prime(self, watch_seconds: float = 5.0) -> list[Finding]:
        """Make the kept scan now (at start-up), with its default findings: two scans,
        the first is never kept (nothing was marked before it), the second is; Docker's
        events followed first (a scan made before they are is not kept either), for up
        to ``watch_seconds``. With no kept scan, one scan, which learns what every scan
        keeps (the filesystems, Docker's info); no findings then."""
        if self.config.inventory_max_age_seconds <= 0:
            self.current()
            return []
        self.watch.start()
        self.watch.wait_connected(watch_seconds)
        self.current()
        self.current()
        return self.kept_findings()

    def listing_snapshot(self, *, first_page: bool) -> Snapshot:
        """The snapshot a page of the subvolume listing is cut from: the current one
        for the first page, the same for the pages after it (up to
        ``PAGE_SNAPSHOT_SECONDS``), so a listing of N pages scans the system at most
        once, and its pages agree. The last page and every delete drop it."""
        now = time.monotonic()
        if not first_page:
            with self._lock:
                paged = self._paged
            if paged is not None and now - paged[0] <= PAGE_SNAPSHOT_SECONDS:
                return paged[1]
        snap = self.current()
        with self._lock:
            self._paged = (now, snap)
        return snap

    def known_filesystems(self) -> set[str]:
        """The uuids of the filesystems the scans so far have looked at (no scan)."""
        return {u for u, _ in self._fs_cache.values()}

    def local_mount(self, fs_uuid: str) -> str | None:
        """Where this process sees filesystem ``fs_uuid`` (a mount of its top level when
        there is one); a snapshot is taken only to learn a filesystem not seen before.
        None when there is no such filesystem."""
        if fs_uuid not in {u for u, _ in self._fs_cache.values()}:
            try:
                self.take()  # learns every filesystem the agent looks at
            except AgentError:
                return None
        found: str | None = None
        for m in self.btrfs.mounts():
            if m.fstype == "btrfs" and self._fs_cache.get(m.source, (None, None))[0] == fs_uuid:
                if m.root == "/":
                    return m.mountpoint
                found = found or m.mountpoint
        return found

    def forget_kept(self) -> None:
        """Something changed: what is kept between requests is not used again (the kept
        scan stays only as what the next one compares with, and for ``/metrics`` until
        then)."""
        with self._lock:
            self._paged = None
        self.kept.forget()

    # -- health ----------------------------------------------------------------------
    def readiness(self) -> None:
        """Raise an ``Unavailable`` when Docker, btrfs, the host's mount table or what
        processes hold open cannot be read. All are probed: the problem's
        ``unavailable`` member names every one that is down (the code and detail are the
        first one's)."""
        down: list[Unavailable] = []
        probes = (self.docker.ping, self.btrfs.version, self.btrfs.host_mounts, self.btrfs.holders)
        for probe in probes:
            try:
                probe()
            except Unavailable as exc:
                down.append(exc)
        if down:
            first = down[0]
            raise type(first)(
                "; ".join(e.detail for e in down), extra={"unavailable": [e.code for e in down]}
            ) from first

    # -- reads -----------------------------------------------------------------------
    def host(self) -> HostFacts:
        info = self.docker.info()
        return HostFacts(
            hostname=platform.node() or os.uname().nodename,
            agent_version=__version__,
            kernel_release=self.btrfs.kernel_release(),
            rmdir_deletes_subvolumes=self.btrfs.rmdir_deletes_subvolumes(),
            btrfs_progs_version=self.btrfs.version(),
            docker=info,
            roots=tuple(self.roots or (info.data_root,)),
        )

    def filesystems(self) -> list[FsView]:
        snap = self.current()
        return sorted(snap.filesystems.values(), key=lambda f: f.uuid)

    def created_at(self, sv: SubvolView) -> datetime | None:
        """The subvolume's creation time: from the listing, else asked of the kernel
        once and kept."""
        if sv.created_at is not None:
            return sv.created_at
        if sv.local_path is None:
            return None
        key = (sv.fs_uuid, sv.uuid) if sv.uuid else None
        if key is not None and key in self._created:
            return self._created[key]
        created = self.btrfs.created_at(sv.local_path)
        if key is not None and created is not None:
            if len(self._created) > 200_000:
                self._created.clear()
            self._created[key] = created
        return created

    def subvolumes(
        self, fs_uuid: str, *, under: str | None, limit: int, cursor: str | None
    ) -> tuple[list[SubvolView], str | None]:
        """One page of a filesystem's subvolumes by id, after ``cursor``."""
        after, under = self.page_args(cursor, under)
        snap = self.listing_snapshot(first_page=cursor is None)
        items, next_cursor = self.page_of(snap, fs_uuid, under=under, limit=limit, after=after)
        if next_cursor is None:
            self.listing_done()
        return items, next_cursor

    @staticmethod
    def page_args(cursor: str | None, under: str | None) -> tuple[int, str | None]:
        """A listing's ``cursor`` as the id the page starts after, and ``under`` in
        normal form; ``ValidationFailed`` (before anything is scanned) when either is
        not acceptable."""
        after = 0
        if cursor is not None:
            # ASCII digits only: str.isdigit() is also true for "²", which int() refuses
            if not (cursor.isascii() and cursor.isdigit()) or len(cursor) > 19:
                raise ValidationFailed("bad cursor", errors={"cursor": ["not a valid cursor"]})
            after = int(cursor)
        if under is not None:
            try:
                under = check_abs(under)
            except PathRefused as exc:
                raise ValidationFailed("bad path", errors={"under": [str(exc)]}) from None
        return after, under

    @staticmethod
    def page_of(
        snap: Snapshot, fs_uuid: str, *, under: str | None, limit: int, after: int
    ) -> tuple[list[SubvolView], str | None]:
        """The page of ``snap``'s subvolumes of ``fs_uuid`` after id ``after`` (those of
        a known path, inside ``under`` when given), and the next page's cursor (None:
        the last page)."""
        subs = snap.subvolumes.get(fs_uuid)
        if subs is None:
            raise NotFound(f"no btrfs filesystem with uuid {fs_uuid}")
        items: list[SubvolView] = []
        more = False
        ids = snap.sorted_ids(fs_uuid)
        for sid in ids[bisect.bisect_right(ids, after) :]:
            sv = subs[sid]
            if sv.path is None:
                continue
            if under is not None and not is_under(sv.path, under):
                continue
            if len(items) == limit:
                more = True
                break
            items.append(sv)
        next_cursor = str(items[-1].id) if more and items else None
        return items, next_cursor

    def listing_done(self) -> None:
        """A listing's last page was answered: no page needs its snapshot any more."""
        with self._lock:
            self._paged = None

    def subvolume(self, fs_uuid: str, sub_id: int) -> SubvolView:
        snap = self.current()
        if fs_uuid not in snap.subvolumes:
            raise NotFound(f"no btrfs filesystem with uuid {fs_uuid}")
        sv = snap.subvolume(fs_uuid, sub_id)
        if sv is None or sv.path is None:
            raise NotFound(f"no subvolume {sub_id} on filesystem {fs_uuid}")
        return sv

    def volumes(self, *, dangling: bool | None = None) -> list[VolumeView]:
        snap = self.current()
        return [
            vol
            for vol in sorted(snap.volumes.values(), key=lambda v: v.name)
            if dangling is None or (not vol.in_use_by) == dangling
        ]

    def volume(self, name: str) -> VolumeView:
        vol = self.current().volumes.get(name)
        if vol is None:
            raise NotFound(f"no volume named {name}")
        return vol

    def compute_findings(
        self,
        snap: Snapshot,
        *,
        kinds: Sequence[str] = FINDING_KINDS,
        min_age_seconds: int = DEFAULT_MIN_AGE_SECONDS,
        protect_labels: Sequence[str] = DEFAULT_PROTECT_LABELS,
    ) -> list[Finding]:
        created: dict[tuple[str, int], datetime | None] = {}
        if "orphan-layer" in kinds:
            for uuid, subs in snap.subvolumes.items():
                for sv in subs.values():
                    if sv.owner_kind == "orphan-layer" and sv.created_at is None:
                        created[(uuid, sv.id)] = self.created_at(sv)
        rmdir_ok = self.btrfs.rmdir_deletes_subvolumes()
        with collector.paused():  # computing only (and lstat of local paths)
            return compute_findings(
                snap,
                now=snap.taken_at,
                created_at=created,
                rmdir_deletes_subvolumes=rmdir_ok,
                min_age_seconds=min_age_seconds,
                protect_labels=protect_labels,
                kinds=kinds,
                orphan_floor_seconds=self.config.orphan_min_age_seconds,
            )

    def findings(
        self,
        *,
        kinds: Sequence[str] | None = None,
        min_age_seconds: int = DEFAULT_MIN_AGE_SECONDS,
    ) -> list[Finding]:
        """The findings of the current snapshot (computed once per kept scan and
        question)."""
        return self.kept.findings(tuple(kinds or FINDING_KINDS), min_age_seconds)
