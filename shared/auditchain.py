"""The audit log's hash chain, for whoever checks entries pulled over the API.

An entry's ``hash`` is the SHA-256 (hex) of the canonical JSON (sorted keys, compact
separators, non-ASCII kept, UTF-8) of its fields ``seq``, ``at``, ``actor``, ``action``,
``target``, ``outcome``, ``detail`` and ``prev_hash``, with ``at`` the RFC 3339 string
the API shows. The first entry's ``prev_hash`` is ``GENESIS``; every other entry's is
the hash of the entry before it, so changing any entry changes every hash after it.

The agent's writer (``agent.store.audit``) uses these definitions, and its ``verify``
walks its rows with the same ``ChainCheck`` that checks entries pulled over the API; a
test checks that what the writer stores chains here, entry for entry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

GENESIS = "0" * 64
HASHED_FIELDS = ("seq", "at", "actor", "action", "target", "outcome", "detail", "prev_hash")


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, non-ASCII kept as is, NaN and infinities refused."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def entry_hash(
    *,
    seq: int,
    at: str,
    actor: str,
    action: str,
    target: str,
    outcome: str,
    detail: Mapping[str, Any],
    prev_hash: str,
) -> str:
    """SHA-256 (hex) of the canonical JSON of every field but ``hash``."""
    content = {
        "seq": seq,
        "at": at,
        "actor": actor,
        "action": action,
        "target": target,
        "outcome": outcome,
        "detail": detail,
        "prev_hash": prev_hash,
    }
    return hashlib.sha256(canonical_json(content).encode("utf-8")).hexdigest()


def item_hash(item: Mapping[str, Any]) -> str:
    """The hash an item of ``GET /v1/audit`` (a JSON object as sent) must carry. Fields
    outside ``HASHED_FIELDS`` are not covered; a missing one is a ``KeyError``."""
    return entry_hash(**{name: item[name] for name in HASHED_FIELDS})


class ChainCheck:
    """The one walk of a hash chain, for the agent's ``verify`` (rows of its database)
    and for whoever checks entries pulled over the API: feed entries in ``seq`` order,
    continuing from a known entry ``(after_seq, after_hash)``; the first break is kept
    (``first_bad`` and ``reason``, in words). Each entry must follow the one before
    (``seq``), link to it (``prev_hash``) and match its own hash (``content_ok``)."""

    def __init__(self, *, after_seq: int = 0, after_hash: str = GENESIS) -> None:
        self.last_seq = after_seq
        self.head = after_hash
        self.count = 0
        self.first_bad: int | None = None
        self.reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.first_bad is None

    def bad(self, seq: int, reason: str) -> None:
        if self.first_bad is None:
            self.first_bad, self.reason = seq, reason

    def feed(self, *, seq: int, prev_hash: str, stored_hash: str, content_ok: bool) -> None:
        self.count += 1
        expected = self.last_seq + 1
        if seq != expected:
            # Reported at the first entry that does not follow, so the number always
            # names an entry that can be fetched.
            missing = f"entries {expected}..{seq - 1} are missing" if seq > expected else ""
            self.bad(seq, missing or f"entry {seq} is out of order (expected {expected})")
        elif prev_hash != self.head:
            self.bad(seq, f"entry {seq} does not link to entry {seq - 1}")
        elif not content_ok:
            self.bad(seq, f"entry {seq} does not match its hash")
        self.last_seq, self.head = seq, stored_hash

    def feed_item(self, item: Mapping[str, Any]) -> None:
        """An item of ``GET /v1/audit`` (a JSON object as sent)."""
        try:
            content_ok = item_hash(item) == item["hash"]
        except (KeyError, TypeError, ValueError):
            content_ok = False
        self.feed(
            seq=int(item["seq"]),
            prev_hash=str(item.get("prev_hash")),
            stored_hash=str(item.get("hash")),
            content_ok=content_ok,
        )


def first_bad_seq(
    items: Iterable[Mapping[str, Any]], *, after_seq: int = 0, after_hash: str = GENESIS
) -> int | None:
    """The ``seq`` of the first item that breaks the chain continuing from a known entry
    ``(after_seq, after_hash)``: a ``seq`` that does not follow, a ``prev_hash`` that
    does not link, or a ``hash`` that does not match the content. None when all chain."""
    check = ChainCheck(after_seq=after_seq, after_hash=after_hash)
    for item in items:
        check.feed_item(item)
        if not check.ok:
            return check.first_bad
    return None
