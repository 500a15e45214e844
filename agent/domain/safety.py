"""The safety rules, in one place that every delete goes through (direct DELETE, plan
building, and every action of a job, checked again right before it runs).

Rules (the contract's numbering):
1. Only under the configured roots: clean absolute paths, no symlink on the way, not a
   root itself.
2. Never subvolume 5, the default subvolume, a layer Docker references, a volume whose
   labels protect it (``keep`` and ``nas-janitor.keep`` always do) or that holds a
   docker-in-docker daemon's volume so labelled (``_check_inner_volumes``), or a named
   volume that holds no subvolume. Never anything in use:
   - nothing mounted at or inside the target, of any filesystem type, in the host's
     mount namespace, the agent's, or any other (a service with private mounts, a
     container: removing the folder a mount sits on detaches it there)
     (``check_no_mounts``);
   - nothing of the target mounted elsewhere: a ``subvol=`` or bind mount of it or of
     anything inside it (found by what each mount of the same filesystem shows);
   - no container, running or stopped, that mounts the target, something inside it,
     or a folder holding it, as a volume or a bind mount (``check_no_container_uses``);
   - nothing held open inside the target, placed in its filesystem by the holder's
     mount table (``check_not_held``): no process's working folder, root, program,
     open or mapped file (``held_by_process``), no loop device's backing file, active
     swap file or overlay mount's folder (``held_by_kernel``);
   - when the host's mount table, or what is held open, cannot be read, nothing at all.
3. Children before parents (``Snapshot.delete_order``); the executor uses the btrfs
   subvolume-destroy operation for subvolumes, and removes plain files only through
   ``agent.host.files.remove_tree``, which never crosses a mount.

Each check raises a ``Refused`` subclass that the API maps to ``409`` with its code, or
``HostMountsUnavailable`` (503) when what it needs to see cannot be seen.
"""

from __future__ import annotations

import functools
import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from agent.domain.mounts import MountIndex, UseIndex
from agent.domain.paths import VOLUME_NAME, PathRefused, check_abs, is_under
from agent.domain.snapshot import TOP_LEVEL_ID, LayerFolder, Snapshot, SubvolView, VolumeView
from agent.errors import (
    HeldByKernel,
    HeldByProcess,
    HoldersUnavailable,
    HostMountsUnavailable,
    InUse,
    NotFound,
    OutsideRoots,
    Protected,
    TooYoung,
    ValidationFailed,
)
from shared.policy import ORPHAN_MIN_AGE_FLOOR_SECONDS, protected_reason


@dataclass(frozen=True)
class DeleteSet:
    """What a delete would remove, children first, and which read-only flags it must
    clear on the way (parents of something that goes). ``folder``: a plain folder
    removed as a whole (an orphan layer folder). ``guard``: the paths (host) that must
    hold no mount, no container use and nothing held open right before each step."""

    fs_uuid: str
    subvolumes: tuple[SubvolView, ...]
    clear_readonly: tuple[SubvolView, ...]
    volume: VolumeView | None = None
    folder: LayerFolder | None = None
    qgroup_ids: tuple[int, ...] = ()  # stale level-0 qgroups to destroy
    guard: tuple[tuple[str, str, str | None], ...] = ()  # (host path, fs dev, in-fs path)

    @property
    def reclaimable_bytes(self) -> int | None:
        sizes = [s.exclusive_bytes for s in self.subvolumes]
        if any(x is None for x in sizes):
            return None
        return sum(x or 0 for x in sizes)


# ---------------------------------------------------------------------- the checks


def _check_root_path(snap: Snapshot, path: str, what: str | int) -> str:
    """``what``: the path's owner in words, or a subvolume's id (put in words only for
    an error: this runs once per subvolume a plan touches)."""
    try:
        path = check_abs(path)
    except PathRefused as exc:
        named = what if isinstance(what, str) else f"subvolume {what}"
        raise OutsideRoots(f"{named}: {exc}") from None
    if not snap.under_roots(path):
        raise OutsideRoots(f"{path} is outside the configured roots {list(snap.roots)}")
    if path in snap.root_paths:
        raise Protected(f"{path} is a configured root itself")
    if not snap.pathmap.symlink_free(path, snap.path_memo, normal=True):
        raise OutsideRoots(f"{path} goes through a symbolic link")
    return path


