"""Build the real agent app over the stateful fakes, with tokens of each scope."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from agent.config import AgentConfig, load_config
from agent.http.app import Backends, create_app
from agent.http.auth import hash_token
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


def build(state_dir: Path, sc: LeakScenario | None = None, **cfg: Any) -> AgentUnderTest:
    sc = sc or make_leak_scenario()
    clock_now = sc.now

    def clock() -> datetime:
        return clock_now

    app = create_app(
        agent_config(state_dir, **cfg),
        backend=Backends(btrfs=sc.btrfs, docker=sc.docker),
        clock=clock,
    )
    app.testing = True
    return AgentUnderTest(app=app, client=app.test_client(), sc=sc, state_dir=state_dir)
