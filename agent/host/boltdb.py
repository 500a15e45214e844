"""A read-only reader of bolt database files (Docker's ``volumes/metadata.db``).

Docker keeps each volume's labels and options in ``<data root>/volumes/metadata.db``, a
bolt (``go.etcd.io/bbolt``) key/value file: bucket ``volumes``, one key per volume name,
its value the JSON ``{"Name", "Driver", "Labels", "Options"}``. The agent reads it for
the volumes of a docker-in-docker daemon whose data root a leaked volume holds, so that
an inner volume labelled keep protects the leak.

Pure: bytes in, values out. The format (bbolt's ``page.go``, ``node.go``, ``bucket.go``,
``db.go``): fixed-size pages, the page size given by the meta pages 0 and 1 (the valid
one with the higher transaction id is current; each has an FNV-1a 64 checksum); a
bucket is a B+tree of branch pages (``pos, ksize, pgid``) and leaf pages (``flags, pos,
ksize, vsize``); a leaf value flagged as a bucket starts with its root page id and a
sequence, and a root page id of 0 means the bucket's one leaf page follows inline.
Anything that does not add up raises ``BoltError``: a caller that must not guess treats
that as "cannot be read". Every walk is bounded (pages visited at most once, a depth
cap).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

MAGIC = 0xED0CDAED
VERSION = 2
_PAGE_HEADER = struct.Struct("<QHHI")  # id, flags, count, overflow
_META = struct.Struct("<IIIIQQQQQ")  # magic version page_size flags root seq freelist pgid txid
_BRANCH_ELEM = struct.Struct("<IIQ")  # pos ksize pgid
_LEAF_ELEM = struct.Struct("<IIII")  # flags pos ksize vsize
_BUCKET_HEADER = struct.Struct("<QQ")  # root pgid, sequence
BRANCH, LEAF, META = 0x01, 0x02, 0x04
BUCKET_LEAF_FLAG = 0x01
MAX_DEPTH = 32


class BoltError(ValueError):
    """The bytes are not a bolt file this reader understands."""


def _fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


class BoltFile:
    """One bolt file's bytes, opened at its current meta page."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        metas: list[tuple[int, int, int]] = []
        first = self._meta_at(0)
        if first is not None:
            metas.append(first)
        # meta page 1 sits one page further; when page 0 is damaged its page size is
        # not known, so every size bolt can use is tried
        sizes = [first[0]] if first else [1 << n for n in range(9, 17)]
        for size in sizes:
            second = self._meta_at(size)
            if second is not None and second[0] == size:
                metas.append(second)
                break
        if not metas:
            raise BoltError("no valid meta page")
        self.page_size, self.root, self.txid = max(metas, key=lambda m: m[2])
        self.pages = len(data) // self.page_size

    def _meta_at(self, offset: int) -> tuple[int, int, int] | None:
        """(page size, root bucket's page, transaction id) of the meta page at
        ``offset``; None when it is not a valid one."""
        head = offset + _PAGE_HEADER.size
        if len(self.data) < head + _META.size + 8:
            return None
        _pid, flags, _count, _over = _PAGE_HEADER.unpack_from(self.data, offset)
        fields = _META.unpack_from(self.data, head)
        (checksum,) = struct.unpack_from("<Q", self.data, head + _META.size)
        magic, version, page_size, _fl, root, _seq, _freelist, _pgid, txid = fields
        if not flags & META or magic != MAGIC or version != VERSION:
            return None
        if _fnv1a64(self.data[head : head + _META.size]) != checksum:
            return None
        if page_size < 512 or page_size & (page_size - 1):
            return None
        return (page_size, root, txid)

    # -- pages ------------------------------------------------------------------------
    def _page(self, pgid: int) -> tuple[int, int, int, int]:
        """(offset, flags, count, end) of page ``pgid`` and its overflow pages."""
        if not 2 <= pgid < self.pages:
            raise BoltError(f"page {pgid} is outside the file")
        offset = pgid * self.page_size
        pid, flags, count, overflow = _PAGE_HEADER.unpack_from(self.data, offset)
        if pid != pgid:
            raise BoltError(f"page {pgid} says it is page {pid}")
        end = offset + (overflow + 1) * self.page_size
        if end > len(self.data):
            raise BoltError(f"page {pgid} runs past the end of the file")
        return offset, flags, count, end

    def _leaf_items(self, offset: int, count: int, end: int) -> Iterator[tuple[int, bytes, bytes]]:
        base = offset + _PAGE_HEADER.size
        if base + count * _LEAF_ELEM.size > end:
            raise BoltError("a leaf page's elements run past the page")
        for i in range(count):
            at = base + i * _LEAF_ELEM.size
            flags, pos, ksize, vsize = _LEAF_ELEM.unpack_from(self.data, at)
            k0 = at + pos
            if k0 + ksize + vsize > end:
                raise BoltError("a leaf element runs past its page")
            yield flags, self.data[k0 : k0 + ksize], self.data[k0 + ksize : k0 + ksize + vsize]

    def _tree_items(
        self, pgid: int, seen: set[int], depth: int = 0
    ) -> Iterator[tuple[int, bytes, bytes]]:
        if depth > MAX_DEPTH:
            raise BoltError("a tree deeper than any bolt file makes")
        if pgid in seen:
            raise BoltError(f"page {pgid} is reached twice")
        seen.add(pgid)
        offset, flags, count, end = self._page(pgid)
        if flags & LEAF:
            yield from self._leaf_items(offset, count, end)
        elif flags & BRANCH:
            base = offset + _PAGE_HEADER.size
            if base + count * _BRANCH_ELEM.size > end:
                raise BoltError("a branch page's elements run past the page")
            for i in range(count):
                _pos, _ksize, child = _BRANCH_ELEM.unpack_from(
                    self.data, base + i * _BRANCH_ELEM.size
                )
                yield from self._tree_items(child, seen, depth + 1)
        else:
            raise BoltError(f"page {pgid} is neither a branch nor a leaf (flags {flags:#x})")

    def _bucket_items(
        self, root: int, inline: bytes | None, seen: set[int], depth: int
    ) -> Iterator[tuple[int, bytes, bytes]]:
        if root != 0:
            yield from self._tree_items(root, seen, depth)
            return
        if inline is None or len(inline) < _PAGE_HEADER.size:
            raise BoltError("an inline bucket without its page")
        sub = BoltFile.__new__(BoltFile)
        sub.data = inline
        sub.page_size = len(inline)
        _pid, flags, count, _over = _PAGE_HEADER.unpack_from(inline, 0)
        if not flags & LEAF:
            raise BoltError("an inline bucket that is not a leaf")
        yield from sub._leaf_items(0, count, len(inline))

    # -- buckets ----------------------------------------------------------------------
    def bucket(self, *path: bytes) -> dict[bytes, bytes]:
        """The plain key/value pairs of the bucket at ``path`` (nested buckets left
        out); ``KeyError`` when there is no such bucket, ``BoltError`` when the file
        does not add up."""
        try:
            return self._bucket(path)
        except struct.error as exc:
            raise BoltError(f"a page cut short: {exc}") from exc

    def _bucket(self, path: tuple[bytes, ...]) -> dict[bytes, bytes]:
        root, inline = self.root, None
        for depth, name in enumerate(path):
            for flags, key, value in self._bucket_items(root, inline, set(), depth):
                if key == name and flags & BUCKET_LEAF_FLAG:
                    if len(value) < _BUCKET_HEADER.size:
                        raise BoltError(f"bucket {name!r}: a header too short")
                    root, _seq = _BUCKET_HEADER.unpack_from(value, 0)
                    inline = value[_BUCKET_HEADER.size :] if root == 0 else None
                    break
            else:
                raise KeyError(b"/".join(path))
        return {
            key: value
            for flags, key, value in self._bucket_items(root, inline, set(), len(path))
            if not flags & BUCKET_LEAF_FLAG
        }


__all__ = ["BoltError", "BoltFile"]
