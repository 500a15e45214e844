"""Frozen dataclasses for the API objects, built from payloads that the schemas in
``shared.schemas`` have validated.

Each model names its schema in ``__schema__`` and mirrors its field names; ``load``
builds any of them (nested models, lists as tuples, optional fields) from one generic
walk over the dataclass's type hints, and ``dump`` goes back to the JSON shape through
the same schema. Unknown fields are dropped on load (``EXCLUDE``): the contract lets an
agent add fields, and an older controller must not break on them.

    >>> load(Health, {"status": "ok"})
    Health(status='ok')
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any, ClassVar, TypeVar

from marshmallow import RAISE, Schema, fields

from shared import auditchain, policy
from shared import schemas as s

T = TypeVar("T")

TERMINAL_JOB_STATES = frozenset({"succeeded", "partial", "failed", "skipped", "interrupted"})


@dataclass(frozen=True)
class Health:
    __schema__: ClassVar[type[Schema]] = s.HealthSchema
    status: str


@dataclass(frozen=True)
class Problem:
    __schema__: ClassVar[type[Schema]] = s.ProblemSchema
    type: str
    title: str
    status: int
    detail: str
    code: str
    errors: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Kernel:
    __schema__: ClassVar[type[Schema]] = s.KernelSchema
    release: str
    rmdir_deletes_subvolumes: bool


@dataclass(frozen=True)
class DockerSummary:
    __schema__: ClassVar[type[Schema]] = s.DockerSummarySchema
    server_version: str
    api_version: str
    storage_driver: str
    data_root: str


@dataclass(frozen=True)
class Host:
    __schema__: ClassVar[type[Schema]] = s.HostSchema
    hostname: str
    agent_version: str
    kernel: Kernel
    btrfs_progs_version: str
    docker: DockerSummary
    roots: tuple[str, ...]


@dataclass(frozen=True)
class Filesystem:
    __schema__: ClassVar[type[Schema]] = s.FilesystemSchema
    uuid: str
    label: str | None
    mountpoints: tuple[str, ...]
    size_bytes: int
    used_bytes: int
    free_bytes: int
    quota_enabled: bool


@dataclass(frozen=True)
class Owner:
    __schema__: ClassVar[type[Schema]] = s.OwnerSchema
    kind: str
    ref: str | None


@dataclass(frozen=True)
class Subvolume:
    __schema__: ClassVar[type[Schema]] = s.SubvolumeSchema
    id: int
    parent_id: int
    path: str
    read_only: bool
    generation: int
    created_at: datetime | None
    uuid: str | None
    parent_uuid: str | None
    referenced_bytes: int | None
    exclusive_bytes: int | None
    owner: Owner
    path_b64: str | None = None


@dataclass(frozen=True)
class SubvolumeRef:
    __schema__: ClassVar[type[Schema]] = s.SubvolumeRefSchema
    id: int
    path: str
    read_only: bool
    path_b64: str | None = None


@dataclass(frozen=True)
class Volume:
    __schema__: ClassVar[type[Schema]] = s.VolumeSchema
    name: str
    driver: str
    mountpoint: str
    labels: Mapping[str, str]
    created_at: datetime | None
    anonymous: bool
    in_use_by: tuple[str, ...]
    nested_subvolumes: tuple[SubvolumeRef, ...]
    exclusive_bytes: int | None
    protected: str | None


@dataclass(frozen=True)
class Target:
    __schema__: ClassVar[type[Schema]] = s.TargetSchema
    type: str
    name: str | None
    id: int | None
    path: str | None
    path_b64: str | None = None

    def __str__(self) -> str:
        if self.type == "volume" and self.name:
            return f"volume {self.name}"
        return f"subvolume {self.id} {self.path or ''}".rstrip()


@dataclass(frozen=True)
class Finding:
    __schema__: ClassVar[type[Schema]] = s.FindingSchema
    id: str
    kind: str
    target: Target
    reclaimable_bytes: int | None
    evidence: tuple[str, ...]
    blocked_by: tuple[str, ...]
    age_seconds: int | None
    filesystem_uuid: str | None = None
    subvolume_ids: tuple[int, ...] = ()
    named: bool = False


@dataclass(frozen=True)
class Deleted:
    __schema__: ClassVar[type[Schema]] = s.DeletedSchema
    id: int
    path: str
    path_b64: str | None = None
    bytes: int | None = None


@dataclass(frozen=True)
class DeleteResult:
    __schema__: ClassVar[type[Schema]] = s.DeleteResultSchema
    dry_run: bool
    deleted: tuple[Deleted, ...]
    reclaimable_bytes: int | None
    audit_seq: int
    volume: str | None = None


@dataclass(frozen=True)
class Policy:
    """What a plan may clean: the body of ``POST /v1/plans`` without ``finding_ids``.
    Build it with ``Policy.parse(mapping)``, which validates with the API's own schema."""

    __schema__: ClassVar[type[Schema]] = s.PlanRequestSchema
    kinds: tuple[str, ...] = policy.DEFAULT_PLAN_KINDS
    min_age_seconds: int = policy.DEFAULT_MIN_AGE_SECONDS
    protect_labels: tuple[str, ...] = policy.DEFAULT_PROTECT_LABELS
    include_named_volumes: bool = False

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> Policy:
        """Validate a policy given by a person (unknown keys are errors, defaults fill
        the rest). Raises ``marshmallow.ValidationError`` with per-field messages."""
        schema = s.PlanRequestSchema(unknown=RAISE, exclude=("finding_ids",))
        return _build(cls, schema.load(data))

    def to_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "kinds": list(self.kinds),
            "min_age_seconds": self.min_age_seconds,
            "protect_labels": list(self.protect_labels),
        }
        if self.include_named_volumes:  # an older agent would refuse the key
            payload["include_named_volumes"] = True
        return payload


