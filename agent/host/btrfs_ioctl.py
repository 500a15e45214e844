"""The btrfs ioctls the agent calls itself: tree searches (the listings of subvolumes and
qgroups), INO_LOOKUP, GET_SUBVOL_INFO and SYNC. ``agent.host.btrfs.BtrfsTool`` is the only
caller; the decoding of what they return is pure, in ``agent.host.btrfs_tree``.

Every ioctl used exists on Linux 4.4 (what NAS vendors ship), or falls back to one that
does; the tree searches and INO_LOOKUP need CAP_SYS_ADMIN, as ``btrfs subvolume list``
does:

    BTRFS_IOC_TREE_SEARCH_V2  (3.15+) list_subvolumes (root tree), qgroups (quota
                              tree), change_mark (both, with min_transid); on
                              ENOTTY/EINVAL, BTRFS_IOC_TREE_SEARCH (v1)
    BTRFS_IOC_INO_LOOKUP      the path of a folder holding subvolumes; a tree's id
    BTRFS_IOC_GET_SUBVOL_INFO (4.18+, any user) created_at; before 4.18,
                              INO_LOOKUP + BTRFS_IOC_TREE_SEARCH on the root item
    BTRFS_IOC_SYNC            commit the running transaction (``btrfs filesystem sync``)

An ioctl that fails raises ``BtrfsIoctlError`` (a ``BtrfsCommandError`` naming the
ioctl), or ``BtrfsUnavailable`` when the process lacks the privilege.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Collection
from datetime import datetime

from agent import collector
from agent.errors import BtrfsCommandError, BtrfsUnavailable
from agent.host import btrfs_tree as tree
from agent.host.btrfs_listing import BlockDigest, QuotaTree, RootTree
from agent.host.records import ChangeMark, QgroupReport, SubvolumeRecord

__all__ = ["BtrfsIoctlError", "Ioctls", "otime_via_subvol_info", "otime_via_tree_search"]

# Inode number of every subvolume's root directory (BTRFS_FIRST_FREE_OBJECTID).
SUBVOLUME_ROOT_INO = 256


def _arg(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"expected an absolute path, got {path!r}")
    if "\0" in path:
        raise ValueError("path contains a NUL byte")
    return path


class BtrfsIoctlError(BtrfsCommandError):
    """A btrfs ioctl failed. ``cmd`` is ``("ioctl", <its name>, <path>)``, ``returncode``
    the errno, ``stderr`` what btrfs-progs would say."""

    def __init__(self, ioctl: str, path: str, err: OSError, message: str | None = None) -> None:
        self.errno = err.errno
        text = message or f"{ioctl} on {path}: {err.strerror or err}"
        super().__init__(("ioctl", ioctl, path), err.errno or -1, "", f"ERROR: {text}\n")


#
# ioctl numbers: Linux's generic _IOC encoding (x86, arm, arm64: what NAS boxes run):
# dir << 30 | size << 16 | type << 8 | nr, with type BTRFS_IOCTL_MAGIC 0x94 and the sizes
# of the structs of include/uapi/linux/btrfs.h (4.4 and every later kernel).
_IOC_WRITE, _IOC_READ = 1, 2
_BTRFS_IOCTL_MAGIC = 0x94


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (_BTRFS_IOCTL_MAGIC << 8) | nr


_U64_MAX = 2**64 - 1
_U32_MAX = 2**32 - 1

# struct btrfs_ioctl_search_args: the 104-byte key, then 3992 bytes of results.
_SEARCH_ARGS_SIZE = 4096
# struct btrfs_ioctl_search_args_v2: the key, u64 buf_size (at 104), the results (at 112).
_SEARCH_V2_HEAD = 112
# struct btrfs_ioctl_ino_lookup_args: u64 treeid, u64 objectid, char name[4080].
_INO_LOOKUP_SIZE = 4096
# struct btrfs_ioctl_get_subvol_info_args (504 bytes): otime {u64 sec; u32 nsec} at 392
_SUBVOL_INFO_SIZE = 504
_SUBVOL_INFO_OTIME = 392
BTRFS_IOC_SYNC = _ioc(0, 8, 0)  # _IO(BTRFS_IOCTL_MAGIC, 8): commit the transaction

BTRFS_IOC_TREE_SEARCH = _ioc(_IOC_READ | _IOC_WRITE, 17, _SEARCH_ARGS_SIZE)  # 0xD0009411
BTRFS_IOC_TREE_SEARCH_V2 = _ioc(_IOC_READ | _IOC_WRITE, 17, _SEARCH_V2_HEAD)  # 0xC0709411
BTRFS_IOC_INO_LOOKUP = _ioc(_IOC_READ | _IOC_WRITE, 18, _INO_LOOKUP_SIZE)  # 0xD0009412
# struct btrfs_ioctl_vol_args: s64 fd, char name[4088] (BTRFS_PATH_NAME_MAX + 1).
_VOL_ARGS_SIZE = 4096
BTRFS_IOC_SNAP_DESTROY = _ioc(_IOC_WRITE, 15, _VOL_ARGS_SIZE)  # 0x5000940F
BTRFS_IOC_SUBVOL_GETFLAGS = _ioc(_IOC_READ, 25, 8)  # 0x80089419
BTRFS_IOC_SUBVOL_SETFLAGS = _ioc(_IOC_WRITE, 26, 8)  # 0x4008941A
BTRFS_SUBVOL_RDONLY = 1 << 1
_FS_INFO_SIZE = 1024
BTRFS_IOC_FS_INFO = _ioc(_IOC_READ, 31, _FS_INFO_SIZE)  # 0x8400941F: fsid at offset 16
BTRFS_IOC_GET_SUBVOL_INFO = _ioc(_IOC_READ, 60, _SUBVOL_INFO_SIZE)  # 0x81F8943C

# The kernel caps a v2 result buffer at 16 MiB (btrfs_ioctl_tree_search_v2).
_SEARCH_MIN_BUFFER = 4096
_SEARCH_MAX_BUFFER = 16 << 20
# The result buffer of a change mark read against an earlier one: an unchanged range
# gives only the newest blocks' items (more pages, or a buffer grown for a large item,
# when it changed).
_MARK_BUFFER = 16 << 10


class _Fs:
    """An open directory of a btrfs filesystem, for ioctls. INO_LOOKUP answers are the
    caller's to cache (``RootTree`` asks once per directory)."""

    __slots__ = ("fd", "path")

    def __init__(self, path: str) -> None:
        self.path = _arg(path)
        self.fd = -1

    def __enter__(self) -> _Fs:
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise BtrfsIoctlError("open", self.path, e) from e
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def ioctl(self, name: str, request: int, args: bytearray) -> None:
        try:
            fcntl.ioctl(self.fd, request, args, True)
        except OSError as e:
            if e.errno in (errno.EPERM, errno.EACCES):
                raise BtrfsUnavailable(
                    f"{name} on {self.path}: {e.strerror} (btrfs's tree search needs"
                    " CAP_SYS_ADMIN, as btrfs subvolume list does)"
                ) from e
            if e.errno == errno.ENOTTY:
                raise BtrfsIoctlError(
                    name, self.path, e, f"not a btrfs filesystem: {self.path} ({name}: ENOTTY)"
                ) from e
            raise BtrfsIoctlError(name, self.path, e) from e

    def ino_lookup(self, tree_id: int, dirid: int) -> bytes | None:
        """The path of directory ``dirid`` inside tree ``tree_id`` ("a/b/"), or None when
        the kernel cannot give it (ENAMETOOLONG past 4079 bytes, a tree being dropped)."""
        args = bytearray(_INO_LOOKUP_SIZE)
        struct.pack_into("=2Q", args, 0, tree_id, dirid)
        try:
            self.ioctl("BTRFS_IOC_INO_LOOKUP", BTRFS_IOC_INO_LOOKUP, args)
        except BtrfsIoctlError:
            return None
        return tree.decode_ino_lookup(memoryview(args)[16:])


