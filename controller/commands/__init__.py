"""One module per ``janitorctl`` subcommand; ``controller.cli`` wires them into the group."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from controller.session import Session

F = TypeVar("F", bound=Callable[..., Any])


def json_option(fn: F) -> F:
    """``--json`` after the subcommand, as well as before it."""

    def set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if value:
            ctx.find_object(Session).json = True  # type: ignore[union-attr]

    return click.option(
        "--json",
        "json_output",
        is_flag=True,
        expose_value=False,
        callback=set_json,
        help="Machine-readable output on stdout.",
    )(fn)
