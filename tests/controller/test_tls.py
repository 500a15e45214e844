"""TLS for real, on 127.0.0.1: the agent's CA is trusted, a wrong CA is refused, and the
client certificate is presented to an agent that requires one (mutual TLS)."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trustme

from controller.client import AgentClient
from controller.errors import AgentUnreachable


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"status": "ok"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # failed handshakes are what some tests are about


@dataclass
class Pki:
    ca_pem: Path
    other_ca_pem: Path
    client_pem: Path  # key and certificate chain in one file
    client_cert: Path
    client_key: Path
    port: int


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[Pki]:
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("janitorctl@controller")
    paths = Pki(
        ca_pem=tmp_path / "ca.pem",
        other_ca_pem=tmp_path / "other-ca.pem",
        client_pem=tmp_path / "client.pem",
        client_cert=tmp_path / "client-cert.pem",
        client_key=tmp_path / "client-key.pem",
        port=0,
    )
    ca.cert_pem.write_to_path(str(paths.ca_pem))
    trustme.CA().cert_pem.write_to_path(str(paths.other_ca_pem))
    client.private_key_and_cert_chain_pem.write_to_path(str(paths.client_pem))
    client.cert_chain_pems[0].write_to_path(str(paths.client_cert))
    client.private_key_pem.write_to_path(str(paths.client_key))

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_cert.configure_cert(ctx)
    ca.configure_trust(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED  # the agent asks for the controller's certificate
    server = QuietServer(("127.0.0.1", 0), Handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    paths.port = int(server.server_address[1])
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield paths
    server.shutdown()
    server.server_close()
    t.join(timeout=5)


def url(pki: Pki) -> str:
    return f"https://127.0.0.1:{pki.port}"


def test_mutual_tls_with_the_agents_ca(pki: Pki) -> None:
    c = AgentClient(url(pki), token="t", ca=pki.ca_pem, client_cert=pki.client_pem, retries=0)
    assert c.healthz().status == "ok"
    separate = AgentClient(
        url(pki),
        token="t",
        ca=pki.ca_pem,
        client_cert=pki.client_cert,
        client_key=pki.client_key,
        retries=0,
    )
    assert separate.healthz().status == "ok"


def test_an_agent_signed_by_another_ca_is_refused(pki: Pki) -> None:
    c = AgentClient(url(pki), token="t", ca=pki.other_ca_pem, client_cert=pki.client_pem, retries=0)
    with pytest.raises(AgentUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
        c.healthz()


def test_the_system_cas_do_not_trust_a_private_agent_ca(pki: Pki) -> None:
    with pytest.raises(AgentUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
        AgentClient(url(pki), token="t", client_cert=pki.client_pem, retries=0).healthz()


def test_without_a_client_certificate_the_agent_refuses(pki: Pki) -> None:
    with pytest.raises(AgentUnreachable):
        AgentClient(url(pki), token="t", ca=pki.ca_pem, retries=0).healthz()
