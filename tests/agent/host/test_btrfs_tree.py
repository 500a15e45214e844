"""``agent.host.btrfs_tree``: the decoding of tree-search results, pure.

The kernel's side is emulated here (``EmulatedTree``: sorted items, a search that
returns what ``search_ioctl`` would for a key range, a buffer size and ``nr_items``), the
items are built with the module's encoders, and Hypothesis checks that whatever the
names (``tests.strategies.hostile_names``), the tree and the page sizes, the records
are exactly the subvolumes that were put in, paths byte for byte. The real kernel is in
test_btrfs.py's lab tests.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
from bisect import bisect_left
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import ToolFailed
from agent.host import btrfs_tree as tree
from agent.host.btrfs_listing import BlockDigest, QuotaTree, RootTree
from agent.host.btrfs_tree import (
    BTRFS_LAST_FREE_OBJECTID,
    QGROUP_INFO_KEY,
    QGROUP_STATUS_FLAG_INCONSISTENT,
    QGROUP_STATUS_FLAG_ON,
    QGROUP_STATUS_FLAG_RESCAN,
    QGROUP_STATUS_KEY,
    ROOT_BACKREF_KEY,
    ROOT_ITEM_KEY,
    ROOT_SUBVOL_RDONLY,
    Key,
    SearchItem,
    TreeFormatError,
)
from agent.host.records import Qgroup, QgroupReport, SubvolumeRecord
from tests.agent.host import btrfs_encode as enc
from tests.strategies import SAMPLE_HOSTILE_NAMES, hostile_names

U64 = 2**64 - 1
ROOT_REF_KEY = 156
INODE_ITEM_KEY = 1
ROOT_START: Key = (256, ROOT_ITEM_KEY, 0)
ROOT_END: Key = (BTRFS_LAST_FREE_OBJECTID, ROOT_BACKREF_KEY, U64)


# --------------------------------------------------------------------------- the kernel


class EmulatedTree:
    """A tree's items and ``search_ioctl``'s answer to a search of them: the items whose
    key is within the range (lexicographic), in order, as many as fit ``buf_size`` (32
    bytes of header each plus the item) and ``nr_items``; EOVERFLOW when not even the
    first fits (v2)."""

    def __init__(self, items: dict[Key, bytes], buf_size: int) -> None:
        self.items = items
        self.keys = sorted(items)
        self.buf_size = buf_size
        self.searches: list[tuple[Key, Key]] = []

    def search(self, packed: bytes) -> tuple[bytes, int]:
        _, start, end, nr_items = tree.unpack_search_key(packed)
        self.searches.append((start, end))
        out: list[SearchItem] = []
        used = 0
        i = bisect_left(self.keys, start)
        while i < len(self.keys) and self.keys[i] <= end and len(out) < nr_items:
            key = self.keys[i]
            data = self.items[key]
            if used + 32 + len(data) > self.buf_size:
                if not out:
                    raise OSError(errno.EOVERFLOW, "Value too large for defined data type")
                break
            out.append(SearchItem(key[0], key[1], key[2], 7, data))
            used += 32 + len(data)
            i += 1
        # the rest of the buffer is whatever was there: garbage must not be read
        return enc.encode_items(out) + b"\xa5" * (self.buf_size - used), len(out)


Lookups = dict[tuple[int, int], bytes | None]


def list_tree(
    items: dict[Key, bytes], lookups: Lookups, *, buf_size: int = 4096 - 104
) -> tuple[list[SubvolumeRecord], list[tuple[int, int]]]:
    """What BtrfsTool.list_subvolumes does, over an emulated root tree."""
    kernel = EmulatedTree(items, buf_size)
    listing = RootTree()
    tree.walk(kernel.search, 1, ROOT_START, ROOT_END, listing.page, nr_items=2**32 - 1)
    asked: list[tuple[int, int]] = []

    def lookup(tree_id: int, dirid: int) -> bytes | None:
        asked.append((tree_id, dirid))
        return lookups[(tree_id, dirid)]

    return listing.records(lookup), asked


def root_item(gen: int = 10, **kw: object) -> bytes:
    return enc.encode_root_item(generation=gen, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- keys and pages


def test_search_key_layout() -> None:
    packed = tree.pack_search_key(1, (256, 132, 0), (2**64 - 256, 144, U64), 4096)
    assert len(packed) == 104
    fields = struct.unpack("=7Q4I4Q", packed)
    assert fields[:7] == (1, 256, 2**64 - 256, 0, U64, 0, U64)  # tree, objectids, offsets, transids
    assert fields[7:10] == (132, 144, 4096)  # min_type, max_type, nr_items
    assert tree.unpack_search_key(packed) == (1, (256, 132, 0), (2**64 - 256, 144, U64), 4096)


def test_next_key_is_the_kernels_successor() -> None:
    assert tree.next_key((256, 132, 0)) == (256, 132, 1)
    assert tree.next_key((256, 132, U64)) == (256, 133, 0)
    assert tree.next_key((256, 255, U64)) == (257, 0, 0)
    assert tree.next_key((U64, 255, U64)) is None


def test_a_malformed_result_is_a_tool_failure() -> None:
    with pytest.raises(TreeFormatError) as exc:
        tree.decode_root_item(b"short")
    assert isinstance(exc.value, ToolFailed) and isinstance(exc.value, ValueError)
    assert exc.value.status == 502 and "root item of 5 bytes" in exc.value.detail


def test_items_round_trip_and_truncation_is_refused() -> None:
    items = [SearchItem(300, 132, 0, 9, b"x" * 439), SearchItem(300, 144, 5, 9, b"")]
    buf = enc.encode_items(items)
    assert list(tree.iter_items(buf, 2)) == items
    with pytest.raises(TreeFormatError):
        list(tree.iter_items(buf[:-1] if buf[-1:] else buf[:40], 3))
    with pytest.raises(TreeFormatError):
        list(tree.iter_items(buf[:100], 1))
    listing = RootTree()
    with pytest.raises(TreeFormatError):
        listing.page(buf[:100], 1)


@settings(max_examples=60, deadline=None)
@given(
    keys=st.sets(
        st.tuples(
            st.integers(0, 600), st.sampled_from([1, 12, 132, 144, 156, 255]), st.integers(0, 3)
        ),
        max_size=60,
    ),
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=60),
    buf_size=st.integers(32 + 40, 600),
    start=st.integers(0, 300),
)
def test_walk_returns_every_item_of_the_range_once_in_order(
    keys: set[Key], sizes: list[int], buf_size: int, start: int
) -> None:
    items = {k: bytes([i % 251]) * sizes[i % len(sizes)] for i, k in enumerate(sorted(keys))}
    kernel = EmulatedTree(items, buf_size)
    seen: list[Key] = []
    first, last = (start, 132, 0), (start + 200, 144, 2)
    tree.walk(
        kernel.search,
        1,
        first,
        last,
        tree.page_items(lambda it: seen.append((it.objectid, it.type, it.offset))),
        nr_items=7,
    )
    assert seen == [k for k in sorted(items) if first <= k <= last]


def test_walk_stops_on_an_empty_answer() -> None:
    kernel = EmulatedTree({}, 4096)
    pages = tree.walk(kernel.search, 1, ROOT_START, ROOT_END, RootTree().page, nr_items=10)
    assert pages == 1 and kernel.searches == [(ROOT_START, ROOT_END)]


# --------------------------------------------------------------------------- root items


def test_root_item_layouts() -> None:
    uuid, puuid = bytes(range(1, 17)), bytes(range(17, 33))
    full = root_item(
        42, flags=ROOT_SUBVOL_RDONLY, uuid=uuid, parent_uuid=puuid, ctransid=40,
        ctime=(1_700_000_100, 999_999_999), otime=(1_700_000_000, 123_456_789),
    )  # fmt: skip
    assert len(full) == 439
    # the offsets of include/uapi/linux/btrfs_tree.h's struct btrfs_root_item
    assert struct.unpack_from("<Q", full, 160) == (42,)
    assert struct.unpack_from("<Q", full, 208) == (ROOT_SUBVOL_RDONLY,)
    assert struct.unpack_from("<Q", full, 239) == (42,)  # generation_v2
    assert full[247:263] == uuid and full[263:279] == puuid
    assert struct.unpack_from("<Q", full, 295) == (40,)
    assert struct.unpack_from("<QI", full, 327) == (1_700_000_100, 999_999_999)
    assert struct.unpack_from("<QI", full, 339) == (1_700_000_000, 123_456_789)
    info = tree.decode_root_item(full)
    assert info == tree.RootInfo(
        42, 1, uuid, puuid, 40, (1_700_000_100, 999_999_999), (1_700_000_000, 123_456_789)
    )
    v0 = root_item(42, v0=True)
    assert len(v0) == 239
    assert tree.decode_root_item(v0) == tree.RootInfo(42, 0, None, None, None, None, None)
    stale = root_item(42, uuid=uuid, generation_v2=41)  # rewritten by a kernel < 3.6
    assert tree.decode_root_item(stale).uuid is None
    with pytest.raises(TreeFormatError):
        tree.decode_root_item(v0[:238])


def test_timestamps() -> None:
    assert tree.timestamp(0, 0) is None  # unset (filesystems made before 3.6)
    assert tree.timestamp(1, 1_000_000_000) is None  # not a time
    assert tree.timestamp(2**63, 0) is None  # out of range
    t = tree.timestamp(1_700_000_000, 123_456_789)
    assert t == datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC)
    assert t is not None and t.tzinfo is UTC


@settings(max_examples=300)
@given(sec=st.integers(1, 2**34), nsec=st.integers(0, 999_999_999))
def test_timestamps_are_exact_to_the_microsecond(sec: int, nsec: int) -> None:
    expected = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=sec, microseconds=nsec // 1000)
    assert tree.timestamp(sec, nsec) == expected


def test_ino_lookup_answers() -> None:
    assert tree.decode_ino_lookup(b"\0" + b"x" * 100) == b""
    assert tree.decode_ino_lookup(b"a/b c/\0garbage") == b"a/b c/"
    assert tree.decode_ino_lookup(b"new\nline/\xff/\0") == b"new\nline/\xff/"
    assert tree.decode_ino_lookup(b"no-nul/") is None
    assert tree.decode_ino_lookup(b"no-slash\0") is None
    assert tree.decode_ino_lookup(b"/abs/\0") is None
    assert tree.decode_ino_lookup(b"a//b/\0") is None


# --------------------------------------------------------------------------- listings


@dataclass
class Model:
    """Subvolumes as they were made: what the listing must give back."""

    items: dict[Key, bytes] = field(default_factory=dict)
    lookups: dict[tuple[int, int], bytes | None] = field(default_factory=dict)
    expected: dict[int, SubvolumeRecord] = field(default_factory=dict)
    paths: dict[int, bytes] = field(default_factory=lambda: {5: b""})

    def add(
        self,
        sid: int,
        parent: int,
        name: bytes,
        *,
        dirid: int = 256,
        dirpath: bytes = b"",
        gen: int = 10,
        ro: bool = False,
        uuid: bytes | None = None,
        puuid: bytes = bytes(16),
        otime: tuple[int, int] = (1_700_000_000, 5_000),
        ctime: tuple[int, int] = (1_700_000_001, 0),
    ) -> None:
        uuid = uuid if uuid is not None else sid.to_bytes(16, "little")
        self.items[(sid, ROOT_ITEM_KEY, 0)] = root_item(
            gen, flags=ROOT_SUBVOL_RDONLY if ro else 0, uuid=uuid, parent_uuid=puuid,
            ctransid=gen, ctime=ctime, otime=otime,
        )  # fmt: skip
        ref = enc.encode_root_backref(dirid, name)
        self.items[(sid, ROOT_BACKREF_KEY, parent)] = ref
        self.items[(parent, ROOT_REF_KEY, sid)] = ref  # the forward ref, in the range too
        if dirid != 256:
            self.lookups[(parent, dirid)] = dirpath
        base = self.paths[parent]
        path = (base + b"/" if base else b"") + dirpath + name
        self.paths[sid] = path
        self.expected[sid] = SubvolumeRecord(
            id=sid,
            parent_id=parent,
            generation=gen,
            uuid=None if uuid == bytes(16) else _uuid(uuid),
            parent_uuid=None if puuid == bytes(16) else _uuid(puuid),
            read_only=ro,
            created_at=tree.timestamp(*otime),
            changed_at=tree.timestamp(*ctime),
            ctransid=gen,
            path=os.fsdecode(path),
        )


def _uuid(raw: bytes) -> str:
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@st.composite
def models(draw: st.DrawFn) -> Model:
    """A random forest of subvolumes with hostile names, in folders with hostile names,
    ids not in creation order (a subvolume moved below a later one), plus what else the
    root tree's range holds: forward refs, a dropped subvolume, free-space inodes."""
    m = Model()
    n = draw(st.integers(1, 25))
    ids = draw(st.permutations(range(256, 256 + n)))
    ids = [i + draw(st.integers(0, 3)) * 1000 for i in ids]
    made: list[int] = []
    names_in: dict[tuple[int, bytes], set[bytes]] = {}
    for sid in ids:
        parent = draw(st.sampled_from([5, *made]))
        in_folder = draw(st.booleans())
        dirid, dirpath = 256, b""
        if in_folder:
            parts = draw(st.lists(hostile_names(), min_size=1, max_size=3))
            dirid = 1000 + len(m.lookups) + 1
            dirpath = b"/".join(parts) + b"/"
        taken = names_in.setdefault((parent, dirpath), set())
        name = draw(hostile_names().filter(lambda b, taken=taken: b not in taken))
        taken.add(name)
        m.add(
            sid, parent, name, dirid=dirid, dirpath=dirpath,
            gen=draw(st.integers(1, 2**40)), ro=draw(st.booleans()),
            uuid=draw(st.binary(min_size=16, max_size=16)),
            puuid=draw(st.one_of(st.just(bytes(16)), st.binary(min_size=16, max_size=16))),
            otime=(draw(st.integers(1, 2**33)), draw(st.integers(0, 999_999_999))),
            ctime=(draw(st.integers(0, 2**33)), draw(st.integers(0, 999_999_999))),
        )  # fmt: skip
        made.append(sid)
    # a subvolume being dropped: its root item stays, its backref is gone
    m.items[(99_999, ROOT_ITEM_KEY, 0)] = root_item(3)
    # v1 space cache inodes live in the root tree too
    for objectid in draw(st.lists(st.integers(256, 5000), max_size=3)):
        m.items.setdefault((objectid, INODE_ITEM_KEY, 0), b"\0" * 160)
    return m


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=models(), buf_size=st.integers(500, 20_000))
def test_listing_round_trips_hostile_names_byte_for_byte(model: Model, buf_size: int) -> None:
    records, asked = list_tree(model.items, model.lookups, buf_size=buf_size)
    assert records == [model.expected[i] for i in sorted(model.expected)]
    for rec in records:
        assert rec.path is not None
        assert os.fsencode(rec.path) == model.paths[rec.id]
    # one lookup per folder holding subvolumes, none for a tree's root directory
    assert sorted(asked) == sorted(set(asked)) == sorted(model.lookups)


