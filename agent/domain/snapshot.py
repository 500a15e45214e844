"""What is on this NAS: filesystems, subvolumes, volumes, and who owns each.

Only the btrfs filesystems that hold a configured root or Docker's data root are
looked at (and, in the one scan after Docker's data root moved, the one that held it
before: listed early on the last data root seen, dropped unread).

``take_snapshot`` asks the two backends once (a fixed number of btrfs processes per
filesystem, one Docker call per kind of object, whatever the number of subvolumes)
and joins the answers into a ``Snapshot``: plain values the findings, the safety rules
and the views read. Ownership of a layer subvolume is decided from Docker's own
metadata (the layerdb), never from a directory listing alone.
"""

from __future__ import annotations

import functools
import operator
import posixpath
from collections.abc import Collection, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple, TypeVar

from agent import collector
from agent.domain.mounts import MountIndex, UseIndex, container_uses, mount_index
from agent.domain.paths import VOLUME_NAME, LinkMemo, PathMap, is_under
from agent.errors import BtrfsUnavailable
from agent.host.backend import Btrfs, Docker
from agent.host.records import (
    ContainerRecord,
    DockerInfo,
    FilesystemIdent,
    FolderEntry,
    FsUsage,
    LayerRefs,
    MountEntry,
    Qgroup,
    QgroupReport,
    ScopeRecords,
    SubvolumeRecord,
    VolumeRecord,
    VolumeStores,
)

TOP_LEVEL_ID = 5
NO_USAGE = FsUsage(size_bytes=0, used_bytes=0, free_bytes=0)  # not read (a scoped snapshot)


@dataclass(frozen=True)
class Scope:
    """What one delete touches, for a snapshot that reads no more than that: the
    volume ``volume`` (its folder ``<data_root>/volumes/<name>``), or the subvolumes
    ``ids`` of filesystem ``fs_uuid``. Only their subvolumes, everything nested in
    them and every subvolume holding them are listed; everything else a rule reads is
    read whole, as for a full snapshot (Docker's info, volumes, containers and layer
    records, the mount tables of every namespace, what is held open)."""

    volume: str | None = None
    fs_uuid: str | None = None
    ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class FsView:
    uuid: str
    label: str | None
    mountpoints: tuple[str, ...]  # host paths
    usage: FsUsage
    quota_enabled: bool
    default_id: int
    local_mount: str  # where btrfs commands for this filesystem are pointed
    mounts: tuple[MountEntry, ...]  # this process's mounts of it (local paths)
    dev: str = ""  # "major:minor" of the filesystem, as mount tables name it
    # level-0 qgroups whose subvolume is gone (kernels before 6.11 leave them behind)
    stale_qgroups: tuple[int, ...] = ()
    # this process's mount point of the filesystem's top level that the subvolumes' local
    # paths were made through ("" for "/"), or None when none shows the top level
    top_view: str | None = None


@dataclass(frozen=True)
class LayerFolder:
    """A plain folder (not a subvolume) in the daemon's ``btrfs/subvolumes/``: what
    copying Docker's data root to another volume leaves instead of subvolumes."""

    fs_uuid: str
    name: str
    path: str  # host path
    changed_at: datetime | None  # the newest of its mtime and ctime
    referenced_by: str | None  # "an image layer", "a container layer", ... or None


class SubvolView(NamedTuple):
    """One subvolume as the reads and the safety rules see it. A named tuple: immutable,
    and quick to build by the ten thousand (a scan makes one per subvolume; built by
    position, ``tuple.__new__``, in ``_take``: a frozen dataclass took 30 ms per
    10,000, a tuple 2 ms)."""

    fs_uuid: str
    id: int
    parent_id: int
    path: str | None  # host path; None when no mount of this process shows it
    local_path: str | None
    # its path inside the filesystem from the top level ("/docker/..."), kept only where
    # it is not the local path below the filesystem's top-level mount (``FsView.top_view``):
    # ``Snapshot.in_fs`` gives it either way (not kept twice: 10,000 paths are ~2 MB)
    in_fs_apart: str | None
    read_only: bool
    generation: int
    uuid: str | None
    parent_uuid: str | None
    referenced_bytes: int | None
    exclusive_bytes: int | None
    owner_kind: str  # docker-layer | docker-volume | orphan-layer | other
    owner_ref: str | None
    created_at: datetime | None = None  # otime
    changed_at: datetime | None = None  # ctime: the last name created, renamed or removed


