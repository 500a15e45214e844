"""Pulling each agent's audit log into the store and checking it.

``pull`` runs in a worker (network only): it asks the agent to verify its own chain,
then fetches the entries from just before the last one the store kept (so that entry
is seen again and compared), or from the start with ``full=True`` (every kept entry is
compared), at most ``max_entries`` of them: an agent with a long history (or one that
never stops sending entries) is pulled over several commands, each going on from where
the last one stopped (``AuditStatus.more``). ``reconcile`` runs in the CLI's thread
(store only) and decides:

- *rewritten*: a kept entry came back with another hash, a kept entry is gone, or the
  agent now has fewer entries than the store kept. Nothing more is stored for that agent
  until an operator accepts the new history (``Store.new_audit_epoch``); the kept
  entries stay as evidence.
- *broken*: the pulled entries do not chain (a ``seq`` that does not follow, a
  ``prev_hash`` that does not link, a hash that does not match its content; checked with
  ``shared.auditchain``, the agent's own definition), the agent's ``/v1/audit/verify``
  says its chain is broken, or its head is not the hash the entries end with. Entries up
  to the first bad one are stored.
- *ok* otherwise; the new entries are stored.
"""

from __future__ import annotations

from dataclasses import dataclass

from controller.client import AgentClient
from controller.store import Store
from shared import auditchain
from shared.models import AuditEntry, AuditVerify, dump

DEFAULT_MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class AuditPull:
    verify: AuditVerify
    after_seq: int  # the entries are those after this seq
    entries: tuple[AuditEntry, ...]
    more: bool = False  # stopped at max_entries: the agent has entries after these


@dataclass(frozen=True)
class AuditStatus:
    agent: str
    status: str  # ok, rewritten, broken
    new: int  # entries stored by this pull
    last_seq: int  # last entry kept, after this pull
    agent_count: int
    agent_ok: bool  # what the agent said of its own chain
    problems: tuple[str, ...] = ()
    more: bool = False  # entries are left for the next pull

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def pull(
    client: AgentClient,
    *,
    last_seq: int,
    full: bool = False,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> AuditPull:
    """Fetch what ``reconcile`` needs (no store access: safe in a worker thread): at
    most ``max_entries`` entries after the last one kept (and that one again), or from
    the start with ``full``; one more is asked for, to know whether there are more."""
    if max_entries < 1:
        raise ValueError("max_entries must be >= 1")
    verify = client.audit_verify()
    after_seq = 0 if full else max(last_seq - 1, 0)
    take = max_entries + (last_seq - after_seq if not full else 0)
    entries = client.audit(after_seq=after_seq, max_entries=take + 1)
    more = len(entries) > take
    return AuditPull(verify=verify, after_seq=after_seq, entries=tuple(entries[:take]), more=more)


def reconcile(store: Store, agent: str, pulled: AuditPull) -> AuditStatus:
    """Compare a pull with what the store kept, store what may be stored, record what
    was noticed, and say how it went."""
    state = store.audit_state(agent)
    known = store.audit_hashes(agent, first=pulled.after_seq, last=state.last_seq)
    verify = pulled.verify
    problems: list[str] = []
    rewritten_at: int | None = None

    # Rewritten history: what the store kept must come back unchanged.
    if verify.count < state.last_seq:
        rewritten_at = verify.count + 1
        problems.append(
            f"the agent now has {verify.count} entries, but {state.last_seq} were pulled "
            "before: history went backwards"
        )
    seen = {e.seq: e.hash for e in pulled.entries}
    # Entries kept before must all come back, up to where this pull stopped.
    compared_to = state.last_seq
    if pulled.more and pulled.entries:
        compared_to = min(compared_to, pulled.entries[-1].seq)
    for seq in range(pulled.after_seq + 1, compared_to + 1):
        if seq not in seen:
            if rewritten_at is None:
                rewritten_at = seq
                problems.append(f"entry {seq}, pulled before, is gone")
            break
        if seen[seq] != known.get(seq):
            rewritten_at = seq if rewritten_at is None else min(rewritten_at, seq)
            problems.append(
                f"entry {seq} differs from the one pulled before: history rewritten"
                + ("" if pulled.after_seq == 0 else " (--full finds the first entry changed)")
            )
            break

    # The chain, from the entry before the first one pulled.
    if pulled.after_seq == 0:
        after_hash = auditchain.GENESIS
    else:
        after_hash = known.get(pulled.after_seq, "")
    bad = auditchain.first_bad_seq(
        (dump(e) for e in pulled.entries), after_seq=pulled.after_seq, after_hash=after_hash
    )
    if rewritten_at is not None:
        bad = None  # the chain from a rewritten entry says nothing more
    if bad is not None:
        problems.append(f"entry {bad} does not chain (seq, prev_hash or hash wrong)")
    if not verify.ok:
        problems.append(f"the agent's own check fails at entry {verify.first_bad_seq}")
    if bad is None and verify.ok:
        # verify ran before the entries were fetched: its head is one of them (or kept).
        expected = auditchain.GENESIS if verify.count == 0 else seen.get(verify.count)
        expected = expected or known.get(verify.count)
        if expected is not None and expected != verify.head:
            problems.append(f"the agent's head is not the hash of its entry {verify.count}")

    if rewritten_at is not None:
        status, to_store = "rewritten", []
    else:
        status = "ok" if not problems else "broken"
        to_store = [
            e for e in pulled.entries if e.seq > state.last_seq and (bad is None or e.seq < bad)
        ]
    problem = "; ".join(problems) or None
    store.save_audit(
        agent,
        to_store,
        status=status,
        problem=problem,
        agent_count=verify.count,
        agent_head=verify.head,
    )
    if problem is not None:
        store.add_audit_event(agent, status, rewritten_at or bad or verify.first_bad_seq, problem)
    return AuditStatus(
        agent=agent,
        status=status,
        new=len(to_store),
        last_seq=to_store[-1].seq if to_store else state.last_seq,
        agent_count=verify.count,
        agent_ok=verify.ok,
        problems=tuple(problems),
        more=pulled.more and status == "ok",
    )
