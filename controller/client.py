"""A typed client for one agent's HTTP API (version 1, ``docs/agent-api.md``).

    with AgentClient("https://nas1:8443", token=token_from_file(path), ca="ca.pem") as agent:
        plan = agent.create_plan(Policy(min_age_seconds=3600))
        job = agent.wait_job(agent.apply_plan(plan.id).job_id, on_progress=print)

Every answer is validated with the contract's schemas (``shared.schemas``) and returned
as a frozen model (``shared.models``). Every failure is a ``controller.errors``
exception, converted once in ``_send``; nothing above this module sees httpx (below it,
``controller.transport`` holds the sockets' deadlines).

Bounds: each request (connect, TLS, sending, the whole answer) ends by its deadline,
``timeout`` seconds after it starts (``controller.transport`` cuts every socket
operation to the time left; an agent that sends a byte every few seconds cannot hold a
request longer). ``time_limit(seconds)`` bounds everything done with the client in a
block as well (``DeadlineExceeded``). Answers are read as a stream and refused past
``max_answer_bytes`` (``AnswerTooLarge``), before they are parsed, so what an answer
costs in memory is bounded by the cap (about twice it, while the body is copied), not by
the answer; compressed answers are not asked for, and refused.

Retries: only requests that are safe to repeat are retried (every GET, and applying a
plan, which carries an ``Idempotency-Key`` so the agent never runs it twice), on a
connect error, a timeout or a 503, ``retries`` times with a doubling backoff. DELETEs and
``POST /v1/plans`` are sent once: the caller decides what to do after a failure.

Proxies from the environment (``HTTPS_PROXY``...) are ignored unless ``trust_env=True``:
agents live on the local network and speak mutual TLS, which a proxy would break. (With
``trust_env=True`` httpx's own transports are used, and deadlines are checked only
between the reads of an answer.)
"""

from __future__ import annotations

import functools
import json as jsonlib
import os
import ssl
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from marshmallow import ValidationError

from controller import __version__
from controller.errors import (
    AgentHTTPError,
    AgentUnreachable,
    AnswerTooLarge,
    ConfigError,
    ControllerError,
    DeadlineExceeded,
    JobTimeout,
    ProtocolError,
    Unavailable,
    http_error_class,
)
from controller.transport import DeadlineBackend, deadline_transport
from shared import models
from shared.models import (
    ApplyResponse,
    AuditEntry,
    AuditVerify,
    DeleteResult,
    Filesystem,
    Finding,
    Health,
    Host,
    Job,
    Plan,
    Policy,
    Problem,
    Subvolume,
    Volume,
)
from shared.schemas import DEFAULT_LIMIT, MAX_LIMIT
from shared.secretfile import SecretFileRefused, open_secret

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_RETRIES = 2
DEFAULT_BACKOFF = 0.5
MAX_BACKOFF = 5.0
DEFAULT_MAX_ANSWER_BYTES = 16 << 20
MAX_TOKEN_FILE_BYTES = 64 << 10
USER_AGENT = f"nas-janitor-controller/{__version__}"


@dataclass(frozen=True)
class Readiness:
    """``GET /readyz``: ready, or the problem that says which dependency is down."""

    ready: bool
    code: str | None = None
    detail: str | None = None