def test_every_sample_name_in_one_listing() -> None:
    m = Model()
    m.add(256, 5, b"<FS_TREE>")  # a real folder-like name at the top level
    sid = 257
    for name in SAMPLE_HOSTILE_NAMES:
        m.add(sid, 256, name)
        sid += 1
    m.add(sid, 256, b"inside", dirid=300, dirpath=b"<FS_TREE>/new\nline/\xff/")
    records, _ = list_tree(m.items, m.lookups)
    assert records == [m.expected[i] for i in sorted(m.expected)]
    assert records[-1].path is not None
    assert os.fsencode(records[-1].path) == b"<FS_TREE>/<FS_TREE>/new\nline/\xff/inside"


def test_dropped_subvolumes_are_not_listed() -> None:
    m = Model()
    m.add(256, 5, b"kept")
    m.items[(257, ROOT_ITEM_KEY, 0)] = root_item(11)  # deleted: no backref any more
    records, _ = list_tree(m.items, m.lookups)
    assert [r.id for r in records] == [256]


def test_pre_3_6_root_items_have_no_uuid_nor_times() -> None:
    m = Model()
    m.add(256, 5, b"old")
    m.items[(256, ROOT_ITEM_KEY, 0)] = root_item(8, flags=ROOT_SUBVOL_RDONLY, v0=True)
    [rec] = list_tree(m.items, m.lookups)[0]
    assert rec == SubvolumeRecord(256, 5, 8, None, None, True, None, None, None, "old")


