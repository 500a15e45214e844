"""The safety rules, in one place that every delete goes through (direct DELETE, plan
building and every action of a job, re-checked right before it runs).

Rules (the contract's numbering):
1. Only under the configured roots: clean absolute paths, no symlink on the way, not
   a root itself.
2. Never subvolume 5, the default subvolume, a mount point (or anything with a mount
   inside it), anything a container uses, a layer Docker references, a volume whose
   labels protect it (``keep`` and ``nas-janitor.keep`` always do), or a named volume
   that holds no subvolume.
3. Children before parents (``Snapshot.delete_order``); the executor uses the btrfs
   subvolume-destroy operation only.

Each check raises a ``Refused`` subclass that the API maps to ``409`` with its code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agent.domain.paths import VOLUME_NAME, PathMap, PathRefused, check_abs, is_under, under_any
from agent.domain.snapshot import TOP_LEVEL_ID, Snapshot, SubvolView, VolumeView, protected_reason
from agent.errors import InUse, NotFound, OutsideRoots, Protected, ValidationFailed


@dataclass(frozen=True)
class DeleteSet:
    """What a delete would remove, children first, and which read-only flags it must
    clear on the way (parents of something that goes)."""

    fs_uuid: str
    subvolumes: tuple[SubvolView, ...]
    clear_readonly: tuple[SubvolView, ...]
    volume: VolumeView | None = None

    @property
    def reclaimable_bytes(self) -> int | None:
        sizes = [s.exclusive_bytes for s in self.subvolumes]
        if any(x is None for x in sizes):
            return None
        return sum(x or 0 for x in sizes)


def _check_path(snap: Snapshot, sv: SubvolView, pathmap: PathMap) -> str:
    if sv.path is None:
        raise OutsideRoots(f"subvolume {sv.id} is not visible under any mount of the agent")
    try:
        path = check_abs(sv.path)
    except PathRefused as exc:
        raise OutsideRoots(f"subvolume {sv.id}: {exc}") from None
    if not under_any(path, snap.roots):
        raise OutsideRoots(f"{path} is outside the configured roots {list(snap.roots)}")
    if any(path == r.rstrip("/") for r in snap.roots):
        raise Protected(f"{path} is a configured root itself")
    if not pathmap.symlink_free(path, snap.path_memo):
        raise OutsideRoots(f"{path} goes through a symbolic link")
    return path


def _check_subvolume(
    snap: Snapshot,
    sv: SubvolView,
    pathmap: PathMap,
    protect_labels: Sequence[str],
    *,
    own_volume: str | None = None,
) -> None:
    fs = snap.filesystems[sv.fs_uuid]
    if sv.id == TOP_LEVEL_ID:
        raise Protected("subvolume 5 is the filesystem's top level")
    if sv.id == fs.default_id:
        raise Protected(f"subvolume {sv.id} is the filesystem's default subvolume")
    path = _check_path(snap, sv, pathmap)
    if path in snap.mountpoints:
        raise Protected(f"{path} is a mount point")
    mounted = {r for (u, r) in snap.mounted_roots if u == sv.fs_uuid and r != "/"}
    if mounted and sv.local_path is not None:
        in_fs = _in_fs_path(snap, sv)
        if in_fs in mounted:
            raise Protected(f"subvolume {sv.id} is mounted elsewhere (subvol={in_fs})")
    for mp in snap.mountpoints:
        if is_under(mp, path) and mp != path:
            raise InUse(f"{mp} is mounted inside {path}")
    if sv.owner_kind == "docker-layer":
        raise Protected(f"{path} is a Docker layer that an image or container references")
    if sv.owner_kind == "docker-volume" and sv.owner_ref and sv.owner_ref != own_volume:
        vol = snap.volumes.get(sv.owner_ref)
        if vol is not None:
            _check_volume_usable(vol, protect_labels)


def _in_fs_path(snap: Snapshot, sv: SubvolView) -> str | None:
    fs = snap.filesystems[sv.fs_uuid]
    if sv.local_path is None:
        return None
    for m in fs.mounts:
        if is_under(sv.local_path, m.mountpoint):
            rest = sv.local_path[len(m.mountpoint) :]
            root = m.root.rstrip("/")
            return (root + rest) or "/"
    return None


def _check_volume_usable(vol: VolumeView, protect_labels: Sequence[str]) -> None:
    if vol.in_use_by:
        ids = ", ".join(c[:12] for c in vol.in_use_by)
        raise InUse(f"volume {vol.name} is used by container(s) {ids}")
    reason = protected_reason(vol.record.labels, protect_labels)
    if reason:
        raise Protected(f"volume {vol.name} is protected by its {reason}")


def _readonly_parents(snap: Snapshot, subs: Sequence[SubvolView]) -> tuple[SubvolView, ...]:
    out: dict[int, SubvolView] = {}
    for sv in subs:
        parent = snap.subvolume(sv.fs_uuid, sv.parent_id)
        if parent is not None and parent.read_only:
            out[parent.id] = parent
    return tuple(out[k] for k in sorted(out))


def plan_subvolume_delete(
    snap: Snapshot,
    fs_uuid: str,
    sub_id: int,
    *,
    pathmap: PathMap,
    protect_labels: Sequence[str],
) -> DeleteSet:
    """Check every rule for deleting a subvolume and all nested in it."""
    if fs_uuid not in snap.filesystems:
        raise NotFound(f"no btrfs filesystem with uuid {fs_uuid}")
    sv = snap.subvolume(fs_uuid, sub_id)
    if sv is None:
        if sub_id == TOP_LEVEL_ID:
            raise Protected("subvolume 5 is the filesystem's top level")
        raise NotFound(f"no subvolume {sub_id} on filesystem {fs_uuid}")
    subtree = snap.subtree(fs_uuid, sub_id)
    for member in subtree:
        _check_subvolume(snap, member, pathmap, protect_labels)
    ordered = tuple(snap.delete_order(subtree))
    parent = snap.subvolume(fs_uuid, sv.parent_id)
    if parent is not None and parent.read_only and parent.id != TOP_LEVEL_ID:
        # The parent stays, but a read-only parent refuses the delete (EROFS): its flag
        # is cleared for the delete and set again afterwards; it must itself be ours.
        _check_path(snap, parent, pathmap)
    return DeleteSet(
        fs_uuid=fs_uuid, subvolumes=ordered, clear_readonly=_readonly_parents(snap, ordered)
    )


def plan_volume_delete(
    snap: Snapshot,
    name: str,
    *,
    pathmap: PathMap,
    protect_labels: Sequence[str],
) -> DeleteSet:
    """Check every rule for removing a volume with the subvolumes nested in it."""
    if not VOLUME_NAME.match(name):
        raise ValidationFailed("invalid volume name", errors={"name": ["not a Docker volume name"]})
    vol = snap.volumes.get(name)
    if vol is None:
        raise NotFound(f"no volume named {name}")
    _check_volume_usable(vol, protect_labels)
    if not vol.nested and not vol.record.anonymous:
        # Someone chose this name and it holds no subvolume: nothing Docker cannot
        # remove itself, and nothing a leak leaves behind.
        raise Protected(
            f"volume {name} is a named volume holding no btrfs subvolume: not a leftover "
            "this agent removes (`docker volume rm` can, if that is what you want)"
        )
    try:
        mountpoint = check_abs(vol.record.mountpoint)
    except PathRefused as exc:
        raise OutsideRoots(f"volume {name}: {exc}") from None
    if not under_any(mountpoint, snap.roots):
        raise OutsideRoots(f"volume {name} lives at {mountpoint}, outside the configured roots")
    if not pathmap.symlink_free(mountpoint, snap.path_memo):
        raise OutsideRoots(f"{mountpoint} goes through a symbolic link")
    for mp in snap.mountpoints:
        if is_under(mp, mountpoint):
            raise InUse(f"{mp} is mounted inside volume {name}")
    members: dict[tuple[str, int], SubvolView] = {}
    for sv in vol.nested:
        for member in snap.subtree(sv.fs_uuid, sv.id):
            members[(member.fs_uuid, member.id)] = member
    fs_uuids = {k[0] for k in members}
    if len(fs_uuids) > 1:
        raise Protected(f"volume {name} spans several filesystems; refusing")
    for member in members.values():
        _check_subvolume(snap, member, pathmap, protect_labels, own_volume=name)
    ordered = tuple(snap.delete_order(members.values()))
    fs_uuid = next(iter(fs_uuids)) if fs_uuids else ""
    if not fs_uuid:
        fs = snap.fs_for_host_path(mountpoint)
        fs_uuid = fs.uuid if fs else ""
    return DeleteSet(
        fs_uuid=fs_uuid,
        subvolumes=ordered,
        clear_readonly=_readonly_parents(snap, ordered),
        volume=vol,
    )
