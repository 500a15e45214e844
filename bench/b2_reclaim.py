"""B2 reclaim: removing a leaked dind volume of N files with the agent, against ``rm -rf``
of an identical tree of plain folders, for each N of ``--files`` (a scale series), with
the page cache dropped before each side (``sync; echo 3 > /proc/sys/vm/drop_caches``: a
leak is found days after it was written), and once more with the cache warm, and on a
filesystem that also holds ``--others`` other subvolumes.

For each of ``--runs`` rounds (``--big-runs`` from a million files on), the lab gets a
fresh leaked docker-in-docker volume
(``lab.seed_dind_volume(files_per_subvolume=...)``: the inner daemon's layer subvolumes,
one read-only, a read-only subvolume with a child, ``--files`` small files spread over
them) and ``cp -a --reflink=never`` of its ``_data`` onto the same filesystem: the same
files in plain folders, which ``rm -rf`` can remove on this kernel. Then, the order
alternating between rounds, after a ``btrfs filesystem sync`` (and, cold, dropping the
caches) each:

- ``rm -rf COPY``, then ``btrfs filesystem sync`` (the space is free when it returns);
- ``DELETE /v1/volumes/{name}?dry_run=false`` on the real agent under gunicorn over TLS,
  then ``btrfs filesystem sync`` + ``btrfs subvolume sync`` (the kernel's cleaner frees a
  deleted subvolume's space in the background; the sync waits for it).

Targets: with cold caches the DELETE's time stays flat while ``rm -rf``'s grows with N,
and the caller waits at least 50x less at 100,000 files, also with the other
subvolumes (ratio of medians). The time until the space is really free is reported.

    .venv/bin/python -m bench.b2_reclaim [--files 10000,100000,1000000] [--runs 3]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.common import (
    Results,
    Table,
    api_client,
    command_line,
    fs_sync,
    log,
    make_subvolumes,
    median,
    other_fs_vanished,
    own_lab,
    ratio,
    secs,
    spawn_agent,
    stop,
    used_bytes,
    verdict,
)
from lab import Lab, is_subvolume

TARGET = 50.0
TARGET_FILES = 100_000
CONTAINERS = 2  # inner containers: 2 layers each, plus 1 image layer, ro-parent and child
NESTED = 2 * CONTAINERS + 1 + 2


def count_files(root: Path) -> tuple[int, int]:
    """(files, folders that are subvolumes) under root, not following links."""
    files = subvols = 0
    for dirpath, dirnames, filenames in os.walk(root):
        files += len(filenames)
        subvols += sum(1 for d in dirnames if is_subvolume(Path(dirpath) / d))
    return files, subvols


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def prepare(lab: Lab, files: int, i: int) -> tuple[str, Path, int, int]:
    per = math.ceil(files / NESTED)
    t0 = time.monotonic()
    dind = lab.seed_dind_volume(containers=CONTAINERS, files_per_subvolume=per)
    copy = lab.mnt / f"bench-copy-{i}"
    subprocess.run(
        ["cp", "-a", "--reflink=never", str(dind.mountpoint), str(copy)],
        check=True,
        capture_output=True,
    )
    nfiles, nsub = count_files(dind.mountpoint)
    cfiles, csub = count_files(copy)
    if (cfiles, csub) != (nfiles, 0) or is_subvolume(copy):
        raise RuntimeError(f"copy differs: {cfiles} files, {csub} subvolumes vs {nfiles}")
    log(
        f"round {i}: volume {dind.volume[:12]} holds {nfiles} files in {nsub} nested "
        f"subvolumes; plain copy made ({time.monotonic() - t0:.1f} s)"
    )
    return dind.volume, copy, nfiles, nsub


def drop_caches() -> None:
    """Write back, then drop the page cache, dentries and inodes (root only)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@dataclass
class Series:
    """The times of one configuration: files, caches, other subvolumes."""

    files: int
    cold: bool
    others: int
    t: dict[str, list[float]] = field(
        default_factory=lambda: {k: [] for k in ("rm", "rm_free", "del", "del_sync", "del_free")}
    )
    freed: dict[str, list[int]] = field(default_factory=lambda: {"rm": [], "del": []})
    shape: tuple[int, int] = (0, 0)

    @property
    def name(self) -> str:
        extra = f", {self.others:,} other subvolumes" if self.others else ""
        return f"{self.files:,} files, {'cold' if self.cold else 'warm'} cache{extra}"


