"""``GET /docs`` in headless Chromium (Debian's chromium package) against the real agent:
gunicorn over TLS on loopback (``lab.agentproc``; no Docker needed for this page).
Chromium trusts only the agent's server key (an SPKI pin, so TLS is checked, not
ignored) and cannot resolve any host name: a page that needed a CDN would not render.
The DOM it dumps must list every operation of ``/openapi.json``, and the only thing the
Content-Security-Policy may have refused is an inline ``data:`` image of Swagger UI's.

Chromium missing: skipped with the reason; with CI=true it fails instead.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.agentproc import AgentProcess, running_agent
from tests.conftest import in_ci

NO_DOCKER = "unix:///nonexistent/docker.sock"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
CSP_REFUSAL = re.compile(r'CONSOLE[^"]*"(.*?Content Security Policy.*?)", source', re.S)


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        reason = "chromium not found (run `make deps`: Debian's chromium package)"
        if in_ci():
            pytest.fail(f"CI=true: {reason}", pytrace=False)
        pytest.skip(reason)
    return path


def spki_pin(cert_pem: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def render(chromium: str, agent: AgentProcess, profile: Path, *extra: str) -> tuple[str, str]:
    """Chromium's DOM of ``/docs`` once the page settled, and its log (stderr)."""
    proc = subprocess.run(
        [
            chromium,
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--ignore-certificate-errors-spki-list={spki_pin(agent.pki.server_cert)}",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=30000",  # let the page fetch and render the document
            *extra,
            f"{agent.url}/docs",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def test_the_page_renders_every_operation(chromium: str, tmp_path: Path) -> None:
    with running_agent(tmp_path / "agent", docker_host=NO_DOCKER) as agent:
        with agent.client() as c:
            spec = c.get("/openapi.json").json()
        dom, log = render(chromium, agent, tmp_path / "profile", "--dump-dom")
        # what the agent served: the page, then its assets (gunicorn's access log is
        # off; the agent's request counter says the same)
        with agent.client() as c:
            metrics = c.get("/metrics").text
    (tmp_path / "dom.html").write_text(dom)
    rendered = {
        (m.group(1), html.unescape(m.group(2)))
        for m in re.finditer(
            r'opblock-summary-method">([A-Z]+)</span>.*?data-path="([^"]+)"', dom, re.S
        )
    }
    expected = {
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method in item
        if method in HTTP_METHODS  # not "parameters", shared by a path's operations
    }
    print(f"rendered {len(rendered)} operations, e.g. {sorted(rendered)[:3]}")
    assert ("GET", "/v1/findings") in rendered
    assert rendered == expected
    assert "nas-janitor agent" in dom  # the document's title, as Swagger UI shows it
    refused = CSP_REFUSAL.findall(log)
    print(f"refused by the Content-Security-Policy: {[r[:80] for r in refused]}")
    assert all(r.startswith("Loading the image 'data:image/svg+xml") for r in refused), refused
    assert "ERR_NAME_NOT_RESOLVED" not in log  # nothing reached for outside the agent
    for endpoint in ("/docs", "/docs/assets/<digest>/<name>", "/openapi.json"):
        assert re.search(
            rf'nas_janitor_http_requests_total\{{endpoint="{re.escape(endpoint)}",'
            rf'method="GET",status="200"\}} [1-9]',
            metrics,
        ), endpoint


def test_a_page_that_needs_the_internet_does_not_render(chromium: str, tmp_path: Path) -> None:
    """The check above can fail: the same page with Swagger UI from a CDN shows nothing
    here (no host name resolves), though the agent itself is up."""
    with running_agent(tmp_path / "agent", docker_host=NO_DOCKER) as agent:
        page = (tmp_path / "cdn.html").resolve()
        page.write_text(
            '<!doctype html><div id="swagger-ui"></div><script src="https://unpkg.com/'
            'swagger-ui-dist@5/swagger-ui-bundle.js"></script><script>SwaggerUIBundle('
            f'{{url: "{agent.url}/openapi.json", dom_id: "#swagger-ui"}})</script>'
        )
        proc = subprocess.run(
            [
                chromium,
                *FLAGS,
                f"--user-data-dir={tmp_path / 'profile'}",
                f"--ignore-certificate-errors-spki-list={spki_pin(agent.pki.server_cert)}",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--virtual-time-budget=10000",
                "--dump-dom",
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "opblock-summary-method" not in proc.stdout
