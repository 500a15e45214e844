"""Is the audit log the one this agent kept? Checked once at start-up.

The state store remembers the ``log_id`` (made with the audit file) and the head
``(seq, hash)`` the agent last saw. At start-up:

- no mark yet (a first start, or an agent from before the mark): the current log is
  taken as the agent's own and marked;
- another ``log_id``: the audit file was removed or replaced since (a fresh empty log
  where one with entries existed reads ``ok, count 0`` otherwise): the log is marked
  broken, so appends are refused (``AuditUnavailable``, 503), ``verify`` is not ok with
  the reason, and ``/readyz`` is not ready;
- the same log with fewer entries than last seen, or another hash at the seen ``seq``:
  rolled back to an older copy, handled the same way;
- otherwise the mark moves to the current head.

The mark is also moved on by ``remember`` after each ``verify`` that is ok, so a copy
older than the last verify is caught too. An operator who replaced the log on purpose
runs ``janitor-agent audit accept`` (the agent stopped): the current log is marked as
the agent's own from then on.
"""

from __future__ import annotations

from agent.store.audit import AuditLog
from agent.store.state import StateStore


def check_continuity(audit: AuditLog, state: StateStore) -> str | None:
    """Compare the audit log with the state store's mark; ``mark_broken`` the log and
    return the reason when it is not the log last seen, else move the mark on."""
    mark = state.audit_mark()
    seq, digest = audit.head_entry()
    if mark is not None:
        log_id, seen_seq, seen_hash = mark
        reason = None
        if log_id != audit.log_id:
            reason = (
                f"the audit log {audit.path} is not the one this agent kept (log {log_id} "
                f"with {seen_seq} entries; this is log {audit.log_id} with {seq}): it was "
                "removed or replaced"
            )
        elif seq < seen_seq:
            reason = (
                f"the audit log {audit.path} holds {seq} entries, fewer than the {seen_seq} "
                "this agent saw: it was rolled back to an older copy"
            )
        elif seq == seen_seq and digest != seen_hash:
            reason = f"the audit log {audit.path} differs at entry {seq} from what was seen"
        if reason is not None:
            audit.mark_broken(reason)
            return reason
    state.set_audit_mark(audit.log_id, seq, digest)
    return None


def remember(audit: AuditLog, state: StateStore) -> None:
    """Move the mark to the current head (after an ok ``verify``)."""
    if audit.file_problem() is None:
        seq, digest = audit.head_entry()
        state.set_audit_mark(audit.log_id, seq, digest)


def accept(audit: AuditLog, state: StateStore) -> tuple[str, int]:
    """Take the current log as the agent's own (an operator's decision)."""
    seq, digest = audit.head_entry()
    state.set_audit_mark(audit.log_id, seq, digest)
    return audit.log_id, seq
