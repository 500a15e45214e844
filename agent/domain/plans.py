"""Plans and what their jobs did, as typed values, and plan building as a pure function.

``build_plan(findings, policy, now=..., ...)`` decides, from the findings of one snapshot
and a ``shared.policy.Policy``, which findings become actions and why the others are
skipped. Nothing here reads the system or the clock: the caller passes both in.

A plan is stored as JSON (``Plan.to_json`` / ``Plan.from_json``): besides what the API
shows, each action keeps what the re-check before it runs compares against (the
filesystem, the subvolumes' generations when planned). Names and paths are stored as
``shared.wirepath`` puts them on the wire (a name that is not UTF-8 keeps its bytes);
reasons and details, meant for people, as ``safe_text``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from agent.domain.findings import Finding, Target
from shared.policy import REPORT_ONLY_KINDS, Policy
from shared.wirepath import from_wire, path_fields, safe_text

# What each kind's clean-up is.
OPS = {
    "dind-volume": "remove_volume",
    "dangling-volume": "remove_volume",
    "orphan-layer": "delete_subvolumes",
    "orphan-layer-folder": "remove_folder",
    "stale-qgroups": "destroy_qgroups",
}


@dataclass(frozen=True)
class Action:
    seq: int
    finding_id: str
    kind: str
    op: str
    target: Target
    subvolume_ids: tuple[int, ...]
    reclaimable_bytes: int | None
    filesystem_uuid: str | None
    generations: tuple[tuple[int, int], ...]  # (subvolume id, generation) when planned
    qgroup_ids: tuple[int, ...] = ()  # destroy_qgroups: the level-0 qgroups, when planned
    # remove_volume: which folder the volume was when planned (``VolumeView.identity``)
    volume_identity: str | None = None

    def describe(self) -> str:
        """The audit log's name for the target (text: a path that is not UTF-8 shows
        U+FFFD where its bytes are not, as the audit log keeps every name)."""
        t = self.target
        if t.type == "volume":
            return f"volume {t.name}"
        if t.type == "subvolume":
            return f"subvolume {self.filesystem_uuid}/{t.id}"
        if t.type == "filesystem":
            return f"filesystem {self.filesystem_uuid}"
        return f"folder {safe_text(t.path or '')}"

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "finding_id": self.finding_id,
            "kind": self.kind,
            "op": self.op,
            "target": self.target.to_json(),
            "subvolume_ids": list(self.subvolume_ids),
            "reclaimable_bytes": self.reclaimable_bytes,
            "filesystem_uuid": self.filesystem_uuid,
            "generations": [list(g) for g in self.generations],
            "qgroup_ids": list(self.qgroup_ids),
            "volume_identity": self.volume_identity,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Action:
        op = str(data["op"])
        return cls(
            seq=int(data["seq"]),
            finding_id=str(data["finding_id"]),
            kind=str(data.get("kind") or _kind_of(op)),
            op=op,
            target=Target.from_json(data["target"]),
            subvolume_ids=tuple(int(i) for i in data.get("subvolume_ids") or ()),
            reclaimable_bytes=data.get("reclaimable_bytes"),
            filesystem_uuid=data.get("filesystem_uuid"),
            generations=tuple((int(i), int(g)) for i, g in data.get("generations") or ()),
            qgroup_ids=tuple(int(i) for i in data.get("qgroup_ids") or ()),
            volume_identity=data.get("volume_identity"),
        )


def _kind_of(op: str) -> str:
    """The kind of an action stored before actions carried their kind."""
    return {"remove_volume": "dind-volume"}.get(op, "orphan-layer")


@dataclass(frozen=True)
class Skip:
    finding_id: str
    reason: str  # starts with a machine word and a colon ("in_use: ...")


@dataclass(frozen=True)
class Plan:
    id: str
    created_at: datetime
    expires_at: datetime
    actions: tuple[Action, ...]
    skipped: tuple[Skip, ...]
    policy: Policy

    @property
    def reclaimable_bytes(self) -> int | None:
        sizes = [a.reclaimable_bytes for a in self.actions]
        return None if any(s is None for s in sizes) else sum(s or 0 for s in sizes)

    def action(self, seq: int) -> Action:
        return next(a for a in self.actions if a.seq == seq)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "actions": [a.to_json() for a in self.actions],
            "skipped": [
                {"finding_id": s.finding_id, "reason": safe_text(s.reason)} for s in self.skipped
            ],
            "reclaimable_bytes": self.reclaimable_bytes,
            "policy": self.policy.to_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        return cls(
            id=str(data["id"]),
            created_at=datetime.fromisoformat(data["created_at"]),
            expires_at=datetime.fromisoformat(data["expires_at"]),
            actions=tuple(Action.from_json(a) for a in data["actions"]),
            skipped=tuple(Skip(str(s["finding_id"]), str(s["reason"])) for s in data["skipped"]),
            policy=Policy.from_json(data.get("policy") or {}),
        )


def build_plan(
    findings: Sequence[Finding],
    policy: Policy,
    *,
    plan_id: str,
    now: datetime,
    ttl_seconds: int,
) -> Plan:
    """The plan for ``findings`` (found under ``policy``) at ``now``.

    Each finding the policy asks for becomes an action unless something blocks it
    (``blocked_by``), it is a kind that is only ever reported, or it is a volume someone
    named and the policy neither includes named volumes nor names the finding: those
    are skipped, with the reason. Finding ids the policy names that are not among the
    findings are skipped as ``not_found``. Actions are numbered from 1 in findings
    order, or in the order of the policy's ``finding_ids`` when it names them."""
    by_id = {f.id: f for f in findings}
    named_ids = set(policy.finding_ids or ())
    chosen = list(policy.finding_ids) if policy.finding_ids is not None else list(by_id)
    actions: list[Action] = []
    skipped: list[Skip] = []
    for fid in chosen:
        f = by_id.get(fid)
        if f is None:
            skipped.append(Skip(fid, "not_found: no such finding now"))
            continue
        if f.blocked_by:
            skipped.append(Skip(fid, "; ".join(f.blocked_by)))
            continue
        if f.kind in REPORT_ONLY_KINDS or f.kind not in OPS:
            skipped.append(Skip(fid, f"report_only: a {f.kind} finding is never cleaned"))
            continue
        if f.named and not policy.include_named_volumes and fid not in named_ids:
            skipped.append(
                Skip(
                    fid,
                    f"named: volume {f.target.name} has a name someone gave it; plan it with "
                    "include_named_volumes, or by its finding id",
                )
            )
            continue
        actions.append(
            Action(
                seq=len(actions) + 1,
                finding_id=f.id,
                kind=f.kind,
                op=OPS[f.kind],
                target=f.target,
                subvolume_ids=f.subvolume_ids,
                reclaimable_bytes=f.reclaimable_bytes,
                filesystem_uuid=f.fs_uuid,
                generations=f.generations,
                qgroup_ids=f.qgroup_ids,
                volume_identity=f.volume_identity,
            )
        )
    return Plan(
        id=plan_id,
        created_at=now,
        expires_at=now + timedelta(seconds=ttl_seconds),
        actions=tuple(actions),
        skipped=tuple(skipped),
        policy=policy,
    )


