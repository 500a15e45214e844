"""A typed client for one agent's HTTP API (version 1, ``/work/shared/spec/agent-api.md``
in the project's spec).

    with AgentClient("https://nas1:8443", token=token_from_file(path), ca="ca.pem") as agent:
        plan = agent.create_plan(Policy(min_age_seconds=3600))
        job = agent.wait_job(agent.apply_plan(plan.id).job_id, on_progress=print)

Every answer is validated with the contract's schemas (``shared.schemas``) and returned
as a frozen model (``shared.models``). Every failure is a ``controller.errors``
exception, converted once in ``_send``; nothing outside this module sees httpx.

Retries: only requests that are safe to repeat are retried (every GET, and applying a
plan, which carries an ``Idempotency-Key`` so the agent never runs it twice), on a
connect error, a timeout or a 503, ``retries`` times with a doubling backoff. DELETEs and
``POST /v1/plans`` are sent once: the caller decides what to do after a failure.

Proxies from the environment (``HTTPS_PROXY``...) are ignored unless ``trust_env=True``:
agents live on the local network and speak mutual TLS, which a proxy would break.
"""

from __future__ import annotations

import functools
import os
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from marshmallow import ValidationError

from controller import __version__
from controller.errors import (
    AgentHTTPError,
    AgentUnreachable,
    ConfigError,
    JobTimeout,
    ProtocolError,
    Unavailable,
    http_error_class,
)
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

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_RETRIES = 2
DEFAULT_BACKOFF = 0.5
MAX_BACKOFF = 5.0
USER_AGENT = f"nas-janitor-controller/{__version__}"


@dataclass(frozen=True)
class Readiness:
    """``GET /readyz``: ready, or the problem that says which dependency is down."""

    ready: bool
    code: str | None = None
    detail: str | None = None


def token_from_file(path: str | os.PathLike[str]) -> str:
    """A bearer token kept in a file (first line, surrounding whitespace dropped)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read token file: {exc.strerror or exc}", where=str(path)
        ) from exc
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
    ``sleep`` and ``clock`` are the waits and the time of retries and ``wait_job``."""

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
        trust_env: bool = False,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if not 1 <= page_size <= MAX_LIMIT:
            raise ValueError(f"page_size must be within 1..{MAX_LIMIT}")
        self.base_url = base_url.rstrip("/")
        self.name = name or self.base_url
        self.retries = retries
        self.backoff = backoff
        self.page_size = page_size
        self._sleep = sleep
        self._clock = clock
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        verify: ssl.SSLContext | bool = True
        if transport is None and self.base_url.startswith("https:"):
            verify = tls_context(ca=ca, client_cert=client_cert, client_key=client_key)
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
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

    def audit(self, *, after_seq: int = 0) -> list[AuditEntry]:
        """Every audit entry after ``after_seq``, in order (all pages)."""
        entries: list[AuditEntry] = []
        while True:
            params = {"after_seq": after_seq, "limit": self.page_size}
            page = self._page(AuditEntry, "/v1/audit", params)
            for entry in page.items:
                if entry.seq <= after_seq:
                    raise ProtocolError(
                        self.name, f"GET /v1/audit: seq {entry.seq} is not after {after_seq}"
                    )
                after_seq = entry.seq
            entries.extend(page.items)
            if not page.items or (page.next_cursor is None and len(page.items) < self.page_size):
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
        Raises ``JobTimeout`` (carrying the last state) when ``timeout`` runs out."""
        deadline = self._clock() + timeout
        while True:
            job = self.get_job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job.finished:
                return job
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise JobTimeout(
                    self.name,
                    f"job {job_id} still {job.state} after {timeout:g}s "
                    f"({job.progress.done}/{job.progress.total} done)",
                    job=job,
                )
            self._sleep(min(poll, remaining))

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
    ) -> httpx.Response:
        """The one place that touches httpx: send, retry when allowed, and turn every
        failure into a ``ControllerError``. Returns only a 2xx answer."""
        attempts = 1 + (self.retries if retry else 0)
        for attempt in range(1, attempts + 1):
            cause: Exception | None = None
            try:
                response = self._http.request(
                    method, path, params=params, json=json, headers=headers
                )
            except httpx.TimeoutException as exc:
                error: Exception = AgentUnreachable(
                    self.name, f"{method} {path}: timed out ({type(exc).__name__})"
                )
                cause = exc
            except httpx.TransportError as exc:
                error = AgentUnreachable(self.name, f"{method} {path}: {exc or type(exc).__name__}")
                cause = exc
            except httpx.HTTPError as exc:
                raise ProtocolError(self.name, f"{method} {path}: {exc}") from exc
            else:
                if response.is_success:
                    return response
                error = self._http_error(method, path, response)
                if response.status_code != 503:
                    raise error
            if attempt < attempts:
                self._sleep(min(self.backoff * 2 ** (attempt - 1), MAX_BACKOFF))
        raise error from cause

    def _http_error(self, method: str, path: str, response: httpx.Response) -> AgentHTTPError:
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


def _excerpt(response: httpx.Response) -> str:
    text = " ".join(response.text.split())
    return (text[:200] + "...") if len(text) > 200 else (text or response.reason_phrase)


def _seg(value: str) -> str:
    """One path segment, quoted so that a name can never change the path."""
    return quote(str(value), safe="")


def _bool(value: bool) -> str:
    return "true" if value else "false"
