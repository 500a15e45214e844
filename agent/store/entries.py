"""The values of the audit log and the encodings it shares with the state store: an
entry (``AuditEntry``) as stored and as ``GET /v1/audit`` shows it, what ``verify`` says
(``VerifyResult``), one spelling per instant (``format_time`` / ``parse_time``) and JSON
objects as they read back (``normalize_json_object``). The hash itself is
``shared.auditchain``'s."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from shared.auditchain import canonical_json, entry_hash

__all__ = ["AuditEntry", "VerifyResult", "format_time", "normalize_json_object", "parse_time"]


def normalize_json_object(value: Mapping[str, Any], *, what: str = "value") -> dict[str, Any]:
    """``value`` as it reads back after a JSON round trip (tuples become lists, keys
    become strings), or ``ValueError`` when it is not a JSON-encodable mapping."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a mapping, not {type(value).__name__}")
    try:
        text = canonical_json(dict(value))
        text.encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise ValueError(f"{what} is not JSON-encodable: {exc}") from exc
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def format_time(at: datetime) -> str:
    """RFC 3339 in UTC with microseconds and ``Z``, e.g. ``2024-05-01T12:00:00.000000Z``:
    one spelling per instant, and lexical order is time order. Naive datetimes are refused
    (``ValueError``) rather than guessed."""
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("time must be timezone-aware")
    try:
        utc = at.astimezone(UTC)
    except OverflowError as exc:
        raise ValueError(f"time out of range: {at!r}") from exc
    return utc.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_time(text: str) -> datetime:
    """The inverse of ``format_time``; only its exact spelling is accepted."""
    try:
        at = datetime.fromisoformat(text)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not an RFC 3339 time: {text!r}") from exc
    if at.tzinfo is None or format_time(at) != text:
        raise ValueError(f"not a canonical UTC time: {text!r}")
    return at.astimezone(UTC)


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at: datetime  # UTC
    actor: str  # token id, or "agent" for the agent's own doings
    action: str
    target: str
    outcome: str
    detail: dict[str, Any]  # JSON-serializable; as read back from storage
    prev_hash: str
    hash: str

    def to_json(self) -> dict[str, Any]:
        """The API shape of ``GET /v1/audit`` items (``at`` as an RFC 3339 string)."""
        return {
            "seq": self.seq,
            "at": format_time(self.at),
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "outcome": self.outcome,
            "detail": self.detail,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }

    @classmethod
    def from_json(cls, item: Mapping[str, Any]) -> AuditEntry:
        """Parse an item of ``GET /v1/audit``; ``ValueError`` when it is malformed."""
        try:
            fields = {
                name: item[name]
                for name in ("seq", "actor", "action", "target", "outcome", "prev_hash", "hash")
            }
            at, detail = item["at"], item["detail"]
        except KeyError as exc:
            raise ValueError(f"audit entry lacks {exc.args[0]!r}") from exc
        if type(fields["seq"]) is not int:
            raise ValueError("seq must be an integer")
        for name in ("actor", "action", "target", "outcome", "prev_hash", "hash"):
            if not isinstance(fields[name], str):
                raise ValueError(f"{name} must be a string")
        if not isinstance(at, str):
            raise ValueError("at must be a string")
        return cls(at=parse_time(at), detail=normalize_json_object(detail), **fields)

    def computed_hash(self) -> str:
        """The hash this entry's content calls for (equal to ``hash`` when intact)."""
        return entry_hash(
            seq=self.seq,
            at=format_time(self.at),
            actor=self.actor,
            action=self.action,
            target=self.target,
            outcome=self.outcome,
            detail=self.detail,
            prev_hash=self.prev_hash,
        )


@dataclass(frozen=True)
class VerifyResult:
    """``GET /v1/audit/verify``: ``head`` is the hash of the last entry read (``GENESIS``
    when none) and ``count`` how many were read; ``first_bad_seq`` is the first ``seq``
    where the log departs from an intact chain (``None`` when ``ok``). ``reason`` says
    how, in words, for logs and operators."""

    ok: bool
    count: int
    head: str
    first_bad_seq: int | None
    reason: str | None = None
