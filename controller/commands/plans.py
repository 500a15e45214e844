"""``janitorctl plan`` and ``janitorctl apply``: the two-step, reviewed way.

``plan`` asks every agent for a plan under the fleet's policy, shows it and keeps its id
in the store; ``apply`` applies exactly those plans (or the ones named with ``--plan``)
after a confirmation, with a progress bar per agent while the jobs run.
"""

from __future__ import annotations

import sys

import click

from controller.cleanup import apply_recorded
from controller.commands import global_options
from controller.commands.run import as_run, effective_policy, policy_options, show_summary
from controller.errors import ConfigError
from controller.output import JobProgress, agent_error, print_json, table
from controller.session import Session
from shared.humanize import human_bytes
from shared.models import dump


@click.command()
@policy_options
@global_options
@click.pass_obj
def plan(session: Session, kinds: tuple[str, ...], min_age: int | None) -> int:
    """Ask every agent for a plan; show it and keep it for `janitorctl apply`.

    Exit 1 when an agent could not make one."""
    policy = effective_policy(session, kinds, min_age)
    with session.clients() as clients:
        outcomes = session.each(clients, lambda c: c.create_plan(policy))
    store = session.store
    for o in outcomes:
        if o.value is not None:
            store.record_plan(o.item.name, o.value)
    failed = any(not o.ok for o in outcomes)
    if session.json:
        print_json(
            session.out,
            [
                {
                    "agent": o.item.name,
                    "ok": o.ok,
                    "error": o.message or None,
                    "plan": dump(o.value) if o.value is not None else None,
                }
                for o in outcomes
            ],
        )
        return int(failed)
    actions: list[tuple[object, ...]] = []
    skipped: list[tuple[object, ...]] = []
    plans: list[tuple[object, ...]] = []
    for o in outcomes:
        p = o.value
        if p is None:
            continue
        plans.append(
            (
                o.item.name,
                p.id,
                len(p.actions),
                len(p.skipped),
                human_bytes(p.reclaimable_bytes),
                p.expires_at.isoformat(timespec="seconds"),
            )
        )
        for a in p.actions:
            actions.append(
                (o.item.name, a.seq, a.op, str(a.target), human_bytes(a.reclaimable_bytes))
            )
        for sk in p.skipped:
            skipped.append((o.item.name, sk.finding_id, sk.reason))
    if actions:
        session.out.print(table("actions", ("AGENT", "#", "OP", "TARGET", "RECLAIMABLE"), actions))
    if skipped:
        session.out.print(table("not planned", ("AGENT", "FINDING", "REASON"), skipped))
    session.out.print(
        table("plans", ("AGENT", "PLAN", "ACTIONS", "SKIPPED", "RECLAIMABLE", "EXPIRES"), plans)
    )
    for o in outcomes:
        if not o.ok:
            agent_error(session.err, o.item.name, o.message)
    if plans:
        session.out.print("apply them with: janitorctl apply", highlight=False)
    return int(failed)


def _parse_plan_options(values: tuple[str, ...]) -> dict[str, str]:
    chosen = {}
    for value in values:
        agent, sep, plan_id = value.partition("=")
        if not sep or not agent or not plan_id:
            raise ConfigError(f"expected AGENT=PLAN_ID, got {value!r}", where="--plan")
        chosen[agent] = plan_id
    return chosen


@click.command()
@click.option(
    "--plan",
    "plan_ids",
    multiple=True,
    metavar="AGENT=PLAN_ID",
    help="Apply this plan on this agent (repeatable; default: the plans `plan` kept).",
)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@global_options
@click.pass_obj
def apply(session: Session, plan_ids: tuple[str, ...], yes: bool) -> int:
    """Apply the plans `janitorctl plan` made, with progress while the jobs run.

    Exit 1 when an agent or an action failed; agents with no plan kept are left alone."""
    explicit = _parse_plan_options(plan_ids)
    store = session.store
    unknown = sorted(set(explicit) - {a.name for a in session.fleet.agents})
    if unknown:
        raise ConfigError(f"no such agent in the fleet: {', '.join(unknown)}", where="--plan")
    chosen: dict[str, str] = {}
    for agent in session.agents():
        if agent.name in explicit:
            chosen[agent.name] = explicit[agent.name]
        elif not explicit and (pending := store.pending_plan(agent.name)) is not None:
            chosen[agent.name] = pending.plan_id
    if not chosen:
        session.err.print("nothing to apply: no plan kept (run `janitorctl plan` first)")
        return 0
    for name, plan_id in chosen.items():
        session.err.print(f"{name}: plan {plan_id}", markup=False, highlight=False)
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("not a terminal: confirm with --yes")
        if not click.confirm(f"Apply {len(chosen)} plan(s)?", default=False):
            return 1
    timeouts = session.fleet.timeouts
    with session.clients() as all_clients:
        clients = [c for c in all_clients if c.name in chosen]
        run_id = store.start_run("apply", dry_run=False, policy=None)
        progress = JobProgress(session.err)
        with progress.shown():
            outcomes = session.each(
                clients,
                lambda c: apply_recorded(
                    c,
                    chosen[c.name],
                    job_timeout=timeouts.job,
                    poll=timeouts.poll,
                    on_progress=progress.for_agent(c.name),
                    freed_timeout=timeouts.freed,
                ),
            )
    records = []
    failed = False
    for o in outcomes:
        r = as_run(o)
        failed = failed or r.failed
        if r.job is not None:
            store.mark_plan_applied(r.agent, chosen[r.agent], r.job.id)
        records.append(r.record(audit_ok=None))
        store.add_run_agent(run_id, records[-1])
    store.finish_run(run_id, int(failed))
    show_summary(session, f"apply {run_id}", records, {"run": run_id, "exit": int(failed)})
    return int(failed)