def _check_path(snap: Snapshot, sv: SubvolView) -> str:
    if sv.path is None:
        raise OutsideRoots(
            f"subvolume {sv.id}: its path is not known for sure (not visible under any mount "
            "of the agent, or longer than the kernel reports)"
        )
    return _check_root_path(snap, sv.path, sv.id)


def check_no_mounts(
    mounts: MountIndex, path: str, *, dev: str, in_fs: str | None, what: str | None = None
) -> None:
    """Nothing is mounted at or inside ``path`` (a host path), in the host's mount
    namespace or this process's, whatever the filesystem type, nor in any other mount
    namespace (found by what each of its mounts sits on: ``in_fs`` is the path's place
    inside filesystem ``dev``); and nothing of it is mounted elsewhere, in any
    namespace (a ``subvol=`` or bind mount of it or of anything inside it, found by
    what each mount of the same filesystem shows)."""
    what = what or path
    if not mounts.known:
        raise HostMountsUnavailable(
            f"cannot tell what is mounted inside {what}: {mounts.unknown_reason}"
        )
    for m in mounts.at_or_under(path):
        if m.mountpoint.rstrip("/") == path.rstrip("/"):
            raise Protected(f"{what} is a mount point: {m.describe()}")
        raise InUse(f"{m.describe()} is mounted inside {what}")
    if in_fs is None:
        raise Protected(f"{what}: where it lies inside its filesystem is not known")
    if dev:
        for f in mounts.sitting_in(dev, in_fs):
            raise InUse(f"{f.describe()} is mounted inside {what}")
        for shower in mounts.exposing(dev, in_fs):
            shown = "it" if shower.root.rstrip("/") == in_fs.rstrip("/") else shower.root
            raise Protected(f"{what} is also mounted elsewhere: {shown} at {shower.place()}")


def check_not_held(mounts: MountIndex, path: str, *, dev: str, in_fs: str | None) -> None:
    """Nothing that processes or the kernel hold open lies at or inside ``path``: its
    place inside filesystem ``dev`` is ``in_fs``, and each held path is placed by the
    mount table of its holder's namespace (``agent.domain.holders``). A process first
    (``HeldByProcess``), else the kernel (``HeldByKernel``)."""
    held = mounts.held
    if not held.known:
        raise HoldersUnavailable(
            f"cannot tell what is held open inside {path}: {held.unknown_reason}"
        )
    if in_fs is None or not dev:
        raise Protected(f"{path}: where it lies inside its filesystem is not known")
    found = held.inside(dev, in_fs)
    if not found:
        return
    found.sort(key=lambda p: (p.kernel, p.in_fs))
    more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
    text = "; ".join(p.describe() for p in found[:3]) + more + f", inside {path}"
    raise (HeldByKernel if found[0].kernel else HeldByProcess)(text)


def check_no_container_uses(uses: UseIndex, path: str, *, wide: Sequence[str]) -> None:
    """No container (running or stopped) mounts ``path``, something inside it, or a
    folder holding it, as a volume or a bind mount. A container that mounts all of
    Docker's data root or a configured root (``wide``: a monitoring or backup container)
    sees everything but uses nothing in particular: it does not block."""
    found = uses.overlapping(path, wide=wide)
    if found:
        more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
        raise InUse("; ".join(u.describe() for u in found[:3]) + more)


def check_guard(
    snap: Snapshot,
    guard: Sequence[tuple[str, str, str | None]],
    mounts: MountIndex,
    uses: UseIndex | None = None,
) -> None:
    """Every guarded path holds no container use, no mount and nothing held open,
    against ``uses`` and ``mounts`` (read right now; the snapshot's uses by default).
    Containers first: a container's bind mount is also a mount of its namespace, and
    its name says more; then mounts (a process inside a mount inside the target is
    told by the mount)."""
    for path, dev, in_fs in guard:
        check_no_container_uses(uses or snap.uses, path, wide=snap.wide_paths())
        check_no_mounts(mounts, path, dev=dev, in_fs=in_fs)
        check_on_the_filesystem(mounts, path, dev=dev)
        check_not_held(mounts, path, dev=dev, in_fs=in_fs)


