"""Run the real agent (``janitor-agent serve``, gunicorn) on loopback for tests,
benchmarks and the demo, with TLS from a throwaway CA, a fresh token, and its own state
directory. Stopped by pid."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trustme
import yaml

from agent.http.auth import hash_token, new_token


def pids_root_may_not_read() -> list[int]:
    """``[1]`` where even root may not read what the host's init holds (a virtual
    machine's supervisor can forbid it; a NAS's init is readable), else ``[]``: the
    lab's agents pass over that one process (``unreadable_pids_allowed``) instead of
    refusing every delete."""
    try:
        os.readlink("/proc/1/cwd")
    except PermissionError:
        return [1]
    except OSError:
        return []
    return []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Pki:
    """A test CA with a server certificate for 127.0.0.1/localhost and a client one."""

    dir: Path
    ca: trustme.CA = field(default_factory=trustme.CA)

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        client = self.ca.issue_cert("controller@nas-janitor.test")
        self.ca_pem = self.dir / "ca.pem"
        self.server_cert = self.dir / "server.pem"
        self.server_key = self.dir / "server.key"
        self.client_cert = self.dir / "client.pem"
        self.client_key = self.dir / "client.key"
        self.ca.cert_pem.write_to_path(str(self.ca_pem))
        server.private_key_pem.write_to_path(str(self.server_key))
        self.server_key.chmod(0o600)  # the agent refuses a world-readable key
        server.cert_chain_pems[0].write_to_path(str(self.server_cert))
        client.private_key_pem.write_to_path(str(self.client_key))
        self.client_key.chmod(0o600)
        client.cert_chain_pems[0].write_to_path(str(self.client_cert))


@dataclass
class AgentProcess:
    url: str
    token: str
    read_token: str
    pki: Pki
    proc: subprocess.Popen[bytes]
    config_path: Path
    state_dir: Path
    log_path: Path
    mutual_tls: bool
    started_at: float = 0.0  # time.perf_counter() right before the process started

    def ssl_context(self, *, cert: bool = True) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_pem))
        if cert:
            ctx.load_cert_chain(str(self.pki.client_cert), str(self.pki.client_key))
        return ctx

    def client(self, *, token: str | None = None, cert: bool = True, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return httpx.Client(
            base_url=self.url,
            headers=headers,
            verify=self.ssl_context(cert=cert),
            timeout=30.0,
            **kw,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        """Stop the gunicorn master (and so its worker), by pid."""
        if self.proc.poll() is not None:
            return
        try:
            if sig == signal.SIGKILL:
                os.killpg(self.proc.pid, signal.SIGKILL)  # master and worker at once
            else:
                self.proc.send_signal(sig)
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        except ProcessLookupError:
            pass


def write_config(
    path: Path,
    *,
    port: int,
    pki: Pki,
    state_dir: Path,
    docker_host: str,
    tokens: list[dict[str, Any]],
    mutual_tls: bool,
    roots: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    cfg: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "tls": {
            "cert": str(pki.server_cert),
            "key": str(pki.server_key),
            "client_ca": str(pki.ca_pem) if mutual_tls else None,
        },
        "tokens": tokens,
        "state_dir": str(state_dir),
        "docker_host": docker_host,
        "gunicorn": {"threads": 4, "timeout": 120},
        # The lab's orphan layers are seconds old and nothing pulls images meanwhile: no
        # floor here. An agent on a NAS keeps the default (an hour unchanged).
        "orphan_min_age_seconds": 0,
        "unreadable_pids_allowed": pids_root_may_not_read(),
    }
    if roots:
        cfg["roots"] = roots
    cfg.update(extra or {})
    if cfg.get("btrfs_binary", "btrfs") != "btrfs":
        # another btrfs-progs (4.4.1, or a stand-in): the changes are made with it too
        cfg.setdefault("subvolume_ioctls", False)
    path.write_text(yaml.safe_dump(cfg))


def start_agent(
    workdir: Path,
    *,
    docker_host: str,
    pki: Pki | None = None,
    mutual_tls: bool = False,
    port: int | None = None,
    roots: list[str] | None = None,
    token: str | None = None,
    extra: dict[str, Any] | None = None,
    wait: float = 60.0,
) -> AgentProcess:
    """The agent under gunicorn in ``workdir`` (its config, state, pki and log there),
    once it answers ``/healthz``. ``extra`` adds config keys (e.g. ``btrfs_binary``). The
    same ``workdir`` and ``token`` restart an agent on its state."""
    agent = launch_agent(
        workdir,
        docker_host=docker_host,
        pki=pki,
        mutual_tls=mutual_tls,
        port=port,
        roots=roots,
        token=token,
        extra=extra,
    )
    proc = agent.proc
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited with {proc.returncode}:\n{agent.log()}")
        try:
            with agent.client() as c:
                if c.get("/healthz").status_code == 200:
                    return agent
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    agent.kill()
    raise RuntimeError(f"agent did not answer /healthz within {wait} s:\n{agent.log()}")


@contextmanager
def running_agent(workdir: Path, **kw: Any) -> Iterator[AgentProcess]:
    agent = start_agent(workdir, **kw)
    try:
        yield agent
    finally:
        agent.kill()


def launch_agent(
    workdir: Path,
    *,
    docker_host: str,
    pki: Pki | None = None,
    mutual_tls: bool = False,
    port: int | None = None,
    roots: list[str] | None = None,
    token: str | None = None,
    extra: dict[str, Any] | None = None,
) -> AgentProcess:
    """Write the config and start ``janitor-agent serve``, without waiting for it
    (``AgentProcess.started_at`` is taken right before the process starts)."""
    workdir.mkdir(parents=True, exist_ok=True)
    pki = pki or Pki(workdir / "pki")
    port = port or free_port()
    token = token or new_token()
    read_token = new_token()
    state_dir = workdir / "state"
    config_path = workdir / "agent.yaml"
    write_config(
        config_path,
        port=port,
        pki=pki,
        state_dir=state_dir,
        docker_host=docker_host,
        tokens=[
            {"id": "controller", "sha256": hash_token(token), "scopes": ["read", "clean"]},
            {"id": "viewer", "sha256": hash_token(read_token), "scopes": ["read"]},
        ],
        mutual_tls=mutual_tls,
        roots=roots,
        extra=extra,
    )
    log_path = workdir / "agent.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NAS_JANITOR_")}
    with log_path.open("ab") as log:
        started_at = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "serve", "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    agent = AgentProcess(
        url=f"https://127.0.0.1:{port}",
        token=token,
        read_token=read_token,
        pki=pki,
        proc=proc,
        config_path=config_path,
        state_dir=state_dir,
        log_path=log_path,
        mutual_tls=mutual_tls,
        started_at=started_at,
    )
    return agent
