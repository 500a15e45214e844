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


# A path already in normal form ("/a/b", no ".", "..", empty component, NUL or trailing
# "/"): what ``check_abs`` returns unchanged, recognised in one step.
_NORMAL_ABS = re.compile(r"(?:/(?!\.\.?(?:/|\Z))[^/\0]+)+")


def check_abs(path: str) -> str:
    """Accept only a clean absolute path: no NUL, no ``..``, no ``.``, no ``//``."""
    # Most paths are normal and hold no component starting with ".": four scans in C
    # (no empty component, none that is "." or "..", no NUL, no trailing "/").
    if (
        path[:1] == "/"
        and path[-1] != "/"
        and "//" not in path
        and "/." not in path
        and "\0" not in path
    ):
        return path
    if _NORMAL_ABS.fullmatch(path):
        return path
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
    base = root.rstrip("/")
    if not base:
        return True
    return path == base or path.startswith(base + "/")


def under_any(path: str, roots: Iterable[str]) -> bool:
    return any(is_under(path, r) for r in roots)


class PathMap:
    """Converts between host paths and the paths this process sees."""

    def __init__(self, host_prefix: str = "") -> None:
        self.prefix = host_prefix.rstrip("/")
        # a normal path behind it stays normal: nothing to normalise (symlink_free)
        self._normal_prefix = not self.prefix or bool(_NORMAL_ABS.fullmatch(self.prefix))

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

    def symlink_free(
        self, host_path: str, memo: LinkMemo | None = None, *, normal: bool = False
    ) -> bool:
        """True when no component of the (local) path is a symlink: resolving it
        changes nothing. A path that does not exist resolves to itself.

        ``memo`` lets many checks under the same folders share their system calls:
        10,000 subvolumes in one volume cost a few directory reads, not one ``lstat``
        per component of their paths (see ``LinkMemo``). ``normal``: ``host_path`` is
        known to be in normal form (``check_abs`` accepted it)."""
        local = self.to_local(host_path)
        if memo is None:
            return os.path.realpath(local) == posixpath.normpath(local)
        if not (normal and self._normal_prefix):
            local = posixpath.normpath(local)
        return memo.no_link(local)


class LinkMemo:
    """Answers to "is a component of this path a symlink?" shared by the checks on one
    snapshot. A folder's answer is kept once known. The last component of a path is
    looked up with ``lstat``; once ``SCAN_AFTER`` entries of the same folder have been
    asked, the folder is read once (``os.scandir``: each entry's type comes with its
    name, no ``lstat``) and the entries found there answer from then on. An entry the
    read did not see (made since) is looked up with ``lstat`` again."""

    SCAN_AFTER = 8

    __slots__ = ("_asked", "_folders", "_links")

    def __init__(self) -> None:
        self._folders: dict[str, bool] = {}  # folder -> no symlink on the way to it
        self._asked: dict[str, int] = {}  # folder -> entries looked up in it so far
        # folder -> (names of the entries that are symlinks, names of all the entries)
        self._links: dict[str, tuple[frozenset[str], frozenset[str]] | None] = {}

    def no_link(self, path: str) -> bool:
        """No component of the normal absolute ``path`` is a symlink."""
        # posixpath.split for a normal absolute path, without its function calls
        parent, _, name = path.rpartition("/")
        if not name:  # "/"
            return True
        parent = parent or "/"
        ok = self._folders.get(parent)
        if ok is None:
            ok = self._folders[parent] = self.no_link(parent)
        if not ok:
            return False
        listing = self._links.get(parent)
        if listing is not None and name in listing[1]:  # seen when the folder was read
            return name not in listing[0]
        return not self._is_link(parent, name, path)

    def _is_link(self, parent: str, name: str, path: str) -> bool:
        listing = self._links.get(parent)
        if listing is None and parent not in self._links:
            asked = self._asked.get(parent, 0) + 1
            self._asked[parent] = asked
            if asked >= self.SCAN_AFTER:
                listing = self._links[parent] = _read_links(parent)
        if listing is not None:
            links, names = listing
            if name in links:
                return True
            if name in names:
                return False
        return os.path.islink(path)


def _read_links(folder: str) -> tuple[frozenset[str], frozenset[str]] | None:
    """(symlinks, all entries) of ``folder`` by their names; None when it cannot be
    read. (Where a file system does not give an entry's type, ``is_symlink`` asks
    ``lstat`` itself.)"""
    links: set[str] = set()
    names: set[str] = set()
    try:
        with os.scandir(folder) as entries:
            for e in entries:
                names.add(e.name)
                if e.is_symlink():
                    links.add(e.name)
    except OSError:
        return None
    return frozenset(links), frozenset(names)
