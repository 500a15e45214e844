"""The controller's one error tree. Every error the client or the CLI raises on purpose
is a ``ControllerError``; callers that drive a fleet catch that one class per agent.

    ControllerError
    ├── ConfigError                  bad fleet file, option or local file (CLI exit 2)
    ├── AgentUnreachable             connect error, TLS failure, timeout, dropped connection
    ├── AgentHTTPError               the agent answered with an error status (problem+json:
    │   │                            carries ``status``, ``code``, ``detail``, ``errors``)
    │   ├── Unauthorized             401
    │   ├── Forbidden                403
    │   ├── NotFound                 404
    │   ├── Conflict                 409 (``code`` says why: protected, in_use, ...)
    │   │   └── PlanExpired          409 plan_expired
    │   ├── ValidationFailed         422 (per-field messages in ``errors``)
    │   └── Unavailable              503 (docker_unavailable, btrfs_unavailable, ...)
    ├── ProtocolError                the answer did not match the contract's schema
    │   └── AnswerTooLarge           the answer is bigger than the controller takes
    ├── JobTimeout                   a job did not finish within the wait's timeout
    └── DeadlineExceeded             the agent's whole time (``timeouts.agent``) ran out

``controller.client`` converts httpx's exceptions and error answers into these once,
at its boundary (``raise AgentUnreachable(...) from exc``); nothing above it sees httpx.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ControllerError(Exception):
    """Base of every error the controller raises on purpose."""


class ConfigError(ControllerError):
    """A bad fleet file, option or local file. ``where`` is the path of the bad field
    (``agents[2].url``) or the file, when known."""

    def __init__(self, message: str, *, where: str | None = None) -> None:
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}" if where else message)


class AgentError(ControllerError):
    """An error talking to one agent. ``agent`` is its base URL (or fleet name). What
    the agent sent is shown as is, but for control characters (a hostile agent's
    terminal escapes), which are written as ``\\x1b``."""

    def __init__(self, agent: str, message: str) -> None:
        self.agent = agent
        self.message = printable(message)
        super().__init__(f"{agent}: {self.message}")


class AgentUnreachable(AgentError):
    """No usable answer: connection refused, DNS, TLS, timeout, connection dropped."""


class ProtocolError(AgentError):
    """The agent answered, but not as the contract says (bad JSON, schema mismatch)."""


class AnswerTooLarge(ProtocolError):
    """An answer bigger than the controller takes (``limits.answer_bytes``); it was not
    read past that size."""


class JobTimeout(AgentError):
    """A job was still running when the wait gave up. ``job`` is its last state."""

    def __init__(self, agent: str, message: str, *, job: Any = None) -> None:
        super().__init__(agent, message)
        self.job = job


class DeadlineExceeded(AgentError):
    """The time allowed for everything a command does with one agent ran out. ``job``
    is the last state of the job being waited for, if any."""

    def __init__(self, agent: str, message: str, *, job: Any = None) -> None:
        super().__init__(agent, message)
        self.job = job


class AgentHTTPError(AgentError):
    """An error answer. ``code`` is the problem's stable machine word (``"unknown"``
    when the body was not problem+json, e.g. a proxy's HTML page)."""

    def __init__(
        self,
        agent: str,
        *,
        status: int,
        code: str,
        detail: str,
        method: str = "",
        path: str = "",
        errors: Mapping[str, Any] | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        self.method = method
        self.path = path
        self.errors: dict[str, Any] = dict(errors or {})
        where = f"{method} {path} " if method else ""
        super().__init__(agent, f"{where}{status} {code}: {detail}")


class Unauthorized(AgentHTTPError):
    pass


class Forbidden(AgentHTTPError):
    pass


class NotFound(AgentHTTPError):
    pass


class Conflict(AgentHTTPError):
    pass


class PlanExpired(Conflict):
    pass


class ValidationFailed(AgentHTTPError):
    pass


class Unavailable(AgentHTTPError):
    pass


_BY_STATUS: dict[int, type[AgentHTTPError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    422: ValidationFailed,
    503: Unavailable,
}


def http_error_class(status: int, code: str) -> type[AgentHTTPError]:
    """The exception class for an error answer."""
    if status == 409 and code == "plan_expired":
        return PlanExpired
    return _BY_STATUS.get(status, AgentHTTPError)


def printable(text: str) -> str:
    """``text`` with every character that is not printable written as an escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def message_for(exc: BaseException) -> str:
    """An error as a user reads it next to the agent's name: an agent error without its
    agent prefix, any other error named as internal (a bug, not the agent's fault)."""
    if isinstance(exc, AgentError):
        return exc.message
    if isinstance(exc, ControllerError):
        return str(exc)
    return printable(f"internal error: {type(exc).__name__}: {exc}")
