"""Host paths, local paths and roots.

The agent may run in a container that sees the host's filesystem under a prefix
(``host_prefix``, e.g. ``/host``); Docker always speaks of host paths. Everything the
API shows, and every root in the config, is a host path; the btrfs tool is given local
paths. These functions are the only place the two are converted.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable

VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
# How the API documents a ``{name}`` path parameter (the agent answers 422 to a DELETE,
# 404 to a GET, of a name that does not match).
VOLUME_NAME_PARAMETER = {
    "in": "path",
    "name": "name",
    "required": True,
    "schema": {"type": "string", "pattern": VOLUME_NAME.pattern},
}


class PathRefused(ValueError):
    """A path that is not acceptable: relative, ``..``, NUL, or not normal."""


def check_abs(path: str) -> str:
    """Accept only a clean absolute path: no NUL, no ``..``, no ``.``, no ``//``."""
    if "\0" in path:
        raise PathRefused("NUL byte in path")
    if not path.startswith("/"):
        raise PathRefused("path must be absolute")
    parts = path.split("/")[1:]
    if any(p in ("..", ".") for p in parts):
        raise PathRefused("'.' and '..' are not allowed in paths")
    norm = posixpath.normpath(path)
    if norm != path.rstrip("/") and not (norm == "/" and path == "/"):
        raise PathRefused("path is not in normal form")
    return norm


def is_under(path: str, root: str) -> bool:
    """True when ``path`` is ``root`` or inside it (by path components, not by string)."""
    if root == "/":
        return True
    return path == root or path.startswith(root.rstrip("/") + "/")


def under_any(path: str, roots: Iterable[str]) -> bool:
    return any(is_under(path, r) for r in roots)


class PathMap:
    """Converts between host paths and the paths this process sees."""

    def __init__(self, host_prefix: str = "") -> None:
        self.prefix = host_prefix.rstrip("/")

    def to_local(self, host_path: str) -> str:
        return self.prefix + host_path if self.prefix else host_path

    def to_host(self, local_path: str) -> str | None:
        """The host path of a local path, or None when it is outside the host view."""
        if not self.prefix:
            return local_path
        if local_path == self.prefix:
            return "/"
        if local_path.startswith(self.prefix + "/"):
            return local_path[len(self.prefix) :]
        return None

    def symlink_free(self, host_path: str, memo: dict[str, bool] | None = None) -> bool:
        """True when no component of the (local) path is a symlink: resolving it
        changes nothing. A path that does not exist resolves to itself.

        ``memo`` (folder -> answer) lets many checks under the same folders share their
        ``lstat`` calls: 10,000 subvolumes in one volume cost one ``lstat`` each, not
        one per component of their paths."""
        local = self.to_local(host_path)
        if memo is None:
            return os.path.realpath(local) == posixpath.normpath(local)
        return _no_link(posixpath.normpath(local), memo)


def _no_link(path: str, memo: dict[str, bool]) -> bool:
    """No component of the normal absolute ``path`` is a symlink (folders memoized)."""
    parent = posixpath.dirname(path)
    if parent == path:  # "/"
        return True
    ok = memo.get(parent)
    if ok is None:
        ok = memo[parent] = _no_link(parent, memo)
    return ok and not os.path.islink(path)
