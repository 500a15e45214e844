"""The audit log against real SQLite files: chaining, tamper detection, concurrency
(threads and processes) and durability across kill -9."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.store.audit import AuditCorrupt, AuditLog
from agent.store.entries import AuditEntry, format_time
from shared.auditchain import GENESIS, canonical_json, entry_hash

REPO = Path(__file__).resolve().parents[3]
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "audit.db"


@pytest.fixture
def log(db: Path) -> Iterator[AuditLog]:
    with AuditLog(db) as opened:
        yield opened


def fill(log: AuditLog, n: int, *, actor: str = "ops") -> list[AuditEntry]:
    return [
        log.append(
            actor=actor,
            action="delete_subvolume",
            target=f"/var/lib/docker/btrfs/subvolumes/{i}",
            outcome="deleted",
            detail={"i": i, "bytes": 4096 * i, "names": ["a", "b"]},
            at=T0 + timedelta(seconds=i),
        )
        for i in range(n)
    ]


def raw_sql(db: Path, sql: str, params: tuple[Any, ...] = ()) -> None:
    """Tamper with the file the way someone with a sqlite3 shell would."""
    conn = sqlite3.connect(db)
    try:
        conn.execute(sql, params)
        conn.commit()
    finally:
        conn.close()


def run_python(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# --- an intact chain ---------------------------------------------------------------


def test_empty_log_verifies(log: AuditLog) -> None:
    result = log.verify()
    assert (result.ok, result.count, result.head, result.first_bad_seq) == (True, 0, GENESIS, None)
    assert log.head() == GENESIS
    assert log.page() == []


def test_chain_grows_and_verifies(log: AuditLog) -> None:
    entries = fill(log, 5)
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0].prev_hash == GENESIS
    for before, after in itertools.pairwise(entries):
        assert after.prev_hash == before.hash
    for entry in entries:
        assert len(entry.hash) == 64
        assert entry.hash == entry.computed_hash()
    assert len({e.hash for e in entries}) == 5
    assert log.page() == entries
    assert log.head() == entries[-1].hash
    assert log.head_entry() == (5, entries[-1].hash)
    result = log.verify()
    assert (result.ok, result.count, result.head, result.first_bad_seq) == (
        True,
        5,
        entries[-1].hash,
        None,
    )


def test_hash_is_sha256_of_the_canonical_api_fields(log: AuditLog) -> None:
    """Spelled out independently of the module, so that a client can recompute it."""
    import hashlib

    entry = log.append(
        actor="ops", action="plan", target="host", outcome="ok", detail={"z": 1, "é": [True]}, at=T0
    )
    fields = entry.to_json()
    del fields["hash"]
    assert fields["at"] == "2024-05-01T12:00:00.000000Z"
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert entry.hash == hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_time_is_stored_in_utc_and_naive_time_refused(log: AuditLog) -> None:
    plus2 = timezone(timedelta(hours=2))
    entry = log.append(
        actor="a",
        action="b",
        target="c",
        outcome="d",
        detail={},
        at=datetime(2024, 1, 1, 14, tzinfo=plus2),
    )
    assert entry.at == datetime(2024, 1, 1, 12, tzinfo=UTC)
    assert entry.at.utcoffset() == timedelta(0)
    with pytest.raises(ValueError, match="timezone"):
        log.append(
            actor="a", action="b", target="c", outcome="d", detail={}, at=datetime(2024, 1, 1)
        )
    assert log.verify().count == 1


def test_default_time_comes_from_the_clock(db: Path) -> None:
    with AuditLog(db, clock=lambda: T0) as log:
        assert log.append(actor="a", action="b", target="c", outcome="d", detail={}).at == T0


def test_string_detail_is_wrapped(log: AuditLog) -> None:
    entry = log.append(actor="a", action="b", target="c", outcome="refused", detail="in use")
    assert entry.detail == {"message": "in use"}
    assert log.page()[0].detail == {"message": "in use"}


@pytest.mark.parametrize(
    "detail",
    [{"x": object()}, {"x": math.nan}, {"x": math.inf}, {1: "a", "b": 2}, ["not", "a", "dict"]],
)
def test_detail_that_is_not_a_json_object_is_refused(log: AuditLog, detail: Any) -> None:
    with pytest.raises(ValueError):
        log.append(actor="a", action="b", target="c", outcome="d", detail=detail)
    assert log.verify().count == 0


def test_page_after_seq_and_limit(log: AuditLog) -> None:
    entries = fill(log, 7)
    assert log.page(limit=3) == entries[:3]
    assert log.page(after_seq=3, limit=3) == entries[3:6]
    assert log.page(after_seq=6) == entries[6:]
    assert log.page(after_seq=7) == []
    with pytest.raises(ValueError):
        log.page(limit=0)
    with pytest.raises(ValueError):
        log.page(after_seq=-1)


def test_reopen_continues_the_chain(db: Path) -> None:
    with AuditLog(db) as log:
        first = fill(log, 3)
    with AuditLog.open(db) as log:
        assert log.page() == first
        more = fill(log, 2)
        assert [e.seq for e in more] == [4, 5]
        assert more[0].prev_hash == first[-1].hash
        result = log.verify()
    assert (result.ok, result.count, result.head) == (True, 5, more[-1].hash)


def test_entries_round_trip_through_the_api_shape(log: AuditLog) -> None:
    entries = fill(log, 3)
    items = json.loads(json.dumps([e.to_json() for e in entries]))
    assert [AuditEntry.from_json(item) for item in items] == entries
    with pytest.raises(ValueError):
        AuditEntry.from_json({k: v for k, v in items[0].items() if k != "outcome"})
    with pytest.raises(ValueError):
        AuditEntry.from_json({**items[0], "at": "2024-05-01 12:00"})


# --- tampering ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("outcome", "refused"),
        ("detail", canonical_json({"i": 2, "bytes": 1, "names": ["a", "b"]})),
        ("at", format_time(T0 + timedelta(days=1))),
        ("actor", "someone-else"),
        ("action", "delete_volume"),
        ("target", "/elsewhere"),
        ("prev_hash", "f" * 64),
        ("hash", "0" * 63 + "1"),
        # the same meaning in another spelling is an edit too
        ("at", "2024-05-01T12:00:02+00:00"),
        ("detail", '{"names": ["a", "b"], "bytes": 8192, "i": 2}'),
        # a value of another type
        ("outcome", b"deleted"),
    ],
)
def test_an_edited_row_is_reported_at_its_seq(
    db: Path, log: AuditLog, column: str, value: object
) -> None:
    fill(log, 5)
    raw_sql(db, f"UPDATE audit SET {column} = ? WHERE seq = 3", (value,))
    result = log.verify()
    assert not result.ok
    assert result.first_bad_seq == 3
    assert result.count == 5


def test_an_edit_with_a_recomputed_hash_breaks_the_next_link(db: Path, log: AuditLog) -> None:
    entries = fill(log, 5)
    forged = entries[2].to_json()
    forged["outcome"] = "refused"
    del forged["hash"]
    new_hash = entry_hash(**forged)
    raw_sql(db, "UPDATE audit SET outcome = 'refused', hash = ? WHERE seq = 3", (new_hash,))
    result = log.verify()
    assert (result.ok, result.first_bad_seq) == (False, 4)


def test_an_edit_of_the_last_row_with_a_recomputed_hash_shows_in_the_head_record(
    db: Path, log: AuditLog
) -> None:
    entries = fill(log, 5)
    forged = entries[4].to_json()
    forged["outcome"] = "refused"
    del forged["hash"]
    raw_sql(
        db, "UPDATE audit SET outcome = 'refused', hash = ? WHERE seq = 5", (entry_hash(**forged),)
    )
    result = log.verify()
    assert (result.ok, result.first_bad_seq) == (False, 5)


@pytest.mark.parametrize(("deleted", "reported"), [(3, 4), (1, 2)])
def test_a_deleted_row_is_reported(db: Path, log: AuditLog, deleted: int, reported: int) -> None:
    fill(log, 5)
    raw_sql(db, "DELETE FROM audit WHERE seq = ?", (deleted,))
    result = log.verify()
    assert (result.ok, result.count, result.first_bad_seq) == (False, 4, reported)


def test_reordered_rows_are_reported(db: Path, log: AuditLog) -> None:
    fill(log, 5)
    raw_sql(db, "UPDATE audit SET seq = -1 WHERE seq = 2")
    raw_sql(db, "UPDATE audit SET seq = 2 WHERE seq = 3")
    raw_sql(db, "UPDATE audit SET seq = 3 WHERE seq = -1")
    result = log.verify()
    assert (result.ok, result.first_bad_seq) == (False, 2)


def test_a_truncated_tail_is_reported_by_the_head_record(db: Path, log: AuditLog) -> None:
    entries = fill(log, 5)
    raw_sql(db, "DELETE FROM audit WHERE seq > 3")
    result = log.verify()
    assert (result.ok, result.count, result.head, result.first_bad_seq) == (
        False,
        3,
        entries[2].hash,
        4,
    )


def test_a_truncation_that_also_rewrites_the_head_record_shows_only_against_a_remembered_head(
    db: Path, log: AuditLog
) -> None:
    """The documented limit: verify() alone says ok; what gives it away is count and
    head compared with what the controller saw earlier."""
    entries = fill(log, 5)
    remembered_seq, remembered_head = entries[-1].seq, entries[-1].hash
    raw_sql(db, "DELETE FROM audit WHERE seq > 3")
    raw_sql(db, "UPDATE audit_head SET seq = 3, hash = ?", (entries[2].hash,))
    result = log.verify()
    assert result.ok
    assert result.count < remembered_seq
    assert result.head != remembered_head
    assert log.page(after_seq=remembered_seq - 1, limit=1) == []


def test_a_missing_head_record_is_reported_and_not_recreated(db: Path) -> None:
    with AuditLog(db) as log:
        fill(log, 2)
    raw_sql(db, "DELETE FROM audit_head")
    with AuditLog(db) as log:
        result = log.verify()
    assert (result.ok, result.first_bad_seq) == (False, 3)


def test_a_row_beyond_the_recorded_head_stops_appends(db: Path, log: AuditLog) -> None:
    entries = fill(log, 2)
    raw_sql(
        db,
        "INSERT INTO audit VALUES (3, ?, 'x', 'x', 'x', 'x', '{}', ?, ?)",
        (format_time(T0), entries[-1].hash, "e" * 64),
    )
    assert log.verify().first_bad_seq == 3
    with pytest.raises(AuditCorrupt):
        fill(log, 1)


# --- properties --------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
json_objects = st.dictionaries(st.text(), json_values, max_size=6)


def test_any_json_object_detail_round_trips_and_verifies(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "audit.db") as log:

        @settings(max_examples=100, deadline=None)
        @given(detail=json_objects, actor=st.text(), target=st.text())
        def check(detail: dict[str, Any], actor: str, target: str) -> None:
            entry = log.append(actor=actor, action="x", target=target, outcome="ok", detail=detail)
            assert entry.detail == detail
            (stored,) = log.page(after_seq=entry.seq - 1, limit=1)
            assert stored == entry
            assert AuditEntry.from_json(json.loads(json.dumps(entry.to_json()))) == entry

        check()
        result = log.verify()
    assert result.ok
    assert result.count >= 1


_TEXT_COLUMNS = ["at", "actor", "action", "target", "outcome", "detail", "prev_hash", "hash"]


def test_any_single_field_edit_is_detected(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    with AuditLog(db) as log:
        fill(log, 6)
        conn = sqlite3.connect(db)

        @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(
            seq=st.integers(1, 6),
            column=st.sampled_from(_TEXT_COLUMNS),
            value=st.text()
            | st.integers(-(2**63), 2**63 - 1)
            | st.binary()
            | json_objects.map(canonical_json)
            | json_objects.map(json.dumps),
        )
        def check(seq: int, column: str, value: object) -> None:
            (original,) = conn.execute(
                f"SELECT {column} FROM audit WHERE seq = ?", (seq,)
            ).fetchone()
            conn.execute(f"UPDATE audit SET {column} = ? WHERE seq = ?", (value, seq))
            conn.commit()
            try:
                (stored,) = conn.execute(
                    f"SELECT {column} FROM audit WHERE seq = ?", (seq,)
                ).fetchone()
                if stored == original:  # e.g. the integer 5 stored as the text "5"
                    return
                result = log.verify()
                assert not result.ok
                assert result.first_bad_seq == seq
            finally:
                conn.execute(f"UPDATE audit SET {column} = ? WHERE seq = ?", (original, seq))
                conn.commit()

        try:
            check()
        finally:
            conn.close()
        assert log.verify().ok


# --- concurrency and durability -----------------------------------------------------


def _check_dense_and_intact(log: AuditLog, appended: list[AuditEntry], total: int) -> None:
    result = log.verify()
    assert (result.ok, result.count, result.first_bad_seq) == (True, total, None)
    stored = log.page(limit=total + 1)
    assert [e.seq for e in stored] == list(range(1, total + 1))
    by_seq = {e.seq: e for e in stored}
    for entry in appended:
        assert by_seq[entry.seq] == entry


@pytest.mark.parametrize("shared", [True, False], ids=["one-log", "log-per-thread"])
def test_concurrent_appends_from_threads_keep_the_chain(db: Path, shared: bool) -> None:
    """One shared AuditLog exercises its lock; one AuditLog per thread (separate
    connections to one file) exercises SQLite's write lock alone."""
    threads_n, per_thread = 8, 40
    logs = [AuditLog(db)] * threads_n if shared else [AuditLog(db) for _ in range(threads_n)]
    appended: list[AuditEntry] = []
    errors: list[BaseException] = []
    start = threading.Barrier(threads_n)

    def work(n: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                appended.append(
                    logs[n].append(
                        actor=f"t{n}", action="a", target=str(i), outcome="ok", detail={"i": i}
                    )
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(appended) == threads_n * per_thread
    _check_dense_and_intact(logs[0], appended, threads_n * per_thread)
    for each in set(logs):
        each.close()


_APPENDER = """
import os, sys, time
from agent.store.audit import AuditLog
db, name, count, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
pause = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
log = AuditLog(db)
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
i = 0
while count < 0 or i < count:
    entry = log.append(actor=name, action="a", target=str(i), outcome="ok", detail={"i": i})
    print(entry.seq, entry.hash, flush=True)
    i += 1
    time.sleep(pause)  # lets the other writer in: SQLite's busy wait is not fair
log.close()
"""


def _started(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line == "ready\n", proc.stderr.read() if proc.stderr else line


def test_two_processes_appending_at_once_keep_the_chain(db: Path, tmp_path: Path) -> None:
    go = tmp_path / "go"
    per_process = 150
    AuditLog(db).close()  # create the schema first, as the agent does at start-up
    procs = [
        run_python(_APPENDER, str(db), f"p{n}", str(per_process), str(go), "0.003")
        for n in range(2)
    ]
    for proc in procs:
        _started(proc)
    go.touch()
    acked: list[tuple[int, str]] = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        acked += [(int(s), h) for s, h in (line.split() for line in out.splitlines())]
    with AuditLog(db) as log:
        result = log.verify()
        stored = log.page(limit=1000)
    assert (result.ok, result.count) == (True, 2 * per_process)
    assert [e.seq for e in stored] == list(range(1, 2 * per_process + 1))
    assert sorted(acked) == [(e.seq, e.hash) for e in stored]
    # both really ran at once: their entries interleave
    actors = [e.actor for e in stored]
    switches = sum(1 for a, b in itertools.pairwise(actors) if a != b)
    assert switches > 10


def test_kill_9_loses_nothing_acknowledged(db: Path, tmp_path: Path) -> None:
    go = tmp_path / "go"
    go.touch()
    proc = run_python(_APPENDER, str(db), "victim", "-1", str(go))
    _started(proc)
    assert proc.stdout is not None
    acked: list[tuple[int, str]] = []
    deadline = time.monotonic() + 60
    while len(acked) < 50 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seq, digest = line.split()
        acked.append((int(seq), digest))
    proc.send_signal(signal.SIGKILL)
    rest, _ = proc.communicate(timeout=30)
    # whatever it printed before dying was acknowledged too
    acked += [(int(s), h) for s, h in (line.split() for line in rest.splitlines() if line.strip())]
    assert proc.returncode == -signal.SIGKILL
    assert len(acked) >= 50

    with AuditLog(db) as log:
        result = log.verify()
        stored = {e.seq: e.hash for e in log.page(limit=100_000)}
        assert result.ok
        assert result.count >= len(acked)
        for seq, digest in acked:
            assert stored[seq] == digest
        # and the chain goes on from where the dead process left it
        entry = log.append(actor="next", action="a", target="t", outcome="ok", detail={})
        assert entry.seq == result.count + 1
        assert entry.prev_hash == result.head
        assert log.verify().ok
