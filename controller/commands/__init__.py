"""One module per ``janitorctl`` subcommand; ``controller.cli`` wires them into the group."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from controller.session import Session

F = TypeVar("F", bound=Callable[..., Any])


def configure_logging(verbose: int) -> None:
    """Warnings only; ``-v`` info, ``-vv`` debug with every request (and the traceback
    of an internal error)."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    logging.getLogger().setLevel((logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)])
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)


def _session(ctx: click.Context) -> Session:
    session = ctx.find_object(Session)
    assert session is not None, "janitorctl's commands run under its group"
    return session


def _set_fleet(ctx: click.Context, _param: click.Parameter, value: Path | None) -> None:
    if value is not None:
        _session(ctx).fleet_path = value


def _set_store(ctx: click.Context, _param: click.Parameter, value: Path | None) -> None:
    if value is not None:
        _session(ctx).store_path = value


def _add_agents(ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]) -> None:
    if value:
        session = _session(ctx)
        session.agent_names = (*session.agent_names, *value)


def _add_labels(ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]) -> None:
    if value:
        session = _session(ctx)
        session.labels = (*session.labels, *value)


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        _session(ctx).json = True


def _add_verbose(ctx: click.Context, _param: click.Parameter, value: int) -> None:
    if value:
        session = _session(ctx)
        session.verbose += value
        configure_logging(session.verbose)


def global_options(fn: F) -> F:
    """janitorctl's global options after the subcommand, as well as before it
    (``janitorctl run --fleet F`` is ``janitorctl --fleet F run``), as kubectl takes
    them. Given in both places, the one after the command wins (``--agent``,
    ``--label`` and ``-v`` add up)."""
    after = " (also before the command)"
    decorators = [
        click.option(
            "--fleet",
            type=click.Path(dir_okay=False, path_type=Path),
            expose_value=False,
            callback=_set_fleet,
            help=f"Fleet file (YAML){after}.",
        ),
        click.option(
            "--store",
            type=click.Path(dir_okay=False, path_type=Path),
            expose_value=False,
            callback=_set_store,
            help=f"SQLite store{after}.",
        ),
        click.option(
            "--agent",
            multiple=True,
            metavar="NAME",
            expose_value=False,
            callback=_add_agents,
            help=f"Only this agent{after}.",
        ),
        click.option(
            "--label",
            multiple=True,
            metavar="KEY=VALUE",
            expose_value=False,
            callback=_add_labels,
            help=f"Only agents so labelled{after}.",
        ),
        click.option(
            "--json",
            is_flag=True,
            expose_value=False,
            callback=_set_json,
            help=f"Machine-readable output on stdout{after}.",
        ),
        click.option(
            "-v",
            "--verbose",
            count=True,
            expose_value=False,
            callback=_add_verbose,
            help=f"Log more{after}.",
        ),
    ]
    for decorate in reversed(decorators):
        fn = decorate(fn)
    return fn
