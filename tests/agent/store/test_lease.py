"""The state directory's mutation lease across real processes: one holder at a time, a
named holder in ``Busy``, counted holds within a process, ``on_first`` only when taken
from free, and a lock the kernel drops when its holder dies (kill -9)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.errors import Busy
from agent.store.lease import StateLease

HOLDER = textwrap.dedent(
    """
    import sys, time
    from agent.store.lease import StateLease
    lease = StateLease(sys.argv[1], holder="janitor-agent clean by local:test")
    lease.acquire()
    print("held", flush=True)
    time.sleep(120)
    """
)


@contextmanager
def other_process_holds(state_dir: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(state_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_another_process_holding_it_makes_us_busy_and_names_it(tmp_path: Path) -> None:
    firsts: list[int] = []
    lease = StateLease(
        str(tmp_path), holder="janitor-agent serve", on_first=lambda: firsts.append(1)
    )
    with other_process_holds(tmp_path) as proc:
        with pytest.raises(Busy) as caught:
            lease.acquire()
        assert caught.value.code == "busy" and caught.value.status == 409
        assert f"janitor-agent clean by local:test (pid {proc.pid}" in caught.value.detail
        assert str(tmp_path) in caught.value.detail
        assert not lease.try_once()
        assert firsts == []  # no recovery while another process may run a job
        started = time.monotonic()
        with pytest.raises(Busy):
            lease.acquire(wait=0.6)
        assert time.monotonic() - started >= 0.6
    # the holder is gone: free again
    assert lease.try_once() and firsts == [1]


def test_the_kernel_drops_the_lock_of_a_holder_killed_with_sigkill(tmp_path: Path) -> None:
    lease = StateLease(str(tmp_path), holder="x")
    with other_process_holds(tmp_path) as proc:
        assert not lease.try_once()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        lease.acquire(wait=5)
        assert lease.held_here
        lease.release()


def test_holds_are_counted_and_on_first_runs_only_from_free(tmp_path: Path) -> None:
    firsts: list[int] = []
    lease = StateLease(str(tmp_path), holder="a", on_first=lambda: firsts.append(1))
    lease.acquire()
    lease.acquire()
    assert firsts == [1]
    lease.release()
    assert lease.held_here
    # still held by this process: another process (or another lease object) is refused
    with pytest.raises(Busy):
        StateLease(str(tmp_path), holder="b").acquire()
    lease.release()
    assert not lease.held_here
    other = StateLease(str(tmp_path), holder="b")
    assert other.try_once()
    lease.acquire()
    assert firsts == [1, 1]
    lease.release()
    with pytest.raises(RuntimeError):
        lease.release()


def test_a_waiting_acquire_gets_it_when_the_holder_ends(tmp_path: Path) -> None:
    lease = StateLease(str(tmp_path), holder="a")
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER.replace("time.sleep(120)", "time.sleep(1)"), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        lease.acquire(wait=30)
        assert proc.poll() == 0  # it had ended: we got the lease after it
        lease.release()
    finally:
        proc.kill()
        proc.wait(10)


def test_the_lock_file_is_owner_only_and_holds_no_secret(tmp_path: Path) -> None:
    lease = StateLease(str(tmp_path), holder="janitor-agent serve")
    with lease.held():
        assert (tmp_path / "mutation.lock").stat().st_mode & 0o777 == 0o600
        assert lease.current_holder() is not None
        assert "janitor-agent serve" in (lease.current_holder() or "")
    assert lease.current_holder() is None  # emptied when let go
