"""The controller's chain check agrees with the agent's writer, entry for entry."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.store import audit as agent_audit
from shared import auditchain


def chain(n: int) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for seq in range(1, n + 1):
        item = {
            "seq": seq,
            "at": f"2024-05-01T12:00:{seq:02d}.000000Z",
            "actor": "ops",
            "action": "volume.remove",
            "target": f"v{seq}",
            "outcome": "deleted",
            "detail": {"n": seq},
            "prev_hash": items[-1]["hash"] if items else auditchain.GENESIS,
        }
        item["hash"] = auditchain.item_hash(item)
        items.append(item)
    return items


def test_what_the_agents_writer_stores_chains_here(tmp_path: Path) -> None:
    """Entries written by the agent's log and pulled as ``GET /v1/audit`` shows them
    chain under the shared check, from the start and from a remembered head; an edit or
    a gap is found at the entry it touches."""
    log = agent_audit.AuditLog(tmp_path / "audit.db")
    written = [
        log.append(actor="ops", action="volume.delete", target=f"v{i}", outcome="deleted",
                   detail={"n": i, "path": "/v/caf\u00e9\nx"})
        for i in range(6)
    ]  # fmt: skip
    items = [e.to_json() for e in log.page(limit=100)]
    assert [i["hash"] for i in items] == [e.hash for e in written]
    assert auditchain.first_bad_seq(items) is None
    assert auditchain.first_bad_seq(items[2:], after_seq=2, after_hash=items[1]["hash"]) is None
    assert auditchain.first_bad_seq(items[2:], after_seq=2, after_hash="a" * 64) == 3
    edited = [dict(i) for i in items]
    edited[3]["target"] = "/elsewhere"
    assert auditchain.first_bad_seq(edited) == 4
    assert auditchain.first_bad_seq(items[:2] + items[3:]) == 4  # entry 3 is missing
    # the agent's own verify walks the same check
    assert log.verify().ok and log.verify().head == items[-1]["hash"]


@settings(max_examples=60, deadline=None)
@given(
    detail=st.dictionaries(
        st.text(max_size=8),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=8),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=4), inner, max_size=3)
            ),
            max_leaves=6,
        ),
        max_size=4,
    ),
    text=st.text(min_size=1, max_size=12),
    seq=st.integers(min_value=1, max_value=10**9),
)
def test_hash_agrees_with_the_agents_writer(detail: dict[str, Any], text: str, seq: int) -> None:
    """Whatever the content, the hash the agent's log stores is the one recomputed here
    from the entry as the API shows it."""
    with tempfile.TemporaryDirectory() as tmp, agent_audit.AuditLog(Path(tmp) / "a.db") as log:
        entry = log.append(actor=text or "x", action="a", target=text, outcome="o", detail=detail)
        item = entry.to_json()
        assert auditchain.item_hash(item) == entry.hash
        assert auditchain.first_bad_seq([item]) is None
        assert seq >= 1  # the hash covers seq: another seq, another hash
        assert auditchain.item_hash({**item, "seq": item["seq"] + seq}) != entry.hash


def test_entries_the_agents_log_writes_verify_here(tmp_path: Path) -> None:
    t0 = datetime(2024, 5, 1, tzinfo=UTC)
    with agent_audit.AuditLog(tmp_path / "audit.db") as log:
        for i in range(5):
            log.append(
                actor="ops",
                action="plan.apply",
                target=f"t{i}",
                outcome="done",
                detail={"i": i, "name": "ünï"},
                at=t0 + timedelta(seconds=i),
            )
        items = [e.to_json() for e in log.page(limit=10)]
    assert auditchain.first_bad_seq(items) is None
    assert all(auditchain.item_hash(i) == i["hash"] for i in items)


def test_first_bad_seq_finds_each_kind_of_break() -> None:
    items = chain(5)
    assert auditchain.first_bad_seq(items) is None
    assert auditchain.first_bad_seq(items[2:], after_seq=2, after_hash=items[1]["hash"]) is None

    edited = [dict(i) for i in items]
    edited[2]["outcome"] = "refused"  # content no longer matches its hash
    assert auditchain.first_bad_seq(edited) == 3

    rehashed = [dict(i) for i in edited]
    rehashed[2]["hash"] = auditchain.item_hash(rehashed[2])  # next entry no longer links
    assert auditchain.first_bad_seq(rehashed) == 4

    assert auditchain.first_bad_seq(items[:2] + items[3:]) == 4  # a dropped entry
    assert auditchain.first_bad_seq(items[1:]) == 2  # does not start after 0
    assert auditchain.first_bad_seq(items[2:], after_seq=2, after_hash="f" * 64) == 3
