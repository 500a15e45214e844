"""The agent's one error tree. Every error the API can show is an ``AgentError``;
``agent.http.problems`` builds its RFC 9457 problem+json (``agent.http.api`` renders it).

    AgentError                       (500 internal)
    ├── Unauthorized                 (401 unauthorized, WWW-Authenticate: Bearer)
    ├── Forbidden                    (403 forbidden)
    ├── NotFound                     (404 not_found)
    ├── RequestTimeout               (408 request_timeout: the request did not arrive whole in time)
    ├── ValidationFailed             (422 validation_failed, per-field ``errors``)
    ├── TooMany                      (422 too_many: a cap on stored things is reached)
    ├── Refused                      (409, code says why)
    │   ├── Protected                (409 protected)
    │   ├── InUse                    (409 in_use)
    │   │   ├── HeldByProcess        (409 held_by_process: a process holds a file or
    │   │   │                         folder inside the target)
    │   │   └── HeldByKernel         (409 held_by_kernel: a loop device's backing file,
    │   │                             a swap file, an overlay mount's folder inside it)
    │   ├── OutsideRoots             (409 outside_roots)
    │   ├── PlanExpired              (409 plan_expired)
    │   ├── Conflict                 (409 conflict)
    │   └── Busy                     (409 busy: another process is cleaning through the
    │                                 same state directory, e.g. ``janitor-agent clean``)
    ├── Unavailable                  (503)
    │   ├── DockerUnavailable        (503 docker_unavailable)
    │   ├── BtrfsUnavailable         (503 btrfs_unavailable)
    │   ├── HostMountsUnavailable    (503 host_mounts_unavailable)
    │   ├── HoldersUnavailable       (503 holders_unavailable: what processes hold open
    │   │                             cannot be read)
    │   ├── StorageUnavailable       (503 storage_unavailable: the state or audit store
    │   │                             is locked, full or failing)
    │   └── AuditUnavailable         (503 audit_unavailable: the audit log is missing or
    │                                 replaced; nothing is changed until it is back)
    └── ToolFailed                   (502 tool_failed: a command ran and failed)
        └── BtrfsCommandError        (502 btrfs_failed, carries the command and its output)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class AgentError(Exception):
    status: int = 500
    code: str = "internal"
    title: str = "Internal error"

    def __init__(self, detail: str = "", *, extra: Mapping[str, Any] | None = None) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.extra: dict[str, Any] = dict(extra or {})


class Unauthorized(AgentError):
    status, code, title = 401, "unauthorized", "Unauthorized"


class Forbidden(AgentError):
    status, code, title = 403, "forbidden", "Forbidden"


class NotFound(AgentError):
    status, code, title = 404, "not_found", "Not found"


class RequestTimeout(AgentError, TimeoutError):
    """A request that did not arrive whole within the agent's bound (raised while its
    body is read; a ``TimeoutError`` too, for the server's own bounded reads)."""

    status, code, title = 408, "request_timeout", "Request timeout"


class ValidationFailed(AgentError):
    status, code, title = 422, "validation_failed", "Validation failed"

    def __init__(self, detail: str = "", *, errors: Mapping[str, Any] | None = None) -> None:
        super().__init__(detail, extra={"errors": dict(errors or {})})


class TooMany(AgentError):
    """A cap on what the agent stores is reached and nothing can be purged to make room
    (e.g. the number of stored plans)."""

    status, code, title = 422, "too_many", "Too many"


class Refused(AgentError):
    status, code, title = 409, "conflict", "Refused"


class Protected(Refused):
    code, title = "protected", "Protected target"


class InUse(Refused):
    code, title = "in_use", "Target in use"


class HeldByProcess(InUse):
    """A process holds something inside the target: its working folder or root, its
    program, an open file or a mapped one (deleting the subvolume would pull it from
    under the process and lose what it writes)."""

    code, title = "held_by_process", "A process holds the target open"


class HeldByKernel(InUse):
    """The kernel holds a file inside the target: a loop device's backing file (the
    image of a filesystem that may be mounted anywhere), an active swap file, or a
    folder an overlay mount is made of."""

    code, title = "held_by_kernel", "The kernel holds the target open"


class TooYoung(Refused):
    code, title = "too_young", "Target too young"


class OutsideRoots(Refused):
    code, title = "outside_roots", "Target outside the configured roots"


class PlanExpired(Refused):
    code, title = "plan_expired", "Plan expired"


class Conflict(Refused):
    code, title = "conflict", "Conflict"


class Busy(Refused):
    """Another process holds the state directory's mutation lease (``agent.store.lease``):
    a local ``janitor-agent clean``, or an agent running a job. Nothing was done."""

    code, title = "busy", "Busy"


class Unavailable(AgentError):
    """A dependency is down; answered 503 with a ``Retry-After`` of ``retry_after`` seconds."""

    status, code, title = 503, "unavailable", "Service unavailable"
    retry_after: int = 5


class DockerUnavailable(Unavailable):
    code, title = "docker_unavailable", "Docker is unavailable"


class BtrfsUnavailable(Unavailable):
    code, title = "btrfs_unavailable", "btrfs is unavailable"


class HostMountsUnavailable(Unavailable):
    """The host's mount table cannot be read, or what can be read is not the host's (an
    agent in a container without the host's pid namespace). Without it a mount on the host
    inside a target would be invisible: nothing is deleted."""

    code, title = "host_mounts_unavailable", "The host's mount table is not visible"


class HoldersUnavailable(Unavailable):
    """What processes hold open cannot be read (an agent in a container without
    ``CAP_SYS_PTRACE``, a process whose files even root may not see, more than the
    agent reads at once): a process holding a file inside a target would be invisible,
    so nothing is deleted."""

    code, title = "holders_unavailable", "What processes hold open is not visible"


class StorageUnavailable(Unavailable):
    """The state or audit database cannot be used right now: locked by another process
    past the short busy timeout, the disk full, an I/O error. Nothing was changed by the
    failed operation (SQLite rolls it back); retrying later may work."""

    code, title = "storage_unavailable", "The agent's storage is unavailable"


class AuditUnavailable(Unavailable):
    """The audit log is not the file the agent opened (removed, replaced), or is
    missing its history: no mutation is done until an operator looks."""

    code, title = "audit_unavailable", "The audit log is unavailable"


class ToolFailed(AgentError):
    status, code, title = 502, "tool_failed", "A tool the agent runs failed"


class BtrfsCommandError(ToolFailed):
    code, title = "btrfs_failed", "A btrfs command failed"

    def __init__(self, cmd: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.cmd = tuple(cmd)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        first = stderr.strip().splitlines()[0] if stderr.strip() else f"exit {returncode}"
        super().__init__(f"{' '.join(self.cmd[:3])}: {first}")
