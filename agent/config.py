"""Agent configuration: one YAML file plus environment overrides.

    listen: "0.0.0.0:8443"
    tls: {cert: /etc/nas-janitor/tls.crt, key: /etc/nas-janitor/tls.key, client_ca: null}
    tokens:                        # or tokens_file: a YAML file holding this list
      - {id: controller, sha256: "<hex>", scopes: [read, clean]}
    roots: []                      # default: the Docker data root
    state_dir: /var/lib/nas-janitor
    docker_host: unix:///var/run/docker.sock
    host_prefix: ""                # where the host's / is mounted, when not at /
    plan_ttl_seconds: 3600
    gunicorn: {workers: 1, threads: 4, timeout: 120, request_timeout: 10}
    btrfs_binary: btrfs            # a name looked up on PATH (and sbin), or a path
    orphan_min_age_seconds: 3600   # an orphan layer is cleaned only after this long unchanged
    allow_plaintext: false         # serve plain HTTP on a non-loopback address (say so)
    subvolume_ioctls: true         # ro flags and subvolume deletes by ioctl (false: btrfs-progs)
    max_stored_plans: 1000         # plans kept at most (expired ones purged first)
    inventory_max_age_seconds: 300 # reads share one kept scan at most this old (0: none)
    unreadable_pids_allowed: []    # pids passed over when what they hold cannot be read

The file is ``$NAS_JANITOR_CONFIG`` (default ``/etc/nas-janitor/agent.yaml``); each
``NAS_JANITOR_<KEY>`` variable below overrides one key. A bad config raises
``ConfigError`` with every problem found, and ``janitor-agent serve`` stops with it.

Secure defaults: without ``tls`` the agent listens only on a loopback address, unless
``allow_plaintext: true`` says plain HTTP is meant (the agent then logs so at start).
Secret files (``tokens_file``, ``tls.key``) are refused when group- or world-writable
or world-readable, as ssh refuses a private key (group-readable is allowed: a
Kubernetes secret reaches a non-root user through its group).
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shared.policy import ORPHAN_MIN_AGE_FLOOR_SECONDS

DEFAULT_PATH = "/etc/nas-janitor/agent.yaml"
SCOPES = frozenset({"read", "clean"})
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TOKEN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

ENV_KEYS = {
    "NAS_JANITOR_LISTEN": "listen",
    "NAS_JANITOR_TLS_CERT": "tls.cert",
    "NAS_JANITOR_TLS_KEY": "tls.key",
    "NAS_JANITOR_CLIENT_CA": "tls.client_ca",
    "NAS_JANITOR_ROOTS": "roots",
    "NAS_JANITOR_STATE_DIR": "state_dir",
    "NAS_JANITOR_DOCKER_HOST": "docker_host",
    "NAS_JANITOR_HOST_PREFIX": "host_prefix",
    "NAS_JANITOR_TOKENS_FILE": "tokens_file",
    "NAS_JANITOR_PLAN_TTL_SECONDS": "plan_ttl_seconds",
    "NAS_JANITOR_BTRFS_BINARY": "btrfs_binary",
    "NAS_JANITOR_ORPHAN_MIN_AGE_SECONDS": "orphan_min_age_seconds",
    "NAS_JANITOR_ALLOW_PLAINTEXT": "allow_plaintext",
    "NAS_JANITOR_SUBVOLUME_IOCTLS": "subvolume_ioctls",
    "NAS_JANITOR_MAX_STORED_PLANS": "max_stored_plans",
    "NAS_JANITOR_INVENTORY_MAX_AGE_SECONDS": "inventory_max_age_seconds",
    "NAS_JANITOR_UNREADABLE_PIDS_ALLOWED": "unreadable_pids_allowed",
}


class ConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid agent configuration:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class TokenEntry:
    id: str
    sha256: str
    scopes: frozenset[str]


@dataclass(frozen=True)
class TlsConfig:
    cert: str | None = None
    key: str | None = None
    client_ca: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.cert and self.key)


@dataclass(frozen=True)
class GunicornConfig:
    workers: int = 1
    threads: int = 4
    timeout: int = 120
    # seconds a request has to arrive whole (TLS handshake, head and body); see
    # agent.http.worker
    request_timeout: int = 10


@dataclass(frozen=True)
class AgentConfig:
    listen: str = "0.0.0.0:8443"
    tls: TlsConfig = field(default_factory=TlsConfig)
    tokens: tuple[TokenEntry, ...] = ()
    roots: tuple[str, ...] = ()  # host paths; empty: the Docker data root
    state_dir: str = "/var/lib/nas-janitor"
    docker_host: str = "unix:///var/run/docker.sock"
    host_prefix: str = ""
    plan_ttl_seconds: int = 3600
    gunicorn: GunicornConfig = field(default_factory=GunicornConfig)
    btrfs_binary: str = "btrfs"
    # The floor under an orphan layer's age that no request can lower: Docker creates a
    # layer's subvolume before it records it (ORPHAN_MIN_AGE_FLOOR_SECONDS by default).
    orphan_min_age_seconds: int = ORPHAN_MIN_AGE_FLOOR_SECONDS
    allow_plaintext: bool = False
    # Read-only flags set and cleared, and subvolumes deleted, with the btrfs ioctls
    # (Linux 4.4 has them; no process); False: with btrfs-progs' processes.
    subvolume_ioctls: bool = True
    max_stored_plans: int = 1000
    # Reads (and /metrics) share one kept scan of the host, scanned again when Docker's
    # events, the btrfs trees or the mount tables say something changed, and at the
    # latest when it is this old; 0 keeps nothing (every read scans).
    inventory_max_age_seconds: int = 300
    # Processes whose open files the agent may fail to read (even root may not, where a
    # supervisor forbids it: some virtual machines' init). Any other process that cannot
    # be read refuses every delete (503 holders_unavailable); one of these is passed
    # over, and each delete then stays blind to what it holds. Empty by default.
    unreadable_pids_allowed: tuple[int, ...] = ()

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


def _pids(value: Any, problems: list[str]) -> tuple[int, ...]:
    """A list of process ids (from the environment: separated by commas or colons)."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        value = [v for v in re.split(r"[,:\s]+", value) if v]
    if not isinstance(value, list):
        problems.append("unreadable_pids_allowed: a list of process ids")
        return ()
    out: list[int] = []
    for v in value:
        try:
            if isinstance(v, bool):
                raise ValueError
            pid = int(v)
            if not 1 <= pid <= 4_194_304:
                raise ValueError
        except (TypeError, ValueError):
            problems.append(f"unreadable_pids_allowed: {v!r} is not a process id")
            continue
        out.append(pid)
    return tuple(out)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def _env_overrides(data: dict[str, Any], env: Mapping[str, str]) -> None:
    for var, key in ENV_KEYS.items():
        if var not in env:
            continue
        raw = env[var]
        value: Any = raw
        if key == "roots":
            value = [p for p in raw.split(":") if p]
        elif key == "plan_ttl_seconds":
            value = raw
        elif key.startswith("tls.") and raw == "":
            value = None
        _set_dotted(data, key, value)


