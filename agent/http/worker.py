"""gunicorn's ``gthread`` worker with a buffering front: a thread gets a connection only
once its request has arrived whole.

Plain ``gthread`` hands a new connection to a thread as soon as its first byte arrives;
the thread then does the TLS handshake and reads the request head with blocking reads,
for as long as the client takes. Eight clients that send a header line every few
seconds hold every thread, and ``/healthz`` and every token holder wait behind them.

Here the worker's main loop (the one that accepts connections and polls kept-alive ones)
does that part without blocking, for every connection at once: the TLS handshake, the
request head, and a body whose ``Content-Length`` is at most ``BODY_CAP``. Only then is
the connection handed to a thread, whose parser finds the whole request already
buffered. A request must arrive whole within ``request_timeout`` seconds, counted from
the connection's accept (a new connection) or from its first byte (a kept-alive one);
one that does not is answered ``408`` (when the handshake was done) and closed.

What still reaches a thread before it is whole (a chunked body, a body announced with
``Expect: 100-continue``, a body over ``BODY_CAP``) is read through ``_TimedSocket``,
under the same deadline:
reading past it raises ``RequestTimeout``, which the app answers ``408``. Writes to the
client wait at most ``request_timeout`` for each send.

Memory is bounded by ``worker_connections`` (gunicorn's own cap on open connections)
times ``HEAD_CAP + BODY_CAP``.

Liveness while every thread is busy: a whole ``GET /healthz`` (no query, no body) that
arrives while all the worker's threads are taken (for example each waiting on a hung
dockerd, up to its timeout) is answered by this loop itself, ``200 {"status": "ok"}``
with ``Connection: close``: the process and its main loop are alive, which is what the
probe asks. Such an answer is not counted in the app's request metrics. With a thread
free, ``/healthz`` goes to the app as every other request.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import time
from functools import partial
from typing import Any

from gunicorn import http
from gunicorn import sock as gsock
from gunicorn.workers.gthread import ThreadWorker

from agent.errors import RequestTimeout
from agent.http.gunicorn import problem_page

HEAD_CAP = 64 * 1024  # a request head (line and headers) larger than this: 431
# bodies up to this are buffered before a thread gets the request (the API's largest, a
# plan request with 5,000 finding ids, is about 200 KB); a larger one (the app takes up
# to 1 MiB) is read by the thread, under the same deadline
BODY_CAP = 256 * 1024
_READ_SIZE = 64 * 1024
LINGER = 2.0  # seconds a refused connection is drained before it is closed (no RST)

# the app's own /healthz answer (flask's JSON, with its newline)
HEALTHZ_BODY = b'{"status":"ok"}\n'
_HEALTHZ_LINES = (b"GET /healthz HTTP/1.1", b"GET /healthz HTTP/1.0")


def healthz_page() -> bytes:
    """The liveness answer the worker's loop gives while every thread is busy."""
    head = (
        "HTTP/1.1 200 OK\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(HEALTHZ_BODY)}\r\n\r\n"
    )
    return head.encode("latin-1") + HEALTHZ_BODY


def is_plain_healthz(request: bytes) -> bool:
    """``request`` (its head and whatever body bytes came) is exactly one
    ``GET /healthz`` with no query and no body."""
    end = request.find(b"\r\n\r\n")
    if end < 0 or end + 4 != len(request):
        return False  # not whole, or a body or a pipelined request follows
    line = request[: request.find(b"\r\n")]
    return line in _HEALTHZ_LINES and _body_to_buffer(request[:end]) == 0