class _SearchV1:
    """BTRFS_IOC_TREE_SEARCH: every kernel with btrfs; 3992 bytes of results a call."""

    __slots__ = ("args", "fs")

    def __init__(self, fs: _Fs) -> None:
        self.fs = fs
        self.args = bytearray(_SEARCH_ARGS_SIZE)

    def __call__(self, key: bytes) -> tuple[memoryview, int]:
        args = self.args
        args[: len(key)] = key
        self.fs.ioctl("BTRFS_IOC_TREE_SEARCH", BTRFS_IOC_TREE_SEARCH, args)
        (found,) = struct.unpack_from("=I", args, 64)
        return memoryview(args)[tree.SEARCH_KEY.size :], found


class _SearchV2:
    """BTRFS_IOC_TREE_SEARCH_V2 (Linux 3.15+): up to ``size`` bytes of results a call.
    An item larger than the buffer (EOVERFLOW, the kernel says how much it needs) grows
    it, up to the kernel's 16 MiB cap."""

    __slots__ = ("args", "calls", "fs", "size")

    def __init__(self, fs: _Fs, size: int) -> None:
        self.fs = fs
        self.size = size
        self.args = bytearray(_SEARCH_V2_HEAD + size)
        self.calls = 0

    def __call__(self, key: bytes) -> tuple[memoryview, int]:
        self.calls += 1
        while True:
            args = self.args
            args[: len(key)] = key
            struct.pack_into("=Q", args, tree.SEARCH_KEY.size, self.size)
            try:
                self.fs.ioctl("BTRFS_IOC_TREE_SEARCH_V2", BTRFS_IOC_TREE_SEARCH_V2, args)
            except BtrfsIoctlError as e:
                (needed,) = struct.unpack_from("=Q", args, tree.SEARCH_KEY.size)
                if e.errno != errno.EOVERFLOW or not self.size < needed <= _SEARCH_MAX_BUFFER:
                    raise
                self.size = needed
                self.args = bytearray(_SEARCH_V2_HEAD + needed)
                continue
            (found,) = struct.unpack_from("=I", args, 64)
            return memoryview(args)[_SEARCH_V2_HEAD:], found


