"""B5 enumeration: the subvolume listing by tree-search ioctl, against the command.

The lab (not seeded) gets B1's dataset: ``--subvolumes`` subvolumes in all (dind-like
volumes' nested layers, one in ten inside another, one read-only per volume, 5% orphan
layers) and ``--volumes`` Docker volumes; then quotas on. Then, interleaved, ``--runs``
times each, in this process:

- floor: ``btrfs subvolume list -p -u -q MNT``, the process alone (its text unread);
- ioctl: ``BtrfsTool.list_subvolumes(MNT)``: records with ids, parents, generations,
  uuids, read-only flags, creation and change times, and paths, ready to use;
- text: what the agent did before (two processes, both parsed): ``btrfs subvolume list
  -a -p -u -q MNT`` and ``btrfs subvolume list -r MNT``;
- qgroups: ``BtrfsTool.qgroups(MNT)`` against ``btrfs qgroup show --raw MNT`` (its text
  unread).

Then the memory of one listing (tracemalloc: the peak while listing, and what the
records keep). Target: the ioctl listing at most the floor (ratio of medians <= 1).

    .venv/bin/python -m bench.b5_enumeration [--subvolumes 10000] [--volumes 500] [--runs 15]
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from agent.host.btrfs import BtrfsTool
from bench.b1_scan import build
from bench.common import (
    Results,
    Table,
    command_line,
    fs_sync,
    interleaved,
    log,
    median,
    own_lab,
    ratio,
    secs,
    verdict,
)
from tests.agent.host.textformats import parse_readonly_list, parse_subvolume_list

TARGET = 1.0


def command(*args: str) -> Callable[[], object]:
    def run() -> object:
        return subprocess.run(["btrfs", *args], check=True, capture_output=True).stdout

    return run


def text_listing(mnt: str) -> Callable[[], object]:
    """The agent's listing before the ioctls: two processes, their text parsed."""

    def run() -> object:
        out = subprocess.run(
            ["btrfs", "subvolume", "list", "-a", "-p", "-u", "-q", mnt],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        ro = subprocess.run(
            ["btrfs", "subvolume", "list", "-r", mnt], check=True, capture_output=True, text=True
        ).stdout
        return parse_subvolume_list(out), parse_readonly_list(ro)

    return run


def memory(tool: BtrfsTool, mnt: str) -> tuple[int, int, int]:
    """(peak bytes while listing, bytes the records keep, records)."""
    gc.collect()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        records = tool.list_subvolumes(mnt)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base, kept - base, len(records)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subvolumes", type=int, default=10_000)
    p.add_argument("--volumes", type=int, default=500)
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    shown = [
        "--subvolumes", str(args.subvolumes), "--volumes", str(args.volumes),
        "--runs", str(args.runs),
    ]  # fmt: skip
    res = Results(name="b5", command=command_line("bench.b5_enumeration", shown), config={})
    with own_lab(seed=False) as lab:
        ds = build(lab, subvolumes=args.subvolumes, volumes=args.volumes, orphan_share=0.05)
        mnt = str(lab.mnt)
        subprocess.run(["btrfs", "quota", "enable", mnt], check=True, capture_output=True)
        subprocess.run(["btrfs", "quota", "rescan", "-w", mnt], check=True, capture_output=True)
        fs_sync(lab.mnt)
        tool = BtrfsTool()
        listed = tool.list_subvolumes(mnt)
        groups = tool.qgroups(mnt)
        assert groups is not None
        assert len(listed) == ds.subvolumes, (len(listed), ds.subvolumes)
        assert all(r.path is not None for r in listed)
        t0 = time.monotonic()
        times = interleaved(
            {
                "floor": command("subvolume", "list", "-p", "-u", "-q", mnt),
                "ioctl": lambda: tool.list_subvolumes(mnt),
                "text": text_listing(mnt),
                "qgroup show": command("qgroup", "show", "--raw", mnt),
                "qgroups": lambda: tool.qgroups(mnt),
            },
            runs=args.runs,
        )
        log(f"timed in {time.monotonic() - t0:.1f} s")
        peak, kept, n = memory(tool, mnt)

    med = {k: median(v) for k, v in times.items()}
    floor = med["floor"]
    res.config = {
        "subvolumes": ds.subvolumes,
        "volumes": ds.volumes,
        "dind-like volumes": ds.dind_volumes,
        "read-only": sum(r.read_only for r in listed),
        "qgroups": len(groups),
        "runs": args.runs,
    }
    t = Table(["what", "median", "min", "ratio to the floor", "target", "verdict"])
    for name, label in (
        ("floor", "`btrfs subvolume list -p -u -q` (process only)"),
        ("ioctl", "`BtrfsTool.list_subvolumes` (tree search, records)"),
        ("text", "before: `list -a -p -u -q` + `list -r`, parsed"),
    ):
        r = med[name] / floor
        target = f"<= {TARGET:g}x" if name == "ioctl" else ""
        ok = verdict(r <= TARGET) if name == "ioctl" else ""
        t.rows.append([label, secs(med[name]), secs(min(times[name])), ratio(r), target, ok])
    q = Table(["what", "median", "min", "ratio to `qgroup show --raw`"])
    for name, label in (
        ("qgroup show", "`btrfs qgroup show --raw` (process only)"),
        ("qgroups", "`BtrfsTool.qgroups` (tree search)"),
    ):
        q.rows.append(
            [label, secs(med[name]), secs(min(times[name])), ratio(med[name] / med["qgroup show"])]
        )
    m = Table(["one listing", "bytes", "per subvolume"])
    m.rows.append(["peak while listing (tracemalloc)", f"{peak:,}", f"{peak / n:,.0f}"])
    m.rows.append(["kept by the records", f"{kept:,}", f"{kept / n:,.0f}"])
    res.tables = [t, q, m]
    res.notes = [
        "Same process, same filesystem, runs interleaved (the order rotated each round).",
        "The floor prints text nobody reads; the ioctl listing returns parsed records "
        "(and needs no process, nor a second one for the read-only flags).",
    ]
    res.raw = {"seconds": times, "peak_bytes": peak, "kept_bytes": kept}
    res.emit(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
