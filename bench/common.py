"""What the benchmarks share: a lab of their own, subvolumes made in bulk, the real agent
under gunicorn with fine-grained start-up timing, interleaved timing with medians, process
memory, and the results (a Markdown table on stdout, JSON for ``bench.report``)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from lab import Lab, install_cleanup_handlers
from lab.agentproc import AgentProcess, launch_agent

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------- the lab


@contextlib.contextmanager
def own_lab(*, seed: bool = True, prefix: str = "nas-janitor-bench-") -> Iterator[Lab]:
    """A lab in a fresh temporary folder, torn down on the way out whatever happens."""
    install_cleanup_handlers()
    root = Path(tempfile.mkdtemp(prefix=prefix))
    started = time.monotonic()
    lab = Lab.up(root, seed=seed)  # tears down what it built when it fails
    log(f"lab up in {time.monotonic() - started:.1f} s at {root}")
    try:
        yield lab
    finally:
        report = lab.down(check=False)
        if report.errors:
            log(f"lab teardown problems: {'; '.join(report.errors)}")


# struct btrfs_ioctl_vol_args {__s64 fd; char name[4088];}: _IOW(0x94, 14, 4096 bytes)
_BTRFS_IOC_SUBVOL_CREATE = (1 << 30) | (4096 << 16) | (0x94 << 8) | 14


def make_subvolumes(paths: Iterable[Path]) -> int:
    """Create an empty subvolume at each path, parents first when nested, in this
    process: btrfs-progs 6.2's ``subvolume create`` takes exactly one path, and a process
    per subvolume would take minutes for 10,000. Missing plain folders on the way are
    made. Returns how many were made."""
    n = 0
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        name = os.fsencode(path.name)
        if not 0 < len(name) <= 255 or b"/" in name:
            raise ValueError(f"bad subvolume name {path.name!r}")
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            args = bytearray(4096)
            args[8 : 8 + len(name)] = name
            fcntl.ioctl(fd, _BTRFS_IOC_SUBVOL_CREATE, args)
        finally:
            os.close(fd)
        n += 1
    return n


def fs_sync(mnt: Path) -> None:
    subprocess.run(["btrfs", "filesystem", "sync", str(mnt)], check=True, capture_output=True)


def used_bytes(mnt: Path) -> int:
    st = os.statvfs(mnt)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


# ---------------------------------------------------------------------------- the agent


@dataclass
class Started:
    agent: AgentProcess
    startup_seconds: float  # Popen to the first 200 on /healthz


def spawn_agent(
    workdir: Path,
    *,
    docker_host: str,
    wait: float = 60.0,
    poll: float = 0.005,
    extra: dict[str, Any] | None = None,
) -> Started:
    """``janitor-agent serve`` under gunicorn over TLS on loopback (``lab.agentproc``'s
    layout and config, plus the settings in ``extra``), timed from ``Popen`` to its
    first ``200`` on ``/healthz``."""
    agent = launch_agent(workdir, docker_host=docker_host, extra=extra)
    try:
        seconds = wait_healthz(
            agent.proc, agent.url, agent.pki.ca_pem, agent.started_at, wait=wait, poll=poll
        )
    except RuntimeError as exc:
        agent.kill()
        raise RuntimeError(f"{exc}:\n{agent.log()}") from None
    return Started(agent, seconds)


def wait_healthz(
    proc: subprocess.Popen[bytes],
    url: str,
    cafile: Path,
    t0: float,
    *,
    wait: float = 60.0,
    poll: float = 0.005,
) -> float:
    """Seconds from ``t0`` (a ``perf_counter`` reading taken before ``Popen``) to the
    first ``200`` on ``url/healthz``."""
    deadline = t0 + wait
    ctx = ssl.create_default_context(cafile=str(cafile))
    with httpx.Client(base_url=url, verify=ctx, timeout=5.0) as probe:
        while time.perf_counter() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{url}: the server exited with {proc.returncode}")
            try:
                if probe.get("/healthz").status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(poll)
    raise RuntimeError(f"{url} did not answer /healthz within {wait} s")


def api_client(agent: AgentProcess, *, timeout: float = 300.0) -> httpx.Client:
    """One keep-alive client with the agent's token, trusting its CA."""
    return httpx.Client(
        base_url=agent.url,
        headers={"Authorization": f"Bearer {agent.token}"},
        verify=agent.ssl_context(cert=False),
        timeout=timeout,
    )


def stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Stop a process this benchmark started (and its group), by pid."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def other_fs_vanished(exc: Exception, lab: Lab) -> bool:
    """The agent's answer was a 502 because a btrfs command failed on a filesystem
    other than the lab's: on a shared machine, another lab unmounted during the scan."""
    if not isinstance(exc, httpx.HTTPStatusError) or exc.response.status_code != 502:
        return False
    try:
        body = exc.response.json()
    except ValueError:
        return False
    detail = str(body.get("detail", ""))
    return body.get("code") == "btrfs_failed" and str(lab.root) not in detail


# ---------------------------------------------------------------------------- memory


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                out.extend(int(x) for x in text.split())
    return out


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def pss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise KeyError("Pss")


@dataclass(frozen=True)
class Memory:
    pids: tuple[int, ...]
    rss_kb: int  # sum of VmRSS
    pss_kb: int  # sum of Pss (shared pages counted once across the processes)
    hwm_kb: int  # sum of VmHWM (each process's peak RSS)

    @property
    def rss_mb(self) -> float:
        return self.rss_kb / 1024

    @property
    def pss_mb(self) -> float:
        return self.pss_kb / 1024

    @property
    def hwm_mb(self) -> float:
        return self.hwm_kb / 1024


def memory(root_pid: int) -> Memory:
    """The process and its children (gunicorn: the master and its worker)."""
    pids = (root_pid, *children(root_pid))
    return Memory(
        pids=pids,
        rss_kb=sum(status_kb(p, "VmRSS") for p in pids),
        pss_kb=sum(pss_kb(p) for p in pids),
        hwm_kb=sum(status_kb(p, "VmHWM") for p in pids),
    )


# ---------------------------------------------------------------------------- timing


def interleaved(
    cases: dict[str, Callable[[], object]],
    *,
    runs: int,
    warmup: int = 1,
    transient: Callable[[Exception], bool] = lambda exc: False,
    retries: dict[str, int] | None = None,
) -> dict[str, list[float]]:
    """Time every case ``runs`` times, one of each per round, the order rotated each
    round so that no case always runs first or right after another. ``warmup`` rounds
    run first and are not recorded. A run that fails with an error ``transient`` accepts
    is run again (up to 3 times; its time is not kept) and counted in ``retries``."""
    names = list(cases)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + runs):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            for attempt in range(4):
                t0 = time.perf_counter()
                try:
                    cases[name]()
                except Exception as exc:
                    if attempt == 3 or not transient(exc):
                        raise
                    log(f"{name}: transient failure, run again: {exc}")
                    if retries is not None:
                        retries[name] = retries.get(name, 0) + 1
                    continue
                dt = time.perf_counter() - t0
                break
            if r >= warmup:
                times[name].append(dt)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- results


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.headers) + " |"]
        lines.append("| " + " | ".join("---" for _ in self.headers) + " |")
        lines.extend("| " + " | ".join(r) + " |" for r in self.rows)
        return "\n".join(lines)


@dataclass
class Results:
    name: str  # b1, b2, ...
    command: str
    config: dict[str, Any]
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def markdown(self) -> str:
        parts = [f"Command: `{self.command}`", ""]
        parts.append(
            "Configuration: " + ", ".join(f"{k}={v}" for k, v in self.config.items()) + "."
        )
        for t in self.tables:
            parts += ["", t.markdown()]
        if self.notes:
            parts.append("")
            parts.extend(f"- {n}" for n in self.notes)
        return "\n".join(parts)

    def emit(self, json_path: Path | None) -> None:
        print(self.markdown(), flush=True)
        if json_path is not None:
            data = {
                "name": self.name,
                "recorded": recorded(),
                "command": self.command,
                "config": self.config,
                "tables": [{"headers": t.headers, "rows": t.rows} for t in self.tables],
                "notes": self.notes,
                "raw": self.raw,
                "markdown": self.markdown(),
            }
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(data, indent=2) + "\n")


def recorded() -> str:
    """When and where: the line BENCHMARKS.md shows above each result."""
    return (
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.node()} "
        f"(Linux {platform.release()}, {platform.machine()}, {os.cpu_count()} CPUs)"
    )


def secs(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def ratio(x: float) -> str:
    return f"{x:.2f}x" if x < 100 else f"{x:.0f}x"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def command_line(module: str, argv: Sequence[str]) -> str:
    return " ".join([".venv/bin/python", "-m", module, *argv])
