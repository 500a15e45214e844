"""Removing plain files and folders without ever leaving the tree being removed.

``remove_tree`` is the only place the agent unlinks files itself. It walks by file
descriptor (``openat`` / ``unlinkat`` through ``dir_fd``), so a path swapped for a symlink
half way can never lead it elsewhere, and it never crosses into anything that is not the
tree's own filesystem and subvolume:

- a symlink is removed as a link, never followed (``O_NOFOLLOW`` everywhere, the path
  down to the tree included);
- a folder whose device differs from the tree's (another filesystem mounted there, or a
  btrfs subvolume: each has a device of its own) stops the walk;
- a folder on the same device that is a mount point (a bind mount of the same
  subvolume) is told by its mount id (``name_to_handle_at``, Linux 2.6.39+; where a
  filesystem cannot give one, the device check above is what holds) and stops the walk.

A walk that stops leaves everything it has not removed in place and says why. This is
what Docker's ``os.RemoveAll`` (``docker volume rm``) cannot promise: it follows into a
filesystem mounted inside a volume and empties it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from agent.host.records import FolderEntry

__all__ = ["TreeRemoval", "last_change", "mount_id", "plain_folders", "remove_tree"]

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class TreeRemoval:
    """What ``remove_tree`` did: how many files (links included) and folders it removed,
    and why it stopped, when it did (``error`` None: the tree is gone, or empty with
    ``keep_top``)."""

    path: str
    files: int
    folders: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class _Stop(Exception):
    pass


# ---------------------------------------------------------------------- mount ids


class _FileHandle(ctypes.Structure):
    _fields_ = (
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * 128),  # MAX_HANDLE_SZ
    )


_AT_EMPTY_PATH = 0x1000
_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    _name_to_handle_at = _libc.name_to_handle_at
except (OSError, AttributeError):  # pragma: no cover - a libc without it
    _libc = None


def mount_id(fd: int) -> int | None:
    """The mount id of the open file ``fd`` (what ``/proc/self/mountinfo`` numbers its
    lines by), or None when the filesystem or the C library cannot tell it."""
    if _libc is None:  # pragma: no cover
        return None
    handle = _FileHandle()
    handle.handle_bytes = 128
    mnt = ctypes.c_int()
    rc = _name_to_handle_at(
        fd, b"", ctypes.byref(handle), ctypes.byref(mnt), ctypes.c_int(_AT_EMPTY_PATH)
    )
    if rc != 0:
        return None  # EOPNOTSUPP (no handles on this filesystem), ENOSYS, ...
    return int(mnt.value)


# ---------------------------------------------------------------------- the walk


def _open_path(path: str) -> int:
    """Open the folder ``path`` one component at a time from ``/``, following no symlink
    on the way (``ELOOP`` / ``ENOTDIR`` when one is met)."""
    if not path.startswith("/"):
        raise ValueError(f"expected an absolute path, got {path!r}")
    fd = os.open("/", _O_DIR)
    try:
        for part in (p for p in path.split("/") if p):
            child = os.open(part, _O_DIR, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _entries(fd: int) -> Iterator[str]:
    with os.scandir(fd) as it:
        names = [e.name for e in it]
    yield from names


def remove_tree(path: str, *, keep_top: bool = False) -> TreeRemoval:
    """Remove the folder ``path`` and everything in it (with ``keep_top``, only what is
    in it), by the rules in the module docstring. Never raises for what it meets in the
    tree: the result says where and why it stopped. A missing ``path`` is nothing to do."""
    files = folders = 0
    try:
        top = _open_path(path)
    except FileNotFoundError:
        return TreeRemoval(path, 0, 0)
    except OSError as exc:
        why = "a symlink on the way" if exc.errno in (errno.ELOOP, errno.ENOTDIR) else exc
        return TreeRemoval(path, 0, 0, f"cannot open {path}: {why}")
    top_dev = os.fstat(top).st_dev
    top_mount = mount_id(top)
    # (fd, path, names still to look at)
    stack: list[tuple[int, str, Iterator[str]]] = [(top, path, _entries(top))]
    current = path
    try:
        while stack:
            fd, where, names = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                os.close(fd)
                current = where
                if stack:
                    os.rmdir(os.path.basename(where), dir_fd=stack[-1][0])
                    folders += 1
                continue
            full = current = f"{where.rstrip('/')}/{name}"
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=fd)
                files += 1
                continue
            child = os.open(name, _O_DIR, dir_fd=fd)
            cst = os.fstat(child)
            child_mount = mount_id(child)
            if cst.st_dev != top_dev:
                os.close(child)
                kind = "a btrfs subvolume" if cst.st_ino == 256 else "another filesystem"
                raise _Stop(f"{full} is {kind}: not removed, and not entered")
            if top_mount is not None and child_mount is not None and child_mount != top_mount:
                os.close(child)
                raise _Stop(f"{full} is a mount point: not removed, and not entered")
            stack.append((child, full, _entries(child)))
    except _Stop as stop:
        return TreeRemoval(path, files, folders, str(stop))
    except OSError as exc:
        return TreeRemoval(path, files, folders, f"{current}: {exc.strerror or exc}")
    finally:
        for fd, _, _ in stack:
            os.close(fd)
    if not keep_top:
        parent, name = os.path.split(path.rstrip("/"))
        try:
            parent_fd = _open_path(parent or "/")
            try:
                os.rmdir(name, dir_fd=parent_fd)
            finally:
                os.close(parent_fd)
            folders += 1
        except OSError as exc:
            return TreeRemoval(path, files, folders, f"{path}: {exc.strerror or exc}")
    return TreeRemoval(path, files, folders)


# ---------------------------------------------------------------------- looking


def _newest_time(st: os.stat_result) -> float:
    return max(st.st_mtime, st.st_ctime)


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def last_change(path: str) -> datetime | None:
    """The newest modification or change time of the folder ``path`` and of the folders
    directly in it (symlinks not followed). None when ``path`` is not a folder."""
    try:
        fd = _open_path(path)
    except (OSError, ValueError):
        return None
    try:
        newest = _newest_time(os.fstat(fd))
        for name in _entries(fd):
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue  # gone meanwhile
            if stat.S_ISDIR(st.st_mode):
                newest = max(newest, _newest_time(st))
    finally:
        os.close(fd)
    return _utc(newest)


def plain_folders(path: str) -> list[FolderEntry]:
    """The folders directly in ``path`` that are not btrfs subvolumes (a subvolume's
    root directory always has inode number 256 and a device of its own), with their
    newest modification or change time. Empty when ``path`` does not exist;
    ``OSError`` when it cannot be read."""
    try:
        fd = _open_path(path)
    except FileNotFoundError:
        return []
    try:
        own_dev = os.fstat(fd).st_dev
        out = []
        for name in _entries(fd):
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                continue
            if st.st_ino == 256 and st.st_dev != own_dev:
                continue  # a subvolume: what Docker's btrfs driver makes
            out.append(FolderEntry(name=name, changed_at=_utc(_newest_time(st))))
        return out
    finally:
        os.close(fd)
