"""Total deadlines for HTTP, down to each socket operation.

httpx's timeouts bound each read, connect or write on its own: an agent that sends a
byte every few seconds never trips a 30 s read timeout, and a request can last for
ever. Here every socket operation of a request gets, as its timeout, the time left
before that request's deadline (or its own timeout, when that is shorter), so a request
ends by its deadline whatever the peer does: at the TCP connect, in the TLS handshake
(CPython bounds a whole handshake and a whole TLS read by the socket's timeout), while
the headers trickle in, or in the body.

    backend = DeadlineBackend(clock=time.monotonic)
    transport = deadline_transport(backend, verify=ssl_context)
    with backend.until(time.monotonic() + 30):   # in the thread that sends the request
        ...httpx.Client(transport=transport).send(...)

Past the deadline an operation raises httpcore's own timeout (``ReadTimeout``,
``WriteTimeout``, ``ConnectTimeout``), which httpx turns into its ``TimeoutException``s.
Name resolution (``getaddrinfo``) is the one step a socket timeout cannot bound; it is
bounded by the resolver's own settings.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpcore
import httpx

Clock = Callable[[], float]


class DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's blocking sockets, with every timeout cut to the calling thread's
    deadline (``until``). Outside ``until`` it is the plain ``SyncBackend``."""

    def __init__(self, *, clock: Clock = time.monotonic) -> None:
        self._inner = httpcore.SyncBackend()
        self._clock = clock
        self._local = threading.local()

    @contextmanager
    def until(self, deadline: float) -> Iterator[None]:
        """Every socket operation of this thread, within the block, ends by ``deadline``
        (a time of the backend's clock)."""
        before = getattr(self._local, "deadline", None)
        self._local.deadline = deadline if before is None else min(before, deadline)
        try:
            yield
        finally:
            self._local.deadline = before

    def timeout(self, timeout: float | None, expired: type[Exception]) -> float | None:
        """``timeout`` cut to the time left; ``expired`` raised when none is left."""
        deadline: float | None = getattr(self._local, "deadline", None)
        if deadline is None:
            return timeout
        left = deadline - self._clock()
        if left <= 0:
            raise expired("deadline passed")
        return left if timeout is None else min(timeout, left)

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(
            host,
            port,
            timeout=self.timeout(timeout, httpcore.ConnectTimeout),
            local_address=local_address,
            socket_options=socket_options,
        )
        return DeadlineStream(stream, self)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_unix_socket(
            path,
            timeout=self.timeout(timeout, httpcore.ConnectTimeout),
            socket_options=socket_options,
        )
        return DeadlineStream(stream, self)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class DeadlineStream(httpcore.NetworkStream):
    """One connection; each operation's timeout cut by the backend."""

    def __init__(self, inner: httpcore.NetworkStream, backend: DeadlineBackend) -> None:
        self._inner = inner
        self._backend = backend

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._backend.timeout(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._backend.timeout(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(
            ssl_context,
            server_hostname=server_hostname,
            timeout=self._backend.timeout(timeout, httpcore.ConnectTimeout),
        )
        return DeadlineStream(inner, self._backend)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


def deadline_transport(
    backend: DeadlineBackend,
    *,
    verify: ssl.SSLContext | bool = True,
    limits: httpx.Limits | None = None,
) -> httpx.HTTPTransport:
    """httpx's own transport (its request and exception mapping), over a connection
    pool that opens its sockets through ``backend``."""
    limits = limits or httpx.Limits(max_connections=4, max_keepalive_connections=2)
    transport = httpx.HTTPTransport(verify=verify, limits=limits, trust_env=False)
    # httpx builds its pool with httpcore's default backend and offers no option for
    # another: the same pool, made again with this one (httpx and httpcore are pinned).
    old = transport._pool
    transport._pool = httpcore.ConnectionPool(
        ssl_context=old._ssl_context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        http1=True,
        http2=False,
        retries=0,
        network_backend=backend,
    )
    old.close()
    return transport
