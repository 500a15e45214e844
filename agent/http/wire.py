"""Domain values in the API's JSON shape (version 1): the one place that builds it, so
the marshmallow schemas in ``shared.schemas`` dump (and document) plain data.

Every path goes out as ``path`` + ``path_b64`` (``shared.wirepath``): a name that is not
UTF-8 reaches the client losslessly.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import orjson

from agent.clean.deletes import DeleteAnswer, deleted_json
from agent.clean.jobs import JobView
from agent.domain.findings import Finding, Target
from agent.domain.inventory import HostFacts
from agent.domain.plans import ActionResult, Plan
from agent.domain.snapshot import FsView, SubvolView, VolumeView
from shared.policy import DEFAULT_PROTECT_LABELS, protected_reason
from shared.wirepath import path_fields, safe_text, to_wire


def host(h: HostFacts) -> dict[str, Any]:
    return {
        "hostname": h.hostname,
        "agent_version": h.agent_version,
        "kernel": {
            "release": h.kernel_release,
            "rmdir_deletes_subvolumes": h.rmdir_deletes_subvolumes,
        },
        "btrfs_progs_version": h.btrfs_progs_version,
        "docker": {
            "server_version": h.docker.server_version,
            "api_version": h.docker.api_version,
            "storage_driver": h.docker.storage_driver,
            "data_root": h.docker.data_root,
        },
        "roots": list(h.roots),
    }


def filesystem(fs: FsView) -> dict[str, Any]:
    return {
        "uuid": fs.uuid,
        "label": fs.label,
        "mountpoints": list(fs.mountpoints),
        "size_bytes": fs.usage.size_bytes,
        "used_bytes": fs.usage.used_bytes,
        "free_bytes": fs.usage.free_bytes,
        "quota_enabled": fs.quota_enabled,
    }


def subvolume(sv: SubvolView, created_at: datetime | None) -> dict[str, Any]:
    text, raw = to_wire(sv.path)  # path_fields, without its dict (pages of 5,000)
    return {
        "id": sv.id,
        "parent_id": sv.parent_id,
        "path": text,
        "path_b64": raw,
        "read_only": sv.read_only,
        "generation": sv.generation,
        "created_at": created_at,
        "uuid": sv.uuid,
        "parent_uuid": sv.parent_uuid,
        "referenced_bytes": sv.referenced_bytes,
        "exclusive_bytes": sv.exclusive_bytes,
        "owner": {"kind": sv.owner_kind, "ref": sv.owner_ref and safe_text(sv.owner_ref)},
    }


def json_body(value: Any) -> bytes:
    """``value`` (dicts, lists, strings, numbers, aware datetimes as ISO 8601, what
    ``datetime.isoformat`` writes) as a JSON body, UTF-8 and compact, by orjson: the big
    answers (a page of 5,000 subvolumes, the findings) are encoded in C."""
    return _json(value) + b"\n"


def _json(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        # text orjson refuses (a lone surrogate no sanitising removed): escaped, as the
        # standard library writes it, rather than no answer
        return json.dumps(value, separators=(",", ":"), default=_iso).encode()


def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


PAGE_CHUNK = 256


def subvolume_page_json(
    items: Sequence[SubvolView],
    created_at: Callable[[SubvolView], datetime | None],
    next_cursor: str | None,
) -> bytes:
    """A page of the subvolume listing as the JSON body of ``SubvolumePageSchema``: the
    same members in the same order as ``subvolume`` and the schema's dump give (a test
    checks both agree): ``subvolume`` of each item, encoded by orjson ``PAGE_CHUNK``
    items at a time: a page of 5,000 has few of its values alive at once."""
    parts: list[bytes] = []
    for start in range(0, len(items), PAGE_CHUNK):
        chunk = [subvolume(sv, created_at(sv)) for sv in items[start : start + PAGE_CHUNK]]
        parts.append(_json(chunk)[1:-1])  # the items, without the list's brackets
    cursor = _json(next_cursor)
    return b"".join((b'{"items":[', b",".join(parts), b'],"next_cursor":', cursor, b"}\n"))


def volume(vol: VolumeView) -> dict[str, Any]:
    rec = vol.record
    return {
        "name": rec.name,
        "driver": rec.driver,
        "mountpoint": rec.mountpoint,
        "labels": dict(rec.labels),
        "created_at": rec.created_at,
        "anonymous": rec.anonymous,
        "in_use_by": list(vol.in_use_by),
        "nested_subvolumes": [
            {"id": s.id, **path_fields(s.path), "read_only": s.read_only} for s in vol.nested
        ],
        "exclusive_bytes": vol.exclusive_bytes,
        "protected": protected_reason(rec.labels, DEFAULT_PROTECT_LABELS),
    }


def target(t: Target) -> dict[str, Any]:
    return {
        "type": t.type,
        "name": t.name and safe_text(t.name),
        "id": t.id,
        **path_fields(t.path),
    }


def finding(f: Finding) -> dict[str, Any]:
    return {
        "id": f.id,
        "kind": f.kind,
        "target": target(f.target),
        "reclaimable_bytes": f.reclaimable_bytes,
        "evidence": [safe_text(e) for e in f.evidence],
        "blocked_by": [safe_text(b) for b in f.blocked_by],
        "age_seconds": f.age_seconds,
        "filesystem_uuid": f.fs_uuid,
        "subvolume_ids": list(f.subvolume_ids),
        "named": f.named,
    }


def plan(p: Plan) -> dict[str, Any]:
    return {
        "id": p.id,
        "created_at": p.created_at,
        "expires_at": p.expires_at,
        "actions": [
            {
                "seq": a.seq,
                "finding_id": a.finding_id,
                "op": a.op,
                "target": target(a.target),
                "subvolume_ids": list(a.subvolume_ids),
                "reclaimable_bytes": a.reclaimable_bytes,
            }
            for a in p.actions
        ],
        "skipped": [{"finding_id": s.finding_id, "reason": safe_text(s.reason)} for s in p.skipped],
        "reclaimable_bytes": p.reclaimable_bytes,
        "policy": p.policy.to_json(),
    }


def action_result(r: ActionResult) -> dict[str, Any]:
    return {
        "seq": r.seq,
        "outcome": r.outcome,
        "detail": safe_text(r.detail),
        "reclaimed_bytes": r.reclaimed_bytes,
        "deleted": deleted_json(r.deleted),
    }


def job(j: JobView) -> dict[str, Any]:
    return {
        "id": j.id,
        "plan_id": j.plan_id,
        "state": j.state,
        "progress": {"done": j.done, "total": j.total},
        "results": [action_result(r) for r in j.results],
        "reclaimed_bytes": j.reclaimed_bytes,
        "pending_bytes": j.pending_bytes,
        "started_at": j.started_at,
        "finished_at": j.finished_at,
    }


def delete_answer(a: DeleteAnswer) -> dict[str, Any]:
    body: dict[str, Any] = {
        "dry_run": a.dry_run,
        "deleted": deleted_json(a.deleted),
        "reclaimable_bytes": a.reclaimable_bytes,
        "audit_seq": a.audit_seq,
    }
    if a.volume is not None:
        body["volume"] = a.volume
    return body
