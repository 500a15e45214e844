"""Independent checks of what a lab leaves on the host, read straight from /proc and /sys
(not through the lab's own teardown code, which is what they check)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from lab import Lab


def mountpoints_below(root: Path) -> list[str]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
        if point == str(root) or point.startswith(f"{root}/"):
            out.append(point)
    return out


def starttime(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else int(fields[19])


def pids_naming(root: Path) -> dict[int, str]:
    """Processes (not this one) whose command line mentions ``root``."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            args = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in args]
        if any(str(root) in a for a in text) and starttime(int(name)) is not None:
            found[int(name)] = " ".join(text)[:200]
    return found


def cgroup_dirs(name: str) -> list[Path]:
    return [p for p in Path("/sys/fs/cgroup").glob(f"*/{name}") if p.is_dir()] + (
        [Path("/sys/fs/cgroup", name)] if Path("/sys/fs/cgroup", name).is_dir() else []
    )


def loops_backed_by(image: Path) -> list[str]:
    out = []
    for f in Path("/sys/block").glob("loop*/loop/backing_file"):
        if f.read_text().strip().removesuffix(" (deleted)") == str(image):
            out.append(f.parent.parent.name)
    return out


@dataclass(frozen=True)
class Footprint:
    """What a running lab holds on the host, to check its teardown against."""

    root: Path
    image_file: Path
    loop_device: str
    cgroup_parent: str
    processes: dict[int, tuple[int, str]]  # pid -> (start time, command line)


def footprint(lab: Lab) -> Footprint:
    procs: dict[int, tuple[int, str]] = {}
    for pid, cmd in pids_naming(lab.root).items():
        st = starttime(pid)
        if st is not None:
            procs[pid] = (st, cmd)
    for d in cgroup_dirs(lab.cgroup_parent):
        for f in d.rglob("cgroup.procs"):
            for pid in map(int, f.read_text().split()):
                st = starttime(pid)
                if st is not None:
                    procs[pid] = (st, f"(in cgroup {lab.cgroup_parent})")
    return Footprint(lab.root, lab.image_file, lab.loop_device, lab.cgroup_parent, procs)


def leftovers(fp: Footprint) -> list[str]:
    """Everything of the lab still on the host; empty when the teardown was complete."""
    left = [f"mounted: {m}" for m in mountpoints_below(fp.root)]
    left += [f"loop device {d} still backed by the image" for d in loops_backed_by(fp.image_file)]
    if Path(f"/sys/block/{Path(fp.loop_device).name}/loop/backing_file").exists():
        backing = Path(f"/sys/block/{Path(fp.loop_device).name}/loop/backing_file").read_text()
        if backing.strip().removesuffix(" (deleted)") == str(fp.image_file):
            left.append(f"{fp.loop_device} still attached")
    for pid, (st, cmd) in fp.processes.items():
        if starttime(pid) == st:
            left.append(f"pid {pid} still running: {cmd}")
    left += [f"process naming the lab: {pid} {cmd}" for pid, cmd in pids_naming(fp.root).items()]
    left += [f"cgroup left: {d}" for d in cgroup_dirs(fp.cgroup_parent)]
    if fp.root.exists():
        left.append(f"folder still there: {fp.root}")
    return left
