"""B3 fleet: ``janitorctl findings`` over ``--agents`` agents on loopback.

The answers are real: the lab (seeded, plus ``--orphans`` more orphan layers) is asked by
the real agent under gunicorn, and its ``/v1/findings``, ``/v1/host`` and ``/healthz``
answers are captured byte for byte. Then ONE stand-in process (``bench/standin.py``)
serves them on ``--agents`` TLS listeners (the agent's certificate, bearer token
checked), and, interleaved ``--runs`` times, each a fresh process timed from ``Popen``
to exit, its peak RSS from GNU time (``%M``):

- ``janitorctl --fleet FLEET findings --json`` over every agent (the fleet file's
  default concurrency, 4);
- the same over one agent;
- the floor: the same GETs, one agent after the other, with plain httpx in one process
  (``bench/plain_fleet.py``).

Targets: under 3 s wall and under 150 MB peak RSS for the controller over 200 agents.

    .venv/bin/python -m bench.b3_fleet [--agents 200] [--runs 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import (
    REPO,
    Results,
    Table,
    api_client,
    command_line,
    log,
    median,
    own_lab,
    ratio,
    secs,
    spawn_agent,
    status_kb,
    stop,
    verdict,
)

TARGET_WALL = 3.0
TARGET_MB = 150.0
CAPTURED = (("/v1/findings", {"limit": 500}), ("/v1/host", {}), ("/healthz", {}))


def capture(work: Path, orphans: int) -> tuple[Path, Path, Path, Path, int]:
    """Captured answers, and the agent's server cert, key and CA; and the findings count."""
    captures = work / "captures"
    captures.mkdir()
    with own_lab() as lab:
        for _ in range(orphans):
            lab.seed_orphan_subvolume()
        started = spawn_agent(work / "agent", docker_host=lab.docker_host)
        agent = started.agent
        try:
            with api_client(agent) as client:
                for i, (path, params) in enumerate(CAPTURED):
                    r = client.get(path, params=params)
                    r.raise_for_status()
                    (captures / f"{i}.json").write_text(
                        json.dumps(
                            {
                                "path": path,
                                "status": r.status_code,
                                "content_type": r.headers["content-type"],
                                "body": r.text,
                            }
                        )
                    )
                    if path == "/v1/findings":
                        count = len(r.json()["items"])
        finally:
            stop(agent.proc)
    (work / "token").write_text(agent.token + "\n")
    (work / "token").chmod(0o600)  # janitorctl refuses a token file others may read
    pki = agent.pki
    return captures, pki.server_cert, pki.server_key, pki.ca_pem, count


def write_fleet(path: Path, ports: list[int], ca: Path, token: Path) -> None:
    fleet: dict[str, Any] = {
        "store": str(path.parent / "controller.db"),
        "agents": [
            {
                "name": f"nas-{i:03d}",
                "url": f"https://127.0.0.1:{port}",
                "token_file": str(token),
                "ca": str(ca),
                "labels": {"site": "bench"},
            }
            for i, port in enumerate(ports)
        ],
    }
    path.write_text(yaml.safe_dump(fleet, sort_keys=False))


GNU_TIME = Path("/usr/bin/time")


