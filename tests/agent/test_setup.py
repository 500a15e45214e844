"""``janitor-agent init``: the files it makes, their modes, certificates that strict
verifiers accept (Python's ssl with VERIFY_X509_STRICT, ``openssl verify -x509_strict``,
a real TLS handshake to the agent under gunicorn started from those files), refusals and
exit codes."""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.cli import cli
from agent.config import load_config
from agent.http.auth import hash_token
from lab.agentproc import free_port


def init(tmp: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["init", str(tmp), *args], catch_exceptions=False)


def token_of(result: Result) -> str:
    line = next(x for x in result.output.splitlines() if x.startswith("token: "))
    return line.removeprefix("token: ")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def made(tmp_path: Path) -> tuple[Path, Result]:
    d = tmp_path / "nas1"
    r = init(
        d,
        "--listen",
        "127.0.0.1:18443",
        "--san",
        "nas1.lan",
        "--san",
        "localhost",
        "--san",
        "::1",
        "--state-dir",
        str(tmp_path / "state"),
        "--data-root",
        "/volume1/@docker",
    )
    assert r.exit_code == 0, r.output
    return d, r


def test_init_makes_every_file_with_secrets_owner_only(made: tuple[Path, Result]) -> None:
    d, r = made
    secret = [
        "ca.key",
        "secrets/tls.key",
        "secrets/tokens.yaml",
        "agent.yaml",
        "controller/tokens/nas1",
    ]
    public = ["ca.pem", "secrets/tls.crt", "controller/ca.pem", "controller/fleet.yaml"]
    for rel in secret:
        assert mode(d / rel) == 0o600, rel
    for rel in public:
        assert (d / rel).is_file(), rel
        assert not mode(d / rel) & 0o022, rel
    for folder in ("", "secrets", "controller", "controller/tokens"):
        assert mode(d / folder) == 0o700, folder
    token = token_of(r)
    # the token is shown once, and kept only in the controller's token file
    assert r.output.count(token) == 1
    assert (d / "controller/tokens/nas1").read_text().strip() == token
    for rel in ("agent.yaml", "secrets/tokens.yaml", "controller/fleet.yaml"):
        assert token not in (d / rel).read_text()
    # the next two commands
    lines = r.output.strip().splitlines()
    assert lines[-2].strip() == f"janitor-agent serve --config {d / 'agent.yaml'}"
    assert lines[-1].strip() == f"janitorctl --fleet {d / 'controller/fleet.yaml'} findings"


def test_the_agent_takes_the_config_and_the_token(
    made: tuple[Path, Result], tmp_path: Path
) -> None:
    d, r = made
    config = load_config(d / "agent.yaml", env={})
    assert config.listen == "127.0.0.1:18443"
    assert config.tls.cert == str(d / "secrets/tls.crt")
    assert config.tls.key == str(d / "secrets/tls.key")
    assert config.roots == ("/volume1/@docker",)
    assert config.state_dir == str(tmp_path / "state")
    # the default orphan floor: init does not lower it
    assert config.orphan_min_age_seconds == 3600
    (entry,) = config.tokens
    assert entry.id == "controller" and entry.scopes == {"read", "clean"}
    assert entry.sha256 == hash_token(token_of(r))


def test_the_fleet_file_points_at_the_agent(made: tuple[Path, Result]) -> None:
    from controller.fleet import load_fleet

    d, _ = made
    fleet = load_fleet(str(d / "controller/fleet.yaml"))
    (agent,) = fleet.agents
    assert agent.name == "nas1"
    assert agent.url == "https://127.0.0.1:18443"
    raw = yaml.safe_load((d / "controller/fleet.yaml").read_text())
    assert raw["agents"][0]["ca"] == "ca.pem" and raw["agents"][0]["token_file"] == "tokens/nas1"
    assert (d / "controller/ca.pem").read_bytes() == (d / "ca.pem").read_bytes()


