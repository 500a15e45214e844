"""Labs still up in this process, torn down at exit or on SIGTERM/SIGHUP as a last resort.

The pytest fixtures tear their labs down in their finalizers; this catches the paths where
finalizers do not run (the process is told to terminate, or exits in between).
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from lab.teardown import down

_roots: list[Path] = []
_lock = threading.Lock()
_installed = False


def track(root: Path | str) -> None:
    with _lock:
        path = Path(os.path.realpath(root))
        if path not in _roots:
            _roots.append(path)


def untrack(root: Path | str) -> None:
    with _lock:
        path = Path(os.path.realpath(root))
        if path in _roots:
            _roots.remove(path)


def teardown_all() -> None:
    """Tear down every tracked lab, newest first; errors go to stderr, never raise."""
    while True:
        with _lock:
            if not _roots:
                return
            root = _roots.pop()
        try:
            report = down(root, check=False)
            if report.errors:
                print(f"lab teardown of {root}: {report.errors}", file=sys.stderr)
        except Exception as exc:  # at exit, say it and keep going
            print(f"lab teardown of {root} failed: {exc}", file=sys.stderr)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    teardown_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def install_cleanup_handlers() -> None:
    """Register ``teardown_all`` at exit and on SIGTERM and SIGHUP (main thread only)."""
    global _installed
    if _installed:
        return
    atexit.register(teardown_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _on_signal)
    _installed = True
