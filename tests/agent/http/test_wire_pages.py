"""The subvolume page (``wire.subvolume_page_json``, encoded by orjson) is the answer
the views made before: the schema's dump of ``wire.subvolume``, encoded by Flask; the
same JSON, members in the same order (orjson writes non-ASCII text as UTF-8, Flask
escaped it)."""

from __future__ import annotations

import base64
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flask import Flask

from agent.domain.findings import Finding, Target
from agent.domain.snapshot import SubvolView
from agent.http import wire
from agent.http.context import runtime
from shared.schemas import FindingPageSchema, SubvolumePageSchema
from tests.agent.http.apphelpers import build


def _sv(sub_id: int, path: str | None, **kw: Any) -> SubvolView:
    values: dict[str, Any] = {
        "fs_uuid": "0b5f",
        "id": sub_id,
        "parent_id": 5,
        "path": path,
        "local_path": path,
        "in_fs_apart": path,
        "read_only": False,
        "generation": 7,
        "uuid": None,
        "parent_uuid": None,
        "referenced_bytes": None,
        "exclusive_bytes": None,
        "owner_kind": "other",
        "owner_ref": None,
    }
    values.update(kw)
    return SubvolView(**values)


ODD = os.fsdecode(b"/volume1/docker/btrfs/subvolumes/caf\xe9")
ITEMS = [
    _sv(
        257,
        "/volume1/docker/btrfs/subvolumes/ab",
        parent_id=256,
        read_only=True,
        generation=31,
        uuid="e1166d87-47a5-2743-a857-08e7607daf64",
        referenced_bytes=10387456,
        exclusive_bytes=8404992,
        owner_kind="docker-layer",
        owner_ref="ab",
        created_at=datetime(2026, 11, 28, 0, 20, 36, 123456, tzinfo=UTC),
    ),
    _sv(258, "/volume1/photo", parent_uuid="e1166d87-47a5-2743-a857-08e7607daf64"),
    _sv(259, ODD, owner_kind="orphan-layer", owner_ref=os.path.basename(ODD), exclusive_bytes=0),
    _sv(260, '/volume1/a\nb\t"quoted"\\ café ☃', created_at=datetime(2026, 1, 2, tzinfo=UTC)),
    _sv(2**40, "/volume1/" + "x" * 300, generation=2**62),
]


def _created(sv: SubvolView) -> datetime | None:
    return sv.created_at


def _old_body(items: list[SubvolView], cursor: str | None) -> bytes:
    """What the view answered before: ``wire.subvolume`` per item, the datetimes as the
    schema writes them, encoded by Flask's JSON provider (keys unsorted, as the app)."""
    app = Flask("old")
    app.json.sort_keys = False  # type: ignore[attr-defined]
    out = []
    for sv in items:
        item = wire.subvolume(sv, _created(sv))
        created = item["created_at"]
        out.append(
            {
                **item,
                "created_at": created.isoformat() if created is not None else None,
                "owner": dict(item["owner"]),
            }
        )
    with app.app_context():
        return app.json.response({"items": out, "next_cursor": cursor}).get_data()


def _same(body: bytes) -> str:
    """The JSON text in one writing: two bodies give the same when they hold the same
    values with the members in the same order."""
    assert body.endswith(b"\n")
    return json.dumps(json.loads(body))


def test_the_page_is_the_old_answer() -> None:
    for cursor in (None, "260"):
        for items in (ITEMS, ITEMS[:1], []):
            new = wire.subvolume_page_json(items, _created, cursor)
            assert _same(new) == _same(_old_body(items, cursor))
    # ASCII only: the very bytes
    assert wire.subvolume_page_json(ITEMS[:2], _created, None) == _old_body(ITEMS[:2], None)


def test_text_orjson_refuses_is_written_escaped() -> None:
    body = wire.json_body({"a": "x\udcff", "t": datetime(2026, 1, 2, tzinfo=UTC)})
    assert body == b'{"a":"x\\udcff","t":"2026-01-02T00:00:00+00:00"}\n'


def test_the_page_is_the_schemas_dump() -> None:
    new = json.loads(wire.subvolume_page_json(ITEMS, _created, "260"))
    dumped = SubvolumePageSchema().dump(
        {"items": [wire.subvolume(sv, _created(sv)) for sv in ITEMS], "next_cursor": "260"}
    )
    assert new == dumped
    assert [list(i) for i in new["items"]] == [list(i) for i in dumped["items"]]
    odd = new["items"][2]
    assert os.fsdecode(base64.b64decode(odd["path_b64"])) == ODD
    assert "\ufffd" in odd["owner"]["ref"]


def test_a_long_page_is_the_old_answer_too() -> None:
    many = [_sv(1000 + i, f"/volume1/docker/volumes/v/_data/{i}", generation=i) for i in range(600)]
    for n in (255, 256, 257, 512, 600):
        new = wire.subvolume_page_json(many[:n], _created, str(n))
        assert new == _old_body(many[:n], str(n))


def test_the_findings_answer_is_the_schemas_dump(tmp_path: Path) -> None:
    """The findings view sends ``wire.finding`` of each finding without the schema's
    dump: that dump changes nothing, values, members or their order, for findings of
    every kind the leak scenario makes (a dind volume, a dangling one, orphan layers, a
    stale qgroup...) and for a finding whose name and path are not UTF-8."""
    a = build(tmp_path / "state")
    body = a.get("/v1/findings?min_age_seconds=0").get_data()
    got = json.loads(body)
    kinds = {f["kind"] for f in got["items"]}
    assert kinds == {"dind-volume", "orphan-layer"}, kinds
    with a.app.app_context():
        found = runtime().inventory.findings(kinds=None, min_age_seconds=0)
    page = {"items": [wire.finding(f) for f in found], "next_cursor": None}
    odd = Finding(
        id="f1",
        kind="orphan-layer",
        target=Target("subvolume", os.path.basename(ODD), 259, ODD),
        fs_uuid="0b5f",
        subvolume_ids=(259,),
        reclaimable_bytes=None,
        evidence=(f"{ODD} is in no layer record",),
        blocked_by=(),
        age_seconds=12,
        generations=((259, 7),),
    )
    page["items"].append(wire.finding(odd))
    dumped = FindingPageSchema().dump(page)
    assert json.dumps(dumped) == json.dumps(page)
    assert _same(wire.json_body(page)) == json.dumps(dumped)
    assert _same(body) == json.dumps({"items": page["items"][:-1], "next_cursor": None})
