"""B7 holders: what one read of what processes hold open costs, against the floor.

Each plan, each action's recheck and each step of the executor read, besides the mount
tables, what every process and the kernel hold open (``agent.host.holders``), and place
it (``agent.domain.holders``). Interleaved, ``--runs`` times each, on this machine's own
``/proc``:

- floor: the mount tables every such check reads already (the host's, and one per
  other mount namespace: ``read_host_mounts`` + ``read_namespace_mounts``);
- ``read_holders()``;
- ``read_holders()`` and the placement (``HeldIndex.of``);

first with the processes the machine has, then with ``--processes`` more started here
(``sleep``, each in a folder of its own with ``--fds`` files there open), ended by pid
afterwards. Reported, no target: the read grows with the processes and their open files,
and stops at
``MAX_HELD`` (then every delete is refused).

    .venv/bin/python -m bench.b7_holders [--runs 15] [--processes 500] [--fds 20]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from agent.domain.holders import HeldIndex
from agent.host.holders import MAX_HELD, read_holders
from agent.host.mounttables import read_host_mounts, read_namespace_mounts
from bench.common import Results, Table, command_line, interleaved, log, median, ratio, secs
from lab.agentproc import pids_root_may_not_read


def _processes() -> int:
    return sum(1 for p in os.listdir("/proc") if p.isdigit())


def _measure(runs: int, allowed: list[int]) -> tuple[dict[str, list[float]], int]:
    held = read_holders(allowed_unreadable=allowed)
    count = sum(len(t.held) for t in held.tables) + len(held.everywhere)

    def floor() -> None:
        read_host_mounts("/proc")
        read_namespace_mounts("/proc")

    def read() -> None:
        read_holders(allowed_unreadable=allowed)

    def placed() -> None:
        HeldIndex.of(read_holders(allowed_unreadable=allowed))

    times = interleaved(
        {
            "floor": floor,
            "`read_holders()`": read,
            "`read_holders()` + placement": placed,
        },
        runs=runs,
    )
    return times, count


def _start(n: int, fds: int, folder: Path) -> list[subprocess.Popen[bytes]]:
    """``n`` sleeping processes, each in a folder of its own holding ``fds`` files open."""
    procs = []
    for k in range(n):
        own = folder / f"p{k}"
        own.mkdir()
        for i in range(fds):
            (own / f"f{i}").write_bytes(b"x")
        opens = " ".join(f"{3 + i}<f{i}" for i in range(fds))
        # bash: dash takes one-digit descriptors only
        procs.append(subprocess.Popen(["bash", "-c", f"exec {opens} sleep 600"], cwd=own))
    return procs


def _ready(procs: list[subprocess.Popen[bytes]], fds: int) -> None:
    """Each process runs ``sleep`` with its files open (or the start failed)."""
    for proc in procs:
        while True:
            assert proc.poll() is None, "a holding process ended"
            try:
                if len(os.listdir(f"/proc/{proc.pid}/fd")) >= 3 + fds:
                    if os.readlink(f"/proc/{proc.pid}/exe").endswith("/sleep"):
                        break
            except OSError:
                pass
            time.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--processes", type=int, default=500)
    p.add_argument("--fds", type=int, default=20)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    shown = ["--runs", str(args.runs), "--processes", str(args.processes), "--fds", str(args.fds)]
    res = Results(
        name="b7",
        command=command_line("bench.b7_holders", shown),
        config={"runs": args.runs, "MAX_HELD": f"{MAX_HELD:,}"},
    )
    allowed = pids_root_may_not_read()
    table = Table(["processes", "held paths", "what", "median", "ratio to floor"])
    raw: dict[str, object] = {}
    for label, extra in (("as found", 0), ("more", args.processes)):
        with tempfile.TemporaryDirectory(prefix="nas-janitor-bench-holders-") as work:
            procs = _start(extra, args.fds, Path(work)) if extra else []
            try:
                _ready(procs, args.fds)
                n = _processes()
                log(f"{label}: {n} processes")
                times, count = _measure(args.runs, allowed)
            finally:
                for proc in procs:
                    proc.kill()
                for proc in procs:
                    proc.wait()
        base = median(times["floor"])
        for what, xs in times.items():
            table.rows.append(
                [f"{n:,}", f"{count:,}", what, secs(median(xs)), ratio(median(xs) / base)]
            )
        raw[label] = {"processes": n, "held": count, "times": times}
    res.tables.append(table)
    res.notes.append(
        "the floor is what each check read before (the mount tables of every namespace); "
        "the held paths are counted once per mount namespace"
        + (f"; pid {allowed[0]} cannot be read here and is passed over" if allowed else "")
    )
    res.raw = raw
    res.emit(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
