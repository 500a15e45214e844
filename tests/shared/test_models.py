"""The frozen models built from the shared schemas: one generic loader for all."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest
from marshmallow import ValidationError

from shared import models, schemas
from shared.models import (
    AuditEntry,
    Finding,
    Host,
    Job,
    Plan,
    Policy,
    Subvolume,
    Volume,
    dump,
    load,
    load_page,
)

HOST: dict[str, Any] = {
    "hostname": "nas1",
    "agent_version": "0.3.0",
    "kernel": {"release": "4.4.302+", "rmdir_deletes_subvolumes": False},
    "btrfs_progs_version": "4.4.1",
    "docker": {
        "server_version": "20.10.3",
        "api_version": "1.41",
        "storage_driver": "btrfs",
        "data_root": "/volume1/docker",
    },
    "roots": ["/volume1/docker"],
}

TARGET = {"type": "volume", "name": "v1", "id": None, "path": None}

PLAN: dict[str, Any] = {
    "id": "p1",
    "created_at": "2024-05-01T12:00:00Z",
    "expires_at": "2024-05-01T13:00:00+00:00",
    "actions": [
        {
            "seq": 1,
            "finding_id": "f1",
            "op": "remove_volume",
            "target": TARGET,
            "subvolume_ids": [258, 257],
            "reclaimable_bytes": None,
        }
    ],
    "skipped": [{"finding_id": "f2", "reason": "in_use"}],
    "reclaimable_bytes": None,
    "policy": {"kinds": ["dind-volume"], "min_age_seconds": 0, "protect_labels": []},
}

JOB: dict[str, Any] = {
    "id": "j1",
    "plan_id": "p1",
    "state": "partial",
    "progress": {"done": 2, "total": 2},
    "results": [
        {"seq": 1, "outcome": "deleted", "detail": "ok", "reclaimed_bytes": 5},
        {"seq": 2, "outcome": "failed", "detail": "EROFS", "reclaimed_bytes": None},
    ],
    "reclaimed_bytes": 5,
    "started_at": "2024-05-01T12:00:01Z",
    "finished_at": None,
}


def test_nested_models_tuples_and_datetimes() -> None:
    host = load(Host, HOST)
    assert host.kernel.release == "4.4.302+" and host.docker.data_root == "/volume1/docker"
    assert host.roots == ("/volume1/docker",)
    plan = load(Plan, PLAN)
    assert plan.created_at == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert plan.actions[0].target.name == "v1" and plan.actions[0].subvolume_ids == (258, 257)
    assert plan.policy == Policy(kinds=("dind-volume",), min_age_seconds=0, protect_labels=())
    assert str(plan.actions[0].target) == "volume v1"
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.id = "other"  # type: ignore[misc]


def test_job_helpers() -> None:
    job = load(Job, JOB)
    assert job.finished and job.count("deleted") == 1 and job.count("failed") == 1
    assert not load(Job, {**JOB, "state": "running"}).finished
    assert load(Job, {**JOB, "state": "interrupted"}).finished


def test_unknown_fields_are_dropped_at_every_depth() -> None:
    payload = {**HOST, "uptime": 5, "kernel": {**HOST["kernel"], "arch": "x86_64"}}
    payload["docker"] = {**HOST["docker"], "cgroup": "v1"}
    assert load(Host, payload) == load(Host, HOST)
    page = load_page(
        Plan, {"items": [{**PLAN, "new": 1, "actions": [{**PLAN["actions"][0], "x": 1}]}],
               "next_cursor": None, "total": 1}
    )  # fmt: skip
    assert page.items[0] == load(Plan, PLAN) and page.next_cursor is None


@pytest.mark.parametrize(
    "broken",
    [
        {k: v for k, v in HOST.items() if k != "kernel"},
        {**HOST, "kernel": {"release": "4.4"}},
        {**HOST, "roots": "/volume1"},
        [HOST],
    ],
)
def test_what_breaks_the_contract_is_a_validation_error(broken: Any) -> None:
    with pytest.raises(ValidationError):
        load(Host, broken)


def test_values_outside_the_enums_are_refused() -> None:
    with pytest.raises(ValidationError, match="state"):
        load(Job, {**JOB, "state": "exploded"})


def test_dump_goes_back_to_the_api_shape() -> None:
    assert dump(load(Host, HOST)) == HOST
    again = load(Plan, dump(load(Plan, PLAN)))
    assert again == load(Plan, PLAN)


def test_every_model_mirrors_its_schema() -> None:
    """A field added to a schema and not to its model (or renamed) fails here."""
    seen = set()
    for model in models.iter_models():
        seen.add(model.__name__)
        schema_fields = set(model.__schema__().fields)
        model_fields = {f.name for f in dataclasses.fields(model)}
        if model is Policy:
            schema_fields.discard("finding_ids")  # a plan request's, not a policy's
        assert model_fields == schema_fields, model.__name__
    assert {"Host", "Subvolume", "Volume", "Finding", "Plan", "Job", "AuditEntry"} <= seen


def test_policy_is_validated_with_the_api_schema() -> None:
    assert Policy.parse({}) == Policy()
    assert Policy().kinds == schemas.DEFAULT_PLAN_KINDS
    p = Policy.parse({"kinds": ["orphan-layer"], "min_age_seconds": 60})
    assert p.to_payload() == {
        "kinds": ["orphan-layer"],
        "min_age_seconds": 60,
        "protect_labels": list(schemas.DEFAULT_PROTECT_LABELS),
    }
    for bad in (
        {"kinds": ["everything"]},
        {"kinds": []},
        {"min_age_seconds": -1},
        {"finding_ids": ["x"]},
        {"typo": 1},
    ):
        with pytest.raises(ValidationError):
            Policy.parse(bad)


def test_other_models_load() -> None:
    sub = load(
        Subvolume,
        {
            "id": 257, "parent_id": 5, "path": "/volume1/docker", "read_only": False,
            "generation": 9, "created_at": None, "uuid": None, "parent_uuid": None,
            "referenced_bytes": None, "exclusive_bytes": None,
            "owner": {"kind": "other", "ref": None},
        },
    )  # fmt: skip
    assert sub.owner.kind == "other" and sub.exclusive_bytes is None
    vol = load(
        Volume,
        {
            "name": "v", "driver": "local", "mountpoint": "/m", "labels": {"keep": "1"},
            "created_at": "2024-05-01T00:00:00Z", "anonymous": True, "in_use_by": ["c1"],
            "nested_subvolumes": [{"id": 300, "path": "/m/a", "read_only": True}],
            "exclusive_bytes": 1, "protected": "label keep",
        },
    )  # fmt: skip
    assert vol.labels == {"keep": "1"} and vol.nested_subvolumes[0].read_only
    finding = load(
        Finding,
        {
            "id": "f", "kind": "orphan-layer", "target": TARGET, "reclaimable_bytes": None,
            "evidence": ["x"], "blocked_by": [], "age_seconds": None,
        },
    )  # fmt: skip
    assert finding.subvolume_ids == () and finding.filesystem_uuid is None


def test_audit_entry_keeps_the_time_string_it_was_hashed_with() -> None:
    from shared import auditchain

    item: dict[str, Any] = {
        "seq": 1, "at": "2024-05-01T12:00:00.000000Z", "actor": "ops",
        "action": "volume.remove", "target": "v", "outcome": "deleted",
        "detail": {"bytes": 5, "ids": [1, 2], "note": "é"}, "prev_hash": auditchain.GENESIS,
    }  # fmt: skip
    item["hash"] = auditchain.item_hash(item)
    entry = load(AuditEntry, item)
    assert entry.at == "2024-05-01T12:00:00.000000Z"
    assert entry.at_time == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert entry.hash_ok
    assert dump(entry) == item
    assert not load(AuditEntry, {**item, "outcome": "refused"}).hash_ok