def check_on_the_filesystem(mounts: MountIndex, path: str, *, dev: str) -> None:
    """``path`` lies on the btrfs filesystem ``dev`` it is placed in: the mount that
    covers it is one of that filesystem. A folder on another disk mounted over it (a
    volumes folder bind-mounted from an ext4 disk) is refused: what holds or shows it is
    looked for in the wrong filesystem, and it is no btrfs leftover."""
    for m in mounts.covering(path):
        if m.dev != dev:
            raise Protected(
                f"{path} is not on the btrfs filesystem it is placed in: it lies on "
                f"{m.fstype} from {m.source} mounted at {m.mountpoint}"
            )


def _guard_entry(snap: Snapshot, fs_uuid: str, path: str) -> tuple[str, str, str | None]:
    fs = snap.filesystems.get(fs_uuid)
    return (path, fs.dev if fs else "", in_fs_path(snap, fs_uuid, path))


def _check_member(
    snap: Snapshot,
    sv: SubvolView,
    protect_labels: Sequence[str],
    *,
    own_volume: str | None = None,
) -> None:
    """A subvolume that a delete would destroy (the target or one nested in it)."""
    _check_members(snap, (sv,), protect_labels, own_volume=own_volume)


def _check_members(
    snap: Snapshot,
    members: Iterable[SubvolView],
    protect_labels: Sequence[str],
    *,
    own_volume: str | None = None,
) -> None:
    """``_check_member`` of each of ``members``, in their order (the first refused
    raises): one loop, what they share looked up once."""
    filesystems = snap.filesystems
    layer_dirs = _layer_dir_of(snap.docker.data_root)
    for sv in members:
        fs = filesystems[sv.fs_uuid]
        if sv.id == TOP_LEVEL_ID:
            raise Protected("subvolume 5 is the filesystem's top level")
        if sv.id == fs.default_id:
            raise Protected(f"subvolume {sv.id} is the filesystem's default subvolume")
        path = _check_path(snap, sv)
        if sv.owner_kind == "docker-layer":
            raise Protected(f"{path} is a Docker layer that an image or container references")
        layer = _layer_in(path, layer_dirs)
        if layer is not None and not snap.layerdb_known:
            raise Protected(
                f"{path} is in Docker's layers folder, and Docker's layer records cannot be "
                "read (none yet, or unreadable): a layer being written cannot be told from "
                "an orphan"
            )
        if layer is not None and layer != path and posixpath.basename(layer) in snap.refs.all:
            # a subvolume made inside a layer, e.g. by a docker-in-docker container that
            # keeps its data in its own (stopped) container layer
            raise Protected(
                f"{path} is inside {layer}, a Docker layer that an image or container references"
            )
        if sv.owner_kind == "docker-volume" and sv.owner_ref and sv.owner_ref != own_volume:
            vol = snap.volumes.get(sv.owner_ref)
            if vol is not None:
                _check_volume_usable(vol, protect_labels)


def in_fs_path(snap: Snapshot, fs_uuid: str, host_path: str) -> str | None:
    """The path inside filesystem ``fs_uuid`` of a host path: through this process's
    deepest mount of it that holds the path (the mount the kernel resolves it by)."""
    fs = snap.filesystems.get(fs_uuid)
    if fs is None:
        return None
    local = snap.pathmap.to_local(host_path)
    best: tuple[int, str] | None = None
    for m in fs.mounts:
        if is_under(local, m.mountpoint) and (best is None or len(m.mountpoint) > best[0]):
            rest = local[len(m.mountpoint.rstrip("/")) :]
            best = (len(m.mountpoint), (m.root.rstrip("/") + rest) or "/")
    return best[1] if best else None


def _check_volume_usable(vol: VolumeView, protect_labels: Sequence[str]) -> None:
    if vol.in_use_by:
        ids = ", ".join(c[:12] for c in vol.in_use_by)
        raise InUse(f"volume {vol.name} is used by container(s) {ids}")
    reason = protected_reason(vol.record.labels, protect_labels)
    if reason:
        raise Protected(f"volume {vol.name} is protected by its {reason}")
    _check_inner_volumes(vol, protect_labels)


def _check_inner_volumes(vol: VolumeView, protect_labels: Sequence[str]) -> None:
    """A volume that was a docker-in-docker daemon's data root holds that daemon's
    volumes: one of them labelled to be kept protects the whole volume, and so does a
    volume store there that cannot be read (a keep label in it cannot be ruled out)."""
    if vol.inner is None:
        return
    for inner in vol.inner.volumes:
        reason = protected_reason(inner.labels, protect_labels)
        if reason:
            raise Protected(
                f"volume {vol.name} holds {inner.name}, a volume of the Docker daemon that "
                f"kept its data there, protected by its {reason}"
            )
    if vol.inner.unreadable:
        _store, why = vol.inner.unreadable[0]
        raise Protected(
            f"volume {vol.name} holds a Docker volume store that cannot be read ({why}): "
            "a volume in it labelled to be kept cannot be ruled out"
        )


