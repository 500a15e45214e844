"""Pure decoding of what btrfs's tree-search ioctl returns, and the encoders the tests use.

``agent.host.btrfs`` runs the ioctls (``BTRFS_IOC_TREE_SEARCH_V2`` / ``_TREE_SEARCH``,
``BTRFS_IOC_INO_LOOKUP``); everything here is a function of bytes: from a result buffer
to items (``iter_items``), from items to subvolume records (``RootTree``) and qgroups
(``QuotaTree``), and the paging of a search (``walk``) over a search function given to it.
Names stay bytes until the very end, where a path is decoded with ``os.fsdecode``
(surrogateescape), so ``os.fsencode(record.path)`` gives back the exact bytes: no name can
forge a record, whatever bytes it holds (newlines, ``<FS_TREE>``, invalid UTF-8...).

Layouts, all checked against the kernel's headers (Linux 4.4's ``fs/btrfs/ctree.h`` and
``include/uapi/linux/btrfs.h``, in Synology's 4.4 tree too; later kernels moved the
on-disk items to ``include/uapi/linux/btrfs_tree.h``, same layout) and btrfs-progs
(``btrfs-list.c``, ``ioctl.h``). The ioctl structs are in the CPU's byte order, the items
in little endian.

``struct btrfs_ioctl_search_key`` (104 bytes, btrfs.h)::

    0 tree_id  8 min_objectid  16 max_objectid  24 min_offset  32 max_offset
    40 min_transid  48 max_transid  56 u32 min_type  60 u32 max_type  64 u32 nr_items
    68 u32 unused  72 unused1..4 (4 x u64)

The search range is the lexicographic one from (min_objectid, min_type, min_offset) to
(max_objectid, max_type, max_offset): items of every type between are returned, so the
caller filters types. ``nr_items`` is in/out: at most that many; the count returned.
``struct btrfs_ioctl_search_args`` (v1) = key + ``char buf[4096 - 104]``;
``struct btrfs_ioctl_search_args_v2`` = key + ``u64 buf_size`` (at 104) + ``buf`` (at
112; 112 bytes without the buffer, btrfs-progs asserts it). Results in ``buf``, one after
the other: ``struct btrfs_ioctl_search_header`` (32 bytes: u64 transid, u64 objectid,
u64 offset, u32 type, u32 len) followed by ``len`` bytes of the item.

``struct btrfs_root_item`` (ROOT_ITEM_KEY 132, in the root tree, key objectid = the
subvolume id; packed, little endian)::

      0 struct btrfs_inode_item inode (160 bytes)
    160 generation        168 root_dirid   176 bytenr   184 byte_limit  192 bytes_used
    200 last_snapshot     208 flags (BTRFS_ROOT_SUBVOL_RDONLY = 1 << 0)
    216 u32 refs          220 struct btrfs_disk_key drop_progress (17)
    237 u8 drop_level     238 u8 level
    --- 239 bytes: the item before Linux 3.6 ("btrfs_root_item_v0" in btrfs-progs) ---
    239 generation_v2     247 uuid[16]   263 parent_uuid[16]   279 received_uuid[16]
    295 ctransid  303 otransid  311 stransid  319 rtransid
    327 ctime {u64 sec; u32 nsec}  339 otime  351 stime  363 rtime
    375 reserved[8]       --- 439 bytes ---

The fields from ``generation_v2`` on are valid only when the item is the full size and
``generation_v2 == generation`` (``btrfs_read_root_item`` in fs/btrfs/root-tree.c: a
kernel older than 3.6 rewriting the item leaves them stale, and the kernel then resets
them, giving the subvolume a new uuid). btrfs-progs only checks the length; this module
follows the kernel, so a stale uuid is None here.

``struct btrfs_root_ref`` (ROOT_BACKREF_KEY 144: key objectid = the subvolume, offset =
the subvolume whose tree holds it): 0 u64 dirid (the directory holding it, an inode of
that tree), 8 u64 sequence, 16 u16 name_len, 18 the name (not NUL-terminated).

Quota tree (tree id 8): ``struct btrfs_qgroup_status_item`` (key (0, 240, 0)): 0 version,
8 generation, 16 flags (ON 1 << 0, RESCAN 1 << 1, INCONSISTENT 1 << 2), 24 rescan; 6.7+
adds 32 enable_gen. ``struct btrfs_qgroup_info_item`` (key (0, 242, qgroupid), qgroupid =
level << 48 | subvolume id): 0 generation, 8 rfer, 16 rfer_cmpr, 24 excl, 32 excl_cmpr.

``BTRFS_IOC_INO_LOOKUP``'s answer (``struct btrfs_ioctl_ino_lookup_args``: u64 treeid,
u64 objectid, ``char name[4080]``) is the directory's path inside its tree with a
trailing "/" ("a/b/"), NUL-terminated, empty for the tree's root directory (inode 256);
ENAMETOOLONG when it does not fit (``btrfs_search_path_in_tree`` in fs/btrfs/ioctl.c).
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, TypeAlias

from agent.errors import ToolFailed
from agent.host.records import Qgroup, QgroupReport, SubvolumeRecord

__all__ = [
    "BTRFS_LAST_FREE_OBJECTID",
    "FIRST_FREE_OBJECTID",
    "FS_TREE_OBJECTID",
    "INO_LOOKUP_PATH_MAX",
    "QGROUP_INFO_KEY",
    "QGROUP_LEVEL_SHIFT",
    "QGROUP_STATUS_FLAG_INCONSISTENT",
    "QGROUP_STATUS_FLAG_ON",
    "QGROUP_STATUS_FLAG_RESCAN",
    "QGROUP_STATUS_KEY",
    "QUOTA_TREE_OBJECTID",
    "ROOT_BACKREF_KEY",
    "ROOT_ITEM_KEY",
    "ROOT_ITEM_SIZE",
    "ROOT_ITEM_V0_SIZE",
    "ROOT_SUBVOL_RDONLY",
    "ROOT_TREE_OBJECTID",
    "SEARCH_HEADER",
    "SEARCH_KEY",
    "Key",
    "QuotaTree",
    "RootInfo",
    "RootTree",
    "SearchItem",
    "TreeFormatError",
    "decode_ino_lookup",
    "decode_qgroup_info",
    "decode_qgroup_status",
    "decode_root_item",
    "encode_items",
    "encode_qgroup_info",
    "encode_qgroup_status",
    "encode_root_backref",
    "encode_root_item",
    "iter_items",
    "next_key",
    "pack_search_key",
    "page_items",
    "timestamp",
    "unpack_search_key",
    "walk",
]

# Tree ids and key types (ctree.h in 4.4, btrfs_tree.h since 4.12).
ROOT_TREE_OBJECTID = 1
FS_TREE_OBJECTID = 5  # the top level
QUOTA_TREE_OBJECTID = 8
FIRST_FREE_OBJECTID = 256  # the first subvolume id, and every tree's root directory inode
BTRFS_LAST_FREE_OBJECTID = 2**64 - 256  # (u64)-256
ROOT_ITEM_KEY = 132
ROOT_BACKREF_KEY = 144
QGROUP_STATUS_KEY = 240
QGROUP_INFO_KEY = 242
ROOT_SUBVOL_RDONLY = 1 << 0
QGROUP_STATUS_FLAG_ON = 1 << 0
QGROUP_STATUS_FLAG_RESCAN = 1 << 1
QGROUP_STATUS_FLAG_INCONSISTENT = 1 << 2
QGROUP_LEVEL_SHIFT = 48
INO_LOOKUP_PATH_MAX = 4080
ROOT_ITEM_V0_SIZE = 239
ROOT_ITEM_SIZE = 439
_U64_MAX = 2**64 - 1
_U8_MAX = 255

# struct btrfs_ioctl_search_key and struct btrfs_ioctl_search_header (CPU byte order).
SEARCH_KEY = struct.Struct("=7Q4I4Q")
SEARCH_HEADER = struct.Struct("=3Q2I")
_HEADER_NO_TRANSID = struct.Struct("=8x2Q2I")  # objectid, offset, type, len
assert SEARCH_KEY.size == 104 and SEARCH_HEADER.size == _HEADER_NO_TRANSID.size == 32

# struct btrfs_root_item, the fields read here (little endian, packed): generation (160),
# flags (208); generation_v2 (239), uuid (247), parent_uuid (263), ctransid (295),
# ctime (327: sec, nsec), otime (339: sec, nsec).
_ROOT_V0 = struct.Struct("<160xQ40xQ")
_ROOT_FULL = struct.Struct("<160xQ40xQ23xQ16s16s16xQ24xQIQI")
assert _ROOT_V0.size == 216 and _ROOT_FULL.size == 351
_ROOT_REF = struct.Struct("<QQH")  # dirid, sequence, name_len: 18 bytes
_QGROUP_STATUS = struct.Struct("<4Q")  # version, generation, flags, rescan
_QGROUP_INFO = struct.Struct("<5Q")  # generation, rfer, rfer_cmpr, excl, excl_cmpr
_ZERO_UUID = bytes(16)

Buffer: TypeAlias = bytes | bytearray | memoryview
Key = tuple[int, int, int]  # (objectid, type, offset): btrfs orders keys this way


class TreeFormatError(ToolFailed, ValueError):
    """A search result that cannot come from a sane kernel (a truncated buffer, an item
    shorter than its struct): a 502, as unparseable tool output is. Never caused by a
    name."""

    code, title = "btrfs_unexpected_output", "Unexpected btrfs output"


class SearchItem(NamedTuple):
    """One item of a search result: its key, the transid of its leaf, its bytes."""

    objectid: int
    type: int
    offset: int
    transid: int
    data: bytes


# ---------------------------------------------------------------------------- search keys


def pack_search_key(tree_id: int, start: Key, end: Key, nr_items: int) -> bytes:
    """A ``struct btrfs_ioctl_search_key`` for the range ``start``..``end`` of a tree,
    any transid."""
    return SEARCH_KEY.pack(
        tree_id, start[0], end[0], start[2], end[2], 0, _U64_MAX,
        start[1], end[1], nr_items, 0, 0, 0, 0, 0,
    )  # fmt: skip


def unpack_search_key(buf: Buffer) -> tuple[int, Key, Key, int]:
    """(tree_id, start, end, nr_items) of a packed search key (the first 104 bytes)."""
    f = SEARCH_KEY.unpack_from(buf, 0)
    return f[0], (f[1], f[7], f[3]), (f[2], f[8], f[4]), f[9]


def next_key(key: Key) -> Key | None:
    """The smallest key after ``key`` (None after the last possible one), as the kernel
    advances in ``copy_to_sk``: offset, then type, then objectid."""
    objectid, kind, offset = key
    if offset < _U64_MAX:
        return (objectid, kind, offset + 1)
    if kind < _U8_MAX:
        return (objectid, kind + 1, 0)
    if objectid < _U64_MAX:
        return (objectid + 1, 0, 0)
    return None


def iter_items(buf: Buffer, nr_items: int) -> Iterator[SearchItem]:
    """The ``nr_items`` results in ``buf`` (the result area of the args: what follows the
    key for v1, the key and ``buf_size`` for v2)."""
    view = memoryview(buf).cast("B")
    size = len(view)
    unpack = SEARCH_HEADER.unpack_from
    head = SEARCH_HEADER.size
    pos = 0
    for _ in range(nr_items):
        if pos + head > size:
            raise TreeFormatError(f"search result truncated: header at {pos} of {size}")
        transid, objectid, offset, kind, length = unpack(view, pos)
        pos += head
        end = pos + length
        if end > size:
            raise TreeFormatError(f"search result truncated: item of {length} at {pos}")
        yield SearchItem(objectid, kind, offset, transid, bytes(view[pos:end]))
        pos = end


SearchFn = Callable[[bytes], tuple[Buffer, int]]
"""Runs one search: takes a packed search key, returns (result area, nr_items found)."""

PageFn = Callable[[Buffer, int], Key]
"""Takes one page of results (result area, nr_items >= 1), returns the last item's key."""


