"""Docker stopped, the btrfs tool missing: clean 503 problems, and recovery.

The real agent under gunicorn (TLS) on the lab, with ``docker_host`` pointing at a
symlink to the lab daemon's socket and ``btrfs_binary`` at a symlink to /usr/bin/btrfs.
Removing a symlink takes that backend away for this agent only (the lab and other
agents are untouched); putting it back brings it back. While a backend is away, every
endpoint that needs it answers a 503 problem whose code names it (``docker_unavailable``
or ``btrfs_unavailable``), ``/readyz`` says which, and nothing answers 500 or shows a
stack trace (in answers or in the agent's log); ``/healthz`` stays 200; a job applied
meanwhile fails its actions with the reason and deletes nothing. Once the backend is
back, everything answers 200 again without a restart, and a new plan cleans up.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from lab import Lab
from lab.agentproc import AgentProcess
from tests.robustness.agents import REAL_BTRFS, launch, wait_job

DOCKER_PATHS = ("/v1/host", "/v1/volumes", "/v1/findings")
BTRFS_PATHS = ("/v1/filesystems", "/v1/findings", "/v1/host")


@contextmanager
def removed(link: Path) -> Iterator[None]:
    target = os.readlink(link)
    link.unlink()
    try:
        yield
    finally:
        link.symlink_to(target)


def _problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, (r.request.url, r.status_code, r.text)
    assert r.headers["content-type"] == "application/problem+json", r.headers
    body: dict[str, Any] = r.json()
    assert body["code"] == code, body
    assert {"type", "title", "status", "detail", "code"} <= set(body)
    assert "Traceback" not in r.text and 'File "' not in r.text
    return body


def _plan_for(c: httpx.Client, name: str) -> dict[str, Any]:
    found = c.get("/v1/findings", params={"min_age_seconds": 0}).json()["items"]
    ids = [f["id"] for f in found if f["target"]["name"] == name]
    assert len(ids) == 1, found
    plan: dict[str, Any] = c.post(
        "/v1/plans", json={"min_age_seconds": 0, "finding_ids": ids}
    ).json()
    assert len(plan["actions"]) == 1, plan
    return plan


def _scan_ok(c: httpx.Client) -> float:
    r = c.get("/metrics")
    assert r.status_code == 200, r.text
    line = next(x for x in r.text.splitlines() if x.startswith("nas_janitor_scan_ok "))
    return float(line.split()[1])


def _all_ok(c: httpx.Client, fs_uuid: str) -> None:
    for path in (
        "/readyz",
        "/healthz",
        *DOCKER_PATHS,
        *BTRFS_PATHS,
        f"/v1/filesystems/{fs_uuid}/subvolumes",
        "/v1/audit/verify",
    ):
        r = c.get(path)
        assert r.status_code == 200, (path, r.status_code, r.text)
    assert _scan_ok(c) == 1.0


def _eventually(check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_docker_and_btrfs_outages_are_clean_503s_and_recover(lab: Lab, tmp_path: Path) -> None:
    links = tmp_path / "links"
    links.mkdir()
    sock = links / "docker.sock"
    sock.symlink_to(lab.docker_socket)
    btrfs = links / "btrfs"
    btrfs.symlink_to(REAL_BTRFS)
    log_before = 0
    agent: AgentProcess = launch(
        tmp_path / "agent",
        docker_host=f"unix://{sock}",
        extra={"btrfs_binary": str(btrfs)},
    )
    try:
        with agent.client() as c:
            fs_uuid = next(
                f["uuid"]
                for f in c.get("/v1/filesystems").json()["items"]
                if str(lab.mnt) in f["mountpoints"]
            )
            _all_ok(c, fs_uuid)
            plan = c.post("/v1/plans", json={"kinds": ["orphan-layer"]}).json()
            orphan = lab.seed_orphan_subvolume()  # a leftover of this test's own
            doomed = _plan_for(c, orphan.name)
            log_before = len(agent.log_path.read_text(errors="replace"))

            with removed(sock):
                ready = _problem(c.get("/readyz"), 503, "docker_unavailable")
                assert "docker" in ready["detail"].lower()
                for path in DOCKER_PATHS:
                    _problem(c.get(path), 503, "docker_unavailable")
                _problem(c.post("/v1/plans", json={}), 503, "docker_unavailable")
                _problem(
                    c.delete(f"/v1/volumes/{lab.seeded.dind.volume}"), 503, "docker_unavailable"
                )
                assert c.get("/healthz").status_code == 200
                assert _scan_ok(c) == 0.0  # metrics stay scrapeable and say the scan failed
                # a job applied now fails its action, saying why, and deletes nothing
                failed_job = wait_job(
                    agent, c.post(f"/v1/plans/{doomed['id']}/apply").json()["job_id"]
                )
                assert failed_job["state"] == "failed", failed_job
                (result,) = failed_job["results"]
                assert result["outcome"] == "failed"
                assert result["detail"].startswith("docker_unavailable: "), result
                assert orphan.exists()
                # what needs neither backend still answers
                assert c.get(f"/v1/plans/{plan['id']}").status_code == 200
                assert c.get("/v1/audit/verify").json()["ok"] is True
            _eventually(lambda: _all_ok(c, fs_uuid))

            with removed(btrfs):
                ready = _problem(c.get("/readyz"), 503, "btrfs_unavailable")
                assert "btrfs" in ready["detail"].lower()
                for path in BTRFS_PATHS:
                    _problem(c.get(path), 503, "btrfs_unavailable")
                _problem(c.get(f"/v1/filesystems/{fs_uuid}/subvolumes"), 503, "btrfs_unavailable")
                _problem(c.post("/v1/plans", json={}), 503, "btrfs_unavailable")
                _problem(
                    c.delete(f"/v1/filesystems/{fs_uuid}/subvolumes/256?dry_run=false"),
                    503,
                    "btrfs_unavailable",
                )
                assert c.get("/healthz").status_code == 200
                assert _scan_ok(c) == 0.0
            _eventually(lambda: _all_ok(c, fs_uuid))

            # the clean side works again: a new plan for the same leftover cleans it
            job = wait_job(
                agent, c.post(f"/v1/plans/{_plan_for(c, orphan.name)['id']}/apply").json()["job_id"]
            )
            assert job["state"] == "succeeded", job
            assert not orphan.exists()

            with removed(sock), removed(btrfs):
                ready = _problem(c.get("/readyz"), 503, "docker_unavailable")
                assert ready["unavailable"] == ["docker_unavailable", "btrfs_unavailable"]
                assert c.get("/healthz").status_code == 200
            _eventually(lambda: _all_ok(c, fs_uuid))
        log = agent.log_path.read_text(errors="replace")[log_before:]
        assert "Traceback" not in log, log[-3000:]
        assert '" 500 ' not in log, log[-3000:]
    finally:
        agent.kill()