class _TimedSocket:
    """The connection's socket as its thread sees it: ``recv`` gives up at the
    request's deadline (``RequestTimeout``); blocking mode means "wait at most
    ``io_timeout`` for each operation"; everything else is the socket's own."""

    def __init__(self, raw: Any, io_timeout: float) -> None:
        self.raw = raw
        self.io_timeout = io_timeout
        self.deadline = time.monotonic()
        self._explicit: float | None = None
        raw.settimeout(io_timeout)

    def arm(self, deadline: float) -> None:
        self.deadline = deadline
        self._explicit = None
        self.raw.settimeout(self.io_timeout)

    def recv(self, size: int) -> bytes:
        if self._explicit is not None:
            # a bounded drain of an unread body, or a graceful close: their own bound
            data: bytes = self.raw.recv(size)
            return data
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise RequestTimeout("the request did not arrive whole in time")
        self.raw.settimeout(left)
        try:
            data = self.raw.recv(size)
        except TimeoutError as exc:
            raise RequestTimeout("the request did not arrive whole in time") from exc
        finally:
            self.raw.settimeout(self.io_timeout)
        return data

    def settimeout(self, value: float | None) -> None:
        self._explicit = value
        self.raw.settimeout(value if value is not None else self.io_timeout)

    def setblocking(self, flag: bool) -> None:
        if flag:
            self._explicit = None
            self.raw.settimeout(self.io_timeout)
        else:
            self.raw.setblocking(False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def _body_to_buffer(head: bytes) -> int | None:
    """How many body bytes to buffer after this head before a thread gets it: the
    ``Content-Length`` when it is plain and at most ``BODY_CAP``, 0 when there is no
    body; None when the thread should take the request as it is (chunked, ``Expect``,
    an oversized or odd length: the parser or the app answers those)."""
    length: int | None = None
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        key = name.strip().lower()
        if key in (b"transfer-encoding", b"expect"):
            return None
        if key == b"content-length":
            text = value.strip()
            if length is not None or not text.isdigit() or len(text) > 12:
                return None
            length = int(text)
    if length is None:
        return 0
    return length if length <= BODY_CAP else None


class BufferingThreadWorker(ThreadWorker):  # type: ignore[misc]
    """See the module docstring. ``request_timeout`` is set on a subclass made by
    ``buffering_worker``."""

    request_timeout: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # connections being buffered, oldest (earliest deadline) first
        self._buffering: dict[Any, None] = {}
        # refused connections: write side shut, read side drained until LINGER is over,
        # so the client reads our answer (or TLS alert) rather than a reset
        self._closing: dict[Any, float] = {}
        # requests handed to the thread pool and not finished yet
        self.nj_in_threads = 0

    # -- gunicorn's hand-over point: every path to the thread pool goes through here --
    def enqueue_req(self, conn: Any) -> None:
        if getattr(conn, "nj_ready", False):
            conn.nj_ready = False
            self.nj_in_threads += 1
            super().enqueue_req(conn)
            return
        self._start_buffering(conn)

    def finish_request(self, conn: Any, fs: Any) -> None:
        self.nj_in_threads = max(0, self.nj_in_threads - 1)
        super().finish_request(conn, fs)

    def murder_pending(self) -> None:
        super().murder_pending()
        self._murder_buffering()

    # -- buffering ---------------------------------------------------------------------
    def _start_buffering(self, conn: Any) -> None:
        raw = conn.sock.raw if isinstance(conn.sock, _TimedSocket) else conn.sock
        conn.nj_raw = raw
        conn.nj_deadline = time.monotonic() + self.request_timeout
        conn.nj_buf = bytearray(conn.parser.unreader.take_buffered() if conn.parser else b"")
        conn.nj_need = None  # total bytes (head and body) once the head is in
        conn.nj_events = 0
        conn.nj_handshake = False
        raw.setblocking(False)
        if self.cfg.is_ssl and not isinstance(raw, ssl.SSLSocket):
            try:
                raw = gsock.ssl_context(self.cfg).wrap_socket(
                    raw,
                    server_side=True,
                    suppress_ragged_eofs=self.cfg.suppress_ragged_eofs,
                    do_handshake_on_connect=False,
                )
            except (OSError, ValueError) as exc:
                self.log.warning("TLS set-up failed: %s", exc)
                self._drop(conn, raw)
                return
            conn.sock = conn.nj_raw = raw
            conn.nj_handshake = True
        self._buffering[conn] = None
        self._step(conn)

    def _step(self, conn: Any, _fileobj: Any = None) -> None:
        try:
            want = self._advance(conn)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            self.log.debug("dropped a connection while buffering: %s", exc)
            self._linger(conn)
            return
        if want == "ready":
            if self.nj_in_threads >= self.cfg.threads and is_plain_healthz(bytes(conn.nj_buf)):
                self._answer_healthz(conn)
            else:
                self._hand_over(conn)
        elif want == "eof":
            self._drop(conn, conn.nj_raw)
        elif want == "too_large":
            self._answer_and_drop(conn, 431, "Request Header Fields Too Large", "head too large")
        else:
            events = selectors.EVENT_WRITE if want == "write" else selectors.EVENT_READ
            raw = conn.nj_raw
            if conn.nj_events == 0:
                self.poller.register(raw, events, partial(self._step, conn))
            elif conn.nj_events != events:
                self.poller.modify(raw, events, partial(self._step, conn))
            conn.nj_events = events

    def _advance(self, conn: Any) -> str:
        """Move the connection on as far as it goes without blocking: what it waits
        for now (``read``, ``write``), or ``ready``, ``eof``, ``too_large``."""
        raw = conn.nj_raw
        if conn.nj_handshake:
            try:
                raw.do_handshake()
            except ssl.SSLWantReadError:
                return "read"
            except ssl.SSLWantWriteError:
                return "write"
            conn.nj_handshake = False
        buf: bytearray = conn.nj_buf
        while True:
            state = self._complete(conn, buf)
            if state is not None:
                return state
            try:
                data = raw.recv(_READ_SIZE)
            except (ssl.SSLWantReadError, BlockingIOError, InterruptedError):
                return "read"
            except ssl.SSLWantWriteError:
                return "write"
            if not data:
                return "eof"
            buf += data

    @staticmethod
    def _complete(conn: Any, buf: bytearray) -> str | None:
        if conn.nj_need is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return "too_large" if len(buf) > HEAD_CAP else None
            body = _body_to_buffer(bytes(buf[:end]))
            if body is None:
                return "ready"
            conn.nj_need = end + 4 + body
        return "ready" if len(buf) >= conn.nj_need else None

    def _unregister(self, conn: Any) -> None:
        self._buffering.pop(conn, None)
        if getattr(conn, "nj_events", 0):
            try:
                self.poller.unregister(conn.nj_raw)
            except (KeyError, ValueError, OSError):
                pass
            conn.nj_events = 0

    def _hand_over(self, conn: Any) -> None:
        self._unregister(conn)
        timed = conn.sock if isinstance(conn.sock, _TimedSocket) else None
        if timed is None:
            timed = _TimedSocket(conn.nj_raw, self.request_timeout)
            conn.sock = timed
        timed.arm(conn.nj_deadline)
        if conn.parser is None:
            conn.parser = http.get_parser(self.cfg, timed, conn.client)
        conn.parser.unreader.unread(bytes(conn.nj_buf))
        conn.nj_buf = bytearray()
        conn.initialized = True  # TLS is done; the parser exists
        conn.data_ready = True
        conn.nj_ready = True
        self.enqueue_req(conn)

    def _drop(self, conn: Any, raw: Any) -> None:
        self._unregister(conn)
        self._close(raw)

    def _answer_and_drop(self, conn: Any, status: int, reason: str, message: str) -> None:
        if not conn.nj_handshake:
            try:
                conn.nj_raw.send(problem_page(status, reason, message))
            except (OSError, ValueError):
                pass  # best effort: the client may not be reading either
        self._linger(conn)

    def _answer_healthz(self, conn: Any) -> None:
        page = healthz_page()
        try:
            sent = conn.nj_raw.send(page)
        except (OSError, ValueError):
            sent = -1
        if sent <= 0:
            # the socket takes nothing now: a thread answers it when one is free
            self._hand_over(conn)
            return
        self._linger(conn)

    def _linger(self, conn: Any) -> None:
        """Shut the write side (after the TLS alert or our answer), drain what the
        client still sends for up to ``LINGER`` seconds, then close: a close with
        unread data would reset the connection, and the client would lose what we
        wrote."""
        self._unregister(conn)
        raw = conn.nj_raw
        try:
            raw.shutdown(socket.SHUT_WR)  # an SSLSocket drops its TLS layer here
            self.poller.register(raw, selectors.EVENT_READ, partial(self._drain, conn))
        except (OSError, ValueError):
            self._close(raw)
            return
        self._closing[conn] = time.monotonic() + LINGER

    def _drain(self, conn: Any, _fileobj: Any = None) -> None:
        raw = conn.nj_raw
        try:
            while raw.recv(_READ_SIZE):
                pass
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            return  # more to come: wait for it (or the deadline)
        except (OSError, ValueError):
            pass
        self._end_linger(conn)

    def _end_linger(self, conn: Any) -> None:
        self._closing.pop(conn, None)
        try:
            self.poller.unregister(conn.nj_raw)
        except (KeyError, ValueError, OSError):
            pass
        self._close(conn.nj_raw)

    def _close(self, raw: Any) -> None:
        self.nr_conns -= 1
        try:
            raw.close()
        except OSError:
            pass

    def _murder_buffering(self) -> None:
        now = time.monotonic()
        for conn, until in list(self._closing.items()):
            if until <= now:
                self._end_linger(conn)
        for conn in list(self._buffering):
            if conn.nj_deadline > now:
                break
            self.log.info("closing a connection whose request did not arrive in time")
            self._answer_and_drop(
                conn,
                408,
                "Request Timeout",
                f"the request did not arrive whole within {self.request_timeout:g} s",
            )


def buffering_worker(request_timeout: float) -> type[BufferingThreadWorker]:
    """The worker class for gunicorn's ``worker_class`` setting."""
    return type(
        "BufferingThreadWorker",
        (BufferingThreadWorker,),
        {"request_timeout": float(request_timeout), "__module__": __name__},
    )


__all__ = [
    "BODY_CAP",
    "HEAD_CAP",
    "BufferingThreadWorker",
    "buffering_worker",
    "healthz_page",
    "is_plain_healthz",
]
