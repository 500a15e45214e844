"""The agent client against the stateful fake agent: answers, errors, pages, retries."""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import httpx
import pytest

from controller import errors
from controller.client import (
    AgentClient,
    Readiness,
    tls_context,
    token_from_env,
    token_from_file,
)
from shared.models import Policy
from tests.controller.conftest import client_for
from tests.controller.fake_agent import UUID, FakeAgent, ok, problem


def test_read_endpoints_return_models(fake: FakeAgent) -> None:
    c = client_for(fake)
    assert c.healthz().status == "ok"
    assert c.readyz() == Readiness(ready=True)
    host = c.host()
    assert host.hostname == "nas1" and host.docker.storage_driver == "btrfs"
    assert host.kernel.rmdir_deletes_subvolumes is False
    (fs,) = c.filesystems()
    assert fs.uuid == UUID and fs.quota_enabled
    assert {v.name for v in c.volumes()} == {"ci-old", "ci-busy", "empty"}
    assert c.volume("ci-old").nested_subvolumes[0].path.endswith("/subvolumes/0")
    kinds = {f.kind for f in c.findings()}
    assert kinds == {"dind-volume", "dangling-volume", "orphan-layer"}
    assert {f.kind for f in c.findings(kinds=["orphan-layer"])} == {"orphan-layer"}
    assert "nas_janitor_findings" in c.metrics()
    sent = fake.requests[-2]
    assert sent.url.params.get_list("kind") == ["orphan-layer"]
    assert sent.headers["Authorization"] == "Bearer tok-all"


def test_readyz_503_is_an_answer_not_an_error(fake: FakeAgent) -> None:
    fake.docker_down = True
    r = client_for(fake).readyz()
    assert r == Readiness(ready=False, code="docker_unavailable", detail=r.detail)
    assert len(fake.requests) == 1  # not retried


def test_subvolumes_follow_every_page(fake: FakeAgent) -> None:
    for i in range(12):
        fake.add_subvolume(f"/volume1/docker/btrfs/subvolumes/l{i}", owner="docker-layer")
    c = client_for(fake, page_size=4)
    subs = c.subvolumes(UUID)
    assert len(subs) == len(fake.subvols) == 20
    assert len({s.id for s in subs}) == 20
    pages = [r for r in fake.requests if r.url.path.endswith("/subvolumes")]
    assert len(pages) == 5  # 20 items, 4 a page
    assert [r.url.params.get("cursor") for r in pages] == [None, "4", "8", "12", "16"]
    under = c.subvolumes(UUID, under="/volume1/docker/volumes/ci-old/")
    assert len(under) == 3


def test_a_cursor_that_repeats_is_a_protocol_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return ok({"items": [], "next_cursor": "same"})

    c = AgentClient("http://x", token="t", transport=httpx.MockTransport(handler))
    with pytest.raises(errors.ProtocolError, match="repeats"):
        c.volumes()


def test_audit_pages_by_seq(fake: FakeAgent) -> None:
    for i in range(7):
        fake.log("delete_volume", f"v{i}", "dry_run", {"i": i})
    entries = client_for(fake, page_size=3).audit()
    assert [e.seq for e in entries] == list(range(1, 8))
    asked = [r.url.params["after_seq"] for r in fake.requests if r.url.path == "/v1/audit"]
    assert asked == ["0", "3", "6"]
    assert all(e.hash_ok for e in entries)
    assert client_for(fake).audit(after_seq=5)[0].seq == 6


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (401, "unauthorized", errors.Unauthorized),
        (403, "forbidden", errors.Forbidden),
        (404, "not_found", errors.NotFound),
        (409, "in_use", errors.Conflict),
        (409, "plan_expired", errors.PlanExpired),
        (422, "validation_failed", errors.ValidationFailed),
        (503, "btrfs_unavailable", errors.Unavailable),
        (502, "btrfs_failed", errors.AgentHTTPError),
    ],
)
def test_problems_map_to_one_error_class_each(
    fake: FakeAgent, status: int, code: str, cls: type[errors.AgentHTTPError]
) -> None:
    fake.fail_next(status=status, code=code, times=10)
    with pytest.raises(cls) as info:
        client_for(fake, retries=0).host()
    e = info.value
    assert type(e) is cls
    assert (e.status, e.code, e.detail) == (status, code, "injected fault")
    assert (e.method, e.path, e.agent) == ("GET", "/v1/host", "nas1")
    assert isinstance(e, errors.ControllerError)


