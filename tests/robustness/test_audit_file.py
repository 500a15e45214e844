"""The audit log removed or replaced under the real agent, or started afresh behind its
back (issue 12, case 6). Before: verify answered 500, later entries went into the
deleted file, and after a restart the new empty log read ``ok``, count 0.

Now: verify is not ok with the reason, ``/readyz`` is not ready (code
``audit_unavailable``), every clean-scope request is refused with a 503 problem, and a
restart on a fresh log keeps all that until ``janitor-agent audit accept``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from lab.agentproc import AgentProcess, start_agent

NO_DOCKER = "unix:///nonexistent/docker.sock"


def _files(agent: AgentProcess) -> list[Path]:
    db = agent.state_dir / "audit.db"
    return [db, Path(f"{db}-wal"), Path(f"{db}-shm")]


def _refused(c: httpx.Client, agent: AgentProcess, why: str) -> None:
    v = c.get("/v1/audit/verify")
    assert v.status_code == 200, v.text
    body: dict[str, Any] = v.json()
    assert body["ok"] is False and why in body["reason"], body
    with httpx.Client(base_url=agent.url, verify=agent.ssl_context()) as anon:
        r = anon.get("/readyz")
    assert r.status_code == 503 and r.json()["code"] in ("docker_unavailable", "audit_unavailable")
    assert "audit_unavailable" in r.json()["unavailable"], r.json()
    assert str(agent.state_dir) not in r.text
    assert r.headers["retry-after"].isdigit()
    for method, url in (
        ("POST", "/v1/plans"),
        ("DELETE", "/v1/volumes/somevolume"),
        ("DELETE", "/v1/filesystems/x/subvolumes/256?dry_run=false"),
        ("POST", "/v1/plans/nope/apply"),
    ):
        r = c.request(method, url, json={} if method == "POST" else None)
        assert r.status_code == 503, (url, r.status_code, r.text)
        assert r.json()["code"] == "audit_unavailable", r.text
        assert r.headers["retry-after"].isdigit()


def test_removed_replaced_and_fresh_audit_logs_are_reported(tmp_path: Path) -> None:
    work = tmp_path / "agent"
    agent = start_agent(work, docker_host=NO_DOCKER)
    try:
        with agent.client() as c:
            assert c.get("/v1/audit/verify").json()["ok"] is True
            for f in _files(agent):
                f.unlink(missing_ok=True)
            _refused(c, agent, "was removed")
            assert not (agent.state_dir / "audit.db").exists()  # verify created nothing
            # a file of someone else's at the same path
            (agent.state_dir / "audit.db").write_bytes(b"")
            _refused(c, agent, "was replaced")
        assert "Traceback" not in agent.log(), agent.log()
    finally:
        agent.kill()
    for f in _files(agent):
        f.unlink(missing_ok=True)

    # a restart on a fresh, empty log where the agent kept one
    agent = start_agent(work, docker_host=NO_DOCKER, token=agent.token)
    try:
        with agent.client() as c:
            _refused(c, agent, "is not the one this agent kept")
            assert "audit log refused" in agent.log()
    finally:
        agent.kill()

    cli = subprocess.run(
        [sys.executable, "-m", "agent.cli", "audit", "accept", "--config", str(agent.config_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    agent = start_agent(work, docker_host=NO_DOCKER, token=agent.token)
    try:
        with agent.client() as c:
            v = c.get("/v1/audit/verify").json()
            assert v["ok"] is True and v["count"] == 1, v  # the "accepted" entry
            entry = c.get("/v1/audit").json()["items"][0]
            assert entry["action"] == "audit.accept", entry
            r = c.post("/v1/plans", json={})
            assert r.json()["code"] == "docker_unavailable", r.text  # no lab here
    finally:
        agent.kill()