@dataclass(frozen=True)
class VolumeView:
    """A Docker volume joined with its users and the subvolumes nested in it.

    ``last_write`` is how its age is measured: the newest of the volume's creation time,
    the creation and last change of every subvolume nested in it, and the modification
    and change times of its ``_data`` folder and of the folders directly in it (what a
    daemon using it as its data root touches whenever it runs: ``containers/``,
    ``image/``, ``btrfs/subvolumes/``, ...). None when none of these is known, and for
    a volume that can be no finding (one in use, or a named one holding no subvolume):
    only a finding's age is read.

    ``inner``: the volumes that a daemon which kept its data root in this volume
    recorded (its ``volumes/metadata.db``), with their labels; read for volumes no
    container uses, None for the others."""

    record: VolumeRecord
    in_use_by: tuple[str, ...]
    nested: tuple[SubvolView, ...]
    exclusive_bytes: int | None
    last_write: datetime | None = None
    inner: VolumeStores | None = None
    # which folder it is: "<device>:<inode>" of ``<data_root>/volumes/<name>`` (a volume
    # removed and made again under its name has another); read for unused volumes only
    identity: str | None = None

    @property
    def name(self) -> str:
        return self.record.name


_view_id = operator.attrgetter("id")  # of a SubvolView or a SubvolumeRecord
# ``_views`` unpacks a record by position
assert SubvolumeRecord._fields == (
    "id", "parent_id", "generation", "uuid", "parent_uuid", "read_only", "created_at",
    "changed_at", "ctransid", "path",
)  # fmt: skip


