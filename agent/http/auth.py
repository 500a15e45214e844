"""Bearer tokens: made here, stored as SHA-256 hashes, checked in constant time.

A token is 32 random bytes (``nj_`` + URL-safe base64). With that much entropy a plain
SHA-256 is the right hash: nothing can be guessed, so a slow KDF would only slow every
request. Checking hashes every entry with ``hmac.compare_digest`` and never stops early,
so the time taken does not tell which entries exist.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from agent.config import TokenEntry
from agent.errors import Forbidden, Unauthorized

TOKEN_PREFIX = "nj_"  # noqa: S105 - a prefix, not a secret


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Principal:
    id: str
    scopes: frozenset[str]


class TokenRegistry:
    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        self._entries = tuple(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal behind an ``Authorization`` header, or ``Unauthorized``."""
        if not authorization:
            raise Unauthorized("missing bearer token")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > 512:
            raise Unauthorized("malformed Authorization header: expected 'Bearer <token>'")
        digest = hash_token(token)
        found: TokenEntry | None = None
        for entry in self._entries:
            if hmac.compare_digest(entry.sha256, digest):
                found = entry
        if found is None:
            raise Unauthorized("unknown token")
        return Principal(id=found.id, scopes=found.scopes)

    @staticmethod
    def require(principal: Principal, scope: str) -> None:
        if scope not in principal.scopes:
            raise Forbidden(f"token {principal.id!r} lacks the {scope!r} scope")
