"""``janitorctl findings``: what every agent found, in one table."""

from __future__ import annotations

import click

from controller.commands import global_options
from controller.output import agent_error, print_json, table
from controller.session import Session
from shared.humanize import human_age, human_bytes
from shared.models import dump
from shared.policy import FINDING_KINDS


@click.command()
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    type=click.Choice(FINDING_KINDS),
    help="Only findings of this kind (repeatable).",
)
@global_options
@click.pass_obj
def findings(session: Session, kinds: tuple[str, ...]) -> int:
    """One table of the findings of the whole fleet.

    Exit 1 when an agent could not be asked (its error is shown; the others are listed)."""
    with session.clients() as clients:
        outcomes = session.each(clients, lambda c: c.findings(kinds=kinds or None))
    failed = any(not o.ok for o in outcomes)
    if session.json:
        print_json(
            session.out,
            [
                {
                    "agent": o.item.name,
                    "ok": o.ok,
                    "error": o.message or None,
                    "findings": [dump(f) for f in o.value] if o.value is not None else None,
                }
                for o in outcomes
            ],
        )
        return int(failed)
    rows = []
    total = 0
    for o in outcomes:
        for f in sorted(o.value or (), key=lambda f: (f.kind, str(f.target))):
            total += f.reclaimable_bytes or 0
            rows.append(
                (
                    o.item.name,
                    f.kind,
                    str(f.target),
                    human_bytes(f.reclaimable_bytes),
                    human_age(f.age_seconds),
                    "; ".join(f.blocked_by) or "-",
                    f.id,
                )
            )
    session.out.print(
        table(
            None,
            ("AGENT", "KIND", "TARGET", "RECLAIMABLE", "AGE", "BLOCKED BY", "ID"),
            rows,
        )
    )
    asked = sum(1 for o in outcomes if o.ok)
    session.out.print(
        f"{len(rows)} findings on {asked} agent(s), {human_bytes(total)} reclaimable in all",
        highlight=False,
    )
    for o in outcomes:
        if not o.ok:
            agent_error(session.err, o.item.name, o.message)
    return int(failed)