@dataclass
class Snapshot:
    """``scope``: None for a full snapshot; else the snapshot lists only the subvolumes
    the scope touches (``Scope``), has no filesystem usage (``NO_USAGE``), no stale
    qgroups and no volume ages: what a delete decides on, never what a read shows."""

    taken_at: datetime
    docker: DockerInfo
    roots: tuple[str, ...]
    filesystems: dict[str, FsView]
    subvolumes: dict[str, dict[int, SubvolView]]  # fs uuid -> id -> subvolume
    volumes: dict[str, VolumeView]
    containers: tuple[ContainerRecord, ...]
    refs: LayerRefs
    layerdb_known: bool  # False: Docker's layer records could not be read
    layer_folders: tuple[LayerFolder, ...]  # plain folders in <data_root>/btrfs/subvolumes
    mounts: MountIndex  # every mount of the host and of this process, by host path
    uses: UseIndex  # every volume and bind mount of every container, by host path (as
    # written and as resolved on the host)
    pathmap: PathMap = field(default_factory=PathMap)  # host paths <-> this process's
    _children: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    _sorted_ids: dict[str, list[int]] = field(default_factory=dict)
    # "no symlink on the way" answers, shared by the safety checks on this snapshot
    path_memo: LinkMemo = field(default_factory=LinkMemo)
    scope: Scope | None = None

    # -- lookups ------------------------------------------------------------------
    @functools.cached_property
    def root_paths(self) -> frozenset[str]:
        """The configured roots without a trailing "/": a path that is one of them."""
        return frozenset(r.rstrip("/") for r in self.roots)

    @functools.cached_property
    def _root_prefixes(self) -> tuple[str, ...]:
        return tuple(b + "/" for b in self.root_paths)  # the root "/" gives "/"

    def under_roots(self, path: str) -> bool:
        """``under_any(path, self.roots)`` for an absolute ``path``: it is a configured
        root or inside one (by components), in one set lookup and one ``startswith``."""
        return path in self.root_paths or path.startswith(self._root_prefixes)

    def fs_for_host_path(self, path: str) -> FsView | None:
        best: tuple[int, FsView] | None = None
        for fs in self.filesystems.values():
            for mp in fs.mountpoints:
                if is_under(path, mp) and (best is None or len(mp) > best[0]):
                    best = (len(mp), fs)
        return best[1] if best else None

    def sorted_ids(self, fs_uuid: str) -> list[int]:
        """The filesystem's subvolume ids in order (kept: pages of a listing share it)."""
        ids = self._sorted_ids.get(fs_uuid)
        if ids is None:
            ids = sorted(self.subvolumes.get(fs_uuid, {}))
            self._sorted_ids[fs_uuid] = ids
        return ids

    def subvolume(self, fs_uuid: str, sub_id: int) -> SubvolView | None:
        return self.subvolumes.get(fs_uuid, {}).get(sub_id)

    def in_fs(self, sv: SubvolView) -> str | None:
        """Where ``sv`` lies inside its filesystem, from the top level ("/docker/...");
        None when that is not known. Kept in the view where its local path was not made
        from it through the top-level mount; else the local path without that mount
        point (``_views`` made it as mount point + path)."""
        if sv.in_fs_apart is not None:
            return sv.in_fs_apart
        fs = self.filesystems.get(sv.fs_uuid)
        top = fs.top_view if fs is not None else None
        local = sv.local_path
        if top is None or local is None or not local.startswith(top + "/"):
            return None
        return local[len(top) :]

    def subvolumes_list(self) -> list[SubvolView]:
        """Every subvolume of every filesystem."""
        return [sv for subs in self.subvolumes.values() for sv in subs.values()]

    def children(self, fs_uuid: str, sub_id: int) -> list[int]:
        if not self._children:
            for uuid, subs in self.subvolumes.items():
                for sv in subs.values():
                    self._children.setdefault((uuid, sv.parent_id), []).append(sv.id)
        return self._children.get((fs_uuid, sub_id), [])

    def subtree(self, fs_uuid: str, sub_id: int) -> list[SubvolView]:
        """The subvolume and everything nested in it, deepest first (delete order);
        each once, also where parents make a loop (a malformed root tree)."""
        subs = self.subvolumes.get(fs_uuid, {})
        top = subs.get(sub_id)
        if top is None:
            return []
        if not self.children(fs_uuid, sub_id):
            return [top]  # most are leaves (a volume's layers): nothing to order
        out: list[tuple[int, SubvolView]] = []
        stack = [(sub_id, 0)]
        seen: set[int] = set()
        while stack:
            cur, depth = stack.pop()
            sv = subs.get(cur)
            if sv is None or cur in seen:
                continue
            seen.add(cur)
            out.append((depth, sv))
            stack.extend((c, depth + 1) for c in self.children(fs_uuid, cur))
        out.sort(key=lambda t: (-t[0], t[1].id))
        return [sv for _, sv in out]

    @functools.cached_property
    def _depths(self) -> dict[str, dict[int, int]]:
        """fs uuid -> id -> how many subvolumes hold it, for those whose parents make no
        loop: what ``delete_order`` has worked out on this snapshot (not a field: a copy
        made with ``dataclasses.replace`` starts without it)."""
        return {}

    def _depth(self, sv: SubvolView) -> int:
        """How many listed subvolumes hold ``sv``: up its parents to the top, to one whose
        depth is known, or round a loop (a malformed root tree: then counted as far as
        the loop, and not kept)."""
        memo = self._depths.get(sv.fs_uuid)
        if memo is None:
            memo = self._depths[sv.fs_uuid] = {}
        known = memo.get(sv.id)
        if known is not None:
            return known
        subs = self.subvolumes.get(sv.fs_uuid, {})
        # most: right in the top level, or in a subvolume whose depth is known (not
        # itself: its depth is not known yet)
        parent = subs.get(sv.parent_id)
        above = memo.get(parent.id) if parent is not None else -1
        if above is not None:
            memo[sv.id] = above + 1
            return above + 1
        chain, on_chain = [sv.id], {sv.id}
        cur, base = sv, 0
        while True:
            parent = subs.get(cur.parent_id)
            if parent is None:
                break
            above = memo.get(parent.id)
            if above is not None:
                base = above + 1
                break
            if parent.id in on_chain:
                return self._depth_through_loop(sv)
            chain.append(parent.id)
            on_chain.add(parent.id)
            cur = parent
        for d, sid in enumerate(reversed(chain), start=base):
            memo[sid] = d
        return base + len(chain) - 1

    def _depth_through_loop(self, sv: SubvolView) -> int:
        d, cur, seen = 0, sv, set()
        while cur.parent_id not in seen:
            seen.add(cur.parent_id)
            parent = self.subvolume(cur.fs_uuid, cur.parent_id)
            if parent is None:
                break
            d, cur = d + 1, parent
        return d

    def delete_order(self, subs: Iterable[SubvolView]) -> list[SubvolView]:
        """Children before parents: deeper in the subvolume tree first."""
        depth = self._depth
        # (-depth, -len(path), id) ascending, as two sorts of plain ints (comparing
        # tuples is most of the time of one sort): by id, then stably by depth and
        # length; a path is far shorter than 2**32 characters
        by_id = sorted(subs, key=_view_id)
        return sorted(by_id, key=lambda s: (-depth(s) << 32) - len(s.path or ""))

    def volume_users(self, name: str) -> tuple[str, ...]:
        return tuple(c.id for c in self.containers if name in c.volume_names)

    def wide_paths(self) -> tuple[str, ...]:
        """Paths a container may mount whole without using what is inside: the data
        root and the configured roots."""
        return (self.docker.data_root, *self.roots)


