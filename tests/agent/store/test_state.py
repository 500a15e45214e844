"""The state store against real SQLite files: plans, idempotent jobs, results recorded
once, start-up recovery, concurrency and durability across kill -9."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import Conflict, NotFound
from agent.store.state import StateStore, StoredJob

REPO = Path(__file__).resolve().parents[3]
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def jobs(db: Path) -> dict[str, str]:
    """Every job's state, read from the file itself."""
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT id, state FROM jobs").fetchall())


class FakeClock:
    """Moves one second per reading, so creation order is time order."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.db"


@pytest.fixture
def store(db: Path) -> Iterator[StateStore]:
    with StateStore(db, clock=FakeClock()) as opened:
        yield opened


def plan(store: StateStore, id: str = "p1", *, expires_in: timedelta = timedelta(hours=1)) -> None:
    store.save_plan(id, T0, T0 + expires_in, {"actions": [{"seq": 0, "target": f"/{id}"}]})


def run_python(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def in_threads(n: int, work: Callable[[int], Any]) -> list[Any]:
    """Run work(0..n-1) in n threads released at once; the results, or raise the first
    error."""
    start = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            start.wait()
            results[i] = work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


# --- plans -------------------------------------------------------------------------


def test_plan_round_trip(store: StateStore) -> None:
    body = {"actions": [{"seq": 0, "subvolume_ids": [257, 258]}], "reclaimable_bytes": None}
    saved = store.save_plan("p1", T0, T0 + timedelta(hours=1), body)
    got = store.get_plan("p1")
    assert got == saved
    assert got is not None
    assert (got.id, got.created_at, got.expires_at, got.body) == (
        "p1",
        T0,
        T0 + timedelta(hours=1),
        body,
    )
    assert store.get_plan("nope") is None


def test_saving_a_plan_again_is_a_no_op_but_other_content_conflicts(store: StateStore) -> None:
    plan(store)
    plan(store)
    with pytest.raises(Conflict):
        store.save_plan("p1", T0, T0 + timedelta(hours=1), {"actions": []})
    kept = store.get_plan("p1")
    assert kept is not None and kept.body["actions"][0]["target"] == "/p1"


def test_plan_times_must_be_aware_and_bodies_json_objects(store: StateStore) -> None:
    with pytest.raises(ValueError):
        store.save_plan("p1", datetime(2024, 1, 1), T0, {})
    with pytest.raises(ValueError):
        store.save_plan("p1", T0, T0, {"x": float("nan")})
    with pytest.raises(ValueError):
        store.save_plan("p1", T0, T0, [1, 2])  # type: ignore[arg-type]
    assert store.get_plan("p1") is None


# --- jobs: idempotent creation ----------------------------------------------------


def test_create_job_then_apply_the_same_plan_again(store: StateStore) -> None:
    plan(store)
    job, created = store.create_job_for_plan(
        job_id="j1", plan_id="p1", idempotency_key=None, body={"progress": {"done": 0, "total": 1}}
    )
    assert created
    assert (job.id, job.plan_id, job.state, job.idempotency_key) == ("j1", "p1", "queued", None)
    again, created_again = store.create_job_for_plan(
        job_id="j2", plan_id="p1", idempotency_key=None, body={}
    )
    assert not created_again
    assert again == job
    assert store.get_job("j2") is None
    assert store.get_job("j1") == job
    assert store.get_job_for_plan("p1") == job


def test_the_same_idempotency_key_returns_the_same_job(store: StateStore) -> None:
    plan(store)
    job, created = store.create_job_for_plan(
        job_id="j1", plan_id="p1", idempotency_key="k", body={}
    )
    assert created and job.idempotency_key == "k"
    again, created = store.create_job_for_plan(
        job_id="j2", plan_id="p1", idempotency_key="k", body={}
    )
    assert (again, created) == (job, False)
    # another key for a plan that already has its job: still that job
    other_key, created = store.create_job_for_plan(
        job_id="j3", plan_id="p1", idempotency_key="k2", body={}
    )
    assert (other_key, created) == (job, False)


def test_the_same_idempotency_key_for_another_plan_conflicts(store: StateStore) -> None:
    plan(store, "p1")
    plan(store, "p2")
    store.create_job_for_plan(job_id="j1", plan_id="p1", idempotency_key="k", body={})
    with pytest.raises(Conflict) as caught:
        store.create_job_for_plan(job_id="j2", plan_id="p2", idempotency_key="k", body={})
    assert caught.value.extra == {"job_id": "j1", "plan_id": "p1"}
    assert store.get_job_for_plan("p2") is None
    # p2 can still be applied with another key
    job, created = store.create_job_for_plan(
        job_id="j2", plan_id="p2", idempotency_key="k2", body={}
    )
    assert created and job.plan_id == "p2"


def test_a_job_for_an_unknown_plan_or_a_taken_job_id_is_refused(store: StateStore) -> None:
    with pytest.raises(NotFound):
        store.create_job_for_plan(job_id="j1", plan_id="nope", idempotency_key=None, body={})
    plan(store, "p1")
    plan(store, "p2")
    store.create_job_for_plan(job_id="j1", plan_id="p1", idempotency_key=None, body={})
    with pytest.raises(Conflict):
        store.create_job_for_plan(job_id="j1", plan_id="p2", idempotency_key=None, body={})
    with pytest.raises(ValueError):
        store.create_job_for_plan(
            job_id="j9", plan_id="p2", idempotency_key=None, body={}, state="done"
        )


@pytest.mark.parametrize("shared", [True, False], ids=["one-store", "store-per-thread"])
@pytest.mark.parametrize("key", [None, "k"])
def test_concurrent_applies_create_exactly_one_job(db: Path, shared: bool, key: str | None) -> None:
    """One shared store exercises its lock; a store per thread (separate connections to
    one file) exercises SQLite's write lock alone."""
    n = 8
    stores = [StateStore(db)] * n if shared else [StateStore(db) for _ in range(n)]
    plan(stores[0])
    outcomes: list[tuple[StoredJob, bool]] = in_threads(
        n,
        lambda i: stores[i].create_job_for_plan(
            job_id=f"j{i}", plan_id="p1", idempotency_key=key, body={"by": i}
        ),
    )
    assert sum(created for _, created in outcomes) == 1
    assert len({job.id for job, _ in outcomes}) == 1
    assert stores[0].get_job_for_plan("p1") is not None
    assert jobs(db) == {outcomes[0][0].id: "queued"}
    for each in set(stores):
        each.close()