def _readonly_parents(snap: Snapshot, subs: Sequence[SubvolView]) -> tuple[SubvolView, ...]:
    out: dict[int, SubvolView] = {}
    by_fs = snap.subvolumes
    for sv in subs:
        parent = by_fs.get(sv.fs_uuid, {}).get(sv.parent_id)
        if parent is not None and parent.read_only:
            out[parent.id] = parent
    return tuple(out[k] for k in sorted(out))


# ---------------------------------------------------------------------- deletes


@functools.lru_cache(maxsize=16)
def _layer_dir_of(data_root: str) -> tuple[str, str, str]:
    """Docker's layers folder for ``data_root``: as joined, without a trailing "/", and
    the start of every path inside it (``is_under`` without its strings per call)."""
    layer_dir = posixpath.join(data_root, "btrfs", "subvolumes")
    base = layer_dir.rstrip("/")
    return layer_dir, base, base + "/"


def _layer_of(snap: Snapshot, path: str) -> str | None:
    """The layer (``<data_root>/btrfs/subvolumes/<name>``) that host path ``path`` is or
    lies in; None when it is in none."""
    return _layer_in(path, _layer_dir_of(snap.docker.data_root))


def _layer_in(path: str, layer_dirs: tuple[str, str, str]) -> str | None:
    """``_layer_of`` with the layers folder given (``_layer_dir_of``)."""
    layer_dir, base, inside = layer_dirs
    if not path.startswith(inside) or path.rstrip("/") == base:
        return None
    name = path[len(base) + 1 :].split("/", 1)[0]
    return posixpath.join(layer_dir, name)


def _ancestor_at(snap: Snapshot, sv: SubvolView, path: str) -> SubvolView | None:
    """The subvolume at host path ``path`` that holds ``sv`` (its parents, upwards)."""
    subs = snap.subvolumes.get(sv.fs_uuid, {})
    cur = subs.get(sv.parent_id)
    for _ in range(len(subs)):
        if cur is None or cur.id == TOP_LEVEL_ID:
            return None
        if cur.path == path:
            return cur
        cur = subs.get(cur.parent_id)
    return None


def _too_young(
    snap: Snapshot, seen: Sequence[datetime | None], floor: int, path: str, what: str
) -> None:
    """``TooYoung`` when ``what`` (in words, about ``path``), whose creation and change
    times are ``seen``, changed less than ``floor`` seconds ago, or when it changed
    cannot be told."""
    times = [t for t in seen if t is not None]
    if not times:
        raise TooYoung(
            f"{path}: when {what} last changed cannot be told, and a layer Docker is still "
            "writing looks orphaned"
        )
    age = int((snap.taken_at - max(times)).total_seconds())
    if age < floor:
        raise TooYoung(
            f"{path}: {what} changed {max(age, 0)} s ago, less than {floor} s: Docker may "
            "be writing it"
        )


def check_orphan_age(snap: Snapshot, sv: SubvolView, floor: int) -> None:
    """An orphan layer (a subvolume in the daemon's ``btrfs/subvolumes/`` that no layer
    record names) goes only once it has not changed for ``floor`` seconds; so does a
    subvolume inside one, and only while the layer holding it has not changed for as
    long: Docker creates a layer's subvolume first and records it when the layer is
    complete, so a layer being pulled, imported or built looks orphaned meanwhile
    (``TooYoung``)."""
    if floor <= 0 or sv.path is None:
        return
    if sv.owner_kind == "orphan-layer":
        _too_young(snap, (sv.created_at, sv.changed_at), floor, sv.path, "this orphan layer")
        return
    layer = _layer_of(snap, sv.path)
    if layer is None or not snap.layerdb_known or posixpath.basename(layer) in snap.refs.all:
        return
    what = f"this subvolume inside orphan layer {layer}"
    _too_young(snap, (sv.created_at, sv.changed_at), floor, sv.path, what)
    holder = _ancestor_at(snap, sv, layer)
    if holder is not None:
        seen: tuple[datetime | None, ...] = (holder.created_at, holder.changed_at)
    else:  # a plain folder (what copying the data root leaves)
        seen = tuple(f.changed_at for f in snap.layer_folders if f.path == layer)
    if seen:
        _too_young(snap, seen, floor, sv.path, f"orphan layer {layer}, which holds it,")