def _view_mounts(
    mounts: Sequence[MountEntry], pathmap: PathMap, wanted: Sequence[str]
) -> list[tuple[str, str]]:
    """(in-fs root, local mount point) of the mounts that a subvolume's path is read
    through, best first: mounts whose host path lies under one of the ``wanted`` paths
    (the roots, the data root) or holds one, then the rest; within each, the widest root
    (the top level first), then the shortest mount point.

    The widest view is taken, never the deepest: a nested subvolume that is also mounted
    elsewhere (``subvol=`` or a bind mount) keeps the path it has inside its volume, and
    the other mount is what the safety rules then see as exposing it."""

    def rank(m: MountEntry) -> tuple[int, int, int]:
        host = pathmap.to_host(m.mountpoint)
        near = host is not None and any(is_under(w, host) or is_under(host, w) for w in wanted)
        return (0 if near else 1, m.root.rstrip("/").count("/"), len(m.mountpoint))

    return [(m.root.rstrip("/"), m.mountpoint.rstrip("/")) for m in sorted(mounts, key=rank)]


def _map_path(in_fs: str, views: Sequence[tuple[str, str]]) -> str | None:
    """Local path of ``in_fs`` (a path from the top level) through the first view that
    shows it."""
    for root, mountpoint in views:
        if in_fs == (root or "/"):
            return mountpoint or "/"
        if root == "":
            return mountpoint + in_fs
        if in_fs.startswith(root + "/"):
            return mountpoint + in_fs[len(root) :]
    return None


_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="snapshot")
T = TypeVar("T")


@dataclass(frozen=True)
class _FsScan:
    """One filesystem's btrfs commands, running side by side."""

    records: Future[list[SubvolumeRecord]]
    qgroups: Future[QgroupReport | None]
    usage: Future[FsUsage]
    default: Future[int]

    @classmethod
    def start(cls, btrfs: Btrfs, mount: str) -> _FsScan:
        return cls(
            records=_POOL.submit(btrfs.list_subvolumes, mount),
            qgroups=_POOL.submit(btrfs.qgroups, mount),
            usage=_POOL.submit(btrfs.usage, mount),
            default=_POOL.submit(btrfs.default_subvolume, mount),
        )

    @classmethod
    def start_scoped(
        cls, btrfs: Btrfs, mount: str, ids: tuple[int, ...], folder: str | None
    ) -> _FsScan:
        """Only what the scope touches, by tree search: no process."""
        scoped = _POOL.submit(btrfs.list_scope, mount, ids=ids, folder=folder)
        records: Future[list[SubvolumeRecord]] = Future()
        default: Future[int] = Future()
        usage: Future[FsUsage] = Future()
        usage.set_result(NO_USAGE)

        def split(done: Future[ScopeRecords]) -> None:
            try:
                got = done.result()
            except BaseException as exc:  # handed on to whoever reads the parts
                records.set_exception(exc)
                default.set_exception(exc)
                return
            records.set_result(got.records)
            default.set_result(got.default_id)

        scoped.add_done_callback(split)
        return cls(
            records=records,
            qgroups=_POOL.submit(btrfs.qgroups, mount),
            usage=usage,
            default=default,
        )


def _wanted_groups(
    by_source: Mapping[str, list[MountEntry]], pathmap: PathMap, wanted: Sequence[str]
) -> list[tuple[str, list[MountEntry], tuple[str, ...]]]:
    """(device, its mounts with a mount of the top level first, their host paths) of the
    btrfs filesystems holding one of the ``wanted`` paths or held by one."""
    groups: list[tuple[str, list[MountEntry], tuple[str, ...]]] = []
    for source, mounts in sorted(by_source.items()):
        host_mps = tuple(
            hp for hp in (pathmap.to_host(m.mountpoint) for m in mounts) if hp is not None
        )
        if host_mps and any(is_under(w, hp) or is_under(hp, w) for w in wanted for hp in host_mps):
            # Point commands at a mount of the top level when there is one.
            mounts.sort(key=lambda m: (m.root != "/", len(m.mountpoint)))
            groups.append((source, mounts, host_mps))
    return groups


