"""``janitor-agent``: serve the API, set up an agent (``init``), scan and clean one NAS
without a server (``scan``, ``clean``), make tokens, check the config, health-check.

Exit codes: 0 ok, 1 a check failed, 2 bad configuration or usage; ``scan`` and ``clean``
also 3 (something found but not cleaned: see ``agent.local``).
"""

from __future__ import annotations

import json
import os
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import yaml

from agent import __version__
from agent.config import SCOPES, AgentConfig, ConfigError, load_config
from shared.policy import DEFAULT_MIN_AGE_SECONDS, FINDING_KINDS, MAX_AGE_SECONDS

# the environment variable glibc reads for how many malloc arenas a process may have
MALLOC_ARENA_MAX = "MALLOC_ARENA_MAX"

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML config file (default: $NAS_JANITOR_CONFIG or /etc/nas-janitor/agent.yaml).",
)


def _load(config_path: str | None) -> AgentConfig:
    try:
        return load_config(config_path)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(2) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="janitor-agent")
def cli() -> None:
    """nas-janitor agent: finds and safely removes btrfs subvolumes Docker leaks."""


def gunicorn_options(config: AgentConfig) -> dict[str, Any]:
    """gunicorn settings for a small NAS, as plain JSON values: a few threads, no
    control socket. ``agent.http.master`` adds the worker class (gthread with a
    buffering front, ``agent.http.worker``: a thread gets a request only once it has
    arrived whole, within ``gunicorn.request_timeout``) and the hook that makes
    gunicorn's own error answers problems."""
    opts: dict[str, Any] = {
        "bind": config.listen,
        "workers": config.gunicorn.workers,
        "threads": config.gunicorn.threads,
        # open connections at most (each buffers at most 64 KiB of head and 256 KiB of
        # body: 160 MiB in all at worst); more wait in the listen backlog
        "worker_connections": 512,
        "timeout": config.gunicorn.timeout,
        "graceful_timeout": 30,
        "keepalive": 5,
        "accesslog": "-",
        "errorlog": "-",
        "loglevel": "info",
        "access_log_format": '%(h)s "%(r)s" %(s)s %(b)s %(M)sms',
        "forwarded_allow_ips": "127.0.0.1",
        # the longest request line gunicorn takes (its default is 4094 bytes): a query
        # may carry a whole path (``under``, up to 4096 bytes, PATH_MAX)
        "limit_request_line": 8190,
        # gunicorn 25.1+ opens a control socket ($XDG_RUNTIME_DIR or $HOME/.gunicorn/
        # gunicorn.ctl, shared by every gunicorn of the user) that can add workers or
        # stop the server: the agent has no use for it
        "control_socket_disable": True,
        "http_protocols": "h1",
    }
    if config.tls.enabled:
        opts["certfile"] = config.tls.cert
        opts["keyfile"] = config.tls.key
        if config.tls.client_ca:
            opts["ca_certs"] = config.tls.client_ca
            opts["cert_reqs"] = int(ssl.CERT_REQUIRED)
    return opts


@cli.command()
@CONFIG_OPTION
def serve(config_path: str | None) -> None:
    """Serve the API under gunicorn (TLS when a certificate is configured)."""
    config = _load(config_path)
    if not config.tokens:
        click.echo("warning: no tokens configured; every /v1 request will get 401", err=True)
    if not config.tls.enabled:
        host = config.host_port[0] or "0.0.0.0"
        note = "" if config.allow_plaintext else " (loopback only)"
        click.echo(
            f"warning: serving plain HTTP without TLS on {host}{note}: tokens and answers "
            "travel unencrypted",
            err=True,
        )

    # This process becomes gunicorn's master, lean: see agent.http.master.
    from agent.http.handover import HANDOVER, handover, write_handover

    handed = handover(config, gunicorn_options(config))
    sys.stdout.flush()
    sys.stderr.flush()
    if not sys.executable:  # no interpreter to start again: serve from this process
        from agent.http import master

        raise SystemExit(master.main(handed))
    # the config goes over in an inherited anonymous file, not in the environment
    env = {**os.environ, HANDOVER: str(write_handover(handed))}
    # glibc's malloc gives each new thread an arena of its own (up to 8 per core), and
    # what a thread frees stays in its arena: the worker's request threads and scan
    # pools would each keep some. Two arenas, as gunicorn's docs advise for threaded
    # workers (BENCHMARKS.md, B4); a value set by the user is kept.
    env.setdefault(MALLOC_ARENA_MAX, "2")
    # the same interpreter on a fixed module: no shell, nothing from outside
    argv = [sys.executable, "-m", "agent.http.master"]
    os.execve(sys.executable, argv, env)  # noqa: S606


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--listen", required=True, help="HOST:PORT the agent listens on, e.g. 192.168.1.10:8443."
)
@click.option(
    "--san",
    "sans",
    multiple=True,
    help="A DNS name or IP address the certificate names (repeatable); the listen "
    "address's host is named already when it is one.",
)
@click.option("--name", default=None, help="The agent's name in the fleet file.")
@click.option("--url", default=None, help="The URL janitorctl uses (default from the names).")
@click.option("--data-root", default=None, help="Act only under this path (Docker's data root).")
@click.option("--docker-host", default=None, help="Docker's socket URL.")
@click.option("--state-dir", default=None, help="Plans, jobs and the audit log.")
@click.option("--token-id", default="controller", show_default=True, help="The token's name.")
@click.option("--force", is_flag=True, help="Replace a setup that is there.")
def init(
    directory: Path,
    listen: str,
    sans: tuple[str, ...],
    name: str | None,
    url: str | None,
    data_root: str | None,
    docker_host: str | None,
    state_dir: str | None,
    token_id: str,
    force: bool,
) -> None:
    """Make a CA, the agent's certificate, a token, the agent's config and a fleet file
    for janitorctl in DIRECTORY. Exit 0 made, 1 refused or failed, 2 bad options."""
    from agent.setup import SetupOptions, run_init

    opts = SetupOptions(
        dir=directory,
        listen=listen,
        sans=sans,
        name=name,
        url=url,
        token_id=token_id,
        data_root=data_root,
        docker_host=docker_host,
        state_dir=state_dir,
    )
    raise SystemExit(run_init(opts, force=force, echo=click.echo))


