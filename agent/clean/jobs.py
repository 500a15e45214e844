"""Jobs: a plan applied in the background, action by action, audited and crash safe.

A job runs its plan's actions in order in a thread of its own. Before each action,
under the filesystem's mutation lock, the filesystem's transaction is committed and a
fresh snapshot taken; the target is checked again (``agent.domain.recheck``): every safety rule,
Docker's layer records read again, the same subvolumes with the same generations as
planned, an orphan still old enough. A target that changed is skipped, never forced.
Each action's result is recorded once; one action that fails does not stop the others:
their errors are collected, and the job ends ``succeeded``, ``partial``, ``failed`` or
``skipped`` (nothing done) by what its results say (``agent.domain.plans.job_state``).

No job stays ``queued``: a job whose start cannot be audited is marked ``interrupted``
before the error goes back, and applying its plan again resumes it. After a crash the
job reads ``interrupted`` too; applying the plan again resumes the same job and runs
only the actions that have no result yet (a target deleted by the attempt a crash cut
short is recognised by its ``started`` entry in the audit log).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agent.clean.deletes import STORE_FAULTS, ActionHook, audited_run
from agent.clean.executor import Executor
from agent.clean.pending import PendingSpace, pending_bytes
from agent.clean.qgroups import QgroupSweeper
from agent.domain.inventory import Inventory
from agent.domain.plans import Action, ActionResult, Plan, job_state
from agent.domain.recheck import Skipped, recheck
from agent.errors import AgentError, Conflict, NotFound, PlanExpired, Refused
from agent.store.audit import AuditLog
from agent.store.state import StateStore, StoredJob
from shared.wirepath import safe_text

log = logging.getLogger("nas_janitor.agent.jobs")
AGENT_ACTOR = "agent"
INTERRUPT_RETRY_SECONDS = 10.0


@dataclass(frozen=True)
class JobView:
    id: str
    plan_id: str
    state: str
    done: int
    total: int
    results: tuple[ActionResult, ...]
    started_at: datetime | None
    finished_at: datetime | None
    pending_bytes: int | None = None  # of what it deleted, what the kernel has not freed

    @property
    def reclaimed_bytes(self) -> int:
        """Bytes of what the job destroyed, failed actions' part included."""
        return sum(r.reclaimed_bytes or 0 for r in self.results if r.destroyed_anything)


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