def plan_subvolume_delete(
    snap: Snapshot,
    fs_uuid: str,
    sub_id: int,
    *,
    protect_labels: Sequence[str],
    orphan_floor: int = ORPHAN_MIN_AGE_FLOOR_SECONDS,
) -> DeleteSet:
    """Check every rule for deleting a subvolume and all nested in it; an orphan layer
    among them must not have changed for ``orphan_floor`` seconds (the agent's
    ``orphan_min_age_seconds``; never a request's)."""
    if fs_uuid not in snap.filesystems:
        raise NotFound(f"no btrfs filesystem with uuid {fs_uuid}")
    sv = snap.subvolume(fs_uuid, sub_id)
    if sv is None:
        if sub_id == TOP_LEVEL_ID:
            raise Protected("subvolume 5 is the filesystem's top level")
        raise NotFound(f"no subvolume {sub_id} on filesystem {fs_uuid}")
    subtree = snap.subtree(fs_uuid, sub_id)
    _check_member(snap, sv, protect_labels)
    path = _check_path(snap, sv)
    if is_under(snap.docker.data_root, path):
        raise Protected(f"{path} holds Docker's data root {snap.docker.data_root}")
    guard = ((path, snap.filesystems[fs_uuid].dev, snap.in_fs(sv)),)
    check_guard(snap, guard, snap.mounts)
    _check_members(snap, subtree, protect_labels)
    ordered = tuple(snap.delete_order(subtree))
    parent = snap.subvolume(fs_uuid, sv.parent_id)
    if parent is not None and parent.read_only and parent.id != TOP_LEVEL_ID:
        # The parent stays, but a read-only parent refuses the delete (EROFS): its flag
        # is cleared for the delete and set again afterwards; it must itself be ours.
        _check_path(snap, parent)
    for member in ordered:
        check_orphan_age(snap, member, orphan_floor)
    return DeleteSet(
        fs_uuid=fs_uuid,
        subvolumes=ordered,
        clear_readonly=_readonly_parents(snap, ordered),
        guard=guard,
    )


@dataclass(frozen=True)
class PlannedVolume:
    """What a plan recorded of a volume it named, given when a job resumes that
    action after a crash cut its first attempt short (``agent.domain.recheck``): its
    name, which folder it was (``VolumeView.identity``: device and inode of
    ``<data_root>/volumes/<name>``), and that it then held nested subvolumes (which
    that attempt may have deleted)."""

    name: str
    identity: str | None
    held_subvolumes: bool

    def is_(self, vol: VolumeView) -> bool:
        """``vol`` is provably the planned volume: the same name, an identity was
        recorded and it is the same folder, and the plan had subvolumes to delete in it."""
        return (
            self.held_subvolumes
            and self.identity is not None
            and vol.record.name == self.name
            and vol.identity == self.identity
        )


