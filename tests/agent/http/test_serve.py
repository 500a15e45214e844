"""The agent under real gunicorn over TLS on loopback (no mocks): start-up, TLS,
mutual TLS, auth, and a clean stop."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.agentproc import running_agent

NO_DOCKER = "unix:///nonexistent/docker.sock"


def test_served_over_tls_with_auth(tmp_path: Path) -> None:
    with running_agent(tmp_path, docker_host=NO_DOCKER) as agent:
        with agent.client() as c:
            assert c.get("/healthz").json() == {"status": "ok"}
            spec = c.get("/openapi.json").json()
            assert "/v1/findings" in spec["paths"]
            r = c.get("/v1/host", headers={"Authorization": "Bearer nj_wrong"})
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
            # Docker is not there: a clean 503 problem, not a stack trace
            r = c.get("/v1/host")
            assert r.status_code == 503, r.text
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["code"] == "docker_unavailable"
            assert c.get("/readyz").json()["code"] == "docker_unavailable"
        # plain HTTP on the TLS port is not served
        with pytest.raises(httpx.HTTPError):
            httpx.get(agent.url.replace("https", "http") + "/healthz", timeout=5)
        # a client that does not trust the agent's CA refuses it
        with pytest.raises(httpx.ConnectError):
            httpx.get(agent.url + "/healthz", timeout=5)
        cli = subprocess.run(
            [sys.executable, "-m", "agent.cli", "healthcheck", "--config", str(agent.config_path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert cli.returncode == 0, cli.stderr
    assert agent.proc.returncode is not None


def test_mutual_tls_refuses_a_client_without_certificate(tmp_path: Path) -> None:
    with running_agent(tmp_path, docker_host=NO_DOCKER, mutual_tls=True) as agent:
        with agent.client(cert=True) as c:
            assert c.get("/healthz").status_code == 200
        with agent.client(cert=False) as c, pytest.raises((httpx.HTTPError, ssl.SSLError)):
            c.get("/healthz")
        cli = subprocess.run(
            [sys.executable, "-m", "agent.cli", "healthcheck", "--config", str(agent.config_path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert cli.returncode == 0, cli.stderr


def test_bad_config_stops_start_up_with_a_message(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("listen: nowhere\nroots: [relative]\n")
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert r.returncode == 2
    assert "listen" in r.stderr and "roots[0]" in r.stderr
    assert "Traceback" not in r.stderr


def test_token_new_prints_a_token_and_its_hash(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "token",
            "new",
            "--id",
            "ctl",
            "--scopes",
            "read,clean",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = r.stdout.splitlines()
    token = lines[0].removeprefix("token: ")
    from agent.http.auth import hash_token

    assert token.startswith("nj_") and hash_token(token) in r.stdout
    assert "scopes:" in r.stdout and "clean" in r.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "agent.cli", "token", "new", "--id", "x", "--scopes", "admin"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def test_the_master_is_lean_and_its_worker_reads_the_config(tmp_path: Path) -> None:
    """``serve`` checks the config, then becomes (same pid) a master that holds neither
    click nor PyYAML nor the config's code; the worker reads the config itself and
    serves as before, with the settings ``serve`` handed over."""
    with running_agent(tmp_path, docker_host=NO_DOCKER) as agent:
        pid = agent.proc.pid
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert argv[1:3] == [b"-m", b"agent.http.master"], argv
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "_yaml" not in maps  # PyYAML's C part is mapped once yaml is imported
        (worker,) = _children(pid)
        assert "_yaml" in Path(f"/proc/{worker}/maps").read_text()
        with agent.client() as c:
            assert c.get("/healthz").json() == {"status": "ok"}
            # the settings and the hook handed over are there: a request line over
            # limit_request_line (8190) is refused by gunicorn itself, as a problem
            r = c.get("/healthz?q=" + "x" * 9000)
            assert r.status_code == 414
            assert r.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("given", [None, "4"])
def test_the_server_runs_with_few_malloc_arenas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: str | None
) -> None:
    """``serve`` starts the master (and so its worker) with ``MALLOC_ARENA_MAX=2``
    unless the user set it: glibc reads it when the process starts."""
    if given is None:
        monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    else:
        monkeypatch.setenv("MALLOC_ARENA_MAX", given)
    with running_agent(tmp_path, docker_host=NO_DOCKER) as agent:
        pid = agent.proc.pid
        (worker,) = _children(pid)
        for p in (pid, worker):
            environ = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
            assert f"MALLOC_ARENA_MAX={given or 2}".encode() in environ, p


def test_the_master_refuses_what_serve_did_not_hand_over() -> None:
    from agent.http.handover import HANDOVER, write_handover

    for value in ("{not json", "[1]", '{"options": {}}', None, "no descriptor"):
        env = {k: v for k, v in os.environ.items() if k != HANDOVER}
        fds: tuple[int, ...] = ()
        if value == "no descriptor":
            env[HANDOVER] = "x"
        elif value is not None:
            fds = (write_handover(value),)
            env[HANDOVER] = str(fds[0])
        try:
            r = subprocess.run(
                [sys.executable, "-m", "agent.http.master"],
                capture_output=True,
                text=True,
                check=False,
                timeout=60,
                env=env,
                pass_fds=fds,
            )
        finally:
            for fd in fds:
                os.close(fd)
        assert r.returncode == 2, (value, r.stderr)
        assert "Traceback" not in r.stderr


def test_the_config_is_in_no_environment_and_no_descriptor(tmp_path: Path) -> None:
    """The config (token hashes in it) goes over in an anonymous file the master reads
    and closes: it is not in the master's first environment (``/proc/PID/environ``,
    which stays for the process's life), nor in the worker's; neither holds the file
    (gunicorn's own unlinked heartbeat file in the worker is another)."""
    with running_agent(tmp_path, docker_host=NO_DOCKER) as agent:
        pid = agent.proc.pid
        (worker,) = _children(pid)
        with agent.client() as c:
            assert c.get("/healthz").status_code == 200
        hashes = [t["sha256"] for t in yaml.safe_load(agent.config_path.read_text())["tokens"]]
        assert len(hashes) == 2
        for p in (pid, worker):
            environ = Path(f"/proc/{p}/environ").read_bytes()
            assert not any(h.encode() in environ for h in hashes), p
            assert b'"tokens"' not in environ
            links = [os.readlink(f"/proc/{p}/fd/{fd}") for fd in os.listdir(f"/proc/{p}/fd")]
            assert not [x for x in links if "janitor-agent-serve" in x], p


def test_a_new_worker_serves_the_config_serve_checked(tmp_path: Path) -> None:
    """gunicorn starts a new worker when one dies: it serves the config ``serve``
    checked at start, not what the file holds now (here no longer a config at all)."""
    with running_agent(tmp_path, docker_host=NO_DOCKER) as agent:
        (worker,) = _children(agent.proc.pid)
        agent.config_path.write_text("listen: [not, a, config\n")
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = _children(agent.proc.pid)
            if now and now != [worker]:
                break
            time.sleep(0.05)
        with agent.client() as c:
            while time.monotonic() < deadline:
                try:
                    if c.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.05)
            assert c.get("/v1/host").json()["code"] == "docker_unavailable"  # authorized
            r = c.get("/v1/host", headers={"Authorization": "Bearer nj_wrong"})
            assert r.status_code == 401
        assert agent.proc.poll() is None


def test_the_config_goes_over_as_it_was() -> None:
    from agent.config import load_config
    from agent.http.handover import config_from_json, config_to_json

    config = load_config(
        data={
            "listen": "127.0.0.1:8443",
            "tokens": [{"id": "a", "sha256": "0" * 64, "scopes": ["read", "clean"]}],
            "roots": ["/volume1/docker"],
            "gunicorn": {"threads": 2, "request_timeout": 7},
            "unreadable_pids_allowed": [1234],
            "inventory_max_age_seconds": 0,
        },
        env={},
    )
    sent = json.loads(json.dumps(config_to_json(config)))
    assert config_from_json(sent) == config
