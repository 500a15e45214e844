"""Stand-ins for many agents in ONE process (B3): ``--agents`` TLS listeners on loopback
that answer with responses captured from the real agent on the lab.

``--captures DIR`` holds ``<name>.json`` files: ``{"path": "/v1/findings", "status": 200,
"content_type": "...", "body": "..."}``; a request whose path (without the query) matches
gets that answer, byte for byte; ``/v1/...`` without the right bearer token gets ``401``
and anything else ``404``, both as problem details like the agent's. Keep-alive is
honoured. When every listener is up, the ports are printed on one line of JSON.

    .venv/bin/python -m bench.standin --agents 200 --captures DIR --cert C --key K --token-file T
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
from pathlib import Path

Canned = dict[str, tuple[int, str, bytes]]
REASONS = {200: "OK", 401: "UNAUTHORIZED", 404: "NOT FOUND"}


def problem(status: int, code: str, detail: str) -> tuple[int, str, bytes]:
    body = {"type": "about:blank", "title": REASONS[status].title(), "status": status}
    body.update({"detail": detail, "code": code})
    return status, "application/problem+json", json.dumps(body).encode()


def response(answer: tuple[int, str, bytes], extra: str = "") -> bytes:
    status, ctype, body = answer
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'X')}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


async def serve_one(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, canned: Canned, auth: str
) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            length = int(headers.get("content-length", "0") or 0)
            if length:
                await reader.readexactly(length)
            path = target.split("?", 1)[0]
            if path.startswith("/v1/") and headers.get("authorization") != auth:
                answer = problem(401, "unauthorized", "missing or unknown bearer token")
                extra = "WWW-Authenticate: Bearer\r\n"
            elif method == "GET" and path in canned:
                answer, extra = canned[path], ""
            else:
                answer, extra = problem(404, "not_found", f"no {path} here"), ""
            writer.write(response(answer, extra))
            await writer.drain()
            if headers.get("connection", "").lower() == "close":
                return
    except (ConnectionError, ssl.SSLError):
        return
    finally:
        writer.close()


async def main_async(args: argparse.Namespace) -> None:
    canned: Canned = {}
    for f in sorted(Path(args.captures).glob("*.json")):
        c = json.loads(f.read_text())
        canned[c["path"]] = (int(c["status"]), c["content_type"], c["body"].encode())
    token = Path(args.token_file).read_text().strip()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.cert, args.key)
    auth = f"Bearer {token}"

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await serve_one(r, w, canned, auth)

    servers = [
        await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ctx, backlog=64)
        for _ in range(args.agents)
    ]
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    print(json.dumps(ports), flush=True)
    await asyncio.Event().wait()  # until the benchmark stops this process


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, required=True)
    p.add_argument("--captures", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--token-file", required=True)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