@dataclass(frozen=True)
class Action:
    __schema__: ClassVar[type[Schema]] = s.ActionSchema
    seq: int
    finding_id: str
    op: str
    target: Target
    subvolume_ids: tuple[int, ...]
    reclaimable_bytes: int | None


@dataclass(frozen=True)
class Skipped:
    __schema__: ClassVar[type[Schema]] = s.SkippedSchema
    finding_id: str
    reason: str


@dataclass(frozen=True)
class Plan:
    __schema__: ClassVar[type[Schema]] = s.PlanSchema
    id: str
    created_at: datetime
    expires_at: datetime
    actions: tuple[Action, ...]
    skipped: tuple[Skipped, ...]
    reclaimable_bytes: int | None
    policy: Policy | None = None


@dataclass(frozen=True)
class ApplyResponse:
    __schema__: ClassVar[type[Schema]] = s.ApplyResponseSchema
    job_id: str
    plan_id: str


@dataclass(frozen=True)
class Progress:
    __schema__: ClassVar[type[Schema]] = s.ProgressSchema
    done: int
    total: int


@dataclass(frozen=True)
class ActionResult:
    __schema__: ClassVar[type[Schema]] = s.ActionResultSchema
    seq: int
    outcome: str
    detail: str
    reclaimed_bytes: int | None
    deleted: tuple[Deleted, ...] = ()


@dataclass(frozen=True)
class Job:
    __schema__: ClassVar[type[Schema]] = s.JobSchema
    id: str
    plan_id: str
    state: str
    progress: Progress
    results: tuple[ActionResult, ...]
    reclaimed_bytes: int
    started_at: datetime | None
    finished_at: datetime | None
    pending_bytes: int | None = None

    @property
    def finished(self) -> bool:
        """True once the job will not move again (``interrupted`` included: only a new
        apply of its plan resumes it)."""
        return self.state in TERMINAL_JOB_STATES

    def count(self, outcome: str) -> int:
        return sum(1 for r in self.results if r.outcome == outcome)


