"""B1 scan: listing subvolumes and findings on a big lab, against the floor.

The lab gets ``--subvolumes`` subvolumes in all (most nested in dind-like anonymous
volumes' ``_data/btrfs/subvolumes/``, one in ten of those inside another, one read-only
per volume; ``--orphan-share`` of them orphan layers in ``<data_root>/btrfs/subvolumes/``)
and ``--volumes`` Docker volumes in all (named, some labelled keep, one in five
anonymous). Then, interleaved, ``--runs`` times each:

- floor: ``btrfs subvolume list -p -u -q MNT`` + one ``GET /volumes`` + one
  ``GET /containers/json?all=1`` (Docker SDK low-level API, one client made beforehand);
- ``GET /v1/filesystems/{uuid}/subvolumes``, every page, with the default limit (500)
  and with ``limit=5000``, and its first page alone;
- ``GET /v1/findings``;

each against the real agent under gunicorn over TLS on loopback (one keep-alive client),
configured to keep no scan between requests (``inventory_max_age_seconds: 0``): every
request scans the host, so this measures the cold scan (``bench.b6_kept`` measures the
kept one). Target: each at most 3x the floor (ratio of medians).

    .venv/bin/python -m bench.b1_scan [--subvolumes 10000] [--volumes 500] [--runs 7]
"""

from __future__ import annotations

import argparse
import secrets
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import httpx

from bench.common import (
    Results,
    Table,
    api_client,
    command_line,
    interleaved,
    log,
    make_subvolumes,
    median,
    other_fs_vanished,
    own_lab,
    ratio,
    secs,
    spawn_agent,
    stop,
    verdict,
)
from lab import Lab

TARGET = 3.0


@dataclass(frozen=True)
class Dataset:
    subvolumes: int  # on the lab's filesystem, all of them
    volumes: int  # Docker volumes, all of them
    dind_volumes: int
    orphans: int
    fs_uuid: str | None = None


def count_subvolumes(lab: Lab) -> int:
    out = subprocess.run(
        ["btrfs", "subvolume", "list", str(lab.mnt)], check=True, capture_output=True, text=True
    ).stdout
    return len(out.splitlines())