def test_a_failed_lookup_leaves_the_path_unknown_below_it_only() -> None:
    m = Model()
    m.add(256, 5, b"docker")
    m.add(257, 256, b"a", dirid=400, dirpath=b"deep/")
    m.add(258, 257, b"child-of-a")
    m.add(259, 256, b"b", dirid=401, dirpath=b"other/")
    m.lookups[(256, 400)] = None  # ENAMETOOLONG, or the tree went away
    records, _ = list_tree(m.items, m.lookups)
    paths = {r.id: r.path for r in records}
    assert paths == {256: "docker", 257: None, 258: None, 259: "docker/other/b"}
    assert all(r.parent_id == m.expected[r.id].parent_id for r in records)


def test_no_guess_on_two_backrefs_a_bad_name_or_a_missing_parent() -> None:
    m = Model()
    m.add(256, 5, b"twice")
    m.items[(256, ROOT_BACKREF_KEY, 300)] = enc.encode_root_backref(256, b"again")
    m.add(257, 5, b"bad")
    m.items[(257, ROOT_BACKREF_KEY, 5)] = enc.encode_root_backref(256, b"a/b")
    m.add(258, 5, b"orphan")
    del m.items[(258, ROOT_BACKREF_KEY, 5)]
    m.items[(258, ROOT_BACKREF_KEY, 777)] = enc.encode_root_backref(256, b"orphan")
    m.add(259, 5, b"fine")
    m.add(260, 259, b"short")
    m.items[(260, ROOT_BACKREF_KEY, 259)] = enc.encode_root_backref(256, b"short")[:-2]
    records, _ = list_tree(m.items, m.lookups)
    paths = {r.id: r.path for r in records}
    assert paths == {256: None, 257: None, 258: None, 259: "fine", 260: None}
    # the parents are still the kernel's (the first backref of one linked twice)
    assert {r.id: r.parent_id for r in records} == {256: 5, 257: 5, 258: 777, 259: 5, 260: 259}


