"""Load on the read endpoints of the real agent under gunicorn (TLS, the default one
worker with four threads) on the lab: concurrent clients with a read-only token, each
on its own keep-alive connection, round-robin over every read endpoint, for a bounded
time. In CI: 10 clients for 5 s, no error at all. The long run (``make robustness``):
50 clients for 30 s; the numbers go to BENCHMARKS.md ("Load"). With
``NAS_JANITOR_ROBUSTNESS_OUT`` set, the summary is also written there as load.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lab import Lab
from lab.agentproc import start_agent
from tests.robustness import knobs, loadgen
from tests.robustness.agents import get


def test_read_endpoints_under_concurrent_load(lab: Lab, tmp_path: Path) -> None:
    agent = start_agent(tmp_path / "agent", docker_host=lab.docker_host)
    try:
        fs = next(
            f["uuid"]
            for f in get(agent, "/v1/filesystems")["items"]
            if str(lab.mnt) in f["mountpoints"]
        )
        subs = get(agent, f"/v1/filesystems/{fs}/subvolumes", limit=5000)["items"]
        orphan = next(s["id"] for s in subs if s["path"] == str(lab.seeded.orphan.path))
        paths = [
            "/v1/host",
            "/v1/filesystems",
            f"/v1/filesystems/{fs}/subvolumes",
            f"/v1/filesystems/{fs}/subvolumes/{orphan}",
            "/v1/volumes",
            f"/v1/volumes/{lab.seeded.dind.volume}",
            "/v1/findings",
            "/v1/audit",
            "/v1/audit/verify",
            "/metrics",
            "/healthz",
            "/readyz",
        ]
        result = loadgen.run(
            agent.url,
            agent.read_token,
            agent.ssl_context(cert=False),
            paths,
            clients=knobs.LOAD_CLIENTS,
            seconds=knobs.LOAD_SECONDS,
        )
        summary = result.summary()
        print(json.dumps(summary, indent=2))
        out = os.environ.get("NAS_JANITOR_ROBUSTNESS_OUT")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "load.json").write_text(json.dumps(summary, indent=2) + "\n")
        assert result.server_errors == 0, summary
        assert result.errors == 0, summary
        assert {p.split("?")[0] for p in paths} <= set(result.by_path), summary
        assert result.requests >= len(paths), summary
        # the agent is still well after it
        assert get(agent, "/readyz")["status"] == "ready"
        assert "Traceback" not in agent.log_path.read_text(errors="replace")
    finally:
        agent.kill()
