"""Leftovers worth a person's attention, with the evidence that makes them so.

- ``dind-volume``: a volume no container uses (running or stopped) holding btrfs
  subvolumes: a docker-in-docker daemon's data root left behind.
- ``orphan-layer``: a subvolume in ``<data_root>/btrfs/subvolumes/`` that no image
  layer, container layer or init layer in Docker's layerdb references.
- ``dangling-volume``: an anonymous volume no container uses that holds no subvolume
  (what ``docker volume prune`` handles). Named volumes are someone's choice and are
  never reported as dangling.

``blocked_by`` lists what stops a finding from being cleaned now; the same safety
module that guards every delete decides it, so a finding is never shown as cleanable
when a delete of it would be refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from agent.domain.paths import PathMap
from agent.domain.safety import plan_subvolume_delete, plan_volume_delete
from agent.domain.snapshot import Snapshot, SubvolView, VolumeView
from agent.errors import Refused
from shared.schemas import DEFAULT_MIN_AGE_SECONDS, DEFAULT_PROTECT_LABELS, FINDING_KINDS


@dataclass(frozen=True)
class Finding:
    id: str
    kind: str
    target_type: str  # volume | subvolume
    name: str | None
    target_id: int | None
    path: str | None
    fs_uuid: str | None
    subvolume_ids: tuple[int, ...]  # what a clean-up deletes, children first
    reclaimable_bytes: int | None
    evidence: tuple[str, ...]
    blocked_by: tuple[str, ...]
    age_seconds: int | None
    generations: tuple[tuple[int, int], ...]  # (id, generation) when found

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "kind": self.kind,
            "target": {
                "type": self.target_type,
                "name": self.name,
                "id": self.target_id,
                "path": self.path,
            },
            "reclaimable_bytes": self.reclaimable_bytes,
            "evidence": list(self.evidence),
            "blocked_by": list(self.blocked_by),
            "age_seconds": self.age_seconds,
            "filesystem_uuid": self.fs_uuid,
            "subvolume_ids": list(self.subvolume_ids),
        }


def finding_id(kind: str, key: str) -> str:
    """Stable for the same kind and target."""
    digest = hashlib.sha256(f"{kind}\0{key}".encode()).hexdigest()
    return f"{kind}-{digest[:16]}"


def _human(n: int | None) -> str:
    if n is None:
        return "unknown size (btrfs quotas are off)"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _age_text(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


def _blocked(exc: Refused) -> str:
    return f"{exc.code}: {exc.detail}"


def _too_young(age: int | None, min_age: int) -> list[str]:
    if age is None or age >= min_age:
        return []
    return [f"too_young: {_age_text(age)} old, the minimum age is {_age_text(min_age)}"]


def _volume_age(vol: VolumeView, now: datetime) -> int | None:
    if vol.record.created_at is None:
        return None
    return max(0, int((now - vol.record.created_at).total_seconds()))


def compute_findings(
    snap: Snapshot,
    *,
    now: datetime,
    pathmap: PathMap,
    created_at: dict[tuple[str, int], datetime | None],
    rmdir_deletes_subvolumes: bool,
    min_age_seconds: int = DEFAULT_MIN_AGE_SECONDS,
    protect_labels: Sequence[str] = DEFAULT_PROTECT_LABELS,
    kinds: Sequence[str] = FINDING_KINDS,
) -> list[Finding]:
    """Every finding of the asked kinds. ``created_at`` gives creation times of the
    orphan candidates (the caller asks the btrfs side for just those)."""
    out: list[Finding] = []
    for vol in sorted(snap.volumes.values(), key=lambda v: v.name):
        if vol.in_use_by:
            continue
        kind = "dind-volume" if vol.nested else "dangling-volume"
        if kind == "dangling-volume" and not vol.record.anonymous:
            continue  # a named volume is someone's choice, not a leftover
        if kind not in kinds:
            continue
        out.append(
            _volume_finding(
                snap,
                vol,
                kind,
                now,
                pathmap,
                rmdir_deletes_subvolumes,
                min_age_seconds,
                protect_labels,
            )
        )
    if "orphan-layer" in kinds and snap.layerdb_known:
        for uuid in sorted(snap.subvolumes):
            for sv in sorted(snap.subvolumes[uuid].values(), key=lambda s: s.id):
                if sv.owner_kind == "orphan-layer":
                    out.append(
                        _orphan_finding(
                            snap, sv, now, pathmap, created_at, min_age_seconds, protect_labels
                        )
                    )
    return out


def _volume_finding(
    snap: Snapshot,
    vol: VolumeView,
    kind: str,
    now: datetime,
    pathmap: PathMap,
    rmdir_ok: bool,
    min_age: int,
    protect_labels: Sequence[str],
) -> Finding:
    rec = vol.record
    age = _volume_age(vol, now)
    evidence = [
        f"{'anonymous' if rec.anonymous else 'named'} volume {rec.name} "
        f"(driver {rec.driver}) at {rec.mountpoint}"
        + (f", created {rec.created_at.isoformat()}" if rec.created_at else ""),
        "used by no container, running or stopped",
    ]
    blocked: list[str] = []
    subvolume_ids: tuple[int, ...] = ()
    reclaimable: int | None = None
    fs_uuid: str | None = None
    try:
        ds = plan_volume_delete(snap, rec.name, pathmap=pathmap, protect_labels=protect_labels)
        subvolume_ids = tuple(s.id for s in ds.subvolumes)
        reclaimable = ds.reclaimable_bytes if ds.subvolumes else None
        fs_uuid = ds.fs_uuid or None
    except Refused as exc:
        blocked.append(_blocked(exc))
        subvolume_ids = tuple(s.id for s in snap.delete_order(vol.nested))
        reclaimable = vol.exclusive_bytes
        fs_uuid = vol.nested[0].fs_uuid if vol.nested else None
    if kind == "dind-volume":
        ro = [s for s in vol.nested if s.read_only]
        layered = [s for s in vol.nested if "/btrfs/subvolumes/" in (s.path or "")]
        evidence.append(
            f"holds {len(vol.nested)} btrfs subvolume(s), {len(ro)} read-only"
            + (
                f"; {len(layered)} under _data/btrfs/subvolumes/, the layout of a Docker "
                "daemon's data root (docker-in-docker)"
                if layered
                else ""
            )
        )
        if not rmdir_ok:
            evidence.append(
                "this kernel cannot remove subvolumes with rmdir (Linux < 4.18): "
                "`docker volume rm` and `rm -rf` fail on it with EPERM"
            )
        if ro:
            evidence.append(
                f"{len(ro)} nested subvolume(s) are read-only: rm fails with EROFS on any kernel"
            )
        evidence.append(f"space held in nested subvolumes: {_human(vol.exclusive_bytes)}")
    else:
        evidence.append("holds no btrfs subvolume: `docker volume prune` would remove it")
    if age is not None:
        evidence.append(f"age {_age_text(age)}")
    blocked.extend(_too_young(age, min_age))
    return Finding(
        id=finding_id(kind, f"volume\0{rec.name}"),
        kind=kind,
        target_type="volume",
        name=rec.name,
        target_id=None,
        path=rec.mountpoint,
        fs_uuid=fs_uuid,
        subvolume_ids=subvolume_ids,
        reclaimable_bytes=reclaimable,
        evidence=tuple(evidence),
        blocked_by=tuple(blocked),
        age_seconds=age,
        generations=tuple((s.id, s.generation) for s in vol.nested),
    )


def _orphan_finding(
    snap: Snapshot,
    sv: SubvolView,
    now: datetime,
    pathmap: PathMap,
    created_at: dict[tuple[str, int], datetime | None],
    min_age: int,
    protect_labels: Sequence[str],
) -> Finding:
    refs = snap.refs
    created = created_at.get((sv.fs_uuid, sv.id))
    age = max(0, int((now - created).total_seconds())) if created else None
    evidence = [
        f"subvolume {sv.id} at {sv.path}, in the Docker daemon's own btrfs/subvolumes/",
        f"referenced by none of {len(refs.image_cache_ids)} image layer(s), "
        f"{len(refs.container_mount_ids)} container layer(s) and "
        f"{len(refs.container_init_ids)} init layer(s) in image/btrfs/layerdb",
        f"generation {sv.generation}, {'read-only' if sv.read_only else 'writable'}",
        f"space: {_human(sv.exclusive_bytes)}",
    ]
    if created:
        evidence.append(f"created {created.isoformat()} ({_age_text(age or 0)} ago)")
    else:
        evidence.append("creation time unknown on this kernel")
    blocked: list[str] = []
    subtree = snap.subtree(sv.fs_uuid, sv.id)
    reclaimable: int | None = None
    try:
        ds = plan_subvolume_delete(
            snap, sv.fs_uuid, sv.id, pathmap=pathmap, protect_labels=protect_labels
        )
        reclaimable = ds.reclaimable_bytes
        subtree = list(ds.subvolumes)
    except Refused as exc:
        blocked.append(_blocked(exc))
    if len(subtree) > 1:
        evidence.append(f"{len(subtree) - 1} subvolume(s) nested inside it go with it")
    blocked.extend(_too_young(age, min_age))
    return Finding(
        id=finding_id("orphan-layer", f"subvolume\0{sv.fs_uuid}\0{sv.uuid or sv.id}"),
        kind="orphan-layer",
        target_type="subvolume",
        name=sv.owner_ref,
        target_id=sv.id,
        path=sv.path,
        fs_uuid=sv.fs_uuid,
        subvolume_ids=tuple(s.id for s in subtree),
        reclaimable_bytes=reclaimable,
        evidence=tuple(evidence),
        blocked_by=tuple(blocked),
        age_seconds=age,
        generations=tuple((s.id, s.generation) for s in subtree),
    )
