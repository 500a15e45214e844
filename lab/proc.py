"""Running commands and keeping track of the processes the lab starts.

``run`` is the only place that runs a short-lived command. Long-lived daemons are started
with ``spawn`` and identified afterwards by a ``ProcessRef``: a pid *and* the kernel's start
time of that pid, so a pid that was reused by an unrelated process is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lab.errors import CommandError


@dataclass(frozen=True)
class Result:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def run(
    cmd: Sequence[str],
    *,
    check: bool = True,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
) -> Result:
    """Run ``cmd`` (an argument list, never a shell) and return its decoded output.

    With ``check`` a non-zero exit raises ``CommandError``; a timeout always does.
    """
    args = tuple(cmd)
    try:
        proc = subprocess.run(
            args,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            env=dict(env) if env is not None else None,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = _decode(exc.stdout)
        err = _decode(exc.stderr)
        raise CommandError(args, -1, out, err, note=f"timed out after {timeout:g}s") from exc
    except FileNotFoundError as exc:
        raise CommandError(args, -1, "", str(exc), note="not found") from exc
    result = Result(args, proc.returncode, _decode(proc.stdout), _decode(proc.stderr))
    if check and proc.returncode != 0:
        raise CommandError(args, proc.returncode, result.stdout, result.stderr)
    return result


def _decode(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, str):
        return data
    return data.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class ProcessRef:
    """A process the lab started: its pid and the start time the kernel gave that pid."""

    pid: int
    starttime: int
    name: str

    def alive(self) -> bool:
        """True while this very process (not a later one with the same pid) runs."""
        reap(self.pid)
        stat = read_stat(self.pid)
        return stat is not None and stat[1] == self.starttime and stat[0] != "Z"

    def signal(self, sig: signal.Signals) -> bool:
        """Send ``sig`` if the process is still the one we started. True if sent."""
        if not self.alive():
            return False
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def stop(self, *, grace: float) -> str | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Returns the signal that
        ended it ("SIGTERM", "SIGKILL"), None if it was not running, raises if it survives."""
        if not self.signal(signal.SIGTERM):
            return None
        if wait_gone(self, grace):
            return "SIGTERM"
        self.signal(signal.SIGKILL)
        if wait_gone(self, 10.0):
            return "SIGKILL"
        raise OSError(f"{self.name} (pid {self.pid}) survived SIGKILL")


def wait_gone(ref: ProcessRef, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while ref.alive():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def reap(pid: int) -> None:
    """Collect the exit status if ``pid`` is our own child, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def read_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of ``pid`` from /proc, None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; split after the last ")"
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def ref_for(pid: int, name: str) -> ProcessRef | None:
    stat = read_stat(pid)
    return None if stat is None else ProcessRef(pid, stat[1], name)


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", errors="replace") for part in raw.split(b"\0") if part]


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def spawn(
    cmd: Sequence[str], *, log: Path, name: str
) -> tuple[subprocess.Popen[bytes], ProcessRef]:
    """Start a daemon in its own session (so it outlives a CLI ``up`` and ignores the
    caller's Ctrl-C), output appended to ``log``."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    ref = ref_for(proc.pid, name)
    if ref is None:  # it died at once; keep a reference that is never "alive"
        ref = ProcessRef(proc.pid, -1, name)
    return proc, ref