# --- jobs: updates and start-up recovery -------------------------------------------


def test_update_job(store: StateStore) -> None:
    plan(store)
    job, _ = store.create_job_for_plan(job_id="j1", plan_id="p1", idempotency_key=None, body={})
    updated = store.update_job("j1", state="running", body={"progress": {"done": 1}})
    assert (updated.state, updated.body) == ("running", {"progress": {"done": 1}})
    assert updated.updated_at > job.updated_at
    assert updated.created_at == job.created_at
    assert store.get_job("j1") == updated
    with pytest.raises(NotFound):
        store.update_job("nope", state="running", body={})
    with pytest.raises(ValueError):
        store.update_job("j1", state="exploded", body={})


def test_update_job_with_expect_state_is_a_compare_and_set(store: StateStore) -> None:
    plan(store)
    store.create_job_for_plan(
        job_id="j1", plan_id="p1", idempotency_key=None, body={}, state="interrupted"
    )
    won = in_threads(8, lambda i: _try_resume(store, i))
    assert won.count(True) == 1
    job = store.get_job("j1")
    assert job is not None and job.state == "running"
    with pytest.raises(Conflict):
        store.update_job("j1", state="running", body={}, expect_state={"queued", "interrupted"})


def _try_resume(store: StateStore, i: int) -> bool:
    try:
        store.update_job("j1", state="running", body={"by": i}, expect_state="interrupted")
    except Conflict:
        return False
    return True