def test_deep_nesting_needs_no_recursion() -> None:
    m = Model()
    depth = 5000
    # created deepest first, so every parent has a higher id than its child
    for level in range(depth):
        sid = 256 + depth - 1 - level
        parent = 5 if level == 0 else sid + 1
        m.add(sid, parent, b"d")
    records, _ = list_tree(m.items, m.lookups, buf_size=1 << 20)
    assert len(records) == depth
    assert records[0].path == "/".join(["d"] * depth)


def test_a_loop_of_backrefs_gives_no_path() -> None:
    m = Model()
    m.add(256, 5, b"a")
    m.add(257, 256, b"b")
    m.items[(256, ROOT_BACKREF_KEY, 257)] = m.items.pop((256, ROOT_BACKREF_KEY, 5))
    records, _ = list_tree(m.items, m.lookups)
    assert [r.path for r in records] == [None, None]


# --------------------------------------------------------------------------- quota tree


def quota_tree(items: dict[Key, bytes]) -> QgroupReport:
    kernel = EmulatedTree(items, 4096 - 104)
    quota = QuotaTree()
    tree.walk(
        kernel.search, 8, (0, QGROUP_STATUS_KEY, 0), (0, QGROUP_INFO_KEY, (1 << 48) - 1),
        quota.page, nr_items=4096,
    )  # fmt: skip
    return quota.report()