def walk(
    search: SearchFn, tree_id: int, start: Key, end: Key, page: PageFn, *, nr_items: int
) -> int:
    """Every item of ``tree_id`` from ``start`` to ``end``, page after page, handed to
    ``page``, as btrfs-progs iterates (``list_subvol_search``): each search starts just
    after the last item of the one before (``next_key``) and the walk stops when one
    finds nothing or the range is done. Items come in key order, of every type in the
    range. Returns the number of searches run. A page's buffer is reused by the next
    search: ``page`` must copy what it keeps."""
    key: Key | None = start
    searches = 0
    while key is not None and key <= end:
        data, found = search(pack_search_key(tree_id, key, end, nr_items))
        searches += 1
        if found == 0:
            break
        key = next_key(page(data, found))
    return searches


def page_items(page: Callable[[SearchItem], None]) -> PageFn:
    """A ``PageFn`` calling ``page`` with every item of each page."""

    def consume(buf: Buffer, nr_items: int) -> Key:
        item: SearchItem | None = None
        for item in iter_items(buf, nr_items):
            page(item)
        assert item is not None
        return (item.objectid, item.type, item.offset)

    return consume


# ---------------------------------------------------------------------------- items


def timestamp(sec: int, nsec: int) -> datetime | None:
    """A ``struct btrfs_timespec`` as an aware UTC datetime, truncated to the microsecond;
    None when unset (0) or out of range."""
    if sec == 0 or nsec >= 1_000_000_000:
        return None
    try:
        if sec < _FLOAT_EXACT:
            # sec + usec / 1e6 as a double is within 0.5 us of the exact value below
            # 2**32 s, and fromtimestamp rounds to the nearest microsecond: exact, and
            # three times quicker than the datetime arithmetic below.
            return _fromtimestamp(sec + (nsec // 1000) / 1e6, UTC)
        return _EPOCH + timedelta(seconds=sec, microseconds=nsec // 1000)
    except (OverflowError, ValueError, OSError):
        return None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NO_V2 = (None, None, None)  # created_at, changed_at, ctransid of a pre-3.6 root item
_FLOAT_EXACT = 2**32
_fromtimestamp = datetime.fromtimestamp


class RootInfo(NamedTuple):
    """The fields of a ``struct btrfs_root_item`` a subvolume record needs. The last
    five are None for an item of the pre-3.6 layout, or one whose extended fields are
    stale (``generation_v2 != generation``)."""

    generation: int
    flags: int
    uuid: bytes | None  # None also when all zero
    parent_uuid: bytes | None
    ctransid: int | None
    ctime: tuple[int, int] | None  # (sec, nsec)
    otime: tuple[int, int] | None


def decode_root_item(data: bytes) -> RootInfo:
    """A ROOT_ITEM's bytes. TreeFormatError when shorter than the pre-3.6 layout."""
    n = len(data)
    if n >= ROOT_ITEM_SIZE:
        gen, flags, gen2, uuid, puuid, ctransid, csec, cnsec, osec, onsec = _ROOT_FULL.unpack_from(
            data
        )
        if gen2 == gen:
            return RootInfo(
                gen,
                flags,
                None if uuid == _ZERO_UUID else uuid,
                None if puuid == _ZERO_UUID else puuid,
                ctransid,
                (csec, cnsec),
                (osec, onsec),
            )
        return RootInfo(gen, flags, None, None, None, None, None)
    if n < ROOT_ITEM_V0_SIZE:
        raise TreeFormatError(f"root item of {n} bytes (at least {ROOT_ITEM_V0_SIZE} expected)")
    gen, flags = _ROOT_V0.unpack_from(data)
    return RootInfo(gen, flags, None, None, None, None, None)


def decode_ino_lookup(name_field: Buffer) -> bytes | None:
    """The path ``BTRFS_IOC_INO_LOOKUP`` put in its ``name`` field: bytes up to the NUL,
    "" or "a/b/" (trailing "/"). None when it is not of that shape."""
    raw = bytes(name_field)
    end = raw.find(b"\0")
    if end < 0:
        return None
    path = raw[:end]
    if path and (not path.endswith(b"/") or path.startswith(b"/") or b"//" in path):
        return None
    return path


def decode_qgroup_status(data: bytes) -> int:
    """The flags of a QGROUP_STATUS item."""
    if len(data) < _QGROUP_STATUS.size:
        raise TreeFormatError(f"qgroup status item of {len(data)} bytes")
    return int(_QGROUP_STATUS.unpack_from(data)[2])


def decode_qgroup_info(data: bytes) -> tuple[int, int]:
    """(rfer, excl) of a QGROUP_INFO item."""
    if len(data) < _QGROUP_INFO.size:
        raise TreeFormatError(f"qgroup info item of {len(data)} bytes")
    _, rfer, _, excl, _ = _QGROUP_INFO.unpack_from(data)
    return rfer, excl


# ---------------------------------------------------------------------------- root tree

# (tree id, directory inode) -> the directory's path in that tree ("a/b/"), or None when
# it cannot be had (ENAMETOOLONG, a tree being dropped...).
LookupFn = Callable[[int, int], bytes | None]


class RootTree:
    """Subvolumes from the root tree's items: hand it the pages of a walk over
    (256, ROOT_ITEM, 0)..(LAST_FREE, ROOT_BACKREF, max) (``page``), then ask ``records``.

    A subvolume is listed when it has a root item and a backref: one being dropped (its
    root item stays until the cleaner is done) has no backref and is left out. Its
    parent is the backref's offset; its path is the parent's path, the path of the
    backref's directory inside the parent's tree (``lookup``), and its name. Whenever
    any piece cannot be had for sure (the directory's lookup fails, more than one
    backref, a parent not listed, a malformed name), the path is None: never a guess.

    Kept per subvolume: the fields of its root item as one tuple, and (parent, dirid,
    name) of its backref. Each page is copied once and parsed; the other items in the
    range (forward refs, inodes of the free-space cache) are skipped unread.
    """

    __slots__ = ("_ambiguous", "_backrefs", "_roots")

    def __init__(self) -> None:
        # id -> the _ROOT_FULL fields (10), or the _ROOT_V0 ones (2)
        self._roots: dict[int, tuple[Any, ...]] = {}
        # id -> (parent, dirid, name); name None when it is not a name
        self._backrefs: dict[int, tuple[int, int, bytes | None]] = {}
        self._ambiguous: set[int] = set()

    def page(self, buf: Buffer, nr_items: int) -> Key:
        """Take one page of search results; returns its last key."""
        data = bytes(buf)  # one copy: slicing and unpacking bytes is the quickest
        unpack_head = _HEADER_NO_TRANSID.unpack_from
        unpack_full = _ROOT_FULL.unpack_from
        unpack_ref = _ROOT_REF.unpack_from
        roots, backrefs, ambiguous = self._roots, self._backrefs, self._ambiguous
        lo, hi = FIRST_FREE_OBJECTID, BTRFS_LAST_FREE_OBJECTID
        item_key, backref_key = ROOT_ITEM_KEY, ROOT_BACKREF_KEY
        full, v0, ref_size = ROOT_ITEM_SIZE, ROOT_ITEM_V0_SIZE, _ROOT_REF.size
        pos = 0
        objectid = kind = offset = 0
        try:
            for _ in range(nr_items):
                objectid, offset, kind, length = unpack_head(data, pos)
                pos += 32
                if kind == item_key and lo <= objectid <= hi:
                    if length >= full:
                        roots[objectid] = unpack_full(data, pos)
                    elif length >= v0:
                        roots[objectid] = _ROOT_V0.unpack_from(data, pos)
                    else:
                        raise TreeFormatError(f"root item of {length} bytes (at least {v0})")
                elif kind == backref_key and lo <= objectid <= hi:
                    if length < ref_size:
                        raise TreeFormatError(f"root backref of {length} bytes")
                    if objectid in backrefs:  # linked twice? keep the first, trust neither
                        ambiguous.add(objectid)
                        pos += length
                        continue
                    dirid, _, name_len = unpack_ref(data, pos)
                    name = data[pos + ref_size : pos + ref_size + name_len]
                    # a name: 1..255 bytes, no "/" nor NUL, all inside the item
                    good = (
                        0 < name_len <= 255
                        and name_len <= length - ref_size
                        and b"/" not in name
                        and b"\0" not in name
                    )
                    backrefs[objectid] = (offset, dirid, name if good else None)
                pos += length
        except struct.error as e:
            raise TreeFormatError(f"search result truncated at {pos}: {e}") from None
        if pos > len(data):
            raise TreeFormatError(f"search result truncated: {pos} of {len(data)} bytes")
        return (objectid, kind, offset)

    def paths(self, lookup: LookupFn) -> dict[int, bytes | None]:
        """The path of every listed subvolume, relative to the top level, as bytes,
        by id. ``lookup`` is asked once per (tree, directory) whose tree's path is
        known, never for a tree's root directory (inode 256, whose path is empty)."""
        roots, backrefs, ambiguous = self._roots, self._backrefs, self._ambiguous
        done: dict[int, bytes | None] = {FS_TREE_OBJECTID: b""}
        # (parent, dirid) -> the parent's path + "/" + the folder's path in it: what the
        # names of the subvolumes in that folder follow. Docker keeps thousands in one.
        prefixes: dict[tuple[int, int], bytes | None] = {}
        listed = sorted(sid for sid in roots if sid in backrefs)

        def prefix(parent: int, dirid: int) -> bytes | None:
            base = done[parent]
            found: bytes | None = None
            if base is not None:
                inside = b"" if dirid == FIRST_FREE_OBJECTID else lookup(parent, dirid)
                if inside is not None:
                    found = base + b"/" + inside if base else inside
            prefixes[(parent, dirid)] = found
            return found

        def one(sid: int) -> bytes | None:
            parent, dirid, name = backrefs[sid]
            k = (parent, dirid)
            p = prefixes[k] if k in prefixes else prefix(parent, dirid)
            return None if p is None or name is None or sid in ambiguous else p + name

        for sid in listed:
            if sid in done:
                continue
            parent = backrefs[sid][0]
            if parent in done:  # usual: a parent has a lower id than its children
                done[sid] = one(sid)
                continue
            # Walk up to an ancestor whose path is known, then come back down.
            chain = [sid]
            on_chain = {sid}
            cur = parent
            while cur not in done:
                if cur not in roots or cur not in backrefs or cur in on_chain:
                    done[cur] = None  # not listed, or a loop
                    break
                chain.append(cur)
                on_chain.add(cur)
                cur = backrefs[cur][0]
            for child in reversed(chain):
                done[child] = one(child)
        return {sid: done[sid] for sid in listed}

    def records(self, lookup: LookupFn) -> list[SubvolumeRecord]:
        """The listed subvolumes by id, paths decoded as ``os.fsdecode`` does."""
        paths = self.paths(lookup)
        roots, backrefs = self._roots, self._backrefs
        encoding, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
        zero, rdonly, exact = _ZERO_UUID, ROOT_SUBVOL_RDONLY, _FLOAT_EXACT
        fromts, utc, slow_ts = _fromtimestamp, UTC, timestamp
        new = tuple.__new__  # SubvolumeRecord(...) without its Python-level __new__
        rec = SubvolumeRecord
        out: list[SubvolumeRecord] = []
        append = out.append
        for sid, path in paths.items():
            f = roots[sid]
            parent = backrefs[sid][0]
            text = None if path is None else path.decode(encoding, errors)
            if len(f) == 10 and f[2] == f[0]:  # the full item, extended fields valid
                gen, flags, _, uuid, puuid, ctransid, csec, cnsec, osec, onsec = f
                # timestamp(), inlined for the common case (a good part of the time spent)
                created: datetime | None
                changed: datetime | None
                if 0 < osec < exact and onsec < 1_000_000_000:
                    created = fromts(osec + (onsec // 1000) / 1e6, utc)
                else:
                    created = slow_ts(osec, onsec)
                if 0 < csec < exact and cnsec < 1_000_000_000:
                    changed = fromts(csec + (cnsec // 1000) / 1e6, utc)
                else:
                    changed = slow_ts(csec, cnsec)
                if uuid == zero:
                    u = None
                else:
                    h = uuid.hex()
                    u = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
                if puuid == zero:
                    pu = None
                else:
                    h = puuid.hex()
                    pu = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
                head = (sid, parent, gen, u, pu, (flags & rdonly) != 0)
                append(new(rec, (*head, created, changed, ctransid, text)))
            else:
                ro = (f[1] & rdonly) != 0
                append(new(rec, (sid, parent, f[0], None, None, ro, *_NO_V2, text)))
        return out


# ---------------------------------------------------------------------------- quota tree


class QuotaTree:
    """Level-0 qgroups from the quota tree's items (a walk over
    (0, QGROUP_STATUS, 0)..(0, QGROUP_INFO, 2**48 - 1), handed to ``page``), every one,
    whether its subvolume still exists or not."""

    __slots__ = ("_flags", "_groups", "page")

    def __init__(self) -> None:
        self._flags: int | None = None
        self._groups: dict[int, Qgroup] = {}
        self.page = page_items(self._item)

    def _item(self, item: SearchItem) -> None:
        if item.objectid != 0:
            return
        if item.type == QGROUP_STATUS_KEY:
            self._flags = decode_qgroup_status(item.data)
        elif item.type == QGROUP_INFO_KEY and item.offset >> QGROUP_LEVEL_SHIFT == 0:
            rfer, excl = decode_qgroup_info(item.data)
            self._groups[item.offset] = Qgroup(item.offset, rfer, excl)

    def report(self) -> QgroupReport:
        """The qgroups; inconsistent when the status says so or there is no status item
        (the numbers cannot be trusted then), rescanning when a rescan is running."""
        flags = self._flags
        inconsistent = flags is None or bool(flags & QGROUP_STATUS_FLAG_INCONSISTENT)
        rescanning = flags is not None and bool(flags & QGROUP_STATUS_FLAG_RESCAN)
        return QgroupReport(self._groups, inconsistent=inconsistent, rescanning=rescanning)


# ---------------------------------------------------------------------------- encoders
#
# The inverse of the decoders, for the tests: they build what the kernel would return.


def encode_items(items: Iterable[SearchItem]) -> bytes:
    """The result area holding ``items`` one after the other."""
    out = bytearray()
    for it in items:
        out += SEARCH_HEADER.pack(it.transid, it.objectid, it.offset, it.type, len(it.data))
        out += it.data
    return bytes(out)


def encode_root_item(
    *,
    generation: int,
    flags: int = 0,
    uuid: bytes = _ZERO_UUID,
    parent_uuid: bytes = _ZERO_UUID,
    ctransid: int = 0,
    ctime: tuple[int, int] = (0, 0),
    otime: tuple[int, int] = (0, 0),
    v0: bool = False,
    generation_v2: int | None = None,
) -> bytes:
    """A ``struct btrfs_root_item``: 439 bytes, or the 239 of the pre-3.6 layout."""
    item = bytearray(ROOT_ITEM_V0_SIZE if v0 else ROOT_ITEM_SIZE)
    _ROOT_V0.pack_into(item, 0, generation, flags)
    if not v0:
        _ROOT_FULL.pack_into(
            item, 0, generation, flags,
            generation if generation_v2 is None else generation_v2,
            uuid, parent_uuid, ctransid, ctime[0], ctime[1], otime[0], otime[1],
        )  # fmt: skip
    return bytes(item)


def encode_root_backref(dirid: int, name: bytes, sequence: int = 0) -> bytes:
    return _ROOT_REF.pack(dirid, sequence, len(name)) + name


def encode_qgroup_status(flags: int, *, version: int = 1, generation: int = 0) -> bytes:
    return _QGROUP_STATUS.pack(version, generation, flags, 0)


def encode_qgroup_info(rfer: int, excl: int, *, generation: int = 0) -> bytes:
    return _QGROUP_INFO.pack(generation, rfer, rfer, excl, excl)