def _open_subvolume(path: str) -> int:
    """An fd of the subvolume root at ``path``, not through a symlink at its end;
    ``NotASubvolume`` (an OSError) when it is not one."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    if os.fstat(fd).st_ino != SUBVOLUME_ROOT_INO:
        os.close(fd)
        raise OSError(errno.EINVAL, "Not a btrfs subvolume", path)
    return fd


def set_readonly(path: str, value: bool) -> None:
    """Set or clear the subvolume's read-only flag: ``BTRFS_IOC_SUBVOL_GETFLAGS`` then
    ``BTRFS_IOC_SUBVOL_SETFLAGS`` (Linux 3.0+; what ``btrfs property set PATH ro`` does),
    no process. ``OSError`` with the kernel's reason."""
    fd = _open_subvolume(path)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, BTRFS_IOC_SUBVOL_GETFLAGS, buf, True)
        (flags,) = struct.unpack("=Q", buf)
        new = flags | BTRFS_SUBVOL_RDONLY if value else flags & ~BTRFS_SUBVOL_RDONLY
        if new != flags:
            fcntl.ioctl(fd, BTRFS_IOC_SUBVOL_SETFLAGS, bytearray(struct.pack("=Q", new)), True)
    finally:
        os.close(fd)


def destroy_subvolume(path: str, expect: os.stat_result) -> None:
    """Destroy the subvolume at ``path`` with ``BTRFS_IOC_SNAP_DESTROY`` on its parent
    folder (every kernel with btrfs; what ``btrfs subvolume delete`` does), no process.
    The parent is opened without following a symlink at its end, and the name in it
    must still be the subvolume root ``expect`` (device and inode) that the caller saw:
    otherwise nothing is destroyed. ``OSError`` with the kernel's reason."""
    parent, name = os.path.split(os.path.normpath(path))
    raw = os.fsencode(name)
    if not raw or raw in (b".", b"..") or len(raw) >= _VOL_ARGS_SIZE - 8:
        raise OSError(errno.EINVAL, "not a subvolume's name", path)
    pfd = os.open(parent or "/", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.stat(raw, dir_fd=pfd, follow_symlinks=False)
        if (st.st_dev, st.st_ino) != (expect.st_dev, expect.st_ino):
            raise OSError(errno.ESTALE, "the path changed since it was checked", path)
        args = bytearray(_VOL_ARGS_SIZE)
        args[8 : 8 + len(raw)] = raw
        fcntl.ioctl(pfd, BTRFS_IOC_SNAP_DESTROY, args, True)
    finally:
        os.close(pfd)


def _fsid(fd: int) -> bytes:
    """The btrfs filesystem's uuid of an open file (BTRFS_IOC_FS_INFO, Linux 3.1+); empty
    when it is not on btrfs."""
    args = bytearray(_FS_INFO_SIZE)
    try:
        fcntl.ioctl(fd, BTRFS_IOC_FS_INFO, args, True)
    except OSError:
        return b""
    return bytes(args[16:32])


# ---------------------------------------------------------------------- subvolume otime


def otime_via_subvol_info(fd: int) -> datetime | None:
    """Creation time of the subvolume open at ``fd`` (kernel >= 4.18, unprivileged)."""
    buf = bytearray(_SUBVOL_INFO_SIZE)
    fcntl.ioctl(fd, BTRFS_IOC_GET_SUBVOL_INFO, buf, True)
    sec, nsec = struct.unpack_from("=QI", buf, _SUBVOL_INFO_OTIME)
    return tree.timestamp(sec, nsec)


def otime_via_tree_search(fd: int) -> datetime | None:
    """Creation time of the subvolume open at ``fd`` from its root item (any kernel with
    btrfs; needs CAP_SYS_ADMIN). What btrfs-progs itself does on old kernels: the tree
    id from BTRFS_IOC_INO_LOOKUP (treeid 0: the fd's own), then the ROOT_ITEM."""
    lookup = bytearray(_INO_LOOKUP_SIZE)
    struct.pack_into("=2Q", lookup, 0, 0, SUBVOLUME_ROOT_INO)
    fcntl.ioctl(fd, BTRFS_IOC_INO_LOOKUP, lookup, True)
    (tree_id,) = struct.unpack_from("=Q", lookup, 0)

    args = bytearray(_SEARCH_ARGS_SIZE)
    key = tree.pack_search_key(
        tree.ROOT_TREE_OBJECTID,
        (tree_id, tree.ROOT_ITEM_KEY, 0),
        (tree_id, tree.ROOT_ITEM_KEY, _U64_MAX),
        16,
    )
    args[: len(key)] = key
    fcntl.ioctl(fd, BTRFS_IOC_TREE_SEARCH, args, True)
    (found,) = struct.unpack_from("=I", args, 64)
    otime: datetime | None = None
    for item in tree.iter_items(memoryview(args)[tree.SEARCH_KEY.size :], found):
        if item.objectid == tree_id and item.type == tree.ROOT_ITEM_KEY:
            info = tree.decode_root_item(item.data)
            otime = tree.timestamp(*info.otime) if info.otime else None
    return otime


class Ioctls:
    """The listings and facts read by ioctl. ``search_buffer_bytes`` is the result buffer
    of one BTRFS_IOC_TREE_SEARCH_V2 (the items of 10,000 subvolumes take about 6 MB, so
    about 25 searches at 256 KiB)."""

    def __init__(self, *, search_buffer_bytes: int = 256 * 1024) -> None:
        if not _SEARCH_MIN_BUFFER <= search_buffer_bytes <= _SEARCH_MAX_BUFFER:
            raise ValueError(
                f"search_buffer_bytes must be within {_SEARCH_MIN_BUFFER}..{_SEARCH_MAX_BUFFER}"
            )
        self._search_buffer_bytes = search_buffer_bytes
        # False once BTRFS_IOC_TREE_SEARCH_V2 was refused (ENOTTY/EINVAL) where v1 worked.
        self._search_v2 = True

    def list_subvolumes(self, mount: str) -> list[SubvolumeRecord]:
        """Every subvolume of the filesystem mounted at ``mount`` but the top level, by
        id: ROOT_ITEM and ROOT_BACKREF items of the root tree (tree search), and one
        BTRFS_IOC_INO_LOOKUP per directory holding subvolumes (not per subvolume).

        The root tree is the whole filesystem's, whatever subvolume is mounted at
        ``mount``: paths are relative to the top level. A subvolume being dropped (no
        backref any more) is not listed. See ``agent.host.btrfs_listing.RootTree``.
        """
        # parsing and ioctls on the mounted filesystem only (``agent.collector``); the
        # items are let go before the collector runs again: it then walks the records only
        with _Fs(mount) as fs, collector.paused():
            listing = RootTree()
            self._walk(
                fs,
                tree.ROOT_TREE_OBJECTID,
                (tree.FIRST_FREE_OBJECTID, tree.ROOT_ITEM_KEY, 0),
                (tree.BTRFS_LAST_FREE_OBJECTID, tree.ROOT_BACKREF_KEY, _U64_MAX),
                listing.page,
            )
            records = listing.records(fs.ino_lookup)
            del listing
        return records

    def list_scope(
        self, mount: str, *, ids: Collection[int] = (), folder: str | None = None
    ) -> list[SubvolumeRecord]:
        """The part of ``list_subvolumes`` that a delete of ``ids`` (subvolume ids) or of
        the folder ``folder`` (a local path) touches, as the full listing gives it:
        those subvolumes, the subvolumes at or inside ``folder``, everything nested in
        them, and every subvolume that holds one of them up to the top level.

        No walk of the whole root tree: per subvolume, a search of its own keys (root
        item, backref, and the forward refs that name its children); for ``folder``,
        ``BTRFS_IOC_INO_LOOKUP`` for the subvolume holding it and its place there, and
        the forward refs of that subvolume (its direct children: what it costs grows
        with those, not with the filesystem). A ``folder`` on another filesystem than
        the one at ``mount`` (or on none that is btrfs) adds nothing."""
        with _Fs(mount) as fs:
            roots = set(ids)
            if folder is not None:
                roots |= self._inside_folder(fs, folder)
            listing = RootTree()
            seen: set[int] = set()
            holders: set[int] = set()
            # down: the subvolumes asked for and everything nested in them
            todo = {r for r in roots if r >= tree.FIRST_FREE_OBJECTID}
            while todo:
                sid = todo.pop()
                seen.add(sid)
                kids, parent = self._one_root(fs, sid, listing)
                todo |= kids - seen
                if parent is not None:
                    holders.add(parent)
            # up: every subvolume holding one of them, to the top level
            up = {p for p in holders if p >= tree.FIRST_FREE_OBJECTID} - seen
            while up:
                sid = up.pop()
                seen.add(sid)
                _, parent = self._one_root(fs, sid, listing)
                if parent is not None and parent >= tree.FIRST_FREE_OBJECTID and parent not in seen:
                    up.add(parent)
            return listing.records(fs.ino_lookup)

    def _one_root(self, fs: _Fs, sid: int, listing: RootTree) -> tuple[set[int], int | None]:
        """Feed subvolume ``sid``'s root item and backref to ``listing``; (its children
        by forward ref, its parent by backref)."""
        kids: set[int] = set()
        parent: list[int] = []

        def page(buf: tree.Buffer, nr_items: int) -> tree.Key:
            last = listing.page(buf, nr_items)
            for item in tree.iter_items(buf, nr_items):
                if item.type == tree.ROOT_REF_KEY and item.objectid == sid:
                    kids.add(item.offset)
                elif item.type == tree.ROOT_BACKREF_KEY and item.objectid == sid:
                    parent.append(item.offset)
            return last

        self._walk(
            fs,
            tree.ROOT_TREE_OBJECTID,
            (sid, tree.ROOT_ITEM_KEY, 0),
            (sid, tree.ROOT_REF_KEY, _U64_MAX),
            page,
        )
        return kids, (parent[0] if len(parent) == 1 else None)

    def _inside_folder(self, fs: _Fs, folder: str) -> set[int]:
        """The subvolumes at or directly under ``folder`` (those nested deeper hang from
        these): the subvolume holding the folder when the folder is its root, else the
        children of that subvolume whose place in it lies inside the folder."""
        try:
            fd = os.open(_arg(folder), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return set()
        except OSError as e:
            raise BtrfsIoctlError("open", folder, e) from e
        try:
            if _fsid(fd) != _fsid(fs.fd):
                return set()
            ino = os.fstat(fd).st_ino
            args = bytearray(_INO_LOOKUP_SIZE)
            struct.pack_into("=2Q", args, 0, 0, tree.FIRST_FREE_OBJECTID)
            try:
                fcntl.ioctl(fd, BTRFS_IOC_INO_LOOKUP, args, True)
            except OSError as e:
                raise BtrfsIoctlError("BTRFS_IOC_INO_LOOKUP", folder, e) from e
        finally:
            os.close(fd)
        (holder,) = struct.unpack_from("=Q", args, 0)
        if ino == SUBVOLUME_ROOT_INO:
            return {holder}
        place = fs.ino_lookup(holder, ino)
        if place is None:
            raise BtrfsIoctlError(
                "BTRFS_IOC_INO_LOOKUP",
                folder,
                OSError(errno.ENAMETOOLONG, "the folder's place cannot be read"),
            )
        refs: list[tuple[int, int, bytes]] = []

        def page(buf: tree.Buffer, nr_items: int) -> tree.Key:
            item: tree.SearchItem | None = None
            for item in tree.iter_items(buf, nr_items):
                if item.type == tree.ROOT_REF_KEY and len(item.data) >= tree.ROOT_REF.size:
                    dirid, _, name_len = tree.ROOT_REF.unpack_from(item.data, 0)
                    name = item.data[tree.ROOT_REF.size : tree.ROOT_REF.size + name_len]
                    refs.append((item.offset, dirid, name))
            assert item is not None
            return (item.objectid, item.type, item.offset)

        self._walk(
            fs,
            tree.ROOT_TREE_OBJECTID,
            (holder, tree.ROOT_REF_KEY, 0),
            (holder, tree.ROOT_REF_KEY, _U64_MAX),
            page,
        )
        dirs: dict[int, bytes | None] = {}
        out: set[int] = set()
        for child, dirid, name in refs:
            if dirid not in dirs:
                dirs[dirid] = (
                    b"" if dirid == tree.FIRST_FREE_OBJECTID else fs.ino_lookup(holder, dirid)
                )
            where = dirs[dirid]
            # a child whose place cannot be read is taken in: more is checked, not less
            if where is None or (where + name + b"/").startswith(place):
                out.add(child)
        return out

    def default_subvolume(self, mount: str) -> int:
        """The default subvolume's id: the root tree's "default" entry (what ``btrfs
        subvolume get-default`` reads), the top level when there is none."""
        found: list[int] = []

        def item(it: tree.SearchItem) -> None:
            found.extend(oid for name, oid in tree.decode_dir_items(it.data) if name == b"default")

        with _Fs(mount) as fs:
            self._walk(
                fs,
                tree.ROOT_TREE_OBJECTID,
                (tree.ROOT_TREE_DIR_OBJECTID, tree.DIR_ITEM_KEY, 0),
                (tree.ROOT_TREE_DIR_OBJECTID, tree.DIR_ITEM_KEY, _U64_MAX),
                tree.page_items(item),
            )
        return found[0] if found else tree.FS_TREE_OBJECTID

    def still_dropping(self, mount: str, ids: Collection[int]) -> set[int]:
        """Which of the deleted subvolumes ``ids`` the kernel is still cleaning (their
        root item stays until the cleaner has freed their space): a search of the root
        tree over their id range only."""
        if not ids:
            return set()
        with _Fs(mount) as fs:
            listing = RootTree()
            self._walk(
                fs,
                tree.ROOT_TREE_OBJECTID,
                (min(ids), tree.ROOT_ITEM_KEY, 0),
                (max(ids), tree.ROOT_BACKREF_KEY, _U64_MAX),
                listing.page,
            )
            return listing.dropping() & set(ids)

    # The ranges a change mark covers: what list_subvolumes, default_subvolume and
    # qgroups read (the subvolumes' root items and backrefs, the root tree's "default"
    # entry, the quota status and level-0 qgroups).
    _MARKED: tuple[tuple[int, tree.Key, tree.Key], ...] = (
        (
            tree.ROOT_TREE_OBJECTID,
            (tree.FIRST_FREE_OBJECTID, tree.ROOT_ITEM_KEY, 0),
            (tree.BTRFS_LAST_FREE_OBJECTID, tree.ROOT_BACKREF_KEY, _U64_MAX),
        ),
        (
            tree.ROOT_TREE_OBJECTID,
            (tree.ROOT_TREE_DIR_OBJECTID, tree.DIR_ITEM_KEY, 0),
            (tree.ROOT_TREE_DIR_OBJECTID, tree.DIR_ITEM_KEY, _U64_MAX),
        ),
        (
            tree.QUOTA_TREE_OBJECTID,
            (0, tree.QGROUP_STATUS_KEY, 0),
            (0, tree.QGROUP_INFO_KEY, (1 << tree.QGROUP_LEVEL_SHIFT) - 1),
        ),
    )

    def change_mark(self, mount: str, since: ChangeMark | None = None) -> ChangeMark:
        """A ``ChangeMark`` of the filesystem mounted at ``mount``: equal to ``since``
        (a mark of the same filesystem) when nothing listed changed since it was read.

        Tree searches with ``min_transid`` (every kernel with the tree search has it):
        from ``since`` on, the kernel reads only the blocks written in the newest
        generation ``since`` saw or later, so an unchanged filesystem costs a few block
        reads whatever the number of subvolumes (the first mark reads the ranges whole).
        A subvolume made, deleted, renamed or flagged read-only changes the root tree at
        once; what is written inside a subvolume moves its root item, and the qgroups,
        when the transaction commits (as the listing itself sees it). No quota tree
        (quotas off) is marked as such."""
        out: list[tuple[int, bytes]] = []
        with _Fs(mount) as fs:
            for i, (tree_id, start, end) in enumerate(self._MARKED):
                min_transid = since.ranges[i][0] if since and len(since.ranges) > i else 0
                blocks = BlockDigest()
                try:
                    self._walk(
                        fs,
                        tree_id,
                        start,
                        end,
                        blocks.page,
                        min_transid=min_transid,
                        buffer_bytes=min(_MARK_BUFFER, self._search_buffer_bytes)
                        if min_transid
                        else None,
                    )
                except BtrfsIoctlError as e:
                    if tree_id == tree.QUOTA_TREE_OBJECTID and e.errno == errno.ENOENT:
                        out.append((0, b"quotas off"))
                        continue
                    raise
                out.append(blocks.result(min_transid))
        return ChangeMark(tuple(out))

    def qgroups(self, mount: str) -> QgroupReport | None:
        """Every level-0 qgroup by subvolume id (stale ones included) and the quota
        status, from the quota tree; None when quotas are off (no quota tree: ENOENT).
        Never enables quotas."""
        with _Fs(mount) as fs:
            quota = QuotaTree()
            try:
                self._walk(
                    fs,
                    tree.QUOTA_TREE_OBJECTID,
                    (0, tree.QGROUP_STATUS_KEY, 0),
                    (0, tree.QGROUP_INFO_KEY, (1 << tree.QGROUP_LEVEL_SHIFT) - 1),
                    quota.page,
                )
            except BtrfsIoctlError as e:
                if e.errno == errno.ENOENT:
                    return None
                raise
            return quota.report()

    def _walk(
        self,
        fs: _Fs,
        tree_id: int,
        start: tree.Key,
        end: tree.Key,
        page: tree.PageFn,
        *,
        min_transid: int = 0,
        buffer_bytes: int | None = None,
    ) -> None:
        """A tree search over ``start``..``end``: BTRFS_IOC_TREE_SEARCH_V2 with a large
        buffer, or v1 (3992 bytes of results a call) where the kernel refuses v2
        (ENOTTY or EINVAL on the first call; v2 is in every kernel since 3.15).
        ``buffer_bytes``: v2's result buffer when not the configured one."""
        n, m = _U32_MAX, min_transid
        if self._search_v2:
            search = _SearchV2(fs, buffer_bytes or self._search_buffer_bytes)
            try:
                tree.walk(search, tree_id, start, end, page, nr_items=n, min_transid=m)
                return
            except BtrfsIoctlError as e:
                if search.calls != 1 or e.errno not in (errno.ENOTTY, errno.EINVAL):
                    raise
                v2_error = e
            # v2 unknown to this kernel, or this is not btrfs at all: v1 tells which.
            try:
                tree.walk(_SearchV1(fs), tree_id, start, end, page, nr_items=n, min_transid=m)
            except BtrfsIoctlError as e:
                if e.errno == errno.ENOTTY:
                    raise v2_error from None
                raise
            self._search_v2 = False
            return
        tree.walk(_SearchV1(fs), tree_id, start, end, page, nr_items=n, min_transid=m)

    def created_at(self, path: str) -> datetime | None:
        """The subvolume's own creation time (its root item's ``otime``, what ``btrfs
        subvolume show`` prints as "Creation time"), read with ioctls, no process.

        Not the birth time of the root directory (statx ``STATX_BTIME``): a snapshot's root
        directory is a copy of its source's, birth time included, so every Docker layer
        would look as old as the first layer it was made from.

        Kernel >= 4.18: ``BTRFS_IOC_GET_SUBVOL_INFO`` (any user). Older kernels (Linux 4.4
        on NAS boxes): ``BTRFS_IOC_INO_LOOKUP`` + ``BTRFS_IOC_TREE_SEARCH`` on the root
        tree, which needs CAP_SYS_ADMIN. None when the path is not a subvolume (or a
        symlink), is gone, the caller lacks the privilege, or the filesystem was made by
        a kernel too old to record it (< 3.6).
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if os.fstat(fd).st_ino != SUBVOLUME_ROOT_INO:
                return None
            try:
                return otime_via_subvol_info(fd)
            except OSError as e:
                if e.errno != errno.ENOTTY:  # ENOTTY: kernel older than 4.18
                    return None
            try:
                return otime_via_tree_search(fd)
            except OSError:
                return None
        finally:
            os.close(fd)

    def commit(self, mount: str) -> None:
        """``BTRFS_IOC_SYNC`` on the mount (what ``btrfs filesystem sync`` calls; every
        kernel with btrfs has it): commits the running transaction, no process."""
        try:
            fd = os.open(_arg(mount), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise BtrfsUnavailable(f"cannot open {mount}: {e.strerror}") from e
        try:
            fcntl.ioctl(fd, BTRFS_IOC_SYNC)
        except OSError as e:
            raise BtrfsCommandError(["BTRFS_IOC_SYNC", mount], e.errno or 1, "", str(e)) from e
        finally:
            os.close(fd)
