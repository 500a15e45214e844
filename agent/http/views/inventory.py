"""Read endpoints (``read`` scope): host, filesystems, subvolumes, volumes, findings."""

from __future__ import annotations

import functools
from typing import Any

from flask import Response
from flask_smorest import Blueprint

from agent.domain.inventory import Inventory
from agent.domain.keptscan import trim_malloc
from agent.domain.paths import VOLUME_NAME_PARAMETER
from agent.domain.snapshot import Snapshot
from agent.http import wire
from agent.http.api import needs
from agent.http.context import http, runtime
from shared.schemas import (
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
)

# A page of more subvolumes than this returns what making it took to the system.
BIG_PAGE = 1000

blp = Blueprint("inventory", __name__, url_prefix="/v1", description="What is on this NAS")


def inv() -> Inventory:
    return runtime().inventory


@blp.get("/host")
@needs(blp, "read")
@blp.response(200, HostSchema)
def host() -> dict[str, Any]:
    """The NAS: kernel, btrfs-progs, Docker, and the roots the agent may act under."""
    return wire.host(inv().host())


@blp.get("/filesystems")
@needs(blp, "read")
@blp.response(200, FilesystemPageSchema)
def filesystems() -> dict[str, Any]:
    """Every btrfs filesystem the agent sees."""
    return {"items": [wire.filesystem(fs) for fs in inv().filesystems()], "next_cursor": None}


@blp.get("/filesystems/<string:fs_uuid>/subvolumes")
@needs(blp, "read")
@blp.arguments(SubvolumeQuerySchema, location="query", as_kwargs=True)
@blp.response(200, SubvolumePageSchema)
@blp.alt_response(404, response="NOT_FOUND")
def subvolumes(fs_uuid: str, *, limit: int, cursor: str | None, under: str | None) -> Response:
    """Subvolumes of one filesystem with their owner, paged by id."""
    i = inv()
    after, under = i.page_args(cursor, under)
    snap = i.listing_snapshot(first_page=cursor is None)
    ahead = http().pages
    page = ahead.take(snap, (fs_uuid, under, limit, after))
    if page is None:
        page = _page(i, snap, fs_uuid, under, limit, after)
    body, next_cursor = page
    if next_cursor is None:
        i.listing_done()
    elif cursor is not None:
        # a client that asked for a page after the first pages through the listing:
        # the next page is made while it reads this one (agent.http.pages)
        nxt = int(next_cursor)
        make = functools.partial(_page, i, snap, fs_uuid, under, limit, nxt)
        ahead.start(snap, (fs_uuid, under, limit, nxt), make)
    return Response(body, mimetype="application/json")


def _page(
    i: Inventory, snap: Snapshot, fs_uuid: str, under: str | None, limit: int, after: int
) -> tuple[bytes, str | None]:
    items, next_cursor = i.page_of(snap, fs_uuid, under=under, limit=limit, after=after)
    body = wire.subvolume_page_json(items, i.created_at, next_cursor)
    if len(items) > BIG_PAGE:
        trim_malloc()  # the page's pieces go back to the system, not to the heap's top
    return body, next_cursor


@blp.get("/filesystems/<string:fs_uuid>/subvolumes/<int:sub_id>")
@needs(blp, "read")
@blp.response(200, SubvolumeSchema)
@blp.alt_response(404, response="NOT_FOUND")
def subvolume(fs_uuid: str, sub_id: int) -> dict[str, Any]:
    """One subvolume."""
    i = inv()
    sv = i.subvolume(fs_uuid, sub_id)
    return wire.subvolume(sv, i.created_at(sv))


@blp.get("/volumes")
@needs(blp, "read")
@blp.arguments(VolumeQuerySchema, location="query", as_kwargs=True)
@blp.response(200, VolumePageSchema)
def volumes(*, dangling: bool | None) -> dict[str, Any]:
    """Docker volumes with their users and the subvolumes nested in them."""
    return {
        "items": [wire.volume(v) for v in inv().volumes(dangling=dangling)],
        "next_cursor": None,
    }


@blp.get("/volumes/<string:name>", parameters=[VOLUME_NAME_PARAMETER])
@needs(blp, "read")
@blp.response(200, VolumeSchema)
@blp.alt_response(404, response="NOT_FOUND")
def volume(name: str) -> dict[str, Any]:
    """One volume."""
    return wire.volume(inv().volume(name))


@blp.get("/findings")
@needs(blp, "read")
@blp.arguments(FindingQuerySchema, location="query", as_kwargs=True)
@blp.response(200, FindingPageSchema)
def findings(*, kind: list[str] | None, min_age_seconds: int) -> Response:
    """Leftovers with evidence, reclaimable bytes and what blocks their clean-up."""
    i = inv()
    found = i.findings(kinds=kind, min_age_seconds=min_age_seconds)
    epoch = i.scans  # the scan these findings are of (or one after it)
    # The same findings (the kept scan's, asked the same way) make the same answer: it
    # is encoded once and sent again. ``wire.finding`` gives what the schema's dump
    # would (a test checks both agree), so it is not dumped again.
    answers = http().answers
    name = f"findings:{sorted(kind or ())}:{min_age_seconds}"
    body = answers.get(name, found)
    if body is None:
        body = wire.json_body({"items": [wire.finding(f) for f in found], "next_cursor": None})
        answers.put(name, found, body, epoch=epoch)
    return Response(body, mimetype="application/json")
