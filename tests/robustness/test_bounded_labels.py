"""Metric label values are bounded (issue 12, case 2): made-up HTTP methods, paths and
query strings sent to the real agent (gunicorn, TLS) add no series to ``/metrics``.
Before, each new method was a new label value: 2,000 of them grew the scrape by 400 KB.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from lab.agentproc import running_agent
from tests.robustness import knobs

NO_DOCKER = "unix:///nonexistent/docker.sock"
ALLOWED_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other"}


def _series(text: str) -> set[str]:
    return {line.split(" ")[0] for line in text.splitlines() if line.startswith("nas_janitor_http")}


def test_made_up_methods_and_paths_add_no_series(tmp_path: Path) -> None:
    n = 1000 if knobs.LONG else 200
    with running_agent(tmp_path / "agent", docker_host=NO_DOCKER) as agent:
        with agent.client() as c, agent.client(token="nj_nobody") as anon:
            for method in ("GET", "BREW", "PROPFIND"):
                anon.request(method, "/v1/host")
            anon.get("/nowhere")
            anon.request("BREW", "/nowhere")
            c.get("/metrics")  # the scrape's own series exist from now on
            before = c.get("/metrics").text
            for i in range(n):
                method = "X" + secrets.token_hex(4).upper()
                r = anon.request(method, f"/v1/{secrets.token_hex(3)}?q={i}")
                assert r.status_code in (400, 401, 404, 405, 501), (method, r.status_code)
                anon.get(f"/made/up/{secrets.token_hex(6)}")
            after = c.get("/metrics").text
    methods = set(re.findall(r'method="([^"]*)"', after))
    assert methods <= ALLOWED_METHODS, methods
    endpoints = set(re.findall(r'endpoint="([^"]*)"', after))
    assert all(
        e == "unmatched"
        or (e.startswith("/") and "<" in e)
        or e
        in {
            "/healthz",
            "/readyz",
            "/metrics",
            "/openapi.json",
            "/v1/host",
            "/v1/filesystems",
            "/v1/volumes",
            "/v1/findings",
            "/v1/plans",
            "/v1/audit",
            "/v1/audit/verify",
        }
        for e in endpoints
    ), endpoints
    # the same series as before, with other counts
    new = _series(after) - _series(before)
    assert not new, sorted(new)
    assert len(after) - len(before) < 1000, len(after) - len(before)
