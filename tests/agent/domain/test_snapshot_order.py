"""On any shape of parents (chains, missing parents, loops, which a real root tree never
has but a malformed one may): ``Snapshot.subtree`` (agent/domain/snapshot.py) gives what
the plain walk gives, taking each subvolume once (the walk used to go round a loop for
ever), and ``Snapshot.delete_order`` puts every subvolume after those nested in it, by
depths it keeps that are the plain walk's."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.domain.paths import under_any
from agent.domain.snapshot import Snapshot, SubvolView
from tests.agent.domain.scenes import snapshot
from tests.fakes import make_leak_scenario

FS = "0b5f"


def parents_of(snap: Snapshot, sv: SubvolView) -> tuple[list[int], bool]:
    """``sv``'s parents upwards, each once, and whether they run into a loop."""
    up: list[int] = []
    cur = snap.subvolume(FS, sv.parent_id)
    while cur is not None:
        if cur.id in up or cur.id == sv.id:
            return up, True
        up.append(cur.id)
        cur = snap.subvolume(FS, cur.parent_id)
    return up, False


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


def plain_depth(snap: Snapshot, sv: SubvolView) -> int:
    """How many subvolumes hold ``sv``, walked up one by one (as far as a loop)."""
    d, cur, seen = 0, sv, set()
    while cur.parent_id not in seen:
        seen.add(cur.parent_id)
        parent = snap.subvolume(FS, cur.parent_id)
        if parent is None:
            break
        d, cur = d + 1, parent
    return d


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
def test_subtrees_are_the_plain_walk_and_children_go_first(
    base: Snapshot, links: dict[int, int], data: st.DataObject
) -> None:
    lens = data.draw(st.lists(st.integers(0, 3), min_size=len(links), max_size=len(links)))
    subs = {i: view(i, p, n) for (i, p), n in zip(sorted(links.items()), lens, strict=True)}
    snap = dataclasses.replace(base, subvolumes={FS: subs}, _children={}, _sorted_ids={})
    picked = data.draw(st.lists(st.sampled_from(sorted(subs)), unique=True))
    chosen = [subs[i] for i in picked]
    for given_ in (chosen, list(subs.values())):
        ordered = snap.delete_order(given_)
        assert sorted(s.id for s in ordered) == sorted(s.id for s in given_)
        # deepest first, then longest path, then by id: the order as defined
        defined = sorted(given_, key=lambda s: (-plain_depth(snap, s), -len(s.path or ""), s.id))
        assert ordered == defined
        # children before parents, wherever the parents make no loop
        for i, a in enumerate(ordered):
            for b in ordered[i + 1 :]:
                up, loop = parents_of(snap, b)
                assert loop or a.id not in up, (a.id, b.id)
    for sid in [*subs, 249, 5]:
        assert snap.subtree(FS, sid) == plain_subtree(snap, sid)
    # the depths kept while ordering (asked in the order drawn) are the plain walk's
    for sv in chosen + list(subs.values()):
        assert snap._depth(sv) == plain_depth(snap, sv), sv.id


# roots and paths over a few components, trailing "/" and the root "/" included
component = st.sampled_from(["a", "ab", "b", "a.b"])
abs_path = st.lists(component, max_size=4).map(lambda parts: "/" + "/".join(parts))
root = st.tuples(abs_path, st.booleans()).map(lambda t: t[0] + ("/" if t[1] else ""))


@settings(max_examples=500, deadline=None)
@given(st.lists(root, max_size=3), st.lists(abs_path, min_size=1, max_size=5))
def test_under_roots_answers_as_under_any(
    base: Snapshot, roots: list[str], paths: list[str]
) -> None:
    """``Snapshot.under_roots`` (a set and a ``startswith``) is ``under_any`` over the
    roots: by components, a root written with a trailing "/" holds itself, "/" all."""
    snap = dataclasses.replace(base, roots=tuple(roots))
    for path in paths:
        assert snap.under_roots(path) == under_any(path, roots), (roots, path)
