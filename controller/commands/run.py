"""``janitorctl run``: the scheduled entry point. For every agent at once (bounded, and
each within ``timeouts.agent``): findings, a plan under the fleet's policy, the plan
applied (unless ``--dry-run``) and waited for, the agent's audit pulled; then each audit
checked against the store, a summary kept in the store for ``report``, and sent to
the fleet's ``notify`` targets (``controller.notify``), whose failures are reported and
change nothing else.

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

from controller import auditsync, notify
from controller.auditsync import AuditPull, AuditStatus
from controller.cleanup import AgentRun, run_agent
from controller.client import AgentClient
from controller.commands import global_options
from controller.errors import AgentUnreachable, ConfigError, ControllerError, message_for
from controller.fleetops import Outcome
from controller.output import JobProgress, agent_error, print_json, table, yes_no
from controller.session import Session
from controller.store import AgentRunRecord
from shared.humanize import bytes_exact
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
    for r in records:
        if r.pending_bytes:
            session.out.print(
                f"{r.agent}: {bytes_exact(r.pending_bytes)} deleted but not freed yet "
                "(the kernel frees it in the background)",
                highlight=False,
            )


def run_outcomes(
    session: Session, clients: Sequence[AgentClient], policy: Policy, *, dry_run: bool
) -> list[tuple[AgentRun, AuditPull | str | None]]:
    """Per agent, in its worker: the run, then its audit pulled (the pull, or the error
    that stopped it; None when the agent could not be reached at all)."""
    timeouts = session.fleet.timeouts
    max_entries = session.fleet.limits.audit_entries
    last = {c.name: session.store.audit_state(c.name).last_seq for c in clients}
    progress = JobProgress(session.err)

    def work(client: AgentClient) -> tuple[AgentRun, AuditPull | str | None]:
        run = run_agent(
            client,
            policy,
            apply=not dry_run,
            job_timeout=timeouts.job,
            poll=timeouts.poll,
            on_progress=progress.for_agent(client.name),
            freed_timeout=timeouts.freed,
        )
        if not _worth_auditing(run):
            return run, None
        try:
            pulled = auditsync.pull(client, last_seq=last[client.name], max_entries=max_entries)
        except Exception as exc:  # the run's result stands; the pull's error is reported
            return run, message_for(exc)
        return run, pulled

    with progress.shown():
        outcomes = session.each(clients, work)
    return [o.value if o.value is not None else (as_run(o), None) for o in outcomes]


def as_run(outcome: Outcome[AgentClient, Any]) -> AgentRun:
    """A bug in one agent's worker still yields a failed run for that agent."""
    if isinstance(outcome.value, AgentRun):
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
    max_entries = session.fleet.limits.audit_entries
    outcomes = session.each(
        clients,
        lambda c: auditsync.pull(c, last_seq=last[c.name], full=full, max_entries=max_entries),
    )
    result: dict[str, AuditStatus | str] = {}
    for o in outcomes:
        if o.value is None:
            result[o.item.name] = o.message
        else:
            result[o.item.name] = auditsync.reconcile(store, o.item.name, o.value)
    return result


def report_more(session: Session, audits: dict[str, AuditStatus | str]) -> None:
    """Say which agents have audit entries left for the next pull."""
    for name, audit in audits.items():
        if not isinstance(audit, str) and audit.more:
            session.err.print(
                f"{name}: audit: {audit.new} entries pulled (limits.audit_entries), more "
                f"are left: the next run or audit goes on after entry {audit.last_seq}",
                markup=False,
                highlight=False,
            )


@click.command()
@click.option("--dry-run", is_flag=True, help="Plan, but apply nothing.")
@policy_options
@global_options
@click.pass_obj
def run(session: Session, dry_run: bool, kinds: tuple[str, ...], min_age: int | None) -> int:
    """Plan and apply on every agent, pull the audit, print a summary.

    Exit 0 when all went well, 1 when an agent or an action failed or an audit log did
    not check out, 2 for bad config."""
    policy = effective_policy(session, kinds, min_age)
    with session.clients() as clients:
        store = session.store
        run_id = store.start_run("run", dry_run=dry_run, policy=policy.to_payload())
        outcomes = run_outcomes(session, clients, policy, dry_run=dry_run)
    runs = [r for r, _ in outcomes]
    audits: dict[str, AuditStatus | str] = {}
    for r, pulled in outcomes:
        if isinstance(pulled, AuditPull):
            audits[r.agent] = auditsync.reconcile(store, r.agent, pulled)
        elif pulled is not None:
            audits[r.agent] = pulled
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
    report_more(session, audits)
    summary = run_summary(run_id, dry_run, exit_code, records, audits)
    sent = notify.send_all(
        session.fleet.notify,
        summary,
        timeout=session.fleet.timeouts.notify,
        transport=session.notify_transport,
    )
    for result in sent:
        show_notify(session, result)
    title = f"run {run_id}{' (dry run)' if dry_run else ''}"
    extra: dict[str, Any] = {"run": run_id, "dry_run": dry_run, "exit": exit_code}
    if sent:
        extra["notify"] = [asdict(n) for n in sent]
    show_summary(session, title, records, extra)
    return exit_code


def run_summary(
    run_id: int,
    dry_run: bool,
    exit_code: int,
    records: Sequence[AgentRunRecord],
    audits: dict[str, AuditStatus | str],
) -> notify.RunSummary:
    agents = []
    for r in records:
        audit = audits.get(r.agent)
        problems = [r.error] if r.error else []
        if audit is None:
            word = "not pulled"
        elif isinstance(audit, str):
            word = "not pulled"
            problems.append(f"audit: {audit}")
        else:
            word = audit.status
            if not audit.ok:
                problems.append(f"audit {audit.status}: {'; '.join(audit.problems)}")
        agents.append(
            notify.AgentSummary(
                agent=r.agent,
                reachable=r.reachable,
                deleted=r.deleted,
                reclaimed_bytes=r.reclaimed_bytes,
                failed=r.failed,
                audit=word,
                problem="; ".join(problems) or None,
            )
        )
    return notify.RunSummary(run_id, dry_run, exit_code, tuple(agents))


def show_notify(session: Session, result: notify.NotifyResult) -> None:
    """One line on stderr per notification target: sent, skipped, or why not sent."""
    where = f"notify {result.target} ({result.format})"
    if result.skipped:
        text = f"{where}: not sent (on: failure, and the run went well)"
    elif result.sent:
        text = f"{where}: sent in {result.seconds:.2f}s"
    else:
        text = f"{where}: NOT SENT: {result.error} (the run's result stands)"
    session.err.print(text, markup=False, highlight=False)


def _worth_auditing(run: AgentRun) -> bool:
    """An agent that could not be reached is not asked again for its audit."""
    return not isinstance(run.error, AgentUnreachable) or run.reachable