def test_real_auth_answers(fake: FakeAgent) -> None:
    with pytest.raises(errors.Unauthorized):
        client_for(fake, token="nope").host()
    with pytest.raises(errors.Unauthorized):
        client_for(fake, token=None).findings()
    with pytest.raises(errors.Forbidden, match="clean scope"):
        client_for(fake, token="tok-read").create_plan()
    with pytest.raises(errors.NotFound):
        client_for(fake).volume("nope")


def test_422_carries_per_field_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return problem(422, "validation_failed", "bad", errors={"kinds": ["Unknown kind."]})

    c = AgentClient("http://x", token="t", transport=httpx.MockTransport(handler))
    with pytest.raises(errors.ValidationFailed) as info:
        c.create_plan()
    assert info.value.errors == {"kinds": ["Unknown kind."]}


def test_an_error_that_is_not_problem_json_still_maps() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html><body>Bad Gateway</body></html>")

    c = AgentClient("http://x", token="t", transport=httpx.MockTransport(handler))
    with pytest.raises(errors.AgentHTTPError) as info:
        c.host()
    assert info.value.status == 502 and info.value.code == "unknown"
    assert "Bad Gateway" in info.value.detail


def test_an_answer_that_breaks_the_schema_is_a_protocol_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/host":
            return ok({"hostname": "x"})  # most fields missing
        return httpx.Response(200, text="not json")

    c = AgentClient("http://x", token="t", transport=httpx.MockTransport(handler))
    with pytest.raises(errors.ProtocolError, match="kernel"):
        c.host()
    with pytest.raises(errors.ProtocolError, match="not JSON"):
        c.healthz()


def test_fields_the_agent_adds_are_ignored_at_every_depth(fake: FakeAgent) -> None:
    fake.extra_fields = True
    assert client_for(fake).host().kernel.release == "4.4.302+"


def test_connection_refused_on_a_real_closed_port(closed_port: int) -> None:
    slept: list[float] = []
    c = AgentClient(f"http://127.0.0.1:{closed_port}", token="t", retries=2, sleep=slept.append)
    with pytest.raises(errors.AgentUnreachable) as info:
        c.healthz()
    assert f"127.0.0.1:{closed_port}" in str(info.value)
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert slept == [0.5, 1.0]  # two retries with a doubling backoff


def test_a_silent_server_times_out(silent_server: int) -> None:
    c = AgentClient(f"http://127.0.0.1:{silent_server}", token="t", timeout=0.2, retries=0)
    start = time.monotonic()
    with pytest.raises(errors.AgentUnreachable, match=r"no whole answer within 0\.2s"):
        c.host()
    assert time.monotonic() - start < 5
    assert isinstance(
        errors.AgentUnreachable("a", "b"), errors.ControllerError
    )  # callers catch one class


def test_gets_are_retried_on_503_and_connect_errors(fake: FakeAgent) -> None:
    fake.fail_next(status=503, code="docker_unavailable")
    fake.fail_next(exc=httpx.ConnectError)
    slept: list[float] = []
    c = client_for(fake, retries=2, sleep=slept.append)
    assert c.host().hostname == "nas1"
    assert [r.url.path for r in fake.requests] == ["/v1/host"] * 3
    assert slept == [0.5, 1.0]


def test_retries_are_bounded(fake: FakeAgent) -> None:
    fake.fail_next(status=503, times=100)
    with pytest.raises(errors.Unavailable):
        client_for(fake, retries=3).findings()
    assert len(fake.requests) == 4


def test_4xx_is_never_retried(fake: FakeAgent) -> None:
    fake.fail_next(status=404, code="not_found", times=5)
    with pytest.raises(errors.NotFound):
        client_for(fake, retries=3).host()
    assert len(fake.requests) == 1


