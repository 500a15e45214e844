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
