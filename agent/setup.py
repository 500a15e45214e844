"""``janitor-agent init DIR``: everything one agent and its controller need, in one go.

In ``DIR`` it makes (mode 0600 for every secret):

    agent.yaml              the agent's configuration (listen, TLS paths, tokens_file, ...)
    ca.pem  ca.key          a CA of its own (ca.key signs nothing else: keep it offline)
    secrets/tls.crt         the agent's certificate, for every name and address given
    secrets/tls.key         its key
    secrets/tokens.yaml     the token's id, hash and scopes (what docker-compose.yml hands
                            the agent as a secret, and agent.yaml's tokens_file)
    controller/fleet.yaml   a fleet file for janitorctl pointing at the agent
    controller/ca.pem       the CA, for the fleet file
    controller/tokens/NAME  the token itself

The certificates (``agent.certs``) pass strict verifiers: ``openssl verify
-x509_strict`` and Python's ``VERIFY_X509_STRICT``.

``plan_setup`` decides everything from the options (``SetupError`` for bad ones);
``write_setup`` writes the files (``SetupExists`` when some are there and ``force`` is
not given: nothing is written then).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization

from agent.certs import IpAddress, make_ca, make_server_cert, pem_key
from agent.config import AgentConfig, ConfigError, load_config
from agent.http.auth import hash_token, new_token

DEFAULT_PORT = 8443
DEFAULT_TOKEN_ID = "controller"  # noqa: S105 - a token's name, not a secret
_TOKEN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_AGENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_LISTEN = re.compile(r"^(\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]\s]*)):(?P<port>\d{1,5})$")

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
DIR_MODE = 0o700


class SetupError(ValueError):
    """Options that cannot make a setup; ``problems`` says each."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class SetupExists(FileExistsError):
    """Some of the files ``init`` makes are there already (``paths``)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        super().__init__(", ".join(str(p) for p in self.paths))


@dataclass(frozen=True)
class SetupOptions:
    dir: Path
    listen: str
    sans: tuple[str, ...] = ()
    name: str | None = None
    url: str | None = None
    token_id: str = DEFAULT_TOKEN_ID
    data_root: str | None = None
    docker_host: str | None = None
    state_dir: str | None = None


@dataclass(frozen=True)
class SetupPlan:
    """What ``init`` will write, decided from its options."""

    dir: Path
    listen: str
    host: str  # the listen address's host ("" or 0.0.0.0 / :: for every address)
    port: int
    dns_names: tuple[str, ...]
    ips: tuple[IpAddress, ...]
    name: str  # the agent's name in the fleet file
    url: str
    token_id: str
    agent_config: dict[str, Any] = field(default_factory=dict)

    @property
    def sans(self) -> list[str]:
        return [f"DNS:{d}" for d in self.dns_names] + [f"IP:{ip}" for ip in self.ips]

    # the files, by role
    @property
    def config_path(self) -> Path:
        return self.dir / "agent.yaml"

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def tls_cert(self) -> Path:
        return self.dir / "secrets" / "tls.crt"

    @property
    def tls_key(self) -> Path:
        return self.dir / "secrets" / "tls.key"

    @property
    def tokens_file(self) -> Path:
        return self.dir / "secrets" / "tokens.yaml"

    @property
    def fleet_file(self) -> Path:
        return self.dir / "controller" / "fleet.yaml"

    @property
    def fleet_ca(self) -> Path:
        return self.dir / "controller" / "ca.pem"

    @property
    def token_path(self) -> Path:
        return self.dir / "controller" / "tokens" / self.name

    def files(self) -> list[Path]:
        return [
            self.config_path,
            self.ca_cert,
            self.ca_key,
            self.tls_cert,
            self.tls_key,
            self.tokens_file,
            self.fleet_file,
            self.fleet_ca,
            self.token_path,
        ]


@dataclass(frozen=True)
class SetupResult:
    plan: SetupPlan
    token: str
    ca_pem: bytes
    cert_pem: bytes
    not_after: dt.datetime
    config: AgentConfig


def _parse_ip(text: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def _dns_problem(name: str) -> str | None:
    if len(name) > 253 or not all(_DNS_LABEL.match(label) for label in name.split(".")):
        return f"{name!r} is neither an IP address nor a DNS name"
    if name.replace(".", "").isdigit():
        return f"{name!r} is neither an IP address nor a DNS name"
    return None


def _default_name(dns_names: Sequence[str]) -> str:
    for candidate in (*(d.split(".")[0] for d in dns_names), socket.gethostname().split(".")[0]):
        clean = re.sub(r"[^A-Za-z0-9._-]", "-", candidate).strip("-.")[:63]
        if clean and _AGENT_NAME.match(clean):
            return clean
    return "nas"


def plan_setup(opts: SetupOptions) -> SetupPlan:
    """Check the options and decide names, addresses and the agent's configuration."""
    problems: list[str] = []
    m = _LISTEN.match(opts.listen)
    host, port = "", DEFAULT_PORT
    if m is None:
        problems.append(f"--listen: HOST:PORT, e.g. 192.168.1.10:8443 (got {opts.listen!r})")
    else:
        host = m.group("v6") or m.group("host") or ""
        port = int(m.group("port"))
        if not 0 < port < 65536:
            problems.append("--listen: port out of range")
    dns: list[str] = []
    ips: list[IpAddress] = []
    listen_ip = _parse_ip(host) if host else None
    every_address = host == "" or (listen_ip is not None and listen_ip.is_unspecified)
    if host and not every_address:
        if listen_ip is not None:
            ips.append(listen_ip)
        elif (why := _dns_problem(host)) is None:
            dns.append(host.lower())
        else:
            problems.append(f"--listen: {why}")
    for san in opts.sans:
        ip = _parse_ip(san)
        if ip is not None:
            if ip.is_unspecified:
                problems.append(
                    f"--san {san}: not an address anyone can connect to; give the NAS's "
                    "real address (e.g. --san 192.168.1.10) or its name"
                )
            elif ip not in ips:
                ips.append(ip)
        elif (why := _dns_problem(san)) is not None:
            problems.append(f"--san: {why}")
        elif san.lower() not in dns:
            dns.append(san.lower())
    if not dns and not ips and not problems:
        problems.append(
            f"--san: the agent listens on every address ({opts.listen}): name the address "
            "or name the controller uses to reach it (--san 192.168.1.10, --san nas1.lan)"
        )
    if not _TOKEN_ID.match(opts.token_id):
        problems.append("--token-id: a short name of letters, digits, '.', '_' or '-'")
    name = opts.name or _default_name(dns)
    if not _AGENT_NAME.match(name):
        problems.append("--name: letters, digits, '.', '_' or '-' (at most 63)")
    for option, value in (("--data-root", opts.data_root), ("--state-dir", opts.state_dir)):
        if value is not None and (not value.startswith("/") or "\0" in value or value == "/"):
            problems.append(f"{option}: an absolute path other than /")
    if opts.docker_host is not None and not re.match(r"^(unix|tcp|ssh)://", opts.docker_host):
        problems.append("--docker-host: a URL such as unix:///var/run/docker.sock")

    url_host = ""
    if host and not every_address:
        url_host = f"[{listen_ip}]" if listen_ip is not None and listen_ip.version == 6 else host
    elif dns:
        url_host = dns[0]
    elif ips:
        url_host = f"[{ips[0]}]" if ips[0].version == 6 else str(ips[0])
    url = opts.url or f"https://{url_host}:{port}"
    if opts.url is not None:
        um = re.match(r"^https://(\[[^\]]+\]|[^/:]+)(:\d+)?/?$", opts.url)
        if um is None:
            problems.append("--url: https://HOST[:PORT], a name or address the certificate names")
        else:
            uh = um.group(1)
            uip = _parse_ip(uh)
            if (uip is not None and uip not in ips) or (uip is None and uh.lower() not in dns):
                problems.append(f"--url: {uh} is not among the certificate's names: add --san {uh}")
    if problems:
        raise SetupError(problems)

    directory = opts.dir.absolute()
    secrets_dir = directory / "secrets"
    config: dict[str, Any] = {
        "listen": opts.listen,
        "tls": {"cert": str(secrets_dir / "tls.crt"), "key": str(secrets_dir / "tls.key")},
        "tokens_file": str(secrets_dir / "tokens.yaml"),
        "state_dir": opts.state_dir or AgentConfig.state_dir,
    }
    if opts.data_root:
        config["roots"] = [os.path.normpath(opts.data_root)]
    if opts.docker_host:
        config["docker_host"] = opts.docker_host
    return SetupPlan(
        dir=directory,
        listen=opts.listen,
        host=host,
        port=port,
        dns_names=tuple(dns),
        ips=tuple(ips),
        name=name,
        url=url.rstrip("/"),
        token_id=opts.token_id,
        agent_config=config,
    )