def test_mark_interrupted_at_start_up(store: StateStore) -> None:
    states = ["queued", "running", "succeeded", "partial", "failed", "interrupted"]
    for i, state in enumerate(states):
        plan(store, f"p{i}")
        store.create_job_for_plan(
            job_id=f"j{i}", plan_id=f"p{i}", idempotency_key=None, body={}, state=state
        )
    assert store.mark_interrupted() == ["j0", "j1"]
    now = jobs(store.path)
    assert now == {
        "j0": "interrupted",
        "j1": "interrupted",
        "j2": "succeeded",
        "j3": "partial",
        "j4": "failed",
        "j5": "interrupted",
    }
    assert store.mark_interrupted() == []


# --- results ------------------------------------------------------------------------


def test_a_result_is_recorded_once(store: StateStore) -> None:
    plan(store)
    store.create_job_for_plan(job_id="j1", plan_id="p1", idempotency_key=None, body={})
    assert store.record_result("j1", 1, "deleted", {"reclaimed_bytes": 10})
    assert not store.record_result("j1", 1, "failed", {"reclaimed_bytes": 0})
    assert store.record_result("j1", 0, "skipped", {"detail": "in use"})
    results = store.results("j1")
    assert [(r.seq, r.outcome, r.body) for r in results] == [
        (0, "skipped", {"detail": "in use"}),
        (1, "deleted", {"reclaimed_bytes": 10}),
    ]
    assert store.results("unknown") == []
    with pytest.raises(NotFound):
        store.record_result("unknown", 0, "deleted", {})
    with pytest.raises(ValueError):
        store.record_result("j1", 2, "vaporized", {})


def test_a_result_updates_the_job_body_in_the_same_transaction_only_when_new(
    store: StateStore,
) -> None:
    plan(store)
    store.create_job_for_plan(job_id="j1", plan_id="p1", idempotency_key=None, body={"done": 0})
    assert store.record_result("j1", 0, "deleted", {}, job_body={"done": 1})
    assert not store.record_result("j1", 0, "deleted", {}, job_body={"done": 99})
    job = store.get_job("j1")
    assert job is not None and job.body == {"done": 1}


@pytest.mark.parametrize("shared", [True, False], ids=["one-store", "store-per-thread"])
def test_concurrent_records_of_one_result_record_it_once(db: Path, shared: bool) -> None:
    n = 8
    stores = [StateStore(db)] * n if shared else [StateStore(db) for _ in range(n)]
    plan(stores[0])
    stores[0].create_job_for_plan(job_id="j1", plan_id="p1", idempotency_key=None, body={})
    recorded = in_threads(n, lambda i: stores[i].record_result("j1", 0, "deleted", {"by": i}))
    assert recorded.count(True) == 1
    (result,) = stores[0].results("j1")
    assert result.body == {"by": recorded.index(True)}
    for each in set(stores):
        each.close()


# --- properties --------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
json_objects = st.dictionaries(st.text(), json_values, max_size=6)


def test_any_json_object_body_round_trips(tmp_path: Path) -> None:
    with StateStore(tmp_path / "state.db") as store:
        counter = iter(range(10**9))

        @settings(max_examples=75, deadline=None)
        @given(plan_body=json_objects, job_body=json_objects, result_body=json_objects)
        def check(
            plan_body: dict[str, Any], job_body: dict[str, Any], result_body: dict[str, Any]
        ) -> None:
            n = next(counter)
            store.save_plan(f"p{n}", T0, T0, plan_body)
            store.create_job_for_plan(
                job_id=f"j{n}", plan_id=f"p{n}", idempotency_key=None, body=job_body
            )
            store.record_result(f"j{n}", 0, "deleted", result_body)
            stored_plan, stored_job = store.get_plan(f"p{n}"), store.get_job(f"j{n}")
            assert stored_plan is not None and stored_plan.body == plan_body
            assert stored_job is not None and stored_job.body == job_body
            assert store.results(f"j{n}")[0].body == result_body

        check()


# --- durability ---------------------------------------------------------------------