@dataclass(frozen=True)
class AuditEntry:
    """One audit log entry. ``at`` is the RFC 3339 string exactly as the agent sent it:
    the hash covers that string (``at_time`` is it as a datetime)."""

    __schema__: ClassVar[type[Schema]] = s.AuditEntrySchema
    seq: int
    at: str
    actor: str
    action: str
    target: str
    outcome: str
    detail: Mapping[str, Any]
    prev_hash: str
    hash: str

    @property
    def at_time(self) -> datetime:
        return datetime.fromisoformat(self.at)

    def hashed(self) -> dict[str, Any]:
        """The fields the hash covers, as the API shows them."""
        return {name: getattr(self, name) for name in auditchain.HASHED_FIELDS}

    @property
    def hash_ok(self) -> bool:
        """The hash matches the entry's content (says nothing of the chain)."""
        return auditchain.item_hash(self.hashed()) == self.hash


@dataclass(frozen=True)
class AuditVerify:
    __schema__: ClassVar[type[Schema]] = s.AuditVerifySchema
    ok: bool
    count: int
    head: str
    first_bad_seq: int | None
    reason: str | None = None


@dataclass(frozen=True)
class Page(typing.Generic[T]):
    """One page of a list answer."""

    items: tuple[T, ...]
    next_cursor: str | None


# -- the generic loader -------------------------------------------------------------------


def load(cls: type[T], payload: Any) -> T:
    """Validate ``payload`` with ``cls.__schema__`` and build ``cls`` from it.
    Raises ``marshmallow.ValidationError`` when it does not match the contract.

    Unknown fields are dropped at every depth first: marshmallow's ``unknown=EXCLUDE``
    applies to the outer schema only, not to nested ones, and an agent may add a field
    anywhere."""
    schema = _instance(cls.__schema__)  # type: ignore[attr-defined]
    return _build(cls, schema.load(_prune(schema, payload)))


def load_page(cls: type[T], payload: Any) -> Page[T]:
    """Validate a list answer (``{"items": [...], "next_cursor": ...}``)."""
    schema = _instance(_page_schema(cls.__schema__))  # type: ignore[attr-defined]
    page = schema.load(_prune(schema, payload))
    items = tuple(_build(cls, item) for item in page["items"])
    return Page(items=items, next_cursor=page["next_cursor"])


def dump(obj: Any) -> dict[str, Any]:
    """The JSON shape of a model, through its schema (datetimes as RFC 3339)."""
    result: dict[str, Any] = _instance(type(obj).__schema__).dump(obj)
    return result


@cache
def _instance(schema: type[Schema]) -> Schema:
    return schema()


@cache
def _page_schema(item: type[Schema]) -> type[Schema]:
    return s.page_of(item, f"{item.__name__}Page")


def _prune(schema: Schema, data: Any) -> Any:
    """``data`` without the keys ``schema`` does not declare, at every depth. What is not
    a mapping is left for the schema to reject."""
    if not isinstance(data, Mapping):
        return data
    return {
        key: _prune_field(f, data[key])
        for name, f in schema.fields.items()
        if (key := f.data_key or name) in data
    }


def _prune_field(f: fields.Field[Any], value: Any) -> Any:
    if isinstance(f, fields.Nested) and isinstance(f.schema, Schema):
        return _prune(f.schema, value)
    if isinstance(f, fields.List) and isinstance(value, list):
        return [_prune_field(f.inner, v) for v in value]
    return value


_HINTS: dict[type[Any], dict[str, Any]] = {}


def _hints(cls: type[Any]) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _build(cls: type[T], data: Mapping[str, Any]) -> T:
    hints = _hints(cls)
    kwargs = {
        f.name: _convert(hints[f.name], data[f.name])
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.init and f.name in data
    }
    return cls(**kwargs)


def _convert(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(inner, value)
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        return tuple(_convert(inner, v) for v in value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value)
    if origin in (Mapping, dict):
        return dict(value)
    return value


def iter_models() -> Iterator[type[Any]]:
    """Every model with a schema (for tests that check models and schemas agree)."""
    for obj in list(globals().values()):
        if isinstance(obj, type) and dataclasses.is_dataclass(obj) and "__schema__" in vars(obj):
            yield obj
