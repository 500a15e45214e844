"""``GET /docs`` in process (the real app over the stateful fakes): the page and its
assets come from the package, with the right content types, cache headers and a
Content-Security-Policy of the agent's own origin only; no token is needed; the
vendored Swagger UI is the one its VENDOR.json records; and a built wheel ships it.
The page rendered in a real browser: test_docs_browser.py."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from agent.http.views import docs
from tests.agent.http.apphelpers import AgentUnderTest, build

REPO = Path(__file__).resolve().parents[3]
VENDORED = REPO / "agent" / "http" / "docs_assets" / "swagger-ui"
TEXT = {"js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8"}


@pytest.fixture
def agent(tmp_path: Path) -> AgentUnderTest:
    return build(tmp_path)


def asset_urls(agent: AgentUnderTest) -> list[str]:
    page = agent.client.get("/docs").get_data(as_text=True)
    return ["/" + u for u in re.findall(r'(?:href|src)="(docs/assets/[^"]+)"', page)]


def test_the_page_needs_no_token_and_names_only_local_files(agent: AgentUnderTest) -> None:
    r = agent.client.get("/docs")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "text/html; charset=utf-8"
    assert r.headers["Cache-Control"] == "no-cache"
    assert r.headers["ETag"]
    page = r.get_data(as_text=True)
    # no CDN: no absolute or protocol-relative URL; scripts and styles below /docs/assets/
    assert not re.search(r'(?:src|href)="(?:[a-z]+:)?//', page)
    assert "http" not in page
    scripts = re.findall(r'<script src="([^"]+)"', page)
    styles = re.findall(r'<link rel="stylesheet" href="([^"]+)"', page)
    assert len(scripts) == 2 and len(styles) == 1
    assert all(u.startswith("docs/assets/") for u in scripts + styles)
    assert "<script>" not in page and "style=" not in page  # nothing inline
    assert 'data-openapi="openapi.json"' in page
    again = agent.client.get("/docs", headers={"If-None-Match": r.headers["ETag"]})
    assert again.status_code == 304


def test_every_answer_carries_the_security_headers(agent: AgentUnderTest) -> None:
    policy = docs.CONTENT_SECURITY_POLICY
    directives = dict(d.split(" ", 1) for d in policy.split("; "))
    assert directives["default-src"] == "'none'"
    sources = {s for v in directives.values() for s in v.split()}
    assert sources == {"'self'", "'none'"}  # no other origin, no 'unsafe-inline', no data:
    for url in ["/docs", *asset_urls(agent), "/docs/assets/0/docs.js"]:
        r = agent.client.get(url)
        assert r.headers["Content-Security-Policy"] == policy, url
        assert r.headers["X-Content-Type-Options"] == "nosniff", url
        assert r.headers["X-Frame-Options"] == "DENY", url
        assert r.headers["Referrer-Policy"] == "no-referrer", url


def test_assets_have_content_types_and_are_cached_for_good(agent: AgentUnderTest) -> None:
    urls = asset_urls(agent)
    names = [u.rsplit("/", 1)[1] for u in urls]
    assert {"swagger-ui-bundle.js", "swagger-ui.css", "docs.js", "favicon-32x32.png"} <= set(names)
    for url, name in zip(urls, names, strict=True):
        r = agent.client.get(url)
        assert r.status_code == 200, url
        ext = name.rsplit(".", 1)[-1]
        want = TEXT.get(ext) or ("image/png" if ext == "png" else "text/plain; charset=utf-8")
        assert r.headers["Content-Type"] == want, url
        assert r.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        digest = url.split("/")[3]
        assert hashlib.sha256(r.get_data()).hexdigest().startswith(digest)
        assert r.headers["ETag"] == f'"{digest}"'
        assert agent.client.get(url, headers={"If-None-Match": f'"{digest}"'}).status_code == 304
        head = agent.client.head(url)
        assert head.status_code == 200 and head.get_data() == b""


@pytest.mark.parametrize(
    "url",
    [
        "/docs/assets/0000000000000000/swagger-ui-bundle.js",  # a digest that is not the file's
        "/docs/assets/{d}/index.html",  # a file of the package that the page does not use
        "/docs/assets/{d}/..%2F..%2Fapp.py",
        "/docs/assets/{d}/VENDOR.json",
        "/docs/",
        "/docs/assets",
    ],
)
def test_anything_else_is_a_404_problem(agent: AgentUnderTest, url: str) -> None:
    digest = docs.assets()["docs.js"].digest
    r = agent.client.get(url.format(d=digest))
    assert r.status_code == 404
    assert r.mimetype == "application/problem+json"


def test_a_post_is_a_405_problem(agent: AgentUnderTest) -> None:
    r = agent.client.post("/docs")
    assert r.status_code == 405 and r.mimetype == "application/problem+json"


def test_docs_is_outside_the_openapi_document(agent: AgentUnderTest) -> None:
    spec = agent.client.get("/openapi.json").get_json()
    assert not [p for p in spec["paths"] if p.startswith("/docs")]


def test_the_vendored_files_are_what_vendor_json_records() -> None:
    record = json.loads((VENDORED / "VENDOR.json").read_text())
    assert record["package"] == "swagger-ui-dist"
    assert re.fullmatch(r"\d+\.\d+\.\d+", record["version"])
    assert record["license"] == "Apache-2.0"
    assert record["integrity"].startswith("sha512-")
    on_disk = {p.name for p in VENDORED.iterdir()} - {"VENDOR.json"}
    assert on_disk == set(record["sha256"])
    for name, want in record["sha256"].items():
        assert hashlib.sha256((VENDORED / name).read_bytes()).hexdigest() == want, name
    assert "Apache License" in (VENDORED / "LICENSE").read_text()
    assert docs.swagger_ui_version() == record["version"]
    assert f"Swagger UI {record['version']}" in docs.page()


@pytest.mark.timeout(300)
def test_the_wheel_ships_the_page_and_its_assets(tmp_path: Path) -> None:
    """What the images install: a wheel built from the files git tracks (or would)."""
    src = tmp_path / "src"
    files = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for rel in filter(None, files):
        source = REPO / rel.decode()
        if source.is_file():
            target = src / rel.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
        capture_output=True,
        check=True,
        timeout=280,
    )
    (wheel,) = out.glob("nas_janitor-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for rel in docs._FILES.values():
        assert f"agent/http/docs_assets/{rel[0]}" in names
    assert "agent/http/docs_assets/swagger-ui/VENDOR.json" in names
