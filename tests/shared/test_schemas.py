"""The shared schemas accept what the agent really sends."""

from __future__ import annotations

from shared.schemas import AuditEntrySchema, JobSchema, ProblemSchema


def test_audit_detail_may_hold_nulls() -> None:
    entry = {
        "seq": 3,
        "at": "2026-11-28T00:00:00.000000Z",
        "actor": "ops",
        "action": "volume.delete",
        "target": "volume x",
        "outcome": "deleted",
        "detail": {"reclaimed_bytes": None, "deleted": [], "nested": {"a": None}},
        "prev_hash": "0" * 64,
        "hash": "1" * 64,
    }
    assert AuditEntrySchema().load(entry)["detail"]["reclaimed_bytes"] is None


def test_problem_errors_may_hold_nulls() -> None:
    body = {
        "type": "t",
        "title": "t",
        "status": 422,
        "detail": "d",
        "code": "c",
        "errors": {"x": None},
    }
    assert ProblemSchema().load(body)["errors"] == {"x": None}


def test_job_result_sizes_may_be_unknown() -> None:
    job = {
        "id": "j",
        "plan_id": "p",
        "state": "succeeded",
        "progress": {"done": 1, "total": 1},
        "results": [{"seq": 1, "outcome": "deleted", "detail": "ok", "reclaimed_bytes": None}],
        "reclaimed_bytes": 0,
        "started_at": None,
        "finished_at": None,
    }
    assert JobSchema().load(job)["results"][0]["reclaimed_bytes"] is None


def test_the_fast_subvolume_page_dump_is_the_schemas_dump(tmp_path: object) -> None:
    from datetime import UTC, datetime

    from shared.schemas import SubvolumePageSchema, dump_subvolume_page

    items = [
        {
            "id": 257,
            "parent_id": 256,
            "path": "/volume1/docker/btrfs/subvolumes/ab",
            "read_only": True,
            "generation": 31,
            "created_at": datetime(2026, 11, 28, 0, 20, 36, 123456, tzinfo=UTC),
            "uuid": "e1166d87-47a5-2743-a857-08e7607daf64",
            "parent_uuid": None,
            "referenced_bytes": 10387456,
            "exclusive_bytes": 8404992,
            "owner": {"kind": "docker-layer", "ref": "ab"},
        },
        {
            "id": 258,
            "parent_id": 5,
            "path": "/volume1/photo",
            "read_only": False,
            "generation": 8,
            "created_at": None,
            "uuid": None,
            "parent_uuid": "e1166d87-47a5-2743-a857-08e7607daf64",
            "referenced_bytes": None,
            "exclusive_bytes": None,
            "owner": {"kind": "other", "ref": None},
        },
    ]
    for cursor in (None, "258"):
        fast = dump_subvolume_page(items, cursor)
        assert fast == SubvolumePageSchema().dump({"items": items, "next_cursor": cursor})
        assert list(fast["items"][0]) == list(
            SubvolumePageSchema().dump({"items": items, "next_cursor": cursor})["items"][0]
        )