def _load_yaml(path: Path, problems: list[str], what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        problems.append(f"{what}: cannot read {path}: {exc.strerror or exc}")
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problems.append(f"{what}: {path} is not valid YAML: {exc}")
        return None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        problems.append(f"{what}: {path} holds a value that cannot be read: {exc}")
        return None


def _tokens(raw: Any, problems: list[str], where: str) -> tuple[TokenEntry, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append(f"{where}: must be a list of {{id, sha256, scopes}}")
        return ()
    out: list[TokenEntry] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{at}: must be a mapping")
            continue
        tid, digest, scopes = item.get("id"), item.get("sha256"), item.get("scopes")
        if not isinstance(tid, str) or not _TOKEN_ID.match(tid):
            problems.append(f"{at}.id: a short name of letters, digits, '.', '_' or '-'")
            continue
        if tid in seen:
            problems.append(f"{at}.id: duplicate token id {tid!r}")
        seen.add(tid)
        if not isinstance(digest, str) or not _SHA256.match(digest):
            problems.append(f"{at}.sha256: 64 lowercase hex characters (the token's hash)")
            continue
        if not isinstance(scopes, list) or not scopes or not set(scopes) <= SCOPES:
            problems.append(f"{at}.scopes: a non-empty list of {sorted(SCOPES)}")
            continue
        out.append(TokenEntry(id=tid, sha256=digest, scopes=frozenset(scopes)))
    return tuple(out)


def _abs_path(value: Any, key: str, problems: list[str], *, optional: bool) -> str | None:
    if value is None or value == "":
        if not optional:
            problems.append(f"{key}: required")
        return None
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        problems.append(f"{key}: must be an absolute path")
        return None
    return os.path.normpath(value)


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    data: Mapping[str, Any] | None = None,
) -> AgentConfig:
    """Read the config file (or ``data``), apply environment overrides, validate."""
    env = os.environ if env is None else env
    problems: list[str] = []
    raw: dict[str, Any] = {}
    if data is not None:
        raw = dict(data)
    else:
        file = Path(path or env.get("NAS_JANITOR_CONFIG") or DEFAULT_PATH)
        if file.exists() or path is not None or "NAS_JANITOR_CONFIG" in env:
            loaded = _load_yaml(file, problems, "config")
            if loaded is None and not problems:
                loaded = {}
            if loaded is not None and not isinstance(loaded, dict):
                problems.append(f"config: {file} must hold a mapping")
            elif isinstance(loaded, dict):
                raw = loaded
    _env_overrides(raw, env)

    known = {
        "listen",
        "tls",
        "tokens",
        "tokens_file",
        "roots",
        "state_dir",
        "docker_host",
        "host_prefix",
        "plan_ttl_seconds",
        "gunicorn",
        "btrfs_binary",
        "orphan_min_age_seconds",
        "allow_plaintext",
        "subvolume_ioctls",
        "max_stored_plans",
        "inventory_max_age_seconds",
        "unreadable_pids_allowed",
    }
    for key in sorted(set(raw) - known):
        problems.append(f"{key}: unknown setting")

    listen = raw.get("listen", AgentConfig.listen)
    if not isinstance(listen, str) or not re.match(
        r"^(\[[0-9a-fA-F:]+\]|[^:\s]*):\d{1,5}$", listen
    ):
        problems.append("listen: HOST:PORT, e.g. 0.0.0.0:8443")
    elif not 0 < int(listen.rpartition(":")[2]) < 65536:
        problems.append("listen: port out of range")

    tls_raw = raw.get("tls") or {}
    if not isinstance(tls_raw, dict):
        problems.append("tls: must be a mapping with cert, key, client_ca")
        tls_raw = {}
    cert = _abs_path(tls_raw.get("cert"), "tls.cert", problems, optional=True)
    tls_key = _abs_path(tls_raw.get("key"), "tls.key", problems, optional=True)
    ca = _abs_path(tls_raw.get("client_ca"), "tls.client_ca", problems, optional=True)
    if bool(cert) != bool(tls_key):
        problems.append("tls: cert and key go together")
    if ca and not cert:
        problems.append("tls.client_ca: needs tls.cert and tls.key")
    for name, p in (("tls.cert", cert), ("tls.key", tls_key), ("tls.client_ca", ca)):
        if p and not os.path.isfile(p):
            problems.append(f"{name}: no such file: {p}")
    if tls_key and os.path.isfile(tls_key):
        _check_secret_mode(tls_key, "tls.key", problems)

    allow_plaintext = _boolean(raw.get("allow_plaintext", False), "allow_plaintext", problems)
    subvolume_ioctls = _boolean(raw.get("subvolume_ioctls", True), "subvolume_ioctls", problems)
    if isinstance(listen, str) and not (cert and tls_key) and not allow_plaintext:
        host = listen.rpartition(":")[0].strip("[]")
        if not _is_loopback(host):
            problems.append(
                f"tls: required to listen on {host or 'every address'} (not a loopback "
                "address): set tls.cert and tls.key, or allow_plaintext: true to serve "
                "plain HTTP there on purpose"
            )

    tokens = _tokens(raw.get("tokens"), problems, "tokens")
    tokens_file = raw.get("tokens_file")
    if tokens_file:
        tf = _abs_path(tokens_file, "tokens_file", problems, optional=False)
        if tf and os.path.isfile(tf):
            _check_secret_mode(tf, "tokens_file", problems)
        if tf:
            loaded = _load_yaml(Path(tf), problems, "tokens_file")
            if isinstance(loaded, dict):
                loaded = loaded.get("tokens")
            tokens = tokens + _tokens(loaded, problems, f"tokens_file {tf}")
            ids = [t.id for t in tokens]
            for dup in sorted({i for i in ids if ids.count(i) > 1}):
                problems.append(f"tokens: duplicate token id {dup!r}")

    roots_raw = raw.get("roots") or []
    roots: list[str] = []
    if not isinstance(roots_raw, list):
        problems.append("roots: must be a list of absolute paths")
    else:
        for i, r in enumerate(roots_raw):
            p = _abs_path(r, f"roots[{i}]", problems, optional=False)
            if p == "/":
                problems.append(f"roots[{i}]: '/' is too wide a root")
            elif p:
                roots.append(p)

    state_dir = _abs_path(
        raw.get("state_dir", AgentConfig.state_dir), "state_dir", problems, optional=False
    )
    docker_host = raw.get("docker_host", AgentConfig.docker_host)
    if not isinstance(docker_host, str) or not re.match(r"^(unix|tcp|ssh|npipe)://", docker_host):
        problems.append("docker_host: a URL such as unix:///var/run/docker.sock")
    host_prefix: str = ""
    if raw.get("host_prefix"):
        host_prefix = _abs_path(raw["host_prefix"], "host_prefix", problems, optional=False) or ""
        host_prefix = "" if host_prefix == "/" else host_prefix

    ttl: Any = raw.get("plan_ttl_seconds", AgentConfig.plan_ttl_seconds)
    try:
        ttl = int(ttl)
        if not 60 <= ttl <= 7 * 86400:
            raise ValueError
    except (TypeError, ValueError):
        problems.append("plan_ttl_seconds: a whole number from 60 to 604800")
        ttl = AgentConfig.plan_ttl_seconds

    max_plans: Any = raw.get("max_stored_plans", AgentConfig.max_stored_plans)
    try:
        max_plans = int(max_plans)
        if not 10 <= max_plans <= 100_000:
            raise ValueError
    except (TypeError, ValueError):
        problems.append("max_stored_plans: a whole number from 10 to 100000")
        max_plans = AgentConfig.max_stored_plans

    max_age: Any = raw.get("inventory_max_age_seconds", AgentConfig.inventory_max_age_seconds)
    try:
        if isinstance(max_age, bool):
            raise ValueError
        max_age = int(max_age)
        if not 0 <= max_age <= 86400:
            raise ValueError
    except (TypeError, ValueError):
        problems.append("inventory_max_age_seconds: a whole number from 0 to 86400")
        max_age = AgentConfig.inventory_max_age_seconds

    g_raw = raw.get("gunicorn") or {}
    gun = GunicornConfig()
    if not isinstance(g_raw, dict):
        problems.append("gunicorn: must be a mapping")
    else:
        try:
            gun = GunicornConfig(
                workers=int(g_raw.get("workers", 1)),
                threads=int(g_raw.get("threads", 4)),
                timeout=int(g_raw.get("timeout", 120)),
                request_timeout=int(g_raw.get("request_timeout", 10)),
            )
            if gun.workers != 1:
                problems.append(
                    "gunicorn.workers: must be 1 (one process owns the job runner and the "
                    "per-filesystem locks); raise gunicorn.threads instead"
                )
            if not 1 <= gun.threads <= 64 or not 10 <= gun.timeout <= 86400:
                raise ValueError
            if not 2 <= gun.request_timeout <= 300:
                raise ValueError
        except (TypeError, ValueError):
            problems.append(
                "gunicorn: threads 1-64, timeout 10-86400 seconds, request_timeout 2-300 seconds"
            )

    btrfs_binary = raw.get("btrfs_binary") or "btrfs"
    if not isinstance(btrfs_binary, str) or "\0" in btrfs_binary:
        problems.append("btrfs_binary: a command name or an absolute path")
        btrfs_binary = "btrfs"
    elif "/" in btrfs_binary and not btrfs_binary.startswith("/"):
        problems.append("btrfs_binary: a command name or an absolute path")

    orphan_floor: Any = raw.get("orphan_min_age_seconds", ORPHAN_MIN_AGE_FLOOR_SECONDS)
    try:
        if isinstance(orphan_floor, bool):
            raise ValueError
        orphan_floor = int(orphan_floor)
        if not 0 <= orphan_floor <= 7 * 86400:
            raise ValueError
    except (TypeError, ValueError):
        problems.append("orphan_min_age_seconds: a whole number from 0 to 604800")
        orphan_floor = ORPHAN_MIN_AGE_FLOOR_SECONDS

    unreadable = _pids(raw.get("unreadable_pids_allowed"), problems)

    if problems:
        raise ConfigError(problems)
    assert state_dir is not None
    return AgentConfig(
        listen=str(listen),
        tls=TlsConfig(cert=cert, key=tls_key, client_ca=ca),
        tokens=tokens,
        roots=tuple(roots),
        state_dir=state_dir,
        docker_host=str(docker_host),
        host_prefix=host_prefix,
        plan_ttl_seconds=ttl,
        gunicorn=gun,
        btrfs_binary=btrfs_binary,
        orphan_min_age_seconds=orphan_floor,
        unreadable_pids_allowed=unreadable,
        allow_plaintext=allow_plaintext,
        subvolume_ioctls=subvolume_ioctls,
        max_stored_plans=max_plans,
        inventory_max_age_seconds=max_age,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "", a name, 0.0.0.0 / :: are not loopback-only


def _boolean(value: Any, key: str, problems: list[str]) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    problems.append(f"{key}: true or false")
    return False


def _check_secret_mode(path: str, key: str, problems: list[str]) -> None:
    """Refuse a secret file others may change or everyone may read (as ssh does for a
    private key); a group-readable one is fine."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        problems.append(f"{key}: cannot stat {path}: {exc.strerror or exc}")
        return
    loose = []
    if mode & stat.S_IWGRP:
        loose.append("group-writable")
    if mode & stat.S_IWOTH:
        loose.append("world-writable")
    if mode & stat.S_IROTH:
        loose.append("world-readable")
    if loose:
        problems.append(
            f"{key}: {path} is {' and '.join(loose)} (mode {stat.S_IMODE(mode):04o}); "
            f"chmod 600 it (640 for a group that must read it)"
        )
