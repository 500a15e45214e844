"""The B3 baseline: the same GETs ``janitorctl findings`` sends, one agent after the other,
with plain httpx in one process (a new client and TLS connection per agent, as the
controller makes). Prints how many findings it read.

    .venv/bin/python -m bench.plain_fleet PORTS_JSON TOKEN_FILE CA_PEM
"""

from __future__ import annotations

import json
import ssl
import sys
from pathlib import Path

import httpx


def main(argv: list[str]) -> int:
    ports = json.loads(Path(argv[0]).read_text())
    token = Path(argv[1]).read_text().strip()
    ca = argv[2]
    n = 0
    for port in ports:
        ctx = ssl.create_default_context(cafile=ca)
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=ctx, headers=headers) as c:
            r = c.get("/v1/findings", params={"limit": 500})
            r.raise_for_status()
            n += len(r.json()["items"])
    print(n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
