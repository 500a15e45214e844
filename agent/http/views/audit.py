"""Audit endpoints (``read`` scope)."""

from __future__ import annotations

from typing import Any

from flask_smorest import Blueprint

from agent.http.api import needs
from agent.http.context import http, runtime
from agent.store.audit import AuditLog
from agent.store.continuity import remember
from shared.schemas import AuditPageSchema, AuditQuerySchema, AuditVerifySchema

blp = Blueprint("audit", __name__, url_prefix="/v1", description="The tamper-evident audit log")


def log() -> AuditLog:
    return runtime().audit


@blp.get("/audit")
@needs(blp, "read")
@blp.arguments(AuditQuerySchema, location="query", as_kwargs=True)
@blp.response(200, AuditPageSchema)
def audit(*, after_seq: int, limit: int) -> dict[str, Any]:
    """Entries after ``after_seq``, oldest first; ``next_cursor`` is the last seq."""
    entries = log().page(after_seq=after_seq, limit=limit)
    more = len(entries) == limit
    return {
        "items": [e.to_json() for e in entries],
        "next_cursor": str(entries[-1].seq) if more and entries else None,
    }


@blp.get("/audit/verify")
@needs(blp, "read")
@blp.response(200, AuditVerifySchema)
def verify() -> dict[str, Any]:
    """Walk the hash chain: ``ok`` false and ``first_bad_seq`` when an entry was
    edited, dropped or reordered; ``ok`` false with the ``reason`` when the audit file
    was removed or replaced. The verdict is kept for ``/metrics``."""
    r = http().metrics.verify_audit(log())
    if r.ok:
        remember(log(), runtime().state)
    return {
        "ok": r.ok,
        "count": r.count,
        "head": r.head,
        "first_bad_seq": r.first_bad_seq,
        "reason": r.reason,
    }