def build(lab: Lab, *, subvolumes: int, volumes: int, orphan_share: float) -> Dataset:
    """Grow the lab to ``subvolumes`` subvolumes and ``volumes`` volumes in all."""
    t0 = time.monotonic()
    api = docker.APIClient(base_url=lab.docker_host, version="auto")
    try:
        have_sv = count_subvolumes(lab)
        have_vol = len(api.volumes().get("Volumes") or [])
        extra_sv = max(0, subvolumes - have_sv)
        orphans = int(extra_sv * orphan_share)
        nested_total = extra_sv - orphans
        dind = max(1, min(10, volumes // 50, nested_total // 10 or 1))
        # dind-like volumes: anonymous (Docker names them), used by nobody
        dind_names = [api.create_volume()["Name"] for _ in range(dind)]
        plain = max(0, volumes - have_vol - dind)
        for i in range(plain):
            if i % 5 == 4:
                api.create_volume()  # anonymous and dangling
            else:
                labels = {"keep": "true"} if i % 10 == 0 else {"bench": "plain"}
                api.create_volume(name=f"bench-vol-{i:05d}", labels=labels)
        paths: list[Path] = []
        ro: list[Path] = []
        for k, name in enumerate(dind_names):
            share = nested_total // dind + (1 if k < nested_total % dind else 0)
            base = lab.data_root / "volumes" / name / "_data" / "btrfs" / "subvolumes"
            previous: Path | None = None
            for j in range(share):
                if j % 10 == 9 and previous is not None:
                    path = previous / f"nested-{j}"  # a subvolume inside a subvolume
                else:
                    path = base / secrets.token_hex(32)
                    previous = path
                paths.append(path)
                if j == 0:
                    ro.append(path)
        paths.extend(lab.layer_dir / secrets.token_hex(32) for _ in range(orphans))
        made = make_subvolumes(paths)
        for path in ro:
            subprocess.run(
                ["btrfs", "property", "set", str(path), "ro", "true"],
                check=True,
                capture_output=True,
            )
        total_vol = len(api.volumes().get("Volumes") or [])
    finally:
        api.close()
    total_sv = count_subvolumes(lab)
    log(
        f"dataset: {made} subvolumes made ({total_sv} in all), {total_vol} volumes "
        f"({dind} dind-like), {orphans} orphan layers, in {time.monotonic() - t0:.1f} s"
    )
    return Dataset(subvolumes=total_sv, volumes=total_vol, dind_volumes=dind, orphans=orphans)


def fs_uuid_of(client: httpx.Client, lab: Lab) -> tuple[str, int]:
    """The lab filesystem's uuid, and how many btrfs filesystems the agent sees."""
    items = client.get("/v1/filesystems").raise_for_status().json()["items"]
    uuid = next(fs["uuid"] for fs in items if str(lab.mnt) in fs["mountpoints"])
    return uuid, len(items)


def all_pages(client: httpx.Client, uuid: str, limit: int | None) -> int:
    params: dict[str, Any] = {} if limit is None else {"limit": limit}
    n = 0
    while True:
        r = client.get(f"/v1/filesystems/{uuid}/subvolumes", params=params)
        r.raise_for_status()
        body = r.json()
        n += len(body["items"])
        if body["next_cursor"] is None:
            return n
        params["cursor"] = body["next_cursor"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subvolumes", type=int, default=10_000)
    p.add_argument("--volumes", type=int, default=500)
    p.add_argument("--orphan-share", type=float, default=0.05)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    shown = [f"--subvolumes {args.subvolumes}", f"--volumes {args.volumes}", f"--runs {args.runs}"]
    res = Results(
        name="b1",
        command=command_line("bench.b1_scan", " ".join(shown).split()),
        config={},
    )
    retries: dict[str, int] = {}
    with own_lab() as lab:
        ds = build(
            lab, subvolumes=args.subvolumes, volumes=args.volumes, orphan_share=args.orphan_share
        )
        with tempfile.TemporaryDirectory(prefix="nas-janitor-bench-agent-") as work:
            started = spawn_agent(
                Path(work), docker_host=lab.docker_host, extra={"inventory_max_age_seconds": 0}
            )
            agent = started.agent
            api = docker.APIClient(base_url=lab.docker_host, version="auto")
            try:
                with api_client(agent) as client:
                    uuid, nfs = fs_uuid_of(client, lab)
                    expected = all_pages(client, uuid, 5000)
                    findings = client.get("/v1/findings").raise_for_status().json()["items"]
                    first = {"limit": 500}

                    def floor() -> None:
                        subprocess.run(
                            ["btrfs", "subvolume", "list", "-p", "-u", "-q", str(lab.mnt)],
                            check=True,
                            capture_output=True,
                        )
                        api.volumes()
                        api.containers(all=True)

                    def pages_500() -> None:
                        assert all_pages(client, uuid, None) == expected

                    def pages_5000() -> None:
                        assert all_pages(client, uuid, 5000) == expected

                    def page_one() -> None:
                        url = f"/v1/filesystems/{uuid}/subvolumes"
                        client.get(url, params=first).raise_for_status()

                    def get_findings() -> None:
                        client.get("/v1/findings").raise_for_status()

                    cases = {
                        "floor": floor,
                        "subvolumes, all pages, limit 500 (default)": pages_500,
                        "subvolumes, all pages, limit 5000": pages_5000,
                        "subvolumes, first page only, limit 500": page_one,
                        "findings": get_findings,
                    }
                    times = interleaved(
                        cases,
                        runs=args.runs,
                        warmup=args.warmup,
                        transient=lambda exc: other_fs_vanished(exc, lab),
                        retries=retries,
                    )
            except Exception:
                log(f"agent log (tail):\n{agent.log()}")
                raise
            finally:
                api.close()
                stop(agent.proc)
    base = median(times["floor"])
    kinds: dict[str, int] = {}
    for f in findings:
        kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
    res.config = {
        "subvolumes": ds.subvolumes,
        "listed by the agent": expected,
        "volumes": ds.volumes,
        "dind-like volumes": ds.dind_volumes,
        "orphan layers made": ds.orphans,
        "findings": ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())),
        "runs": args.runs,
        "btrfs filesystems the agent saw": nfs,
    }
    table = Table(["what", "median", "ratio to floor", "target", "verdict"])
    for name, ts in times.items():
        m = median(ts)
        if name == "floor":
            table.rows.append([name, secs(m), "1.00x", "-", "-"])
            continue
        r = m / base
        target = "<= 3x" if "first page" not in name else "(diagnostic)"
        v = verdict(r <= TARGET) if "first page" not in name else "-"
        table.rows.append([name, secs(m), ratio(r), target, v])
    res.tables.append(table)
    res.raw = {"times": times, "floor_median": base, "retries": retries}
    if retries:
        res.notes.append(
            "runs repeated because the agent answered 502 when another lab's filesystem "
            "was unmounted during its scan (the whole request fails; see below): "
            + ", ".join(f"{n}: {c}" for n, c in retries.items())
        )
    if nfs > 1:
        res.notes.append(
            f"the agent's snapshot covers every btrfs filesystem it can see ({nfs} here, "
            "other labs on the same machine included); the floor lists the lab's only"
        )
    res.emit(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
