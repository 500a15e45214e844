"""From the items of a tree search to what the agent reads: the subvolumes of the root
tree (``RootTree``, names as bytes, paths by BTRFS_IOC_INO_LOOKUP of their folders) and
the qgroups of the quota tree (``QuotaTree``). Pure: the ioctls are the caller's
(``agent.host.btrfs_ioctl``); the layouts are documented in ``agent.host.btrfs_tree``.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from agent.host.btrfs_tree import (
    BTRFS_LAST_FREE_OBJECTID,
    FIRST_FREE_OBJECTID,
    FLOAT_EXACT,
    FS_TREE_OBJECTID,
    HEADER_NO_TRANSID,
    NO_V2,
    QGROUP_INFO_KEY,
    QGROUP_LEVEL_SHIFT,
    QGROUP_STATUS_FLAG_INCONSISTENT,
    QGROUP_STATUS_FLAG_RESCAN,
    QGROUP_STATUS_KEY,
    ROOT_BACKREF_KEY,
    ROOT_FULL,
    ROOT_ITEM_KEY,
    ROOT_ITEM_SIZE,
    ROOT_ITEM_V0_SIZE,
    ROOT_REF,
    ROOT_SUBVOL_RDONLY,
    ROOT_V0,
    SEARCH_HEADER,
    ZERO_UUID,
    Buffer,
    Key,
    SearchItem,
    TreeFormatError,
    decode_qgroup_info,
    decode_qgroup_status,
    fromtimestamp,
    page_items,
    timestamp,
)
from agent.host.records import Qgroup, QgroupReport, SubvolumeRecord

__all__ = ["BlockDigest", "LookupFn", "QuotaTree", "RootTree"]


# ---------------------------------------------------------------------------- root tree

# (tree id, directory inode) -> the directory's path in that tree ("a/b/"), or None when
# it cannot be had (ENAMETOOLONG, a tree being dropped...).
LookupFn = Callable[[int, int], bytes | None]

# What ``RootTree`` keeps of a full root item until ``records``: its bytes from the first
# field ROOT_FULL reads (generation, at 160) to the last, one bytes object of 191 bytes
# instead of the ten objects of its fields (about 460 bytes), unpacked by ``_FULL_PART``
# (ROOT_FULL from there) when the record is made. At 10,000 subvolumes the scan's
# worker kept about 1.3 MB more resident with the fields unpacked while the pages came.
_FULL_AT = 160
_FULL_PART = struct.Struct("<" + ROOT_FULL.format.removeprefix(f"<{_FULL_AT}x"))
assert _FULL_AT + _FULL_PART.size == ROOT_FULL.size


class RootTree:
    """Subvolumes from the root tree's items: hand it the pages of a walk over
    (256, ROOT_ITEM, 0)..(LAST_FREE, ROOT_BACKREF, max) (``page``), then ask ``records``.

    A subvolume is listed when it has a root item and a backref: one being dropped (its
    root item stays until the cleaner is done) has no backref and is left out. Its
    parent is the backref's offset; its path is the parent's path, the path of the
    backref's directory inside the parent's tree (``lookup``), and its name. Whenever
    any piece cannot be had for sure (the directory's lookup fails, more than one
    backref, a parent not listed, a malformed name), the path is None: never a guess.

    Kept per subvolume: the bytes of its root item's fields (``_FULL_PART``; the two
    fields of an old, short item as a tuple), and (parent, dirid, name) of its
    backref. Each page is copied once and parsed; the other items in the range (forward
    refs, inodes of the free-space cache) are skipped unread.
    """

    __slots__ = ("_ambiguous", "_backrefs", "_roots")

    def __init__(self) -> None:
        # id -> the bytes ROOT_FULL's fields are in (``_FULL_PART``), or the ROOT_V0
        # fields (2)
        self._roots: dict[int, bytes | tuple[Any, ...]] = {}
        # id -> (parent, dirid, name); name None when it is not a name
        self._backrefs: dict[int, tuple[int, int, bytes | None]] = {}
        self._ambiguous: set[int] = set()

    def page(self, buf: Buffer, nr_items: int) -> Key:
        """Take one page of search results; returns its last key."""
        data = bytes(buf)  # one copy: slicing and unpacking bytes is the quickest
        unpack_head = HEADER_NO_TRANSID.unpack_from
        part_at, part_end = _FULL_AT, ROOT_FULL.size
        unpack_ref = ROOT_REF.unpack_from
        roots, backrefs, ambiguous = self._roots, self._backrefs, self._ambiguous
        lo, hi = FIRST_FREE_OBJECTID, BTRFS_LAST_FREE_OBJECTID
        item_key, backref_key = ROOT_ITEM_KEY, ROOT_BACKREF_KEY
        full, v0, ref_size = ROOT_ITEM_SIZE, ROOT_ITEM_V0_SIZE, ROOT_REF.size
        pos = 0
        objectid = kind = offset = 0
        try:
            for _ in range(nr_items):
                objectid, offset, kind, length = unpack_head(data, pos)
                pos += 32
                if kind == item_key and lo <= objectid <= hi:
                    if length >= full:
                        roots[objectid] = data[pos + part_at : pos + part_end]
                    elif length >= v0:
                        roots[objectid] = ROOT_V0.unpack_from(data, pos)
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

    def dropping(self) -> set[int]:
        """Ids with a root item and no backref: subvolumes deleted whose space the
        kernel's cleaner has not given back yet (what ``btrfs subvolume list -d`` lists)."""
        return set(self._roots) - set(self._backrefs)

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
        zero, rdonly, exact = ZERO_UUID, ROOT_SUBVOL_RDONLY, FLOAT_EXACT
        fromts, utc, slow_ts = fromtimestamp, UTC, timestamp
        new = tuple.__new__  # SubvolumeRecord(...) without its Python-level __new__
        rec = SubvolumeRecord
        out: list[SubvolumeRecord] = []
        append = out.append
        unpack_part = _FULL_PART.unpack
        for sid, path in paths.items():
            item = roots[sid]
            f = unpack_part(item) if isinstance(item, bytes) else item
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
                append(new(rec, (sid, parent, f[0], None, None, ro, *NO_V2, text)))
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