def test_qgroups_of_level_0_stale_ones_included() -> None:
    items = {
        (0, QGROUP_STATUS_KEY, 0): enc.encode_qgroup_status(QGROUP_STATUS_FLAG_ON),
        (0, QGROUP_INFO_KEY, 5): enc.encode_qgroup_info(16384, 16384),
        (0, QGROUP_INFO_KEY, 256): enc.encode_qgroup_info(3 << 20, 1 << 20),
        (0, QGROUP_INFO_KEY, 999): enc.encode_qgroup_info(0, 0),  # its subvolume is gone
        (0, QGROUP_INFO_KEY, (1 << 48) | 100): enc.encode_qgroup_info(9, 9),  # 1/100
        (0, 244, 256): b"\0" * 40,  # a limit item: outside the range
        (256, 246, (1 << 48) | 100): b"",  # a relation: outside the range
    }
    report = quota_tree(items)
    assert dict(report) == {
        5: Qgroup(5, 16384, 16384),
        256: Qgroup(256, 3 << 20, 1 << 20),
        999: Qgroup(999, 0, 0),
    }
    assert not report.inconsistent and not report.rescanning
    assert struct.unpack_from("<5Q", items[(0, QGROUP_INFO_KEY, 256)]) == (
        0, 3 << 20, 3 << 20, 1 << 20, 1 << 20,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "inconsistent", "rescanning"),
    [
        (QGROUP_STATUS_FLAG_ON, False, False),
        (QGROUP_STATUS_FLAG_ON | QGROUP_STATUS_FLAG_INCONSISTENT, True, False),
        (QGROUP_STATUS_FLAG_ON | QGROUP_STATUS_FLAG_RESCAN, False, True),
        (None, True, False),  # no status item: nothing can be trusted
    ],
)
def test_quota_status(flags: int | None, inconsistent: bool, rescanning: bool) -> None:
    items = {(0, QGROUP_INFO_KEY, 5): enc.encode_qgroup_info(1, 1)}
    if flags is not None:
        items[(0, QGROUP_STATUS_KEY, 0)] = enc.encode_qgroup_status(flags)
    report = quota_tree(items)
    assert (report.inconsistent, report.rescanning) == (inconsistent, rescanning)
    assert report == QgroupReport(
        {5: Qgroup(5, 1, 1)}, inconsistent=inconsistent, rescanning=rescanning
    )
    assert report != QgroupReport({5: Qgroup(5, 1, 1)}, inconsistent=not inconsistent)