@dataclass(frozen=True)
class Deleted:
    id: int
    path: str | None
    bytes: int | None = None  # its exclusive size when deleted (None: quotas off)


@dataclass(frozen=True)
class ActionResult:
    """What one action of a job did. ``deleted`` lists what it destroyed, also when it
    failed part way; ``reclaimed_bytes`` is their size (None when unknown)."""

    seq: int
    outcome: str  # deleted | skipped | failed
    detail: str
    reclaimed_bytes: int | None = None
    deleted: tuple[Deleted, ...] = field(default_factory=tuple)

    @property
    def destroyed_anything(self) -> bool:
        return self.outcome == "deleted" or bool(self.deleted)

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "outcome": self.outcome,
            "detail": safe_text(self.detail),
            "reclaimed_bytes": self.reclaimed_bytes,
            "deleted": [
                {"id": d.id, **path_fields(d.path), "bytes": d.bytes} for d in self.deleted
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ActionResult:
        return cls(
            seq=int(data["seq"]),
            outcome=str(data["outcome"]),
            detail=str(data.get("detail") or ""),
            reclaimed_bytes=data.get("reclaimed_bytes"),
            deleted=tuple(
                Deleted(
                    int(d["id"]),
                    None if d.get("path") is None else from_wire(d["path"], d.get("path_b64")),
                    d.get("bytes"),
                )
                for d in data.get("deleted") or ()
            ),
        )


def job_state(results: Iterable[ActionResult]) -> str:
    """A finished job's state from its results: ``succeeded`` when it destroyed what it
    did without a failure, ``partial`` when something was destroyed and something failed,
    ``failed`` when something failed and nothing was destroyed, ``skipped`` when nothing
    was done at all (every action skipped, or none)."""
    done = list(results)
    destroyed = any(r.destroyed_anything for r in done)
    failed = any(r.outcome == "failed" for r in done)
    if destroyed:
        return "partial" if failed else "succeeded"
    return "failed" if failed else "skipped"
