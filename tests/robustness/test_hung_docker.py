"""A hung dockerd (a real unix socket server that accepts and never answers) and what
``/readyz`` tells whom (issue 12, cases 8 and 10).

Before: every Docker call waited 30 s, and with a few of them ``/healthz`` stopped
answering too; ``/readyz`` told anonymous callers the Docker socket's and the btrfs
binary's paths."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

from lab.agentproc import AgentProcess, running_agent
from tests.robustness import knobs


@contextmanager
def hung_daemon(path: Path) -> Iterator[list[socket.socket]]:
    """Accept every connection, read nothing, answer nothing, until the end."""
    held: list[socket.socket] = []
    stop = threading.Event()
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(64)
    server.settimeout(0.2)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield held
    finally:
        stop.set()
        t.join(5)
        server.close()
        for conn in held:
            conn.close()


def _timed_get(agent: AgentProcess, path: str, token: str | None) -> tuple[float, httpx.Response]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=agent.url, verify=agent.ssl_context(), timeout=60) as c:
        t0 = time.monotonic()
        r = c.get(path, headers=headers)
        return time.monotonic() - t0, r


def test_a_hung_docker_gives_prompt_503s_and_healthz_stays_up(tmp_path: Path) -> None:
    sock = tmp_path / "hung.sock"
    stuck = 16 if knobs.LONG else 6
    with (
        hung_daemon(sock) as held,
        running_agent(tmp_path / "agent", docker_host=f"unix://{sock}") as agent,
        ThreadPoolExecutor(stuck + 1) as pool,
    ):
        paths = ["/v1/volumes", "/v1/host", "/v1/findings", "/readyz"]
        t0 = time.monotonic()
        calls = [
            pool.submit(_timed_get, agent, paths[i % len(paths)], agent.read_token)
            for i in range(stuck)
        ]
        health: list[float] = []
        while not all(f.done() for f in calls) and time.monotonic() - t0 < 60:
            took, r = _timed_get(agent, "/healthz", None)
            assert r.status_code == 200
            health.append(took)
            time.sleep(0.2)
        results = [f.result() for f in calls]
        total = time.monotonic() - t0
        assert held, "the agent never reached the hung daemon"
    for took, r in results:
        assert r.status_code == 503, r.text
        assert r.json()["code"] == "docker_unavailable", r.text
        assert r.headers["retry-after"].isdigit()
        assert took < 12, results
    assert total < 15, total
    # every thread waits on the hung daemon; liveness is still answered within a
    # Kubernetes probe's default timeout (1 s), by the worker's own loop
    assert health and max(health) < 1.0, health
    print(
        f"{stuck} requests on a hung dockerd: all 503 within {max(t for t, _ in results):.1f} s; "
        f"/healthz max {max(health):.2f} s over {len(health)} probes"
    )


def test_readyz_names_the_dependency_not_where_it_lives(tmp_path: Path) -> None:
    secret_places = ("/nonexistent-docker-dir", "/nonexistent-btrfs-dir")
    extra = {"btrfs_binary": f"{secret_places[1]}/btrfs"}
    with running_agent(
        tmp_path / "agent", docker_host=f"unix://{secret_places[0]}/docker.sock", extra=extra
    ) as agent:
        for token in (None, "nj_not-a-token", agent.token):  # anonymous, bad, both scopes
            _, r = _timed_get(agent, "/readyz", token)
            assert r.status_code == 503, r.text
            body = r.json()
            assert body["unavailable"] == ["docker_unavailable", "btrfs_unavailable"], body
            if token == agent.token:
                assert all(p in r.text for p in secret_places), body
            else:
                assert not any(p in r.text for p in secret_places), body
                assert body["detail"] == "not ready: docker_unavailable, btrfs_unavailable"
        _, r = _timed_get(agent, "/readyz", agent.read_token)
        assert all(p in r.text for p in secret_places), r.text
