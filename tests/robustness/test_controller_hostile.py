"""janitorctl against hostile agents on loopback (``tests/robustness/hostile.py``): real
HTTP servers that trickle bytes, send 500 MB, stream chunks for ever, serve an audit
log that never ends or JSON no parser should take, and janitorctl as a real process.
Each must end in bounded time and memory, with that agent's problem reported, exit 1
(or 0 for a long audit, pulled in parts), and never a traceback. Token files and client
keys are refused by the rule ssh applies to private keys.

The CI versions are small; the long run (``make robustness``) plays the cases of issue
12 at full size: a byte every 3 s with the default timeouts, a 500 MB answer with the
default cap, the default audit cap."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from tests.robustness import knobs
from tests.robustness.hostile import (
    EndlessAudit,
    Finished,
    HostileServer,
    SlowPages,
    big,
    endless_chunks,
    fixed,
    janitorctl,
    trickle,
    write_fleet,
)

MiB = 1 << 20
GiB = 1 << 30


def agent_row(result: Finished, agent: str = "nas1") -> dict[str, Any]:
    (row,) = [a for a in json.loads(result.stdout)["agents"] if a["agent"] == agent]
    assert isinstance(row, dict)
    return row


def assert_clean_failure(result: Finished, problem: str) -> dict[str, Any]:
    """Ended by itself, exit 1, no traceback, and ``problem`` is the agent's."""
    assert result.code is not None, (
        f"janitorctl still running after {result.seconds:.0f}s: killed\n{result.stderr[-2000:]}"
    )
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.code == 1, (result.code, result.stdout[-2000:], result.stderr[-2000:])
    row = agent_row(result)
    assert row["error"] is not None and re.search(problem, row["error"]), row
    return row


# -- a total deadline per request and per agent -------------------------------------------------


@pytest.mark.parametrize("where", ["head", "body"])
def test_an_agent_sending_a_byte_at_a_time_is_given_up_on(tmp_path: Path, where: str) -> None:
    """Every read gets a byte well within the read timeout, for ever: only a deadline
    on the whole request ends it (2 s here, and one retry)."""
    with HostileServer(trickle(0.2, where=where)) as server:
        fleet = write_fleet(
            tmp_path,
            {"nas1": server.url},
            retries=1,
            timeouts={"connect": 2, "request": 2, "poll": 0.1},
        )
        result = janitorctl("--fleet", str(fleet), "--json", "run", patience=60)
        assert server.sent > 5  # it was trickling when janitorctl gave up
    row = assert_clean_failure(result, r"GET /v1/findings: no whole answer within 2s")
    assert row["reachable"] is False
    # two attempts of 2 s and the 0.5 s pause between them, plus start-up
    assert result.seconds < 15, result.seconds


@pytest.mark.long
def test_a_byte_every_3s_with_the_default_timeouts(tmp_path: Path) -> None:
    """Issue 12's case as it was: a byte every 3 s, the fleet's defaults (30 s per
    request, 2 retries): janitorctl gives up after 3 x 30 s and the pauses."""
    with HostileServer(trickle(3.0)) as server:
        fleet = write_fleet(tmp_path, {"nas1": server.url})
        result = janitorctl("--fleet", str(fleet), "--json", "run", patience=300)
    assert_clean_failure(result, r"no whole answer within 30s")
    print(f"\ntrickling agent, default timeouts: janitorctl ended in {result.seconds:.1f}s")
    assert 90 <= result.seconds < 120, result.seconds


def test_all_that_is_done_with_one_agent_has_a_deadline(tmp_path: Path) -> None:
    """Each answer comes whole within the request's timeout, but the pages never end:
    the agent's own deadline (timeouts.agent) ends it."""
    pages = SlowPages(0.5)
    with HostileServer(pages) as server:
        fleet = write_fleet(
            tmp_path, {"nas1": server.url}, timeouts={"request": 5, "agent": 3, "poll": 0.1}
        )
        result = janitorctl("--fleet", str(fleet), "--json", "run", patience=60)
    row = assert_clean_failure(
        result, r"GET /v1/findings: the 3s allowed for this agent \(timeouts\.agent\) ran out"
    )
    assert row["reachable"] is True
    assert 4 <= pages.pages <= 8, pages.pages
    assert result.seconds < 15, result.seconds


# -- a cap on the size of an answer --------------------------------------------------------------

# The default cap (16 MiB); CI sends 200 MiB, the long run 500 MB.
ANSWER = 500_000_000 if knobs.LONG else 200 * MiB
CAP = 16 * MiB


def in_flight() -> int:
    """The most a loopback connection can hold between the two ends: the receiver's and
    the sender's largest TCP buffers (autotuned up to tcp_rmem/tcp_wmem's maximum), and
    the server's 1 MiB block being written."""
    rmem = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
    wmem = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    return rmem + wmem + 2 * MiB


