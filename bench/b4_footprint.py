"""B4 footprint: the agent's memory, idle and under the B1 load, and its start-up time.

Memory is the sum over the gunicorn master and its worker of VmRSS (``/proc/PID/status``)
and of PSS (``/proc/PID/smaps_rollup``: shared pages split between the processes).
Baselines measured in the same run: a bare ``python -c 'import flask'`` process, and a
minimal Flask app under gunicorn started like the agent (one gthread worker, 4 threads,
TLS; ``bench/hello_app.py``).

Start-up is ``Popen`` to the first ``200`` on ``/healthz`` over TLS, the agent and the
hello app started alternately ``--runs`` times (medians). Then one agent serves the B1
load (every page of the subvolumes at limit 500 and 5000, and the findings, on the B1
lab: ``--subvolumes``, ``--volumes``) ``--load-runs`` times while its memory is sampled
every 25 ms. Target: under 80 MB idle (RSS sum).

    .venv/bin/python -m bench.b4_footprint [--subvolumes 10000] [--volumes 500] [--runs 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.b1_scan import all_pages, build, fs_uuid_of
from bench.common import (
    REPO,
    Memory,
    Results,
    Table,
    api_client,
    command_line,
    log,
    median,
    memory,
    other_fs_vanished,
    own_lab,
    ratio,
    secs,
    spawn_agent,
    status_kb,
    stop,
    verdict,
    wait_healthz,
)
from lab.agentproc import Pki, free_port

TARGET_MB = 80.0
SETTLE = 1.0  # seconds between the first 200 and the idle reading


def start_hello(workdir: Path) -> tuple[subprocess.Popen[bytes], float]:
    pki = Pki(workdir / "pki")
    port = free_port()
    cmd = [
        sys.executable, "-m", "gunicorn",
        "--certfile", str(pki.server_cert), "--keyfile", str(pki.server_key),
        "--worker-class", "gthread", "--workers", "1", "--threads", "4",
        "--bind", f"127.0.0.1:{port}", "bench.hello_app:app",
    ]  # fmt: skip
    with (workdir / "hello.log").open("ab") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )
    try:
        seconds = wait_healthz(proc, f"https://127.0.0.1:{port}", pki.ca_pem, t0)
    except RuntimeError:
        stop(proc)
        raise
    return proc, seconds


def bare_flask() -> Memory:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, flask; print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        proc.stdout.readline()
        return memory(proc.pid)
    finally:
        proc.stdin.close()
        proc.wait(10)


class Sampler:
    """The peak of ``memory(pid)`` sums, sampled every ``period`` seconds."""

    def __init__(self, pid: int, period: float = 0.025) -> None:
        self.pid, self.period = pid, period
        self.peak_rss = self.peak_pss = self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                m = memory(self.pid)
            except (OSError, KeyError):
                continue
            self.peak_rss = max(self.peak_rss, m.rss_kb)
            self.peak_pss = max(self.peak_pss, m.pss_kb)
            self.samples += 1
            self._stop.wait(self.period)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def mb(kb: float) -> str:
    return f"{kb / 1024:.1f} MB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subvolumes", type=int, default=10_000)
    p.add_argument("--volumes", type=int, default=500)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--load-runs", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    shown = [
        "--subvolumes", str(args.subvolumes), "--volumes", str(args.volumes),
        "--runs", str(args.runs), "--load-runs", str(args.load_runs),
    ]  # fmt: skip
    res = Results(name="b4", command=command_line("bench.b4_footprint", shown), config={})
    startup: dict[str, list[float]] = {"hello": [], "agent": []}
    idle: dict[str, list[Memory]] = {"hello": [], "agent": [], "flask": []}
    with own_lab() as lab, tempfile.TemporaryDirectory(prefix="nas-janitor-bench-b4-") as tmp:
        work = Path(tmp)
        ds = build(lab, subvolumes=args.subvolumes, volumes=args.volumes, orphan_share=0.05)
        for r in range(args.runs):
            idle["flask"].append(bare_flask())
            order = ("hello", "agent") if r % 2 == 0 else ("agent", "hello")
            for which in order:
                if which == "hello":
                    proc, seconds = start_hello(work / f"hello-{r}")
                else:
                    started = spawn_agent(work / f"agent-{r}", docker_host=lab.docker_host)
                    proc, seconds = started.agent.proc, started.startup_seconds
                try:
                    time.sleep(SETTLE)
                    idle[which].append(memory(proc.pid))
                finally:
                    stop(proc)
                startup[which].append(seconds)
            log(f"start-up round {r}: hello {startup['hello'][-1]:.2f} s, "
                f"agent {startup['agent'][-1]:.2f} s")  # fmt: skip
        retried = 0
        started = spawn_agent(work / "agent-load", docker_host=lab.docker_host)
        agent = started.agent
        try:
            time.sleep(SETTLE)
            before = memory(agent.proc.pid)
            with api_client(agent) as client, Sampler(agent.proc.pid) as sampler:
                uuid, _ = fs_uuid_of(client, lab)
                done = 0
                while done < args.load_runs:
                    try:
                        all_pages(client, uuid, None)
                        all_pages(client, uuid, 5000)
                        client.get("/v1/findings").raise_for_status()
                    except httpx.HTTPStatusError as exc:
                        if not other_fs_vanished(exc, lab) or retried >= 3:
                            raise
                        retried += 1
                        continue
                    done += 1
            time.sleep(SETTLE)
            after = memory(agent.proc.pid)
            after_each = {pid: status_kb(pid, "VmRSS") for pid in after.pids}
        finally:
            stop(agent.proc)

    def med(which: str, attr: str) -> float:
        return median([getattr(m, attr) for m in idle[which]])

    hello_rss, hello_pss = med("hello", "rss_kb"), med("hello", "pss_kb")
    agent_rss, agent_pss = med("agent", "rss_kb"), med("agent", "pss_kb")
    res.config = {
        "subvolumes": ds.subvolumes,
        "volumes": ds.volumes,
        "start-up runs": args.runs,
        "load rounds": args.load_runs,
        "memory samples under load": sampler.samples,
        "load rounds repeated (another lab unmounted mid-scan)": retried,
    }
    mem = Table(["process", "RSS (sum)", "PSS (sum)", "RSS ratio to hello app", "target"])
    mem.rows.append(
        [
            "`python -c 'import flask'`",
            mb(med("flask", "rss_kb")),
            mb(med("flask", "pss_kb")),
            ratio(med("flask", "rss_kb") / hello_rss),
            "-",
        ]
    )
    mem.rows.append(["hello app under gunicorn, idle", mb(hello_rss), mb(hello_pss), "1.00x", "-"])
    mem.rows.append(
        [
            "agent, idle after start-up (median)",
            mb(agent_rss),
            mb(agent_pss),
            ratio(agent_rss / hello_rss),
            f"< 80 MB: {verdict(agent_rss / 1024 < TARGET_MB)}",
        ]
    )
    mem.rows.append(
        [
            "agent, peak during the B1 load (sampled)",
            mb(sampler.peak_rss),
            mb(sampler.peak_pss),
            ratio(sampler.peak_rss / hello_rss),
            "reported",
        ]
    )
    mem.rows.append(
        [
            "agent, VmHWM after the B1 load",
            mb(after.hwm_kb),
            "-",
            ratio(after.hwm_kb / hello_rss),
            "reported",
        ]
    )
    mem.rows.append(
        [
            "agent, idle after the B1 load",
            mb(after.rss_kb),
            mb(after.pss_kb),
            ratio(after.rss_kb / hello_rss),
            f"< 80 MB: {verdict(after.rss_kb / 1024 < TARGET_MB)}",
        ]
    )
    res.tables.append(mem)
    up = Table(["start-up: Popen to first 200 on /healthz", "median", "ratio to hello app"])
    hs, ags = median(startup["hello"]), median(startup["agent"])
    up.rows.append(["hello app under gunicorn", secs(hs), "1.00x"])
    up.rows.append(["agent (`janitor-agent serve`)", secs(ags), ratio(ags / hs)])
    res.tables.append(up)
    res.notes.append(
        f"the load agent before the load: RSS {mb(before.rss_kb)}, PSS {mb(before.pss_kb)} "
        f"(pids {', '.join(map(str, before.pids))})"
    )
    master, *workers = after.pids
    res.notes.append(
        f"idle after the load, RSS of each process: master (pid {master}) "
        f"{mb(after_each[master])}, "
        + ", ".join(f"worker (pid {w}) {mb(after_each[w])}" for w in workers)
    )
    res.raw = {
        "startup": startup,
        "idle": {k: [m.__dict__ for m in v] for k, v in idle.items()},
        "before_load": before.__dict__,
        "after_load": after.__dict__,
        "after_load_rss_kb_by_pid": after_each,
        "peak": {"rss_kb": sampler.peak_rss, "pss_kb": sampler.peak_pss},
    }
    res.emit(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
