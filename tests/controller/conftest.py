"""Fixtures for the controller's tests: fake agents behind ``httpx.MockTransport``, a
real closed port and a real silent server on 127.0.0.1, and the CLI run in-process."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from controller.cli import main
from controller.client import AgentClient
from controller.fleet import AgentSpec
from tests.controller.fake_agent import FakeAgent, leaky_agent

TOKEN_ENV = {"NJ_TOKEN": "tok-all"}


def client_for(fake: FakeAgent, **kw: Any) -> AgentClient:
    kw.setdefault("token", "tok-all")
    kw.setdefault("sleep", lambda s: None)
    return AgentClient(
        f"http://{fake.hostname}.lan:8080",
        name=fake.hostname,
        transport=httpx.MockTransport(fake),
        **kw,
    )


@pytest.fixture
def fake() -> FakeAgent:
    return leaky_agent()


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: connecting is refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts connections and never answers."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            held.append(conn)

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield int(server.getsockname()[1])
    stop.set()
    t.join(timeout=5)
    for conn in held:
        conn.close()
    server.close()


@dataclass
class Fleet:
    """A fleet file on disk and the fake agent behind each name. An agent whose url
    is a real loopback address (not ``*.lan``) is reached over the real network."""

    path: Path
    fakes: dict[str, FakeAgent]
    data: dict[str, Any]
    sleeps: list[float] = field(default_factory=list)

    def write(self) -> None:
        self.path.write_text(yaml.safe_dump(self.data), encoding="utf-8")

    def transport(self, spec: AgentSpec) -> httpx.BaseTransport | None:
        fake = self.fakes.get(spec.name)
        return httpx.MockTransport(fake) if fake is not None else None

    def cli(self, *argv: str, env: dict[str, str] | None = None) -> int:
        return main(
            ["--fleet", str(self.path), *argv],
            environ={**TOKEN_ENV, **(env or {})},
            transport_factory=self.transport,
            sleep=self.sleeps.append,
        )


@pytest.fixture
def make_fleet(tmp_path: Path) -> Callable[..., Fleet]:
    def make(*names: str, extra: dict[str, Any] | None = None, **kw: Any) -> Fleet:
        fakes = {n: leaky_agent(n) for n in names}
        agents = [
            {"name": n, "url": f"http://{n}.lan:8080", "token_env": "NJ_TOKEN"} for n in names
        ]
        data: dict[str, Any] = {
            "concurrency": 4,
            "retries": 1,
            "timeouts": {"poll": 0.001, "job": 30, "request": 2, "connect": 1},
            "store": "controller.db",
            "policy": {"min_age_seconds": 3600},
            "agents": agents + list(kw.pop("more_agents", [])),
            **(extra or {}),
        }
        fleet = Fleet(path=tmp_path / "fleet.yaml", fakes=fakes, data=data)
        fleet.write()
        return fleet

    return make
