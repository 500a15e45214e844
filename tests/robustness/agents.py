"""The real agent (``janitor-agent serve`` under gunicorn, TLS on loopback) with config
keys ``lab.agentproc.start_agent`` does not set (``btrfs_binary``), a btrfs stand-in
that can SIGKILL the agent at a chosen ``subvolume delete``, and small client helpers."""

from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.agentproc import AgentProcess, Pki, start_agent

REAL_BTRFS = "/usr/bin/btrfs"


def launch(
    workdir: Path,
    *,
    docker_host: str,
    extra: dict[str, Any] | None = None,
    token: str | None = None,
    pki: Pki | None = None,
    wait: float = 60.0,
) -> AgentProcess:
    """``lab.agentproc.start_agent`` with ``extra`` config keys (e.g. ``btrfs_binary``).
    The same ``workdir`` and ``token`` restart an agent on its state."""
    return start_agent(
        workdir, docker_host=docker_host, pki=pki, token=token, extra=extra, wait=wait
    )


def get(agent: AgentProcess, path: str, **params: Any) -> Any:
    with agent.client() as c:
        r = c.get(path, params=params)
        assert r.status_code == 200, (path, r.status_code, r.text)
        return r.json()


def audit_entries(agent: AgentProcess) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        page = get(agent, "/v1/audit", after_seq=after, limit=5000)["items"]
        if not page:
            return out
        out.extend(page)
        after = page[-1]["seq"]


def wait_job(agent: AgentProcess, job_id: str, timeout: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = get(agent, f"/v1/jobs/{job_id}")
        if job["state"] not in ("queued", "running"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


# -- a btrfs that dies on cue ------------------------------------------------------------------

_WRAPPER = r"""#!/bin/bash
# btrfs for the kill -9 tests: every command goes to the real btrfs (@REAL@). Each `subvolume
# delete` is counted and logged; armed ("before|after N PGID" in $ctl/arm), the Nth one
# SIGKILLs the agent's process group (PGID, which must be this process's own group)
# before the real btrfs runs, or after it returned. No hook in the agent: it only runs
# the btrfs_binary its config names.
ctl=@CTL@
real=@REAL@
if [ "$1" = subvolume ] && [ "$2" = delete ]; then
  exec 9>>"$ctl/lock"
  flock 9
  n=$(( $(cat "$ctl/count" 2>/dev/null || echo 0) + 1 ))
  echo "$n" > "$ctl/count"
  mode=off at=0 pgid=0
  [ -f "$ctl/arm" ] && read -r mode at pgid < "$ctl/arm"
  read -r _ _ _ _ mine _ < /proc/$$/stat
  if [ "$n" = "$at" ] && [ "$mine" = "$pgid" ] && [ "$mode" = before ]; then
    echo "killed-before $n ${*:3}" >> "$ctl/log"
    kill -KILL -- "-$pgid"
    exit 137
  fi
  echo "ran $n ${*:3}" >> "$ctl/log"
  if [ "$n" = "$at" ] && [ "$mine" = "$pgid" ] && [ "$mode" = after ]; then
    "$real" "$@"
    echo "killed-after $n rc=$?" >> "$ctl/log"
    kill -KILL -- "-$pgid"
    exit 137
  fi
  exec 9>&-
fi
exec "$real" "$@"
"""


@dataclass
class DyingBtrfs:
    """The wrapper script and its control folder; ``real`` is the btrfs it runs."""

    dir: Path
    real: str = REAL_BTRFS

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "btrfs"
        self.path.write_text(_WRAPPER.replace("@CTL@", str(self.dir)).replace("@REAL@", self.real))
        self.path.chmod(0o755)

    def arm(self, point: str, nth: int, pgid: int) -> None:
        """Die on the ``nth`` delete from now on, ``before`` or ``after`` it."""
        assert point in ("before", "after")
        self.disarm()
        (self.dir / "count").write_text("0\n")
        (self.dir / "arm").write_text(f"{point} {nth} {pgid}\n")

    def disarm(self) -> None:
        (self.dir / "arm").unlink(missing_ok=True)

    def log(self) -> list[tuple[str, list[str]]]:
        """(what, paths) of every delete: ``ran`` (the real btrfs was run),
        ``killed-before`` (killed instead), ``killed-after`` (the kill after a run)."""
        out = []
        path = self.dir / "log"
        for line in path.read_text().splitlines() if path.exists() else []:
            what, _, rest = line.partition(" ")
            _, _, paths = rest.partition(" ")
            out.append((what, paths.split() if what != "killed-after" else []))
        return out


def wait_dead(agent: AgentProcess, timeout: float = 30.0) -> int:
    """The agent's master has exited (after a SIGKILL of its group); its return code."""
    try:
        return agent.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        agent.kill(signal.SIGKILL)
        raise AssertionError(f"the agent survived the kill:\n{agent.log()}") from None