def test_certificates_carry_the_extensions_strict_verifiers_want(
    made: tuple[Path, Result],
) -> None:
    d, _ = made
    ca, leaf = cert(d / "ca.pem"), cert(d / "secrets/tls.crt")
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["nas1.lan", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    leaf.verify_directly_issued_by(ca)


def test_openssl_verify_x509_strict_accepts_them(made: tuple[Path, Result]) -> None:
    d, _ = made
    for extra in ([], ["-verify_ip", "127.0.0.1"], ["-verify_hostname", "nas1.lan"]):
        out = subprocess.run(
            [
                "openssl",
                "verify",
                "-x509_strict",
                "-purpose",
                "sslserver",
                *extra,
                "-CAfile",
                str(d / "ca.pem"),
                str(d / "secrets/tls.crt"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0 and out.stdout.strip().endswith(": OK"), out.stderr
    wrong = subprocess.run(
        [
            "openssl",
            "verify",
            "-x509_strict",
            "-verify_hostname",
            "other.lan",
            "-CAfile",
            str(d / "ca.pem"),
            str(d / "secrets/tls.crt"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert wrong.returncode != 0  # the check can fail


def strict_context(ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx


@contextmanager
def serving(config: Path, workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``janitor-agent serve --config`` under gunicorn from the files init made."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NAS_JANITOR_")}
    log = workdir / "agent.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(10)


def wait_up(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"agent did not listen: {log.read_text()[-3000:]}")


def test_a_strict_tls_handshake_with_the_agent_under_gunicorn(tmp_path: Path) -> None:
    port = free_port()
    d = tmp_path / "setup"
    r = init(d, "--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "state"))
    assert r.exit_code == 0, r.output
    with serving(d / "agent.yaml", tmp_path) as proc:
        wait_up(port, proc, tmp_path / "agent.log")
        ctx = strict_context(d / "ca.pem")
        # by address: the listen address is in the certificate
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            peer = tls.getpeercert()
            assert ("IP Address", "127.0.0.1") in peer["subjectAltName"]
        with httpx.Client(verify=ctx, timeout=10) as c:
            h = c.get(f"https://127.0.0.1:{port}/healthz")
            assert h.status_code == 200 and h.json() == {"status": "ok"}
            token = token_of(r)
            auth = {"Authorization": f"Bearer {token}"}
            # the token init printed is the one the agent knows (503: no Docker here,
            # but past the token check; a wrong token is 401)
            assert c.get(f"https://127.0.0.1:{port}/v1/host", headers=auth).status_code != 401
            bad = {"Authorization": "Bearer nj_" + "x" * 43}
            assert c.get(f"https://127.0.0.1:{port}/v1/host", headers=bad).status_code == 401
        # a name the certificate does not hold is refused by the same strict client
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            pytest.raises(ssl.SSLCertVerificationError),
        ):
            ctx.wrap_socket(raw, server_hostname="nas9.lan")


def test_init_refuses_to_overwrite_unless_forced(made: tuple[Path, Result]) -> None:
    d, first = made
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    again = init(d, "--listen", "127.0.0.1:18443", "--san", "nas1.lan")
    assert again.exit_code == 1
    assert "holds a setup already" in again.output and "--force" in again.output
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before
    forced = init(d, "--listen", "127.0.0.1:18443", "--san", "nas1.lan", "--force")
    assert forced.exit_code == 0, forced.output
    assert token_of(forced) != token_of(first)
    assert (d / "ca.pem").read_bytes() != before[d / "ca.pem"]
    assert mode(d / "ca.key") == 0o600 and mode(d / "secrets/tls.key") == 0o600


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--listen", "0.0.0.0:8443", "--san", "0.0.0.0"], "real address"),
        (["--listen", "0.0.0.0:8443", "--san", "::"], "real address"),
        (["--listen", "0.0.0.0:8443"], "--san"),
        (["--listen", "nas1"], "HOST:PORT"),
        (["--listen", "10.0.0.1:99999"], "port"),
        (["--listen", "10.0.0.1:8443", "--san", "bad_name!"], "neither"),
        (["--listen", "10.0.0.1:8443", "--token-id", "a b"], "--token-id"),
        (["--listen", "10.0.0.1:8443", "--data-root", "relative"], "--data-root"),
        (["--listen", "10.0.0.1:8443", "--url", "https://other.lan:8443"], "not among"),
        (["--listen", "10.0.0.1:8443", "--docker-host", "/run/docker.sock"], "--docker-host"),
    ],
)
def test_bad_options_exit_2_and_write_nothing(tmp_path: Path, args: list[str], says: str) -> None:
    d = tmp_path / "x"
    r = init(d, *args)
    assert r.exit_code == 2, r.output
    assert says in r.output
    assert not d.exists()


def test_every_address_with_names_and_a_url(tmp_path: Path) -> None:
    d = tmp_path / "x"
    r = init(
        d,
        "--listen",
        "0.0.0.0:8443",
        "--san",
        "192.168.1.10",
        "--san",
        "NAS1.lan",
        "--name",
        "office",
        "--url",
        "https://nas1.lan:8443",
    )
    assert r.exit_code == 0, r.output
    san = cert(d / "secrets/tls.crt").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.DNSName) == ["nas1.lan"]
    assert san.value.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.168.1.10")]
    fleet: dict[str, Any] = yaml.safe_load((d / "controller/fleet.yaml").read_text())
    assert fleet["agents"][0] == {
        "name": "office",
        "url": "https://nas1.lan:8443",
        "ca": "ca.pem",
        "token_file": "tokens/office",
    }
    # the default URL without --url: the first name given
    e = tmp_path / "y"
    r = init(e, "--listen", "0.0.0.0:8443", "--san", "nas2.lan", "--san", "10.0.0.2")
    assert r.exit_code == 0, r.output
    assert "https://nas2.lan:8443" in (e / "controller/fleet.yaml").read_text()
