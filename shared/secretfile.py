"""The rule for files that hold a secret (a bearer token, a private key), as ssh applies
it to a private key: refused when anyone but the owner can change it (group- or
world-writable) or when anyone at all can read it (world-readable).

Group-readable stays allowed on purpose: Kubernetes hands a Secret to a non-root user
through ``fsGroup``, which makes the files ``root:<fsGroup>`` with the group's read bit
(mode 0440 with ``defaultMode: 0440``). A file reached through symlinks (as in a
Secret's volume: ``tokens/nas1 -> ..data/nas1``) is judged by the file itself.

    with open_secret(path) as f:      # SecretFileRefused (an OSError) when the mode is wrong
        token = f.read()
"""

from __future__ import annotations

import os
import stat
from typing import IO

ALLOWED_HINT = "chmod 600, or 640 when a group must read it"


class SecretFileRefused(PermissionError):
    """A secret file others can read or change. ``problem`` says what is wrong."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(13, f"{problem}; {ALLOWED_HINT}", path)
        self.problem = problem


def secret_mode_problem(mode: int) -> str | None:
    """What is wrong with a secret file of this ``st_mode`` (None: nothing)."""
    wrong = []
    if mode & stat.S_IWGRP:
        wrong.append("group-writable")
    if mode & stat.S_IWOTH:
        wrong.append("world-writable")
    if mode & stat.S_IROTH:
        wrong.append("world-readable")
    if not wrong:
        return None
    return f"{' and '.join(wrong)} (mode {stat.S_IMODE(mode):04o})"


def open_secret(path: str | os.PathLike[str]) -> IO[str]:
    """The secret file opened for reading as UTF-8 text, after checking the mode of the
    file actually opened (``fstat``: no window between the check and the read).
    Raises ``SecretFileRefused`` for a bad mode, ``OSError`` when it cannot be read."""
    # O_NONBLOCK: a FIFO put in a secret's place must not hang the open (it has no
    # effect on the reads of a regular file).
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretFileRefused(os.fspath(path), "not a regular file")
        problem = secret_mode_problem(st.st_mode)
        if problem is not None:
            raise SecretFileRefused(os.fspath(path), problem)
    except BaseException:
        os.close(fd)
        raise
    return open(fd, encoding="utf-8")


def check_secret_file(path: str | os.PathLike[str]) -> None:
    """Raise ``SecretFileRefused`` (or ``OSError``) unless ``path`` passes the rule."""
    open_secret(path).close()
