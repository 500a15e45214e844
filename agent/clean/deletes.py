"""Direct deletes (``DELETE /v1/filesystems/{uuid}/subvolumes/{id}``, ``DELETE
/v1/volumes/{name}``), audited and decided under the filesystem's mutation lock.

A real delete decides what to delete from a snapshot taken while it holds the lock of
the filesystem it deletes on, so no job action (or other delete) on that filesystem runs
between the decision and the delete. Every attempt is in the audit log before the answer
is sent: refusals and dry runs too, and a real delete has a ``started`` entry before
anything changes and its outcome after.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.clean.executor import ExecResult, Executor
from agent.clean.pending import PendingSpace
from agent.clean.qgroups import QgroupSweeper
from agent.domain.inventory import Inventory
from agent.domain.plans import Deleted
from agent.domain.safety import DeleteSet, plan_subvolume_delete, plan_volume_delete
from agent.domain.snapshot import Scope, Snapshot
from agent.errors import (
    AgentError,
    AuditUnavailable,
    Conflict,
    NotFound,
    Refused,
    StorageUnavailable,
    Unavailable,
    ValidationFailed,
)
from agent.store.audit import AuditLog
from agent.store.entries import AuditEntry
from shared.policy import DEFAULT_PROTECT_LABELS
from shared.wirepath import path_fields

ActionHook = Callable[[str, str, int | None], None]  # (operation, outcome, bytes)


@dataclass(frozen=True)
class DeleteAnswer:
    """What a direct delete did (or, ``dry_run``, would do)."""

    dry_run: bool
    deleted: tuple[Deleted, ...]
    reclaimable_bytes: int | None
    audit_seq: int
    volume: str | None = None


def deleted_json(items: Sequence[Deleted]) -> list[dict[str, Any]]:
    return [{"id": d.id, **path_fields(d.path), "bytes": d.bytes} for d in items]


# Faults of the agent's own stores: an action that meets one is neither done nor failed
# in the record; its job stops (interrupted) and applying the plan again resumes it.
STORE_FAULTS = (StorageUnavailable, AuditUnavailable)
OUTCOME_RETRIES = 3
OUTCOME_RETRY_SECONDS = 1.5


def append_with_retries(audit: AuditLog, **entry: Any) -> AuditEntry:
    """Append an outcome after something was done, retrying a store fault a few times
    (about 5 s in all): the ``started`` entry is in the log already, and the outcome
    should be too. The last fault is raised again with what was done in ``extra``."""
    for attempt in range(OUTCOME_RETRIES):
        try:
            return audit.append(**entry)
        except StorageUnavailable as exc:
            if attempt == OUTCOME_RETRIES - 1:
                detail = entry.get("detail") or {}
                raise StorageUnavailable(
                    f"done, but its outcome could not be written to the audit log: {exc.detail}",
                    extra={"deleted": detail.get("deleted", [])},
                ) from exc
            time.sleep(OUTCOME_RETRY_SECONDS)
    raise AssertionError("unreachable")  # pragma: no cover


def audited_run(
    executor: Executor,
    audit: AuditLog,
    snap: Snapshot,
    ds: DeleteSet,
    *,
    actor: str,
    action: str,
    target: str,
    context: dict[str, Any],
    on_action: ActionHook,
) -> tuple[ExecResult, int]:
    """Run a checked delete set between two audit entries: ``started`` before anything
    changes (a crash never loses the record), then the outcome with everything that was
    destroyed, also when it failed part way. An error before anything changed is audited
    as ``refused`` (a guard) or ``failed`` and raised again."""
    audit.append(
        actor=actor,
        action=action,
        target=target,
        outcome="started",
        detail={
            **context,
            "subvolumes": [path_fields(s.path)["path"] for s in ds.subvolumes],
            "clear_readonly": [path_fields(s.path)["path"] for s in ds.clear_readonly],
        },
    )
    try:
        res = executor.run(snap, ds)
    except STORE_FAULTS:
        raise  # the log itself cannot be written: nothing more to record now
    except AgentError as exc:
        outcome = "refused" if isinstance(exc, Refused) else "failed"
        audit.append(
            actor=actor,
            action=action,
            target=target,
            outcome=outcome,
            detail={**context, "code": exc.code, "reason": exc.detail},
        )
        on_action(action, outcome, None)
        raise
    outcome = "deleted" if res.ok else "failed"
    entry = append_with_retries(
        audit,
        actor=actor,
        action=action,
        target=target,
        outcome=outcome,
        detail={
            **context,
            "deleted": deleted_json(res.deleted),
            "failed": [{"path": p, "error": e} for p, e in res.failed],
            "volume_removed": res.volume_removed,
            "folder_removed": res.folder_removed,
            "files_removed": res.files_removed,
            "qgroups_destroyed": list(res.qgroups_destroyed),
            "reclaimed_bytes": res.reclaimed_bytes,
        },
    )
    on_action(action, outcome, res.reclaimed_bytes)
    return res, entry.seq


class Deletes:
    def __init__(
        self,
        inventory: Inventory,
        executor: Executor,
        audit: AuditLog,
        sweeper: QgroupSweeper,
        pending: PendingSpace,
        *,
        on_action: ActionHook = lambda op, outcome, size: None,
    ) -> None:
        self.inventory = inventory
        self.executor = executor
        self.audit = audit
        self.sweeper = sweeper
        self.pending = pending
        self._on_action = on_action
        # The filesystem the last real delete decided on: the lock a volume delete takes
        # first (a volume's filesystem is known only once decided). Only a hint: the
        # decision is made under the lock taken, and again under the right one when the
        # hint was wrong.
        self._last_fs: str | None = None

    def subvolume(self, fs_uuid: str, sub_id: int, *, dry_run: bool, actor: str) -> DeleteAnswer:
        return self._direct(
            action="subvolume.delete",
            target=f"subvolume {fs_uuid}/{sub_id}",
            actor=actor,
            dry_run=dry_run,
            fs_hint=fs_uuid,
            scope=Scope(fs_uuid=fs_uuid, ids=(sub_id,)),
            decide=lambda snap: plan_subvolume_delete(
                snap,
                fs_uuid,
                sub_id,
                protect_labels=DEFAULT_PROTECT_LABELS,
                orphan_floor=self.inventory.config.orphan_min_age_seconds,
            ),
        )

    def volume(self, name: str, *, dry_run: bool, actor: str) -> DeleteAnswer:
        return self._direct(
            action="volume.delete",
            target=f"volume {name}",
            actor=actor,
            dry_run=dry_run,
            fs_hint=None,
            scope=Scope(volume=name),
            decide=lambda snap: plan_volume_delete(
                snap, name, protect_labels=DEFAULT_PROTECT_LABELS
            ),
        )

    def _direct(
        self,
        *,
        action: str,
        target: str,
        actor: str,
        dry_run: bool,
        fs_hint: str | None,
        scope: Scope,
        decide: Callable[[Snapshot], DeleteSet],
    ) -> DeleteAnswer:
        # A volume's filesystem is known only from a snapshot: take the lock of the
        # filesystem it most likely is on (the last one decided on, or the only one the
        # agent knows), decide under it, and when the decision names another filesystem
        # take that one's lock and decide again under it.
        held = fs_hint or self._likely_fs() or "-"
        for _ in range(3):
            lock = self.executor.fs_lock(held) if not dry_run else None
            if lock is not None:
                lock.acquire()
            try:
                try:
                    # what the delete touches, read now: its subvolumes and everything
                    # around them that a rule reads (agent.domain.snapshot.Scope)
                    snap = self.inventory.fresh_snapshot(scope=scope)
                    ds = decide(snap)
                except (Refused, NotFound, ValidationFailed, Unavailable) as exc:
                    self.audit.append(
                        actor=actor,
                        action=action,
                        target=target,
                        outcome="refused",
                        detail={"code": exc.code, "reason": exc.detail, "dry_run": dry_run},
                    )
                    raise
                if dry_run:
                    entry = self.audit.append(
                        actor=actor,
                        action=action,
                        target=target,
                        outcome="dry_run",
                        detail={
                            "dry_run": True,
                            "subvolumes": deleted_json(
                                [Deleted(s.id, s.path) for s in ds.subvolumes]
                            ),
                            "clear_readonly": [
                                path_fields(s.path)["path"] for s in ds.clear_readonly
                            ],
                        },
                    )
                    return self._answer(ds, dry_run=True, audit_seq=entry.seq)
                if ds.fs_uuid:
                    self._last_fs = ds.fs_uuid
                if not ds.fs_uuid or ds.fs_uuid == held:
                    return self._run(snap, ds, actor, action, target)
                held = ds.fs_uuid  # decided without that filesystem's lock: again, under it
            finally:
                if lock is not None:
                    lock.release()
        raise Conflict(f"{target} moved between filesystems while deleting it; try again")

    def _likely_fs(self) -> str | None:
        if self._last_fs is not None:
            return self._last_fs
        known = self.inventory.known_filesystems()
        return next(iter(known)) if len(known) == 1 else None

    def _run(
        self, snap: Snapshot, ds: DeleteSet, actor: str, action: str, target: str
    ) -> DeleteAnswer:
        res, seq = audited_run(
            self.executor,
            self.audit,
            snap,
            ds,
            actor=actor,
            action=action,
            target=target,
            context={"dry_run": False},
            on_action=self._on_action,
        )
        if not res.ok:
            raise Conflict(
                f"delete failed part way: {res.detail}",
                extra={
                    "deleted": deleted_json(res.deleted),
                    "reclaimed_bytes": res.reclaimed_bytes,
                    "audit_seq": seq,
                },
            )
        fs = snap.filesystems.get(ds.fs_uuid)
        if fs is not None and res.deleted:
            self.pending.add(fs.uuid, res.deleted)
            self.sweeper.after_delete(
                fs_uuid=fs.uuid,
                mount=fs.local_mount,
                quota_enabled=fs.quota_enabled,
                deleted_ids=[d.id for d in res.deleted],
            )
        return DeleteAnswer(
            dry_run=False,
            deleted=res.deleted,
            reclaimable_bytes=ds.reclaimable_bytes,
            audit_seq=seq,
            volume=ds.volume.name if ds.volume is not None else None,
        )

    @staticmethod
    def _answer(ds: DeleteSet, *, dry_run: bool, audit_seq: int) -> DeleteAnswer:
        return DeleteAnswer(
            dry_run=dry_run,
            deleted=tuple(Deleted(s.id, s.path) for s in ds.subvolumes),
            reclaimable_bytes=ds.reclaimable_bytes,
            audit_seq=audit_seq,
            volume=ds.volume.name if ds.volume is not None else None,
        )
