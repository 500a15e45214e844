"""Pure decoding of what btrfs's tree-search ioctl returns.

``agent.host.btrfs_ioctl`` runs the ioctls (``BTRFS_IOC_TREE_SEARCH_V2`` /
``_TREE_SEARCH``, ``BTRFS_IOC_INO_LOOKUP``); everything here is a function of bytes: from
a result buffer to items (``iter_items``), items to fields (``decode_root_item``, ...),
and the paging of a search (``walk``) over a search function given to it. From items to
subvolume records and qgroups: ``agent.host.btrfs_listing``.
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
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import NamedTuple, TypeAlias

from agent.errors import ToolFailed

__all__ = [
    "BTRFS_LAST_FREE_OBJECTID",
    "DIR_ITEM_KEY",
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
    "ROOT_REF_KEY",
    "ROOT_SUBVOL_RDONLY",
    "ROOT_TREE_DIR_OBJECTID",
    "ROOT_TREE_OBJECTID",
    "SEARCH_HEADER",
    "SEARCH_KEY",
    "Key",
    "RootInfo",
    "SearchItem",
    "TreeFormatError",
    "decode_dir_items",
    "decode_ino_lookup",
    "decode_qgroup_info",
    "decode_qgroup_status",
    "decode_root_item",
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
ROOT_TREE_DIR_OBJECTID = 6  # the root tree's directory: its "default" entry
DIR_ITEM_KEY = 84
ROOT_ITEM_KEY = 132
ROOT_BACKREF_KEY = 144
ROOT_REF_KEY = 156  # key (parent, 156, child): the forward ref of a subvolume in its parent
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
HEADER_NO_TRANSID = struct.Struct("=8x2Q2I")  # objectid, offset, type, len
assert SEARCH_KEY.size == 104 and SEARCH_HEADER.size == HEADER_NO_TRANSID.size == 32

# struct btrfs_root_item, the fields read here (little endian, packed): generation (160),
# flags (208); generation_v2 (239), uuid (247), parent_uuid (263), ctransid (295),
# ctime (327: sec, nsec), otime (339: sec, nsec).
ROOT_V0 = struct.Struct("<160xQ40xQ")
ROOT_FULL = struct.Struct("<160xQ40xQ23xQ16s16s16xQ24xQIQI")
assert ROOT_V0.size == 216 and ROOT_FULL.size == 351
ROOT_REF = struct.Struct("<QQH")  # dirid, sequence, name_len: 18 bytes
QGROUP_STATUS = struct.Struct("<4Q")  # version, generation, flags, rescan
QGROUP_INFO = struct.Struct("<5Q")  # generation, rfer, rfer_cmpr, excl, excl_cmpr
ZERO_UUID = bytes(16)

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


def pack_search_key(
    tree_id: int, start: Key, end: Key, nr_items: int, *, min_transid: int = 0
) -> bytes:
    """A ``struct btrfs_ioctl_search_key`` for the range ``start``..``end`` of a tree.
    ``min_transid``: only the items of tree blocks written in that transaction or
    later (the kernel skips older subtrees without reading them; every item of a block
    it reads is returned, with the block's generation as ``transid``)."""
    return SEARCH_KEY.pack(
        tree_id, start[0], end[0], start[2], end[2], min_transid, _U64_MAX,
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
    search: SearchFn,
    tree_id: int,
    start: Key,
    end: Key,
    page: PageFn,
    *,
    nr_items: int,
    min_transid: int = 0,
) -> int:
    """Every item of ``tree_id`` from ``start`` to ``end``, page after page, handed to
    ``page``, as btrfs-progs iterates (``list_subvol_search``): each search starts just
    after the last item of the one before (``next_key``) and the walk stops when one
    finds nothing or the range is done. Items come in key order, of every type in the
    range. Returns the number of searches run. A page's buffer is reused by the next
    search: ``page`` must copy what it keeps. ``min_transid``: see ``pack_search_key``."""
    key: Key | None = start
    searches = 0
    while key is not None and key <= end:
        data, found = search(pack_search_key(tree_id, key, end, nr_items, min_transid=min_transid))
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
        if sec < FLOAT_EXACT:
            # sec + usec / 1e6 as a double is within 0.5 us of the exact value below
            # 2**32 s, and fromtimestamp rounds to the nearest microsecond: exact, and
            # three times quicker than the datetime arithmetic below.
            return fromtimestamp(sec + (nsec // 1000) / 1e6, UTC)
        return _EPOCH + timedelta(seconds=sec, microseconds=nsec // 1000)
    except (OverflowError, ValueError, OSError):
        return None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NO_V2 = (None, None, None)  # created_at, changed_at, ctransid of a pre-3.6 root item
FLOAT_EXACT = 2**32
fromtimestamp = datetime.fromtimestamp


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
        gen, flags, gen2, uuid, puuid, ctransid, csec, cnsec, osec, onsec = ROOT_FULL.unpack_from(
            data
        )
        if gen2 == gen:
            return RootInfo(
                gen,
                flags,
                None if uuid == ZERO_UUID else uuid,
                None if puuid == ZERO_UUID else puuid,
                ctransid,
                (csec, cnsec),
                (osec, onsec),
            )
        return RootInfo(gen, flags, None, None, None, None, None)
    if n < ROOT_ITEM_V0_SIZE:
        raise TreeFormatError(f"root item of {n} bytes (at least {ROOT_ITEM_V0_SIZE} expected)")
    gen, flags = ROOT_V0.unpack_from(data)
    return RootInfo(gen, flags, None, None, None, None, None)


# location (objectid, type, offset), transid, data_len, name_len, type: 30 bytes
DIR_ITEM = struct.Struct("<QBQQHHB")


def decode_dir_items(data: bytes) -> list[tuple[bytes, int]]:
    """(name, location objectid) of each ``struct btrfs_dir_item`` packed in one item
    (names that hash alike share an item)."""
    out: list[tuple[bytes, int]] = []
    pos = 0
    while pos + DIR_ITEM.size <= len(data):
        objectid, _, _, _, data_len, name_len, _ = DIR_ITEM.unpack_from(data, pos)
        pos += DIR_ITEM.size
        if pos + name_len + data_len > len(data):
            raise TreeFormatError(f"dir item truncated: {name_len}+{data_len} at {pos}")
        out.append((data[pos : pos + name_len], objectid))
        pos += name_len + data_len
    return out


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
    if len(data) < QGROUP_STATUS.size:
        raise TreeFormatError(f"qgroup status item of {len(data)} bytes")
    return int(QGROUP_STATUS.unpack_from(data)[2])


def decode_qgroup_info(data: bytes) -> tuple[int, int]:
    """(rfer, excl) of a QGROUP_INFO item."""
    if len(data) < QGROUP_INFO.size:
        raise TreeFormatError(f"qgroup info item of {len(data)} bytes")
    _, rfer, _, excl, _ = QGROUP_INFO.unpack_from(data)
    return rfer, excl
