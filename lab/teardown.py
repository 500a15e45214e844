"""Tearing a lab down so that nothing of it is left on the host.

It works from the state file when there is one and from what it can prove is the lab's
otherwise, so it is safe after a partial or crashed ``up``, from another process, and twice:
- processes: the daemons by their recorded pid *and* start time; then anything in the lab's
  own cgroup, and containerd shims / daemons whose command line names the lab folder;
- mounts: every mount at or below the lab folder, deepest first;
- loop devices: only those whose backing file is the lab's image file;
- files: the folder is removed only once nothing is mounted below it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from lab import host
from lab.errors import CommandError, TeardownError
from lab.proc import ProcessRef, all_pids, cmdline, read_stat, ref_for, run
from lab.state import LabState, Layout

DAEMON_NAMES = frozenset(
    {"dockerd", "containerd", "containerd-shim", "containerd-shim-runc-v2", "runc", "docker-proxy"}
)


@dataclass
class TeardownReport:
    root: str
    stopped: list[str] = field(default_factory=list)  # "dockerd pid 123 (SIGTERM)"
    unmounted: list[str] = field(default_factory=list)
    lazily_unmounted: list[str] = field(default_factory=list)
    detached: list[str] = field(default_factory=list)
    removed_cgroups: list[str] = field(default_factory=list)
    removed_dir: bool = False
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors


def down(root: Path | str, *, check: bool = True) -> TeardownReport:
    """Tear down the lab in ``root``. Idempotent: a missing folder is already torn down.

    With ``check``, raises ``TeardownError`` if anything is left behind.
    """
    started = time.monotonic()
    root = Path(os.path.realpath(root))  # mountinfo shows real paths
    report = TeardownReport(str(root))
    layout = Layout(root)
    if root.exists():
        _teardown(layout, report)
    report.seconds = round(time.monotonic() - started, 3)
    if check and report.errors:
        raise TeardownError(report)
    return report


def _load_state(layout: Layout, report: TeardownReport) -> LabState | None:
    if not layout.state_file.exists():
        return None
    try:
        return LabState.load(layout.root)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        report.errors.append(f"state file unreadable, using discovery only: {exc}")
        return None


def _teardown(layout: Layout, report: TeardownReport) -> None:
    if not layout.state_file.exists() and any(layout.root.iterdir()):
        # Never rm -rf a folder we cannot prove is a lab; only clean what names it.
        report.errors.append(f"{layout.root} holds no {layout.state_file.name}; not a lab folder")
        return
    state = _load_state(layout, report)
    _kill_containers(layout)
    _stop_daemon(state.dockerd if state else None, layout, "dockerd", report, grace=20.0)
    _stop_daemon(state.containerd if state else None, layout, "containerd", report, grace=10.0)
    _sweep_processes(layout, report)
    _unmount_all(layout, report)
    _detach_loops(layout, state, report)
    _remove_cgroups(layout, report)
    left = host.mounts_below(layout.root)
    if left:
        report.errors.append("still mounted: " + ", ".join(m.mountpoint for m in left))
        return
    foreign = _other_filesystems(layout.root)
    if foreign:  # a mount mountinfo did not show us: never delete through it
        report.errors.append("other filesystems below the lab folder: " + ", ".join(foreign))
        return
    try:
        shutil.rmtree(layout.root)
        report.removed_dir = True
    except OSError as exc:
        report.errors.append(f"removing {layout.root}: {exc}")


def _other_filesystems(root: Path) -> list[str]:
    """Folders below ``root`` that are on another device than ``root`` itself."""
    dev = root.lstat().st_dev
    found: list[str] = []
    for parent, dirs, _files in os.walk(root):
        for d in dirs:
            path = os.path.join(parent, d)
            with contextlib.suppress(OSError):
                if os.lstat(path).st_dev != dev:
                    found.append(path)
        dirs[:] = [d for d in dirs if os.path.join(parent, d) not in found]
    return found


def _kill_containers(layout: Layout) -> None:
    """Kill the running containers first: a graceful daemon stop would wait for each."""
    if not host.docker_ping(layout.socket):
        return
    env = docker_env(layout)
    try:
        ids = run(["docker", "ps", "-q"], env=env, timeout=15).stdout.split()
        if ids:
            run(["docker", "kill", *ids], env=env, check=False, timeout=30)
    except CommandError:
        pass  # the daemon stop and the sweep below still handle them


def docker_env(layout: Layout) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    env["DOCKER_HOST"] = f"unix://{layout.socket}"
    env["DOCKER_CONFIG"] = str(layout.docker_config)
    return env


def _names_lab(pid: int, layout: Layout) -> bool:
    args = cmdline(pid)
    marker = str(layout.root) + "/"
    return any(marker in a or a == str(layout.root) for a in args)


def _stop_daemon(
    ref: ProcessRef | None,
    layout: Layout,
    name: str,
    report: TeardownReport,
    *,
    grace: float,
) -> None:
    candidates: list[ProcessRef] = []
    if ref is not None:
        candidates.append(ref)
    elif name == "dockerd" and layout.pidfile.exists():
        # no state: trust the pidfile only if that pid's command line names this lab
        with contextlib.suppress(ValueError, OSError):
            pid = int(layout.pidfile.read_text().strip())
            found = ref_for(pid, name)
            if found is not None and _names_lab(pid, layout):
                candidates.append(found)
    for cand in candidates:
        try:
            how = cand.stop(grace=grace)
        except OSError as exc:
            report.errors.append(str(exc))
            continue
        if how is not None:
            report.stopped.append(f"{name} pid {cand.pid} ({how})")


def _sweep_processes(layout: Layout, report: TeardownReport) -> None:
    """Kill what is left: processes in the lab's cgroup, and daemons or shims whose
    command line names the lab folder (a shim outlives a killed containerd)."""
    me = os.getpid()
    for _ in range(3):
        targets: dict[int, str] = {}
        for pid in host.cgroup_pids(layout.cgroup_parent):
            targets[pid] = "container process"
        for pid in all_pids():
            args = cmdline(pid)
            if args and os.path.basename(args[0]) in DAEMON_NAMES and _names_lab(pid, layout):
                targets[pid] = os.path.basename(args[0])
        targets.pop(me, None)
        if not targets:
            return
        refs = [r for pid, what in targets.items() if (r := ref_for(pid, what)) is not None]
        for r in refs:
            if r.signal(signal.SIGKILL):
                report.stopped.append(f"{r.name} pid {r.pid} (SIGKILL, sweep)")
        deadline = time.monotonic() + 10
        while any(r.alive() for r in refs) and time.monotonic() < deadline:
            time.sleep(0.05)
    for pid in host.cgroup_pids(layout.cgroup_parent):
        stat = read_stat(pid)
        if stat is not None and stat[0] != "Z":
            report.errors.append(f"pid {pid} still in cgroup {layout.cgroup_parent}")


def _unmount_all(layout: Layout, report: TeardownReport) -> None:
    for _ in range(5):
        below = host.mounts_below(layout.root)
        if not below:
            return
        progress = False
        for m in below:
            if run(["umount", m.mountpoint], check=False, timeout=60).returncode == 0:
                report.unmounted.append(m.mountpoint)
                progress = True
        if not progress:
            time.sleep(0.5)
    for m in host.mounts_below(layout.root):
        # last resort, reported: detaches the mount now, the kernel frees it when unused
        if run(["umount", "-l", m.mountpoint], check=False, timeout=60).returncode == 0:
            report.lazily_unmounted.append(m.mountpoint)
        else:
            report.errors.append(f"cannot unmount {m.mountpoint}")


def _detach_loops(layout: Layout, state: LabState | None, report: TeardownReport) -> None:
    devices = set(host.loop_devices_backed_by(layout.image_file))
    if state is not None and state.loop_device:
        # the recorded device only while it is still ours: loop numbers get reused
        backing = host.loop_backing_file(state.loop_device)
        if backing in (str(layout.image_file), f"{layout.image_file} (deleted)"):
            devices.add(state.loop_device)
    for dev in sorted(devices):
        result = run(["losetup", "-d", dev], check=False, timeout=30)
        if result.returncode == 0:
            report.detached.append(dev)
        else:
            report.errors.append(f"losetup -d {dev}: {result.stderr.strip()}")
    for _ in range(50):
        if not host.loop_devices_backed_by(layout.image_file):
            return
        time.sleep(0.1)
    report.errors.append("loop device still attached to " + str(layout.image_file))


def _remove_cgroups(layout: Layout, report: TeardownReport) -> None:
    for top in host.cgroup_dirs(layout.cgroup_parent):
        dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for d in [*dirs, top]:
            for attempt in range(20):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if attempt == 19:
                        report.errors.append(f"rmdir {d}: {exc}")
                    time.sleep(0.05)
        if not top.exists():
            report.removed_cgroups.append(str(top))


def report_json(report: TeardownReport) -> str:
    data = {k: v for k, v in report.__dict__.items()}
    data["ok"] = report.ok
    return json.dumps(data, indent=2)
