"""The whole story in one command (``make demo``): a real btrfs + Docker lab with the
docker-in-docker leak, what Docker itself manages against it, then the agent under
gunicorn (TLS, a fresh token) and the controller: findings, plan, apply, space before
and after, the audit. Everything is torn down at the end, also on failure.

    python -m lab.demo [--keep]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from lab.agentproc import AgentProcess, start_agent
from lab.core import Lab
from lab.errors import LabError

BIN = os.path.dirname(sys.executable) + "/"


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def show(cmd: Sequence[str], *, env: dict[str, str] | None = None, check: bool = True) -> int:
    """Run a command and show it with its output, as a terminal would."""
    shown = [os.path.basename(cmd[0]), *cmd[1:]] if cmd[0].startswith(BIN) else list(cmd)
    print(f"$ {shlex.join(shown)}", flush=True)
    proc = subprocess.run(
        list(cmd), env=env, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out = proc.stdout.decode(errors="replace").rstrip()
    if out:
        print(out, flush=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"demo: `{shlex.join(cmd)}` exited {proc.returncode}")
    if proc.returncode != 0:
        print(f"[exit {proc.returncode}]", flush=True)
    return proc.returncode


def used_bytes(lab: Lab) -> int:
    subprocess.run(["btrfs", "subvolume", "sync", str(lab.mnt)], check=True, capture_output=True)
    subprocess.run(["btrfs", "filesystem", "sync", str(lab.mnt)], check=True, capture_output=True)
    out = subprocess.run(
        ["btrfs", "filesystem", "usage", "-b", str(lab.mnt)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for line in out.splitlines():
        if line.strip().startswith("Used:"):
            return int(line.split()[1])
    raise LabError("no 'Used:' line in btrfs filesystem usage")


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def write_fleet(folder: Path, agent: AgentProcess) -> Path:
    (folder / "nas1.token").write_text(agent.token + "\n")
    (folder / "nas1.token").chmod(0o600)
    fleet = {
        "store": "controller.db",
        "policy": {"kinds": ["dind-volume", "orphan-layer"], "min_age_seconds": 0},
        "agents": [
            {
                "name": "nas1",
                "url": agent.url,
                "token_file": "nas1.token",
                "ca": str(agent.pki.ca_pem),
                "labels": {"site": "lab"},
            }
        ],
    }
    path = folder / "fleet.yaml"
    path.write_text(yaml.safe_dump(fleet, sort_keys=False))
    return path


def demo(folder: Path) -> None:
    say("1. A btrfs filesystem on a loop device, a private dockerd with the btrfs driver")
    t0 = time.monotonic()
    lab = Lab.up(folder / "lab")
    try:
        seeded = lab.seeded
        print(f"lab ready in {time.monotonic() - t0:.1f} s: {lab.mnt} (data root {lab.data_root})")
        env = dict(os.environ, **lab.env)
        # make the leaked volume weigh something, so the space coming back shows
        big = seeded.dind.ro_parent_child / "build-cache.bin"
        subprocess.run(
            ["btrfs", "property", "set", str(seeded.dind.ro_parent), "ro", "false"], check=True
        )
        big.write_bytes(os.urandom(256 << 20))
        subprocess.run(
            ["btrfs", "property", "set", str(seeded.dind.ro_parent), "ro", "true"], check=True
        )
        (seeded.orphan.path / "layer.tar").write_bytes(os.urandom(64 << 20))
        lab.enable_quotas()  # exact per-subvolume sizes (the agent never turns them on)

        say("2. The leak, for real: a docker:dind volume full of nested subvolumes")
        show(["docker", "volume", "ls"], env=env)
        show(["btrfs", "subvolume", "list", "-o", str(seeded.dind.mountpoint)], check=False)

        say("3. What Docker can do about it")
        show(["docker", "volume", "rm", seeded.dind.volume], env=env, check=False)

        say("4. The agent: gunicorn over TLS with a fresh token")
        agent = start_agent(folder / "agent", docker_host=lab.docker_host)
        try:
            print(f"agent at {agent.url} (pid {agent.proc.pid}), CA {agent.pki.ca_pem}")
            fleet = write_fleet(folder, agent)
            ctl = [BIN + "janitorctl", "--fleet", str(fleet)]
            before = used_bytes(lab)

            say("5. janitorctl agents / findings")
            show([*ctl, "agents"])
            show([*ctl, "findings"])

            say("6. janitorctl run: plan, apply, wait, summary, audit")
            show([*ctl, "run"])
            after = used_bytes(lab)

            say("7. Space before and after (btrfs filesystem usage, after subvolume sync)")
            print(f"used before: {mib(before)}")
            print(f"used after:  {mib(after)}")
            print(f"reclaimed:   {mib(before - after)}")
            show(["docker", "volume", "ls"], env=env)

            say("8. The audit, pulled and verified; and what is left")
            show([*ctl, "audit"])
            show([*ctl, "report"])
            show([*ctl, "findings"])
        finally:
            agent.kill()
    finally:
        say("9. Tear-down: every mount, loop device and daemon the demo made")
        report = lab.down(check=False)
        print("lab torn down" if not report.errors else f"teardown problems: {report.errors}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.demo", description=__doc__)
    parser.add_argument("--folder", type=Path, help="work folder (default: a new temp folder)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("demo: run as root (the lab mounts a loop device and runs dockerd)", file=sys.stderr)
        return 2
    folder = args.folder or Path(tempfile.mkdtemp(prefix="nas-janitor-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        demo(folder)
    except (LabError, RuntimeError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.folder is None:  # our own temp folder: the lab is down, drop the rest
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
