"""What ``janitor-agent serve`` hands to the gunicorn master it becomes
(``agent.http.master``): the checked config and gunicorn's settings, as JSON, in an
anonymous file (``memfd_create``; an unlinked temporary file where the kernel has none)
whose descriptor the new program inherits, its number in the environment variable
``HANDOVER``. The master reads it and closes it at once: the config (token hashes
included) is never in a process's environment (``/proc/PID/environ`` shows the first
one for the whole life of the process), and the worker, forked later, never holds it.
Plain JSON and dataclasses only: the command makes it before it replaces itself, the
worker reads it back."""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from dataclasses import asdict, fields, is_dataclass
from typing import TYPE_CHECKING, Any, get_args, get_origin, get_type_hints

if TYPE_CHECKING:
    from agent.config import AgentConfig

HANDOVER = "JANITOR_AGENT_SERVE_FD"
MAX_BYTES = 4 << 20  # far more than any config: what the master reads at most


class HandoverError(Exception):
    """What the master was given is not a handover of ``serve``'s."""


def write_handover(text: str) -> int:
    """A new descriptor, inheritable, of an anonymous file holding ``text``, at its
    start: for the program ``serve`` becomes (``os.execve`` keeps it open)."""
    data = text.encode("utf-8")
    try:
        fd = os.memfd_create("janitor-agent-serve", os.MFD_CLOEXEC)
    except OSError as exc:  # no memfd_create (Linux < 3.17)
        if exc.errno not in (errno.ENOSYS, errno.EINVAL):
            raise
        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
        os.set_inheritable(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_handover(value: str | None) -> str:
    """The text behind the descriptor that ``HANDOVER``'s ``value`` names, which is
    closed then. ``HandoverError`` for anything that is not what ``write_handover``
    made: no number, a descriptor that is not open or not a regular file, too big."""
    if value is None or not value.isascii() or not value.isdigit() or len(value) > 9:
        raise HandoverError("no handover descriptor")
    fd = int(value)
    if fd < 3:
        raise HandoverError(f"descriptor {fd} is standard input, output or error")
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise HandoverError(f"descriptor {fd}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(st.st_mode):
            raise HandoverError(f"descriptor {fd} is not a file")
        if st.st_size > MAX_BYTES:
            raise HandoverError(f"descriptor {fd}: {st.st_size} bytes, over {MAX_BYTES}")
        chunks, offset = [], 0
        while offset < st.st_size:
            try:
                chunk = os.pread(fd, st.st_size - offset, offset)
            except OSError as exc:
                raise HandoverError(f"descriptor {fd}: {exc.strerror}") from None
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        try:
            return b"".join(chunks).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise HandoverError(f"descriptor {fd}: not text: {exc}") from None
    finally:
        os.close(fd)


def handover(config: AgentConfig, options: dict[str, Any]) -> str:
    """What ``serve`` hands over (the text ``write_handover`` keeps): the checked config
    and gunicorn's settings (plain JSON values)."""
    return json.dumps({"config": config_to_json(config), "options": options})


def config_to_json(config: AgentConfig) -> dict[str, Any]:
    """The config as JSON values (sets as sorted lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, frozenset | set):
            return sorted(value)
        return value

    return {k: plain(v) for k, v in asdict(config).items()}


def config_from_json(data: dict[str, Any]) -> AgentConfig:
    """The config ``config_to_json`` gave, as it was (``==``)."""
    from agent.config import AgentConfig

    return _build(AgentConfig, data)  # type: ignore[no-any-return]


def _build(cls: Any, data: dict[str, Any]) -> Any:
    hints = get_type_hints(cls)
    return cls(**{f.name: _value(hints[f.name], data[f.name]) for f in fields(cls)})


def _value(kind: Any, value: Any) -> Any:
    if is_dataclass(kind):
        return _build(kind, value)
    origin = get_origin(kind)
    if origin is tuple:
        (item, *_) = get_args(kind)
        return tuple(_value(item, v) for v in value)
    if origin is frozenset:
        return frozenset(value)
    return value


__all__ = [
    "HANDOVER",
    "HandoverError",
    "config_from_json",
    "config_to_json",
    "handover",
    "read_handover",
    "write_handover",
]
