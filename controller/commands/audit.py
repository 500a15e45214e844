"""``janitorctl audit``: pull every agent's audit log into the store, check each chain,
and notice when an agent's history was rewritten since the last pull
(``controller.auditsync`` says how)."""

from __future__ import annotations

from dataclasses import asdict

import click

from controller.auditsync import AuditStatus
from controller.commands import global_options
from controller.commands.run import pull_audits, report_more
from controller.errors import ConfigError
from controller.output import agent_error, print_json, table, yes_no
from controller.session import Session


@click.command()
@click.option(
    "--full",
    is_flag=True,
    help="Fetch every entry again and compare each with the one kept (default: from the "
    "last entry kept on).",
)
@click.option(
    "--accept-rewrite",
    "accept",
    multiple=True,
    metavar="AGENT",
    help="Start this agent's history over (e.g. it was reinstalled); the entries kept "
    "so far stay in the store as evidence (repeatable).",
)
@global_options
@click.pass_obj
def audit(session: Session, full: bool, accept: tuple[str, ...]) -> int:
    """Pull and check every agent's audit log.

    Exit 1 when an agent could not be reached, or its log is broken or was rewritten."""
    names = {a.name for a in session.fleet.agents}
    unknown = sorted(set(accept) - names)
    if unknown:
        raise ConfigError(
            f"no such agent in the fleet: {', '.join(unknown)}", where="--accept-rewrite"
        )
    store = session.store
    for name in accept:
        store.new_audit_epoch(name, reason="operator accepted a rewritten history")
    with session.clients() as clients:
        results = pull_audits(session, clients, full=full)
    failed = any(isinstance(r, str) or not r.ok for r in results.values())
    report_more(session, results)
    if session.json:
        print_json(
            session.out,
            [
                {"agent": name, "ok": False, "error": r}
                if isinstance(r, str)
                else {**asdict(r), "ok": r.ok, "error": None}
                for name, r in results.items()
            ],
        )
        return int(failed)
    rows: list[tuple[object, ...]] = []
    for name, r in results.items():
        if isinstance(r, str):
            rows.append((name, "unreachable", "", "", "", "", r))
        else:
            rows.append(_row(r))
    columns = ("AGENT", "STATUS", "NEW", "KEPT UP TO", "AGENT HAS", "AGENT CHECK", "PROBLEM")
    session.out.print(table(None, columns, rows))
    for name, r in results.items():
        if not isinstance(r, str) and r.status == "rewritten":
            agent_error(
                session.err,
                name,
                "history rewritten; when that is expected (agent reinstalled), run "
                f"`janitorctl audit --accept-rewrite {name}`",
            )
    return int(failed)


def _row(r: AuditStatus) -> tuple[object, ...]:
    return (
        r.agent,
        r.status.upper() if not r.ok else r.status,
        f"{r.new} (more left)" if r.more else r.new,
        r.last_seq,
        r.agent_count,
        yes_no(r.agent_ok),
        "; ".join(r.problems),
    )
