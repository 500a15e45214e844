"""Root filesystems for the lab's images, built in memory as tar streams for ``docker import``.

No registry is reachable, so every image is made locally:
- busybox: ``bin/busybox`` from the host's busybox-static and symlinks to it;
- dind: an almost empty root whose ``/usr`` is the host's, bind-mounted read-only at run
  time, so the host's own dockerd, containerd and runc run inside it.
"""

from __future__ import annotations

import functools
import io
import shutil
import tarfile
from pathlib import Path

BUSYBOX_IMAGE = "nas-janitor-lab/busybox:latest"
DIND_IMAGE = "nas-janitor-lab/dind:latest"
INNER_IMAGE = "nas-janitor-lab/inner-busybox:latest"

BUSYBOX_APPLETS = (
    "sh", "ls", "cat", "echo", "sleep", "true", "false", "mkdir", "rm", "touch", "dd", "head",
    "wc", "test", "id", "env", "ps", "du", "stat", "sync",
)  # fmt: skip

DIND_DIRS = (
    "usr", "etc", "var", "var/lib", "var/lib/docker", "var/run", "run", "proc", "sys", "dev",
    "root",
)  # fmt: skip
DIND_CMD = '["dockerd","--host=unix:///var/run/docker.sock","--iptables=false","--ip-forward=false","--bridge=none"]'
DIND_CHANGES = ("VOLUME /var/lib/docker", f"CMD {DIND_CMD}")


def _dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    tar.addfile(info)


def _symlink(tar: tarfile.TarFile, name: str, target: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    info.mode = 0o777
    tar.addfile(info)


def _file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


@functools.cache
def busybox_tar() -> bytes:
    """A busybox root filesystem as an uncompressed tar."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise FileNotFoundError("busybox")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("bin", "etc", "tmp", "data", "proc", "sys", "dev"):
            _dir(tar, d, 0o1777 if d == "tmp" else 0o755)
        _file(tar, "bin/busybox", Path(busybox).read_bytes(), 0o755)
        for applet in BUSYBOX_APPLETS:
            _symlink(tar, f"bin/{applet}", "busybox")
        _file(tar, "etc/passwd", b"root:x:0:0:root:/:/bin/sh\n")
        _file(tar, "etc/group", b"root:x:0:\n")
    return buf.getvalue()


@functools.cache
def dind_tar() -> bytes:
    """The docker-in-docker root: directories, account files and usr-merge symlinks."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in DIND_DIRS:
            _dir(tar, d)
        _dir(tar, "tmp", 0o1777)
        for link in ("bin", "sbin", "lib", "lib64"):
            _symlink(tar, link, f"usr/{link}")
        _file(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        _file(tar, "etc/group", b"root:x:0:\n")
    return buf.getvalue()