@pytest.mark.parametrize("fault", [{"status": 503}, {"exc": httpx.ReadTimeout}])
def test_delete_and_plan_creation_are_never_retried(fake: FakeAgent, fault: dict) -> None:
    c = client_for(fake, retries=3)
    fake.fail_next(times=1, **fault)
    with pytest.raises((errors.Unavailable, errors.AgentUnreachable)):
        c.delete_volume("ci-old", dry_run=False)
    fake.fail_next(times=1, **fault)
    with pytest.raises((errors.Unavailable, errors.AgentUnreachable)):
        c.create_plan()
    fake.fail_next(times=1, **fault)
    with pytest.raises((errors.Unavailable, errors.AgentUnreachable)):
        c.delete_subvolume(UUID, 263, dry_run=False)
    assert [r.method for r in fake.requests] == ["DELETE", "POST", "DELETE"]
    assert fake.plans == {}
    assert "ci-old" in fake.volumes


def test_deletes_are_dry_runs_unless_told(fake: FakeAgent) -> None:
    c = client_for(fake)
    r = c.delete_volume("ci-old")
    assert r.dry_run and r.volume == "ci-old" and len(r.deleted) == 3
    assert "ci-old" in fake.volumes
    assert fake.requests[-1].url.params["dry_run"] == "true"
    r = c.delete_volume("ci-old", dry_run=False)
    assert not r.dry_run and "ci-old" not in fake.volumes
    with pytest.raises(errors.Conflict) as info:
        c.delete_volume("ci-busy", dry_run=False)
    assert info.value.code == "in_use"
    layer = next(s.id for s in fake.subvols.values() if s.owner == "docker-layer")
    with pytest.raises(errors.Conflict, match="protected"):
        c.delete_subvolume(UUID, layer, dry_run=False)


def test_apply_sends_an_idempotency_key_and_a_lost_answer_is_retried_safely(
    fake: FakeAgent,
) -> None:
    c = client_for(fake, retries=2)
    plan = c.create_plan(Policy(min_age_seconds=0))
    # the agent starts the job, but the answer is lost on the way back
    fake.fail_next(
        match=lambda r: r.url.path.endswith("/apply"), exc=httpx.ReadTimeout, lose_answer=True
    )
    started = c.apply_plan(plan.id)
    applies = [r for r in fake.requests if r.url.path.endswith("/apply")]
    assert len(applies) == 2
    assert {r.headers["Idempotency-Key"] for r in applies} == {f"apply-{plan.id}"}
    assert len(fake.jobs) == 1 and started.job_id in fake.jobs
    c.apply_plan(plan.id, idempotency_key="run-7")
    assert fake.requests[-1].headers["Idempotency-Key"] == "run-7"
    assert len(fake.jobs) == 1


def test_plan_apply_wait(fake: FakeAgent) -> None:
    c = client_for(fake)
    plan = c.create_plan(Policy(min_age_seconds=0, kinds=("dind-volume", "orphan-layer")))
    assert [a.op for a in plan.actions] == ["remove_volume", "delete_subvolumes"]
    assert [s.finding_id for s in plan.skipped] == ["dind-volume:ci-busy"]
    assert c.get_plan(plan.id) == plan
    seen: list[tuple[str, int]] = []
    job = c.wait_job(
        c.apply_plan(plan.id).job_id,
        poll=0.01,
        on_progress=lambda j: seen.append((j.state, j.progress.done)),
    )
    assert job.state == "succeeded" and job.finished
    assert job.count("deleted") == 2 and job.reclaimed_bytes == (3 << 30) + (1 << 20)
    assert seen[0] == ("running", 0) and seen[-1] == ("succeeded", 2)
    assert "ci-old" not in fake.volumes
    assert {f.kind for f in c.findings()} == {"dind-volume", "dangling-volume"}


