"""Plans and job results as the state store keeps them: names and paths that are not
UTF-8 survive the round trip (the store, like JSON, holds only valid Unicode)."""

from __future__ import annotations

import os
from datetime import UTC, datetime

from agent.domain.findings import Target
from agent.domain.plans import Action, ActionResult, Deleted, Plan, Skip
from agent.store.audit import normalize_json_object
from shared.policy import Policy

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
