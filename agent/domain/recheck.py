"""Is an action's target still as planned? ``recheck`` answers it, on a snapshot taken
just before the action (pure: plain values in, a delete set or the reason to skip out).

Every safety rule is applied again, Docker's layer records included; the subvolumes and
their generations must be the ones planned, a subvolume must still be where it was
planned (by id it could have been renamed elsewhere), an orphan layer folder must still
be old enough. A target that changed is skipped, never forced.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.domain.plans import Action, Plan
from agent.domain.safety import (
    DeleteSet,
    PlannedVolume,
    plan_folder_delete,
    plan_qgroup_destroy,
    plan_subvolume_delete,
    plan_volume_delete,
)
from agent.domain.snapshot import Snapshot
from agent.errors import NotFound, Refused, ValidationFailed
from shared.policy import ORPHAN_MIN_AGE_FLOOR_SECONDS
from shared.wirepath import safe_text


@dataclass(frozen=True)
class Skipped:
    """Why an action's target is not deleted now: ``code`` is the machine word
    (``gone``, ``changed``, ``too_young``, or a refusal's code)."""

    code: str
    detail: str

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"


def recheck(
    snap: Snapshot,
    plan: Plan,
    action: Action,
    *,
    resuming: bool = False,
    orphan_floor: int = ORPHAN_MIN_AGE_FLOOR_SECONDS,
) -> DeleteSet | Skipped:
    """The action's delete set if its target is as planned, else why not.

    ``resuming``: this job started this action before a crash cut it short (its
    ``started`` entry is in the audit log). Planned subvolumes that are gone then went in
    that attempt; what is left, unchanged, is finished (e.g. ``docker volume rm`` of a
    volume whose subvolumes were all deleted: a named one too, when it is provably the
    volume planned, by the folder the plan recorded)."""
    protect = plan.policy.protect_labels
    target = action.target
    try:
        if action.op == "remove_volume":
            planned_volume = None
            if resuming:
                planned_volume = PlannedVolume(
                    str(target.name), action.volume_identity, bool(action.generations)
                )
            ds = plan_volume_delete(
                snap, str(target.name), protect_labels=protect, resuming=planned_volume
            )
        elif action.op == "remove_folder":
            ds = plan_folder_delete(snap, str(target.path), protect_labels=protect)
        elif action.op == "destroy_qgroups":
            ds = plan_qgroup_destroy(snap, str(action.filesystem_uuid), action.qgroup_ids)
        else:
            ds = plan_subvolume_delete(
                snap,
                str(action.filesystem_uuid),
                int(target.id or 0),
                protect_labels=protect,
                orphan_floor=orphan_floor,
            )
    except NotFound as exc:
        return Skipped("gone", exc.detail)
    except (Refused, ValidationFailed) as exc:
        return Skipped(exc.code, exc.detail)
    if action.op == "delete_subvolumes":
        # By id, a subvolume renamed elsewhere since the plan would still be found, with
        # the same generation (a rename inside one subvolume leaves it alone): it is the
        # planned target only where it was planned.
        now = snap.subvolume(str(action.filesystem_uuid), int(target.id or 0))
        if now is None or now.path != target.path or now.owner_kind != action.kind:
            where = now.path if now is not None else None
            return Skipped(
                "changed",
                safe_text(f"subvolume {target.id} moved from {target.path} to {where}"),
            )
    if action.kind == "orphan-layer-folder":
        young = _still_young(snap, action, orphan_floor)
        if young is not None:
            return young
    planned = dict(action.generations)
    now_ids = {s.id: s for s in ds.subvolumes}
    if set(now_ids) != set(planned):
        new = sorted(set(now_ids) - set(planned))
        gone = sorted(set(planned) - set(now_ids))
        if resuming and not new and all(s.generation == planned[i] for i, s in now_ids.items()):
            return ds
        return Skipped(
            "changed",
            "the subvolumes differ from the plan"
            + (f"; new {new}" if new else "")
            + (f"; gone {gone}" if gone else ""),
        )
    for sid, gen in planned.items():
        if now_ids[sid].generation != gen:
            return Skipped(
                "changed",
                f"subvolume {sid} generation moved from {gen} to {now_ids[sid].generation}",
            )
    return ds


def _still_young(snap: Snapshot, action: Action, floor: int) -> Skipped | None:
    """An orphan layer folder that changed within ``floor`` seconds (Docker writing it),
    or whose last change cannot be told. (An orphan layer subvolume's age is one of the
    safety rules: ``agent.domain.safety.check_orphan_age``.)"""
    folder = next((f for f in snap.layer_folders if f.path == action.target.path), None)
    times = [folder.changed_at] if folder is not None and folder.changed_at else []
    if not times:
        return Skipped("too_young", "when it last changed cannot be told")
    age = int((snap.taken_at - max(times)).total_seconds())
    if age < floor:
        return Skipped(
            "too_young", f"changed {age} s ago, less than {floor} s: Docker may be writing it"
        )
    return None
