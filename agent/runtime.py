"""The agent put together: backends, the read side, the clean side and the stores, as one
typed value. The HTTP app (``agent.http.app``) and the local commands (``agent.local``)
build it the same way, so both apply the same rules to the same state.

    rt = build_runtime(config)          # the real btrfs-progs and Docker
    rt.inventory.findings()
    rt.planner.create(Policy(), actor="local")

Two processes may share a state directory (an agent serving, a local clean): the
runtime's jobs and direct deletes hold the state directory's lease
(``agent.store.lease``) while they change anything, so only one process mutates at a
time, and jobs a crash cut short are marked ``interrupted`` only by a process that takes
the lease from free (no job can be running anywhere then).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from agent.clean.deletes import ActionHook, DeleteAnswer, Deletes
from agent.clean.executor import Executor
from agent.clean.jobs import Jobs
from agent.clean.pending import PendingSpace
from agent.clean.planner import Planner
from agent.clean.qgroups import QgroupSweeper
from agent.config import AgentConfig
from agent.domain.inventory import Clock, Inventory, utcnow
from agent.domain.mounts import read_mounts
from agent.domain.plans import Plan
from agent.errors import Unavailable
from agent.host.backend import Btrfs, Docker
from agent.store.audit import AuditLog
from agent.store.lease import StateLease
from agent.store.state import StateStore, StoredJob

log = logging.getLogger("nas_janitor.agent")


@dataclass(frozen=True)
class Backends:
    btrfs: Btrfs
    docker: Docker


# Docker: a few seconds for a read or a ping (a healthy daemon answers in well under
# one); a volume removal may delete many files first. A daemon that let a request time
# out is not asked again for DOCKER_HUNG_COOLDOWN seconds: calls fail at once (503).
DOCKER_TIMEOUT = 5.0
DOCKER_REMOVE_TIMEOUT = 120.0
DOCKER_HUNG_COOLDOWN = 10.0


def real_backends(config: AgentConfig) -> Backends:
    from agent.host.btrfs import BtrfsTool
    from agent.host.dockerd import DockerClient

    return Backends(
        btrfs=BtrfsTool(
            binary=config.btrfs_binary,
            unreadable_pids_allowed=config.unreadable_pids_allowed,
            host_root=config.host_prefix or "/",
            subvolume_ioctls=config.subvolume_ioctls,
        ),
        docker=DockerClient(
            base_url=config.docker_host,
            timeout=DOCKER_TIMEOUT,
            remove_timeout=DOCKER_REMOVE_TIMEOUT,
            hung_cooldown=DOCKER_HUNG_COOLDOWN,
        ),
    )


class LeasedJobs(Jobs):
    """``Jobs`` whose runs hold the state directory's lease: ``apply`` takes it (``Busy``
    when another process holds it), and each job's thread holds it from before it
    starts until it ends, however it ends."""

    def __init__(
        self,
        inventory: Inventory,
        executor: Executor,
        sweeper: QgroupSweeper,
        *,
        pending: PendingSpace,
        audit: AuditLog,
        state: StateStore,
        lease: StateLease,
        on_action: ActionHook = lambda op, outcome, size: None,
        on_finish: Callable[[str], None] = lambda state: None,
    ) -> None:
        super().__init__(
            inventory,
            executor,
            sweeper,
            pending=pending,
            audit=audit,
            state=state,
            on_action=on_action,
            on_finish=on_finish,
        )
        self.lease = lease

    def apply(self, plan_id: str, *, idempotency_key: str | None, actor: str) -> str:
        with self.lease.held():
            return super().apply(plan_id, idempotency_key=idempotency_key, actor=actor)

    # The two steps of ``Jobs`` that start and run a job's thread: the thread's hold is
    # taken before it starts (under ``apply``'s, so never from free: no recovery can
    # mark the job interrupted meanwhile) and given back when the thread ends.
    def _audited_start(self, job: StoredJob, plan: Plan, actor: str, *, outcome: str) -> None:
        self.lease.acquire()
        try:
            super()._audited_start(job, plan, actor, outcome=outcome)
        except BaseException:
            self.lease.release()
            raise

    def _run_job(self, job_id: str, plan: Plan, actor: str) -> None:
        try:
            super()._run_job(job_id, plan, actor)
        finally:
            self.lease.release()


class LeasedDeletes(Deletes):
    """``Deletes`` whose real deletes hold the state directory's lease (``Busy`` when
    another process holds it); dry runs change nothing and need none."""

    def __init__(
        self,
        inventory: Inventory,
        executor: Executor,
        audit: AuditLog,
        sweeper: QgroupSweeper,
        pending: PendingSpace,
        *,
        lease: StateLease,
        on_action: ActionHook = lambda op, outcome, size: None,
    ) -> None:
        super().__init__(inventory, executor, audit, sweeper, pending, on_action=on_action)
        self.lease = lease

    def subvolume(self, fs_uuid: str, sub_id: int, *, dry_run: bool, actor: str) -> DeleteAnswer:
        if dry_run:
            return super().subvolume(fs_uuid, sub_id, dry_run=True, actor=actor)
        with self.lease.held():
            return super().subvolume(fs_uuid, sub_id, dry_run=False, actor=actor)

    def volume(self, name: str, *, dry_run: bool, actor: str) -> DeleteAnswer:
        if dry_run:
            return super().volume(name, dry_run=True, actor=actor)
        with self.lease.held():
            return super().volume(name, dry_run=False, actor=actor)


@dataclass(frozen=True)
class Runtime:
    config: AgentConfig
    backends: Backends
    inventory: Inventory
    executor: Executor
    deletes: Deletes
    planner: Planner
    jobs: Jobs
    audit: AuditLog
    state: StateStore
    lease: StateLease
    pending: PendingSpace


def build_runtime(
    config: AgentConfig,
    *,
    backends: Backends | None = None,
    clock: Clock = utcnow,
    on_action: ActionHook = lambda op, outcome, size: None,
    on_job_end: Callable[[str], None] = lambda state: None,
    holder: str = "janitor-agent serve",
) -> Runtime:
    """Everything the agent is made of, over ``backends`` (the real ones by default).
    ``holder`` names this process in the state directory's lease. Jobs a crash cut
    short are marked interrupted now when no other process holds the lease, else by
    this process the first time it takes it."""
    backends = backends or real_backends(config)
    os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
    inventory = Inventory(config, btrfs=backends.btrfs, docker=backends.docker, clock=clock)
    executor = Executor(
        backends.btrfs,
        backends.docker,
        read_mounts=lambda: read_mounts(backends.btrfs, inventory.pathmap),
        after_change=inventory.forget_kept,
    )
    audit = AuditLog(os.path.join(config.state_dir, "audit.db"))
    state = StateStore(os.path.join(config.state_dir, "state.db"))
    sweeper = QgroupSweeper(executor, audit)

    def recover() -> None:
        try:
            for _ in jobs.recover():
                on_job_end("interrupted")
        except Unavailable as exc:
            # jobs a crash cut short are marked interrupted (the state store); their
            # audit entries cannot be written now: /readyz and every mutation say why
            log.error("recovery could not be audited: %s: %s", exc.code, exc.detail)

    pending = PendingSpace(backends.btrfs, inventory.local_mount)
    lease = StateLease(config.state_dir, holder=holder, on_first=recover)
    jobs = LeasedJobs(
        inventory,
        executor,
        sweeper,
        pending=pending,
        audit=audit,
        state=state,
        lease=lease,
        on_action=on_action,
        on_finish=on_job_end,
    )
    try:
        if not lease.try_once():
            log.warning(
                "%s holds the state directory's lease: jobs left running by a crash are "
                "marked interrupted when this process first takes it",
                lease.current_holder() or "another process",
            )
    except Unavailable as exc:
        log.error("the state directory's lease cannot be taken: %s: %s", exc.code, exc.detail)
    return Runtime(
        config=config,
        backends=backends,
        inventory=inventory,
        executor=executor,
        deletes=LeasedDeletes(
            inventory, executor, audit, sweeper, pending, lease=lease, on_action=on_action
        ),
        planner=Planner(
            inventory,
            state,
            audit,
            ttl_seconds=config.plan_ttl_seconds,
            max_plans=config.max_stored_plans,
        ),
        jobs=jobs,
        audit=audit,
        state=state,
        lease=lease,
        pending=pending,
    )
