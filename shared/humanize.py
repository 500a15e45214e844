"""Sizes and ages as people read them, the same for the agent's local commands and the
controller's output."""

from __future__ import annotations

UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: int | None) -> str:
    """``1610612736`` -> ``1.5 GiB``; None (unknown: quotas off) -> ``?``."""
    if n is None:
        return "?"
    size = float(n)
    for unit in UNITS:
        if abs(size) < 1024 or unit == UNITS[-1]:
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def bytes_exact(n: int | None) -> str:
    """Human readable and exact: ``1.5 GiB (1610612736)``; None is ``?``."""
    return "?" if n is None else f"{human_bytes(n)} ({n})" if n >= 1024 else f"{n} B"


def human_age(seconds: int | None) -> str:
    """``90000`` -> ``1d``; None -> ``?``."""
    if seconds is None:
        return "?"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
