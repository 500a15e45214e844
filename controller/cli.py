"""``janitorctl``: drive a fleet of nas-janitor agents.

    janitorctl --fleet fleet.yaml agents       # who is up, on what kernel and driver
    janitorctl --fleet fleet.yaml findings     # one table for the fleet (--json)
    janitorctl --fleet fleet.yaml plan         # plans per agent, kept for apply
    janitorctl --fleet fleet.yaml apply        # apply them, with progress bars
    janitorctl --fleet fleet.yaml run          # scheduled: plan, apply, audit, summary
    janitorctl --fleet fleet.yaml audit        # pull and check every audit log
    janitorctl report                          # found / reclaimed / refused over time

The global options (``--fleet``, ``--store``, ``--agent``, ``--label``, ``--json``,
``-v``) go before or after the command: ``janitorctl run --fleet fleet.yaml`` too.

Exit codes: 0 all went well; 1 an agent or an action failed (the others still ran), or
the controller itself failed (reported in one line, never a traceback); 2 bad config or
usage (nothing was done).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import click

from controller import __version__
from controller.commands import configure_logging
from controller.commands.agents import agents
from controller.commands.audit import audit
from controller.commands.findings import findings
from controller.commands.plans import apply, plan
from controller.commands.report import report
from controller.commands.run import run
from controller.errors import ConfigError, message_for
from controller.fleet import FLEET_ENV
from controller.session import Session, TransportFactory

STORE_ENV = "NAS_JANITOR_STORE"

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
EXIT_INTERRUPTED = 130

log = logging.getLogger("controller")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--fleet",
    "fleet_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=FLEET_ENV,
    help=f"Fleet file (YAML). Env: {FLEET_ENV}.",
)
@click.option(
    "--store",
    "store_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=STORE_ENV,
    help="SQLite store (default: the fleet's `store`, else "
    "~/.local/state/nas-janitor/controller.db, or /var/lib/nas-janitor/controller.db "
    f"for root). Env: {STORE_ENV}.",
)
@click.option("--agent", "agent_names", multiple=True, metavar="NAME", help="Only this agent.")
@click.option(
    "--label", "labels", multiple=True, metavar="KEY=VALUE", help="Only agents so labelled."
)
@click.option("--json", "json_output", is_flag=True, help="Machine-readable output on stdout.")
@click.option("-v", "--verbose", count=True, help="Log more (-vv: every request).")
@click.version_option(__version__, prog_name="janitorctl")
@click.pass_context
def cli(
    ctx: click.Context,
    fleet_path: Path | None,
    store_path: Path | None,
    agent_names: tuple[str, ...],
    labels: tuple[str, ...],
    json_output: bool,
    verbose: int,
) -> None:
    """Find and safely remove the btrfs subvolumes Docker leaks, on a fleet of NAS boxes.

    The options above go after the command too (janitorctl run --fleet F)."""
    session: Session = ctx.ensure_object(Session)
    session.fleet_path = fleet_path
    session.store_path = store_path
    session.agent_names = agent_names
    session.labels = labels
    session.json = session.json or json_output
    session.verbose = verbose
    configure_logging(verbose)
    ctx.call_on_close(session.close)


for command in (agents, findings, plan, apply, run, audit, report):
    cli.add_command(command)


def main(
    argv: Sequence[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    transport_factory: TransportFactory | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """The console script. ``environ``, ``transport_factory`` and ``sleep`` are for
    tests and embedding (fake agents in-process, no real waits)."""
    env = os.environ if environ is None else environ
    session = Session(
        fleet_path=None,
        store_path=None,
        environ=env,
        transport_factory=transport_factory,
        sleep=sleep,
    )
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        with cli.make_context("janitorctl", args, obj=session) as ctx:
            result = cli.invoke(ctx)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return EXIT_CONFIG if isinstance(exc, click.UsageError) else EXIT_FAILED
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return EXIT_FAILED
    except ConfigError as exc:
        click.echo(f"janitorctl: bad config: {exc}", err=True)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        click.echo("janitorctl: interrupted", err=True)
        return EXIT_INTERRUPTED
    except sqlite3.Error as exc:
        log.debug("store failure", exc_info=True)
        click.echo(f"janitorctl: the store failed: {type(exc).__name__}: {exc}", err=True)
        return EXIT_FAILED
    except Exception as exc:  # a bug, or no memory left: one line, never a traceback
        log.debug("internal error", exc_info=True)
        click.echo(f"janitorctl: {message_for(exc)}", err=True)
        return EXIT_FAILED
    return int(result or 0) if isinstance(result, int) else EXIT_OK