def test_everything_survives_close_and_reopen(db: Path) -> None:
    with StateStore(db) as store:
        plan(store)
        job, _ = store.create_job_for_plan(
            job_id="j1", plan_id="p1", idempotency_key="k", body={"a": 1}
        )
        store.record_result("j1", 0, "deleted", {"b": 2})
        saved_plan, saved_results = store.get_plan("p1"), store.results("j1")
    with StateStore.open(db) as store:
        assert store.get_plan("p1") == saved_plan
        assert store.get_job("j1") == job
        assert store.results("j1") == saved_results


_WORKER = """
import sys
from datetime import UTC, datetime, timedelta
from agent.store.state import StateStore
store = StateStore(sys.argv[1])
now = datetime.now(UTC)
store.save_plan("p1", now, now + timedelta(hours=1), {"actions": []})
job, created = store.create_job_for_plan(
    job_id="j1", plan_id="p1", idempotency_key="k1", body={"done": 0}
)
store.update_job("j1", state="running", body={"done": 0})
print("running", flush=True)
seq = 0
while True:
    store.record_result("j1", seq, "deleted", {"seq": seq}, job_body={"done": seq + 1})
    print(seq, flush=True)
    seq += 1
"""


def test_kill_9_loses_nothing_acknowledged_and_the_job_reads_interrupted(db: Path) -> None:
    proc = run_python(_WORKER, str(db))
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line == "running\n", proc.stderr.read() if proc.stderr else line
    acked: list[int] = []
    deadline = time.monotonic() + 60
    while len(acked) < 30 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acked.append(int(line))
    proc.send_signal(signal.SIGKILL)
    rest, _ = proc.communicate(timeout=30)
    acked += [int(line) for line in rest.splitlines() if line.strip()]
    assert proc.returncode == -signal.SIGKILL
    assert len(acked) >= 30

    with StateStore(db) as store:
        results = store.results("j1")
        assert [r.seq for r in results] == list(range(len(results)))
        assert len(results) >= len(acked)
        assert {r.seq for r in results} >= set(acked)
        assert all(r.body == {"seq": r.seq} for r in results)
        job = store.get_job("j1")
        assert job is not None
        assert (job.state, job.body) == ("running", {"done": len(results)})

        assert store.mark_interrupted() == ["j1"]
        again, created = store.create_job_for_plan(
            job_id="j2", plan_id="p1", idempotency_key="k1", body={}
        )
        assert not created
        assert (again.id, again.state) == ("j1", "interrupted")

    # the file is a sound SQLite database after the crash
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert json.loads(conn.execute("SELECT body FROM jobs").fetchone()[0]) == {
            "done": len(results)
        }
    finally:
        conn.close()


# --- faults at the store boundary --------------------------------------------------------


def test_storage_errors_map_faults_and_leave_bugs_alone() -> None:
    import errno

    from agent.errors import StorageUnavailable
    from agent.store.sqlite import storage_errors

    for fault in (
        sqlite3.OperationalError("database is locked"),
        sqlite3.OperationalError("database or disk is full"),
        sqlite3.OperationalError("disk I/O error"),
        sqlite3.DatabaseError("database disk image is malformed"),
        OSError(errno.ENOSPC, "No space left on device"),
    ):
        with pytest.raises(StorageUnavailable) as caught, storage_errors(Path("state.db")):
            raise fault
        assert caught.value.status == 503 and caught.value.code == "storage_unavailable"
        assert caught.value.detail.startswith("state.db: ")
    for bug in (sqlite3.IntegrityError("x"), sqlite3.ProgrammingError("y"), ValueError("z")):
        with pytest.raises(type(bug)), storage_errors(Path("state.db")):
            raise bug


def test_a_store_locked_by_another_connection_fails_within_its_busy_timeout(
    tmp_path: Path,
) -> None:
    from agent.errors import StorageUnavailable

    path = tmp_path / "state.db"
    store = StateStore(path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        t0 = time.monotonic()
        with pytest.raises(StorageUnavailable, match="locked"):
            store.save_plan("p1", T0, T0, {"a": 1})
        assert time.monotonic() - t0 < 4
        assert store.get_plan("p1") is None  # readers go on (WAL)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.save_plan("p1", T0, T0, {"a": 1}).id == "p1"  # and the store works again
