"""B6 kept inventory: ``/metrics`` and ``/v1/findings`` with nothing changed, and load
on ``/v1/findings``, against the floor.

The lab gets B1's dataset at ``--subvolumes`` (3,000 by default) and ``--volumes``. The
real agent runs with its default settings (one kept scan, refreshed when Docker's
events, the btrfs change marks or the mount tables say something changed). Then,
interleaved, ``--runs`` times each, one keep-alive client:

- floor: ``btrfs subvolume list -p -u -q MNT`` + ``GET /volumes`` + ``GET
  /containers/json?all=1`` (as in B1);
- ``GET /metrics`` (scraped with nothing changed);
- ``GET /v1/findings`` again with nothing changed;
- ``GET /v1/findings`` after a change (a subvolume made in the data root's
  ``btrfs/subvolumes/`` between two requests, removed again after): a scan;

then load on ``GET /v1/findings``: ``--clients`` concurrent clients (each its own
keep-alive TLS connection, asyncio + httpx in this process) for ``--seconds``, for each
pair given. Targets: ``/metrics`` at most 0.3x the floor, findings again at most 0.5x;
0 errors under load, p99 at most 3x the floor with 16 clients and 10x with 50.

    .venv/bin/python -m bench.b6_kept [--subvolumes 3000] [--runs 9]
"""

from __future__ import annotations

import argparse
import secrets
import subprocess
import tempfile
import time
from pathlib import Path

import docker

from bench.b1_scan import build
from bench.common import (
    Results,
    Table,
    api_client,
    command_line,
    interleaved,
    log,
    make_subvolumes,
    median,
    own_lab,
    ratio,
    secs,
    spawn_agent,
    stop,
    verdict,
)
from tests.robustness import loadgen

METRICS_TARGET = 0.3
AGAIN_TARGET = 0.5
LOAD_TARGETS = {16: 3.0, 50: 10.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subvolumes", type=int, default=3_000)
    p.add_argument("--volumes", type=int, default=500)
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--load", default="16x10,50x30", help="CLIENTSxSECONDS pairs, comma-separated")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    loads = [tuple(int(x) for x in pair.split("x")) for pair in args.load.split(",") if pair]
    shown = [
        "--subvolumes", str(args.subvolumes), "--volumes", str(args.volumes),
        "--runs", str(args.runs), "--load", args.load,
    ]  # fmt: skip
    res = Results(name="b6", command=command_line("bench.b6_kept", shown), config={})
    load_results: list[tuple[int, int, dict[str, object]]] = []
    with own_lab() as lab:
        ds = build(lab, subvolumes=args.subvolumes, volumes=args.volumes, orphan_share=0.05)
        with tempfile.TemporaryDirectory(prefix="nas-janitor-bench-agent-") as work:
            agent = spawn_agent(Path(work), docker_host=lab.docker_host).agent
            api = docker.APIClient(base_url=lab.docker_host, version="auto")
            try:
                with api_client(agent) as client:
                    count = len(client.get("/v1/findings").raise_for_status().json()["items"])
                    for _ in range(3):  # the first scans have nothing to compare with
                        client.get("/v1/findings").raise_for_status()

                    def floor() -> None:
                        subprocess.run(
                            ["btrfs", "subvolume", "list", "-p", "-u", "-q", str(lab.mnt)],
                            check=True,
                            capture_output=True,
                        )
                        api.volumes()
                        api.containers(all=True)

                    def metrics() -> None:
                        r = client.get("/metrics").raise_for_status()
                        assert b"nas_janitor_scan_ok 1.0" in r.content

                    def findings() -> None:
                        client.get("/v1/findings").raise_for_status()

                    times = interleaved(
                        {
                            "floor": floor,
                            "`GET /metrics`, nothing changed": metrics,
                            "`GET /v1/findings` again, nothing changed": findings,
                        },
                        runs=args.runs,
                    )
                    # after a change: timed alone (it makes and removes a subvolume)
                    changed: list[float] = []
                    for _ in range(max(3, args.runs // 2)):
                        path = lab.layer_dir / secrets.token_hex(32)
                        make_subvolumes([path])
                        t0 = time.perf_counter()
                        body = client.get("/v1/findings").raise_for_status().json()
                        changed.append(time.perf_counter() - t0)
                        assert len(body["items"]) == count + 1, "the change was not seen"
                        subprocess.run(
                            ["btrfs", "subvolume", "delete", str(path)],
                            check=True,
                            capture_output=True,
                        )
                        after = client.get("/v1/findings").raise_for_status().json()
                        assert len(after["items"]) == count, "the delete was not seen"
                    times["`GET /v1/findings` after a subvolume was made (a scan)"] = changed
                    for clients, seconds in loads:
                        log(f"load: {clients} clients for {seconds} s on /v1/findings")
                        out = loadgen.run(
                            agent.url,
                            agent.token,
                            agent.ssl_context(cert=False),
                            ["/v1/findings"],
                            clients=clients,
                            seconds=seconds,
                        )
                        load_results.append((clients, seconds, out.summary()))
            except Exception:
                log(f"agent log (tail):\n{agent.log()}")
                raise
            finally:
                api.close()
                stop(agent.proc)
    base = median(times["floor"])
    res.config = {
        "subvolumes": ds.subvolumes,
        "volumes": ds.volumes,
        "findings": count,
        "runs": args.runs,
    }
    table = Table(["what", "median", "ratio to floor", "target", "verdict"])
    targets = {
        "`GET /metrics`, nothing changed": METRICS_TARGET,
        "`GET /v1/findings` again, nothing changed": AGAIN_TARGET,
    }
    for name, ts in times.items():
        m = median(ts)
        if name == "floor":
            table.rows.append([name, secs(m), "1.00x", "-", "-"])
            continue
        target = targets.get(name)
        table.rows.append(
            [
                name,
                secs(m),
                ratio(m / base),
                f"<= {target}x" if target else "reported",
                verdict(m / base <= target) if target else "-",
            ]
        )
    res.tables.append(table)
    load = Table(
        ["clients", "time", "requests", "errors", "p50", "p99", "p99 / floor", "target", "verdict"]
    )
    for clients, _seconds, summary in load_results:
        lat = summary["latency_ms"]
        assert isinstance(lat, dict)
        p99 = float(lat["p99"]) / 1000
        target = LOAD_TARGETS.get(clients)
        errors = int(summary["errors"])  # type: ignore[call-overload]
        ok = target is not None and errors == 0 and p99 / base <= target
        load.rows.append(
            [
                str(clients),
                f"{summary['seconds']} s",
                f"{summary['requests']:,}",
                str(errors),
                secs(float(lat["p50"]) / 1000),
                secs(p99),
                ratio(p99 / base),
                f"0 errors, p99 <= {target}x" if target else "reported",
                verdict(ok) if target else "-",
            ]
        )
    res.tables.append(load)
    res.notes.append(
        "the agent keeps one scan and checks before each read that nothing changed "
        "(Docker's event stream, the btrfs change marks, the mount tables): a few "
        "system calls; `/metrics` shows the kept findings and never waits for a scan"
    )
    res.raw = {"times": times, "floor_median": base, "load": load_results}
    res.emit(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
