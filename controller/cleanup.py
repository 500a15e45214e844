"""One agent's clean-up, from findings to a finished job: what ``run`` and ``apply`` do
per agent (in a worker thread, network only). A failure part way keeps what was
learned before it: a run that planned and then lost the agent still says what it planned.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

from controller.client import AgentClient
from controller.errors import AgentUnreachable, ControllerError, message_for
from controller.store import AgentRunRecord
from shared.models import Finding, Job, Plan, Policy

ProgressFn = Callable[[Job], None]

FAILED_JOB_STATES = frozenset({"failed", "interrupted"})


@dataclass(frozen=True)
class AgentRun:
    agent: str
    reachable: bool = True
    findings: tuple[Finding, ...] | None = None
    plan: Plan | None = None
    job: Job | None = None
    error: ControllerError | None = None

    @property
    def failed(self) -> bool:
        """The agent could not be driven to the end, or an action failed."""
        if self.error is not None:
            return True
        if self.job is None:
            return False
        return self.job.state in FAILED_JOB_STATES or self.job.count("failed") > 0

    def record(self, *, audit_ok: bool | None) -> AgentRunRecord:
        findings = self.findings
        job = self.job
        return AgentRunRecord(
            agent=self.agent,
            reachable=self.reachable,
            error=message_for(self.error) if self.error is not None else None,
            findings=len(findings) if findings is not None else None,
            findings_by_kind=dict(Counter(f.kind for f in findings or ())),
            planned=len(self.plan.actions) if self.plan else 0,
            plan_skipped=len(self.plan.skipped) if self.plan else 0,
            plan_id=self.plan.id if self.plan else None,
            job_id=job.id if job else None,
            job_state=job.state if job else None,
            deleted=job.count("deleted") if job else 0,
            skipped=job.count("skipped") if job else 0,
            failed=job.count("failed") if job else 0,
            reclaimable_bytes=self.plan.reclaimable_bytes if self.plan else None,
            reclaimed_bytes=job.reclaimed_bytes if job else 0,
            pending_bytes=job.pending_bytes if job else None,
            audit_ok=audit_ok,
        )


def run_agent(
    client: AgentClient,
    policy: Policy,
    *,
    apply: bool,
    job_timeout: float,
    poll: float,
    on_progress: ProgressFn | None = None,
    freed_timeout: float = 0.0,
) -> AgentRun:
    """Findings, a plan under ``policy``, and unless ``apply`` is false, the plan applied
    and waited for (and then, up to ``freed_timeout``, the space it deleted freed). A
    plan with no action is not applied."""
    run = AgentRun(agent=client.name, reachable=False)
    try:
        run = AgentRun(agent=client.name, findings=tuple(client.findings()))
        plan = client.create_plan(policy)
    except ControllerError as exc:
        return _failed(run, exc)
    run = replace(run, plan=plan)
    if not (apply and plan.actions):
        return run
    return _apply_and_wait(
        client,
        run,
        plan,
        job_timeout=job_timeout,
        poll=poll,
        on_progress=on_progress,
        freed_timeout=freed_timeout,
    )


def apply_recorded(
    client: AgentClient,
    plan_id: str,
    *,
    job_timeout: float,
    poll: float,
    on_progress: ProgressFn | None = None,
    freed_timeout: float = 0.0,
) -> AgentRun:
    """Apply a plan made earlier (by ``plan``) and wait for its job (and then, up to
    ``freed_timeout``, the space it deleted freed)."""
    run = AgentRun(agent=client.name, reachable=False)
    try:
        plan = client.get_plan(plan_id)
    except ControllerError as exc:
        return _failed(run, exc)
    run = AgentRun(agent=client.name, plan=plan)
    return _apply_and_wait(
        client,
        run,
        plan,
        job_timeout=job_timeout,
        poll=poll,
        on_progress=on_progress,
        freed_timeout=freed_timeout,
    )


def _apply_and_wait(
    client: AgentClient,
    run: AgentRun,
    plan: Plan,
    *,
    job_timeout: float,
    poll: float,
    on_progress: ProgressFn | None,
    freed_timeout: float = 0.0,
) -> AgentRun:
    last: Job | None = None

    def seen(job: Job) -> None:
        nonlocal last
        last = job
        if on_progress is not None:
            on_progress(job)

    try:
        started = client.apply_plan(plan.id)
        job = client.wait_job(started.job_id, poll=poll, timeout=job_timeout, on_progress=seen)
        if freed_timeout > 0:
            job = client.wait_freed(job, poll=poll, timeout=freed_timeout)
    except ControllerError as exc:
        # Keep the last state seen: it says what was done before the agent was lost.
        return replace(run, job=last, error=exc)
    return replace(run, job=job)


def _failed(run: AgentRun, exc: ControllerError) -> AgentRun:
    """``run`` with its error; an agent that answered anything, even an error, is reachable."""
    return replace(run, error=exc, reachable=run.reachable or not isinstance(exc, AgentUnreachable))
