"""Storage faults under the real agent on the lab (issue 12, case 4): the state store or
the audit log locked by another process (a real SQLite lock on the real file), and a
full disk (the state directory on a small tmpfs this test mounts and fills). Every
request that needs the faulty store answers a ``503 storage_unavailable`` problem with
``Retry-After`` within a few seconds, never a 500 or a trace; what does not need it
goes on answering; once the fault is gone everything works again without a restart.
Before: 30 to 60 s, then 500.

Not emulated here: an I/O error of the device (no device-mapper ``error`` target is
used on this machine); SQLite reports it as the same OperationalError family and
``agent.store.sqlite.storage_errors`` maps it the same way (tests/agent/store).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from lab import Lab
from lab.agentproc import AgentProcess, start_agent

_LOCKER = """
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
c.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
c.execute("ROLLBACK")
"""


@contextmanager
def locked(db: Path) -> Iterator[None]:
    """Another process holds the write lock of ``db`` until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _LOCKER, str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(30)


def _unavailable(r: httpx.Response, took: float) -> dict[str, Any]:
    assert r.status_code == 503, (r.request.url, r.status_code, r.text)
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["retry-after"].isdigit()
    body: dict[str, Any] = r.json()
    assert body["code"] == "storage_unavailable", body
    assert "Traceback" not in r.text
    assert took < 6, took
    return body


def _timed(c: httpx.Client, method: str, url: str, **kw: Any) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    r = c.request(method, url, **kw)
    return r, time.monotonic() - t0


def _plan(c: httpx.Client, **body: Any) -> httpx.Response:
    return c.post("/v1/plans", json={"min_age_seconds": 0, **body})


def test_a_locked_store_is_a_prompt_503(lab: Lab, tmp_path: Path) -> None:
    agent = start_agent(tmp_path / "agent", docker_host=lab.docker_host)
    try:
        with agent.client() as c:
            plan = _plan(c).json()
            seen: list[float] = []
            with locked(agent.state_dir / "state.db"):
                r, took = _timed(c, "POST", "/v1/plans", json={"min_age_seconds": 0})
                _unavailable(r, took)
                seen.append(took)
                r, took = _timed(c, "POST", f"/v1/plans/{plan['id']}/apply")
                _unavailable(r, took)
                seen.append(took)
                # readers are not held by a writer (WAL)
                assert c.get(f"/v1/plans/{plan['id']}").status_code == 200
                assert c.get("/healthz").status_code == 200
            with locked(agent.state_dir / "audit.db"):
                r, took = _timed(c, "DELETE", f"/v1/volumes/{lab.seeded.dind.volume}")
                _unavailable(r, took)  # a dry run is audited too
                seen.append(took)
                assert c.get("/v1/audit/verify").json()["ok"] is True
            print(f"locked stores answered 503 after {', '.join(f'{s:.2f}' for s in seen)} s")
            assert _plan(c).status_code == 201
            r = c.delete(f"/v1/volumes/{lab.seeded.dind.volume}")
            assert r.status_code == 200 and r.json()["dry_run"] is True, r.text
            assert c.get("/v1/audit/verify").json()["ok"] is True
        log = agent.log()
        assert "Traceback" not in log and '" 500 ' not in log, log
    finally:
        agent.kill()


@contextmanager
def small_tmpfs(where: Path, size: str = "8m") -> Iterator[Path]:
    where.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)], check=True
    )
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)
        if where.is_mount():
            subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_is_a_503_and_recovers(lab: Lab, tmp_path: Path) -> None:
    work = tmp_path / "agent"
    with small_tmpfs(work / "state"):
        agent: AgentProcess = start_agent(work, docker_host=lab.docker_host)
        try:
            with agent.client() as c:
                assert _plan(c).status_code == 201
                filler = _fill(agent.state_dir)
                ids = [f"x{i:05d}" + "y" * 180 for i in range(4000)]  # a plan of about 1 MB
                r, took = _timed(
                    c, "POST", "/v1/plans", json={"min_age_seconds": 0, "finding_ids": ids}
                )
                body = _unavailable(r, took)
                assert "full" in body["detail"], body
                assert c.get("/healthz").status_code == 200
                filler.unlink()
                r = _plan(c, finding_ids=ids)
                assert r.status_code == 201, r.text
                assert c.get("/v1/audit/verify").json()["ok"] is True
            log = agent.log()
            assert "Traceback" not in log and '" 500 ' not in log, log
        finally:
            agent.kill()