# ---------------------------------------------------------------------------- change marks


class BlockDigest:
    """The newest tree blocks of a range, from a search with ``min_transid`` (handed to
    ``page``): their generation and a digest of their items (keys, generation and
    bytes), for ``agent.host.records.ChangeMark``.

    Searched again with ``min_transid`` set to that generation, an unchanged range gives
    the same blocks, so the same (generation, digest). Any change to an item in the
    range rewrites its block in the running transaction, whose generation is at least
    that one: a newer generation, or (a block of the same running transaction written
    again) other bytes. An item that moves to another block moves into a new one. The
    kernel reads only the blocks of that generation or newer, and the path to them."""

    __slots__ = ("_digests",)

    def __init__(self) -> None:
        self._digests: dict[int, Any] = {}  # block generation -> hashlib object

    def page(self, buf: Buffer, nr_items: int) -> Key:
        # No copy of the buffer: the items of one block generation that follow each
        # other are hashed in one piece (the same digest as item by item).
        data = buf if isinstance(buf, memoryview) else memoryview(buf)
        size = len(data)
        unpack = SEARCH_HEADER.unpack_from
        head = SEARCH_HEADER.size
        pos = run_start = 0
        run_transid: int | None = None
        transid = objectid = kind = offset = 0
        try:
            for _ in range(nr_items):
                transid, objectid, offset, kind, length = unpack(data, pos)
                end = pos + head + length
                if end > size:
                    raise TreeFormatError(f"search result truncated: item of {length} at {pos}")
                if transid != run_transid:
                    if run_transid is not None:
                        self._feed(run_transid, data[run_start:pos])
                    run_transid, run_start = transid, pos
                pos = end
        except struct.error as e:
            raise TreeFormatError(f"search result truncated at {pos}: {e}") from None
        if run_transid is not None:
            self._feed(run_transid, data[run_start:pos])
        return (objectid, kind, offset)

    def _feed(self, transid: int, items: memoryview) -> None:
        h = self._digests.get(transid)
        if h is None:
            h = self._digests[transid] = hashlib.blake2b(digest_size=16)
        h.update(items)

    def result(self, min_transid: int) -> tuple[int, bytes]:
        """(newest generation, digest of its blocks' items); ``(min_transid, b"")`` when
        the search found nothing."""
        if not self._digests:
            return (min_transid, b"")
        newest = max(self._digests)
        return (newest, self._digests[newest].digest())
