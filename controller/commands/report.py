"""``janitorctl report``: what was found, reclaimed and refused per agent over time, read
from the store alone (no agent is called; a fleet file is not needed)."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime, timedelta

import click

from controller.commands import global_options
from controller.output import print_json, table
from controller.session import Session
from shared.humanize import bytes_exact


@click.command()
@click.option(
    "--days", type=click.IntRange(min=1), default=30, show_default=True, help="How far back."
)
@click.option(
    "--by",
    type=click.Choice(("day", "run")),
    default="day",
    show_default=True,
    help="One row per agent per day, or per run.",
)
@global_options
@click.pass_obj
def report(session: Session, days: int, by: str) -> int:
    """Found, planned, deleted, refused, failed and reclaimed, per agent over time.

    REFUSED counts what the agents would not touch in runs: findings left out of a plan
    and actions skipped because their target changed. Refusals the agents' audit logs
    recorded (pulled by `run` or `audit`) are listed too. Exit 0."""
    since = datetime.now(UTC) - timedelta(days=days)
    store = session.store
    rows = store.report(since=since, by=by, agents=session.agent_names or None)
    refusals = store.audit_outcomes("refused", since=since, agents=session.agent_names or None)
    events = [
        e
        for e in store.audit_events()
        if e.at >= since.isoformat(timespec="seconds").replace("+00:00", "Z")
        and (not session.agent_names or e.agent in session.agent_names)
    ]
    if session.json:
        print_json(
            session.out,
            {
                "since": since.isoformat(timespec="seconds"),
                "by": by,
                "rows": [asdict(r) for r in rows],
                "audit_refusals": [{"agent": a, "day": d, "count": n} for a, d, n in refusals],
                "audit_events": [asdict(e) for e in events],
            },
        )
        return 0
    columns = (
        "PERIOD",
        "AGENT",
        "RUNS",
        "FOUND",
        "PLANNED",
        "DELETED",
        "REFUSED",
        "FAILED",
        "ERRORS",
        "RECLAIMED",
    )
    session.out.print(
        table(
            f"last {days} days, by {by}",
            columns,
            [
                (
                    r.period,
                    r.agent,
                    r.runs,
                    r.found,
                    r.planned,
                    r.deleted,
                    r.refused,
                    r.failed,
                    r.errors,
                    bytes_exact(r.reclaimed_bytes),
                )
                for r in rows
            ],
        )
    )
    totals: dict[str, int] = {}
    for r in rows:
        totals[r.agent] = totals.get(r.agent, 0) + r.reclaimed_bytes
    for agent, total in sorted(totals.items()):
        session.out.print(f"{agent}: reclaimed {bytes_exact(total)}", highlight=False)
    if refusals:
        session.out.print(
            table(
                "refusals in the audit logs (every caller, direct DELETEs too)",
                ("DAY", "AGENT", "REFUSED"),
                [(d, a, n) for a, d, n in refusals],
            )
        )
    if events:
        session.out.print(
            table(
                "audit problems noticed",
                ("AT", "AGENT", "KIND", "SEQ", "DETAIL"),
                [(e.at, e.agent, e.kind, e.seq, e.detail) for e in events],
            )
        )
    return 0