class DaemonInfo:
    """Docker's ``info`` (versions, storage driver, data root), kept while the daemon
    process that answered it is the one answering (``Docker.daemon_identity``): those
    change only when the daemon restarts, and a restarted daemon is another process.
    ``GET /info`` is the slowest of a snapshot's requests (the daemon runs ``runc`` and
    ``docker-init`` for it, from disk when the page cache was dropped).

    ``take_snapshot`` asks who answers before it reads anything and again once every
    answer is in: the kept info is used only when both name the process that answered
    it, so every answer of the snapshot came from that process. A daemon that cannot
    be told apart (None) is asked for its info every time."""

    def __init__(self) -> None:
        self._kept: tuple[str, DockerInfo] | None = None
        self.reused = 0  # snapshots that used the kept info

    def before(self, docker: Docker) -> tuple[str | None, DockerInfo | None]:
        """(who answers now, the info kept for that process or None)."""
        ident = docker.daemon_identity()
        kept = self._kept
        if ident is not None and kept is not None and kept[0] == ident:
            return ident, kept[1]
        return ident, None

    def forget(self) -> None:
        self._kept = None

    def after(self, docker: Docker, ident: str | None, info: DockerInfo, *, asked: bool) -> bool:
        """Whether the process ``before`` named still answers; the info it was asked
        for (``asked``) is kept for it then."""
        if ident is None or docker.daemon_identity() != ident:
            return False
        if asked:
            self._kept = (ident, info)
        return True


def take_snapshot(
    btrfs: Btrfs,
    docker: Docker,
    *,
    now: datetime,
    roots: Sequence[str] = (),
    pathmap: PathMap | None = None,
    fs_cache: dict[str, tuple[str, str | None]] | None = None,
    data_root_hint: str | None = None,
    scope: Scope | None = None,
    daemon_info: DaemonInfo | None = None,
) -> Snapshot:
    """``_take`` with Docker's info kept in ``daemon_info`` (``DaemonInfo``) while the
    same daemon process answers. When the daemon changed while a snapshot was read
    with the info kept, that snapshot is dropped and read again, asking the daemon."""

    def take(known_info: DockerInfo | None) -> Snapshot:
        return _take(
            btrfs, docker, now=now, roots=roots, pathmap=pathmap, fs_cache=fs_cache,
            data_root_hint=data_root_hint, scope=scope, known_info=known_info,
        )  # fmt: skip

    if daemon_info is None:
        return take(None)
    ident, kept = daemon_info.before(docker)
    snap = take(kept)
    if daemon_info.after(docker, ident, snap.docker, asked=kept is None):
        daemon_info.reused += kept is not None
        return snap
    if kept is None:
        return snap  # asked fresh throughout: what a snapshot without the cache is
    # the daemon changed under the kept info: read again, asking it
    daemon_info.forget()
    ident, _ = daemon_info.before(docker)
    snap = take(None)
    daemon_info.after(docker, ident, snap.docker, asked=True)
    return snap


