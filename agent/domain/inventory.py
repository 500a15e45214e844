"""The agent's domain facade: what the HTTP views call. It owns the backends, the
configuration, the audit log and the state store, and never speaks HTTP.

Read side: ``host``, ``filesystems``, ``subvolumes``, ``volumes``, ``findings``.
Clean side (``agent.cleanup``): direct deletes, plans, jobs.
"""

from __future__ import annotations

import bisect
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from agent import __version__
from agent.config import AgentConfig
from agent.domain.findings import Finding, compute_findings
from agent.domain.paths import PathMap, PathRefused, check_abs, is_under
from agent.domain.snapshot import Snapshot, SubvolView, VolumeView, protected_reason, take_snapshot
from agent.errors import NotFound, Unavailable, ValidationFailed
from agent.host.backend import Btrfs, Docker
from shared.schemas import DEFAULT_MIN_AGE_SECONDS, DEFAULT_PROTECT_LABELS, FINDING_KINDS

Clock = Callable[[], datetime]

# How long the pages after the first of a subvolume listing reuse the first page's
# snapshot (seconds).
PAGE_SNAPSHOT_SECONDS = 30.0


def utcnow() -> datetime:
    return datetime.now(UTC)


class JanitorService:
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
        self._fs_cache: dict[str, tuple[str, str | None]] = {}
        # A subvolume's creation time never changes: keep it by (filesystem, subvolume
        # uuid), so a listing asks the kernel once per subvolume, not once per request.
        self._created: dict[tuple[str, str], datetime] = {}
        self._lock = threading.Lock()
        self._paged: tuple[float, Snapshot] | None = None  # (monotonic time, snapshot)

    # -- snapshot ------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        return take_snapshot(
            self.btrfs,
            self.docker,
            now=self.clock(),
            roots=self.config.roots,
            pathmap=self.pathmap,
            fs_cache=self._fs_cache,
        )

    def _listing_snapshot(self, *, first_page: bool) -> Snapshot:
        """The snapshot a page of the subvolume listing is cut from: a fresh one for the
        first page, kept for the pages after it (up to ``PAGE_SNAPSHOT_SECONDS``), so a
        listing of N pages scans the system once, not N times, and its pages agree.
        The last page and every delete drop the kept one."""
        now = time.monotonic()
        if not first_page:
            with self._lock:
                kept = self._paged
            if kept is not None and now - kept[0] <= PAGE_SNAPSHOT_SECONDS:
                return kept[1]
        snap = self.snapshot()
        with self._lock:
            self._paged = (now, snap)
        return snap

    def forget_listing_snapshot(self) -> None:
        with self._lock:
            self._paged = None

    # -- health ----------------------------------------------------------------------
    def readiness(self) -> None:
        """Raise DockerUnavailable / BtrfsUnavailable when either is unreachable. Both
        are probed: the problem's ``unavailable`` member names every one that is down
        (when both are, the code is Docker's and the detail says both)."""
        down: list[Unavailable] = []
        for probe in (self.docker.ping, self.btrfs.version):
            try:
                probe()
            except Unavailable as exc:
                down.append(exc)
        if down:
            first = down[0]
            raise type(first)(
                "; ".join(e.detail for e in down), extra={"unavailable": [e.code for e in down]}
            ) from first

    # -- read ------------------------------------------------------------------------
    def host(self) -> dict[str, Any]:
        info = self.docker.info()
        return {
            "hostname": platform.node() or os.uname().nodename,
            "agent_version": __version__,
            "kernel": {
                "release": self.btrfs.kernel_release(),
                "rmdir_deletes_subvolumes": self.btrfs.rmdir_deletes_subvolumes(),
            },
            "btrfs_progs_version": self.btrfs.version(),
            "docker": {
                "server_version": info.server_version,
                "api_version": info.api_version,
                "storage_driver": info.storage_driver,
                "data_root": info.data_root,
            },
            "roots": list(self.config.roots or (info.data_root,)),
        }

    def filesystems(self) -> list[dict[str, Any]]:
        snap = self.snapshot()
        return [
            {
                "uuid": fs.uuid,
                "label": fs.label,
                "mountpoints": list(fs.mountpoints),
                "size_bytes": fs.usage.size_bytes,
                "used_bytes": fs.usage.used_bytes,
                "free_bytes": fs.usage.free_bytes,
                "quota_enabled": fs.quota_enabled,
            }
            for fs in sorted(snap.filesystems.values(), key=lambda f: f.uuid)
        ]

    def created_at(self, sv: SubvolView) -> datetime | None:
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

    def _subvol_dict(self, sv: SubvolView) -> dict[str, Any]:
        created = self.created_at(sv)
        return {
            "id": sv.id,
            "parent_id": sv.parent_id,
            "path": sv.path,
            "read_only": sv.read_only,
            "generation": sv.generation,
            "created_at": created,
            "uuid": sv.uuid,
            "parent_uuid": sv.parent_uuid,
            "referenced_bytes": sv.referenced_bytes,
            "exclusive_bytes": sv.exclusive_bytes,
            "owner": {"kind": sv.owner_kind, "ref": sv.owner_ref},
        }

    def subvolumes(
        self, fs_uuid: str, *, under: str | None, limit: int, cursor: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
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
        snap = self._listing_snapshot(first_page=cursor is None)
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
        if next_cursor is None:
            self.forget_listing_snapshot()  # the listing is complete: no page needs it
        return [self._subvol_dict(sv) for sv in items], next_cursor

    def subvolume(self, fs_uuid: str, sub_id: int) -> dict[str, Any]:
        snap = self.snapshot()
        if fs_uuid not in snap.subvolumes:
            raise NotFound(f"no btrfs filesystem with uuid {fs_uuid}")
        sv = snap.subvolume(fs_uuid, sub_id)
        if sv is None or sv.path is None:
            raise NotFound(f"no subvolume {sub_id} on filesystem {fs_uuid}")
        return self._subvol_dict(sv)

    def _volume_dict(self, vol: VolumeView) -> dict[str, Any]:
        rec = vol.record
        return {
            "name": rec.name,
            "driver": rec.driver,
            "mountpoint": rec.mountpoint,
            "labels": dict(rec.labels),
            "created_at": rec.created_at,
            "anonymous": rec.anonymous,
            "in_use_by": list(vol.in_use_by),
            "nested_subvolumes": [
                {"id": s.id, "path": s.path, "read_only": s.read_only} for s in vol.nested
            ],
            "exclusive_bytes": vol.exclusive_bytes,
            "protected": protected_reason(rec.labels, DEFAULT_PROTECT_LABELS),
        }

    def volumes(self, *, dangling: bool | None = None) -> list[dict[str, Any]]:
        snap = self.snapshot()
        out = []
        for vol in sorted(snap.volumes.values(), key=lambda v: v.name):
            if dangling is not None and (not vol.in_use_by) != dangling:
                continue
            out.append(self._volume_dict(vol))
        return out

    def volume(self, name: str) -> dict[str, Any]:
        snap = self.snapshot()
        vol = snap.volumes.get(name)
        if vol is None:
            raise NotFound(f"no volume named {name}")
        return self._volume_dict(vol)

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
                    if sv.owner_kind == "orphan-layer" and sv.local_path:
                        created[(uuid, sv.id)] = self.created_at(sv)
        return compute_findings(
            snap,
            now=snap.taken_at,
            pathmap=self.pathmap,
            created_at=created,
            rmdir_deletes_subvolumes=self.btrfs.rmdir_deletes_subvolumes(),
            min_age_seconds=min_age_seconds,
            protect_labels=protect_labels,
            kinds=kinds,
        )

    def findings(
        self,
        *,
        kinds: Sequence[str] | None = None,
        min_age_seconds: int = DEFAULT_MIN_AGE_SECONDS,
    ) -> list[dict[str, Any]]:
        snap = self.snapshot()
        found = self.compute_findings(
            snap, kinds=tuple(kinds or FINDING_KINDS), min_age_seconds=min_age_seconds
        )
        return [f.as_dict() for f in found]
