"""``Snapshot.delete_order`` and ``Snapshot.subtree`` (agent/domain/snapshot.py) give what
their plain walks gave, on any shape of parents: chains, missing parents, loops (which a
real root tree never has, but a malformed one may: the subtree's walk used to go round
one for ever)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.domain.snapshot import Snapshot, SubvolView
from tests.agent.domain.scenes import snapshot
from tests.fakes import make_leak_scenario

FS = "0b5f"


def plain_delete_order(snap: Snapshot, subs: Iterable[SubvolView]) -> list[SubvolView]:
    def depth(sv: SubvolView) -> int:
        d, cur, seen = 0, sv, set()
        while cur.parent_id not in seen:
            seen.add(cur.parent_id)
            parent = snap.subvolume(cur.fs_uuid, cur.parent_id)
            if parent is None:
                break
            d, cur = d + 1, parent
        return d

    return sorted(subs, key=lambda s: (-depth(s), -len(s.path or ""), s.id))


def plain_subtree(snap: Snapshot, sub_id: int) -> list[SubvolView]:
    """The walk as it was, but each subvolume once: the walk as it was never ended
    where the parents make a loop."""
    out: list[tuple[int, SubvolView]] = []
    stack = [(sub_id, 0)]
    seen: set[int] = set()
    while stack:
        cur, depth = stack.pop()
        sv = snap.subvolume(FS, cur)
        if sv is None or cur in seen:
            continue
        seen.add(cur)
        out.append((depth, sv))
        stack.extend((c, depth + 1) for c in snap.children(FS, cur))
    out.sort(key=lambda t: (-t[0], t[1].id))
    return [sv for _, sv in out]


def view(sub_id: int, parent_id: int, path_len: int) -> SubvolView:
    path = "/v/" + "p" * path_len
    return SubvolView(FS, sub_id, parent_id, path, path, path, False, 1, None, None, None,
                      None, "other", None)  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    """A snapshot of the leak scenario, whose subvolumes each example replaces."""
    return snapshot(make_leak_scenario(), tmp_path_factory.mktemp("state"))


# id -> parent id, over few ids so that chains, missing parents and loops all happen
parents = st.dictionaries(st.integers(256, 270), st.integers(250, 272), min_size=1, max_size=15)


@settings(max_examples=300, deadline=None)
@given(parents, st.data())
def test_the_order_and_the_subtrees_are_the_plain_walks(
    base: Snapshot, links: dict[int, int], data: st.DataObject
) -> None:
    lens = data.draw(st.lists(st.integers(0, 3), min_size=len(links), max_size=len(links)))
    subs = {i: view(i, p, n) for (i, p), n in zip(sorted(links.items()), lens, strict=True)}
    snap = dataclasses.replace(base, subvolumes={FS: subs}, _children={}, _sorted_ids={})
    picked = data.draw(st.lists(st.sampled_from(sorted(subs)), unique=True))
    chosen = [subs[i] for i in picked]
    assert snap.delete_order(chosen) == plain_delete_order(snap, chosen)
    assert snap.delete_order(subs.values()) == plain_delete_order(snap, subs.values())
    for sid in [*subs, 249, 5]:
        assert snap.subtree(FS, sid) == plain_subtree(snap, sid)
