"""The audit log's hash chain, for whoever checks entries pulled over the API.

An entry's ``hash`` is the SHA-256 (hex) of the canonical JSON (sorted keys, compact
separators, non-ASCII kept, UTF-8) of its fields ``seq``, ``at``, ``actor``, ``action``,
``target``, ``outcome``, ``detail`` and ``prev_hash``, with ``at`` the RFC 3339 string
the API shows. The first entry's ``prev_hash`` is ``GENESIS``; every other entry's is
the hash of the entry before it, so changing any entry changes every hash after it.

This is the same definition as the agent's writer (``agent.audit.entry_hash``), with
the same signatures; a test checks that the two agree on the same entries.
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


def first_bad_seq(
    items: Iterable[Mapping[str, Any]], *, after_seq: int = 0, after_hash: str = GENESIS
) -> int | None:
    """The ``seq`` of the first item that breaks the chain continuing from a known entry
    ``(after_seq, after_hash)``: a ``seq`` that does not follow, a ``prev_hash`` that
    does not link, or a ``hash`` that does not match the content. None when all chain."""
    for item in items:
        seq = item["seq"]
        if (
            seq != after_seq + 1
            or item["prev_hash"] != after_hash
            or item_hash(item) != item["hash"]
        ):
            return int(seq)
        after_seq, after_hash = seq, str(item["hash"])
    return None
