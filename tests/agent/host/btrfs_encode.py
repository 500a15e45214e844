"""The inverse of ``agent.host.btrfs_tree``'s decoders: what the kernel would return, for
the tests to build search results from."""

from __future__ import annotations

from collections.abc import Iterable

from agent.host.btrfs_tree import (
    QGROUP_INFO,
    QGROUP_STATUS,
    ROOT_FULL,
    ROOT_ITEM_SIZE,
    ROOT_ITEM_V0_SIZE,
    ROOT_REF,
    ROOT_V0,
    SEARCH_HEADER,
    ZERO_UUID,
    SearchItem,
)


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
    uuid: bytes = ZERO_UUID,
    parent_uuid: bytes = ZERO_UUID,
    ctransid: int = 0,
    ctime: tuple[int, int] = (0, 0),
    otime: tuple[int, int] = (0, 0),
    v0: bool = False,
    generation_v2: int | None = None,
) -> bytes:
    """A ``struct btrfs_root_item``: 439 bytes, or the 239 of the pre-3.6 layout."""
    item = bytearray(ROOT_ITEM_V0_SIZE if v0 else ROOT_ITEM_SIZE)
    ROOT_V0.pack_into(item, 0, generation, flags)
    if not v0:
        ROOT_FULL.pack_into(
            item, 0, generation, flags,
            generation if generation_v2 is None else generation_v2,
            uuid, parent_uuid, ctransid, ctime[0], ctime[1], otime[0], otime[1],
        )  # fmt: skip
    return bytes(item)


def encode_root_backref(dirid: int, name: bytes, sequence: int = 0) -> bytes:
    return ROOT_REF.pack(dirid, sequence, len(name)) + name


def encode_qgroup_status(flags: int, *, version: int = 1, generation: int = 0) -> bytes:
    return QGROUP_STATUS.pack(version, generation, flags, 0)


def encode_qgroup_info(rfer: int, excl: int, *, generation: int = 0) -> bytes:
    return QGROUP_INFO.pack(generation, rfer, rfer, excl, excl)