KIND_OPTION = click.option(
    "--kind",
    "kinds",
    multiple=True,
    type=click.Choice(FINDING_KINDS),
    help="Only findings of this kind (repeatable).",
)
MIN_AGE_OPTION = click.option(
    "--min-age",
    "min_age",
    type=click.IntRange(0, MAX_AGE_SECONDS),
    default=DEFAULT_MIN_AGE_SECONDS,
    show_default=True,
    help="Seconds a finding must be old (an orphan layer: never under the config's "
    "orphan_min_age_seconds).",
)


@cli.command()
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="The findings as the API's JSON.")
@KIND_OPTION
@MIN_AGE_OPTION
@click.pass_context
def scan(
    ctx: click.Context,
    config_path: str | None,
    as_json: bool,
    kinds: tuple[str, ...],
    min_age: int,
) -> None:
    """What is left over on this NAS (no server needed). Exit 0 nothing found, 3 found,
    1 failed, 2 bad usage or config."""
    from agent.local import LocalEnv, make_console
    from agent.local import scan as run_scan

    config = _load(config_path)
    env = ctx.obj if isinstance(ctx.obj, LocalEnv) else LocalEnv()
    raise SystemExit(
        run_scan(
            config,
            env,
            make_console(),
            make_console(stderr=True),
            as_json=as_json,
            kinds=kinds,
            min_age_seconds=min_age,
        )
    )


@cli.command()
@CONFIG_OPTION
@click.option("--yes", is_flag=True, help="Delete for real (without it: a dry run).")
@KIND_OPTION
@MIN_AGE_OPTION
@click.option("--include-named", is_flag=True, help="Named docker-in-docker volumes too.")
@click.option(
    "--wait",
    "wait_seconds",
    type=click.FloatRange(0, 86400),
    default=60.0,
    show_default=True,
    help="Seconds to wait for a running agent's job to end before giving up (exit 1).",
)
@click.pass_context
def clean(
    ctx: click.Context,
    config_path: str | None,
    yes: bool,
    kinds: tuple[str, ...],
    min_age: int,
    include_named: bool,
    wait_seconds: float,
) -> None:
    """Plan a clean-up of this NAS and, with --yes, carry it out (no server needed).
    Exit 0 nothing to do or all done, 1 something failed, 2 bad usage or config,
    3 found but not cleaned (a dry run, or blocked)."""
    from agent.local import CleanOptions, LocalEnv, make_console
    from agent.local import clean as run_clean

    config = _load(config_path)
    env = ctx.obj if isinstance(ctx.obj, LocalEnv) else LocalEnv()
    opts = CleanOptions(
        yes=yes,
        min_age_seconds=min_age,
        kinds=kinds or CleanOptions.kinds,
        include_named=include_named,
        wait_seconds=wait_seconds,
    )
    raise SystemExit(run_clean(config, env, opts, make_console(), make_console(stderr=True)))


@cli.group()
def token() -> None:
    """Make API tokens."""


