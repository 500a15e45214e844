"""Clean endpoints (``clean`` scope): direct deletes, plans, apply; and the plan and
job reads (``read`` scope)."""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify
from flask_smorest import Blueprint
from marshmallow import fields, validate

from agent.domain.paths import VOLUME_NAME_PARAMETER
from agent.errors import ValidationFailed
from agent.http import wire
from agent.http.api import actor, needs
from agent.http.context import runtime
from shared.policy import Policy, PolicyError
from shared.schemas import (
    ApplyResponseSchema,
    Base,
    DeleteResultSchema,
    DryRunQuerySchema,
    JobSchema,
    PlanRequestSchema,
    PlanSchema,
)

blp = Blueprint("clean", __name__, url_prefix="/v1", description="Plan and clean up")


class ApplyHeaders(Base):
    idempotency_key = fields.String(
        data_key="Idempotency-Key",
        load_default=None,
        # not blank: at least one character other than space and tab (HTTP's whitespace)
        validate=validate.Regexp(r"[ \t]*[^ \t]", error="must not be empty"),
        metadata={"description": "a client's key: the same key returns the same job"},
    )

    class Meta:
        unknown = "exclude"


@blp.delete("/filesystems/<string:fs_uuid>/subvolumes/<int:sub_id>")
@needs(blp, "clean")
@blp.arguments(DryRunQuerySchema, location="query", as_kwargs=True)
@blp.response(200, DeleteResultSchema)
@blp.alt_response(404, response="NOT_FOUND")
@blp.alt_response(409, response="CONFLICT")
def delete_subvolume(fs_uuid: str, sub_id: int, *, dry_run: bool) -> dict[str, Any]:
    """Delete a subvolume and everything nested in it, deepest first (dry run by
    default: pass ``dry_run=false`` to change anything)."""
    answer = runtime().deletes.subvolume(fs_uuid, sub_id, dry_run=dry_run, actor=actor())
    return wire.delete_answer(answer)


@blp.delete("/volumes/<string:name>", parameters=[VOLUME_NAME_PARAMETER])
@needs(blp, "clean")
@blp.arguments(DryRunQuerySchema, location="query", as_kwargs=True)
@blp.response(200, DeleteResultSchema)
@blp.alt_response(404, response="NOT_FOUND")
@blp.alt_response(409, response="CONFLICT")
@blp.alt_response(422, response="UNPROCESSABLE_ENTITY")
def delete_volume(name: str, *, dry_run: bool) -> dict[str, Any]:
    """Remove a volume: its nested subvolumes deepest first, then the volume through
    Docker (dry run by default)."""
    return wire.delete_answer(runtime().deletes.volume(name, dry_run=dry_run, actor=actor()))


@blp.post("/plans")
@needs(blp, "clean")
@blp.arguments(PlanRequestSchema, required=False)
@blp.response(201, PlanSchema)
@blp.alt_response(422, response="UNPROCESSABLE_ENTITY")
def create_plan(body: dict[str, Any]) -> dict[str, Any]:
    """Plan a clean-up from the current findings and a policy. Nothing changes. At most
    ``max_stored_plans`` plans are kept: expired ones without a job are purged first,
    and ``422 too_many`` says when none can be."""
    try:
        policy = Policy.from_json(body)
    except PolicyError as exc:
        raise ValidationFailed("invalid policy", errors=exc.errors) from None
    return wire.plan(runtime().planner.create(policy, actor=actor()))


@blp.get("/plans/<string:plan_id>")
@needs(blp, "read")
@blp.response(200, PlanSchema)
@blp.alt_response(404, response="NOT_FOUND")
def get_plan(plan_id: str) -> dict[str, Any]:
    """A plan."""
    return wire.plan(runtime().planner.get(plan_id))


@blp.post("/plans/<string:plan_id>/apply")
@needs(blp, "clean")
@blp.arguments(ApplyHeaders, location="headers", as_kwargs=True)
@blp.response(202, ApplyResponseSchema)
@blp.alt_response(404, response="NOT_FOUND")
@blp.alt_response(409, response="CONFLICT")
def apply_plan(plan_id: str, *, idempotency_key: str | None) -> Response:
    """Run a plan as a job in the background. Applying it again (or with the same
    ``Idempotency-Key``) returns the same job and runs nothing twice; an interrupted
    job is resumed."""
    job_id = runtime().jobs.apply(plan_id, idempotency_key=idempotency_key, actor=actor())
    resp = jsonify(ApplyResponseSchema().dump({"job_id": job_id, "plan_id": plan_id}))
    resp.status_code = 202
    resp.headers["Location"] = f"/v1/jobs/{job_id}"
    return resp


@blp.get("/jobs/<string:job_id>")
@needs(blp, "read")
@blp.response(200, JobSchema)
@blp.alt_response(404, response="NOT_FOUND")
def get_job(job_id: str) -> dict[str, Any]:
    """A job's state, progress and per-action results."""
    return wire.job(runtime().jobs.job(job_id))
