"""Plans and job results: ``build_plan`` over the findings of a snapshot of the fakes,
``job_state``, and the round trip through the state store (names and paths that are not
UTF-8 survive it: the store, like JSON, holds only valid Unicode)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from agent.domain.findings import Finding, Target
from agent.domain.plans import (
    OPS,
    Action,
    ActionResult,
    Deleted,
    Plan,
    Skip,
    build_plan,
    job_state,
)
from agent.store.audit import normalize_json_object
from shared.policy import FINDING_KINDS, REPORT_ONLY_KINDS, Policy
from tests.agent.domain.scenes import EveryKind, every_kind, findings, snapshot

ODD = os.fsdecode(b"/d/btrfs/subvolumes/caf\xe9\xff\n-x")
NOW = datetime(2024, 5, 1, tzinfo=UTC)


def test_a_plan_with_names_that_are_not_utf8_round_trips() -> None:
    target = Target("subvolume", os.path.basename(ODD), 300, ODD)
    action = Action(
        1, "f", "orphan-layer", "delete_subvolumes", target, (300,), 1, "u", ((300, 7),)
    )
    folder = Action(
        2,
        "g",
        "orphan-layer-folder",
        "remove_folder",
        Target("folder", None, None, ODD),
        (),
        0,
        "u",
        (),
    )
    plan = Plan(
        "p", NOW, NOW, (action, folder), (Skip("h", f"in_use: {ODD} is mounted"),), Policy()
    )
    stored = normalize_json_object(plan.to_json())  # raises on a string JSON cannot hold
    back = Plan.from_json(stored)
    assert back.actions == plan.actions
    assert back.actions[0].target.path == ODD and back.actions[0].target.name == target.name
    assert "\ufffd" in back.skipped[0].reason
    folder.describe().encode("utf-8")  # the audit log's target is valid text


def test_a_result_that_deleted_such_a_name_round_trips() -> None:
    result = ActionResult(1, "failed", f"{ODD}: EPERM", 10, (Deleted(300, ODD), Deleted(301, None)))
    back = ActionResult.from_json(normalize_json_object(result.to_json()))
    assert back.deleted == result.deleted
    assert back.detail.encode("utf-8")


# --------------------------------------------------------------------------- build_plan


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[EveryKind, list[Finding]]:
    """A finding of every kind, two hours old, found under a policy of age 0."""
    scene = every_kind()
    snap = snapshot(scene.sc, tmp_path_factory.mktemp("state"))
    return scene, findings(snap, scene.sc, min_age_seconds=0)


EVERYTHING = Policy(kinds=FINDING_KINDS, min_age_seconds=0)


def plan(found: Sequence[Finding], policy: Policy = EVERYTHING, ttl: int = 900) -> Plan:
    return build_plan(found, policy, plan_id="p1", now=NOW, ttl_seconds=ttl)


def finding(found: Sequence[Finding], name: str | None = None, kind: str | None = None) -> Finding:
    hits = [f for f in found if (name is None or f.target.name == name) and kind in (None, f.kind)]
    assert len(hits) == 1, (name, kind)
    return hits[0]


def test_every_cleanable_finding_becomes_an_action_carrying_what_the_recheck_needs(
    scene: tuple[EveryKind, list[Finding]],
) -> None:
    sk, found = scene
    p = plan(found)
    assert (p.id, p.created_at, p.expires_at, p.policy) == (
        "p1",
        NOW,
        NOW + timedelta(seconds=900),
        EVERYTHING,
    )
    cleanable = [
        f for f in found if not f.blocked_by and not f.named and f.kind not in REPORT_ONLY_KINDS
    ]
    assert {f.kind for f in cleanable} == set(OPS)  # one of each kind that is ever cleaned
    # numbered from 1, in the findings' order
    assert [(a.seq, a.finding_id) for a in p.actions] == [
        (i, f.id) for i, f in enumerate(cleanable, 1)
    ]
    for a, f in zip(p.actions, cleanable, strict=True):
        assert a.kind == f.kind and a.op == OPS[f.kind]
        assert a.target == f.target
        assert a.subvolume_ids == f.subvolume_ids
        assert a.generations == f.generations
        assert a.reclaimable_bytes == f.reclaimable_bytes
        assert a.filesystem_uuid == f.fs_uuid
        assert a.qgroup_ids == f.qgroup_ids
    dind = next(a for a in p.actions if a.kind == "dind-volume")
    assert len(dind.generations) == 7
    assert sorted(dind.subvolume_ids) == [i for i, _ in dind.generations]
    qgroups = next(a for a in p.actions if a.kind == "stale-qgroups")
    assert qgroups.qgroup_ids == (sk.stale_qgroup,) and qgroups.op == "destroy_qgroups"
    # the three left out, each with its reason
    assert {s.finding_id for s in p.skipped} == {f.id for f in found} - {f.id for f in cleanable}
    # a plan keeps all of it through the state store
    assert Plan.from_json(normalize_json_object(p.to_json())) == p


def test_the_ops_cover_every_kind_that_is_not_only_reported() -> None:
    assert set(OPS) | REPORT_ONLY_KINDS == set(FINDING_KINDS)
    assert not set(OPS) & REPORT_ONLY_KINDS


def test_blocked_findings_are_skipped_with_every_reason(
    scene: tuple[EveryKind, list[Finding]],
) -> None:
    sk, found = scene
    kept = finding(found, sk.kept_dind)
    reasons = ("in_use: a tmpfs is mounted inside", "too_young: 10 min since the last write")
    twice = replace(finding(found, sk.sc.dind_volume), blocked_by=reasons)
    p = plan([kept, twice])
    assert p.actions == ()
    assert p.skipped == (
        Skip(kept.id, f"protected: volume {sk.kept_dind} is protected by its label keep=true"),
        Skip(twice.id, "; ".join(reasons)),
    )
    # a policy naming a blocked finding, or including named volumes, does not unblock it
    named_and_kept = Policy(finding_ids=(kept.id,), include_named_volumes=True)
    assert plan(found, named_and_kept).actions == ()


def test_report_only_kinds_are_never_cleaned(scene: tuple[EveryKind, list[Finding]]) -> None:
    _, found = scene
    folder = finding(found, kind="layer-folder")
    assert folder.blocked_by  # always: a layer Docker references
    # even were nothing to block it, and even when the policy names it
    unblocked = replace(folder, blocked_by=())
    p = plan([unblocked], Policy(finding_ids=(folder.id,)))
    assert p.actions == ()
    assert p.skipped == (Skip(folder.id, "report_only: a layer-folder finding is never cleaned"),)


def test_named_volumes_are_planned_only_when_asked_for(
    scene: tuple[EveryKind, list[Finding]],
) -> None:
    sk, found = scene
    named = finding(found, sk.named_dind)
    assert named.named and not named.blocked_by
    skip = next(s for s in plan(found).skipped if s.finding_id == named.id)
    assert skip.reason == (
        f"named: volume {sk.named_dind} has a name someone gave it; plan it with "
        "include_named_volumes, or by its finding id"
    )
    assert named.id not in {a.finding_id for a in plan(found).actions}
    with_named = plan(found, Policy(kinds=FINDING_KINDS, include_named_volumes=True))
    assert named.id in {a.finding_id for a in with_named.actions}
    assert named.id not in {s.finding_id for s in with_named.skipped}
    by_id = plan(found, Policy(finding_ids=(named.id,)))
    assert [(a.seq, a.finding_id, a.op) for a in by_id.actions] == [(1, named.id, "remove_volume")]
    assert by_id.skipped == ()
    # naming another finding does not name this one
    other = finding(found, sk.sc.dind_volume)
    assert [a.finding_id for a in plan(found, Policy(finding_ids=(other.id,))).actions] == [
        other.id
    ]


def test_finding_ids_choose_the_actions_in_their_order_and_unknown_ones_are_not_found(
    scene: tuple[EveryKind, list[Finding]],
) -> None:
    sk, found = scene
    orphan = finding(found, kind="orphan-layer")
    dind = finding(found, sk.sc.dind_volume)
    ids = (orphan.id, "orphan-layer-0000000000000000", dind.id, orphan.id)
    p = plan(found, Policy(finding_ids=ids))
    assert [(a.seq, a.finding_id) for a in p.actions] == [(1, orphan.id), (2, dind.id)]
    assert p.skipped == (Skip("orphan-layer-0000000000000000", "not_found: no such finding now"),)
    empty = plan(found, Policy(finding_ids=()))
    assert empty.actions == () and empty.skipped == ()


def test_no_findings_no_actions() -> None:
    p = plan([], Policy(finding_ids=None))
    assert (p.actions, p.skipped, p.reclaimable_bytes) == ((), (), 0)


@pytest.mark.parametrize("ttl", [1, 900, 86400])
def test_a_plan_expires_ttl_seconds_after_it_was_made(
    scene: tuple[EveryKind, list[Finding]], ttl: int
) -> None:
    p = plan(scene[1], ttl=ttl)
    assert p.created_at == NOW and p.expires_at == NOW + timedelta(seconds=ttl)


def test_a_plans_size_is_unknown_when_an_actions_is(
    scene: tuple[EveryKind, list[Finding]],
) -> None:
    sk, found = scene
    known = [finding(found, sk.sc.dind_volume), finding(found, kind="orphan-layer")]
    assert plan(known).reclaimable_bytes == sum(f.reclaimable_bytes or 0 for f in known) > 0
    dangling = finding(found, sk.dangling_volume)
    assert dangling.reclaimable_bytes is None  # files in _data are the parent's to count
    assert plan([*known, dangling]).reclaimable_bytes is None


# --------------------------------------------------------------------------- job_state


def _result(kind: str, seq: int) -> ActionResult:
    return {
        "deleted": ActionResult(seq, "deleted", "ok", 10, (Deleted(300 + seq, "/d/x"),)),
        "skipped": ActionResult(seq, "skipped", "changed: generation moved"),
        "failed": ActionResult(seq, "failed", "EPERM"),
        "failed part way": ActionResult(seq, "failed", "EROFS", 5, (Deleted(400 + seq, "/d/y"),)),
    }[kind]


@pytest.mark.parametrize(
    ("results", "state"),
    [
        ((), "skipped"),
        (("skipped",), "skipped"),
        (("skipped", "skipped"), "skipped"),
        (("deleted",), "succeeded"),
        (("deleted", "deleted"), "succeeded"),
        (("deleted", "skipped"), "succeeded"),
        (("failed",), "failed"),
        (("failed", "failed"), "failed"),
        (("skipped", "failed"), "failed"),
        (("failed part way",), "partial"),
        (("skipped", "failed part way"), "partial"),
        (("deleted", "failed"), "partial"),
        (("deleted", "failed part way"), "partial"),
        (("failed", "failed part way"), "partial"),
        (("deleted", "skipped", "failed"), "partial"),
        (("deleted", "skipped", "failed part way"), "partial"),
        (("skipped", "failed", "failed part way"), "partial"),
        (("deleted", "failed", "failed part way"), "partial"),
        (("deleted", "skipped", "failed", "failed part way"), "partial"),
    ],
    ids=lambda v: (" + ".join(v) or "nothing") if isinstance(v, tuple) else v,
)
def test_a_jobs_state_from_its_results(results: tuple[str, ...], state: str) -> None:
    done = [_result(kind, seq) for seq, kind in enumerate(results, 1)]
    assert job_state(done) == state
    assert job_state(reversed(done)) == state  # whatever the order
    assert job_state(r for r in done) == state  # any iterable, read once
