"""Hostile HTTP peers on loopback, for the controller's robustness tests: a small
threaded HTTP/1.1 server (the standard library's) whose answers are what a broken or
malicious agent, or a bad webhook, sends: a byte every few seconds, 500 MB, chunks that
never end, an audit log that never ends, JSON no parser should take. Real sockets, real
HTTP, no mocks; each server counts what it managed to send.

    with HostileServer(trickle(interval=0.5)) as server:
        ...janitorctl against server.url...
        server.sent   # bytes written to clients so far
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from shared import auditchain

TOKEN = "nj_hostile-test-token"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


Behaviour = Callable[["Handler", Request], None]


class Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _handle(self) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        req = Request(
            method=self.command,
            path=parts.path,
            query=parse_qs(parts.query),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
        )
        self.server.owner.requests.append(req)
        try:
            self.server.owner.behaviour(self, req)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
            self.close_connection = True

    do_GET = do_POST = do_DELETE = do_PUT = _handle

    # -- writing, counted ------------------------------------------------------------------

    def raw(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()
        with self.server.owner.lock:
            self.server.owner.sent += len(data)

    def head(self, status: int, headers: dict[str, str]) -> None:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Whatever')}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.raw(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def whole(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.head(status, {"Content-Type": content_type, "Content-Length": str(len(body))})
        self.raw(body)

    def send_json(self, data: Any, status: int = 200) -> None:
        self.whole(status, json.dumps(data).encode())

    @property
    def stopping(self) -> bool:
        return self.server.owner.stop.is_set()


_REASONS = {200: "OK", 404: "Not Found", 500: "Internal Server Error", 503: "Unavailable"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: HostileServer


@dataclass
class HostileServer:
    """A server on 127.0.0.1 that answers every request with ``behaviour``."""

    behaviour: Behaviour
    port: int = 0  # 0: any free one
    requests: list[Request] = field(default_factory=list)
    sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> HostileServer:
        self._httpd = _Server(("127.0.0.1", self.port), Handler)
        self._httpd.owner = self
        self.port = int(self._httpd.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


# -- behaviours -------------------------------------------------------------------------------


def trickle(interval: float, *, where: str = "body") -> Behaviour:
    """An answer sent one byte every ``interval`` seconds, for ever: from the status line
    on (``where="head"``), or after whole headers, as a body of JSON whitespace."""

    def behave(h: Handler, _req: Request) -> None:
        if where == "head":
            start = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Slow: "
            filler = itertools.repeat(ord("a"))
        else:
            h.head(200, {"Content-Type": "application/json", "Connection": "close"})
            h.close_connection = True
            start, filler = b"", itertools.repeat(ord(" "))
        for byte in itertools.chain(start, filler):
            if h.stopping:
                return
            h.raw(bytes([byte]))
            time.sleep(interval)

    return behave


def big(size: int, *, with_length: bool) -> Behaviour:
    """``size`` bytes of JSON whitespace as fast as the client takes them, announced by
    Content-Length or not (then the end of the connection ends the body)."""
    block = b" " * (1 << 20)

    def behave(h: Handler, _req: Request) -> None:
        headers = {"Content-Type": "application/json"}
        if with_length:
            headers["Content-Length"] = str(size)
        else:
            headers["Connection"] = "close"
            h.close_connection = True
        h.head(200, headers)
        left = size
        while left > 0 and not h.stopping:
            n = min(left, len(block))
            h.raw(block[:n])
            left -= n

    return behave


def endless_chunks() -> Behaviour:
    """A chunked answer whose chunks never end."""
    chunk = b"%x\r\n%s\r\n" % (1 << 16, b" " * (1 << 16))

    def behave(h: Handler, _req: Request) -> None:
        h.head(200, {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        while not h.stopping:
            h.raw(chunk)

    return behave


def fixed(status: int, body: bytes, headers: dict[str, str] | None = None) -> Behaviour:
    """The same answer to every request."""

    def behave(h: Handler, _req: Request) -> None:
        h.head(status, {"Content-Length": str(len(body)), **(headers or {})})
        h.raw(body)

    return behave


class EndlessAudit:
    """An agent whose audit log never ends: ``/v1/audit`` serves a valid hash chain page
    after page, with a next cursor always; ``/v1/audit/verify`` says all is well, with as
    many entries as were served so far. Everything else is a 404 problem."""

    def __init__(self) -> None:
        self._hashes = [auditchain.GENESIS]
        self.largest_after_seq = 0
        self.served = 0

    def entry(self, seq: int) -> dict[str, Any]:
        while len(self._hashes) <= seq:
            n = len(self._hashes)
            self._hashes.append(auditchain.entry_hash(**self._fields(n)))
        return {**self._fields(seq), "hash": self._hashes[seq]}

    def _fields(self, seq: int) -> dict[str, Any]:
        return {
            "seq": seq,
            "at": "2026-11-28T01:00:00.000000Z",
            "actor": "ops",
            "action": "delete_volume",
            "target": f"volume-{seq}",
            "outcome": "dry_run",
            "detail": {"n": seq},
            "prev_hash": self._hashes[seq - 1],
        }

    def __call__(self, h: Handler, req: Request) -> None:
        if req.path == "/v1/audit/verify":
            head = self.entry(self.served)["hash"] if self.served else auditchain.GENESIS
            h.send_json({"ok": True, "count": self.served, "head": head, "first_bad_seq": None})
        elif req.path == "/v1/audit":
            after = int(req.query.get("after_seq", ["0"])[0])
            limit = int(req.query.get("limit", ["500"])[0])
            self.largest_after_seq = max(self.largest_after_seq, after)
            items = [self.entry(s) for s in range(after + 1, after + limit + 1)]
            self.served = max(self.served, after + limit)
            h.send_json({"items": items, "next_cursor": f"c{after + limit}"})
        else:
            h.send_json({"type": "about:blank", "title": "Not Found", "status": 404,
                         "detail": "no such path", "code": "not_found"}, status=404)  # fmt: skip


class SlowPages:
    """An agent that answers every findings request whole, each within the request's
    timeout but slowly (``seconds``), with a fresh next cursor every time."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.pages = 0

    def __call__(self, h: Handler, req: Request) -> None:
        self.pages += 1
        body = json.dumps({"items": [], "next_cursor": f"page-{self.pages}"}).encode()
        h.head(200, {"Content-Type": "application/json", "Content-Length": str(len(body))})
        step = self.seconds / len(body)
        for i in range(len(body)):
            if h.stopping:
                return
            h.raw(body[i : i + 1])
            time.sleep(step)


