"""btrfs-progs 4.4.1, the version NAS vendors ship, built from upstream's source so the
agent's lab tests can run it as their ``btrfs_binary``.

The source is not part of the repository: it is looked for at
``../shared/vendor/btrfs-progs-v4.4.1.tar.gz`` relative to the repository's root
(``NAS_JANITOR_BTRFS_PROGS_TARBALL`` names another file). The build is cached outside
the clone, in ``~/.cache/nas-janitor/btrfs-progs/<sha256 of the tarball>/`` (under
``$XDG_CACHE_HOME`` when set; ``NAS_JANITOR_BTRFS_PROGS_CACHE`` names another folder),
which holds the ``btrfs`` binary and the build's log, ``build.log``. A cached binary is
used again when it runs and prints ``btrfs-progs v4.4.1``; otherwise it is built anew:

    ./autogen.sh && ./configure --disable-documentation --disable-convert && make btrfs

in a scratch copy of the source, which is removed afterwards; a failed build leaves its
log. Builds of the same tarball by several processes at once take turns (a lock file).

    python -m lab.btrfs_progs build    # build unless cached; print the binary's path
    python -m lab.btrfs_progs path     # print the cached binary's path, or exit 1
    python -m lab.btrfs_progs source   # print the tarball's path; exit 1 if it is absent

``build`` without the tarball exits 0 and says the 4.4.1 tests will be skipped, except
with ``CI=true``: then it exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

VERSION = "4.4.1"
TARBALL_NAME = f"btrfs-progs-v{VERSION}.tar.gz"
REPO_ROOT = Path(__file__).resolve().parent.parent
# The tarball, relative to the repository's root (a folder beside the clone).
TARBALL_RELATIVE = Path("..") / "shared" / "vendor" / TARBALL_NAME
BUILD_TOOLS = ("autoconf", "automake", "aclocal", "pkg-config", "make", "cc")
# The Debian packages the build needs (Makefile: BTRFS_PROGS_PACKAGES says the same).
BUILD_PACKAGES = (
    "autoconf", "automake", "pkg-config", "uuid-dev", "libblkid-dev", "zlib1g-dev",
    "liblzo2-dev", "libattr1-dev",
)  # fmt: skip
STEP_TIMEOUT = 900.0


class SourceMissing(Exception):
    """The source tarball is not there (a clone without ``../shared``)."""


class BuildFailed(Exception):
    """The build did not produce a working binary; the message ends with the log's tail."""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def tarball() -> Path:
    given = os.environ.get("NAS_JANITOR_BTRFS_PROGS_TARBALL", "").strip()
    if given:
        return Path(given)
    return Path(os.path.normpath(REPO_ROOT / TARBALL_RELATIVE))


def cache_base() -> Path:
    given = os.environ.get("NAS_JANITOR_BTRFS_PROGS_CACHE", "").strip()
    if given:
        return Path(given)
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "nas-janitor" / "btrfs-progs"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _source() -> Path:
    src = tarball()
    if not src.is_file():
        where = (
            "NAS_JANITOR_BTRFS_PROGS_TARBALL"
            if os.environ.get("NAS_JANITOR_BTRFS_PROGS_TARBALL", "").strip()
            else f"{TARBALL_RELATIVE} from the repository's root"
        )
        raise SourceMissing(f"no btrfs-progs {VERSION} source at {src} (named by {where})")
    return src


def cache_dir(src: Path | None = None) -> Path:
    """The cache folder of this tarball's build."""
    return cache_base() / sha256(src or _source())


def runs(binary: Path) -> bool:
    """``binary --version`` exits 0 and prints ``btrfs-progs v4.4.1``."""
    try:
        proc = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError:
        return False
    return proc.returncode == 0 and proc.stdout.split() == ["btrfs-progs", f"v{VERSION}"]


