"""Slow clients cannot starve the others (issue 12, case 1).

The real agent under gunicorn over loopback TLS (no lab needed: ``/healthz`` and the
audit need no Docker). Clients on real sockets send a request head a line every 3 s, or
stall in the middle of the TLS handshake; meanwhile ``/healthz`` (no token) and a read
token's request must keep answering promptly, and every slow client must be answered
``408`` (or closed, mid-handshake) once ``gunicorn.request_timeout`` is over. Before the
buffering worker, 8 such clients held the 4 threads and ``/healthz`` timed out (20 s).
"""

from __future__ import annotations

import socket
import statistics
import time
from pathlib import Path

import pytest

from lab.agentproc import AgentProcess, running_agent
from tests.robustness.slowclients import probe, slow_swarm

NO_DOCKER = "unix:///nonexistent/docker.sock"
REQUEST_TIMEOUT = 5


@pytest.fixture
def agent(tmp_path: Path):  # type: ignore[no-untyped-def]
    extra = {"gunicorn": {"threads": 4, "timeout": 120, "request_timeout": REQUEST_TIMEOUT}}
    with running_agent(tmp_path / "agent", docker_host=NO_DOCKER, extra=extra) as a:
        yield a


def _check(agent: AgentProcess, trickling: int, stalling: int, seconds: float) -> None:
    with slow_swarm(agent, trickling=trickling, stalling=stalling) as swarm:
        seen = probe(agent, seconds, timeout=10)
        assert not seen["timeouts"], seen
        for key in ("healthz", "token"):
            assert len(seen[key]) >= seconds, seen  # one every 0.2 s and then some
            assert max(seen[key]) < 2.0, (key, seen[key])
        print(
            f"{trickling} trickling + {stalling} stalling clients: healthz median "
            f"{statistics.median(seen['healthz']) * 1000:.0f} ms, max "
            f"{max(seen['healthz']) * 1000:.0f} ms; token median "
            f"{statistics.median(seen['token']) * 1000:.0f} ms"
        )
        deadline = time.monotonic() + REQUEST_TIMEOUT + 5
        while time.monotonic() < deadline and any(c.closed_after is None for c in swarm.clients):
            time.sleep(0.2)
    for i, c in enumerate(swarm.clients):
        assert c.closed_after is not None and c.closed_after < REQUEST_TIMEOUT + 3, (i, c)
        if i < trickling:  # the handshake was done: a 408 problem before the close
            assert c.answer.startswith(b"HTTP/1.1 408 "), (i, c.answer[:200])
            assert b"application/problem+json" in c.answer and b"request_timeout" in c.answer
    log = agent.log()
    assert "Traceback" not in log, log


def test_slow_clients_do_not_starve_the_others(agent: AgentProcess) -> None:
    _check(agent, trickling=8, stalling=2, seconds=6.0)


@pytest.mark.long
def test_many_slow_clients_for_longer(agent: AgentProcess) -> None:
    _check(agent, trickling=48, stalling=16, seconds=20.0)


def test_a_body_that_trickles_is_cut_at_the_bound(agent: AgentProcess) -> None:
    """A body of announced length sent a byte a second: 408, and others are served."""
    host, port = "127.0.0.1", int(agent.url.rpartition(":")[2])
    raw = socket.create_connection((host, port), timeout=10)
    with agent.ssl_context().wrap_socket(raw, server_hostname=host) as s:
        head = (
            "POST /v1/plans HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {agent.token}\r\nContent-Length: 100\r\n\r\n"
        )
        s.sendall(head.encode())
        t0 = time.monotonic()
        s.settimeout(1.0)
        answer = b""
        while time.monotonic() - t0 < REQUEST_TIMEOUT + 5:
            try:
                s.sendall(b" ")
                answer = s.recv(4096)
                break
            except TimeoutError:
                continue
            except OSError:
                break
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert time.monotonic() - t0 < REQUEST_TIMEOUT + 3


def test_whole_requests_pass_through_on_one_kept_alive_connection(agent: AgentProcess) -> None:
    with agent.client() as c:
        for _ in range(3):
            assert c.get("/healthz").status_code == 200
            r = c.post("/v1/plans", json={"min_age_seconds": "soon"})
            assert r.status_code == 422, r.text
            assert "min_age_seconds" in r.json()["errors"]
        r = c.post("/v1/plans", json={"kinds": ["orphan-layer"] * 10})
        assert r.status_code == 503 and r.json()["code"] == "docker_unavailable", r.text
        # a body over what the front buffers (256 KiB), read by the thread; and a chunked one
        ids = [f"id-{i:05d}" + "x" * 150 for i in range(4000)]
        r = c.post("/v1/plans", json={"finding_ids": ids})
        assert r.status_code == 503 and r.json()["code"] == "docker_unavailable", r.text
        chunks = iter([b'{"min_age_seconds": ', b'"soon"}'])
        r = c.post("/v1/plans", content=chunks, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text
        assert c.get("/healthz").status_code == 200