@dataclass(frozen=True)
class Answer:
    """A whole answer, read within its deadline and size cap."""

    status_code: int
    reason_phrase: str
    headers: Mapping[str, str]
    content: bytes

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body as JSON. ``ValueError`` when it is not JSON, or nests too deeply
        to parse (a ``RecursionError`` in the parser)."""
        try:
            return jsonlib.loads(self.content)
        except RecursionError as exc:
            raise ValueError("JSON nested too deeply") from exc


def token_from_file(path: str | os.PathLike[str]) -> str:
    """A bearer token kept in a file (first line, surrounding whitespace dropped). The
    file is refused when others may change it or anyone may read it
    (``shared.secretfile``: group-readable is fine)."""
    try:
        with open_secret(path) as f:
            text = f.read(MAX_TOKEN_FILE_BYTES)
    except SecretFileRefused as exc:
        raise ConfigError(f"token file refused: {exc.strerror}", where=str(path)) from exc
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else None
        raise ConfigError(f"cannot read token file: {why or exc}", where=str(path)) from exc
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not token:
        raise ConfigError("token file is empty", where=str(path))
    return token


def token_from_env(name: str, environ: Mapping[str, str] | None = None) -> str:
    """A bearer token kept in an environment variable."""
    value = (os.environ if environ is None else environ).get(name, "").strip()
    if not value:
        raise ConfigError(f"environment variable {name} is not set or empty", where=name)
    return value


def tls_context(
    *,
    ca: str | os.PathLike[str] | None = None,
    client_cert: str | os.PathLike[str] | None = None,
    client_key: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """A verifying TLS context: the system's CAs, or only ``ca`` when given; with a client
    certificate (and its key, when not in the same file) for mutual TLS. Agents that
    share the same files share one context (loading a CA bundle costs milliseconds,
    and a fleet may name hundreds of agents)."""
    return _tls_context(
        os.fspath(ca) if ca is not None else None,
        os.fspath(client_cert) if client_cert is not None else None,
        os.fspath(client_key) if client_key is not None else None,
    )


@functools.lru_cache(maxsize=64)
def _tls_context(ca: str | None, client_cert: str | None, client_key: str | None) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=ca)
        if client_cert is not None:
            ctx.load_cert_chain(client_cert, client_key)
    except (OSError, ssl.SSLError) as exc:
        files = ", ".join(p for p in (ca, client_cert, client_key) if p is not None)
        raise ConfigError(f"cannot load TLS files: {exc}", where=files) from exc
    return ctx


class AgentClient:
    """One agent. Options are keyword-only; ``transport`` replaces the network (tests
    pass ``httpx.MockTransport`` or ``httpx.WSGITransport(app=create_app(...))``);
    ``sleep`` and ``clock`` are the waits and the time of retries, deadlines and
    ``wait_job``. A client is used by one thread at a time."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None,
        name: str | None = None,
        ca: str | os.PathLike[str] | None = None,
        client_cert: str | os.PathLike[str] | None = None,
        client_key: str | os.PathLike[str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        page_size: int = DEFAULT_LIMIT,
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
        trust_env: bool = False,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if not 1 <= page_size <= MAX_LIMIT:
            raise ValueError(f"page_size must be within 1..{MAX_LIMIT}")
        if timeout <= 0 or max_answer_bytes < 1:
            raise ValueError("timeout and max_answer_bytes must be > 0")
        self.base_url = base_url.rstrip("/")
        self.name = name or self.base_url
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.page_size = page_size
        self.max_answer_bytes = max_answer_bytes
        self._sleep = sleep
        self._clock = clock
        self._limit: float | None = None  # seconds of the time_limit block, if any
        self._limit_end: float | None = None
        self._backend = DeadlineBackend(clock=clock)
        headers = {
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
            "Accept-Encoding": "identity",
        }
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        verify: ssl.SSLContext | bool = True
        if transport is None and self.base_url.startswith("https:"):
            verify = tls_context(ca=ca, client_cert=client_cert, client_key=client_key)
        if transport is None and not trust_env:
            transport = deadline_transport(self._backend, verify=verify)
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(connect_timeout, timeout)),
            verify=verify,
            trust_env=trust_env,
            transport=transport,
        )

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def __repr__(self) -> str:
        return f"AgentClient({self.base_url!r}, name={self.name!r})"

    @contextmanager
    def time_limit(self, seconds: float | None) -> Iterator[None]:
        """Everything done with this client inside the block (requests, retries and
        their pauses, waiting for a job) ends within ``seconds`` from now; past that,
        ``DeadlineExceeded``. ``None``: no limit but each request's own."""
        if seconds is not None and seconds <= 0:
            raise ValueError("seconds must be > 0")
        before = self._limit, self._limit_end
        if seconds is not None:
            end = self._clock() + seconds
            if self._limit_end is None or end < self._limit_end:
                self._limit, self._limit_end = seconds, end
        try:
            yield
        finally:
            self._limit, self._limit_end = before

    # -- unauthenticated ------------------------------------------------------------

    def healthz(self) -> Health:
        return self._get(Health, "/healthz")

    def readyz(self) -> Readiness:
        """Ready or not; a 503 is an answer here, not an error (and is not retried)."""
        try:
            self._send("GET", "/readyz", retry=False)
        except Unavailable as exc:
            return Readiness(ready=False, code=exc.code, detail=exc.detail)
        return Readiness(ready=True)

    # -- read -------------------------------------------------------------------------

    def host(self) -> Host:
        return self._get(Host, "/v1/host")

    def filesystems(self) -> list[Filesystem]:
        return self._list(Filesystem, "/v1/filesystems")

    def subvolumes(self, uuid: str, *, under: str | None = None) -> list[Subvolume]:
        """Every subvolume of a filesystem (all pages), optionally under a path prefix."""
        params = {"under": under} if under is not None else {}
        return self._list(Subvolume, f"/v1/filesystems/{_seg(uuid)}/subvolumes", params)

    def subvolume(self, uuid: str, subvolume_id: int) -> Subvolume:
        return self._get(Subvolume, f"/v1/filesystems/{_seg(uuid)}/subvolumes/{subvolume_id}")

    def volumes(self, *, dangling: bool | None = None) -> list[Volume]:
        params = {"dangling": _bool(dangling)} if dangling is not None else {}
        return self._list(Volume, "/v1/volumes", params)

    def volume(self, name: str) -> Volume:
        return self._get(Volume, f"/v1/volumes/{_seg(name)}")

    def findings(self, *, kinds: Iterable[str] | None = None) -> list[Finding]:
        params = {"kind": list(kinds)} if kinds is not None else {}
        return self._list(Finding, "/v1/findings", params)

    def get_plan(self, plan_id: str) -> Plan:
        return self._get(Plan, f"/v1/plans/{_seg(plan_id)}")

    def get_job(self, job_id: str) -> Job:
        return self._get(Job, f"/v1/jobs/{_seg(job_id)}")

    def audit(self, *, after_seq: int = 0, max_entries: int | None = None) -> list[AuditEntry]:
        """The audit entries after ``after_seq``, in order (all pages), at most
        ``max_entries`` of them. A page too large to take (``AnswerTooLarge``: entries
        with huge details) is asked for again with half as many entries, down to one."""
        entries: list[AuditEntry] = []
        limit = self.page_size
        while max_entries is None or len(entries) < max_entries:
            if max_entries is not None:
                limit = min(limit, max_entries - len(entries))
            params = {"after_seq": after_seq, "limit": limit}
            try:
                page = self._page(AuditEntry, "/v1/audit", params)
            except AnswerTooLarge:
                if limit == 1:
                    raise
                limit = max(limit // 2, 1)
                continue
            for entry in page.items:
                if entry.seq <= after_seq:
                    raise ProtocolError(
                        self.name, f"GET /v1/audit: seq {entry.seq} is not after {after_seq}"
                    )
                after_seq = entry.seq
            entries.extend(page.items)
            if not page.items or (page.next_cursor is None and len(page.items) < limit):
                break
        return entries

    def audit_verify(self) -> AuditVerify:
        return self._get(AuditVerify, "/v1/audit/verify")

    def metrics(self) -> str:
        return self._send("GET", "/metrics", retry=True).text

    # -- clean --------------------------------------------------------------------------

    def delete_subvolume(
        self, uuid: str, subvolume_id: int, *, dry_run: bool = True
    ) -> DeleteResult:
        """Delete a subvolume and everything nested in it. A dry run unless told."""
        path = f"/v1/filesystems/{_seg(uuid)}/subvolumes/{subvolume_id}"
        return self._call(DeleteResult, "DELETE", path, params={"dry_run": _bool(dry_run)})

    def delete_volume(self, name: str, *, dry_run: bool = True) -> DeleteResult:
        """Remove a volume holding nested subvolumes. A dry run unless told."""
        path = f"/v1/volumes/{_seg(name)}"
        return self._call(DeleteResult, "DELETE", path, params={"dry_run": _bool(dry_run)})

    def create_plan(
        self, policy: Policy | None = None, *, finding_ids: Iterable[str] | None = None
    ) -> Plan:
        """A new plan (never retried: each POST makes another plan)."""
        body = (policy or Policy()).to_payload()
        if finding_ids is not None:
            body["finding_ids"] = list(finding_ids)
        return self._call(Plan, "POST", "/v1/plans", json=body)

    def apply_plan(self, plan_id: str, *, idempotency_key: str | None = None) -> ApplyResponse:
        """Start a plan as a job. Retried when the answer is lost: the agent returns the
        same job for the same plan and ``Idempotency-Key`` (default: one per plan)."""
        key = idempotency_key or f"apply-{plan_id}"
        return self._call(
            ApplyResponse,
            "POST",
            f"/v1/plans/{_seg(plan_id)}/apply",
            headers={"Idempotency-Key": key},
            retry=True,
        )

    def wait_job(
        self,
        job_id: str,
        *,
        poll: float = 1.0,
        timeout: float = 3600.0,
        on_progress: Callable[[Job], None] | None = None,
    ) -> Job:
        """Poll a job until it finishes; ``on_progress`` sees every state polled.
        Raises ``JobTimeout`` (carrying the last state) when ``timeout`` runs out, or
        ``DeadlineExceeded`` (the same) when the ``time_limit`` runs out first."""
        deadline = self._clock() + timeout
        limited = self._limit_end is not None and self._limit_end < deadline
        if limited:
            assert self._limit_end is not None
            deadline = self._limit_end
        job: Job | None = None
        while True:
            try:
                job = self.get_job(job_id)
            except DeadlineExceeded:
                if job is None:
                    raise
                remaining = 0.0  # no time left for another look: the last one stands
            else:
                if on_progress is not None:
                    on_progress(job)
                if job.finished:
                    return job
                remaining = deadline - self._clock()
            if remaining <= 0:
                state = (
                    f"job {job_id} still {job.state} "
                    f"({job.progress.done}/{job.progress.total} done)"
                )
                if limited:
                    raise DeadlineExceeded(
                        self.name, f"{state}: {self._limit_words()} ran out", job=job
                    )
                raise JobTimeout(self.name, f"{state} after {timeout:g}s", job=job)
            self._sleep(min(poll, remaining))

    def wait_freed(self, job: Job, *, poll: float = 2.0, timeout: float = 300.0) -> Job:
        """After a job: poll it until the kernel has freed what it deleted
        (``pending_bytes`` 0), for at most ``timeout`` seconds (and never past the
        ``time_limit``); the last state seen, pending or not. An agent that does not say
        (``pending_bytes`` null) is not waited for."""
        deadline = self._clock() + timeout
        if self._limit_end is not None:
            deadline = min(deadline, self._limit_end)
        while job.pending_bytes:
            remaining = deadline - self._clock()
            if remaining <= 0:
                return job
            self._sleep(min(poll, remaining))
            try:
                job = self.get_job(job.id)
            except ControllerError:
                return job  # the deletes are done; only the wait is cut short
        return job

    # -- plumbing -------------------------------------------------------------------------

    def _get(self, cls: type[T], path: str, params: Mapping[str, Any] | None = None) -> T:
        return self._call(cls, "GET", path, params=params, retry=True)

    def _page(self, cls: type[T], path: str, params: Mapping[str, Any]) -> models.Page[T]:
        response = self._send("GET", path, params=params, retry=True)
        try:
            return models.load_page(cls, response.json())
        except (ValueError, ValidationError) as exc:
            raise self._protocol_error("GET", path, exc) from exc

    def _list(self, cls: type[T], path: str, params: Mapping[str, Any] | None = None) -> list[T]:
        """Every item of a list answer, following ``next_cursor``."""
        items: list[T] = []
        seen: set[str] = set()
        query = {**(params or {}), "limit": self.page_size}
        while True:
            page = self._page(cls, path, query)
            items.extend(page.items)
            if page.next_cursor is None:
                return items
            if page.next_cursor in seen:
                raise ProtocolError(self.name, f"GET {path}: cursor {page.next_cursor!r} repeats")
            seen.add(page.next_cursor)
            query["cursor"] = page.next_cursor

    def _call(
        self,
        cls: type[T],
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        retry: bool = False,
    ) -> T:
        response = self._send(method, path, params=params, json=json, headers=headers, retry=retry)
        try:
            return models.load(cls, response.json())
        except (ValueError, ValidationError) as exc:
            raise self._protocol_error(method, path, exc) from exc

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        retry: bool = False,
    ) -> Answer:
        """The one place that touches httpx: send, read the whole answer within the
        deadline and the size cap, retry when allowed, and turn every failure into a
        ``ControllerError``. Returns only a 2xx answer."""
        attempts = 1 + (self.retries if retry else 0)
        for attempt in range(1, attempts + 1):
            deadline, limited = self._deadline(method, path)
            cause: Exception | None = None
            try:
                answer = self._exchange(
                    method, path, deadline, params=params, json=json, headers=headers
                )
            except httpx.TimeoutException as exc:
                if limited:
                    raise DeadlineExceeded(
                        self.name, f"{method} {path}: {self._limit_words()} ran out"
                    ) from exc
                error: Exception = AgentUnreachable(
                    self.name,
                    f"{method} {path}: no whole answer within {self.timeout:g}s "
                    f"({type(exc).__name__})",
                )
                cause = exc
            except httpx.TransportError as exc:
                error = AgentUnreachable(self.name, f"{method} {path}: {exc or type(exc).__name__}")
                cause = exc
            except httpx.HTTPError as exc:
                raise ProtocolError(self.name, f"{method} {path}: {exc}") from exc
            else:
                if answer.is_success:
                    return answer
                error = self._http_error(method, path, answer)
                if answer.status_code != 503:
                    raise error
            if attempt < attempts:
                self._pause(min(self.backoff * 2 ** (attempt - 1), MAX_BACKOFF), method, path)
        raise error from cause

    def _deadline(self, method: str, path: str) -> tuple[float, bool]:
        """When the next request must be done by, and whether the ``time_limit`` (not
        the request's own timeout) sets it. ``DeadlineExceeded`` when no time is left."""
        now = self._clock()
        end = now + self.timeout
        if self._limit_end is None or end <= self._limit_end:
            return end, False
        if self._limit_end <= now:
            raise DeadlineExceeded(self.name, f"{method} {path}: {self._limit_words()} ran out")
        return self._limit_end, True

    def _pause(self, seconds: float, method: str, path: str) -> None:
        """The pause before a retry, which never outlasts the ``time_limit``."""
        if self._limit_end is not None:
            left = self._limit_end - self._clock()
            if left <= seconds:
                raise DeadlineExceeded(
                    self.name, f"{method} {path}: {self._limit_words()} ran out before a retry"
                )
        self._sleep(seconds)

    def _limit_words(self) -> str:
        return f"the {self._limit:g}s allowed for this agent (timeouts.agent)"

    def _exchange(
        self,
        method: str,
        path: str,
        deadline: float,
        *,
        params: Mapping[str, Any] | None,
        json: Any,
        headers: Mapping[str, str] | None,
    ) -> Answer:
        """One request and its whole answer, by ``deadline``: every socket operation is
        cut to the time left (``DeadlineBackend``), and the time is checked again after
        each part of the body. httpx's exceptions go through."""
        request = self._http.build_request(method, path, params=params, json=json, headers=headers)
        with self._backend.until(deadline):
            response = self._http.send(request, stream=True)
            try:
                body = self._read_body(method, path, response, deadline)
            finally:
                response.close()
        return Answer(
            status_code=response.status_code,
            reason_phrase=response.reason_phrase,
            headers=dict(response.headers),
            content=body,
        )

    def _read_body(
        self, method: str, path: str, response: httpx.Response, deadline: float
    ) -> bytes:
        cap = self.max_answer_bytes
        length = response.headers.get("Content-Length", "").strip()
        if length.isdigit() and int(length) > cap:
            raise AnswerTooLarge(
                self.name, f"{method} {path}: answer of {length} bytes, over the {cap} taken"
            )
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise ProtocolError(
                self.name, f"{method} {path}: answer encoded as {encoding!r}, asked for identity"
            )
        body = bytearray()
        # An in-process transport (tests) may hand over an answer already in memory.
        chunks = [response.content] if response.is_stream_consumed else response.iter_raw()
        for chunk in chunks:
            if len(body) + len(chunk) > cap:
                raise AnswerTooLarge(
                    self.name, f"{method} {path}: answer longer than the {cap} bytes taken"
                )
            body += chunk
            if self._clock() >= deadline:
                raise httpx.ReadTimeout("deadline passed", request=response.request)
        return bytes(body)

    def _http_error(self, method: str, path: str, response: Answer) -> AgentHTTPError:
        status = response.status_code
        try:
            problem: Problem | None = models.load(Problem, response.json())
        except (ValueError, ValidationError):
            problem = None
        if problem is not None:
            code, detail, errors = problem.code, problem.detail, problem.errors
        else:
            code, detail, errors = "unknown", _excerpt(response), {}
        cls = http_error_class(status, code)
        return cls(
            self.name,
            status=status,
            code=code,
            detail=detail,
            method=method,
            path=path,
            errors=errors,
        )

    def _protocol_error(self, method: str, path: str, exc: Exception) -> ProtocolError:
        what = exc.messages if isinstance(exc, ValidationError) else f"not JSON ({exc})"
        return ProtocolError(self.name, f"{method} {path}: answer breaks the contract: {what}")


def _excerpt(response: Answer) -> str:
    text = " ".join(response.content[:4096].decode("utf-8", errors="replace").split())
    return (text[:200] + "...") if len(text) > 200 else (text or response.reason_phrase)


def _seg(value: str) -> str:
    """One path segment, quoted so that a name can never change the path."""
    return quote(str(value), safe="")


def _bool(value: bool) -> str:
    return "true" if value else "false"
