"""End to end on the lab: build both images with deploy/build-images.sh on the lab's
private dockerd, bring the agent up with docker-compose.yml exactly as a NAS would (only
the network differs: tests/deploy/compose.lab.yml), the NAS volume being the lab's btrfs
mount and the Docker data root the lab's; then over TLS: /healthz, the seeded leftovers in
/v1/findings, a plan that applies nothing; then the controller image's
``janitorctl run --dry-run`` against the agent. Nothing the lab seeded is deleted.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import ssl
import subprocess
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
import yaml

from lab import Lab, is_subvolume
from lab.agentproc import pids_root_may_not_read
from tests.deploy.conftest import (
    COMPOSE_FILE,
    COMPOSE_LAB_OVERRIDE,
    REPO,
    require_tool,
)

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(1800)]

AGENT_IMAGE = "nas-janitor-agent"
CONTROLLER_IMAGE = "nas-janitor-controller"
CONTROLLER_UID = 10001
# Budgets on the bootstrapped Debian base (measured: see deploy/README.md); a jump past
# them means something heavy slipped into an image.
SIZE_BUDGET = {AGENT_IMAGE: 220 * 10**6, CONTROLLER_IMAGE: 200 * 10**6}


def version() -> str:
    with (REPO / "pyproject.toml").open("rb") as f:
        v: str = tomllib.load(f)["project"]["version"]
    return v


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(
    args: list[str], env: dict[str, str], *, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


@dataclass
class Built:
    env: dict[str, str]
    step_seconds: dict[str, float]
    sizes: dict[str, int]
    new_images: set[str] = field(default_factory=set)


@dataclass
class Stack:
    lab: Lab
    built: Built
    compose: list[str]
    env: dict[str, str]
    url: str
    ca: Path
    token: str
    agent_container: str
    controller_dir: Path

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        verify = ssl.create_default_context(cafile=str(self.ca))
        return httpx.Client(base_url=self.url, verify=verify, headers=headers, timeout=60)


def image_ids(env: dict[str, str]) -> set[str]:
    out = run(["docker", "image", "ls", "-aq", "--no-trunc"], env).stdout
    return set(out.split())


def image_size(env: dict[str, str], ref: str) -> int:
    return int(run(["docker", "image", "inspect", "-f", "{{.Size}}", ref], env).stdout)


@pytest.fixture(scope="module")
def built(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    require_tool("docker", "the docker CLI: `make deps`")
    cached = (REPO / ".cache" / "debian-bookworm-minbase.tar.gz").is_file()
    if not cached:
        require_tool("debootstrap", "`make deps`")
    # A wheelhouse of this run's own: another run in the same tree cannot swap it.
    wheelhouse = tmp_path_factory.mktemp("build") / "wheelhouse"
    env = {**lab.env, "IMAGE_TAG": version(), "WHEELHOUSE": str(wheelhouse)}
    env.pop("BASE_IMAGE", None)  # the bootstrapped Debian base, as documented
    before = image_ids(env)
    result = Built(env=env, step_seconds={}, sizes={})
    try:
        proc = run([str(REPO / "deploy" / "build-images.sh"), "all"], env, timeout=1500)
        for name, secs in re.findall(r"step (\w+)\s+([\d.]+) s", proc.stderr):
            result.step_seconds[name] = float(secs)
        result.new_images = image_ids(env) - before
        for image in (AGENT_IMAGE, CONTROLLER_IMAGE):
            result.sizes[image] = image_size(env, f"{image}:{version()}")
        print(f"\nimage build steps (s): {result.step_seconds}; sizes: {result.sizes}")
        yield result
    finally:
        # Leave the shared lab's daemon as it was: the images this module added go.
        added = image_ids(env) - before
        if added:
            run(["docker", "image", "rm", "-f", *sorted(added)], env, check=False)


def write_pki(folder: Path) -> trustme.CA:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    folder.mkdir(parents=True, exist_ok=True)
    cert.private_key_pem.write_to_path(str(folder / "tls.key"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "tls.crt"))
    for f in ("tls.key", "tls.crt"):
        (folder / f).chmod(0o600)
    return ca


def new_token(built: Built) -> tuple[str, str]:
    """``janitor-agent token new`` in the agent image: the token and the tokens YAML."""
    out = run(
        [
            "docker", "run", "--rm", "--network", "none",
            f"{AGENT_IMAGE}:{version()}", "token", "new", "--id", "controller",
            "--scopes", "read,clean",
        ],
        built.env,
    ).stdout  # fmt: skip
    token = re.search(r"^token: (\S+)$", out, flags=re.M)
    assert token, out
    entries = yaml.safe_load(out[out.index("tokens:") :])
    assert entries["tokens"][0]["id"] == "controller"
    return token.group(1), yaml.safe_dump(entries)


def wait_healthy(env: dict[str, str], container: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        state = json.loads(
            run(["docker", "inspect", "-f", "{{json .State}}", container], env).stdout
        )
        status = state.get("Health", {}).get("Status", "")
        if status == "healthy" or not state.get("Running"):
            break
        time.sleep(2)
    return status


@pytest.fixture(scope="module")
def stack(lab: Lab, built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    compose_bin = require_tool("docker-compose", "`make deps`: Debian's docker-compose")
    work = tmp_path_factory.mktemp("compose")
    ca = write_pki(work / "secrets")
    token, tokens_yaml = new_token(built)
    (work / "secrets" / "tokens.yaml").write_text(tokens_yaml)
    (work / "secrets" / "tokens.yaml").chmod(0o600)
    ca_file = work / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    port = free_port()
    url = f"https://127.0.0.1:{port}"
    # The controller's folder, as deploy/README.md has it: readable by uid 10001 only.
    controller_dir = work / "controller-config"
    (controller_dir / "tokens").mkdir(parents=True)
    (controller_dir / "tokens" / "lab").write_text(token + "\n")
    ca.cert_pem.write_to_path(str(controller_dir / "agents-ca.pem"))
    fleet = {
        "agents": [{"name": "lab", "url": url, "token_file": "tokens/lab", "ca": "agents-ca.pem"}],
        "timeouts": {"connect": 5, "request": 60, "job": 120, "poll": 1},
    }
    (controller_dir / "fleet.yaml").write_text(yaml.safe_dump(fleet))
    for path in [controller_dir, *controller_dir.rglob("*")]:
        os.chown(path, CONTROLLER_UID, CONTROLLER_UID)
        path.chmod(0o700 if path.is_dir() else 0o600)

    env_file = work / "lab.env"
    env_file.write_text(
        "".join(
            f"{k}={v}\n"
            for k, v in {
                "NAS_JANITOR_VERSION": version(),
                "NAS_VOLUME_ROOT": lab.mnt,
                "DOCKER_DATA_ROOT": lab.data_root,
                "DOCKER_SOCKET": lab.docker_socket,
                "AGENT_LISTEN": f"127.0.0.1:{port}",
                "AGENT_SECRETS_DIR": work / "secrets",
                "CONTROLLER_CONFIG_DIR": controller_dir,
                # where even root may not read this machine's pid 1
                "UNREADABLE_PIDS_ALLOWED": ",".join(map(str, pids_root_may_not_read())),
            }.items()
        )
    )
    project = f"njdeploy{secrets.token_hex(4)}"
    compose = [
        compose_bin, "--project-name", project, "--project-directory", str(REPO),
        "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "-f", str(COMPOSE_LAB_OVERRIDE),
    ]  # fmt: skip
    env = dict(built.env)
    try:
        run([*compose, "up", "-d", "agent"], env, timeout=300)
        container = run([*compose, "ps", "-q", "agent"], env).stdout.strip()
        assert container, "docker-compose started no agent container"
        status = wait_healthy(env, container)
        if status != "healthy":
            logs = run(["docker", "logs", "--tail", "50", container], env, check=False)
            pytest.fail(
                f"agent container is {status or 'not running'}:\n{logs.stdout}{logs.stderr}",
                pytrace=False,
            )
        yield Stack(
            lab=lab,
            built=built,
            compose=compose,
            env=env,
            url=url,
            ca=ca_file,
            token=token,
            agent_container=container,
            controller_dir=controller_dir,
        )
    finally:
        run(
            [*compose, "--profile", "controller", "down", "-v", "--remove-orphans"],
            env,
            timeout=180,
            check=False,
        )


def seeded_paths(lab: Lab) -> list[Path]:
    dind = lab.seeded.dind
    return [dind.mountpoint, *dind.subvolumes, lab.seeded.orphan.path]


def assert_nothing_deleted(lab: Lab) -> None:
    for path in seeded_paths(lab):
        assert path.exists(), f"{path} is gone"
    for path in [*lab.seeded.dind.subvolumes, lab.seeded.orphan.path]:
        assert is_subvolume(path), f"{path} is no longer a subvolume"
    volumes = lab.docker("volume", "ls", "-q").stdout.split()
    assert lab.seeded.dind.volume in volumes


# -- the images ----------------------------------------------------------------------------


def test_images_are_built_small(built: Built) -> None:
    assert set(built.step_seconds) == {"wheelhouse", "base", "agent", "controller"}
    for image, size in built.sizes.items():
        assert 0 < size <= SIZE_BUDGET[image], f"{image}: {size / 1e6:.0f} MB"


def test_agent_image_has_btrfs_progs_and_its_healthcheck(built: Built) -> None:
    ref = f"{AGENT_IMAGE}:{version()}"
    config = json.loads(
        run(["docker", "image", "inspect", "-f", "{{json .Config}}", ref], built.env).stdout
    )
    assert config["Healthcheck"]["Test"] == ["CMD", "janitor-agent", "healthcheck"]
    assert config["Entrypoint"] == ["janitor-agent"]
    assert config["User"] in ("", "0", "0:0", "root")  # needs root: see agent/Dockerfile
    out = run(
        ["docker", "run", "--rm", "--network", "none", "--entrypoint", "btrfs", ref, "--version"],
        built.env,
    ).stdout
    assert out.startswith("btrfs-progs v")
    out = run(["docker", "run", "--rm", "--network", "none", ref, "--version"], built.env).stdout
    assert version() in out


def test_controller_image_runs_as_non_root(built: Built) -> None:
    ref = f"{CONTROLLER_IMAGE}:{version()}"
    config = json.loads(
        run(["docker", "image", "inspect", "-f", "{{json .Config}}", ref], built.env).stdout
    )
    assert config["User"] == f"{CONTROLLER_UID}:{CONTROLLER_UID}"
    assert config["Entrypoint"] == ["janitorctl"]
    assert config["Healthcheck"]["Test"][0] == "CMD"
    out = run(
        ["docker", "run", "--rm", "--network", "none", "--entrypoint", "id", ref, "-u"],
        built.env,
    ).stdout
    assert out.strip() == str(CONTROLLER_UID)
    out = run(["docker", "run", "--rm", "--network", "none", ref, "--version"], built.env).stdout
    assert version() in out


# -- the agent as docker-compose runs it ---------------------------------------------------


def test_agent_container_has_exactly_the_compose_settings(stack: Stack) -> None:
    info: dict[str, Any] = json.loads(
        run(["docker", "inspect", stack.agent_container], stack.env).stdout
    )[0]
    host = info["HostConfig"]
    assert host["Privileged"] is False
    assert "SYS_ADMIN" in host["CapAdd"] and host["CapDrop"] == ["ALL"]
    assert host["ReadonlyRootfs"] is True
    assert host["NetworkMode"] == "host"
    assert host["RestartPolicy"]["Name"] == "unless-stopped"
    mounts = {m["Destination"]: m for m in info["Mounts"]}
    assert mounts[str(stack.lab.mnt)]["Source"] == str(stack.lab.mnt)
    assert mounts["/var/run/docker.sock"]["Source"] == str(stack.lab.docker_socket)
    assert mounts["/var/lib/nas-janitor"]["Type"] == "volume"
    assert info["State"]["Health"]["Status"] == "healthy"


def test_healthz_over_tls(stack: Stack) -> None:
    with stack.client() as c:
        r = c.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    # The certificate is verified: a client that trusts another CA is refused.
    other = trustme.CA()
    with (
        other.cert_pem.tempfile() as other_ca,
        httpx.Client(verify=ssl.create_default_context(cafile=other_ca)) as c,
    ):
        with pytest.raises(httpx.ConnectError):
            c.get(f"{stack.url}/healthz")


def test_agent_sees_the_lab_docker_and_roots(stack: Stack) -> None:
    with stack.client(stack.token) as c:
        r = c.get("/v1/host")
        assert c.get("/readyz").status_code == 200
    assert r.status_code == 200, r.text
    host = r.json()
    assert host["docker"]["data_root"] == str(stack.lab.data_root)
    assert host["docker"]["storage_driver"] == "btrfs"
    assert host["roots"] == [str(stack.lab.data_root)]
    with stack.client() as c:
        assert c.get("/v1/host").status_code == 401


def test_findings_are_the_lab_leftovers(stack: Stack) -> None:
    with stack.client(stack.token) as c:
        r = c.get("/v1/findings")
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    dind = [f for f in items if f["kind"] == "dind-volume"]
    assert stack.lab.seeded.dind.volume in {f["target"]["name"] for f in dind}
    orphans = {f["target"]["path"] for f in items if f["kind"] == "orphan-layer"}
    assert str(stack.lab.seeded.orphan.path) in orphans
    never = {v.name for v in stack.lab.seeded.never_touch.volumes}
    assert not never & {f["target"]["name"] for f in items if f["kind"] == "dind-volume"}


def test_a_plan_applies_nothing(stack: Stack) -> None:
    body = {"kinds": ["dind-volume", "orphan-layer"], "min_age_seconds": 0}
    with stack.client(stack.token) as c:
        r = c.post("/v1/plans", json=body)
        assert r.status_code == 201, r.text
        plan = r.json()
        targets = {a["target"]["name"] for a in plan["actions"] if a["op"] == "remove_volume"}
        assert stack.lab.seeded.dind.volume in targets
        time.sleep(2)  # were anything started, give it the time to do harm
        again = c.get(f"/v1/plans/{plan['id']}")
        assert again.status_code == 200
    assert_nothing_deleted(stack.lab)


def test_controller_image_dry_run_against_the_agent(stack: Stack) -> None:
    proc = run(
        [
            *stack.compose, "--profile", "controller", "run", "--rm", "-T", "controller",
            "run", "--dry-run", "--min-age", "0", "--json",
        ],
        stack.env,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    summary = json.loads(proc.stdout)
    assert summary["dry_run"] is True
    (agent,) = summary["agents"]
    assert agent["agent"] == "lab"
    assert agent["reachable"] is True
    assert agent["findings"] >= 2
    assert agent["planned"] >= 1
    assert agent["deleted"] == 0 and agent["failed"] == 0
    assert agent["error"] is None and agent["job_id"] is None
    assert_nothing_deleted(stack.lab)


def local_run(stack: Stack, folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The README's ``docker run --rm`` one-liner of the agent image (the lab's paths for
    the NAS's: its btrfs mount for /volume1, ``folder`` for the project's folder), on
    the compose agent's own state volume."""
    lab = stack.lab
    project = stack.compose[stack.compose.index("--project-name") + 1]
    return run(
        [
            "docker", "run", "--rm", "--network", "none", "--pid", "host",
            "--read-only", "--tmpfs", "/tmp",
            "--cap-drop", "ALL", "--cap-add", "SYS_ADMIN", "--cap-add", "DAC_OVERRIDE",
            "--cap-add", "FOWNER", "--cap-add", "SYS_PTRACE", "--cap-add", "SYS_CHROOT",
            "--security-opt", "no-new-privileges",
            "-e", "NAS_JANITOR_UNREADABLE_PIDS_ALLOWED="
            + ",".join(map(str, pids_root_may_not_read())),
            "-v", f"{lab.docker_socket}:/var/run/docker.sock",
            "-v", f"{lab.mnt}:{lab.mnt}",
            "-v", f"{folder}:{folder}",
            "-v", f"{project}_agent-state:/var/lib/nas-janitor",
            f"{AGENT_IMAGE}:{version()}", *args,
        ],
        stack.env,
        timeout=300,
        check=False,
    )  # fmt: skip


