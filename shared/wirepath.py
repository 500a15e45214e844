"""Paths in JSON, losslessly.

A file name on Linux is bytes; JSON carries Unicode text. The agent holds paths as
``str`` decoded with ``os.fsdecode`` (bytes that are not UTF-8 kept as surrogate
escapes), and puts each path on the wire as two members:

- ``path``: the text. Exact when the bytes are UTF-8 (newlines, tabs, backslashes and
  every other character included, escaped the JSON way); otherwise each byte that is
  not UTF-8 is shown as U+FFFD, for people to read.
- ``path_b64``: null when ``path`` is exact; otherwise the path's exact bytes, base64
  (RFC 4648, with padding). A client that must name the path again uses these bytes.

    >>> to_wire("/v/a\\nb")
    ('/v/a\\nb', None)
    >>> to_wire(os.fsdecode(b"/v/caf\\xe9"))
    ('/v/caf\\ufffd', 'L3YvY2Fm6Q==')
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from typing import Any


def to_wire(path: str | None) -> tuple[str | None, str | None]:
    """``(path, path_b64)`` for a path held as ``os.fsdecode`` gives it."""
    if path is None:
        return None, None
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raw = os.fsencode(path)
        return raw.decode("utf-8", "replace"), base64.b64encode(raw).decode("ascii")
    return path, None


def from_wire(path: str, path_b64: str | None) -> str:
    """The path (as ``os.fsdecode`` gives it) that ``to_wire`` made these two from.
    ``ValueError`` for base64 that does not decode."""
    if path_b64 is None:
        return path
    try:
        return os.fsdecode(base64.b64decode(path_b64, validate=True))
    except binascii.Error as exc:
        raise ValueError(f"path_b64 is not base64: {exc}") from exc


def path_fields(path: str | None, key: str = "path") -> dict[str, Any]:
    """``{key: text, key + "_b64": bytes}`` for a JSON object (``to_wire``)."""
    text, raw = to_wire(path)
    return {key: text, f"{key}_b64": raw}


def safe_text(value: str) -> str:
    """A message that may hold a path, as text JSON can carry: undecodable bytes as
    U+FFFD (for details and reasons meant for people)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        try:
            raw = value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a lone surrogate that no file name gave
            raw = value.encode("utf-8", "replace")
        return raw.decode("utf-8", "replace")
    return value


def safe_json(value: Any) -> Any:
    """``value`` (JSON-like: mappings, lists, strings, numbers) with every string made
    ``safe_text``: what the audit log and the state store can always encode."""
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, Mapping):
        return {(safe_text(k) if isinstance(k, str) else k): safe_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [safe_json(v) for v in value]
    return value
