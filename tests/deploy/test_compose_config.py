"""docker-compose.yml is valid for docker-compose 1.29 (``docker-compose config``) and
carries the settings the agent needs and no more: SYS_ADMIN and SYS_PTRACE but not
privileged, the
Docker socket, the NAS volume at the same path, secrets, a healthcheck, a restart policy;
the controller behind its profile, as a non-root user."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import COMPOSE_FILE, COMPOSE_LAB_OVERRIDE, ENV_EXAMPLE, REPO


def compose_config(
    docker_compose: str, env: dict[str, str] | None, tmp_path: Path, *files: Path
) -> dict[str, Any]:
    """``docker-compose config`` of the files, with ``env`` as the env file (else none)."""
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in (env or {}).items()))
    args = [docker_compose, "--project-directory", str(REPO), "--env-file", str(env_file)]
    for f in files or (COMPOSE_FILE,):
        args += ["-f", str(f)]
    proc = subprocess.run(
        [*args, "config"], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    data = yaml.safe_load(proc.stdout)
    assert isinstance(data, dict)
    return data


def env_example() -> dict[str, str]:
    env: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"not KEY=VALUE: {line!r}"
            env[key] = value
    return env


def volume(service: dict[str, Any], target: str) -> dict[str, Any]:
    """The service's volume mounted at ``target``, as {source, target, mode}."""
    for entry in service.get("volumes", []):
        if isinstance(entry, str):
            source, target_, *mode = entry.split(":")
            parsed = {"source": source, "target": target_, "mode": mode[0] if mode else "rw"}
        else:
            parsed = {
                "source": entry.get("source"),
                "target": entry["target"],
                "mode": "ro" if entry.get("read_only") else "rw",
            }
        if parsed["target"] == target:
            return parsed
    raise AssertionError(f"no volume at {target}: {service.get('volumes')}")


@pytest.fixture
def defaults(docker_compose: str, tmp_path: Path) -> dict[str, Any]:
    return compose_config(docker_compose, None, tmp_path)


def test_agent_is_not_privileged_and_adds_only_what_it_needs(defaults: dict[str, Any]) -> None:
    agent = defaults["services"]["agent"]
    assert not agent.get("privileged", False)
    assert {"SYS_ADMIN", "SYS_PTRACE"} <= set(agent["cap_add"])  # ptrace: what is held open
    assert set(agent["cap_add"]) <= {
        "SYS_ADMIN",
        "DAC_OVERRIDE",
        "FOWNER",
        "SYS_PTRACE",
        "SYS_CHROOT",  # with SYS_ADMIN: entering a namespace no process is in
    }
    assert agent["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in agent["security_opt"]
    assert agent["read_only"] is True
    assert not agent.get("devices")
    assert agent["pid"] == "host"  # the host's mount table is pid 1's


def test_agent_mounts_socket_and_synology_volume_at_the_same_path(
    defaults: dict[str, Any],
) -> None:
    agent = defaults["services"]["agent"]
    sock = volume(agent, "/var/run/docker.sock")
    assert sock["source"] == "/var/run/docker.sock"
    root = volume(agent, "/volume1")
    assert root["source"] == "/volume1" and root["mode"] == "rw"
    env = agent["environment"]
    assert env["NAS_JANITOR_ROOTS"] == "/volume1/@docker"
    assert env["NAS_JANITOR_DOCKER_HOST"] == "unix:///var/run/docker.sock"
    state = volume(agent, env["NAS_JANITOR_STATE_DIR"])
    assert state["source"] in defaults["volumes"], "state is a named volume"


def test_agent_secrets_healthcheck_and_restart(defaults: dict[str, Any]) -> None:
    agent = defaults["services"]["agent"]
    env = agent["environment"]
    secrets = {s["source"] if isinstance(s, dict) else s for s in agent["secrets"]}
    assert secrets == {"agent_tls_cert", "agent_tls_key", "agent_tokens"}
    assert env["NAS_JANITOR_TLS_CERT"] == "/run/secrets/agent_tls_cert"
    assert env["NAS_JANITOR_TLS_KEY"] == "/run/secrets/agent_tls_key"
    assert env["NAS_JANITOR_TOKENS_FILE"] == "/run/secrets/agent_tokens"
    for name in secrets:
        assert Path(defaults["secrets"][name]["file"]).parent == REPO / "secrets"
    assert agent["healthcheck"]["test"] == ["CMD", "janitor-agent", "healthcheck"]
    assert agent["restart"] in {"always", "unless-stopped"}


def test_controller_is_optional_and_unprivileged(defaults: dict[str, Any]) -> None:
    controller = defaults["services"]["controller"]
    assert controller["profiles"] == ["controller"]
    assert controller["user"] == "10001:10001"
    assert controller["cap_drop"] == ["ALL"]
    assert not controller.get("cap_add")
    assert controller["read_only"] is True
    config = volume(controller, "/etc/nas-janitor")
    assert config["mode"] == "ro"
    assert controller["environment"]["NAS_JANITOR_FLEET"] == "/etc/nas-janitor/fleet.yaml"


def test_env_file_moves_every_host_path(docker_compose: str, tmp_path: Path) -> None:
    """A NAS with its Docker on /volume2: the mount keeps host path == container path."""
    env = {
        **env_example(),
        "NAS_VOLUME_ROOT": "/volume2",
        "DOCKER_DATA_ROOT": "/volume2/@docker",
        "DOCKER_SOCKET": "/run/other/docker.sock",
        "AGENT_LISTEN": "192.0.2.10:9443",
        "AGENT_SECRETS_DIR": "/volume2/nas-janitor/secrets",
        "NAS_JANITOR_VERSION": "9.9.9",
    }
    agent = compose_config(docker_compose, env, tmp_path)["services"]["agent"]
    root = volume(agent, "/volume2")
    assert root["source"] == "/volume2"
    assert volume(agent, "/var/run/docker.sock")["source"] == "/run/other/docker.sock"
    assert agent["environment"]["NAS_JANITOR_ROOTS"] == "/volume2/@docker"
    assert agent["environment"]["NAS_JANITOR_LISTEN"] == "192.0.2.10:9443"
    assert agent["image"] == "nas-janitor-agent:9.9.9"


def test_env_example_names_only_variables_the_compose_file_uses() -> None:
    text = COMPOSE_FILE.read_text()
    for key in env_example():
        assert f"${{{key}:-" in text or f"${{{key}}}" in text, key


def test_lab_override_is_valid_and_changes_only_the_network(
    docker_compose: str, tmp_path: Path
) -> None:
    def others(service: dict[str, Any]) -> dict[str, Any]:
        """All but network_mode; lists as sets (merging files reorders them)."""
        return {
            k: sorted(map(str, v)) if isinstance(v, list) else v
            for k, v in service.items()
            if k != "network_mode"
        }

    base = compose_config(docker_compose, None, tmp_path, COMPOSE_FILE)
    lab = compose_config(docker_compose, None, tmp_path, COMPOSE_FILE, COMPOSE_LAB_OVERRIDE)
    assert set(lab["services"]) == set(base["services"])
    for name, service in lab["services"].items():
        assert service["network_mode"] == "host"
        assert others(service) == others(base["services"][name])