def _take(
    btrfs: Btrfs,
    docker: Docker,
    *,
    now: datetime,
    roots: Sequence[str] = (),
    pathmap: PathMap | None = None,
    fs_cache: dict[str, tuple[str, str | None]] | None = None,
    data_root_hint: str | None = None,
    scope: Scope | None = None,
    known_info: DockerInfo | None,
) -> Snapshot:
    """Ask both backends once and join the answers. ``fs_cache`` (device -> uuid,
    label) spares a ``filesystem show`` per request for filesystems seen before.
    ``known_info``: Docker's info, not asked again (``DaemonInfo``).

    ``data_root_hint`` (Docker's data root as last seen): the filesystems it picks are
    listed while Docker is still asked for its data root, the longest wait of a scan;
    a listing whose filesystem the answer does not pick is dropped unread, and one it
    picks that the hint did not is started then. Either way every listing used is read
    during this call. ``scope``: list only what one delete touches (``Scope``; no
    early listing then)."""
    pathmap = pathmap or PathMap()
    if scope is not None and not btrfs.tool_present():
        # a full scan starts btrfs-progs and fails so; a scoped one starts none, but a
        # delete is not decided while the tool is gone either (as /readyz says)
        raise BtrfsUnavailable("btrfs-progs cannot be found or started: no delete now")
    # The backends' calls are independent processes and requests: ask them at once.
    f_info = _POOL.submit(docker.info) if known_info is None else _done(known_info)
    f_mounts = _POOL.submit(btrfs.mounts)
    f_volumes = _POOL.submit(docker.volumes)
    f_containers = _POOL.submit(docker.containers)
    f_host_mounts = _POOL.submit(btrfs.host_mounts)
    f_namespaces = _POOL.submit(btrfs.namespace_mounts)
    f_holders = _POOL.submit(btrfs.holders)
    all_mounts = f_mounts.result()
    by_source: dict[str, list[MountEntry]] = {}
    for m in all_mounts:
        if m.fstype == "btrfs":
            by_source.setdefault(m.source, []).append(m)
    early: dict[tuple[str, str], _FsScan] = {}
    if data_root_hint is not None and fs_cache and scope is None:
        hinted = (*(tuple(roots) or (data_root_hint,)), data_root_hint)
        for source, mounts, _ in _wanted_groups(by_source, pathmap, hinted):
            if source in fs_cache:
                early[(source, mounts[0].mountpoint)] = _FsScan.start(btrfs, mounts[0].mountpoint)
    info = f_info.result()
    data_root = info.data_root
    roots = tuple(roots) or (data_root,)
    f_refs = _POOL.submit(docker.layer_refs, pathmap.to_local(data_root))
    layer_dir = posixpath.join(data_root, "btrfs", "subvolumes")
    f_folders = _POOL.submit(btrfs.plain_folders, pathmap.to_local(layer_dir))
    # a delete's volume: its folder's identity and inner volume store read beside the
    # rest, for the folder Docker keeps it in (used only if Docker names that folder)
    folder_reads: dict[str, Future[tuple[tuple[int, int, int, int] | None, VolumeStores]]] = {}
    if scope is not None and scope.volume is not None and VOLUME_NAME.fullmatch(scope.volume):
        expected = posixpath.join(data_root, "volumes", scope.volume, "_data")
        folder_reads[expected] = _POOL.submit(_volume_folder, btrfs, docker, pathmap, expected)

    filesystems: dict[str, FsView] = {}
    subvolumes: dict[str, dict[int, SubvolView]] = {}

    # Only filesystems that hold a root or Docker's data root: nothing else is ours to
    # look at, and an unrelated filesystem (a failing USB disk, a mount going away) must
    # not fail the answer.
    wanted = (*roots, data_root)
    groups = _wanted_groups(by_source, pathmap, wanted)
    idents: dict[str, Future[FilesystemIdent]] = {
        source: _POOL.submit(btrfs.filesystem, mounts[0].mountpoint)
        for source, mounts, _ in groups
        if fs_cache is None or source not in fs_cache
    }
    scans: list[tuple[str, str | None, list[MountEntry], tuple[str, ...], _FsScan]] = []
    for source, mounts, host_mps in groups:
        if source in idents:
            ident = idents[source].result()
            uuid, label = ident.uuid, ident.label
            if fs_cache is not None:
                fs_cache[source] = (uuid, label)
        else:
            assert fs_cache is not None
            uuid, label = fs_cache[source]
        if any(uuid == seen for seen, *_ in scans):
            continue
        if scope is not None:
            ids = scope.ids if scope.fs_uuid == uuid else ()
            folder = None
            # a name that is no volume's has no folder: the decision refuses it (4xx)
            if scope.volume is not None and VOLUME_NAME.fullmatch(scope.volume):
                folder = pathmap.to_local(posixpath.join(data_root, "volumes", scope.volume))
            scan: _FsScan | None = _FsScan.start_scoped(btrfs, mounts[0].mountpoint, ids, folder)
        else:
            scan = early.pop((source, mounts[0].mountpoint), None)
        if scan is None:
            scan = _FsScan.start(btrfs, mounts[0].mountpoint)
        scans.append((uuid, label, mounts, host_mps, scan))
    # (what is left in ``early`` was not asked for: never read, its failures neither)
    # the mount tables and what is held open, once the listings run: reading what
    # processes hold is the longest of these (a delete's listing waited for it)
    mounts_index = mount_index(all_mounts, f_host_mounts, pathmap, f_namespaces, f_holders)

    volumes = f_volumes.result()
    containers = tuple(f_containers.result())
    refs = f_refs.result()
    referenced = refs.all
    layerdb_known = bool(referenced)
    volumes_dir = posixpath.join(data_root, "volumes")
    vol_by_name = {v.name: v for v in volumes}
    users: dict[str, list[str]] = {}
    for c in containers:
        for vn in c.volume_names:
            users.setdefault(vn, []).append(c.id)

    for uuid, label, mounts, host_mps, scan in scans:
        records: list[SubvolumeRecord] = scan.records.result()
        qg = scan.qgroups.result()
        live = {r.id for r in records}
        stale: tuple[int, ...] = ()
        if qg and scope is None:  # a scoped listing does not tell which are gone
            stale = tuple(sorted(i for i in qg if i not in live and i != TOP_LEVEL_ID))
        views = _view_mounts(mounts, pathmap, wanted)
        # Most subvolumes are read through the first view, a mount of the top level:
        # their local path is that mount point and their path inside the filesystem.
        top = views[0][1] if views and views[0][0] == "" else None
        filesystems[uuid] = FsView(
            uuid=uuid,
            label=label,
            mountpoints=host_mps,
            usage=scan.usage.result(),
            quota_enabled=qg is not None,
            default_id=scan.default.result(),
            local_mount=mounts[0].mountpoint,
            mounts=tuple(mounts),
            dev=mounts[0].dev,
            stale_qgroups=stale,
            top_view=top,
        )
        with collector.paused():  # computing only
            subvolumes[uuid] = _views(
                uuid, records, qg, views, top, pathmap, layer_dir, volumes_dir,
                referenced, layerdb_known, vol_by_name,
            )  # fmt: skip

    nested_by_volume: dict[str, list[SubvolView]] = {}
    quota_by_fs = {u: fs.quota_enabled for u, fs in filesystems.items()}
    for subs in subvolumes.values():
        for sv in subs.values():
            if sv.owner_kind == "docker-volume" and sv.owner_ref:
                nested_by_volume.setdefault(sv.owner_ref, []).append(sv)

    volume_views: dict[str, VolumeView] = {}
    for v in volumes:
        nested = tuple(sorted(nested_by_volume.get(v.name, []), key=lambda s: s.id))
        # Only what sits in nested subvolumes can be counted cheaply: plain files in
        # ``_data`` belong to the enclosing subvolume's qgroup.
        excl: int | None = None
        if nested and all(quota_by_fs.get(s.fs_uuid) for s in nested):
            excl = sum(s.exclusive_bytes or 0 for s in nested)
        in_use_by = tuple(users.get(v.name, ()))
        last_write = identity = inner = None
        # a scoped snapshot needs them only of the volumes the delete touches
        touched = scope is None or v.name == scope.volume or bool(nested)
        if not in_use_by and v.mountpoint and touched:  # identity: which folder it is
            read = folder_reads.get(v.mountpoint)
            if read is not None:
                stamp, inner = read.result()
            else:
                stamp, inner = _volume_folder(btrfs, docker, pathmap, v.mountpoint)
            identity = f"{stamp[0]}:{stamp[1]}" if stamp is not None and stamp[1] else None
        if not in_use_by and (nested or v.anonymous) and scope is None:
            # Only a finding's age matters (an unused volume holding subvolumes, or an
            # unused anonymous one): no stat of the folders of the others.
            last_write = _newest(
                v.created_at,
                *(s.created_at for s in nested),
                *(s.changed_at for s in nested),
                btrfs.last_change(pathmap.to_local(v.mountpoint)) if v.mountpoint else None,
            )
        volume_views[v.name] = VolumeView(
            record=v,
            in_use_by=in_use_by,
            nested=nested,
            exclusive_bytes=excl,
            last_write=last_write,
            inner=inner,
            identity=identity,
        )

    return Snapshot(
        taken_at=now,
        docker=info,
        roots=roots,
        filesystems=filesystems,
        subvolumes=subvolumes,
        volumes=volume_views,
        containers=containers,
        refs=refs,
        layerdb_known=layerdb_known,
        mounts=mounts_index,
        uses=container_uses(btrfs, containers),
        pathmap=pathmap,
        layer_folders=_layer_folders(f_folders, layer_dir, refs, filesystems, pathmap),
        scope=scope,
    )


