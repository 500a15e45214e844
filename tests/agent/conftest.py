"""Fixtures for the agent's tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# --------------------------------------------------------------------------- loop btrfs
#
# A small real btrfs for the btrfs wrapper's integration tests: a 1 GiB sparse file,
# mkfs.btrfs, a loop device of our own (losetup --find --show), mounted below the test's
# temporary folder. Teardown unmounts only what is mounted below that folder and detaches
# only that loop device, whatever happened in the test.
#
# Where it cannot be built (not root, tools missing, no loop devices) the tests are
# skipped with the reason, except when CI=true: then they fail with it.

LOOP_FS_SIZE = 1 << 30
LOOP_FS_NODESIZE = 16384
LOOP_FS_LABEL = "nj-test"


@dataclass
class LoopBtrfs:
    workdir: Path
    image: Path
    device: str
    mount: str  # the top level (subvolume 5) is mounted here
    uuid: str
    label: str
    nodesize: int
    extra_mounts: list[str] = field(default_factory=list)

    def mount_subvolume(self, subvol: str, at: str) -> str:
        """Mount ``subvol`` of this filesystem at ``at`` (below the workdir)."""
        target = Path(at)
        assert self.workdir in target.parents, "mounts stay below the fixture's folder"
        target.mkdir(parents=True, exist_ok=True)
        _cmd("mount", "-t", "btrfs", "-o", f"subvol={subvol}", self.device, str(target))
        self.extra_mounts.append(str(target))
        return str(target)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _unavailable(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"CI=true but the loop-backed btrfs cannot be made: {reason}", pytrace=False)
    pytest.skip(f"loop-backed btrfs unavailable: {reason}")


def _cmd(*args: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def _mounts_below(folder: Path) -> list[str]:
    """Mount points below ``folder`` (from our own mount table), deepest first."""
    prefix = str(folder) + "/"
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            point = line.split(" ")[4]
            for esc, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
                point = point.replace(esc, char)
            if point.startswith(prefix):
                found.append(point)
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def _teardown(workdir: Path, device: str | None) -> list[str]:
    problems = []
    for point in _mounts_below(workdir):
        for _ in range(25):
            if subprocess.run(["umount", point], capture_output=True, check=False).returncode == 0:
                break
            time.sleep(0.2)
        else:
            problems.append(f"umount {point} kept failing; lazily unmounted")
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    if device is not None:
        for _ in range(25):
            proc = subprocess.run(["losetup", "-d", device], capture_output=True, check=False)
            if proc.returncode == 0:
                break
            time.sleep(0.2)
        else:
            problems.append(f"losetup -d {device} failed: {proc.stderr.decode().strip()}")
    return problems


@pytest.fixture
def loop_btrfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopBtrfs]:
    if os.geteuid() != 0:
        _unavailable("needs root (mount, losetup)")
    missing = [
        t for t in ("mkfs.btrfs", "btrfs", "losetup", "mount", "umount") if not shutil.which(t)
    ]
    if missing:
        _unavailable(f"missing tools: {', '.join(missing)}")

    workdir = tmp_path_factory.mktemp("loop-btrfs")
    image = workdir / "fs.img"
    mount = workdir / "mnt"
    fs_uuid = str(uuid.uuid4())
    device: str | None = None
    try:
        try:
            with open(image, "wb") as f:
                f.truncate(LOOP_FS_SIZE)
            _cmd(
                "mkfs.btrfs", "-q", "-f", "-U", fs_uuid, "-L", LOOP_FS_LABEL,
                "-n", str(LOOP_FS_NODESIZE), str(image),
            )  # fmt: skip
            device = _cmd("losetup", "--find", "--show", str(image)).strip()
            if not device.startswith("/dev/loop"):
                raise RuntimeError(f"losetup printed {device!r}")
            mount.mkdir()
            _cmd("mount", "-t", "btrfs", device, str(mount))
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
            _unavailable(str(e))
        assert device is not None
        yield LoopBtrfs(
            workdir=workdir,
            image=image,
            device=device,
            mount=str(mount),
            uuid=fs_uuid,
            label=LOOP_FS_LABEL,
            nodesize=LOOP_FS_NODESIZE,
        )
    finally:
        problems = _teardown(workdir, device)
        image.unlink(missing_ok=True)
        if problems:
            raise RuntimeError("; ".join(problems))