@token.command("new")
@click.option("--id", "token_id", required=True, help="A short name; the audit log's actor.")
@click.option("--scopes", default="read", show_default=True, help="Comma-separated: read,clean")
def token_new(token_id: str, scopes: str) -> None:
    """Print a new random token once, and the config entry that holds its hash."""
    wanted = [s.strip() for s in scopes.split(",") if s.strip()]
    bad = sorted(set(wanted) - SCOPES)
    if not wanted or bad:
        raise click.UsageError(f"--scopes takes {sorted(SCOPES)}; got {scopes!r}")
    try:
        load_config(
            data={
                "listen": "127.0.0.1:8443",
                "tokens": [{"id": token_id, "sha256": "0" * 64, "scopes": wanted}],
            },
            env={},
        )
    except ConfigError as exc:
        raise click.UsageError("; ".join(exc.problems)) from None
    from agent.http.auth import hash_token, new_token

    tok = new_token()
    entry = {"id": token_id, "sha256": hash_token(tok), "scopes": wanted}
    click.echo(f"token: {tok}")
    click.echo("# keep the token secret; it is shown only now. Add this to the agent's tokens:")
    click.echo(yaml.safe_dump({"tokens": [entry]}, sort_keys=False).rstrip())


@cli.group()
def audit() -> None:
    """The audit log in the state directory."""


@audit.command("accept")
@CONFIG_OPTION
def audit_accept(config_path: str | None) -> None:
    """Take the audit log now in the state directory as this agent's own, after it
    was replaced or started afresh on purpose (run it with the agent stopped). Until
    then the agent refuses every mutation and reports the log as not ok."""
    import os

    from agent.errors import AgentError
    from agent.store.audit import AuditLog
    from agent.store.continuity import accept
    from agent.store.state import StateStore

    config = _load(config_path)
    try:
        with (
            AuditLog(os.path.join(config.state_dir, "audit.db")) as log,
            StateStore(os.path.join(config.state_dir, "state.db")) as state,
        ):
            before = state.audit_mark()
            log_id, seq = accept(log, state)
            log.append(
                actor="agent",
                action="audit.accept",
                target=f"audit log {log_id}",
                outcome="accepted",
                detail={
                    "previous_log_id": before[0] if before else None,
                    "previous_seq": before[1] if before else None,
                    "entries": seq,
                },
            )
            accept(log, state)
    except AgentError as exc:
        click.echo(f"{exc.code}: {exc.detail}", err=True)
        raise SystemExit(1) from None
    click.echo(f"audit log {log_id} ({seq} entries) is now this agent's own")


@cli.command("check-config")
@CONFIG_OPTION
def check_config(config_path: str | None) -> None:
    """Validate the configuration and print it (token hashes elided)."""
    from agent.domain.inventory import resolve_roots
    from agent.domain.paths import PathMap

    config = _load(config_path)
    shown = {
        "listen": config.listen,
        "tls": {
            "cert": config.tls.cert,
            "key": config.tls.key,
            "client_ca": config.tls.client_ca,
        },
        "tokens": [{"id": t.id, "scopes": sorted(t.scopes)} for t in config.tokens],
        "roots": list(config.roots) or "(the Docker data root)",
        # a root through a symlink is resolved once at start: the agent acts under this
        "roots_resolved": dict(resolve_roots(config.roots, PathMap(config.host_prefix))[1]),
        "state_dir": config.state_dir,
        "docker_host": config.docker_host,
        "host_prefix": config.host_prefix,
        "plan_ttl_seconds": config.plan_ttl_seconds,
        "orphan_min_age_seconds": config.orphan_min_age_seconds,
        "unreadable_pids_allowed": list(config.unreadable_pids_allowed),
        "allow_plaintext": config.allow_plaintext,
        "gunicorn": {
            "threads": config.gunicorn.threads,
            "timeout": config.gunicorn.timeout,
            "request_timeout": config.gunicorn.request_timeout,
        },
    }
    click.echo(json.dumps(shown, indent=2))


@cli.command()
@CONFIG_OPTION
@click.option("--timeout", default=5.0, show_default=True)
def healthcheck(config_path: str | None, timeout: float) -> None:
    """GET /healthz on the configured listen address; exit 0 when it answers ok."""
    import urllib.error
    import urllib.request

    config = _load(config_path)
    host, port = config.host_port
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    scheme = "https" if config.tls.enabled else "http"
    url = f"{scheme}://{host}:{port}/healthz"
    ctx = None
    if config.tls.enabled:
        # A liveness probe on our own port: the certificate's name need not match
        # 127.0.0.1, and a client CA (mutual TLS) would refuse us without a key.
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=ctx) as resp:  # noqa: S310
            ok = resp.status == 200 and json.load(resp).get("status") == "ok"
    except ssl.SSLError as exc:
        # With mutual TLS the handshake is refused without a client certificate:
        # the server answered, so it is alive.
        ok = "CERTIFICATE_REQUIRED" in str(exc) or "alert" in str(exc).lower()
    except (OSError, ValueError, urllib.error.URLError) as exc:
        click.echo(f"unhealthy: {exc}", err=True)
        raise SystemExit(1) from None
    if not ok:
        click.echo("unhealthy", err=True)
        raise SystemExit(1)
    click.echo("ok")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cli.main(args=list(argv) if argv is not None else None, standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return 2
    except click.exceptions.Abort:
        return 1
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
