"""One NAS, no server: ``janitor-agent scan`` and ``janitor-agent clean``.

Both build the agent's own runtime (``agent.runtime.build_runtime``) over the real
btrfs-progs and Docker, on the configured state directory: the findings, plans, safety
rules, jobs and audit log are the API's, and the audit chain is the one a running agent
keeps. The audit actor is ``local:<unix user>``.

``clean`` is a dry run unless ``yes``: it makes the plan (audited, as ``POST /v1/plans``
is) and shows what would be deleted and its bytes. With ``yes`` it takes the state
directory's lease (``agent.store.lease``: no running agent mutates meanwhile, and it
waits up to ``wait_seconds`` for one that does), applies the plan as a job and follows
it to its end, one line per action.

Exit codes (``EXIT_*``): 0 nothing to do, or everything done; 1 something failed (an
action, Docker or btrfs away, the lease held elsewhere, the audit log refused); 2 bad
usage or configuration; 3 something was found but not cleaned: a dry run, or findings
the rules block (in use, too young, protected, named, report-only...).
"""

from __future__ import annotations

import json
import os
import pwd
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from agent.clean.jobs import JobView
from agent.config import AgentConfig
from agent.domain.findings import Finding, Target
from agent.domain.inventory import Clock, utcnow
from agent.domain.plans import Action, ActionResult, Plan
from agent.errors import AgentError, Busy
from agent.http import wire
from agent.runtime import Backends, Runtime, build_runtime
from agent.store.continuity import check_continuity
from shared.humanize import bytes_exact, human_age
from shared.policy import (
    DEFAULT_MIN_AGE_SECONDS,
    DEFAULT_PLAN_KINDS,
    Policy,
    PolicyError,
)
from shared.wirepath import safe_text

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PENDING = 3  # found, not cleaned: a dry run, or blocked
ACTIVE = frozenset({"queued", "running"})


@dataclass(frozen=True)
class LocalEnv:
    """What the commands run over: the real backends by default (tests pass fakes)."""

    backends: Backends | None = None
    clock: Clock = utcnow
    poll_seconds: float = 0.2


@dataclass(frozen=True)
class CleanOptions:
    yes: bool = False
    min_age_seconds: int = DEFAULT_MIN_AGE_SECONDS
    kinds: tuple[str, ...] = DEFAULT_PLAN_KINDS
    include_named: bool = False
    wait_seconds: float = 60.0


def local_actor() -> str:
    """``local:<the effective unix user>``: never a token id (those have no colon)."""
    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return f"local:{user}"


def make_console(*, stderr: bool = False) -> Console:
    """A console; not a terminal (a log, a mail from a scheduler): 250 columns wide at
    least, so that paths of Docker's layers rarely fold."""
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        console = Console(stderr=stderr, highlight=False, width=max(console.width, 250))
    return console


def target_text(t: Target) -> str:
    if t.type == "volume":
        return safe_text(f"volume {t.name}")
    if t.type == "filesystem":
        return f"filesystem {t.name or ''}".strip()
    return safe_text(t.path or f"{t.type} {t.id}")


def _table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    t = Table(title=title, title_justify="left", header_style="bold", expand=False)
    for name in columns:
        t.add_column(name, overflow="fold")
    for row in rows:
        t.add_row(*(Text("" if v is None else str(v)) for v in row))
    return t


