"""The clean side: direct deletes, plans and jobs, audited and crash safe.

Every delete, whatever asked for it, goes the same way:

1. take the filesystem's mutation lock (one mutating operation per filesystem at a
   time; the rest wait their turn);
2. take a fresh snapshot and run the safety rules (``agent.safety``) on it;
3. append an audit entry for the attempt (refusals and dry runs included) *before*
   anything changes, so a crash can never lose the record of a delete;
4. clear the read-only flag of parents that must let a child go, destroy the whole
   batch in one ``btrfs subvolume delete`` (children first), set the flags back on
   parents that stay, then remove the volume through Docker;
5. append the outcome to the audit log before answering.

A job runs its plan's actions in order in a background thread. Each action's result
is recorded once (``StateStore.record_result``); an action whose target changed since
the plan (now used, relabelled, generation moved, gone) is skipped, never forced. After
a crash the job reads ``interrupted``; applying the plan again resumes the same job and
runs only the actions that have no result yet.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from agent.domain.inventory import JanitorService
from agent.domain.safety import DeleteSet, plan_subvolume_delete, plan_volume_delete
from agent.domain.snapshot import Snapshot
from agent.errors import (
    AgentError,
    Conflict,
    NotFound,
    PlanExpired,
    Refused,
    ValidationFailed,
)
from agent.store.audit import AuditLog
from agent.store.state import StateStore, StoredJob

log = logging.getLogger("nas_janitor.agent.cleanup")
AGENT_ACTOR = "agent"


@dataclass(frozen=True)
class ExecResult:
    ok: bool
    deleted: tuple[tuple[int, str], ...]
    failed: tuple[tuple[str, str], ...]  # (path, error)
    volume_removed: bool
    reclaimed_bytes: int | None
    detail: str


def _times(body: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    """A stored body (times as RFC 3339 strings) with its times as datetimes again."""
    out = dict(body)
    for k in keys:
        if isinstance(out.get(k), str):
            out[k] = datetime.fromisoformat(out[k])
    return out


def _size(ds: DeleteSet, ids: set[int]) -> int | None:
    sizes = [s.exclusive_bytes for s in ds.subvolumes if s.id in ids]
    if any(x is None for x in sizes):
        return None
    return sum(x or 0 for x in sizes)


class Cleaner:
    def __init__(
        self,
        service: JanitorService,
        *,
        audit: AuditLog,
        state: StateStore,
        on_action: Callable[[str, str, int | None], None] | None = None,
        on_job_end: Callable[[str], None] | None = None,
    ) -> None:
        self.service = service
        self.audit = audit
        self.state = state
        self._fs_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._threads: dict[str, threading.Thread] = {}
        self._on_action = on_action or (lambda op, outcome, size: None)
        self._on_job_end = on_job_end or (lambda state: None)

    # -- locks -----------------------------------------------------------------------
    def fs_lock(self, fs_uuid: str) -> threading.Lock:
        with self._locks_guard:
            return self._fs_locks.setdefault(fs_uuid or "-", threading.Lock())

    # -- the one executor ------------------------------------------------------------
    def _execute(self, ds: DeleteSet) -> ExecResult:
        btrfs, docker = self.service.btrfs, self.service.docker
        doomed = {s.id for s in ds.subvolumes}
        restore: list[str] = []
        failed: list[tuple[str, str]] = []
        deleted: list[tuple[int, str]] = []
        try:
            for parent in ds.clear_readonly:
                assert parent.local_path is not None
                btrfs.set_readonly(parent.local_path, False)
                if parent.id not in doomed:
                    restore.append(parent.local_path)
            paths = [s.local_path for s in ds.subvolumes if s.local_path is not None]
            by_path = {s.local_path: s for s in ds.subvolumes}
            if paths:
                for res in btrfs.delete(paths):
                    sv = by_path.get(res.path)
                    if res.ok and sv is not None:
                        deleted.append((sv.id, sv.path or res.path))
                    elif not res.ok:
                        host = sv.path if sv is not None and sv.path else res.path
                        failed.append((host, res.error or "failed"))
        finally:
            self.service.forget_listing_snapshot()
            for path in restore:
                try:
                    btrfs.set_readonly(path, True)
                except AgentError as exc:
                    failed.append((path, f"could not set read-only again: {exc.detail}"))
        volume_removed = False
        if ds.volume is not None and not failed:
            docker.remove_volume(ds.volume.name)
            volume_removed = True
        reclaimed = _size(ds, {i for i, _ in deleted})
        if failed:
            detail = "; ".join(f"{p}: {e}" for p, e in failed[:5])
        elif ds.volume is not None:
            detail = f"deleted {len(deleted)} subvolume(s) and removed volume {ds.volume.name}"
        else:
            detail = f"deleted {len(deleted)} subvolume(s)"
        return ExecResult(
            ok=not failed,
            deleted=tuple(deleted),
            failed=tuple(failed),
            volume_removed=volume_removed,
            reclaimed_bytes=reclaimed,
            detail=detail,
        )

    # -- direct deletes ----------------------------------------------------------------
    def _answer(self, ds: DeleteSet, *, dry_run: bool, audit_seq: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "dry_run": dry_run,
            "deleted": [{"id": s.id, "path": s.path} for s in ds.subvolumes],
            "reclaimable_bytes": ds.reclaimable_bytes,
            "audit_seq": audit_seq,
        }
        if ds.volume is not None:
            body["volume"] = ds.volume.name
        return body

    def _direct(
        self,
        *,
        action: str,
        target: str,
        actor: str,
        dry_run: bool,
        fs_hint: str | None,
        decide: Callable[[Snapshot], DeleteSet],
    ) -> dict[str, Any]:
        # A real delete decides what to delete from a snapshot taken while it holds the
        # mutation lock of the filesystem it deletes on, so that no job action (or other
        # delete) on that filesystem runs between the decision and the delete. A volume's
        # filesystem is known only from a snapshot: decide, then take that filesystem's
        # lock and decide again under it.
        held = fs_hint or "-"
        for _ in range(3):
            lock = self.fs_lock(held) if not dry_run else None
            if lock is not None:
                lock.acquire()
            try:
                try:
                    snap = self.service.snapshot()
                    ds = decide(snap)
                except (Refused, NotFound, ValidationFailed) as exc:
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
                            "subvolumes": [{"id": s.id, "path": s.path} for s in ds.subvolumes],
                            "clear_readonly": [s.path for s in ds.clear_readonly],
                        },
                    )
                    return self._answer(ds, dry_run=True, audit_seq=entry.seq)
                if not ds.fs_uuid or ds.fs_uuid == held:
                    return self._run_direct(ds, actor, action, target)
                held = ds.fs_uuid  # decided without that filesystem's lock: again, under it
            finally:
                if lock is not None:
                    lock.release()
        raise Conflict(f"{target} moved between filesystems while deleting it; try again")

    def _audited_execute(
        self, ds: DeleteSet, *, actor: str, action: str, target: str, context: dict[str, Any]
    ) -> tuple[ExecResult, int]:
        """Run a checked delete set between two audit entries: ``started`` before
        anything changes (so a crash never loses the record), then the outcome. An
        ``AgentError`` is audited as ``failed`` and raised again."""
        self.audit.append(
            actor=actor,
            action=action,
            target=target,
            outcome="started",
            detail={
                **context,
                "subvolumes": [s.path for s in ds.subvolumes],
                "clear_readonly": [s.path for s in ds.clear_readonly],
            },
        )
        try:
            res = self._execute(ds)
        except AgentError as exc:
            self.audit.append(
                actor=actor,
                action=action,
                target=target,
                outcome="failed",
                detail={**context, "code": exc.code, "reason": exc.detail},
            )
            self._on_action(action, "failed", None)
            raise
        outcome = "deleted" if res.ok else "failed"
        entry = self.audit.append(
            actor=actor,
            action=action,
            target=target,
            outcome=outcome,
            detail={
                **context,
                "deleted": [{"id": i, "path": p} for i, p in res.deleted],
                "failed": [{"path": p, "error": e} for p, e in res.failed],
                "volume_removed": res.volume_removed,
                "reclaimed_bytes": res.reclaimed_bytes,
            },
        )
        self._on_action(action, outcome, res.reclaimed_bytes)
        return res, entry.seq

    def _run_direct(self, ds: DeleteSet, actor: str, action: str, target: str) -> dict[str, Any]:
        res, seq = self._audited_execute(
            ds, actor=actor, action=action, target=target, context={"dry_run": False}
        )
        deleted = [{"id": i, "path": p} for i, p in res.deleted]
        if not res.ok:
            raise Conflict(
                f"delete failed part way: {res.detail}",
                extra={"deleted": deleted, "audit_seq": seq},
            )
        answer = self._answer(ds, dry_run=False, audit_seq=seq)
        answer["deleted"] = deleted
        return answer

    def delete_subvolume(
        self, fs_uuid: str, sub_id: int, *, dry_run: bool, actor: str
    ) -> dict[str, Any]:
        svc = self.service
        return self._direct(
            action="subvolume.delete",
            target=f"subvolume {fs_uuid}/{sub_id}",
            actor=actor,
            dry_run=dry_run,
            fs_hint=fs_uuid,
            decide=lambda snap: plan_subvolume_delete(
                snap, fs_uuid, sub_id, pathmap=svc.pathmap, protect_labels=self._labels()
            ),
        )

    def delete_volume(self, name: str, *, dry_run: bool, actor: str) -> dict[str, Any]:
        svc = self.service
        return self._direct(
            action="volume.delete",
            target=f"volume {name}",
            actor=actor,
            dry_run=dry_run,
            fs_hint=None,
            decide=lambda snap: plan_volume_delete(
                snap, name, pathmap=svc.pathmap, protect_labels=self._labels()
            ),
        )

    @staticmethod
    def _labels() -> tuple[str, ...]:
        from shared.schemas import DEFAULT_PROTECT_LABELS

        return DEFAULT_PROTECT_LABELS

    # -- plans ---------------------------------------------------------------------------
    def create_plan(self, policy: Mapping[str, Any], *, actor: str) -> dict[str, Any]:
        kinds = tuple(policy["kinds"])
        protect = tuple(policy["protect_labels"])
        wanted = policy.get("finding_ids")
        snap = self.service.snapshot()
        found = self.service.compute_findings(
            snap,
            kinds=kinds,
            min_age_seconds=int(policy["min_age_seconds"]),
            protect_labels=protect,
        )
        by_id = {f.id: f for f in found}
        actions: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []
        chosen = list(wanted) if wanted is not None else [f.id for f in found]
        for fid in dict.fromkeys(chosen):
            f = by_id.get(fid)
            if f is None:
                skipped.append({"finding_id": fid, "reason": "not_found: no such finding now"})
                continue
            if f.blocked_by:
                skipped.append({"finding_id": fid, "reason": "; ".join(f.blocked_by)})
                continue
            actions.append(
                {
                    "seq": len(actions) + 1,
                    "finding_id": f.id,
                    "op": "remove_volume" if f.target_type == "volume" else "delete_subvolumes",
                    "target": {
                        "type": f.target_type,
                        "name": f.name,
                        "id": f.target_id,
                        "path": f.path,
                    },
                    "subvolume_ids": list(f.subvolume_ids),
                    "reclaimable_bytes": f.reclaimable_bytes,
                    # kept for the re-check before the action runs
                    "filesystem_uuid": f.fs_uuid,
                    "generations": [list(g) for g in f.generations],
                }
            )
        sizes = [a["reclaimable_bytes"] for a in actions]
        now = self.service.clock()
        plan_id = uuid.uuid4().hex
        plan: dict[str, Any] = {
            "id": plan_id,
            "created_at": now.isoformat(),
            "expires_at": (
                now + timedelta(seconds=self.service.config.plan_ttl_seconds)
            ).isoformat(),
            "actions": actions,
            "skipped": skipped,
            "reclaimable_bytes": None if any(s is None for s in sizes) else sum(sizes),
            "policy": {
                "kinds": list(kinds),
                "min_age_seconds": int(policy["min_age_seconds"]),
                "protect_labels": list(protect),
                "finding_ids": list(wanted) if wanted is not None else None,
            },
        }
        self.state.save_plan(
            plan_id,
            created_at=now,
            expires_at=now + timedelta(seconds=self.service.config.plan_ttl_seconds),
            body=plan,
        )
        self.audit.append(
            actor=actor,
            action="plan.create",
            target=f"plan {plan['id']}",
            outcome="created",
            detail={
                "actions": len(actions),
                "skipped": len(skipped),
                "policy": plan["policy"],
            },
        )
        return _times(plan, "created_at", "expires_at")

    def get_plan(self, plan_id: str) -> dict[str, Any]:
        stored = self.state.get_plan(plan_id)
        if stored is None:
            raise NotFound(f"no plan {plan_id}")
        return _times(stored.body, "created_at", "expires_at")

    # -- jobs ------------------------------------------------------------------------------
    def _job_body(
        self,
        job_id: str,
        plan: Mapping[str, Any],
        state: str,
        *,
        started_at: datetime | None = None,
        finished_at: datetime | None = None,
        prior: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        body = dict(prior or {})
        body.update(
            {
                "id": job_id,
                "plan_id": plan["id"],
                "state": state,
                "total": len(plan["actions"]),
            }
        )
        if started_at is not None and not body.get("started_at"):
            body["started_at"] = started_at.isoformat()
        body.setdefault("started_at", None)
        body["finished_at"] = finished_at.isoformat() if finished_at else None
        return body

    def job(self, job_id: str) -> dict[str, Any]:
        stored = self.state.get_job(job_id)
        if stored is None:
            raise NotFound(f"no job {job_id}")
        return self._render_job(stored)

    def _render_job(self, stored: StoredJob) -> dict[str, Any]:
        results = [r.body for r in self.state.results(stored.id)]
        sizes = [r.get("reclaimed_bytes") for r in results if r.get("outcome") == "deleted"]
        return _times(
            {
                "id": stored.id,
                "plan_id": stored.plan_id,
                "state": stored.state,
                "progress": {"done": len(results), "total": int(stored.body.get("total", 0))},
                "results": results,
                "reclaimed_bytes": sum(s or 0 for s in sizes),
                "started_at": stored.body.get("started_at"),
                "finished_at": stored.body.get("finished_at"),
            },
            "started_at",
            "finished_at",
        )

    def apply(self, plan_id: str, *, idempotency_key: str | None, actor: str) -> dict[str, Any]:
        stored_plan = self.state.get_plan(plan_id)
        if stored_plan is None:
            raise NotFound(f"no plan {plan_id}")
        plan = stored_plan.body
        existing = self.state.get_job_for_plan(plan_id)
        now = self.service.clock()
        if existing is None and now >= stored_plan.expires_at:
            self.audit.append(
                actor=actor,
                action="plan.apply",
                target=f"plan {plan_id}",
                outcome="refused",
                detail={"code": "plan_expired"},
            )
            raise PlanExpired(f"plan {plan_id} expired at {stored_plan.expires_at.isoformat()}")
        job_id = uuid.uuid4().hex
        first = self._job_body(job_id, plan, "queued")
        first["audit_from"] = self.audit.head_entry()[0]
        job, created = self.state.create_job_for_plan(
            job_id=job_id, plan_id=plan_id, idempotency_key=idempotency_key, body=first
        )
        if created:
            self.audit.append(
                actor=actor,
                action="plan.apply",
                target=f"plan {plan_id}",
                outcome="started",
                detail={"job_id": job.id, "actions": len(plan["actions"])},
            )
            self._start(job.id, plan, actor)
        elif job.state == "interrupted":
            try:
                self.state.update_job(
                    job.id, state="queued", body=dict(job.body), expect_state="interrupted"
                )
            except Conflict:
                pass  # another request resumed it first
            else:
                self.audit.append(
                    actor=actor,
                    action="plan.apply",
                    target=f"plan {plan_id}",
                    outcome="resumed",
                    detail={"job_id": job.id},
                )
                self._start(job.id, plan, actor)
        return {"job_id": job.id, "plan_id": plan_id}

    def _start(self, job_id: str, plan: Mapping[str, Any], actor: str) -> None:
        t = threading.Thread(
            target=self._run_job,
            args=(job_id, dict(plan), actor),
            name=f"job-{job_id[:8]}",
            daemon=True,
        )
        self._threads[job_id] = t
        t.start()

    def wait(self, job_id: str, timeout: float | None = None) -> None:
        """For tests and shutdown: wait for a job thread of this process."""
        t = self._threads.get(job_id)
        if t is not None:
            t.join(timeout)

    def _run_job(self, job_id: str, plan: dict[str, Any], actor: str) -> None:
        try:
            state = self._run_job_inner(job_id, plan, actor)
        except Exception as exc:  # the job must end in a state, whatever happened
            log.exception("job %s crashed", job_id)
            stored = self.state.get_job(job_id)
            body = dict(stored.body) if stored else {}
            body["finished_at"] = self.service.clock().isoformat()
            body["error"] = str(exc)[:500]
            self.state.update_job(job_id, state="failed", body=body)
            state = "failed"
        self._on_job_end(state)

    def _run_job_inner(self, job_id: str, plan: dict[str, Any], actor: str) -> str:
        stored = self.state.get_job(job_id)
        assert stored is not None
        body = self._job_body(
            job_id, plan, "running", started_at=self.service.clock(), prior=stored.body
        )
        self.state.update_job(job_id, state="running", body=body)
        done = {r.seq for r in self.state.results(job_id)}
        protect = tuple(plan.get("policy", {}).get("protect_labels") or ())
        # What an earlier run of this job did before a crash, from the audit log.
        before = self._audited_outcomes(job_id, int(stored.body.get("audit_from", 0)))
        for action in plan["actions"]:
            seq = int(action["seq"])
            if seq in done:
                continue
            result = self._run_action(job_id, action, protect, actor, before.get(seq))
            self.state.record_result(job_id, seq, result["outcome"], result)
        outcomes = [r.outcome for r in self.state.results(job_id)]
        if "failed" in outcomes:
            state = "partial" if "deleted" in outcomes else "failed"
        else:
            state = "succeeded"
        final = self._job_body(job_id, plan, state, finished_at=self.service.clock(), prior=body)
        self.state.update_job(job_id, state=state, body=final)
        self.audit.append(
            actor=actor,
            action="job.finish",
            target=f"job {job_id}",
            outcome=state,
            detail={
                "plan_id": plan["id"],
                "outcomes": {o: outcomes.count(o) for o in set(outcomes)},
            },
        )
        return state

    def _recheck(
        self,
        snap: Snapshot,
        action: Mapping[str, Any],
        protect: Sequence[str],
        *,
        resuming: bool = False,
    ) -> DeleteSet | str:
        """The action's delete set if its target is as planned, else why not.

        ``resuming``: this job started this action before a crash cut it short (its
        ``started`` entry is in the audit log). Planned subvolumes that are gone then
        went in that attempt; what is left, unchanged, is finished (e.g. ``docker volume
        rm`` of a volume whose subvolumes were all deleted)."""
        target = action["target"]
        try:
            if action["op"] == "remove_volume":
                ds = plan_volume_delete(
                    snap, target["name"], pathmap=self.service.pathmap, protect_labels=protect
                )
            else:
                ds = plan_subvolume_delete(
                    snap,
                    action["filesystem_uuid"],
                    int(target["id"]),
                    pathmap=self.service.pathmap,
                    protect_labels=protect,
                )
        except NotFound as exc:
            return f"gone: {exc.detail}"
        except (Refused, ValidationFailed) as exc:
            return f"{exc.code}: {exc.detail}"
        planned = {int(i): int(g) for i, g in action.get("generations", [])}
        now_ids = {s.id: s for s in ds.subvolumes}
        if set(now_ids) != set(planned):
            new = sorted(set(now_ids) - set(planned))
            gone = sorted(set(planned) - set(now_ids))
            if resuming and not new and all(s.generation == planned[i] for i, s in now_ids.items()):
                return ds
            return (
                "changed: the subvolumes differ from the plan"
                + (f"; new {new}" if new else "")
                + (f"; gone {gone}" if gone else "")
            )
        for sid, gen in planned.items():
            if now_ids[sid].generation != gen:
                return (
                    f"changed: subvolume {sid} generation moved from {gen} "
                    f"to {now_ids[sid].generation}"
                )
        return ds

    def _audited_outcomes(self, job_id: str, after_seq: int) -> dict[int, str]:
        """The last audited outcome of each action of a job (only a resumed job has any)."""
        out: dict[int, str] = {}
        cursor = after_seq
        while True:
            page = self.audit.page(after_seq=cursor, limit=1000)
            if not page:
                return out
            for entry in page:
                d = entry.detail
                if d.get("job_id") == job_id and isinstance(d.get("seq"), int):
                    out[d["seq"]] = entry.outcome
            cursor = page[-1].seq

    def _run_action(
        self,
        job_id: str,
        action: Mapping[str, Any],
        protect: Sequence[str],
        actor: str,
        audited: str | None = None,
    ) -> dict[str, Any]:
        seq = int(action["seq"])
        t = action["target"]
        target = (
            f"volume {t['name']}"
            if t["type"] == "volume"
            else f"subvolume {action['filesystem_uuid']}/{t['id']}"
        )
        op = str(action["op"])
        lock = self.fs_lock(action.get("filesystem_uuid") or "-")
        with lock:
            try:
                snap = self.service.snapshot()
            except AgentError as exc:
                # Docker or btrfs away (or failing): the action cannot even be checked.
                # It fails, with the reason in its result and the audit log.
                self.audit.append(
                    actor=actor,
                    action=op,
                    target=target,
                    outcome="failed",
                    detail={"job_id": job_id, "seq": seq, "code": exc.code, "reason": exc.detail},
                )
                self._on_action(op, "failed", None)
                reason = f"{exc.code}: {exc.detail}"
                return {"seq": seq, "outcome": "failed", "detail": reason, "reclaimed_bytes": None}
            checked = self._recheck(snap, action, protect, resuming=audited == "started")
            if isinstance(checked, str):
                # A target that is gone may have been deleted by this job before a
                # crash cut it short: the audit log then holds our "started" entry.
                outcome = "skipped"
                if audited in ("started", "deleted") and checked.startswith("gone"):
                    # Our own delete ran before the crash; its record is in the audit.
                    outcome = "deleted"
                    checked = "deleted before the agent restarted (see the audit log)"
                self.audit.append(
                    actor=actor,
                    action=op,
                    target=target,
                    outcome=outcome,
                    detail={"job_id": job_id, "seq": seq, "reason": checked},
                )
                self._on_action(op, outcome, None)
                return {"seq": seq, "outcome": outcome, "detail": checked, "reclaimed_bytes": None}
            context: dict[str, Any] = {"job_id": job_id, "seq": seq}
            now = {s.id for s in checked.subvolumes}
            earlier = sorted(int(i) for i, _ in action.get("generations", []) if int(i) not in now)
            if earlier:  # resuming: these went in the attempt a crash cut short
                context["deleted_before_restart"] = earlier
            try:
                res, _ = self._audited_execute(
                    checked, actor=actor, action=op, target=target, context=context
                )
            except AgentError as exc:
                return {
                    "seq": seq,
                    "outcome": "failed",
                    "detail": exc.detail,
                    "reclaimed_bytes": None,
                }
            detail = res.detail
            if earlier:
                detail += f"; {len(earlier)} more deleted before the agent restarted"
            return {
                "seq": seq,
                "outcome": "deleted" if res.ok else "failed",
                "detail": detail,
                "reclaimed_bytes": res.reclaimed_bytes,
            }

    # -- start-up ------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Mark jobs a crash cut short as interrupted, and say so in the audit log."""
        ids = self.state.mark_interrupted()
        for job_id in ids:
            self.audit.append(
                actor=AGENT_ACTOR,
                action="job.interrupted",
                target=f"job {job_id}",
                outcome="interrupted",
                detail={"reason": "the agent restarted mid-job"},
            )
            self._on_job_end("interrupted")
        return ids