def test_short_qgroup_items_are_refused() -> None:
    with pytest.raises(TreeFormatError):
        quota_tree({(0, QGROUP_INFO_KEY, 5): b"\0" * 39})
    with pytest.raises(TreeFormatError):
        quota_tree({(0, QGROUP_STATUS_KEY, 0): b"\0" * 16})


@settings(max_examples=60, deadline=None)
@given(
    items=st.lists(
        st.tuples(st.sampled_from([7, 8, 9]), st.integers(0, 50)), min_size=0, max_size=40
    ),
    cut=st.integers(0, 40),
    slack=st.integers(0, 64),
)
def test_block_digest_hashes_each_generations_items_in_order(
    items: list[tuple[int, int]], cut: int, slack: int
) -> None:
    """The digest of a generation is that of its items' bytes (header and data) in
    the order the pages gave them, however the items of generations interleave and
    however the result is cut into pages; the unused rest of the buffer is not read."""
    found = [
        SearchItem(transid, 256 + i, i, ROOT_ITEM_KEY, bytes([i % 251]) * size)
        for i, (transid, size) in enumerate(items)
    ]
    pages = [found[: min(cut, len(found))], found[min(cut, len(found)) :]]
    digest = BlockDigest()
    for page in pages:
        if page:
            buf = bytearray(enc.encode_items(page)) + b"\xff" * slack
            digest.page(memoryview(buf), len(page))
    want: dict[int, hashlib._Hash] = {}
    for it in found:
        h = want.setdefault(it.transid, hashlib.blake2b(digest_size=16))
        h.update(enc.encode_items([it]))
    if not found:
        assert digest.result(5) == (5, b"")
    else:
        newest = max(want)
        assert digest.result(5) == (newest, want[newest].digest())
    with pytest.raises(TreeFormatError):
        BlockDigest().page(enc.encode_items(found[:1] or [SearchItem(7, 1, 0, 1, b"ab")])[:-1], 1)
