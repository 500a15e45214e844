"""Slow clients for the real agent: TLS connections (real sockets, loopback) that send a
request head a line every few seconds, or stall half-way through the TLS handshake,
and a prober that times ``/healthz`` and an authenticated request meanwhile. Bounded in
count and time; every socket is closed by the context manager."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx

from lab.agentproc import AgentProcess


@dataclass
class SlowClient:
    """What happened to one slow client: when the server closed it (seconds after it
    connected, None while open) and the first bytes it answered."""

    opened_at: float = 0.0
    closed_after: float | None = None
    answer: bytes = b""
    error: str | None = None


@dataclass
class SlowSwarm:
    clients: list[SlowClient] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)


def _host_port(agent: AgentProcess) -> tuple[str, int]:
    hostport = agent.url.removeprefix("https://")
    host, _, port = hostport.rpartition(":")
    return host, int(port)


def _trickle(agent: AgentProcess, me: SlowClient, stop: threading.Event, every: float) -> None:
    """A TLS connection that sends a request head one header line every ``every``
    seconds, for as long as the server keeps it open (or until ``stop``)."""
    host, port = _host_port(agent)
    ctx = agent.ssl_context()
    me.opened_at = time.monotonic()
    try:
        raw = socket.create_connection((host, port), timeout=10)
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            s.settimeout(every)
            lines = [b"GET /healthz HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n"]
            n = 0
            while not stop.is_set():
                line = lines[n] if n < len(lines) else b"X-Slow-%d: a\r\n" % n
                n += 1
                try:
                    s.sendall(line)
                except OSError:
                    break
                try:
                    data = s.recv(4096)
                except (TimeoutError, ssl.SSLWantReadError):
                    continue
                except OSError:
                    break
                if data:
                    me.answer += data
                break  # an answer or EOF: the server dealt with us
    except OSError as exc:
        me.error = str(exc)
    me.closed_after = time.monotonic() - me.opened_at


def _stall_handshake(agent: AgentProcess, me: SlowClient, stop: threading.Event) -> None:
    """A TCP connection that sends the first bytes of a TLS ClientHello and then one
    byte every 2 s."""
    host, port = _host_port(agent)
    me.opened_at = time.monotonic()
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            s.sendall(hello[:6])
            for b in hello[6:]:
                if stop.is_set():
                    break
                try:
                    s.sendall(bytes([b]))
                    data = s.recv(4096)
                    if not data:
                        break
                    me.answer += data
                    break
                except TimeoutError:
                    continue
                except OSError:
                    break
    except OSError as exc:
        me.error = str(exc)
    me.closed_after = time.monotonic() - me.opened_at


@contextmanager
def slow_swarm(
    agent: AgentProcess, *, trickling: int, stalling: int = 0, every: float = 3.0
) -> Iterator[SlowSwarm]:
    swarm = SlowSwarm()
    for i in range(trickling + stalling):
        me = SlowClient()
        swarm.clients.append(me)
        if i < trickling:
            t = threading.Thread(target=_trickle, args=(agent, me, swarm.stop, every), daemon=True)
        else:
            t = threading.Thread(target=_stall_handshake, args=(agent, me, swarm.stop), daemon=True)
        swarm.threads.append(t)
        t.start()
    time.sleep(1.0)  # every slow client connected and talking
    try:
        yield swarm
    finally:
        swarm.stop.set()
        for t in swarm.threads:
            t.join(15)


def probe(agent: AgentProcess, seconds: float, *, timeout: float) -> dict[str, list[float]]:
    """Time ``GET /healthz`` (no token) and ``GET /v1/audit/verify`` (a read token), each
    on a fresh connection, one after the other for ``seconds``; a request that takes
    longer than ``timeout`` counts as ``timeout``."""
    out: dict[str, list[float]] = {"healthz": [], "token": [], "timeouts": []}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for key, path in (("healthz", "/healthz"), ("token", "/v1/audit/verify")):
            t0 = time.monotonic()
            try:
                with httpx.Client(
                    base_url=agent.url,
                    headers={"Authorization": f"Bearer {agent.read_token}"},
                    verify=agent.ssl_context(),
                    timeout=timeout,
                ) as c:
                    r = c.get(path)
                assert r.status_code == 200, (path, r.status_code, r.text)
                out[key].append(time.monotonic() - t0)
            except httpx.TimeoutException:
                out["timeouts"].append(time.monotonic() - t0)
        time.sleep(0.2)
    return out
