"""What the lab reads from the host: preconditions, mounts, loop devices, cgroups, sockets."""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

TOOLS = ("mkfs.btrfs", "btrfs", "losetup", "mount", "umount", "dockerd", "containerd", "docker")


def host_problems() -> list[str]:
    """Why this host cannot run a lab; empty when it can."""
    problems: list[str] = []
    if os.geteuid() != 0:
        problems.append("not root (a lab needs mount, loop devices and dockerd)")
    if not Path("/dev/loop-control").exists():
        problems.append("no /dev/loop-control: loop devices are unavailable")
    for tool in TOOLS:
        if shutil.which(tool) is None:
            problems.append(f"{tool} not found (run `make deps`)")
    busybox = shutil.which("busybox")
    if busybox is None:
        problems.append("busybox not found (install busybox-static: `make deps`)")
    elif has_interpreter(Path(busybox)):
        problems.append(f"{busybox} is dynamically linked; the lab image needs busybox-static")
    if not _btrfs_in_kernel():
        problems.append("btrfs is not in /proc/filesystems and no btrfs module is installed")
    return problems


def _btrfs_in_kernel() -> bool:
    try:
        if "btrfs" in Path("/proc/filesystems").read_text().split():
            return True
    except OSError:
        return False
    release = os.uname().release
    return any(Path(f"/lib/modules/{release}").glob("kernel/fs/btrfs/btrfs.ko*"))


def has_interpreter(path: Path) -> bool:
    """True if the ELF file at ``path`` asks for a dynamic loader (PT_INTERP)."""
    with path.open("rb") as f:
        head = f.read(64)
        if len(head) < 52 or head[:4] != b"\x7fELF":
            return False
        is64 = head[4] == 2
        endian = "<" if head[5] == 1 else ">"
        if is64:
            (phoff,) = struct.unpack_from(endian + "Q", head, 0x20)
            phentsize, phnum = struct.unpack_from(endian + "HH", head, 0x36)
        else:
            (phoff,) = struct.unpack_from(endian + "I", head, 0x1C)
            phentsize, phnum = struct.unpack_from(endian + "HH", head, 0x2A)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            (p_type,) = struct.unpack(endian + "I", f.read(4))
            if p_type == 3:  # PT_INTERP
                return True
    return False


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    mountpoint: str
    fstype: str
    source: str


_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> list[Mount]:
    out: list[Mount] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        tail = right.split()
        out.append(Mount(int(fields[0]), _unescape(fields[4]), tail[0], _unescape(tail[1])))
    return out


def mounts_below(root: Path) -> list[Mount]:
    """Mounts at or below ``root``, deepest (and most recently stacked) first."""
    base = str(root)
    found = [m for m in mounts() if m.mountpoint == base or m.mountpoint.startswith(base + "/")]
    return sorted(found, key=lambda m: (m.mountpoint.count("/"), m.mount_id), reverse=True)


def loop_devices_backed_by(image: Path) -> list[str]:
    """Loop devices whose backing file is ``image`` (also once the file was deleted)."""
    target = str(image)
    found: list[str] = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            name = backing.read_text().strip()
        except OSError:
            continue
        if name in (target, target + " (deleted)"):
            found.append("/dev/" + backing.parent.parent.name)
    return sorted(found)


def loop_backing_file(device: str) -> str | None:
    path = Path("/sys/block") / Path(device).name / "loop" / "backing_file"
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_dirs(name: str) -> list[Path]:
    """The directories of cgroup ``name`` (a top-level cgroup) in every mounted hierarchy."""
    found: list[Path] = []
    for m in mounts():
        if m.fstype in ("cgroup", "cgroup2"):
            path = Path(m.mountpoint) / name.lstrip("/")
            if path.is_dir():
                found.append(path)
    return found


def cgroup_pids(name: str) -> set[int]:
    pids: set[int] = set()
    for top in cgroup_dirs(name):
        for procs in top.rglob("cgroup.procs"):
            try:
                pids.update(int(x) for x in procs.read_text().split())
            except OSError:
                continue
    return pids


def docker_ping(sock: Path, timeout: float = 1.0) -> bool:
    """True if a Docker API answers ``GET /_ping`` with 200 on the unix socket ``sock``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock))
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
    except OSError:
        return False
    status = data.split(b"\r\n", 1)[0].split()
    return len(status) >= 2 and status[1] == b"200"


def socket_accepts(sock: Path, timeout: float = 1.0) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock))
    except OSError:
        return False
    return True
