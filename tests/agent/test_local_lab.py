"""``janitor-agent init``, ``scan`` and ``clean`` for real, on the real lab:

- ``init``, then the agent under gunicorn started from the files it made, reached by
  janitorctl with the fleet file it made (TLS with the CA and token init made);
- ``scan`` and ``clean --yes`` with the real btrfs-progs and dockerd on a lab of their
  own, removing the lab's leak and leaving the never-touch set as it was.

The lab's orphan layer is seconds old: the config ``init`` writes keeps the default
``orphan_min_age_seconds`` (3600), so the clean test runs on a copy of it that sets 0.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

from agent.store.audit import AuditLog
from lab import DIND_IMAGE, Lab
from lab.agentproc import free_port, pids_root_may_not_read
from tests.agent.test_lab_agent import never_touch_digests, subvolume_paths

ENV = {k: v for k, v in os.environ.items() if not k.startswith("NAS_JANITOR_")}


def agent_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
        check=False,
    )


def janitorctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "janitorctl"), *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
        check=False,
    )


def init(d: Path, lab: Lab, port: int, state: Path) -> subprocess.CompletedProcess[str]:
    made = agent_cli(
        "init",
        str(d),
        "--listen",
        f"127.0.0.1:{port}",
        "--san",
        "localhost",
        "--name",
        "lab",
        "--docker-host",
        lab.docker_host,
        "--data-root",
        str(lab.data_root),
        "--state-dir",
        str(state),
    )
    assert made.returncode == 0, made.stderr + made.stdout
    return made


@contextmanager
def serving(config: Path, log: Path, port: int, ca: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=ENV,
            start_new_session=True,
        )
    try:
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with httpx.Client(verify=ctx, timeout=5) as c:
                    if c.get(f"https://127.0.0.1:{port}/readyz").status_code == 200:
                        break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(10)


def test_init_then_the_agent_and_janitorctl_from_its_files(lab: Lab, tmp_path: Path) -> None:
    port = free_port()
    d = tmp_path / "nas-janitor"
    made = init(d, lab, port, tmp_path / "state")
    lines = made.stdout.strip().splitlines()
    serve_cmd, ctl_cmd = lines[-2].split(), lines[-1].split()
    assert serve_cmd == ["janitor-agent", "serve", "--config", str(d / "agent.yaml")]
    assert ctl_cmd == ["janitorctl", "--fleet", str(d / "controller/fleet.yaml"), "findings"]
    if pids_root_may_not_read():  # /readyz says holders_unavailable otherwise, here only
        cfg = yaml.safe_load((d / "agent.yaml").read_text())
        cfg["unreadable_pids_allowed"] = pids_root_may_not_read()
        (d / "agent.yaml").write_text(yaml.safe_dump(cfg))
    with serving(d / "agent.yaml", tmp_path / "agent.log", port, d / "ca.pem"):
        # the second printed command, as printed (plus a store and JSON for the test)
        store = ["--store", str(tmp_path / "controller.db")]
        out = janitorctl(*ctl_cmd[1:], *store, "--json")
        assert out.returncode == 0, out.stderr + out.stdout
        found = json.loads(out.stdout)
        got = {(f["kind"], f["target"]["name"]) for f in _items(found)}
        seeded = lab.seeded
        assert ("dind-volume", seeded.dind.volume) in got
        assert ("orphan-layer", seeded.orphan.name) in got
        agents = janitorctl("--fleet", str(d / "controller/fleet.yaml"), *store, "agents")
        assert agents.returncode == 0, agents.stderr + agents.stdout
        assert "https://127.0.0.1" in agents.stdout and "lab" in agents.stdout
        # a token other than init's is refused: the fleet's token is what got us in
        (d / "controller/tokens/lab").write_text("nj_" + "x" * 43 + "\n")
        refused = janitorctl(*ctl_cmd[1:], *store)
        assert refused.returncode == 1 and "401" in refused.stdout + refused.stderr


def _items(found: object) -> list[dict[str, object]]:
    """The findings in janitorctl's JSON (per agent, or flat)."""
    out: list[dict[str, object]] = []
    if isinstance(found, dict):
        if "kind" in found and "target" in found:
            return [found]
        for value in found.values():
            out.extend(_items(value))
    elif isinstance(found, list):
        for value in found:
            out.extend(_items(value))
    return out


def test_scan_and_clean_yes_on_the_real_lab(
    lab_factory: Callable[..., Lab], tmp_path: Path
) -> None:
    own = lab_factory()  # a clean removes every leftover: not the shared lab's
    d = tmp_path / "nas-janitor"
    state = tmp_path / "state"
    init(d, own, free_port(), state)
    cfg = yaml.safe_load((d / "agent.yaml").read_text())
    assert "orphan_min_age_seconds" not in cfg  # init keeps the default floor
    cfg["orphan_min_age_seconds"] = 0  # the lab's orphan is seconds old
    cfg["unreadable_pids_allowed"] = pids_root_may_not_read()  # this machine's pid 1
    lab_cfg = tmp_path / "lab-agent.yaml"
    lab_cfg.write_text(yaml.safe_dump(cfg))
    lab_cfg.chmod(0o600)
    seeded = own.seeded
    before_digests = never_touch_digests(own)
    before_paths = subvolume_paths(own)

    scan = agent_cli("scan", "--config", str(lab_cfg), "--json", "--min-age", "0")
    assert scan.returncode == 3, scan.stderr
    got = {(f["kind"], f["target"]["name"]) for f in json.loads(scan.stdout)["items"]}
    assert got == {("dind-volume", seeded.dind.volume), ("orphan-layer", seeded.orphan.name)}
    table = agent_cli("scan", "--config", str(lab_cfg), "--min-age", "0")
    assert table.returncode == 3 and seeded.dind.volume in table.stdout

    dry = agent_cli("clean", "--config", str(lab_cfg), "--min-age", "0")
    assert dry.returncode == 3, dry.stderr
    assert "would delete" in dry.stdout
    assert subvolume_paths(own) == before_paths  # a dry run

    done = agent_cli("clean", "--config", str(lab_cfg), "--min-age", "0", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "succeeded: 2 deleted" in done.stdout
    gone = {str(p) for p in seeded.dind.subvolumes} | {str(seeded.orphan.path)}
    rel = {p.removeprefix(str(own.mnt) + "/") for p in gone}
    assert subvolume_paths(own) == before_paths - rel
    assert seeded.dind.volume not in own.docker("volume", "ls", "-q").stdout.split()
    assert never_touch_digests(own) == before_digests
    for image in seeded.never_touch.images:
        usr = ["-v", "/usr:/usr:ro"] if image.name == DIND_IMAGE else []
        out = own.docker("run", "--rm", "--network", "none", *usr, image.name, "true", check=False)
        assert out.returncode == 0, out.stderr

    with AuditLog(str(state / "audit.db")) as log:
        assert log.verify().ok
        entries = log.page(after_seq=0, limit=1000)
    assert {e.actor for e in entries} == {"local:root"}
    assert [e.action for e in entries][-1] == "job.finish"

    after = agent_cli("scan", "--config", str(lab_cfg), "--min-age", "0")
    assert after.returncode == 0, after.stdout + after.stderr
    assert "nothing found" in after.stdout
