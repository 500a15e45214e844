"""``janitorctl run`` against three real agents under gunicorn on loopback (TLS), one of
them down, on a lab of its own: the summary, the exit code, the leftovers really
reclaimed, and the pulled audit. Once with the distro's btrfs-progs as the agents'
``btrfs_binary``, once with 4.4.1 (tests/conftest.py)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lab import Lab
from lab.agentproc import Pki, free_port, start_agent


def janitorctl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    bin_dir = Path(sys.executable).parent
    return subprocess.run(
        [str(bin_dir / "janitorctl"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_run_over_three_agents_one_down(
    lab_factory: Callable[..., Lab], tmp_path: Path, btrfs_binary: str
) -> None:
    lab = lab_factory()
    seeded = lab.seeded
    pki = Pki(tmp_path / "pki")
    extra = {"btrfs_binary": btrfs_binary}
    # nas1: the agent of the lab, with mutual TLS
    nas1 = start_agent(
        tmp_path / "nas1", docker_host=lab.docker_host, pki=pki, mutual_tls=True, extra=extra
    )
    # nas2: an agent on the same Docker whose only root holds nothing to clean: its
    # findings are all blocked (outside its roots), so it deletes nothing
    empty_root = lab.data_root / "volumes" / seeded.never_touch.named_volume.name
    nas2 = start_agent(
        tmp_path / "nas2",
        docker_host=lab.docker_host,
        pki=pki,
        roots=[str(empty_root)],
        extra=extra,
    )
    down_port = free_port()  # nas3: nothing listens there
    try:
        for name, agent in (("nas1", nas1), ("nas2", nas2)):
            (tmp_path / f"{name}.token").write_text(agent.token)
        (tmp_path / "nas3.token").write_text("nj_nobody-listens")
        # secrets readable by their owner only: janitorctl refuses them otherwise
        for secret in [*tmp_path.glob("*.token"), pki.client_key]:
            secret.chmod(0o600)
        fleet: dict[str, Any] = {
            "store": "controller.db",
            "concurrency": 3,
            "timeouts": {"connect": 3, "request": 60, "job": 300, "poll": 0.5},
            "policy": {"min_age_seconds": 0},
            "agents": [
                {
                    "name": "nas1",
                    "url": nas1.url,
                    "token_file": "nas1.token",
                    "ca": str(pki.ca_pem),
                    "client_cert": str(pki.client_cert),
                    "client_key": str(pki.client_key),
                },
                {
                    "name": "nas2",
                    "url": nas2.url,
                    "token_file": "nas2.token",
                    "ca": str(pki.ca_pem),
                },
                {
                    "name": "nas3",
                    "url": f"https://127.0.0.1:{down_port}",
                    "token_file": "nas3.token",
                    "ca": str(pki.ca_pem),
                },
            ],
        }
        fleet_file = tmp_path / "fleet.yaml"
        fleet_file.write_text(yaml.safe_dump(fleet))

        r = janitorctl("--fleet", str(fleet_file), "--json", "run")
        assert r.returncode == 1, r.stdout + r.stderr  # one agent is down
        summary = {a["agent"]: a for a in json.loads(r.stdout)["agents"]}
        assert set(summary) == {"nas1", "nas2", "nas3"}

        one = summary["nas1"]
        assert one["reachable"] is True
        assert (one["findings"], one["planned"], one["deleted"], one["failed"]) == (2, 2, 2, 0), one
        assert one["audit_ok"] is True

        two = summary["nas2"]
        assert two["reachable"] is True and two["planned"] == 0 and two["deleted"] == 0

        three = summary["nas3"]
        assert three["reachable"] is False and three["error"]

        # the lab's leftovers are gone, and nothing else
        assert not seeded.orphan.path.exists()
        assert not any(p.exists() for p in seeded.dind.subvolumes)
        volumes = lab.docker("volume", "ls", "-q").stdout.split()
        assert seeded.dind.volume not in volumes
        for v in seeded.never_touch.volumes:
            assert v.name in volumes
            for rel, content in v.files.items():
                assert (v.mountpoint / rel).read_text() == content
        for p in seeded.never_touch.subvolumes:
            assert p.exists()

        # the audit was pulled into the controller's store and checks out
        with sqlite3.connect(tmp_path / "controller.db") as db:
            rows = db.execute("SELECT COUNT(*) FROM audit_entries WHERE agent = 'nas1'").fetchone()[
                0
            ]
            status = db.execute("SELECT status FROM audit_state WHERE agent = 'nas1'").fetchone()[0]
        assert status == "ok"
        with nas1.client() as c:
            agent_count = c.get("/v1/audit/verify").json()["count"]
        assert rows == agent_count > 0

        # the human-readable summary says the same, and a second run finds nothing
        again = janitorctl("--fleet", str(fleet_file), "run")
        assert again.returncode == 1
        assert "nas3" in again.stdout and "nas1" in again.stdout
        audit = janitorctl("--fleet", str(fleet_file), "--agent", "nas1", "audit")
        assert audit.returncode == 0, audit.stdout + audit.stderr
    finally:
        nas1.kill()
        nas2.kill()
