"""``GET /docs`` (no token, like ``/openapi.json``): the API's documentation page,
Swagger UI reading ``/openapi.json``, served from files shipped in the package
(``agent/http/docs_assets/``: Swagger UI vendored from npm's ``swagger-ui-dist`` at the
version its ``VENDOR.json`` names, and the page's own script). Nothing is loaded from
anywhere but the agent: a NAS may have no internet.

Asset URLs carry a digest of the file (``/docs/assets/<digest>/<name>``), so a browser
may keep them for a year and still fetches new files after an upgrade; the page itself
is revalidated on every visit (``no-cache`` with an ETag). Every answer of this
blueprint carries a Content-Security-Policy that allows only the agent's own origin,
and no inline script or style.
"""

from __future__ import annotations

import functools
import hashlib
import html
import json
from dataclasses import dataclass
from pathlib import Path

from flask import Blueprint, Response, abort, request, send_file

from agent import __version__

ASSETS_DIR = Path(__file__).resolve().parent.parent / "docs_assets"
ONE_YEAR = 365 * 24 * 3600

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "font-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}

# What the page may fetch: name in the URL -> (file below ASSETS_DIR, media type; text
# types are sent with "; charset=utf-8").
_FILES = {
    "swagger-ui-bundle.js": ("swagger-ui/swagger-ui-bundle.js", "text/javascript"),
    "swagger-ui.css": ("swagger-ui/swagger-ui.css", "text/css"),
    "favicon-32x32.png": ("swagger-ui/favicon-32x32.png", "image/png"),
    "docs.js": ("docs.js", "text/javascript"),
    "LICENSE": ("swagger-ui/LICENSE", "text/plain"),
    "NOTICE": ("swagger-ui/NOTICE", "text/plain"),
    "swagger-ui-bundle.js.LICENSE.txt": (
        "swagger-ui/swagger-ui-bundle.js.LICENSE.txt",
        "text/plain",
    ),
}

blp = Blueprint("docs", __name__)


@dataclass(frozen=True)
class Asset:
    path: Path
    content_type: str
    digest: str  # the first 16 hex digits of the file's SHA-256

    def url(self, name: str) -> str:
        """Relative to ``/docs``, so that a reverse proxy's path prefix is kept."""
        return f"docs/assets/{self.digest}/{name}"


@functools.cache
def assets() -> dict[str, Asset]:
    """The files the page may fetch, hashed once per process."""
    found = {}
    for name, (rel, content_type) in _FILES.items():
        path = ASSETS_DIR / rel
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        found[name] = Asset(path=path, content_type=content_type, digest=digest)
    return found


@functools.cache
def swagger_ui_version() -> str:
    record = json.loads((ASSETS_DIR / "swagger-ui" / "VENDOR.json").read_text())
    return str(record["version"])


@functools.cache
def page() -> str:
    a = assets()

    def url(name: str) -> str:
        return html.escape(a[name].url(name))

    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>nas-janitor agent API {html.escape(__version__)}</title>
<link rel="stylesheet" href="{url("swagger-ui.css")}">
<link rel="icon" type="image/png" href="{url("favicon-32x32.png")}">
</head>
<body>
<div id="swagger-ui" data-openapi="openapi.json"></div>
<noscript><p>This page needs JavaScript. The document itself:
<a href="openapi.json">openapi.json</a>.</p></noscript>
<footer class="swagger-ui"><div class="wrapper"><p>
Swagger UI {html.escape(swagger_ui_version())}, shipped with the agent
(Apache-2.0: <a href="{url("LICENSE")}">LICENSE</a>, <a href="{url("NOTICE")}">NOTICE</a>,
<a href="{url("swagger-ui-bundle.js.LICENSE.txt")}">bundled components</a>).
</p></div></footer>
<script src="{url("swagger-ui-bundle.js")}"></script>
<script src="{url("docs.js")}"></script>
</body>
</html>
"""


@blp.after_request
def _secure(response: Response) -> Response:
    for key, value in SECURITY_HEADERS.items():
        response.headers[key] = value
    return response


@blp.get("/docs")
def docs() -> Response:
    """The documentation page."""
    response = Response(page(), mimetype="text/html")
    response.headers["Cache-Control"] = "no-cache"
    response.add_etag()
    response.make_conditional(request)  # a 304 for the ETag the browser has
    return response


@blp.get("/docs/assets/<digest>/<name>")
def asset(digest: str, name: str) -> Response:
    """One file of the page, under the digest of its content (404 for any other)."""
    found = assets().get(name)
    if found is None or digest != found.digest:
        abort(404)
    response = send_file(
        found.path,
        mimetype=found.content_type,
        etag=found.digest,
        last_modified=None,
        max_age=ONE_YEAR,
        conditional=True,
    )
    response.headers["Cache-Control"] = f"public, max-age={ONE_YEAR}, immutable"
    return response