def run_series(
    lab: Lab, client: httpx.Client, series: Series, runs: int, retried: list[str]
) -> None:
    rounds = [prepare(lab, series.files, i) for i in range(runs)]
    for i, (volume, copy, nfiles, nsub) in enumerate(rounds):
        series.shape = (nfiles, nsub)

        def settle() -> None:
            fs_sync(lab.mnt)
            if series.cold:
                drop_caches()

        def by_rm(copy: Path = copy, t: dict[str, list[float]] = series.t) -> None:
            freed = series.freed
            settle()
            before = used_bytes(lab.mnt)
            dt = timed(["rm", "-rf", str(copy)])
            ds = timed(["btrfs", "filesystem", "sync", str(lab.mnt)])
            t["rm"].append(dt)
            t["rm_free"].append(dt + ds)
            freed["rm"].append(before - used_bytes(lab.mnt))

        def by_agent(volume: str = volume, t: dict[str, list[float]] = series.t) -> None:
            freed = series.freed
            settle()
            before = used_bytes(lab.mnt)
            for _ in range(3):
                t0 = time.perf_counter()
                r = client.delete(f"/v1/volumes/{volume}", params={"dry_run": "false"})
                dt = time.perf_counter() - t0
                try:
                    r.raise_for_status()
                    break
                except httpx.HTTPStatusError as exc:
                    if not other_fs_vanished(exc, lab):
                        raise
                    log(f"DELETE refused by a vanished filesystem: {r.text}")
                    retried.append(volume)
            else:
                raise RuntimeError("DELETE failed 3 times")
            ds = timed(["btrfs", "filesystem", "sync", str(lab.mnt)])
            ds += timed(["btrfs", "subvolume", "sync", str(lab.mnt)])
            t["del"].append(dt)
            t["del_sync"].append(ds)
            t["del_free"].append(dt + ds)
            freed["del"].append(before - used_bytes(lab.mnt))
            if not r.json()["deleted"]:
                raise RuntimeError(f"nothing deleted: {r.text}")

        order = (by_rm, by_agent) if i % 2 == 0 else (by_agent, by_rm)
        for step in order:
            step()
        t = series.t
        log(f"{series.name}, round {i}: rm -rf {t['rm'][-1]:.3f} s, DELETE {t['del'][-1]:.3f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", default="10000,100000,1000000", help="comma-separated")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--big-runs", type=int, default=1, help="rounds from 1,000,000 files on")
    p.add_argument("--others", type=int, default=3000, help="0: no such row")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.files.split(",") if x]
    shown = ["--files", args.files, "--runs", str(args.runs), "--big-runs", str(args.big_runs)]
    shown += ["--others", str(args.others)]
    res = Results(name="b2", command=command_line("bench.b2_reclaim", shown), config={})
    mid = TARGET_FILES if TARGET_FILES in sizes else sizes[len(sizes) // 2]
    plan = [Series(n, True, 0) for n in sizes] + [Series(mid, False, 0)]
    if args.others:
        plan.append(Series(mid, True, args.others))
    retried: list[str] = []
    with own_lab(seed=False) as lab:
        with tempfile.TemporaryDirectory(prefix="nas-janitor-bench-agent-") as work:
            agent = spawn_agent(Path(work), docker_host=lab.docker_host).agent
            try:
                with api_client(agent) as client:
                    client.get("/healthz").raise_for_status()
                    for series in plan:
                        if series.others:
                            have = len(list((lab.mnt / "others").glob("s*")))
                            made = make_subvolumes(
                                lab.mnt / "others" / f"s{i:05d}" for i in range(have, series.others)
                            )
                            log(f"{made} other subvolumes made on the lab's filesystem")
                        runs = args.big_runs if series.files >= 1_000_000 else args.runs
                        run_series(lab, client, series, runs, retried)
            finally:
                stop(agent.proc)
    res.config = {
        "nested subvolumes per volume": plan[0].shape[1],
        "runs": f"{args.runs} ({args.big_runs} from 1,000,000 files on)",
        "caches": "dropped before each side (cold) unless said (warm)",
    }
    table = Table(
        [
            "volume",
            "rm -rf, caller waits",
            "agent DELETE, caller waits",
            "speed-up",
            "rm -rf, until free",
            "DELETE, until free",
            "speed-up",
            "target",
        ]
    )
    for s in plan:
        rm, dl = median(s.t["rm"]), median(s.t["del"])
        rm_free, dl_free = median(s.t["rm_free"]), median(s.t["del_free"])
        is_target = s.cold and s.files == TARGET_FILES
        table.rows.append(
            [
                f"{s.shape[0]:,} files ({s.name.split(' files, ', 1)[1]})",
                secs(rm),
                secs(dl),
                ratio(rm / dl),
                secs(rm_free),
                secs(dl_free),
                ratio(rm_free / dl_free),
                f">= {TARGET:.0f}x: {verdict(rm / dl >= TARGET)}" if is_target else "reported",
            ]
        )
    res.tables.append(table)
    cold = [s for s in plan if s.cold and not s.others]
    if len(cold) > 1:
        first, last = cold[0], cold[-1]
        growth_rm = median(last.t["rm"]) / median(first.t["rm"])
        growth_del = median(last.t["del"]) / median(first.t["del"])
        res.notes.append(
            f"from {first.files:,} to {last.files:,} files (cold): `rm -rf` took "
            f"{growth_rm:.1f}x longer, the DELETE {growth_del:.2f}x"
        )
    res.notes.append(
        "until free: `rm -rf` + `btrfs filesystem sync`; the DELETE + `btrfs filesystem "
        "sync` + `btrfs subvolume sync` (the kernel's cleaner frees a deleted subvolume "
        "in the background)"
    )
    res.notes.append(
        "the agent's DELETE decides on a fresh snapshot scoped to the volume (safety "
        "checks), appends to the audit log, destroys the nested subvolumes by ioctl and "
        "removes the volume through Docker"
    )
    res.raw = {
        "series": [
            {"name": s.name, "files": s.shape[0], "times": s.t, "freed": s.freed} for s in plan
        ],
        "retried": retried,
    }
    if retried:
        res.notes.append(
            f"{len(retried)} DELETE(s) answered 502 because another lab's filesystem was "
            "unmounted during the agent's scan, and were sent again"
        )
    res.emit(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