@pytest.mark.parametrize("with_length", [True, False], ids=["content-length", "until-close"])
def test_a_huge_answer_is_refused_without_reading_it_all(tmp_path: Path, with_length: bool) -> None:
    with HostileServer(big(ANSWER, with_length=with_length)) as server:
        fleet = write_fleet(tmp_path, {"nas1": server.url}, retries=0)
        result = janitorctl(
            "--fleet", str(fleet), "--json", "run", patience=120, address_space=3 * GiB
        )
        sent = server.sent
    if with_length:
        problem = rf"answer of {ANSWER} bytes, over the {CAP} taken"
    else:
        problem = rf"answer longer than the {CAP} bytes taken"
    assert_clean_failure(result, problem)
    # not read past the cap: what the server got out is the cap and the socket buffers
    assert sent <= CAP + in_flight() < ANSWER, sent
    print(f"\n{ANSWER} byte answer: peak RSS {result.max_rss_kib // 1024} MiB, {sent} bytes sent")
    assert result.max_rss_kib * 1024 < CAP * 3 + 160 * MiB, result.max_rss_kib


def test_an_endless_chunked_answer_ends_in_a_clean_problem(tmp_path: Path) -> None:
    """With the default cap (16 MiB). Before the cap: MemoryError and a traceback (here
    within a 1.5 GiB address space, so that the machine's memory is not what runs out)."""
    with HostileServer(endless_chunks()) as server:
        fleet = write_fleet(tmp_path, {"nas1": server.url}, retries=0)
        result = janitorctl(
            "--fleet", str(fleet), "--json", "run", patience=120, address_space=3 * GiB // 2
        )
        sent = server.sent
    assert_clean_failure(result, rf"answer longer than the {CAP} bytes taken")
    assert sent <= CAP + in_flight(), sent


# -- answers no parser should take: one line, never a traceback ----------------------------------

HOSTILE_BODIES = {
    "nested-200k-deep": (200, b"[" * 200_000 + b"]" * 200_000, r"answer breaks the contract"),
    "5000-digit-int": (
        200,
        b'{"items": [], "next_cursor": ' + b"9" * 5000 + b"}",
        r"answer breaks the contract",
    ),
    "not-utf8": (200, b'{"items": ["\xff\xfe"]}', r"answer breaks the contract"),
    "a-list": (200, b"[1, 2, 3]", r"answer breaks the contract"),
    "nan": (200, b'{"items": [NaN], "next_cursor": null}', r"answer breaks the contract"),
    "html-500": (500, b"<html><body>oops</body></html>", r"500 unknown: <html><body>oops"),
    "nested-problem-500": (500, b"{" * 1 + b'"a":' + b"[" * 100_000, r"500 unknown"),
    "terminal-escape": (
        409,
        b'{"type": "x", "title": "x", "status": 409, "code": "conflict", '
        b'"detail": "\\u001b]0;owned\\u0007\\u001b[2J"}',
        r"\\x1b\]0;owned\\x07\\x1b\[2J",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_BODIES))
def test_an_answer_no_parser_should_take_is_that_agents_problem(tmp_path: Path, case: str) -> None:
    status, body, problem = HOSTILE_BODIES[case]
    behaviour = fixed(status, body, {"Content-Type": "application/json"})
    with HostileServer(behaviour) as server:
        fleet = write_fleet(tmp_path, {"nas1": server.url}, retries=0)
        result = janitorctl("--fleet", str(fleet), "--json", "run", patience=60)
    row = assert_clean_failure(result, problem)
    assert "\x1b" not in result.stdout + result.stderr, row


def test_a_gzip_answer_is_not_unpacked(tmp_path: Path) -> None:
    """identity is asked for; a compressed answer anyway (a decompression bomb, maybe)
    is refused, not inflated."""
    import gzip

    bomb = gzip.compress(b" " * (64 * MiB))
    behaviour = fixed(200, bomb, {"Content-Type": "application/json", "Content-Encoding": "gzip"})
    with HostileServer(behaviour) as server:
        fleet = write_fleet(tmp_path, {"nas1": server.url}, retries=0)
        result = janitorctl("--fleet", str(fleet), "--json", "run", patience=60)
        (first, *_) = server.requests
    assert first.headers.get("accept-encoding") == "identity"
    assert_clean_failure(result, r"answer encoded as 'gzip', asked for identity")


# -- a cap on the audit entries pulled per run ---------------------------------------------------

AUDIT_CAP = 10_000  # the default