class Jobs:
    def __init__(
        self,
        inventory: Inventory,
        executor: Executor,
        sweeper: QgroupSweeper,
        *,
        pending: PendingSpace,
        audit: AuditLog,
        state: StateStore,
        on_action: ActionHook = lambda op, outcome, size: None,
        on_finish: Callable[[str], None] = lambda state: None,
    ) -> None:
        self.inventory = inventory
        self.executor = executor
        self.sweeper = sweeper
        self.pending = pending
        self.audit = audit
        self.state = state
        self._on_action = on_action
        self._on_finish = on_finish
        self._threads: dict[str, threading.Thread] = {}  # this process's job threads
        self._unwritten: list[dict[str, Any]] = []  # audit entries a store fault held up

    # -- reading -------------------------------------------------------------------------
    def job(self, job_id: str) -> JobView:
        stored = self.state.get_job(job_id)
        if stored is None:
            raise NotFound(f"no job {job_id}")
        return self._view(stored)

    def _view(self, stored: StoredJob) -> JobView:
        results = tuple(ActionResult.from_json(r.body) for r in self.state.results(stored.id))
        return JobView(
            pending_bytes=self._pending(stored.plan_id, results),
            id=stored.id,
            plan_id=stored.plan_id,
            state=stored.state,
            done=len(results),
            total=int(stored.body.get("total", 0)),
            results=results,
            started_at=_time(stored.body.get("started_at")),
            finished_at=_time(stored.body.get("finished_at")),
        )

    def _pending(self, plan_id: str, results: tuple[ActionResult, ...]) -> int | None:
        deleted = [r for r in results if r.deleted]
        if not deleted:
            return 0
        stored = self.state.get_plan(plan_id)
        if stored is None:
            return None
        plan = Plan.from_json(stored.body)
        fs_of = {a.seq: a.filesystem_uuid for a in plan.actions}
        pairs = [(fs_of.get(r.seq) or "", d) for r in deleted for d in r.deleted]
        return pending_bytes(self.executor.btrfs, self.inventory.local_mount, pairs)

    # -- applying ------------------------------------------------------------------------
    def apply(self, plan_id: str, *, idempotency_key: str | None, actor: str) -> str:
        """Start (or resume) the job of a plan; its id. Applying again, or with the same
        ``Idempotency-Key``, names the same job and runs nothing twice."""
        stored_plan = self.state.get_plan(plan_id)
        if stored_plan is None:
            raise NotFound(f"no plan {plan_id}")
        plan = Plan.from_json(stored_plan.body)
        existing = self.state.get_job_for_plan(plan_id)
        if existing is None and self.inventory.clock() >= stored_plan.expires_at:
            self.audit.append(
                actor=actor,
                action="plan.apply",
                target=f"plan {plan_id}",
                outcome="refused",
                detail={"code": "plan_expired"},
            )
            raise PlanExpired(f"plan {plan_id} expired at {stored_plan.expires_at.isoformat()}")
        body = {
            "total": len(plan.actions),
            "started_at": None,
            "finished_at": None,
            "audit_from": self.audit.head_entry()[0],
        }
        job, created = self.state.create_job_for_plan(
            job_id=uuid.uuid4().hex, plan_id=plan_id, idempotency_key=idempotency_key, body=body
        )
        if created:
            self._audited_start(job, plan, actor, outcome="started")
            return job.id
        if job.state == "queued" and not self._alive(job.id):
            # queued, but no thread of this process runs it (its start was cut short):
            # the same as interrupted
            try:
                self.state.update_job(
                    job.id, state="interrupted", body=dict(job.body), expect_state="queued"
                )
            except Conflict:
                return job.id
            job = self.state.get_job(job.id) or job
        if job.state == "interrupted":
            try:
                self.state.update_job(
                    job.id, state="queued", body=dict(job.body), expect_state="interrupted"
                )
            except Conflict:
                return job.id  # another request resumed it first
            self._audited_start(job, plan, actor, outcome="resumed")
        return job.id

    def _audited_start(self, job: StoredJob, plan: Plan, actor: str, *, outcome: str) -> None:
        """The job's start in the audit log, then its thread. When the audit entry cannot
        be written the job does not run: it is left ``interrupted`` (applying the plan
        again resumes it) and the error goes back."""
        try:
            self._flush_unwritten()
            self.audit.append(
                actor=actor,
                action="plan.apply",
                target=f"plan {plan.id}",
                outcome=outcome,
                detail={"job_id": job.id, "actions": len(plan.actions)},
            )
        except BaseException:
            self.state.update_job(job.id, state="interrupted", body=dict(job.body))
            raise
        thread = threading.Thread(
            target=self._run_job, args=(job.id, plan, actor), name=f"job-{job.id[:8]}", daemon=True
        )
        self._threads = {k: v for k, v in self._threads.items() if v.is_alive()}
        self._threads[job.id] = thread
        thread.start()

    def _alive(self, job_id: str) -> bool:
        thread = self._threads.get(job_id)
        return thread is not None and thread.is_alive()

    def _run_job(self, job_id: str, plan: Plan, actor: str) -> None:
        try:
            self._run_actions(job_id, plan, actor)
        except Exception as exc:  # the job must end in a state, whatever happened
            if isinstance(exc, STORE_FAULTS):
                log.error("job %s stopped: %s: %s", job_id, exc.code, exc.detail)
            else:
                log.exception("job %s crashed", job_id)
            self._interrupt(job_id, f"{type(exc).__name__}: {str(exc)[:500]}")
            self._on_finish("interrupted")

    def _interrupt(self, job_id: str, why: str) -> None:
        """Leave the job ``interrupted`` (applying its plan again resumes it), trying for
        about ``INTERRUPT_RETRY_SECONDS`` while the store fails; after that the next
        start-up marks it."""
        deadline = time.monotonic() + INTERRUPT_RETRY_SECONDS
        while True:
            try:
                stored = self.state.get_job(job_id)
                body = dict(stored.body) if stored else {}
                body["finished_at"] = self.inventory.clock().isoformat()
                body["error"] = safe_text(why)
                self.state.update_job(job_id, state="interrupted", body=body)
                return
            except Exception:
                if time.monotonic() >= deadline:
                    log.exception("job %s: its state could not be recorded", job_id)
                    return
                time.sleep(1.0)

    def _run_actions(self, job_id: str, plan: Plan, actor: str) -> None:
        stored = self.state.get_job(job_id)
        assert stored is not None
        body = dict(stored.body)
        body["started_at"] = body.get("started_at") or self.inventory.clock().isoformat()
        self.state.update_job(job_id, state="running", body=body)
        done = {r.seq for r in self.state.results(job_id)}
        # What an earlier run of this job did before a crash, from the audit log.
        before = self._audited_outcomes(job_id, int(stored.body.get("audit_from", 0)))
        for action in plan.actions:
            if action.seq in done:
                continue
            try:
                result = self._run_action(job_id, plan, action, actor, before.get(action.seq))
            except STORE_FAULTS:
                raise  # the record cannot be kept: the job stops, resumable
            except Exception as exc:  # one action's bug must not stop the others
                log.exception("job %s action %s", job_id, action.seq)
                result = ActionResult(
                    action.seq, "failed", f"internal: {type(exc).__name__}: {str(exc)[:300]}"
                )
            self.state.record_result(job_id, action.seq, result.outcome, result.to_json())
        results = [ActionResult.from_json(r.body) for r in self.state.results(job_id)]
        final = job_state(results)
        outcomes = [r.outcome for r in results]
        # the audit first: a job reads finished only once its finish is in the log
        self.audit.append(
            actor=actor,
            action="job.finish",
            target=f"job {job_id}",
            outcome=final,
            detail={
                "plan_id": plan.id,
                "outcomes": {o: outcomes.count(o) for o in sorted(set(outcomes))},
                "reclaimed_bytes": sum(r.reclaimed_bytes or 0 for r in results),
            },
        )
        body["finished_at"] = self.inventory.clock().isoformat()
        self.state.update_job(job_id, state=final, body=body)
        self._on_finish(final)

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
        self, job_id: str, plan: Plan, action: Action, actor: str, audited: str | None
    ) -> ActionResult:
        target = action.describe()
        context: dict[str, Any] = {"job_id": job_id, "seq": action.seq}
        with self.executor.fs_lock(action.filesystem_uuid or "-"):
            try:
                snap = self.inventory.fresh_snapshot(
                    commit=(action.filesystem_uuid,) if action.filesystem_uuid else ()
                )
                checked = recheck(
                    snap,
                    plan,
                    action,
                    resuming=audited == "started",
                    orphan_floor=self.inventory.config.orphan_min_age_seconds,
                )
            except STORE_FAULTS:
                raise
            except AgentError as exc:
                # Docker, btrfs or the host's mount tables away (or failing): the action
                # cannot even be checked.
                self.audit.append(
                    actor=actor,
                    action=action.op,
                    target=target,
                    outcome="failed",
                    detail={**context, "code": exc.code, "reason": exc.detail},
                )
                self._on_action(action.op, "failed", None)
                return ActionResult(action.seq, "failed", f"{exc.code}: {exc.detail}")
            if isinstance(checked, Skipped):
                outcome, why = "skipped", str(checked)
                if audited in ("started", "deleted") and checked.code == "gone":
                    # Our own delete ran before the crash; its record is in the audit.
                    outcome, why = (
                        "deleted",
                        "deleted before the agent restarted (see the audit log)",
                    )
                self.audit.append(
                    actor=actor,
                    action=action.op,
                    target=target,
                    outcome=outcome,
                    detail={**context, "reason": why},
                )
                self._on_action(action.op, outcome, None)
                return ActionResult(action.seq, outcome, why)
            now_ids = {s.id for s in checked.subvolumes}
            earlier = sorted(i for i, _ in action.generations if i not in now_ids)
            if earlier:  # resuming: these went in the attempt a crash cut short
                context["deleted_before_restart"] = earlier
            try:
                res, _ = audited_run(
                    self.executor,
                    self.audit,
                    snap,
                    checked,
                    actor=actor,
                    action=action.op,
                    target=target,
                    context=context,
                    on_action=self._on_action,
                )
            except STORE_FAULTS:
                raise
            except AgentError as exc:
                outcome = "skipped" if isinstance(exc, Refused) else "failed"
                return ActionResult(action.seq, outcome, f"{exc.code}: {exc.detail}")
        fs = snap.filesystems.get(checked.fs_uuid)
        if fs is not None and res.deleted:
            self.pending.add(fs.uuid, res.deleted)
            self.sweeper.after_delete(
                fs_uuid=fs.uuid,
                mount=fs.local_mount,
                quota_enabled=fs.quota_enabled,
                deleted_ids=[d.id for d in res.deleted],
            )
        detail = res.detail
        if earlier:
            detail += f"; {len(earlier)} more deleted before the agent restarted"
        return ActionResult(
            seq=action.seq,
            outcome="deleted" if res.ok else "failed",
            detail=detail,
            reclaimed_bytes=res.reclaimed_bytes,
            deleted=res.deleted,
        )

    # -- start-up --------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Mark jobs a crash cut short as interrupted, and say so in the audit log. An
        entry the log cannot take now is kept and written before the next one."""
        ids = self.state.mark_interrupted()
        self._unwritten.extend(
            {
                "actor": AGENT_ACTOR,
                "action": "job.interrupted",
                "target": f"job {job_id}",
                "outcome": "interrupted",
                "detail": {"reason": "the agent restarted mid-job"},
            }
            for job_id in ids
        )
        try:
            self._flush_unwritten()
        except STORE_FAULTS as exc:
            log.error("start-up: %d audit entries wait: %s", len(self._unwritten), exc.detail)
        return ids

    def _flush_unwritten(self) -> None:
        while self._unwritten:
            self.audit.append(**self._unwritten[0])
            self._unwritten.pop(0)
