"""Pulling audit logs into the store: only what is new, chains checked, rewrites noticed."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller import auditsync
from controller.store import Store
from shared import auditchain
from tests.controller.conftest import client_for
from tests.controller.fake_agent import FakeAgent


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "controller.db")


def sync(store: Store, fake: FakeAgent, *, full: bool = False) -> auditsync.AuditStatus:
    client = client_for(fake, page_size=4)
    last = store.audit_state(fake.hostname).last_seq
    return auditsync.reconcile(
        store, fake.hostname, auditsync.pull(client, last_seq=last, full=full)
    )


def add(fake: FakeAgent, n: int) -> None:
    for i in range(n):
        fake.log("delete_volume", f"v{len(fake.audit)}", "dry_run", {"i": i})


def audit_requests(fake: FakeAgent) -> list[str]:
    return [r.url.params["after_seq"] for r in fake.requests if r.url.path == "/v1/audit"]


def test_first_pull_then_only_new_entries(store: Store, fake: FakeAgent) -> None:
    add(fake, 6)
    s = sync(store, fake)
    assert (s.status, s.new, s.last_seq, s.agent_count, s.agent_ok) == ("ok", 6, 6, 6, True)
    assert store.audit_entries("nas1") == fake.audit
    fake.requests.clear()
    add(fake, 3)
    s = sync(store, fake)
    assert (s.status, s.new, s.last_seq) == ("ok", 3, 9)
    # from just before the last kept entry, so that entry is compared again
    assert audit_requests(fake) == ["5", "9"]
    fake.requests.clear()
    s = sync(store, fake)
    assert (s.status, s.new) == ("ok", 0)
    assert store.audit_entries("nas1") == fake.audit
    assert store.audit_state("nas1").last_hash == fake.audit[-1]["hash"]


def test_empty_log(store: Store, fake: FakeAgent) -> None:
    s = sync(store, fake)
    assert (s.status, s.new, s.last_seq, s.agent_count) == ("ok", 0, 0, 0)


def test_a_clean_rewrite_of_the_tail_is_noticed(store: Store, fake: FakeAgent) -> None:
    add(fake, 5)
    sync(store, fake)
    kept = store.audit_entries("nas1")
    fake.rewrite_audit(5, outcome="done")  # the agent's own verify stays happy
    add(fake, 2)
    s = sync(store, fake)
    assert s.status == "rewritten" and not s.ok and s.agent_ok
    assert "entry 5 differs" in s.problems[0] and "--full" in s.problems[0]
    assert s.new == 0 and store.audit_entries("nas1") == kept  # evidence kept, nothing added
    (event,) = store.audit_events("nas1")
    assert (event.kind, event.seq) == ("rewritten", 5)
    # and it stays noticed on the next pull
    assert sync(store, fake).status == "rewritten"


def test_a_rewrite_in_the_middle_shows_in_the_head_and_full_finds_where(
    store: Store, fake: FakeAgent
) -> None:
    add(fake, 8)
    sync(store, fake)
    fake.rewrite_audit(3, target="someone else")
    s = sync(store, fake)
    assert s.status == "rewritten" and "entry 8 differs" in s.problems[0]
    s = sync(store, fake, full=True)
    assert s.status == "rewritten" and "entry 3 differs" in s.problems[0]
    assert audit_requests(fake)[-1] == "8" and "0" in audit_requests(fake)


def test_history_that_went_backwards(store: Store, fake: FakeAgent) -> None:
    add(fake, 6)
    sync(store, fake)
    del fake.audit[4:]  # truncated to 4 entries, chain still intact
    s = sync(store, fake)
    assert s.status == "rewritten"
    assert "now has 4 entries, but 6 were pulled before" in s.problems[0]


def test_a_reinstalled_agent_is_a_rewrite_until_accepted(store: Store, fake: FakeAgent) -> None:
    add(fake, 4)
    sync(store, fake)
    fake.audit.clear()
    fake.log("agent.start", "agent", "done", {"fresh": True})
    add(fake, 4)  # a new log: as long or longer, other hashes
    assert sync(store, fake).status == "rewritten"
    old = store.audit_entries("nas1")
    store.new_audit_epoch("nas1", reason="reinstalled")
    s = sync(store, fake)
    assert (s.status, s.new, s.last_seq) == ("ok", 5, 5)
    assert store.audit_entries("nas1") == fake.audit
    assert store.audit_entries("nas1", epoch=0) == old  # the old history stays as evidence
    assert [e.kind for e in store.audit_events("nas1")] == ["rewritten", "accepted"]


def test_an_edited_entry_breaks_the_chain(store: Store, fake: FakeAgent) -> None:
    add(fake, 3)
    sync(store, fake)
    add(fake, 4)
    fake.audit[5]["outcome"] = "done"  # seq 6 edited without its hash: the agent sees it too
    s = sync(store, fake)
    assert s.status == "broken" and not s.agent_ok
    assert any("entry 6 does not chain" in p for p in s.problems)
    assert any("own check fails at entry 6" in p for p in s.problems)
    assert s.last_seq == 5 and s.new == 2  # entries before the break are kept
    assert store.audit_state("nas1").status == "broken"


def test_an_agent_that_lies_about_its_head(store: Store, fake: FakeAgent) -> None:
    add(fake, 3)
    real = fake.route

    def lying(request):  # type: ignore[no-untyped-def]
        response = real(request)
        if request.url.path == "/v1/audit/verify":
            body = response.json()
            body["head"] = "f" * 64
            from tests.controller.fake_agent import ok

            return ok(body)
        return response

    fake.route = lying  # type: ignore[method-assign]
    s = sync(store, fake)
    assert s.status == "broken" and "head is not the hash of its entry 3" in s.problems[0]


def test_entries_kept_are_what_the_agent_hashed(store: Store, fake: FakeAgent) -> None:
    fake.log("volume.remove", "vé", "deleted", {"bytes": 3 << 30, "ids": [300, 301]})
    sync(store, fake)
    (item,) = store.audit_entries("nas1")
    assert auditchain.item_hash(item) == item["hash"] == fake.audit[0]["hash"]
