"""``agent.host.boltdb`` on the volume stores a real dockerd wrote (tests/agent/captures/
docker/, see its README), and on those files damaged: a damaged file is a ``BoltError``,
never a wrong answer or another exception."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.host.boltdb import BoltError, BoltFile

CAPTURES = Path(__file__).parent.parent / "captures" / "docker"


def _read(name: str) -> bytes:
    return (CAPTURES / name).read_bytes()


def _labels(db: BoltFile) -> dict[str, dict[str, str]]:
    return {k.decode(): json.loads(v)["Labels"] or {} for k, v in db.bucket(b"volumes").items()}


def test_a_store_with_no_volume() -> None:
    assert BoltFile(_read("metadata-empty.db")).bucket(b"volumes") == {}


def test_three_volumes_in_an_inline_bucket() -> None:
    db = BoltFile(_read("metadata-three-volumes.db"))
    assert _labels(db) == {
        "inner-keep": {"keep": "true"},
        "inner-none": {},
        "inner-plain": {"team": "ci"},
    }
    with pytest.raises(KeyError):
        db.bucket(b"nothing")


def test_four_hundred_volumes_in_a_tree_of_pages() -> None:
    db = BoltFile(_read("metadata-400-volumes.db"))
    labels = _labels(db)
    assert len(labels) == 400
    assert [n for n, lab in labels.items() if lab.get("keep") == "true"] == [
        "inner-0250-" + "x" * 40
    ]
    assert labels["inner-0399-" + "x" * 40] == {"team": "ci-399"}


def test_the_newer_meta_page_wins_and_a_damaged_one_is_passed_over() -> None:
    data = bytearray(_read("metadata-three-volumes.db"))
    page = BoltFile(bytes(data)).page_size
    txids = [struct.unpack_from("<Q", data, off + 16 + 48)[0] for off in (0, page)]
    newer = 0 if txids[0] > txids[1] else page
    data[newer + 16 + 20] ^= 0xFF  # inside the checksummed meta: now invalid
    older = BoltFile(bytes(data))
    assert older.txid == min(txids)
    data[(page - newer) + 16 + 20] ^= 0xFF  # the other one too
    with pytest.raises(BoltError, match="no valid meta page"):
        BoltFile(bytes(data))


def test_a_file_cut_short_or_not_bolt_at_all() -> None:
    data = _read("metadata-400-volumes.db")
    for cut in (0, 100, 4096, 8192 + 10, len(data) // 2):
        with pytest.raises(BoltError):
            BoltFile(data[:cut]).bucket(b"volumes")
    with pytest.raises(BoltError):
        BoltFile(b"SQLite format 3\x00" + bytes(8192))


def test_a_page_that_points_at_itself_is_refused() -> None:
    data = bytearray(_read("metadata-400-volumes.db"))
    db = BoltFile(bytes(data))
    # the volumes bucket's root is a branch page: make its first child point back at it
    ((_flags, _key, value),) = list(db._tree_items(db.root, set()))
    (branch_id, _seq) = struct.unpack_from("<QQ", value, 0)
    off = branch_id * db.page_size
    assert struct.unpack_from("<H", data, off + 8)[0] == 0x01  # a branch page
    struct.pack_into("<Q", data, off + 16 + 8, branch_id)
    with pytest.raises(BoltError, match="reached twice"):
        BoltFile(bytes(data)).bucket(b"volumes")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_damaged_bytes_give_a_bolt_error_or_an_answer_never_another_exception(
    data: st.DataObject,
) -> None:
    raw = bytearray(
        _read(data.draw(st.sampled_from(["metadata-three-volumes.db", "metadata-400-volumes.db"])))
    )
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    try:
        answer = BoltFile(bytes(raw)).bucket(b"volumes")
    except (BoltError, KeyError):
        return
    assert all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in answer.items())
