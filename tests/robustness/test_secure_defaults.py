"""Secure defaults of the real agent (issue 12, cases 3 and 9): plain HTTP only on
loopback unless the config says ``allow_plaintext: true`` (and then the agent says so
at start), secret files others may write or everyone may read are refused (exit 2, a
clear message, no trace), and gunicorn's control socket is off (no
``$HOME/.gunicorn/gunicorn.ctl``)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from agent.http.auth import hash_token, new_token
from lab.agentproc import Pki, free_port, running_agent

NO_DOCKER = "unix:///nonexistent/docker.sock"


def _serve(
    cfg: dict[str, object], tmp_path: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )


def _base(tmp_path: Path) -> dict[str, object]:
    return {
        "state_dir": str(tmp_path / "state"),
        "docker_host": NO_DOCKER,
        "tokens": [{"id": "t", "sha256": hash_token(new_token()), "scopes": ["read"]}],
    }


def test_plain_http_on_every_address_is_refused(tmp_path: Path) -> None:
    r = _serve({**_base(tmp_path), "listen": f"0.0.0.0:{free_port()}"}, tmp_path)
    assert r.returncode == 2, r.stderr
    assert "tls: required to listen on 0.0.0.0" in r.stderr
    assert "allow_plaintext" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("which", ["key", "tokens_file"])
def test_loose_secret_files_are_refused(tmp_path: Path, which: str) -> None:
    pki = Pki(tmp_path / "pki")
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"tokens": _base(tmp_path)["tokens"]}))
    tokens.chmod(0o600)
    loose = pki.server_key if which == "key" else tokens
    loose.chmod(0o644)
    cfg = {
        **_base(tmp_path),
        "listen": f"127.0.0.1:{free_port()}",
        "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key)},
        "tokens": None,
        "tokens_file": str(tokens),
    }
    r = _serve(cfg, tmp_path)
    assert r.returncode == 2, r.stderr
    assert f"{loose} is world-readable (mode 0644)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_plain_http_when_allowed_says_so_at_start(tmp_path: Path) -> None:
    port = free_port()
    cfg = {**_base(tmp_path), "listen": f"0.0.0.0:{port}", "allow_plaintext": True}
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "serve", "--config", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        assert r.status_code == 200
        text = log.read_text()
        assert "serving plain HTTP without TLS on 0.0.0.0" in text, text
    finally:
        proc.terminate()
        proc.wait(30)


def test_no_control_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    with running_agent(tmp_path / "agent", docker_host=NO_DOCKER) as agent:
        with agent.client() as c:
            assert c.get("/healthz").status_code == 200
        time.sleep(1.0)
        made = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
        assert made == [], made
        assert "control" not in agent.log().lower(), agent.log()