def _views(
    uuid: str,
    records: list[SubvolumeRecord],
    qg: Mapping[int, Qgroup] | None,
    views: Sequence[tuple[str, str]],
    top: str | None,
    pathmap: PathMap,
    layer_dir: str,
    volumes_dir: str,
    referenced: Collection[str],
    layerdb_known: bool,
    vol_by_name: Mapping[str, VolumeRecord],
) -> dict[int, SubvolView]:
    """The views of one filesystem's subvolumes: where each is (inside the filesystem,
    here and on the host) and what owns it (a layer Docker references, an orphan layer,
    a volume, or nothing of Docker's). ``views``: the mounts their paths are read
    through (``_view_mounts``), ``top`` the first when it shows the top level."""
    subs: dict[int, SubvolView] = {}
    layer_prefix, volumes_prefix = layer_dir + "/", volumes_dir + "/"
    new_view = tuple.__new__
    for rec in sorted(records, key=_view_id):
        # the record's fields in one step (SubvolumeRecord's order), not one lookup each
        sid, parent_id, generation, sub_uuid, parent_uuid, read_only, created, changed, _, path = (
            rec
        )
        inside = path.strip("/") if path is not None else None
        apart: str | None = None
        if inside is None:
            local = None
        elif top is not None and inside:
            # what _map_path gives through that first view; its path inside the
            # filesystem is not kept (Snapshot.in_fs: this without top), nor made
            local = f"{top}/{inside}"
        else:
            apart = "/" + inside
            local = _map_path(apart, views)
        host = pathmap.to_host(local) if local is not None else None
        kind, ref = "other", None
        if host is not None:
            # (a path whose folder is the layers folder starts with it and a "/")
            parent_dir, name = posixpath.split(host) if host.startswith(layer_prefix) else ("", "")
            if parent_dir == layer_dir:
                if name in referenced:
                    kind, ref = "docker-layer", name
                elif layerdb_known:
                    kind, ref = "orphan-layer", name
                else:
                    kind, ref = "other", name
            elif host.startswith(volumes_prefix):
                vname = host[len(volumes_prefix) :].split("/", 1)[0]
                vol = vol_by_name.get(vname)
                if vol is not None:  # the volume's own name: one string per volume
                    kind, ref = "docker-volume", vol.name
        q = qg.get(sid) if qg is not None else None
        # SubvolView(...) by position, in the order of its fields
        subs[sid] = new_view(
            SubvolView,
            (
                uuid,
                sid,
                parent_id,
                host,
                local,
                apart,
                read_only,
                generation,
                sub_uuid,
                parent_uuid,
                q.referenced if q else None,
                q.exclusive if q else None,
                kind,
                ref,
                created,
                changed,
            ),
        )
    return subs


