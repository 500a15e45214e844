"""What every command needs, made on first use: the fleet, the agents selected, their
clients, the store, the consoles. Commands get it from click's context object."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
from rich.console import Console

from controller.client import AgentClient
from controller.errors import ConfigError
from controller.fleet import FLEET_ENV, AgentSpec, Fleet, default_store_path, load_fleet
from controller.fleetops import Outcome, for_each
from controller.output import make_console
from controller.store import Store

T = TypeVar("T")

TransportFactory = Callable[[AgentSpec], httpx.BaseTransport | None]


@dataclass
class Session:
    fleet_path: Path | None
    store_path: Path | None
    agent_names: Sequence[str] = ()
    labels: Sequence[str] = ()
    json: bool = False
    verbose: int = 0
    out: Console = field(default_factory=make_console)
    err: Console = field(default_factory=lambda: make_console(stderr=True))
    environ: Mapping[str, str] | None = None
    transport_factory: TransportFactory | None = None
    notify_transport: httpx.BaseTransport | None = None  # tests: webhooks in-process
    sleep: Callable[[float], None] = time.sleep
    _fleet: Fleet | None = None
    _store: Store | None = None

    @property
    def fleet(self) -> Fleet:
        if self._fleet is None:
            if self.fleet_path is None:
                raise ConfigError(f"no fleet file: give --fleet PATH or set {FLEET_ENV}")
            self._fleet = load_fleet(self.fleet_path)
        return self._fleet

    def agents(self) -> tuple[AgentSpec, ...]:
        chosen = self.fleet.select(self.agent_names, self.labels)
        if not chosen:
            raise ConfigError("no agent matches the selection", where="--label")
        return chosen

    @property
    def store(self) -> Store:
        """The store: ``--store``, else the fleet file's ``store``, else the default."""
        if self._store is None:
            path = self.store_path
            if path is None and self.fleet_path is not None:
                path = self.fleet.store
            self._store = Store.open(path or default_store_path(self.environ))
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    @contextmanager
    def clients(self) -> Iterator[list[AgentClient]]:
        """A client per selected agent, all made (tokens and TLS files read) before any
        is used, so that a bad file stops the command before it talks to anyone."""
        fleet = self.fleet
        with ExitStack() as stack:
            made = []
            for agent in self.agents():
                transport = self.transport_factory(agent) if self.transport_factory else None
                client = fleet.client(
                    agent, environ=self.environ, transport=transport, sleep=self.sleep
                )
                made.append(stack.enter_context(client))
            yield made

    def each(
        self, clients: Sequence[AgentClient], fn: Callable[[AgentClient], T]
    ) -> list[Outcome[AgentClient, T]]:
        """``fn(client)`` for every client, ``concurrency`` at a time, each within the
        fleet's ``timeouts.agent`` (counted from when its turn comes)."""
        limit = self.fleet.timeouts.agent

        def within(client: AgentClient) -> T:
            with client.time_limit(limit):
                return fn(client)

        return for_each(clients, within, concurrency=self.fleet.concurrency)
