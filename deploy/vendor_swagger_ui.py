"""Vendor Swagger UI (npm's ``swagger-ui-dist``, pinned) into the agent package, for
``GET /docs``: a NAS may have no internet, so the page never loads anything from a CDN.

    .venv/bin/python deploy/vendor_swagger_ui.py 5.35.0

Fetches the package with ``npm pack``, checks the tarball against the integrity the
registry publishes (``npm view``), copies the few files the page needs and the licence
into ``agent/http/docs_assets/swagger-ui/``, and writes ``VENDOR.json`` there (package,
version, integrity, and the SHA-256 of every file; a test checks the files against it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEST = REPO / "agent" / "http" / "docs_assets" / "swagger-ui"
PACKAGE = "swagger-ui-dist"
FILES = (
    "swagger-ui-bundle.js",
    "swagger-ui-bundle.js.LICENSE.txt",
    "swagger-ui.css",
    "favicon-32x32.png",
    "LICENSE",
    "NOTICE",
)


def npm(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["npm", *args], cwd=cwd, check=True, capture_output=True, text=True, timeout=300
    ).stdout.strip()


def main(version: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        integrity = json.loads(
            npm("view", f"{PACKAGE}@{version}", "dist.integrity", "--json", cwd=work)
        )
        tarball = work / npm("pack", f"{PACKAGE}@{version}", "--silent", cwd=work).splitlines()[-1]
        algo, _, want = integrity.partition("-")
        got = base64.b64encode(hashlib.new(algo, tarball.read_bytes()).digest()).decode()
        if got != want:
            raise SystemExit(f"{tarball.name}: {algo} {got} is not the registry's {want}")
        with tarfile.open(tarball) as tar:
            tar.extractall(work, filter="data")
        meta = json.loads((work / "package" / "package.json").read_text())
        if meta["version"] != version:
            raise SystemExit(f"npm packed {meta['version']}, not {version}")
        if DEST.exists():
            shutil.rmtree(DEST)
        DEST.mkdir(parents=True)
        hashes = {}
        for name in FILES:
            shutil.copyfile(work / "package" / name, DEST / name)
            hashes[name] = hashlib.sha256((DEST / name).read_bytes()).hexdigest()
    record = {
        "package": PACKAGE,
        "version": version,
        "license": meta["license"],
        "integrity": integrity,
        "sha256": hashes,
    }
    (DEST / "VENDOR.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"vendored {PACKAGE} {version} into {DEST.relative_to(REPO)}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: vendor_swagger_ui.py VERSION")
    main(sys.argv[1])