def cached() -> Path | None:
    """The cached binary when the tarball is there and its build runs; else None."""
    try:
        binary = cache_dir() / "btrfs"
    except SourceMissing:
        return None
    return binary if runs(binary) else None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def ensure(*, say: Callable[[str], None] = lambda _: None) -> Path:
    """The 4.4.1 binary, built first unless cached. Raises ``SourceMissing`` without the
    tarball, ``BuildFailed`` (with the log's path and tail) when the build fails."""
    src = _source()
    out = cache_dir(src)
    binary = out / "btrfs"
    with _locked(out.with_name(out.name + ".lock")):
        if runs(binary):
            say(f"btrfs-progs {VERSION}: cached, {binary}")
            return binary
        missing = [t for t in BUILD_TOOLS if shutil.which(t) is None]
        if missing:
            raise BuildFailed(
                f"cannot build btrfs-progs {VERSION}: missing {', '.join(missing)} "
                f"(Debian packages: {' '.join(BUILD_PACKAGES)}; `make btrfs-progs` installs them)"
            )
        say(f"btrfs-progs {VERSION}: building from {src} (log: {out / 'build.log'})")
        seconds = _build(src, out)
        say(f"btrfs-progs {VERSION}: built in {seconds:.1f} s, {binary}")
        return binary


def _build(src: Path, out: Path) -> float:
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "build.log"
    binary = out / "btrfs"
    binary.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=out) as scratch, log.open("w") as f:
        f.write(f"# btrfs-progs {VERSION} from {src} (sha256 {out.name})\n")
        f.flush()
        with tarfile.open(src) as tar:
            tar.extractall(scratch, filter="data")
        tops = [p for p in Path(scratch).iterdir() if p.is_dir()]
        if len(tops) != 1 or not (tops[0] / "autogen.sh").is_file():
            raise BuildFailed(f"{src} does not unpack to one btrfs-progs source folder")
        tree = tops[0]
        jobs = str(os.cpu_count() or 1)
        steps: list[Sequence[str]] = [
            ["./autogen.sh"],
            ["./configure", "--disable-documentation", "--disable-convert"],
            ["make", f"-j{jobs}", "btrfs"],
        ]
        for step in steps:
            f.write(f"\n$ {' '.join(step)}\n")
            f.flush()
            try:
                proc = subprocess.run(
                    step, cwd=tree, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                    timeout=STEP_TIMEOUT, check=False,
                )  # fmt: skip
            except subprocess.TimeoutExpired:
                raise BuildFailed(
                    f"`{' '.join(step)}` ran past {STEP_TIMEOUT:g} s; log {log}:\n{_tail(log)}"
                ) from None
            if proc.returncode != 0:
                f.flush()
                raise BuildFailed(
                    f"`{' '.join(step)}` exited {proc.returncode}; log {log}:\n{_tail(log)}"
                )
        staged = out / "btrfs.new"
        shutil.copy2(tree / "btrfs", staged)
        if not runs(staged):
            staged.unlink(missing_ok=True)
            raise BuildFailed(f"the built btrfs does not print btrfs-progs v{VERSION}; log {log}")
        os.replace(staged, binary)
        seconds = time.monotonic() - started
        f.write(f"\n# built in {seconds:.1f} s\n")
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.btrfs_progs", description=__doc__)
    parser.add_argument("command", choices=["build", "path", "source"])
    args = parser.parse_args(argv)

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if args.command == "source":
        src = tarball()
        print(src)
        return 0 if src.is_file() else 1
    if args.command == "path":
        found = cached()
        if found is None:
            say(f"btrfs-progs {VERSION} is not built (python -m lab.btrfs_progs build)")
            return 1
        print(found)
        return 0
    try:
        print(ensure(say=say))
    except SourceMissing as e:
        if in_ci():
            say(f"btrfs-progs {VERSION}: {e}; CI=true needs it")
            return 1
        say(f"btrfs-progs {VERSION}: {e}; the tests with it will be skipped")
        return 0
    except BuildFailed as e:
        say(str(e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