def plan_volume_delete(
    snap: Snapshot,
    name: str,
    *,
    protect_labels: Sequence[str],
    resuming: PlannedVolume | None = None,
) -> DeleteSet:
    """Check every rule for removing a volume with the subvolumes nested in it.

    ``resuming``: a job finishing this volume's removal, which a crash cut short after
    its subvolumes went. A named volume holding no subvolume is refused, unless it is
    provably the one the plan named while it held subvolumes (``PlannedVolume.is_``);
    every other rule holds all the same."""
    if not VOLUME_NAME.match(name):
        raise ValidationFailed("invalid volume name", errors={"name": ["not a Docker volume name"]})
    vol = snap.volumes.get(name)
    if vol is None:
        raise NotFound(f"no volume named {name}")
    _check_volume_usable(vol, protect_labels)
    if not vol.nested and not vol.record.anonymous:
        if resuming is None or not resuming.is_(vol):
            # Someone chose this name and it holds no subvolume: nothing Docker cannot
            # remove itself, and nothing a leak leaves behind.
            raise Protected(
                f"volume {name} is a named volume holding no btrfs subvolume: not a "
                "leftover this agent removes (`docker volume rm` can, if that is what "
                "you want)"
                + (
                    "; it is not provably the volume the plan named (another folder, or "
                    "the plan recorded none)"
                    if resuming is not None
                    else ""
                )
            )
    mountpoint = _check_root_path(snap, vol.record.mountpoint, f"volume {name}")
    own = posixpath.join(snap.docker.data_root, "volumes", name, "_data")
    if vol.record.driver != "local" or mountpoint.rstrip("/") != own:
        # what Docker would remove is the driver's business, and a foreign mountpoint
        # may be another volume's data or any folder
        raise Protected(
            f"volume {name} (driver {vol.record.driver}) has its data at {mountpoint}, "
            f"not at {own} where Docker's local driver keeps a volume's data"
        )
    # Docker removes the volume's whole folder (``<data_root>/volumes/<name>``).
    folder = posixpath.dirname(mountpoint)
    holder = snap.fs_for_host_path(folder)
    if holder is None:
        raise OutsideRoots(f"volume {name} lives at {mountpoint}, on no btrfs filesystem here")
    guard = (_guard_entry(snap, holder.uuid, folder),)
    check_guard(snap, guard, snap.mounts)
    members: dict[tuple[str, int], SubvolView] = {}
    for sv in vol.nested:
        if (sv.fs_uuid, sv.id) in members:
            continue  # inside one seen before: its subtree is in already, in this order
        for member in snap.subtree(sv.fs_uuid, sv.id):
            members[(member.fs_uuid, member.id)] = member
    if {k[0] for k in members} - {holder.uuid}:
        raise Protected(f"volume {name} spans several filesystems; refusing")
    _check_members(snap, members.values(), protect_labels, own_volume=name)
    ordered = tuple(snap.delete_order(members.values()))
    return DeleteSet(
        fs_uuid=holder.uuid,
        subvolumes=ordered,
        clear_readonly=_readonly_parents(snap, ordered),
        volume=vol,
        guard=guard,
    )


def plan_folder_delete(
    snap: Snapshot, path: str, *, protect_labels: Sequence[str] = ()
) -> DeleteSet:
    """Check every rule for removing a plain folder in the daemon's btrfs/subvolumes/
    that no layer references (an orphan layer folder)."""
    folder = next((f for f in snap.layer_folders if f.path == path), None)
    if folder is None:
        raise NotFound(f"no layer folder at {path}")
    if folder.referenced_by:
        raise Protected(f"{path} is referenced by {folder.referenced_by}")
    if not snap.layerdb_known:
        raise Protected("Docker's layer records could not be read: every layer may be in use")
    path = _check_root_path(snap, folder.path, f"folder {folder.name}")
    for subs in snap.subvolumes.values():
        for sv in subs.values():
            if sv.path is not None and is_under(sv.path, path):
                raise Protected(f"{path} holds subvolume {sv.id} ({sv.path})")
    guard = (_guard_entry(snap, folder.fs_uuid, path),)
    check_guard(snap, guard, snap.mounts)
    return DeleteSet(
        fs_uuid=folder.fs_uuid, subvolumes=(), clear_readonly=(), folder=folder, guard=guard
    )


def plan_qgroup_destroy(snap: Snapshot, fs_uuid: str, qgroup_ids: Sequence[int]) -> DeleteSet:
    """Check that the level-0 qgroups ``qgroup_ids`` may be destroyed: their subvolumes
    do not exist. A qgroup of a live subvolume is refused; one already gone is left out."""
    fs = snap.filesystems.get(fs_uuid)
    if fs is None:
        raise NotFound(f"no btrfs filesystem with uuid {fs_uuid}")
    live = snap.subvolumes.get(fs_uuid, {})
    alive = sorted(i for i in qgroup_ids if i in live or i == TOP_LEVEL_ID)
    if alive:
        raise Protected(f"qgroup(s) {', '.join(f'0/{i}' for i in alive)} belong to a subvolume")
    if not fs.quota_enabled:
        raise Protected(f"quotas are off on filesystem {fs_uuid}")
    stale = set(fs.stale_qgroups)
    ids = tuple(i for i in qgroup_ids if i in stale)
    if not ids:
        raise NotFound(f"none of the qgroups is left on filesystem {fs_uuid}")
    return DeleteSet(fs_uuid=fs_uuid, subvolumes=(), clear_readonly=(), qgroup_ids=ids)