def _say(console: Console, text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def open_runtime(config: AgentConfig, env: LocalEnv, *, holder: str) -> Runtime:
    return build_runtime(config, backends=env.backends, clock=env.clock, holder=holder)


def _finding_status(f: Finding) -> str:
    if f.blocked_by:
        return "; ".join(safe_text(b) for b in f.blocked_by)
    if f.named:
        return "named: cleaned only with --include-named"
    return "cleanable"


# --------------------------------------------------------------------------- scan


def scan(
    config: AgentConfig,
    env: LocalEnv,
    out: Console,
    err: Console,
    *,
    as_json: bool = False,
    kinds: Sequence[str] = (),
    min_age_seconds: int = DEFAULT_MIN_AGE_SECONDS,
) -> int:
    """Print the findings (the API's ``GET /v1/findings``); 0 when there are none, 3 when
    there are some, 1 when they cannot be had."""
    try:
        rt = open_runtime(config, env, holder=f"janitor-agent scan by {local_actor()}")
        if out.is_terminal and not as_json:
            with out.status("scanning the subvolumes, volumes and layers...", spinner="dots"):
                found = rt.inventory.findings(kinds=kinds or None, min_age_seconds=min_age_seconds)
        else:
            found = rt.inventory.findings(kinds=kinds or None, min_age_seconds=min_age_seconds)
    except AgentError as exc:
        _say(err, f"error: {exc.code}: {exc.detail}")
        return EXIT_FAILED
    if as_json:
        items = [wire.finding(f) for f in found]
        out.file.write(json.dumps({"items": items}, separators=(",", ":")) + "\n")
        return EXIT_PENDING if found else EXIT_OK
    if not found:
        _say(out, "nothing found: no leftovers")
        return EXIT_OK
    rows = [
        (
            f.kind,
            target_text(f.target),
            bytes_exact(f.reclaimable_bytes),
            human_age(f.age_seconds),
            _finding_status(f),
        )
        for f in found
    ]
    out.print(_table(None, ["KIND", "TARGET", "SIZE", "AGE", "STATUS"], rows))
    cleanable = [f for f in found if not f.blocked_by and f.kind in DEFAULT_PLAN_KINDS]
    sizes = [f.reclaimable_bytes for f in cleanable]
    total = None if any(s is None for s in sizes) else sum(s or 0 for s in sizes)
    _say(
        out,
        f"{len(found)} finding(s); {len(cleanable)} cleanable by default "
        f"({bytes_exact(total)}): `janitor-agent clean` shows what it would delete",
    )
    return EXIT_PENDING


# --------------------------------------------------------------------------- clean


def _plan_table(plan: Plan) -> Table:
    rows = [
        (
            a.seq,
            a.kind,
            target_text(a.target),
            len(a.subvolume_ids) or "-",
            bytes_exact(a.reclaimable_bytes),
        )
        for a in plan.actions
    ]
    return _table(None, ["#", "KIND", "TARGET", "SUBVOLUMES", "SIZE"], rows)


def _skipped_table(plan: Plan, targets: dict[str, Finding]) -> Table:
    rows = []
    for s in plan.skipped:
        f = targets.get(s.finding_id)
        rows.append(
            (
                f.kind if f else "?",
                target_text(f.target) if f else s.finding_id,
                safe_text(s.reason),
            )
        )
    return _table("not planned", ["KIND", "TARGET", "WHY"], rows)


def _what(plan: Plan) -> str:
    subvolumes = sum(len(a.subvolume_ids) for a in plan.actions)
    volumes = sum(1 for a in plan.actions if a.op == "remove_volume")
    parts = [f"{subvolumes} subvolume(s)"]
    if volumes:
        parts.append(f"{volumes} volume(s)")
    folders = sum(1 for a in plan.actions if a.op == "remove_folder")
    if folders:
        parts.append(f"{folders} folder(s)")
    return " and ".join(parts)


class _Follow:
    """A job followed to its end: a bar on a terminal, one line per action always."""

    def __init__(self, out: Console, plan: Plan) -> None:
        self.out = out
        self.plan = plan
        self.seen: set[int] = set()

    def lines(self, job: JobView, say: Callable[[str], None]) -> None:
        for r in job.results:
            if r.seq in self.seen:
                continue
            self.seen.add(r.seq)
            say(_result_line(self.plan.action(r.seq), r, job.total))


def _result_line(action: Action, r: ActionResult, total: int) -> str:
    size = f" {bytes_exact(r.reclaimed_bytes)}" if r.reclaimed_bytes else ""
    detail = "" if r.outcome == "deleted" else f": {safe_text(r.detail)}"
    return f"[{action.seq}/{total}] {r.outcome} {target_text(action.target)}{size}{detail}"


def _wait(rt: Runtime, job_id: str, plan: Plan, out: Console, env: LocalEnv) -> JobView:
    follow = _Follow(out, plan)
    job = rt.jobs.job(job_id)
    if out.is_terminal:
        with Progress(
            TextColumn("job {task.fields[job]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[state]}"),
            console=out,
            transient=True,
        ) as bar:
            task = bar.add_task("job", total=job.total, job=job_id[:8], state=job.state)
            while True:
                follow.lines(job, lambda line: _say(bar.console, line))
                bar.update(task, completed=job.done, state=job.state)
                if job.state not in ACTIVE:
                    break
                time.sleep(env.poll_seconds)
                job = rt.jobs.job(job_id)
    else:
        _say(out, f"job {job_id}: {len(plan.actions)} action(s)")
        while True:
            follow.lines(job, lambda line: _say(out, line))
            if job.state not in ACTIVE:
                break
            time.sleep(env.poll_seconds)
            job = rt.jobs.job(job_id)
    return job


def clean(
    config: AgentConfig,
    env: LocalEnv,
    opts: CleanOptions,
    out: Console,
    err: Console,
) -> int:
    """Plan a clean-up under the options' policy and, with ``opts.yes``, carry it out.
    The exit code is one of ``EXIT_*``."""
    try:
        policy = Policy(
            kinds=opts.kinds or DEFAULT_PLAN_KINDS,
            min_age_seconds=opts.min_age_seconds,
            include_named_volumes=opts.include_named,
        )
    except PolicyError as exc:
        _say(err, f"error: {exc}")
        return EXIT_USAGE
    actor = local_actor()
    holder = f"janitor-agent clean by {actor}"
    try:
        rt = open_runtime(config, env, holder=holder)
    except AgentError as exc:
        _say(err, f"error: {exc.code}: {exc.detail}")
        return EXIT_FAILED
    held = False
    try:
        if opts.yes:
            try:
                rt.lease.acquire()
            except Busy:
                if opts.wait_seconds <= 0:
                    raise
                who = rt.lease.current_holder() or "another process"
                _say(err, f"waiting up to {opts.wait_seconds:g} s for {who} to finish")
                rt.lease.acquire(wait=opts.wait_seconds)
            held = True
        broken = check_continuity(rt.audit, rt.state)
        if broken is not None:
            _say(err, f"error: audit_unavailable: {broken}")
            _say(err, "nothing was changed; see `janitor-agent audit accept`")
            return EXIT_FAILED
        return _clean(rt, env, opts, policy, actor, out, err)
    except AgentError as exc:
        _say(err, f"error: {exc.code}: {exc.detail}")
        return EXIT_FAILED
    finally:
        if held:
            rt.lease.release()


def _clean(
    rt: Runtime,
    env: LocalEnv,
    opts: CleanOptions,
    policy: Policy,
    actor: str,
    out: Console,
    err: Console,
) -> int:
    audit_before = rt.audit.head_entry()[0]
    if out.is_terminal:
        with out.status("planning...", spinner="dots"):
            plan = rt.planner.create(policy, actor=actor)
    else:
        plan = rt.planner.create(policy, actor=actor)
    # the findings behind the skipped ones, to name their targets
    targets = (
        {f.id: f for f in rt.inventory.findings(kinds=policy.kinds, min_age_seconds=0)}
        if plan.skipped
        else {}
    )
    mode = "" if opts.yes else " (dry run: nothing is changed)"
    _say(out, f"plan {plan.id}{mode}")
    if plan.actions:
        out.print(_plan_table(plan))
    if plan.skipped:
        out.print(_skipped_table(plan, targets))
    if not plan.actions:
        if plan.skipped:
            _say(out, f"nothing to clean now; {len(plan.skipped)} finding(s) not planned")
            return EXIT_PENDING
        _say(out, "nothing to clean")
        return EXIT_OK
    if not opts.yes:
        _say(
            out,
            f"would delete {_what(plan)}: {bytes_exact(plan.reclaimable_bytes)}; "
            "run again with --yes to do it",
        )
        return EXIT_PENDING
    job_id = rt.jobs.apply(plan.id, idempotency_key=None, actor=actor)
    try:
        job = _wait(rt, job_id, plan, out, env)
    except KeyboardInterrupt:
        _say(err, f"stopped: job {job_id} reads interrupted; the next clean plans afresh")
        return EXIT_FAILED
    outcomes = [r.outcome for r in job.results]
    counts = ", ".join(f"{outcomes.count(o)} {o}" for o in sorted(set(outcomes))) or "no action"
    audit_after = rt.audit.head_entry()[0]
    destroyed = [r for r in job.results if r.destroyed_anything]
    # unknown (btrfs quotas off) when any of what went has no size
    reclaimed = None if any(r.reclaimed_bytes is None for r in destroyed) else job.reclaimed_bytes
    _say(out, f"job {job.id} {job.state}: {counts}; reclaimed {bytes_exact(reclaimed)}")
    _say(
        out,
        f"audit log: entries {audit_before + 1}-{audit_after} by {actor} in "
        f"{os.path.join(rt.config.state_dir, 'audit.db')}",
    )
    if job.state in ("failed", "partial", "interrupted") or "failed" in outcomes:
        return EXIT_FAILED
    if job.state == "skipped" or "skipped" in outcomes or plan.skipped:
        return EXIT_PENDING
    return EXIT_OK