def _volume_folder(
    btrfs: Btrfs, docker: Docker, pathmap: PathMap, mountpoint: str
) -> tuple[tuple[int, int, int, int] | None, VolumeStores]:
    """The stamp of a volume's folder (``volumes/<name>``) and the volume store of a
    daemon whose data root its ``_data`` was."""
    stamp = btrfs.folder_stamp(pathmap.to_local(posixpath.dirname(mountpoint)))
    return stamp, docker.volume_stores(pathmap.to_local(mountpoint))


def _done(value: T) -> Future[T]:
    done: Future[T] = Future()
    done.set_result(value)
    return done


def _newest(*times: datetime | None) -> datetime | None:
    known = [t for t in times if t is not None]
    return max(known) if known else None


def _layer_folders(
    listing: Future[list[FolderEntry]],
    layer_dir: str,
    refs: LayerRefs,
    filesystems: Mapping[str, FsView],
    pathmap: PathMap,
) -> tuple[LayerFolder, ...]:
    """The plain folders in the daemon's ``btrfs/subvolumes/``, with what references
    each. None are known (an empty tuple) when the folder cannot be read."""
    try:
        entries = listing.result()
    except OSError:
        return ()
    holder = next(
        (
            fs
            for fs in filesystems.values()
            if any(is_under(layer_dir, mp) for mp in fs.mountpoints)
        ),
        None,
    )
    if holder is None:
        return ()
    kinds = (
        (refs.image_cache_ids, "an image layer"),
        (refs.container_mount_ids, "a container layer"),
        (refs.container_init_ids, "a container's init layer"),
    )
    out = []
    for e in sorted(entries, key=lambda e: e.name):
        ref = next((what for ids, what in kinds if e.name in ids), None)
        path = posixpath.join(layer_dir, e.name)
        out.append(LayerFolder(holder.uuid, e.name, path, e.changed_at, ref))
    return tuple(out)
