"""Build the real agent app over the stateful fakes, with tokens of each scope."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from agent.config import AgentConfig, load_config
from agent.domain.inventory import Inventory
from agent.http.app import create_app
from agent.http.auth import hash_token
from agent.runtime import Backends, Runtime
from tests.fakes import LeakScenario, make_leak_scenario

READ = "nj_test-read-token-0000000000000000000000000"
CLEAN = "nj_test-clean-token-000000000000000000000000"
BOTH = "nj_test-both-token-0000000000000000000000000"


def agent_config(state_dir: Path, **extra: Any) -> AgentConfig:
    data: dict[str, Any] = {
        "listen": "127.0.0.1:8443",  # no TLS in process: loopback only
        "state_dir": str(state_dir),
        "tokens": [
            {"id": "reader", "sha256": hash_token(READ), "scopes": ["read"]},
            {"id": "cleaner", "sha256": hash_token(CLEAN), "scopes": ["clean"]},
            {"id": "ops", "sha256": hash_token(BOTH), "scopes": ["read", "clean"]},
        ],
    }
    data.update(extra)
    if data.get("btrfs_binary", "btrfs") != "btrfs":
        # another btrfs-progs (4.4.1): make the changes with it too, not by ioctl
        data.setdefault("subvolume_ioctls", False)
    return load_config(data=data, env={})


def auth(token: str = BOTH) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class AgentUnderTest:
    app: Flask
    client: FlaskClient
    sc: LeakScenario
    state_dir: Path

    def get(self, url: str, token: str = BOTH, **kw: Any) -> Any:
        return self.client.get(url, headers=auth(token), **kw)

    def restart(self) -> AgentUnderTest:
        """A new app on the same state directory and the same fake NAS."""
        return build(self.state_dir, self.sc)

    @property
    def runtime(self) -> Runtime:
        rt: Runtime = self.app.extensions["nas_janitor"].runtime
        return rt

    def wait_job(self, job_id: str, timeout: float = 30) -> dict[str, Any]:
        """Poll ``GET /v1/jobs/{id}`` until the job has stopped moving; its last answer."""
        deadline = time.monotonic() + timeout
        while True:
            job: dict[str, Any] = self.get(f"/v1/jobs/{job_id}").get_json()
            if job["state"] not in ("queued", "running"):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job['state']} after {timeout} s")
            time.sleep(0.01)


def join_job_thread(job_id: str, timeout: float = 30) -> None:
    """Wait for a job's thread to end, whatever state it left (a test that stands a
    crash in for a step leaves the job ``running``, as a killed agent does)."""
    for thread in threading.enumerate():
        if thread.name == f"job-{job_id[:8]}":
            thread.join(timeout)
            assert not thread.is_alive(), f"job {job_id} still running after {timeout} s"


class Swappable:
    """A backend whose target a test can swap between calls (``.inner``)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def build(
    state_dir: Path,
    sc: LeakScenario | None = None,
    *,
    backends: Backends | None = None,
    **cfg: Any,
) -> AgentUnderTest:
    sc = sc or make_leak_scenario()
    clock_now = sc.now

    def clock() -> datetime:
        return clock_now

    app = create_app(
        agent_config(state_dir, **cfg),
        backend=backends or Backends(btrfs=sc.btrfs, docker=sc.docker),
        clock=clock,
    )
    app.testing = True
    return AgentUnderTest(app=app, client=app.test_client(), sc=sc, state_dir=state_dir)


def real_inventory(state_dir: Path, docker_host: str, **cfg: Any) -> Inventory:
    """An ``Inventory`` over the real backends (the lab's dockerd at ``docker_host``),
    allowed to pass over the pids root may not read on this machine."""
    from agent.runtime import real_backends
    from lab.agentproc import pids_root_may_not_read

    cfg.setdefault("unreadable_pids_allowed", pids_root_may_not_read())
    config = agent_config(state_dir, docker_host=docker_host, **cfg)
    be = real_backends(config)
    return Inventory(config, btrfs=be.btrfs, docker=be.docker)
