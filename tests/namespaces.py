"""Mount namespaces that no process is in, each holding a tmpfs with a file at some
folders that are plain folders everywhere else: the scenes of the tests that the agent
reads such namespaces' mounts (tests/agent/host/test_mounttables.py, test_holders.py,
tests/agent/test_safety_lab.py). Each yields (how the namespace is kept, a function that
digests the files as seen from inside it), and undoes everything at its end."""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path


def _run(*args: str | Path) -> str:
    done = subprocess.run([str(a) for a in args], check=True, capture_output=True)
    return done.stdout.decode()


def _fill_script(points: tuple[Path, ...]) -> str:
    for p in points:
        p.mkdir(parents=True, exist_ok=True)
    return "".join(
        f"mount -t tmpfs -o size=4m tmpfs '{p}' && head -c 3000 /dev/urandom > '{p}/only-here' && "
        for p in points
    )


def _reader(ns_file: str, points: tuple[Path, ...]) -> Callable[[], str]:
    def read() -> str:
        files = [str(p / "only-here") for p in points]
        return _run("nsenter", f"--mount={ns_file}", "sha256sum", *files)

    assert len(read().splitlines()) == len(points)
    assert not any((p / "only-here").exists() for p in points)  # not seen from here
    return read


@contextlib.contextmanager
def pinned_namespace_tmpfs(where: Path, *points: Path) -> Iterator[tuple[Path, Callable[[], str]]]:
    """A namespace kept by a bind mount of its nsfs file (``unshare --mount=FILE``: how
    tools keep a namespace for later), the file on a private tmpfs in a new folder in
    ``where``. Yields (the pin file, the digest)."""
    pin_dir = where / f"pin-{secrets.token_hex(3)}"
    pin_dir.mkdir()
    pin = pin_dir / "ns"
    made: list[Path] = []
    try:
        _run("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", pin_dir)
        made.append(pin_dir)
        _run("mount", "--make-private", pin_dir)
        pin.touch()
        script = _fill_script(points) + "true"
        _run("unshare", f"--mount={pin}", "--propagation", "private", "sh", "-c", script)
        made.append(pin)
        yield pin, _reader(str(pin), points)
    finally:
        for m in reversed(made):
            subprocess.run(["umount", str(m)], check=False, capture_output=True)


@contextlib.contextmanager
def fd_held_namespace_tmpfs(*points: Path) -> Iterator[tuple[int, Callable[[], str]]]:
    """A namespace held open only by another process's fd on ``/proc/<pid>/ns/mnt`` of
    its maker, which has ended. Yields (the keeper's pid, the digest)."""
    script = _fill_script(points) + "echo ready && exec sleep 600"
    maker = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        stdout=subprocess.PIPE,
    )
    keeper = None
    try:
        assert maker.stdout is not None and maker.stdout.readline().strip() == b"ready"
        keeper = subprocess.Popen(
            ["python3", "-c",
             f"import os, time; fd = os.open('/proc/{maker.pid}/ns/mnt', os.O_RDONLY); "
             "print(fd, flush=True); time.sleep(600)"],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert keeper.stdout is not None
        fd = keeper.stdout.readline().strip().decode()
        assert fd.isdigit(), fd
        maker.kill()
        maker.wait()
        yield keeper.pid, _reader(f"/proc/{keeper.pid}/fd/{fd}", points)
    finally:
        for proc in (maker, keeper):
            if proc is not None:
                proc.kill()
                proc.wait()
