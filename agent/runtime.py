"""The agent put together: backends, the read side, the clean side and the stores, as one
typed value. The HTTP app (``agent.http.app``) and the local commands (``agent.cli``)
build it the same way, so both apply the same rules to the same state.

    rt = build_runtime(config)          # the real btrfs-progs and Docker
    rt.inventory.findings()
    rt.planner.create(Policy(), actor="local")
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from agent.clean.deletes import ActionHook, Deletes
from agent.clean.executor import Executor
from agent.clean.jobs import Jobs
from agent.clean.pending import PendingSpace
from agent.clean.planner import Planner
from agent.clean.qgroups import QgroupSweeper
from agent.config import AgentConfig
from agent.domain.inventory import Clock, Inventory, utcnow
from agent.domain.snapshot import read_mounts
from agent.errors import Unavailable
from agent.host.backend import Btrfs, Docker
from agent.store.audit import AuditLog
from agent.store.state import StateStore

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
        btrfs=BtrfsTool(binary=config.btrfs_binary),
        docker=DockerClient(
            base_url=config.docker_host,
            timeout=DOCKER_TIMEOUT,
            remove_timeout=DOCKER_REMOVE_TIMEOUT,
            hung_cooldown=DOCKER_HUNG_COOLDOWN,
        ),
    )


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
    pending: PendingSpace


def build_runtime(
    config: AgentConfig,
    *,
    backends: Backends | None = None,
    clock: Clock = utcnow,
    on_action: ActionHook = lambda op, outcome, size: None,
    on_job_end: Callable[[str], None] = lambda state: None,
) -> Runtime:
    """Everything the agent is made of, over ``backends`` (the real ones by default).
    Jobs a crash cut short are marked interrupted."""
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
    pending = PendingSpace(backends.btrfs, inventory.local_mount)
    jobs = Jobs(
        inventory,
        executor,
        sweeper,
        pending=pending,
        audit=audit,
        state=state,
        on_action=on_action,
        on_finish=on_job_end,
    )
    try:
        for _ in jobs.recover():
            on_job_end("interrupted")
    except Unavailable as exc:
        # jobs a crash cut short are marked interrupted (the state store); their audit
        # entries cannot be written now: /readyz and every mutation say why
        log.error("start-up recovery could not be audited: %s: %s", exc.code, exc.detail)
    return Runtime(
        config=config,
        backends=backends,
        inventory=inventory,
        executor=executor,
        deletes=Deletes(inventory, executor, audit, sweeper, pending, on_action=on_action),
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
        pending=pending,
    )