class Catcher:
    """A webhook receiver: keeps every request; answers ``status`` (after ``delay``
    seconds, or never when ``hang``)."""

    def __init__(self, status: int = 200, *, delay: float = 0.0, hang: bool = False) -> None:
        self.status = status
        self.delay = delay
        self.hang = hang

    def __call__(self, h: Handler, _req: Request) -> None:
        if self.hang:
            while not h.stopping:
                time.sleep(0.05)
            return
        time.sleep(self.delay)
        h.whole(self.status, b"ok\n" if self.status < 400 else b"<h1>broken</h1>\n", "text/plain")


# -- janitorctl as a real process ----------------------------------------------------------------


@dataclass
class Finished:
    code: int | None  # None: killed when it ran past the test's patience
    stdout: str
    stderr: str
    seconds: float
    max_rss_kib: int


def write_fleet(folder: Path, agents: dict[str, str], **extra: Any) -> Path:
    """A fleet file with one agent per ``name: url``, each with a token file (0600)."""
    folder.mkdir(parents=True, exist_ok=True)
    token = folder / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    data: dict[str, Any] = {
        "store": "controller.db",
        "policy": {"min_age_seconds": 0},
        "agents": [{"name": n, "url": u, "token_file": "token"} for n, u in agents.items()],
        **extra,
    }
    path = folder / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# Runs one command and writes its own peak RSS (KiB) to a file descriptor. The peak a
# parent reads of a child it forked holds the parent's size at the fork (Linux keeps the
# old memory's high-water mark across exec), and the test process can be hundreds of MiB:
# this small process forks the command instead, so the peak read is the command's own
# (plus this interpreter's few MiB).
_PEAK_RSS = """
import os, resource, sys
limit, fd, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
pid = os.fork()
if pid == 0:
    os.close(fd)
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        os.execv(argv[0], argv)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
os.write(fd, str(usage.ru_maxrss).encode())
code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
"""


def janitorctl(
    *args: str, patience: float, address_space: int | None = None, env: dict[str, str] | None = None
) -> Finished:
    """``janitorctl ARGS`` in a process of its own; killed after ``patience`` seconds.
    ``address_space`` caps its virtual memory (RLIMIT_AS), so that a controller that
    reads without bound hits MemoryError instead of the machine's memory. ``max_rss_kib``
    is its own peak (see ``_PEAK_RSS``)."""
    exe = Path(sys.executable).parent / "janitorctl"
    environ = {**os.environ, "MALLOC_ARENA_MAX": "2", "COLUMNS": "200", **(env or {})}
    peak_r, peak_w = os.pipe()
    start = time.monotonic()
    try:
        wrapper = [sys.executable, "-S", "-c", _PEAK_RSS, str(address_space or 0), str(peak_w)]
        proc = subprocess.Popen(
            [*wrapper, str(exe), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environ,
            pass_fds=(peak_w,),
            start_new_session=True,  # its own process group: both end when killed
        )
    finally:
        os.close(peak_w)
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(patience, kill)
    timer.start()
    outputs: dict[str, bytes] = {}
    readers = [
        threading.Thread(target=lambda k=k, f=f: outputs.__setitem__(k, f.read()))
        for k, f in (("out", proc.stdout), ("err", proc.stderr))
    ]
    for t in readers:
        t.start()
    proc.wait()
    timer.cancel()
    for t in readers:
        t.join()
    with os.fdopen(peak_r, "rb") as f:
        peak = f.read().decode() or "0"  # nothing when it was killed
    return Finished(
        code=None if killed.is_set() else proc.returncode,
        stdout=outputs["out"].decode(errors="replace"),
        stderr=outputs["err"].decode(errors="replace"),
        seconds=time.monotonic() - start,
        max_rss_kib=int(peak),
    )


# -- by hand: `python -m tests.robustness.hostile KIND` serves until interrupted ---------------


def main(argv: list[str] | None = None) -> int:
    """Serve one hostile agent on 127.0.0.1 (to try janitorctl against it by hand):

        python -m tests.robustness.hostile trickle --interval 3   # a byte every 3 s
        python -m tests.robustness.hostile big --size 500000000   # 500 MB, no length
        python -m tests.robustness.hostile chunks                  # chunks for ever
        python -m tests.robustness.hostile audit                   # an endless audit log

    It prints its URL (``--port`` to choose it), then serves until interrupted."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.robustness.hostile")
    parser.add_argument("kind", choices=["trickle", "big", "chunks", "audit"])
    parser.add_argument("--interval", type=float, default=3.0)
    parser.add_argument("--size", type=int, default=500_000_000)
    parser.add_argument("--with-length", action="store_true")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    behaviour: Behaviour = {
        "trickle": lambda: trickle(args.interval),
        "big": lambda: big(args.size, with_length=args.with_length),
        "chunks": endless_chunks,
        "audit": EndlessAudit,
    }[args.kind]()
    with HostileServer(behaviour, port=args.port) as server:
        print(server.url, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
