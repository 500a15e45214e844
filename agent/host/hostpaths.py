"""What a host path resolves to on the host: every symlink on the way followed, as the
kernel follows them when a container that bind-mounts the path starts.

A container's bind source is kept by Docker as it was written; a stopped or created
container uses what it resolves to only when it starts. ``resolve_path`` walks a path
one component at a time, like the kernel's path walk, over a ``Lookup`` (pure: the
fakes use it too); ``resolve_on_host`` looks each component up under the host's root
(``agent.host.btrfs.BtrfsTool.resolve_host_paths`` picks it: ``/proc/1/root`` when the
agent shares the host's pid namespace and may enter it, the root of pid 1 in the host's
mount namespace whatever this process's own root and mounts are; else the host's ``/``
as the agent sees it, ``host_prefix``).

The walk never leaves the host's root: an absolute link target starts again at the
host's root, and ``..`` at the root stays there (as at ``/``, and as in a chroot). A
component that does not exist ends the walk: the rest is taken as written (Docker makes
a missing bind source as a folder), unless that component came from a link's target
(a dangling symlink: what it will point to once made cannot be told). More than
``MAX_LINKS`` links on the way is a loop (the kernel's ``ELOOP``). Both, and a component
that cannot be read, leave the path unresolved, with the reason.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Collection

from agent.host.records import ResolvedPath

__all__ = ["MAX_LINKS", "Lookup", "resolve_on_host", "resolve_path"]

# Links followed at most in one path walk: the kernel's MAXSYMLINKS (40 since Linux 4.2;
# 4.4 too). One more is ELOOP.
MAX_LINKS = 40

# Looks up one host path whose every component but the last is a folder (no link):
# (it exists, its link target when it is a symlink). OSError when it cannot be read.
Lookup = Callable[[str], tuple[bool, str | None]]


def resolve_path(path: str, lookup: Lookup) -> ResolvedPath:
    """What the absolute host ``path`` resolves to, over ``lookup`` (see the module)."""
    if not path.startswith("/"):
        return ResolvedPath(path, None, "not an absolute path")
    # What is left to walk, the next component last; True: it came from a link's target.
    pending: list[tuple[str, bool]] = [(c, False) for c in reversed(path.split("/"))]
    done: list[str] = []  # the components resolved so far: folders, no link among them
    links = 0
    last_link = ""
    while pending:
        comp, from_link = pending.pop()
        if comp in ("", "."):
            continue
        if comp == "..":
            if done:
                done.pop()
            continue
        here = "/" + "/".join([*done, comp])
        try:
            exists, target = lookup(here)
        except OSError as e:
            return ResolvedPath(path, None, f"{here} cannot be read: {e.strerror or e}")
        if target is not None:
            links += 1
            if links > MAX_LINKS:
                return ResolvedPath(
                    path, None, f"a symlink loop: more than {MAX_LINKS} links on the way"
                )
            last_link = f"{here} -> {target}"
            if target.startswith("/"):
                done = []
            pending.extend((c, True) for c in reversed(target.split("/")))
            continue
        if not exists:
            if from_link:
                return ResolvedPath(
                    path, None, f"a dangling symlink: {last_link}, and {here} does not exist"
                )
            rest = [c for c, _ in reversed(pending) if c not in ("", ".")]
            out = [*done, comp]
            for c in rest:  # made as written (Docker makes a missing bind source)
                if c == "..":
                    if out:
                        out.pop()
                else:
                    out.append(c)
            return ResolvedPath(path, "/" + "/".join(out))
        done.append(comp)
    return ResolvedPath(path, "/" + "/".join(done))


def resolve_on_host(paths: Collection[str], *, host_root: str) -> dict[str, ResolvedPath]:
    """Each of ``paths`` (host paths) resolved under ``host_root`` (where this process
    sees the host's ``/``), by ``lstat`` and ``readlink`` of one component at a time;
    what the paths share is looked up once."""
    base = host_root.rstrip("/")
    seen: dict[str, tuple[bool, str | None]] = {}

    def lookup(host_path: str) -> tuple[bool, str | None]:
        known = seen.get(host_path)
        if known is not None:
            return known
        local = base + host_path
        try:
            st = os.lstat(local)
        except FileNotFoundError:
            found: tuple[bool, str | None] = (False, None)
        except NotADirectoryError as e:
            raise OSError(errno.ENOTDIR, "a part of it is not a folder") from e
        else:
            found = (True, os.readlink(local) if stat.S_ISLNK(st.st_mode) else None)
        seen[host_path] = found
        return found

    return {p: resolve_path(p, lookup) for p in paths}
