"""Independent checks of what a lab leaves on the host, read straight from /proc and /sys
(not through the lab's own teardown code, which is what they check)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
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


# --------------------------------------------------------------------------- host settings
#
# What a lab could change on the host beyond its own folder: the settings dockerd 20.10
# writes when it may (``net.ipv4.ip_forward`` in libnetwork's setupIPForwarding, which the
# kernel mirrors in every ``*/forwarding``; ``kernel.keys.root_maxkeys`` / ``root_maxbytes``
# raised to 1000000 / 25000000 in ModifyRootKeyLimit; ``fs.may_detach_mounts`` on kernels
# that have it; ``net.bridge.bridge-nf-call-*`` for a bridge network), the network
# interfaces (a bridge, veths), the iptables rules, and mounts outside the lab's folder.

_SYSCTL_PATTERNS = (
    "net/ipv4/ip_forward",
    "net/ipv4/conf/*/*forwarding",
    "net/ipv6/conf/*/*forwarding",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "fs/may_detach_mounts",
    "net/bridge/*",
)
_IPTABLES_TABLES = ("filter", "nat", "mangle", "raw")


def sysctls(proc_sys: Path = Path("/proc/sys")) -> dict[str, str]:
    """The settings above that exist here, by sysctl name (``net.ipv4.ip_forward``)."""
    out = {}
    for pattern in _SYSCTL_PATTERNS:
        for path in sorted(proc_sys.glob(pattern)):
            try:
                value = path.read_text().strip()
            except OSError as e:
                value = f"(unreadable: {e.strerror})"
            out[".".join(path.relative_to(proc_sys).parts)] = value
    return out


def interfaces() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def iptables_rules() -> dict[str, str]:
    """``iptables -S`` and ``ip6tables -S`` of each table, where the commands exist
    (rules, chains and policies; no counters)."""
    out = {}
    for tool in ("iptables", "ip6tables"):
        binary = shutil.which(tool)
        if binary is None:
            continue
        for table in _IPTABLES_TABLES:
            proc = subprocess.run(
                [binary, "-w", "5", "-t", table, "-S"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            out[f"{tool} -t {table}"] = f"exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return out


def other_lab_folders(tmp: Path) -> list[Path]:
    """Temp folders where other labs and test filesystems live (``nas-janitor-*``: labs,
    demos, benchmarks; ``pytest-of-*``: the loop-backed btrfs fixtures). On a shared host
    they come and go while a test runs; each one's teardown is checked by its own tests."""
    return [*tmp.glob("nas-janitor-*"), *tmp.glob("pytest-of-*")]


def mounts_outside(exclude: list[Path]) -> set[tuple[str, str, str]]:
    """(mount point, file system type, source) of every mount not below ``exclude``."""
    out = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        if any(point == str(d) or point.startswith(f"{d}/") for d in exclude):
            continue
        out.add((point, fields[sep + 1], fields[sep + 2]))
    return out


@dataclass(frozen=True)
class HostSettings:
    sysctls: dict[str, str]
    interfaces: set[str]
    iptables: dict[str, str]
    mounts: set[tuple[str, str, str]]


def host_settings(exclude: list[Path] | None = None) -> HostSettings:
    """A record of the host's settings above; mounts below ``exclude`` (and below
    ``other_lab_folders``) are left out."""
    tmp = Path(tempfile.gettempdir())
    return HostSettings(
        sysctls=sysctls(),
        interfaces=interfaces(),
        iptables=iptables_rules(),
        mounts=mounts_outside([*(exclude or []), *other_lab_folders(tmp)]),
    )


def settings_changes(before: HostSettings, after: HostSettings) -> list[str]:
    """Every difference between two records, one line each; empty when none."""
    out = []
    for name in sorted(before.sysctls.keys() | after.sysctls.keys()):
        was, now = before.sysctls.get(name), after.sysctls.get(name)
        if was != now:
            out.append(f"sysctl {name}: {was!r} -> {now!r}")
    out += [f"interface added: {n}" for n in sorted(after.interfaces - before.interfaces)]
    out += [f"interface removed: {n}" for n in sorted(before.interfaces - after.interfaces)]
    for name in sorted(before.iptables.keys() | after.iptables.keys()):
        was, now = before.iptables.get(name), after.iptables.get(name)
        if was != now:
            out.append(f"{name} -S: {was!r} -> {now!r}")
    out += [f"mount added: {m}" for m in sorted(after.mounts - before.mounts)]
    out += [f"mount removed: {m}" for m in sorted(before.mounts - after.mounts)]
    return out
