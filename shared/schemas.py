"""Marshmallow schemas of the agent API (version 1), shared by both sides.

The agent dumps its responses and loads its requests with these schemas, and builds
its OpenAPI document from them; the controller loads the agent's answers with the
same schemas. A field renamed here breaks a contract test on one side or the other.

Responses are loaded with ``unknown=EXCLUDE`` by clients, so an agent that adds
fields does not break an older controller (the contract allows additions).
"""

from __future__ import annotations

import re
from typing import Any

from marshmallow import INCLUDE, Schema, ValidationError, fields, validate

from shared.policy import (
    DEFAULT_MIN_AGE_SECONDS,
    DEFAULT_PLAN_KINDS,
    DEFAULT_PROTECT_LABELS,
    FINDING_KINDS,
    MAX_AGE_SECONDS,
    MAX_FINDING_IDS,
    MAX_POLICY_KINDS,
    MAX_PROTECT_LABELS,
)

OWNER_KINDS = ("docker-layer", "docker-volume", "orphan-layer", "other")
SCOPES = ("read", "clean")
JOB_STATES = ("queued", "running", "succeeded", "partial", "failed", "skipped", "interrupted")
ACTION_OPS = ("delete_subvolumes", "remove_volume", "remove_folder", "destroy_qgroups")
TARGET_TYPES = ("volume", "subvolume", "folder", "filesystem")
RESULT_OUTCOMES = ("deleted", "skipped", "failed")
DEFAULT_LIMIT = 500
MAX_LIMIT = 5000


class Base(Schema):
    class Meta:
        ordered = True