def test_wait_job_gives_up_at_its_timeout_with_the_last_state(fake: FakeAgent) -> None:
    now = [0.0]
    c = client_for(fake, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    plan = c.create_plan(Policy(min_age_seconds=0))
    job_id = c.apply_plan(plan.id).job_id
    fake.jobs_stuck = True
    with pytest.raises(errors.JobTimeout) as info:
        c.wait_job(job_id, poll=2, timeout=7)
    assert info.value.job.state == "queued"
    assert now[0] == 7  # waited 2 + 2 + 2 + 1, then gave up
    assert "0/2" in str(info.value)


def test_the_time_limit_cuts_a_job_wait_short(fake: FakeAgent) -> None:
    now = [0.0]
    c = client_for(fake, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    plan = c.create_plan(Policy(min_age_seconds=0))
    job_id = c.apply_plan(plan.id).job_id
    fake.jobs_stuck = True
    with c.time_limit(5), pytest.raises(errors.DeadlineExceeded) as info:
        c.wait_job(job_id, poll=2, timeout=3600)
    assert now[0] == 5
    assert info.value.job.state == "queued"
    assert "the 5s allowed for this agent (timeouts.agent) ran out" in str(info.value)
    # past the limit, no request is even sent; outside the block, no limit
    with c.time_limit(1):
        now[0] += 1
        sent = len(fake.requests)
        with pytest.raises(errors.DeadlineExceeded, match="GET /v1/host"):
            c.host()
        assert len(fake.requests) == sent
    assert c.host().hostname == "nas1"


def test_the_time_limit_leaves_no_room_for_a_retry_pause(fake: FakeAgent) -> None:
    now = [0.0]
    c = client_for(
        fake, retries=5, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s)
    )
    fake.fail_next(status=503, times=100)
    with c.time_limit(1.2), pytest.raises(errors.DeadlineExceeded, match="before a retry"):
        c.host()
    assert now[0] == 0.5  # one pause of 0.5 s; the next (1 s) would pass the limit


def test_an_answer_over_the_cap_is_refused_and_audit_pages_shrink(fake: FakeAgent) -> None:
    for i in range(12):
        fake.log("delete_volume", f"v{i}", "dry_run", {"pad": "x" * 3000})
    c = client_for(fake, page_size=8, max_answer_bytes=10_000)
    entries = c.audit()
    assert [e.seq for e in entries] == list(range(1, 13))
    limits = [r.url.params["limit"] for r in fake.requests if r.url.path == "/v1/audit"]
    assert limits[:3] == ["8", "4", "2"]  # 8 and 4 entries were over 10,000 bytes
    assert c.audit(after_seq=0, max_entries=5)[-1].seq == 5
    fake.log("delete_volume", "huge", "dry_run", {"pad": "x" * 20_000})
    with pytest.raises(errors.AnswerTooLarge, match="over the 10000 taken"):
        c.audit(after_seq=12)


def test_path_segments_are_quoted(fake: FakeAgent) -> None:
    with pytest.raises(errors.NotFound):
        client_for(fake).volume("../host")
    assert fake.requests[-1].url.raw_path == b"/v1/volumes/..%2Fhost"


def test_tokens_from_file_and_env(tmp_path: Path) -> None:
    f = tmp_path / "t"
    f.write_text("  secret-token \n", encoding="utf-8")
    f.chmod(0o600)
    assert token_from_file(f) == "secret-token"
    f.write_text("\n", encoding="utf-8")
    with pytest.raises(errors.ConfigError, match="empty"):
        token_from_file(f)
    with pytest.raises(errors.ConfigError, match="cannot read"):
        token_from_file(tmp_path / "missing")
    assert token_from_env("T", {"T": "abc"}) == "abc"
    with pytest.raises(errors.ConfigError, match="T is not set"):
        token_from_env("T", {})


def test_tls_files_that_cannot_be_read_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError, match="cannot load TLS files"):
        tls_context(ca=tmp_path / "missing-ca.pem")
    with pytest.raises(errors.ConfigError):
        AgentClient("https://nas1:8443", token="t", ca=tmp_path / "missing-ca.pem")
    assert isinstance(tls_context(), ssl.SSLContext)