def test_init_in_the_image_then_scan_and_clean_with_docker_run(
    stack: Stack, tmp_path: Path
) -> None:
    """``init`` run from the agent image, then ``scan`` and a dry-run ``clean`` with the
    one-liner, on the state volume the compose agent uses: one audit chain."""
    folder = tmp_path / "nas-janitor"
    folder.mkdir()
    made = run(
        [
            "docker", "run", "--rm", "--network", "none", "-v", f"{folder}:{folder}",
            f"{AGENT_IMAGE}:{version()}", "init", str(folder),
            "--listen", "127.0.0.1:8443", "--san", "localhost",
            "--data-root", str(stack.lab.data_root),
        ],
        stack.env,
    ).stdout  # fmt: skip
    assert "token: nj_" in made
    config = str(folder / "agent.yaml")
    for secret in ("ca.key", "secrets/tls.key", "secrets/tokens.yaml", "agent.yaml"):
        assert (folder / secret).stat().st_mode & 0o777 == 0o600

    scan = local_run(stack, folder, "scan", "--config", config, "--json", "--min-age", "0")
    assert scan.returncode == 3, scan.stdout + scan.stderr
    items = json.loads(scan.stdout)["items"]
    seeded = stack.lab.seeded
    assert seeded.dind.volume in {f["target"]["name"] for f in items}
    assert str(seeded.orphan.path) in {f["target"]["path"] for f in items}

    dry = local_run(stack, folder, "clean", "--config", config, "--min-age", "0")
    assert dry.returncode == 3, dry.stdout + dry.stderr
    assert "would delete" in dry.stdout and seeded.dind.volume in dry.stdout
    assert_nothing_deleted(stack.lab)

    # the compose agent sees the local plan in its own audit log, and the chain holds
    with stack.client(stack.token) as c:
        entries = c.get("/v1/audit", params={"limit": 1000}).json()["items"]
        verify = c.get("/v1/audit/verify").json()
    local = [e for e in entries if e["actor"] == "local:root"]
    assert [e["action"] for e in local] == ["plan.create"]
    assert verify["ok"] is True