class StrictBoolean(fields.Boolean):
    """A JSON ``true`` or ``false``: not 0, 1 or "yes" (which ``Boolean`` takes)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


PATH_B64 = {
    "description": "the exact bytes of path, base64, when they are not UTF-8 (path then "
    "shows each undecodable byte as U+FFFD); null when path is exact"
}


# -- problems ------------------------------------------------------------------


class ProblemSchema(Base):
    """RFC 9457 problem details. A problem may carry extension members (RFC 9457
    section 3.2) besides these: e.g. ``job_id`` and ``plan_id`` of a conflicting job,
    ``in_use_by`` of a volume, ``deleted`` and ``audit_seq`` of a delete that failed
    part way."""

    class Meta(Base.Meta):
        unknown = INCLUDE

    type = fields.String(required=True)
    title = fields.String(required=True)
    status = fields.Integer(required=True)
    detail = fields.String(required=True)
    code = fields.String(required=True, metadata={"description": "stable machine word"})
    errors = fields.Dict(
        keys=fields.String(),
        values=fields.Raw(allow_none=True),
        metadata={"description": "per-field messages (422 only)"},
    )


# -- unauthenticated -------------------------------------------------------------


class HealthSchema(Base):
    status = fields.String(required=True)


# -- host ----------------------------------------------------------------------


class KernelSchema(Base):
    release = fields.String(required=True)
    rmdir_deletes_subvolumes = fields.Boolean(required=True)


class DockerSummarySchema(Base):
    server_version = fields.String(required=True)
    api_version = fields.String(required=True)
    storage_driver = fields.String(required=True)
    data_root = fields.String(required=True)


class HostSchema(Base):
    hostname = fields.String(required=True)
    agent_version = fields.String(required=True)
    kernel = fields.Nested(KernelSchema, required=True)
    btrfs_progs_version = fields.String(required=True)
    docker = fields.Nested(DockerSummarySchema, required=True)
    roots = fields.List(fields.String(), required=True)


# -- filesystems and subvolumes ----------------------------------------------------


class FilesystemSchema(Base):
    uuid = fields.String(required=True)
    label = fields.String(required=True, allow_none=True)
    mountpoints = fields.List(fields.String(), required=True)
    size_bytes = fields.Integer(required=True)
    used_bytes = fields.Integer(required=True)
    free_bytes = fields.Integer(required=True)
    quota_enabled = fields.Boolean(required=True)


class OwnerSchema(Base):
    kind = fields.String(required=True, validate=validate.OneOf(OWNER_KINDS))
    ref = fields.String(required=True, allow_none=True)


class SubvolumeSchema(Base):
    id = fields.Integer(required=True)
    parent_id = fields.Integer(required=True)
    path = fields.String(required=True, metadata={"description": "absolute, as the host sees it"})
    path_b64 = fields.String(allow_none=True, load_default=None, metadata=PATH_B64)
    read_only = fields.Boolean(required=True)
    generation = fields.Integer(required=True)
    created_at = fields.DateTime(required=True, allow_none=True)
    uuid = fields.String(required=True, allow_none=True)
    parent_uuid = fields.String(required=True, allow_none=True)
    referenced_bytes = fields.Integer(required=True, allow_none=True)
    exclusive_bytes = fields.Integer(required=True, allow_none=True)
    owner = fields.Nested(OwnerSchema, required=True)


class SubvolumeRefSchema(Base):
    id = fields.Integer(required=True)
    path = fields.String(required=True)
    path_b64 = fields.String(allow_none=True, load_default=None, metadata=PATH_B64)
    read_only = fields.Boolean(required=True)


# -- volumes -----------------------------------------------------------------------


class VolumeSchema(Base):
    name = fields.String(required=True)
    driver = fields.String(required=True)
    mountpoint = fields.String(required=True)
    labels = fields.Dict(keys=fields.String(), values=fields.String(), required=True)
    created_at = fields.DateTime(required=True, allow_none=True)
    anonymous = fields.Boolean(required=True)
    in_use_by = fields.List(fields.String(), required=True)
    nested_subvolumes = fields.List(fields.Nested(SubvolumeRefSchema), required=True)
    exclusive_bytes = fields.Integer(required=True, allow_none=True)
    protected = fields.String(required=True, allow_none=True)


# -- findings ----------------------------------------------------------------------


class TargetSchema(Base):
    type = fields.String(required=True, validate=validate.OneOf(TARGET_TYPES))
    name = fields.String(required=True, allow_none=True)
    id = fields.Integer(required=True, allow_none=True)
    path = fields.String(required=True, allow_none=True)
    path_b64 = fields.String(allow_none=True, load_default=None, metadata=PATH_B64)


class FindingSchema(Base):
    id = fields.String(required=True)
    kind = fields.String(required=True, validate=validate.OneOf(FINDING_KINDS))
    target = fields.Nested(TargetSchema, required=True)
    reclaimable_bytes = fields.Integer(required=True, allow_none=True)
    evidence = fields.List(fields.String(), required=True)
    blocked_by = fields.List(fields.String(), required=True)
    age_seconds = fields.Integer(required=True, allow_none=True)
    filesystem_uuid = fields.String(allow_none=True)
    subvolume_ids = fields.List(fields.Integer())
    named = fields.Boolean(
        metadata={"description": "a volume someone named: planned only when asked for"}
    )


# -- clean ---------------------------------------------------------------------------


class DeletedSchema(Base):
    id = fields.Integer(required=True)
    path = fields.String(required=True)
    path_b64 = fields.String(allow_none=True, load_default=None, metadata=PATH_B64)
    bytes = fields.Integer(
        allow_none=True,
        load_default=None,
        metadata={"description": "its exclusive size when deleted (null: quotas off)"},
    )


class DeleteResultSchema(Base):
    dry_run = fields.Boolean(required=True)
    deleted = fields.List(fields.Nested(DeletedSchema), required=True)
    reclaimable_bytes = fields.Integer(required=True, allow_none=True)
    audit_seq = fields.Integer(required=True)
    volume = fields.String(allow_none=True)


class PlanRequestSchema(Base):
    kinds = fields.List(
        fields.String(validate=validate.OneOf(FINDING_KINDS)),
        load_default=lambda: list(DEFAULT_PLAN_KINDS),
        validate=validate.Length(min=1, max=MAX_POLICY_KINDS),
    )
    min_age_seconds = fields.Integer(
        load_default=DEFAULT_MIN_AGE_SECONDS,
        strict=True,  # a JSON integer: 1.5 is refused, not truncated to 1
        validate=validate.Range(min=0, max=MAX_AGE_SECONDS),
    )
    protect_labels = fields.List(
        fields.String(validate=validate.Length(min=1, max=255)),
        load_default=lambda: list(DEFAULT_PROTECT_LABELS),
        validate=validate.Length(max=MAX_PROTECT_LABELS),
    )
    finding_ids = fields.List(
        fields.String(validate=validate.Length(min=1, max=200)),
        load_default=None,
        allow_none=True,
        validate=validate.Length(max=MAX_FINDING_IDS),
    )
    include_named_volumes = StrictBoolean(
        load_default=False,
        metadata={
            "description": "also plan volumes someone named (a finding named in "
            "finding_ids is planned anyway)"
        },
    )


class ActionSchema(Base):
    seq = fields.Integer(required=True)
    finding_id = fields.String(required=True)
    op = fields.String(required=True, validate=validate.OneOf(ACTION_OPS))
    target = fields.Nested(TargetSchema, required=True)
    subvolume_ids = fields.List(fields.Integer(), required=True)
    reclaimable_bytes = fields.Integer(required=True, allow_none=True)


class SkippedSchema(Base):
    finding_id = fields.String(required=True)
    reason = fields.String(required=True)


class PlanSchema(Base):
    id = fields.String(required=True)
    created_at = fields.DateTime(required=True)
    expires_at = fields.DateTime(required=True)
    actions = fields.List(fields.Nested(ActionSchema), required=True)
    skipped = fields.List(fields.Nested(SkippedSchema), required=True)
    reclaimable_bytes = fields.Integer(required=True, allow_none=True)
    policy = fields.Nested(PlanRequestSchema)


class ApplyResponseSchema(Base):
    job_id = fields.String(required=True)
    plan_id = fields.String(required=True)


class ProgressSchema(Base):
    done = fields.Integer(required=True)
    total = fields.Integer(required=True)


class ActionResultSchema(Base):
    seq = fields.Integer(required=True)
    outcome = fields.String(required=True, validate=validate.OneOf(RESULT_OUTCOMES))
    detail = fields.String(required=True)
    reclaimed_bytes = fields.Integer(required=True, allow_none=True)
    deleted = fields.List(
        fields.Nested(DeletedSchema),
        load_default=list,
        metadata={"description": "what this action destroyed, also when it failed part way"},
    )


class JobSchema(Base):
    id = fields.String(required=True)
    plan_id = fields.String(required=True)
    state = fields.String(required=True, validate=validate.OneOf(JOB_STATES))
    progress = fields.Nested(ProgressSchema, required=True)
    results = fields.List(fields.Nested(ActionResultSchema), required=True)
    reclaimed_bytes = fields.Integer(required=True)
    pending_bytes = fields.Integer(
        allow_none=True,
        load_default=None,
        metadata={
            "description": "of what the job deleted, the bytes the kernel has not freed "
            "yet (its cleaner drops deleted subvolumes in the background); null when not "
            "known"
        },
    )
    started_at = fields.DateTime(required=True, allow_none=True)
    finished_at = fields.DateTime(required=True, allow_none=True)


# -- audit -----------------------------------------------------------------------------


class AuditEntrySchema(Base):
    seq = fields.Integer(required=True)
    # Kept as the exact string the agent hashed, so a client can recompute the chain.
    at = fields.String(required=True, metadata={"format": "date-time"})
    actor = fields.String(required=True)
    action = fields.String(required=True)
    target = fields.String(required=True)
    outcome = fields.String(required=True)
    detail = fields.Dict(keys=fields.String(), values=fields.Raw(allow_none=True), required=True)
    prev_hash = fields.String(required=True)
    hash = fields.String(required=True)


class AuditVerifySchema(Base):
    ok = fields.Boolean(required=True)
    count = fields.Integer(required=True)
    head = fields.String(required=True)
    first_bad_seq = fields.Integer(required=True, allow_none=True)
    reason = fields.String(allow_none=True, metadata={"description": "what is wrong, in words"})


# -- lists and queries -------------------------------------------------------------------


def page_of(item: type[Schema], name: str) -> type[Schema]:
    """A list answer: ``{"items": [...], "next_cursor": null|"..."}``."""
    attrs: dict[str, Any] = {
        "items": fields.List(fields.Nested(item), required=True),
        "next_cursor": fields.String(required=True, allow_none=True),
    }
    return type(name, (Base,), attrs)


FilesystemPageSchema = page_of(FilesystemSchema, "FilesystemPageSchema")
SubvolumePageSchema = page_of(SubvolumeSchema, "SubvolumePageSchema")
VolumePageSchema = page_of(VolumeSchema, "VolumePageSchema")
FindingPageSchema = page_of(FindingSchema, "FindingPageSchema")
AuditPageSchema = page_of(AuditEntrySchema, "AuditPageSchema")


class FullMatch(validate.Regexp):
    """``validate.Regexp`` over the whole value. Published as the OpenAPI ``pattern``,
    where ``$`` is the end of the text (ECMA-262); in Python ``$`` also matches before a
    final newline, so the value must ``fullmatch``."""

    def __init__(self, pattern: str, *, error: str | None = None) -> None:
        super().__init__(pattern, error=error)
        self._full = re.compile(pattern)

    def __call__(self, value: Any) -> Any:
        if not isinstance(value, str) or self._full.fullmatch(value) is None:
            raise ValidationError(self._format_error(value))
        return value


# A path component: not empty, no "/" or NUL, not "." or "..".
_COMPONENT = r"([^/\x00.][^/\x00]*|\.[^/\x00.][^/\x00]*|\.\.[^/\x00]+)"
# What ``agent.domain.paths.check_abs`` accepts: "/", or an absolute path in normal form
# (trailing slashes allowed; two leading slashes are kept by POSIX normpath).
ABSOLUTE_PATH_PATTERN = rf"^(/|//?{_COMPONENT}(/{_COMPONENT})*/*)$"


class PageQuerySchema(Base):
    limit = fields.Integer(
        load_default=DEFAULT_LIMIT, validate=validate.Range(min=1, max=MAX_LIMIT)
    )
    cursor = fields.String(
        load_default=None,
        validate=FullMatch(r"^[0-9]{1,19}$", error="not a valid cursor"),
        metadata={"description": "the next_cursor of the previous page"},
    )


class SubvolumeQuerySchema(PageQuerySchema):
    under = fields.String(
        load_default=None,
        validate=[
            validate.Length(min=1, max=4096),
            FullMatch(
                ABSOLUTE_PATH_PATTERN,
                error="an absolute path in normal form (no '.', '..' or empty components)",
            ),
        ],
        metadata={"description": "absolute path prefix"},
    )


class VolumeQuerySchema(Base):
    dangling = fields.Boolean(load_default=None)


class FindingQuerySchema(Base):
    kind = fields.List(fields.String(validate=validate.OneOf(FINDING_KINDS)), load_default=None)
    min_age_seconds = fields.Integer(
        load_default=DEFAULT_MIN_AGE_SECONDS,
        validate=validate.Range(min=0, max=MAX_AGE_SECONDS),
        metadata={"description": "findings younger than this are blocked as too_young"},
    )


class AuditQuerySchema(Base):
    # a sequence number is a 64-bit SQLite integer
    after_seq = fields.Integer(load_default=0, validate=validate.Range(min=0, max=2**63 - 1))
    limit = fields.Integer(
        load_default=DEFAULT_LIMIT, validate=validate.Range(min=1, max=MAX_LIMIT)
    )


class DryRunQuerySchema(Base):
    dry_run = fields.Boolean(load_default=True)