def test_an_endless_audit_is_pulled_in_parts_run_after_run(tmp_path: Path) -> None:
    audit = EndlessAudit()
    with HostileServer(audit) as server:
        fleet = write_fleet(tmp_path, {"nas1": server.url})
        first = janitorctl("--fleet", str(fleet), "audit", "--json", patience=120)
        second = janitorctl("--fleet", str(fleet), "audit", "--json", patience=120)
    for result in (first, second):
        assert result.code == 0, (result.code, result.stdout[-1000:], result.stderr[-2000:])
        assert "Traceback" not in result.stderr
        assert "more are left: the next run or audit goes on after entry" in result.stderr
    (one,) = json.loads(first.stdout)
    (two,) = json.loads(second.stdout)
    assert (one["status"], one["new"], one["last_seq"], one["more"]) == (
        "ok",
        AUDIT_CAP,
        AUDIT_CAP,
        True,
    )
    # the second run goes on from the last entry kept (and compares that one again)
    assert (two["status"], two["new"], two["last_seq"], two["more"]) == (
        "ok",
        AUDIT_CAP,
        2 * AUDIT_CAP,
        True,
    )
    assert audit.largest_after_seq < 2 * AUDIT_CAP + 600


# -- secret files refused as ssh refuses a private key -------------------------------------------


@pytest.mark.parametrize(
    ("mode", "refused"),
    [
        (0o600, None),
        (0o400, None),
        (0o640, None),  # group-readable: how a Kubernetes Secret reaches uid 10001
        (0o440, None),
        (0o644, "world-readable (mode 0644)"),
        (0o604, "world-readable (mode 0604)"),
        (0o620, "group-writable (mode 0620)"),
        (0o602, "world-writable (mode 0602)"),
        (0o666, "group-writable and world-writable and world-readable (mode 0666)"),
    ],
)
def test_token_files_others_may_read_or_change_are_refused(
    tmp_path: Path, mode: int, refused: str | None
) -> None:
    with HostileServer(fixed(503, b"{}")) as server:
        fleet = write_fleet(tmp_path, {"nas1": server.url}, retries=0)
        (tmp_path / "token").chmod(mode)
        result = janitorctl("--fleet", str(fleet), "agents", patience=60)
        asked = len(server.requests)
    assert "Traceback" not in result.stderr
    if refused is None:
        assert result.code == 1 and asked > 0  # the agent was asked (and answered 503)
        return
    assert result.code == 2, result.stderr
    assert asked == 0  # refused before any agent is called
    assert f"token file refused: {refused}; chmod 600, or 640" in result.stderr


def test_a_token_reached_through_symlinks_is_judged_by_the_file(tmp_path: Path) -> None:
    """A Secret's volume: tokens/nas1 -> ..data/nas1, ..data -> ..<timestamp>/."""
    with HostileServer(fixed(503, b"{}")) as server:
        fleet = write_fleet(tmp_path, {"nas1": server.url}, retries=0)
        data = tmp_path / "tokens" / "..2026_11_28_01_00_00.1"
        data.mkdir(parents=True)
        (tmp_path / "token").rename(data / "nas1")
        (tmp_path / "tokens" / "..data").symlink_to(data.name)
        (tmp_path / "tokens" / "nas1").symlink_to("..data/nas1")
        text = fleet.read_text().replace("token_file: token", "token_file: tokens/nas1")
        fleet.write_text(text)
        (data / "nas1").chmod(0o644)
        refused = janitorctl("--fleet", str(fleet), "agents", patience=60)
        (data / "nas1").chmod(0o440)
        accepted = janitorctl("--fleet", str(fleet), "agents", patience=60)
    assert refused.code == 2 and "world-readable (mode 0644)" in refused.stderr
    assert accepted.code == 1 and "token file refused" not in accepted.stderr


def test_a_fifo_in_a_tokens_place_does_not_hang(tmp_path: Path) -> None:
    fleet = write_fleet(tmp_path, {"nas1": "http://127.0.0.1:9"})
    (tmp_path / "token").unlink()
    os.mkfifo(tmp_path / "token", 0o600)
    result = janitorctl("--fleet", str(fleet), "agents", patience=30)
    assert result.code == 2 and "token file refused: not a regular file" in result.stderr


def test_a_client_key_others_may_read_is_refused(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("controller")
    cert.private_key_pem.write_to_path(str(tmp_path / "ctl.key"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "ctl.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    fleet = write_fleet(tmp_path, {"nas1": "https://127.0.0.1:9"})
    text = fleet.read_text().replace(
        "token_file: token", "token_file: token\n  ca: ca.pem\n  client_cert: ctl.pem\n"
        "  client_key: ctl.key"
    )  # fmt: skip
    fleet.write_text(text)
    (tmp_path / "ctl.key").chmod(0o644)
    result = janitorctl("--fleet", str(fleet), "agents", patience=30)
    assert result.code == 2
    assert "client key refused: world-readable (mode 0644)" in result.stderr