# --------------------------------------------------------------------------- files


def _write(path: Path, data: bytes, mode: int) -> None:
    """``data`` into ``path`` with ``mode`` from its first byte on (a temporary file in
    the same folder, renamed over the old one)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)  # whatever the umask took away or added
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _folder(path: Path) -> None:
    if not path.is_dir():
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        path.chmod(DIR_MODE)


def existing(plan: SetupPlan) -> list[Path]:
    return [p for p in plan.files() if p.exists() or p.is_symlink()]


def write_setup(
    plan: SetupPlan, *, force: bool = False, now: dt.datetime | None = None
) -> SetupResult:
    """Make the CA, the certificate, the token and the files of ``plan``. Raises
    ``SetupExists`` (writing nothing) when one is there and ``force`` is false, and
    ``ConfigError`` if the agent would not take the configuration made (a bug)."""
    there = existing(plan)
    if there and not force:
        raise SetupExists(there)
    now = now or dt.datetime.now(dt.UTC)
    ca_key, ca_cert = make_ca(plan.name, now=now)
    key, cert = make_server_cert(ca_key, ca_cert, dns_names=plan.dns_names, ips=plan.ips, now=now)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    token = new_token()
    tokens = {
        "tokens": [{"id": plan.token_id, "sha256": hash_token(token), "scopes": ["read", "clean"]}]
    }
    fleet = {
        "agents": [
            {
                "name": plan.name,
                "url": plan.url,
                "ca": "ca.pem",
                "token_file": f"tokens/{plan.name}",
            }
        ]
    }
    for folder in (plan.dir, plan.dir / "secrets", plan.fleet_file.parent, plan.token_path.parent):
        _folder(folder)
    header = (
        "# nas-janitor agent, made by `janitor-agent init`: janitor-agent serve --config "
        f"{plan.config_path}\n# every setting: README.md, 'The agent'\n"
    )
    config_text = header + yaml.safe_dump(plan.agent_config, sort_keys=False)
    fleet_header = (
        "# janitorctl's fleet, made by `janitor-agent init`: janitorctl --fleet "
        f"{plan.fleet_file} findings\n# paths are relative to this file's folder; copy the "
        "folder to the controller's host as it is\n"
    )
    _write(plan.ca_key, pem_key(ca_key), SECRET_MODE)
    _write(plan.ca_cert, ca_pem, PUBLIC_MODE)
    _write(plan.tls_key, pem_key(key), SECRET_MODE)
    _write(plan.tls_cert, cert_pem, PUBLIC_MODE)
    _write(plan.tokens_file, yaml.safe_dump(tokens, sort_keys=False).encode(), SECRET_MODE)
    _write(plan.config_path, config_text.encode(), SECRET_MODE)
    _write(plan.fleet_ca, ca_pem, PUBLIC_MODE)
    _write(plan.token_path, (token + "\n").encode(), SECRET_MODE)
    _write(plan.fleet_file, (fleet_header + yaml.safe_dump(fleet, sort_keys=False)).encode(), 0o644)
    config = load_config(plan.config_path, env={})  # the agent takes what was made
    if not config.tokens:
        raise ConfigError([f"{plan.config_path}: no token"])
    return SetupResult(
        plan=plan,
        token=token,
        ca_pem=ca_pem,
        cert_pem=cert_pem,
        not_after=cert.not_valid_after_utc,
        config=config,
    )


# --------------------------------------------------------------------------- the command


def run_init(opts: SetupOptions, *, force: bool, echo: Callable[..., None]) -> int:
    """``janitor-agent init``: 0 made, 1 refused (a setup is there) or failed, 2 bad
    options. ``echo(text, err=False)`` prints."""
    try:
        plan = plan_setup(opts)
    except SetupError as exc:
        for problem in exc.problems:
            echo(f"error: {problem}", err=True)
        return 2
    try:
        made = write_setup(plan, force=force)
    except SetupExists as exc:
        echo(f"error: {plan.dir} holds a setup already; nothing was changed:", err=True)
        for path in exc.paths:
            echo(f"  {path}", err=True)
        echo("give --force to replace it (a new CA, certificate and token)", err=True)
        return 1
    except (OSError, ConfigError) as exc:
        echo(f"error: {exc}", err=True)
        return 1
    d = plan.dir
    echo(f"made in {d}:")
    rows = [
        ("agent.yaml", "the agent's configuration"),
        ("ca.pem, ca.key", "a CA for this agent (ca.key signs nothing else: keep it offline)"),
        (
            "secrets/tls.crt, tls.key",
            f"the agent's certificate for {', '.join(plan.sans)}, "
            f"valid until {made.not_after:%Y-%m-%d}",
        ),
        (
            "secrets/tokens.yaml",
            f"the hash of token {plan.token_id!r} (scopes read, clean)",
        ),
        ("controller/", f"janitorctl's fleet.yaml, ca.pem and tokens/{plan.name}: {plan.url}"),
    ]
    width = max(len(a) for a, _ in rows)
    for name, what in rows:
        echo(f"  {name:<{width}}  {what}")
    echo("")
    echo(f"token: {made.token}")
    echo(
        f"# keep the token secret; it is shown only now (janitorctl reads it from "
        f"controller/tokens/{plan.name})"
    )
    echo("")
    echo("next:")
    echo(f"  janitor-agent serve --config {plan.config_path}")
    echo(f"  janitorctl --fleet {plan.fleet_file} findings")
    return 0