def measured(cmd: list[str], out: Path) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (kB) and stdout of one fresh process.

    The peak is GNU time's ``%M`` when /usr/bin/time is there: ``wait4`` from this process
    would not do, as a child's ``ru_maxrss`` starts at the RSS of the (vfork-shared)
    parent that started it. Without GNU time, the child's VmHWM (its own address space's
    peak) is polled every 5 ms until it exits."""
    err = out.with_suffix(".err")
    rss_file = out.with_suffix(".rss")
    wrapped = [str(GNU_TIME), "-f", "%M", "-o", str(rss_file), *cmd] if GNU_TIME.exists() else cmd
    hwm = 0
    with out.open("wb") as o, err.open("wb") as e:
        t0 = time.perf_counter()
        proc = subprocess.Popen(wrapped, stdout=o, stderr=e, cwd=REPO)
        while proc.poll() is None:
            if not GNU_TIME.exists():
                with contextlib.suppress(OSError, KeyError, ValueError):
                    hwm = max(hwm, status_kb(proc.pid, "VmHWM"))
            time.sleep(0.005)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} exited {proc.returncode}: {err.read_text()[-2000:]}")
    if GNU_TIME.exists():
        hwm = int(rss_file.read_text().split()[-1])
    return wall, hwm, out.read_text()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=200)
    p.add_argument("--orphans", type=int, default=8, help="more orphan layers on the lab")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    res = Results(
        name="b3",
        command=command_line(
            "bench.b3_fleet", ["--agents", str(args.agents), "--runs", str(args.runs)]
        ),
        config={},
    )
    janitorctl = str(Path(sys.executable).parent / "janitorctl")
    with tempfile.TemporaryDirectory(prefix="nas-janitor-bench-b3-") as tmp:
        work = Path(tmp)
        captures, cert, key, ca, per_agent = capture(work, args.orphans)
        log(f"captured: {per_agent} findings per agent")
        standin = subprocess.Popen(
            [
                sys.executable, "-m", "bench.standin", "--agents", str(args.agents),
                "--captures", str(captures), "--cert", str(cert), "--key", str(key),
                "--token-file", str(work / "token"),
            ],
            stdout=subprocess.PIPE,
            cwd=REPO,
            start_new_session=True,
        )  # fmt: skip
        try:
            assert standin.stdout is not None
            ports: list[int] = json.loads(standin.stdout.readline())
            (work / "ports.json").write_text(json.dumps(ports))
            write_fleet(work / "fleet.yaml", ports, ca, work / "token")
            write_fleet(work / "fleet1.yaml", ports[:1], ca, work / "token")
            cases = {
                "fleet": [janitorctl, "--fleet", str(work / "fleet.yaml"), "findings", "--json"],
                "one": [janitorctl, "--fleet", str(work / "fleet1.yaml"), "findings", "--json"],
                "plain": [
                    sys.executable, "-m", "bench.plain_fleet",
                    str(work / "ports.json"), str(work / "token"), str(ca),
                ],
            }  # fmt: skip
            wall: dict[str, list[float]] = {k: [] for k in cases}
            rss: dict[str, list[int]] = {k: [] for k in cases}
            names = list(cases)
            for r in range(1 + args.runs):  # the first round warms the page cache
                k = r % len(names)
                for name in names[k:] + names[:k]:
                    w, m, out = measured(cases[name], work / f"{name}.out")
                    if name == "plain":
                        got = int(out.strip())
                        assert got == per_agent * args.agents, (got, per_agent)
                    else:
                        body = json.loads(out)
                        agents = args.agents if name == "fleet" else 1
                        assert len(body) == agents and all(a["ok"] for a in body), out[:500]
                        assert all(len(a["findings"]) == per_agent for a in body)
                    if r > 0:
                        wall[name].append(w)
                        rss[name].append(m)
                log(f"round {r}: " + ", ".join(f"{n} {wall[n][-1]:.2f} s" for n in names if r))
        finally:
            stop(standin)
    fw, ow, pw = median(wall["fleet"]), median(wall["one"]), median(wall["plain"])
    fm, om, pm = (median(rss[n]) / 1024 for n in ("fleet", "one", "plain"))
    res.config = {
        "agents": args.agents,
        "findings per agent": per_agent,
        "controller concurrency": 4,
        "runs": args.runs,
    }
    table = Table(["process", "wall (median)", "peak RSS (median)", "wall ratio", "target"])
    table.rows.append(
        [f"plain httpx, {args.agents} GETs one after the other", secs(pw), f"{pm:.1f} MB",
         "1.00x (floor)", "-"]
    )  # fmt: skip
    table.rows.append(
        ["`janitorctl findings --json`, 1 agent", secs(ow), f"{om:.1f} MB", ratio(ow / pw), "-"]
    )
    table.rows.append(
        [
            f"`janitorctl findings --json`, {args.agents} agents",
            secs(fw),
            f"{fm:.1f} MB",
            f"{ratio(fw / pw)} ({ratio(fw / ow)} the 1-agent run)",
            f"< 3 s: {verdict(fw < TARGET_WALL)}; < 150 MB: {verdict(fm < TARGET_MB)}",
        ]
    )
    res.tables.append(table)
    res.notes.append(
        "the stand-in process and the measured process share the machine's 2 cores; "
        "every process is timed from Popen to exit, interpreter start-up included"
    )
    res.raw = {"wall": wall, "maxrss_kb": rss}
    res.emit(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
