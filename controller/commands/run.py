"""``janitorctl run``: the scheduled entry point. For every agent at once (bounded):
findings, a plan under the fleet's policy, the plan applied (unless ``--dry-run``) and
waited for; then every agent's audit pulled and checked; then a summary, kept in the
store for ``report``.

Exit 0 when all went well; 1 when an agent could not be driven to the end, an action
failed, or an audit log did not check out; 2 for bad config (before any agent is called).
Actions the agent skipped (a target that changed since the plan) are not failures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import click
from marshmallow import ValidationError

from controller import auditsync
from controller.auditsync import AuditStatus
from controller.cleanup import AgentRun, run_agent
from controller.client import AgentClient
from controller.commands import json_option
from controller.errors import AgentUnreachable, ConfigError, ControllerError
from controller.fleetops import Outcome
from controller.output import JobProgress, agent_error, bytes_exact, print_json, table, yes_no
from controller.session import Session
from controller.store import AgentRunRecord
from shared.models import Policy
from shared.policy import FINDING_KINDS

SUMMARY_COLUMNS = (
    "AGENT",
    "REACHABLE",
    "FINDINGS",
    "PLANNED",
    "DELETED",
    "SKIPPED",
    "FAILED",
    "RECLAIMED",
    "AUDIT OK",
    "PROBLEM",
)


def policy_options(fn: Any) -> Any:
    fn = click.option(
        "--kind",
        "kinds",
        multiple=True,
        type=click.Choice(FINDING_KINDS),
        help="Plan only these kinds (repeatable; default: the fleet's policy).",
    )(fn)
    return click.option(
        "--min-age",
        "min_age",
        type=click.IntRange(min=0),
        help="Only findings older than this many seconds (default: the fleet's policy).",
    )(fn)


def effective_policy(session: Session, kinds: Sequence[str], min_age: int | None) -> Policy:
    data = session.fleet.policy.to_payload()
    if kinds:
        data["kinds"] = list(kinds)
    if min_age is not None:
        data["min_age_seconds"] = min_age
    try:
        return Policy.parse(data)
    except ValidationError as exc:
        raise ConfigError(str(exc.messages), where="--kind/--min-age") from exc


def summary_rows(records: Sequence[AgentRunRecord]) -> list[tuple[object, ...]]:
    return [
        (
            r.agent,
            yes_no(r.reachable),
            "-" if r.findings is None else r.findings,
            r.planned,
            r.deleted,
            r.plan_skipped + r.skipped,
            r.failed,
            bytes_exact(r.reclaimed_bytes),
            yes_no(r.audit_ok),
            r.error or "",
        )
        for r in records
    ]


def show_summary(
    session: Session, title: str, records: Sequence[AgentRunRecord], extra: dict[str, Any]
) -> None:
    if session.json:
        print_json(session.out, {**extra, "agents": [asdict(r) for r in records]})
        return
    session.out.print(table(title, SUMMARY_COLUMNS, summary_rows(records)))
    total = sum(r.reclaimed_bytes for r in records)
    session.out.print(f"reclaimed in all: {bytes_exact(total)}", highlight=False)


def run_outcomes(
    session: Session, clients: Sequence[AgentClient], policy: Policy, *, dry_run: bool
) -> list[AgentRun]:
    timeouts = session.fleet.timeouts
    progress = JobProgress(session.err)
    with progress.shown():
        outcomes = session.each(
            clients,
            lambda c: run_agent(
                c,
                policy,
                apply=not dry_run,
                job_timeout=timeouts.job,
                poll=timeouts.poll,
                on_progress=progress.for_agent(c.name),
            ),
        )
    return [as_run(o) for o in outcomes]


def as_run(outcome: Outcome[AgentClient, AgentRun]) -> AgentRun:
    """A bug in one agent's worker still yields a failed run for that agent."""
    if outcome.value is not None:
        return outcome.value
    error = ControllerError(outcome.message)
    return AgentRun(agent=outcome.item.name, reachable=False, error=error)


def pull_audits(
    session: Session, clients: Sequence[AgentClient], *, full: bool = False
) -> dict[str, AuditStatus | str]:
    """Every agent's audit pulled (in workers) and reconciled (here); per agent the
    status, or the error that stopped the pull."""
    store = session.store
    last = {c.name: store.audit_state(c.name).last_seq for c in clients}
    outcomes = session.each(clients, lambda c: auditsync.pull(c, last_seq=last[c.name], full=full))
    result: dict[str, AuditStatus | str] = {}
    for o in outcomes:
        if o.value is None:
            result[o.item.name] = o.message
        else:
            result[o.item.name] = auditsync.reconcile(store, o.item.name, o.value)
    return result


@click.command()
@click.option("--dry-run", is_flag=True, help="Plan, but apply nothing.")
@policy_options
@json_option
@click.pass_obj
def run(session: Session, dry_run: bool, kinds: tuple[str, ...], min_age: int | None) -> int:
    """Plan and apply on every agent, pull the audit, print a summary.

    Exit 0 when all went well, 1 when an agent or an action failed or an audit log did
    not check out, 2 for bad config."""
    policy = effective_policy(session, kinds, min_age)
    with session.clients() as clients:
        store = session.store
        run_id = store.start_run("run", dry_run=dry_run, policy=policy.to_payload())
        runs = run_outcomes(session, clients, policy, dry_run=dry_run)
        reachable = [c for c, r in zip(clients, runs, strict=True) if _worth_auditing(r)]
        audits = pull_audits(session, reachable)
    records = []
    for r in runs:
        audit = audits.get(r.agent)
        audit_ok = None if audit is None else (not isinstance(audit, str) and audit.ok)
        records.append(r.record(audit_ok=audit_ok))
        store.add_run_agent(run_id, records[-1])
    failed = any(r.failed for r in runs) or any(r.audit_ok is False for r in records)
    exit_code = int(failed)
    store.finish_run(run_id, exit_code)
    for name, audit in audits.items():
        if isinstance(audit, str):
            agent_error(session.err, name, f"audit: {audit}")
        elif not audit.ok:
            agent_error(session.err, name, f"audit {audit.status}: {'; '.join(audit.problems)}")
    title = f"run {run_id}{' (dry run)' if dry_run else ''}"
    show_summary(session, title, records, {"run": run_id, "dry_run": dry_run, "exit": exit_code})
    return exit_code


def _worth_auditing(run: AgentRun) -> bool:
    """An agent that could not be reached is not asked again for its audit."""
    return not isinstance(run.error, AgentUnreachable) or run.reachable
