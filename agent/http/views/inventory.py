"""Read endpoints (``read`` scope): host, filesystems, subvolumes, volumes, findings."""

from __future__ import annotations

from typing import Any

from flask import Response, current_app, jsonify
from flask_smorest import Blueprint
from marshmallow import fields, validate

from agent.domain.inventory import JanitorService
from agent.domain.paths import VOLUME_NAME_PARAMETER
from agent.http.api import needs
from shared.schemas import (
    DEFAULT_MIN_AGE_SECONDS,
    FilesystemPageSchema,
    FindingPageSchema,
    FindingQuerySchema,
    HostSchema,
    SubvolumePageSchema,
    SubvolumeQuerySchema,
    SubvolumeSchema,
    VolumePageSchema,
    VolumeQuerySchema,
    VolumeSchema,
    dump_subvolume_page,
)

blp = Blueprint("inventory", __name__, url_prefix="/v1", description="What is on this NAS")


def svc() -> JanitorService:
    service: JanitorService = current_app.extensions["nas_janitor"].service
    return service


class FindingQuery(FindingQuerySchema):
    min_age_seconds = fields.Integer(
        load_default=DEFAULT_MIN_AGE_SECONDS,
        validate=validate.Range(min=0, max=10 * 365 * 86400),
        metadata={"description": "findings younger than this are blocked as too_young"},
    )


@blp.get("/host")
@needs(blp, "read")
@blp.response(200, HostSchema)
def host() -> dict[str, Any]:
    """The NAS: kernel, btrfs-progs, Docker, and the roots the agent may act under."""
    return svc().host()


@blp.get("/filesystems")
@needs(blp, "read")
@blp.response(200, FilesystemPageSchema)
def filesystems() -> dict[str, Any]:
    """Every btrfs filesystem the agent sees."""
    return {"items": svc().filesystems(), "next_cursor": None}


@blp.get("/filesystems/<string:fs_uuid>/subvolumes")
@needs(blp, "read")
@blp.arguments(SubvolumeQuerySchema, location="query", as_kwargs=True)
@blp.response(200, SubvolumePageSchema)
@blp.alt_response(404, response="NOT_FOUND")
def subvolumes(fs_uuid: str, *, limit: int, cursor: str | None, under: str | None) -> Response:
    """Subvolumes of one filesystem with their owner, paged by id."""
    items, next_cursor = svc().subvolumes(fs_uuid, under=under, limit=limit, cursor=cursor)
    return jsonify(dump_subvolume_page(items, next_cursor))


@blp.get("/filesystems/<string:fs_uuid>/subvolumes/<int:sub_id>")
@needs(blp, "read")
@blp.response(200, SubvolumeSchema)
@blp.alt_response(404, response="NOT_FOUND")
def subvolume(fs_uuid: str, sub_id: int) -> dict[str, Any]:
    """One subvolume."""
    return svc().subvolume(fs_uuid, sub_id)


@blp.get("/volumes")
@needs(blp, "read")
@blp.arguments(VolumeQuerySchema, location="query", as_kwargs=True)
@blp.response(200, VolumePageSchema)
def volumes(*, dangling: bool | None) -> dict[str, Any]:
    """Docker volumes with their users and the subvolumes nested in them."""
    return {"items": svc().volumes(dangling=dangling), "next_cursor": None}


@blp.get("/volumes/<string:name>", parameters=[VOLUME_NAME_PARAMETER])
@needs(blp, "read")
@blp.response(200, VolumeSchema)
@blp.alt_response(404, response="NOT_FOUND")
def volume(name: str) -> dict[str, Any]:
    """One volume."""
    return svc().volume(name)


@blp.get("/findings")
@needs(blp, "read")
@blp.arguments(FindingQuery, location="query", as_kwargs=True)
@blp.response(200, FindingPageSchema)
def findings(*, kind: list[str] | None, min_age_seconds: int) -> dict[str, Any]:
    """Leftovers with evidence, reclaimable bytes and what blocks their clean-up."""
    return {
        "items": svc().findings(kinds=kind, min_age_seconds=min_age_seconds),
        "next_cursor": None,
    }
