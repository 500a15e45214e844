"""Leftovers worth a person's attention, with the evidence that makes them so.

- ``dind-volume``: a volume no container uses (running or stopped) holding btrfs
  subvolumes: a docker-in-docker daemon's data root left behind. A volume someone named
  (``-v ci-cache:/var/lib/docker``) is reported too, marked ``named``: plans leave it
  alone unless the policy includes named volumes or names the finding.
- ``orphan-layer``: a subvolume in ``<data_root>/btrfs/subvolumes/`` that no image
  layer, container layer or init layer in Docker's layerdb references.
- ``dangling-volume``: an anonymous volume no container uses that holds no subvolume
  (what ``docker volume prune`` handles). Named volumes are never reported as dangling.
- ``orphan-layer-folder``: a plain folder (not a subvolume) in ``btrfs/subvolumes/``
  that no layer references: what copying ``@docker`` to another volume leaves.
- ``layer-folder``: a plain folder there that a layer *does* reference: Docker's btrfs
  driver can no longer remove it ("Failed to destroy btrfs snapshot ...: invalid
  argument"). Never cleaned; the evidence says what a person can do.
- ``stale-qgroups``: level-0 qgroups whose subvolume is gone (kernels before 6.11 leave
  them behind; thousands slow quota accounting down).

Ages: a volume's age counts from its last write (``VolumeView.last_write``: see
``agent.domain.snapshot``), never from its creation alone; an orphan's from its last
change (the subvolume's creation or the last name created, renamed or removed in it),
and never less than ``ORPHAN_MIN_AGE_FLOOR_SECONDS`` whatever a request asks.

``blocked_by`` lists what stops a finding from being cleaned now; the same safety
module that guards every delete decides it, so a finding is never shown as cleanable
when a delete of it would be refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agent.domain.safety import (
    plan_folder_delete,
    plan_qgroup_destroy,
    plan_subvolume_delete,
    plan_volume_delete,
)
from agent.domain.snapshot import FsView, LayerFolder, Snapshot, SubvolView, VolumeView
from agent.errors import Refused, Unavailable
from shared.policy import (
    DEFAULT_MIN_AGE_SECONDS,
    DEFAULT_PROTECT_LABELS,
    FINDING_KINDS,
    ORPHAN_MIN_AGE_FLOOR_SECONDS,
)
from shared.wirepath import from_wire, path_fields


@dataclass(frozen=True)
class Target:
    """What a finding (and the action that cleans it) is about."""

    type: str  # volume | subvolume | folder | filesystem
    name: str | None
    id: int | None
    path: str | None  # host path

    def to_json(self) -> dict[str, Any]:
        """Name and path as ``shared.wirepath`` puts them (text + base64 of the exact
        bytes when they are not UTF-8): what JSON, and so the state store, can hold."""
        return {
            "type": self.type,
            **path_fields(self.name, "name"),
            "id": self.id,
            **path_fields(self.path),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Target:
        return cls(
            type=str(data["type"]),
            name=_unwire(data, "name"),
            id=data.get("id"),
            path=_unwire(data, "path"),
        )


def _unwire(data: Mapping[str, Any], key: str) -> str | None:
    text = data.get(key)
    return None if text is None else from_wire(text, data.get(f"{key}_b64"))


@dataclass(frozen=True)
class Finding:
    id: str
    kind: str
    target: Target
    fs_uuid: str | None
    subvolume_ids: tuple[int, ...]  # what a clean-up deletes, children first
    reclaimable_bytes: int | None
    evidence: tuple[str, ...]
    blocked_by: tuple[str, ...]
    age_seconds: int | None
    generations: tuple[tuple[int, int], ...]  # (id, generation) when found
    named: bool = False  # a volume someone named: planned only when asked for
    qgroup_ids: tuple[int, ...] = ()  # stale-qgroups: the level-0 qgroups
    # which folder a volume is (``VolumeView.identity``): one removed and made again
    # under the same name is another
    volume_identity: str | None = None


def finding_id(kind: str, key: str) -> str:
    """Stable for the same kind and target."""
    digest = hashlib.sha256(f"{kind}\0{key}".encode("utf-8", "surrogateescape")).hexdigest()
    return f"{kind}-{digest[:16]}"


def human_bytes(n: int | None) -> str:
    if n is None:
        return "unknown size (btrfs quotas are off)"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def age_text(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


def _blocked(exc: Refused | Unavailable) -> str:
    return f"{exc.code}: {exc.detail}"


def _too_young(age: int | None, min_age: int, what: str = "old") -> list[str]:
    if age is None or age >= min_age:
        return []
    return [f"too_young: {age_text(age)} {what}, the minimum age is {age_text(min_age)}"]


def _age(now: datetime, *times: datetime | None) -> int | None:
    known = [t for t in times if t is not None]
    if not known:
        return None
    return max(0, int((now - max(known)).total_seconds()))


def compute_findings(
    snap: Snapshot,
    *,
    now: datetime,
    created_at: Mapping[tuple[str, int], datetime | None],
    rmdir_deletes_subvolumes: bool,
    min_age_seconds: int = DEFAULT_MIN_AGE_SECONDS,
    protect_labels: Sequence[str] = DEFAULT_PROTECT_LABELS,
    kinds: Sequence[str] = FINDING_KINDS,
    orphan_floor_seconds: int = ORPHAN_MIN_AGE_FLOOR_SECONDS,
) -> list[Finding]:
    """Every finding of the asked kinds. ``created_at`` gives creation times of the
    orphan candidates where the snapshot lacks them (the caller asks the btrfs side
    for just those). ``orphan_floor_seconds``: the least age of a cleanable orphan,
    whatever ``min_age_seconds`` says (the agent's configuration sets it)."""
    out: list[Finding] = []
    ctx = _Ctx(
        snap,
        now,
        min_age_seconds,
        tuple(protect_labels),
        rmdir_deletes_subvolumes,
        orphan_floor_seconds,
    )
    for vol in sorted(snap.volumes.values(), key=lambda v: v.name):
        if vol.in_use_by:
            continue
        kind = "dind-volume" if vol.nested else "dangling-volume"
        if kind == "dangling-volume" and not vol.record.anonymous:
            continue  # a named volume is someone's choice, not a leftover
        if kind in kinds:
            out.append(_volume_finding(ctx, vol, kind))
    if "orphan-layer" in kinds and snap.layerdb_known:
        for uuid in sorted(snap.subvolumes):
            for sv in sorted(snap.subvolumes[uuid].values(), key=lambda s: s.id):
                if sv.owner_kind == "orphan-layer":
                    out.append(_orphan_finding(ctx, sv, created_at.get((sv.fs_uuid, sv.id))))
    if snap.layerdb_known and ("orphan-layer-folder" in kinds or "layer-folder" in kinds):
        for folder in snap.layer_folders:
            kind = "layer-folder" if folder.referenced_by else "orphan-layer-folder"
            if kind in kinds:
                out.append(_folder_finding(ctx, folder, kind))
    if "stale-qgroups" in kinds:
        for fs in sorted(snap.filesystems.values(), key=lambda f: f.uuid):
            if fs.stale_qgroups:
                out.append(_qgroup_finding(ctx, fs))
    return out


@dataclass(frozen=True)
class _Ctx:
    snap: Snapshot
    now: datetime
    min_age: int
    protect_labels: tuple[str, ...]
    rmdir_ok: bool
    orphan_floor: int


def _volume_finding(ctx: _Ctx, vol: VolumeView, kind: str) -> Finding:
    rec = vol.record
    age = _age(ctx.now, vol.last_write or rec.created_at)
    evidence = [
        f"{'anonymous' if rec.anonymous else 'named'} volume {rec.name} "
        f"(driver {rec.driver}) at {rec.mountpoint}"
        + (f", created {rec.created_at.isoformat()}" if rec.created_at else ""),
        "used by no container, running or stopped",
    ]
    if not rec.anonymous:
        evidence.append(
            "someone chose this name (e.g. a cache kept between runs): plans leave it alone "
            "unless they include named volumes or name this finding"
        )
    blocked: list[str] = []
    subvolume_ids: tuple[int, ...] = ()
    reclaimable: int | None = None
    fs_uuid: str | None = None
    try:
        ds = plan_volume_delete(ctx.snap, rec.name, protect_labels=ctx.protect_labels)
        subvolume_ids = tuple(s.id for s in ds.subvolumes)
        reclaimable = ds.reclaimable_bytes if ds.subvolumes else None
        fs_uuid = ds.fs_uuid or None
    except (Refused, Unavailable) as exc:
        blocked.append(_blocked(exc))
        subvolume_ids = tuple(s.id for s in ctx.snap.delete_order(vol.nested))
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
        if not ctx.rmdir_ok:
            evidence.append(
                "this kernel cannot remove subvolumes with rmdir (Linux < 4.18): "
                "`docker volume rm` and `rm -rf` fail on it with EPERM"
            )
        if ro:
            evidence.append(
                f"{len(ro)} nested subvolume(s) are read-only: rm fails with EROFS on any kernel"
            )
        evidence.append(f"space held in nested subvolumes: {human_bytes(vol.exclusive_bytes)}")
    else:
        evidence.append("holds no btrfs subvolume: `docker volume prune` would remove it")
    if vol.last_write is not None:
        evidence.append(
            f"last written {vol.last_write.isoformat()}: the newest of its creation, its "
            "subvolumes' creation and last change, and the folders at the top of its data"
        )
    if age is not None:
        evidence.append(f"age {age_text(age)} (since the last write)")
    blocked.extend(_too_young(age, ctx.min_age, "since the last write"))
    return Finding(
        id=finding_id(kind, f"volume\0{rec.name}"),
        kind=kind,
        target=Target("volume", rec.name, None, rec.mountpoint),
        fs_uuid=fs_uuid,
        subvolume_ids=subvolume_ids,
        reclaimable_bytes=reclaimable,
        evidence=tuple(evidence),
        blocked_by=tuple(blocked),
        age_seconds=age,
        generations=tuple((s.id, s.generation) for s in vol.nested),
        named=not rec.anonymous,
        volume_identity=vol.identity,
    )


def _layer_refs_text(snap: Snapshot) -> str:
    refs = snap.refs
    return (
        f"{len(refs.image_cache_ids)} image layer(s), {len(refs.container_mount_ids)} "
        f"container layer(s) and {len(refs.container_init_ids)} init layer(s) in "
        "image/btrfs/layerdb"
    )


def _orphan_finding(ctx: _Ctx, sv: SubvolView, created_fallback: datetime | None) -> Finding:
    created = sv.created_at or created_fallback
    age = _age(ctx.now, created, sv.changed_at)
    evidence = [
        f"subvolume {sv.id} at {sv.path}, in the Docker daemon's own btrfs/subvolumes/",
        f"referenced by none of {_layer_refs_text(ctx.snap)}",
        f"generation {sv.generation}, {'read-only' if sv.read_only else 'writable'}",
        f"space: {human_bytes(sv.exclusive_bytes)}",
    ]
    if created:
        evidence.append(f"created {created.isoformat()}")
    else:
        evidence.append("creation time unknown on this kernel")
    if sv.changed_at:
        evidence.append(f"last changed {sv.changed_at.isoformat()}")
    blocked: list[str] = []
    subtree = ctx.snap.subtree(sv.fs_uuid, sv.id)
    reclaimable: int | None = None
    try:
        # the finding blocks on its age itself (the policy's and the floor, below)
        ds = plan_subvolume_delete(
            ctx.snap, sv.fs_uuid, sv.id, protect_labels=ctx.protect_labels, orphan_floor=0
        )
        reclaimable = ds.reclaimable_bytes
        subtree = list(ds.subvolumes)
    except (Refused, Unavailable) as exc:
        blocked.append(_blocked(exc))
    if len(subtree) > 1:
        evidence.append(f"{len(subtree) - 1} subvolume(s) nested inside it go with it")
    min_age = max(ctx.min_age, ctx.orphan_floor)
    if age is None:
        blocked.append(
            "too_young: its age is unknown, and a layer Docker is still writing looks orphaned"
        )
    blocked.extend(_too_young(age, min_age, "since its last change"))
    return Finding(
        id=finding_id("orphan-layer", f"subvolume\0{sv.fs_uuid}\0{sv.uuid or sv.id}"),
        kind="orphan-layer",
        target=Target("subvolume", sv.owner_ref, sv.id, sv.path),
        fs_uuid=sv.fs_uuid,
        subvolume_ids=tuple(s.id for s in subtree),
        reclaimable_bytes=reclaimable,
        evidence=tuple(evidence),
        blocked_by=tuple(blocked),
        age_seconds=age,
        generations=tuple((s.id, s.generation) for s in subtree),
    )


def _folder_finding(ctx: _Ctx, folder: LayerFolder, kind: str) -> Finding:
    age = _age(ctx.now, folder.changed_at)
    evidence = [
        f"{folder.path} is a plain folder, not a btrfs subvolume, in the Docker daemon's "
        "own btrfs/subvolumes/ (what copying Docker's data root to another volume leaves)",
    ]
    blocked: list[str] = []
    if kind == "layer-folder":
        evidence += [
            f"{folder.referenced_by} references it: Docker's btrfs driver removes layers as "
            "subvolumes, so removing what uses it fails with 'Failed to destroy btrfs "
            "snapshot ...: invalid argument', and Docker can no longer manage it",
            "what you can do: with Docker stopped, put a subvolume holding the same files in "
            f"its place (`btrfs subvolume create {folder.name}.new`, `cp -a --reflink=auto "
            f"{folder.name}/. {folder.name}.new/`, `mv {folder.name} {folder.name}.old`, "
            f"`mv {folder.name}.new {folder.name}`), start Docker, then remove "
            f"{folder.name}.old",
        ]
        blocked.append("protected: a layer Docker references; never removed by this agent")
    else:
        evidence.append(f"referenced by none of {_layer_refs_text(ctx.snap)}")
        try:
            plan_folder_delete(ctx.snap, folder.path, protect_labels=ctx.protect_labels)
        except (Refused, Unavailable) as exc:
            blocked.append(_blocked(exc))
    if folder.changed_at:
        evidence.append(f"last changed {folder.changed_at.isoformat()}")
    blocked.extend(_too_young(age, max(ctx.min_age, ctx.orphan_floor), "since its last change"))
    return Finding(
        id=finding_id(kind, f"folder\0{folder.path}"),
        kind=kind,
        target=Target("folder", folder.name, None, folder.path),
        fs_uuid=folder.fs_uuid,
        subvolume_ids=(),
        reclaimable_bytes=None,
        evidence=tuple(evidence),
        blocked_by=tuple(blocked),
        age_seconds=age,
        generations=(),
    )


def _qgroup_finding(ctx: _Ctx, fs: FsView) -> Finding:
    ids = fs.stale_qgroups
    sample = ", ".join(f"0/{i}" for i in ids[:10]) + (" ..." if len(ids) > 10 else "")
    evidence = [
        f"{len(ids)} level-0 qgroup(s) of filesystem {fs.uuid} belong to no subvolume: {sample}",
        "kernels before 6.11 leave a deleted subvolume's qgroup behind; many of them slow "
        "quota accounting down. Destroying them frees no space",
    ]
    blocked: list[str] = []
    try:
        plan_qgroup_destroy(ctx.snap, fs.uuid, ids)
    except (Refused, Unavailable) as exc:
        blocked.append(_blocked(exc))
    return Finding(
        id=finding_id("stale-qgroups", f"filesystem\0{fs.uuid}"),
        kind="stale-qgroups",
        target=Target("filesystem", fs.label, None, fs.mountpoints[0] if fs.mountpoints else None),
        fs_uuid=fs.uuid,
        subvolume_ids=(),
        reclaimable_bytes=0,
        evidence=tuple(evidence),
        blocked_by=tuple(blocked),
        age_seconds=None,
        generations=(),
        qgroup_ids=ids,
    )
