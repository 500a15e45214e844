"""The scan the reads share, kept while nothing says the host changed.

The reads (and ``/metrics``) share one kept scan and the findings computed from it. It
is used again only while:

- Docker's event stream (``agent.domain.changes.DockerWatch``) is open and reported
  nothing since the scan started (a lost stream counts as a change);
- every filesystem's ``Btrfs.change_mark`` (read before the scan) is unchanged: no
  subvolume made, deleted, renamed or flagged, no default subvolume set, no qgroup or
  subvolume root item moved by a commit;
- the mount tables (this process's and the host's) are the same, and so is the stamp
  of Docker's ``btrfs/subvolumes`` folder (a plain folder made there);
- btrfs-progs is still there (without it a scan cannot be made: the read says so);
- the agent changed nothing itself (``forget``, called after every change);
- it is younger than ``inventory_max_age_seconds`` (what no signal shows, e.g. files
  written in a plain folder of an unused volume, which moves its age, or the usage, or
  what processes hold open: the findings' ``held_by_*`` reasons are as of the scan);
- what processes hold open could be read when it was scanned (no signal says when a
  read that failed would succeed).

Those checks cost a few system calls. A read that finds the kept scan stale scans
again; concurrent reads wait for that one scan instead of making their own. Only one
scan is kept (the pages of a listing in progress may hold the one before); a big one is
let go before the scan replacing it is made, so that two are not held at once. Nothing
kept here is ever used to delete.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import posixpath
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.domain.changes import DockerWatch
from agent.domain.findings import Finding
from agent.domain.paths import LinkMemo
from agent.domain.snapshot import Snapshot
from agent.errors import AgentError, Unavailable
from agent.host.backend import Btrfs
from agent.host.records import ChangeMark, MountEntry
from shared.policy import DEFAULT_MIN_AGE_SECONDS, FINDING_KINDS

log = logging.getLogger("nas_janitor.agent.inventory")

# Findings kept per kept scan: one list per (kinds, min_age_seconds) asked, at most this
# many (then they are computed again).
KEPT_FINDINGS = 16
# A kept scan of more subvolumes than this is freed before the scan replacing it is
# made, and its memory returned to the system (a full garbage collection, then
# malloc_trim): ``KeptScan._let_go``.
BIG_SCAN = 2000

FindingsKey = tuple[tuple[str, ...], int]
Compute = Callable[[Snapshot, tuple[str, ...], int], list[Finding]]


@dataclass
class _Kept:
    """One scan kept for the reads, with what it was taken against."""

    snap: Snapshot
    started: float  # monotonic time the scan started
    trusted: bool  # every signal was read before the scan: it may be used again
    epoch: int  # DockerWatch's epoch when the scan started
    forgets: int  # KeptScan._forgets when the scan started
    marks: dict[str, tuple[str, ChangeMark]]  # fs uuid -> (local mount, its mark)
    mounts: list[MountEntry]
    host_mounts: list[MountEntry] | None  # None: the host's table could not be read
    layer_stamp: tuple[int, int, int, int] | None
    findings: dict[FindingsKey, list[Finding]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class KeptScan:
    """The kept scan of ``take`` (a full snapshot) and the findings ``compute`` makes of
    it. ``max_age`` 0 keeps nothing: every read scans."""

    def __init__(
        self,
        btrfs: Btrfs,
        watch: DockerWatch,
        *,
        take: Callable[[], Snapshot],
        compute: Compute,
        max_age: float,
    ) -> None:
        self.btrfs = btrfs
        self.watch = watch
        self._take = take
        self._compute = compute
        self.max_age = max_age
        self._kept: _Kept | None = None
        # the default findings of a big kept scan let go before the scan replacing it
        # (``_let_go``): what ``/metrics`` answers until that scan is made
        self._stale: list[Finding] | None = None
        self._forgets = 0
        self._lock = threading.Lock()
        self._scan_lock = threading.Lock()  # one scan for the reads at a time
        self._background: threading.Thread | None = None
        self._last_failure: AgentError | None = None  # of the last scan, if it failed
        self.scans = 0  # scans made for the reads (kept or not)

    def forget(self) -> None:
        """Something changed: the kept scan is not used again (it stays only as what
        the next one compares with, and for ``/metrics`` until then)."""
        with self._lock:
            self._forgets += 1

    def current(self) -> _Kept:
        # (no reference to a stale kept scan is held while waiting for, or making, the
        # scan that replaces it: ``_let_go`` frees it first)
        kept = self._usable()
        if kept is not None:
            return kept
        with self._scan_lock:
            kept = self._usable()  # another read may have scanned while this one waited
            return kept if kept is not None else self._scan()

    def _usable(self) -> _Kept | None:
        kept = self._kept
        return kept if kept is not None and self._still_valid(kept) else None

    def _scan(self) -> _Kept:
        """Scan for the reads (the caller holds ``_scan_lock``), reading every change
        signal first, so that a change made during the scan shows at the next check."""
        if self.max_age > 0:
            self.watch.start()
        prev = self._kept
        started = time.monotonic()
        connected, epoch = self.watch.state()
        forgets = self._forgets
        marks: dict[str, tuple[str, ChangeMark]] = {}
        trusted = self.max_age > 0 and connected and prev is not None
        mounts: list[MountEntry] = []
        host_mounts: list[MountEntry] | None = None
        stamp = None
        if trusted and prev is not None:
            try:
                mounts = self.btrfs.mounts()
                host_mounts = self._host_mounts()
                for uuid, fs in prev.snap.filesystems.items():
                    old = prev.marks.get(uuid)
                    since = old[1] if old is not None and old[0] == fs.local_mount else None
                    marks[uuid] = (fs.local_mount, self.btrfs.change_mark(fs.local_mount, since))
                stamp = self.btrfs.folder_stamp(self._layer_dir(prev.snap))
            except (AgentError, OSError):
                trusted = False
        prev_root = prev.snap.docker.data_root if prev is not None else None
        big = prev is not None and self.max_age > 0 and _size(prev.snap) > BIG_SCAN
        del prev
        if big:
            self._let_go()
        try:
            snap = self._take()
        except AgentError as exc:
            self._last_failure = exc
            raise
        self._last_failure = None
        self.scans += 1
        # Trusted only when every filesystem it holds was marked before it, against the
        # same Docker data root (the layer folder's stamp is of that root).
        if prev_root is None or set(snap.filesystems) - set(marks):
            trusted = False
        elif snap.docker.data_root != prev_root:
            trusted = False
        elif not snap.mounts.held.known:
            # what is held open could not be read: no signal says when it can again
            trusted = False
        kept = _Kept(
            snap=snap,
            started=started,
            trusted=trusted,
            epoch=epoch,
            forgets=forgets,
            marks=marks,
            mounts=mounts,
            host_mounts=host_mounts,
            layer_stamp=stamp,
        )
        if self.max_age > 0:
            with self._lock:
                self._kept = kept
                self._stale = None
        return kept

    def _let_go(self) -> None:
        """Free the (big, stale) kept scan before the scan that replaces it is made (the
        caller holds ``_scan_lock`` and has read from it what the new scan is compared
        with): two full scans are then never held at once, and the new one is made in
        the memory the old one leaves, not in more of it. Its default findings (which
        hold no part of it) stay for ``/metrics`` until the new scan is kept. After a
        failed scan there is no kept scan: the next one has nothing to compare with."""
        with self._lock:
            prev, self._kept = self._kept, None
            key = (tuple(FINDING_KINDS), DEFAULT_MIN_AGE_SECONDS)
            self._stale = prev.findings.get(key) if prev is not None else None
        del prev
        release_memory()

    def _host_mounts(self) -> list[MountEntry] | None:
        try:
            return self.btrfs.host_mounts()
        except Unavailable:
            return None

    @staticmethod
    def _layer_dir(snap: Snapshot) -> str:
        return snap.pathmap.to_local(posixpath.join(snap.docker.data_root, "btrfs", "subvolumes"))

    def _still_valid(self, kept: _Kept) -> bool:
        """Nothing says the host changed since ``kept`` was scanned."""
        if not kept.trusted or self.max_age <= 0:
            return False
        if time.monotonic() - kept.started > self.max_age or kept.forgets != self._forgets:
            return False
        if self.watch.state() != (True, kept.epoch):
            return False
        if not self.btrfs.tool_present():
            return False  # a scan now says why it cannot be made (a 503)
        try:
            if self.btrfs.mounts() != kept.mounts or self._host_mounts() != kept.host_mounts:
                return False
            for mount, mark in kept.marks.values():
                if self.btrfs.change_mark(mount, mark) != mark:
                    return False
            return self.btrfs.folder_stamp(self._layer_dir(kept.snap)) == kept.layer_stamp
        except (AgentError, OSError):
            return False

    def kept_findings(self) -> list[Finding]:
        """The default findings for ``/metrics``, which never waits for a scan: those of
        the kept scan even when it is stale (a scan for the next scrape then starts in
        the background), or those of a big one let go while its successor is made
        (``_let_go``); a scan only when none was made yet, or when the one let go had
        no default findings computed. Raises the error of the last scan when it
        failed."""
        kept, stale = self._kept, self._stale
        if kept is None and stale is not None and self.max_age > 0:
            # the kept scan was let go for the one being made: its findings meanwhile
            self.refresh_in_background()
            if self._last_failure is not None:
                raise self._last_failure
            return stale
        if kept is None or self.max_age <= 0:
            return self.findings(tuple(FINDING_KINDS), DEFAULT_MIN_AGE_SECONDS)
        if not self._still_valid(kept):
            if self._last_failure is not None:
                self.refresh_in_background()
                raise self._last_failure
            self.refresh_in_background()
        return self._findings_of(kept, tuple(FINDING_KINDS), DEFAULT_MIN_AGE_SECONDS)

    def refresh_in_background(self) -> None:
        """Scan (if the kept scan is stale) and compute the default findings, in a
        thread of their own; nothing when one is running already."""
        with self._lock:
            if self._background is not None and self._background.is_alive():
                return
            self._background = threading.Thread(
                target=self._refresh, name="inventory-refresh", daemon=True
            )
            self._background.start()

    def _refresh(self) -> None:
        try:
            kept = self.current()
            self._findings_of(kept, tuple(FINDING_KINDS), DEFAULT_MIN_AGE_SECONDS)
        except AgentError as exc:
            log.warning("background scan failed: %s: %s", exc.code, exc.detail)
        except Exception:  # pragma: no cover - a bug; the next read says what it is
            log.exception("background scan failed")

    def findings(self, kinds: tuple[str, ...], min_age: int) -> list[Finding]:
        """The findings of the current scan (computed once per scan and question)."""
        return self._findings_of(self.current(), kinds, min_age)

    def _findings_of(self, kept: _Kept, kinds: tuple[str, ...], min_age: int) -> list[Finding]:
        key = (kinds, min_age)
        found = kept.findings.get(key)
        if found is not None:
            return found
        with kept.lock:  # concurrent reads of the same scan compute its findings once
            found = kept.findings.get(key)
            if found is None:
                found = self._compute(kept.snap, kinds, min_age)
                if len(kept.findings) >= KEPT_FINDINGS:
                    kept.findings.clear()
                kept.findings[key] = found
                # The symlink answers of the safety checks are not kept with the scan
                # (another question asks the file system again).
                kept.snap.path_memo = LinkMemo()
                # Kept scans only: a scan kept for no other read (``max_age`` 0) goes
                # with the read that made it, after this; a full collection now (tens of
                # ms at 10,000 subvolumes) would free nothing of it.
                if self.max_age > 0 and _size(kept.snap) > BIG_SCAN:
                    release_memory()
            return found


def _size(snap: Snapshot) -> int:
    return sum(len(subs) for subs in snap.subvolumes.values())


# The cyclic collector's thresholds for a serving agent: a cold scan of 10,000
# subvolumes makes some 200,000 objects (records, views, paths, findings), nearly none
# in a cycle (reference counting frees them), and with Python's default (700 objects)
# it ran some 80 collections during one, a full one among them. The first generation
# is collected every 10,000 objects instead (what can wait for a collection stays
# bounded by that; 50,000 kept some 5 MB more after the B1 load), the later ones as
# often as before relative to it.
COLLECTOR_THRESHOLDS = (10_000, 10, 10)


def tune_collector() -> None:
    """For a long-running agent, once it is set up: what start-up made is kept out of
    every later collection (``gc.freeze``: it lives as long as the process anyway), and
    collections start at ``COLLECTOR_THRESHOLDS``."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*COLLECTOR_THRESHOLDS)


_libc: ctypes.CDLL | None = None


def trim_malloc() -> None:
    """Ask glibc's allocator to return its free pages to the system (``malloc_trim``, a
    few ms; nothing where there is no glibc): after a big answer was made, whose
    pieces of more than 512 bytes each came from it."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        if not name:
            return
        try:
            _libc = ctypes.CDLL(name)
        except OSError:
            return
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def release_memory() -> None:
    """Give what a big scan left behind back to the system: collect the unreachable
    cycles, then ask glibc's allocator to return its free pages (``malloc_trim``;
    nothing where there is no glibc)."""
    gc.collect()
    trim_malloc()
