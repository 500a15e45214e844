"""Bugs the robustness suite found in the agent, each pinned by a small test over the
stateful fakes (the schemathesis runs find them again only by chance)."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.domain.paths import PathRefused, check_abs
from tests.agent.http.apphelpers import AgentUnderTest, auth, build, join_job_thread
from tests.robustness.agents import launch


@pytest.fixture
def agent(tmp_path: Path) -> AgentUnderTest:
    return build(tmp_path / "state")


@pytest.mark.parametrize(
    ("method", "url", "allowed"),
    [
        ("TRACE", "/v1/host", {"GET", "HEAD", "OPTIONS"}),
        ("PUT", "/v1/plans", {"POST", "OPTIONS"}),
        ("POST", "/v1/volumes/x", {"GET", "DELETE", "HEAD", "OPTIONS"}),
        ("DELETE", "/healthz", {"GET", "HEAD", "OPTIONS"}),
    ],
)
def test_405_names_the_allowed_methods(
    agent: AgentUnderTest, method: str, url: str, allowed: set[str]
) -> None:
    r = agent.client.open(url, method=method, headers=auth())
    assert r.status_code == 405
    assert r.mimetype == "application/problem+json"
    assert r.get_json()["code"] == "method_not_allowed"
    assert {m.strip() for m in r.headers["Allow"].split(",")} == allowed


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ('{"protect_labels": ["\\ud800"]}', "surrogate"),
        ('{"finding_ids": ["x\\udfff"]}', "surrogate"),
        ('{"kinds": ["\\udbff"], "extra": 1}', "surrogate"),
        ('{"\\ud800": 1}', "surrogate"),
        ('{"kinds": ' + "[" * 50_000 + "]" * 50_000 + "}", "nested too deeply"),
        ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
    ],
)
def test_unstorable_json_bodies_are_400_not_500(agent: AgentUnderTest, body: str, why: str) -> None:
    """A lone surrogate escape parses in Python but cannot be written to the state or
    audit databases (UTF-8); a deeply nested body overflows the parser's recursion."""
    before = agent.get("/v1/audit/verify").get_json()["count"]
    for url in ("/v1/plans", "/v1/plans/nope/apply"):
        r = agent.client.post(
            url, data=body, headers={**auth(), "Content-Type": "application/json"}
        )
        assert r.status_code == 400, r.get_data(as_text=True)[:300]
        assert r.mimetype == "application/problem+json"
        problem = r.get_json()
        assert problem["code"] == "bad_request"
        assert why in problem["detail"]
        assert problem["errors"] == {"json": [problem["detail"]]}
    verify = agent.get("/v1/audit/verify").get_json()
    assert verify["ok"] is True and verify["count"] == before  # nothing half-written


def test_valid_surrogate_pairs_and_nul_are_fine(agent: AgentUnderTest) -> None:
    body = '{"min_age_seconds": 0, "finding_ids": ["\\ud83d\\ude00", "a\\u0000b"]}'
    r = agent.client.post(
        "/v1/plans", data=body, headers={**auth(), "Content-Type": "application/json"}
    )
    assert r.status_code == 201, r.get_data(as_text=True)
    assert [s["finding_id"] for s in r.get_json()["skipped"]] == ["\U0001f600", "a\x00b"]


@pytest.mark.parametrize("body", [b"\xff\xfe", b'{"kinds": [', b"{'a': 1}"])
def test_invalid_json_keeps_the_parser_message(agent: AgentUnderTest, body: bytes) -> None:
    r = agent.client.post(
        "/v1/plans", data=body, headers={**auth(), "Content-Type": "application/json"}
    )
    assert r.status_code == 400
    assert r.get_json()["errors"] == {"json": ["Invalid JSON body."]}


def _problem_schema(agent: AgentUnderTest) -> dict[str, Any]:
    spec = agent.client.get("/openapi.json").get_json()
    schema: dict[str, Any] = spec["components"]["schemas"]["Problem"]
    return schema


def test_problem_extension_members_match_the_served_schema(agent: AgentUnderTest) -> None:
    """The 409 for an Idempotency-Key reused on another plan names the job and plan it
    belongs to; the served Problem schema must allow such members (RFC 9457 3.2)."""
    h = auth()
    plans = [
        agent.client.post("/v1/plans", json={"kinds": [k]}, headers=h).get_json()["id"]
        for k in ("orphan-layer", "dind-volume")
    ]
    first = agent.client.post(f"/v1/plans/{plans[0]}/apply", headers={**h, "Idempotency-Key": "k"})
    assert first.status_code == 202
    r = agent.client.post(f"/v1/plans/{plans[1]}/apply", headers={**h, "Idempotency-Key": "k"})
    assert r.status_code == 409
    body = r.get_json()
    assert body["job_id"] == first.get_json()["job_id"] and body["plan_id"] == plans[0]
    jsonschema.validate(body, _problem_schema(agent))
    # the schema still requires the RFC 9457 members
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"code": "x", "job_id": "j"}, _problem_schema(agent))


def test_plan_request_body_is_optional_as_documented(agent: AgentUnderTest) -> None:
    """Every field of a plan request has a default and the agent plans without a body;
    the document said the body was required (schemathesis: "Missing request body"
    accepted)."""
    spec = agent.client.get("/openapi.json").get_json()
    assert spec["paths"]["/v1/plans"]["post"]["requestBody"]["required"] is False
    r = agent.client.post("/v1/plans", headers=auth())
    assert r.status_code == 201
    assert r.get_json()["policy"] == {
        "kinds": ["dind-volume", "orphan-layer"],
        "min_age_seconds": 86400,
        "protect_labels": ["keep", "nas-janitor.keep"],
        "finding_ids": None,
        "include_named_volumes": False,
    }


@pytest.mark.parametrize("key", ["", " ", "\t", " \t "])
def test_blank_idempotency_key_is_refused_as_documented(agent: AgentUnderTest, key: str) -> None:
    """The agent refuses a blank key (422); the document now says so with a pattern, so
    a schema-valid key is never refused (schemathesis' positive_data_acceptance)."""
    spec = agent.client.get("/openapi.json").get_json()
    (param,) = spec["paths"]["/v1/plans/{plan_id}/apply"]["post"]["parameters"]
    assert param["name"] == "Idempotency-Key"
    pattern = re.compile(param["schema"]["pattern"])
    assert pattern.search(key) is None
    assert pattern.search("run-42") and pattern.search(" \x1c")
    plan = agent.client.post("/v1/plans", headers=auth()).get_json()["id"]
    r = agent.client.post(f"/v1/plans/{plan}/apply", headers={**auth(), "Idempotency-Key": key})
    assert r.status_code == 422
    assert r.get_json()["errors"] == {"Idempotency-Key": ["must not be empty"]}
    r = agent.client.post(f"/v1/plans/{plan}/apply", headers={**auth(), "Idempotency-Key": " \x1c"})
    assert r.status_code == 202


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(under=st.lists(st.sampled_from(["/", ".", "..", "a", "é", "\n", " ", "\x00"])).map("".join))
def test_under_is_refused_exactly_when_the_document_says(tmp_path_factory: Any, under: str) -> None:
    """``under`` must be an absolute path in normal form; the document now publishes that
    as a pattern, so no schema-valid value is refused (it said any string)."""
    agent = _shared_agent(tmp_path_factory)
    spec = agent.client.get("/openapi.json").get_json()
    params = spec["paths"]["/v1/filesystems/{fs_uuid}/subvolumes"]["get"]["parameters"]
    schema = next(p for p in params if p["name"] == "under")["schema"]
    # ECMA-262 "$" is the end of the text: fullmatch in Python terms
    valid = 1 <= len(under) <= 4096 and re.fullmatch(schema["pattern"], under) is not None
    try:
        check_abs(under)
        accepted_by_paths = True
    except PathRefused:
        accepted_by_paths = False
    if under:  # an empty value is not sent as a parameter value at all
        assert valid == accepted_by_paths, under
    r = agent.client.get(
        f"/v1/filesystems/{agent.sc.fs_uuid}/subvolumes",
        query_string={"under": under},
        headers=auth(),
    )
    assert r.status_code == (200 if valid else 422), (under, r.get_data(as_text=True))


_AGENTS: dict[str, AgentUnderTest] = {}


def _shared_agent(tmp_path_factory: Any) -> AgentUnderTest:
    if "a" not in _AGENTS:
        _AGENTS["a"] = build(tmp_path_factory.mktemp("under") / "state")
    return _AGENTS["a"]


@pytest.mark.parametrize("cursor", ["²", "٣", "1²", "0" * 20, "-1", " 1", "x"])
def test_a_cursor_of_other_digits_is_422_not_500(agent: AgentUnderTest, cursor: str) -> None:
    """str.isdigit() holds for "²" and "٣"; int() refuses the first (500 before)."""
    r = agent.get(f"/v1/filesystems/{agent.sc.fs_uuid}/subvolumes", query_string={"cursor": cursor})
    assert r.status_code == 422, r.get_data(as_text=True)
    assert "cursor" in r.get_json()["errors"]


@pytest.mark.parametrize("cursor", ["0", "256", "9" * 19, "0" * 20, "0" * 200, "²", "1 ", ""])
def test_cursor_is_refused_exactly_when_the_document_says(
    agent: AgentUnderTest, cursor: str
) -> None:
    """The document allowed any cursor up to 200 characters; the agent takes only what
    it hands out (up to 19 ASCII digits). The pattern now says so."""
    spec = agent.client.get("/openapi.json").get_json()
    params = spec["paths"]["/v1/filesystems/{fs_uuid}/subvolumes"]["get"]["parameters"]
    pattern = next(p for p in params if p["name"] == "cursor")["schema"]["pattern"]
    valid = re.fullmatch(pattern, cursor) is not None
    r = agent.get(f"/v1/filesystems/{agent.sc.fs_uuid}/subvolumes", query_string={"cursor": cursor})
    assert r.status_code == (200 if valid else 422), r.get_data(as_text=True)
    assert valid == (cursor.isascii() and cursor.isdigit() and len(cursor) <= 19)


@pytest.mark.parametrize("value", [1.5, 2.5890419884777833e-42, 86400.0, "86400", True])
def test_plan_min_age_must_be_a_json_integer(agent: AgentUnderTest, value: Any) -> None:
    """min_age_seconds is an integer in the document; 1.5 was truncated to 1 and a
    plan made (schemathesis' negative_data_rejection)."""
    r = agent.client.post("/v1/plans", json={"min_age_seconds": value}, headers=auth())
    assert r.status_code == 422, r.get_data(as_text=True)
    assert "min_age_seconds" in r.get_json()["errors"]
    ok = agent.client.post("/v1/plans", json={"min_age_seconds": 86400}, headers=auth())
    assert ok.status_code == 201


@pytest.mark.parametrize(
    ("after_seq", "status"),
    [(2**63 - 1, 200), (2**63, 422), (633348137876192512867189657698304, 422), (-1, 422)],
)
def test_audit_after_seq_beyond_64_bits_is_422_not_500(
    agent: AgentUnderTest, after_seq: int, status: int
) -> None:
    """SQLite integers are 64-bit: a larger after_seq overflowed in the query (500)."""
    r = agent.get("/v1/audit", query_string={"after_seq": after_seq})
    assert r.status_code == status, r.get_data(as_text=True)
    spec = agent.client.get("/openapi.json").get_json()
    params = spec["paths"]["/v1/audit"]["get"]["parameters"]
    assert next(p for p in params if p["name"] == "after_seq")["schema"]["maximum"] == 2**63 - 1


def test_direct_volume_delete_decides_under_the_filesystem_lock(agent: AgentUnderTest) -> None:
    """A direct volume delete chose what to delete from a snapshot taken before it held
    the filesystem's mutation lock: a job deleting the same volume meanwhile left it a
    stale delete set, and it answered 502 trying to clear the read-only flag of a
    subvolume already gone (schemathesis' stateful phase: apply, then DELETE)."""
    sc = agent.sc
    lock = agent.runtime.executor.fs_lock(sc.fs_uuid)
    answer: dict[str, Any] = {}
    calls = len(sc.docker.calls)
    lock.acquire()  # a job's action on this filesystem is running
    try:
        worker = threading.Thread(
            target=lambda: answer.update(
                r=agent.client.delete(f"/v1/volumes/{sc.dind_volume}?dry_run=false", headers=auth())
            )
        )
        worker.start()
        deadline = time.monotonic() + 10
        while len(sc.docker.calls) == calls:  # it has looked at the world
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.3)
        # ... and the running action removes the volume meanwhile, as a job would
        sc.btrfs.set_readonly(sc.dind_ro_parent, False)
        for path in reversed(sc.dind_nested):
            assert sc.btrfs.delete([path])[0].ok, path
        sc.docker.remove_volume(sc.dind_volume)
    finally:
        lock.release()
    worker.join(30)
    r = answer["r"]
    assert r.status_code == 404, r.get_data(as_text=True)
    assert r.get_json()["code"] == "not_found"
    assert agent.get("/v1/audit/verify").get_json()["ok"] is True


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("DELETE", "/v1/volumes/%2F0?dry_run=false"),
        ("DELETE", "/v1/volumes//0?dry_run=false"),
        ("GET", "/v1//host"),
        ("GET", "/v1/volumes//named"),
    ],
)
def test_doubled_slashes_are_not_redirected_to_another_target(
    agent: AgentUnderTest, method: str, url: str
) -> None:
    """werkzeug merged doubled slashes with a 308 redirect, which keeps the method: a
    DELETE of volume "/0" was sent on to delete volume "0". A path with an empty
    segment names nothing: 404."""
    r = agent.client.open(url, method=method, headers=auth())
    assert r.status_code == 404, (r.status_code, r.headers.get("Location"))
    assert "Location" not in r.headers
    assert r.mimetype == "application/problem+json"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.text(st.characters(codec="ascii"), min_size=1, max_size=20))
def test_volume_name_is_refused_exactly_when_the_document_says(
    tmp_path_factory: Any, name: str
) -> None:
    """The document allowed any volume name, the agent refused a DELETE of a name that
    Docker cannot make (422) (schemathesis' positive_data_acceptance). The name's
    pattern is published now; a schema-valid name is never refused as invalid."""
    agent = _shared_agent(tmp_path_factory)
    spec = agent.client.get("/openapi.json").get_json()
    (param,) = spec["paths"]["/v1/volumes/{name}"]["parameters"]
    valid = re.fullmatch(param["schema"]["pattern"], name) is not None
    quoted = urllib.parse.quote(name, safe="")
    deleted = agent.client.delete(f"/v1/volumes/{quoted}", headers=auth())
    got = agent.client.get(f"/v1/volumes/{quoted}", headers=auth())
    if valid:
        assert deleted.status_code in (200, 404, 409), (name, deleted.get_json())
        assert got.status_code in (200, 404)
    else:
        assert deleted.status_code in (404, 422), (name, deleted.get_json())
        assert got.status_code == 404


def test_a_key_first_used_on_an_applied_plan_keeps_naming_its_job(agent: AgentUnderTest) -> None:
    """A key first sent with a plan that already had its job was not recorded: another
    plan could take it, and the first request, replayed, then got a 409 instead of its
    job (found by the state machine's replay rule)."""
    h = auth()
    a, b = (
        agent.client.post("/v1/plans", json={"kinds": [k]}, headers=h).get_json()["id"]
        for k in ("orphan-layer", "dind-volume")
    )
    job_a = agent.client.post(f"/v1/plans/{a}/apply", headers=h).get_json()
    with_key = {**h, "Idempotency-Key": "late-key"}
    first = agent.client.post(f"/v1/plans/{a}/apply", headers=with_key)
    assert (first.status_code, first.get_json()) == (202, job_a)
    other = agent.client.post(f"/v1/plans/{b}/apply", headers=with_key)
    assert other.status_code == 409
    assert other.get_json()["job_id"] == job_a["job_id"]
    for app in (agent, agent.restart()):
        again = app.client.post(f"/v1/plans/{a}/apply", headers=with_key)
        assert (again.status_code, again.get_json()) == (202, job_a)
        assert app.client.post(f"/v1/plans/{b}/apply", headers=with_key).status_code == 409


class _Crash(BaseException):
    """Stands for the process dying: not an Exception, so no handler of the agent's
    sees it, and the job thread just stops."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_resuming_finishes_a_volume_whose_subvolumes_went_before_a_crash(tmp_path: Path) -> None:
    """kill -9 after the btrfs delete of a volume's subvolumes, before ``docker volume
    rm`` and the audit outcome: resuming skipped the action ("changed: the subvolumes
    differ from the plan; gone [...]"), left the volume in Docker, and the job said
    succeeded (found by the robustness kill -9 tests on the lab)."""
    agent = build(tmp_path / "state")
    sc = agent.sc
    h = auth()
    plan = agent.client.post("/v1/plans", json={"kinds": ["dind-volume"]}, headers=h).get_json()
    (action,) = plan["actions"]
    assert action["target"]["name"] == sc.dind_volume
    real_delete = sc.btrfs.delete

    def delete_then_die(paths: Any) -> Any:
        real_delete(paths)
        raise _Crash

    sc.btrfs.delete = delete_then_die  # type: ignore[method-assign]
    job_id = agent.client.post(f"/v1/plans/{plan['id']}/apply", headers=h).get_json()["job_id"]
    join_job_thread(job_id)
    del sc.btrfs.delete
    assert not any(sc.btrfs.exists(p) for p in sc.dind_nested)
    assert sc.docker.volume(sc.dind_volume) is not None  # the crash came before docker

    again = agent.restart()
    assert again.get(f"/v1/jobs/{job_id}").get_json()["state"] == "interrupted"
    r = again.client.post(f"/v1/plans/{plan['id']}/apply", headers=h)
    assert r.status_code == 202 and r.get_json()["job_id"] == job_id
    again.wait_job(job_id)
    job = again.get(f"/v1/jobs/{job_id}").get_json()
    assert job["state"] == "succeeded", job
    (result,) = job["results"]
    assert result["outcome"] == "deleted", result
    assert "deleted before the agent restarted" in result["detail"]
    assert sc.docker.volume(sc.dind_volume) is None
    # the audit: started (before the crash, with every path), then the finish
    entries = again.get("/v1/audit?limit=5000").get_json()["items"]
    mine = [e for e in entries if e["detail"].get("job_id") == job_id and "seq" in e["detail"]]
    assert [e["outcome"] for e in mine] == ["started", "started", "deleted"]
    assert set(mine[0]["detail"]["subvolumes"]) == set(sc.dind_nested)
    assert sorted(mine[-1]["detail"]["deleted_before_restart"]) == sorted(action["subvolume_ids"])
    assert mine[-1]["detail"]["volume_removed"] is True
    assert again.get("/v1/audit/verify").get_json()["ok"] is True


def test_readyz_names_both_backends_when_both_are_down(agent: AgentUnderTest) -> None:
    """/readyz stopped at the first backend down: with Docker and btrfs both away it
    named Docker only."""
    sc = agent.sc
    sc.docker.down = True
    sc.btrfs.missing = True
    r = agent.client.get("/readyz")
    assert r.status_code == 503 and r.mimetype == "application/problem+json"
    body = r.get_json()
    assert body["code"] == "docker_unavailable"
    assert body["unavailable"] == ["docker_unavailable", "btrfs_unavailable"]
    assert "docker" in body["detail"].lower() and "btrfs" in body["detail"].lower()
    sc.docker.down = False
    body = agent.client.get("/readyz").get_json()
    assert (body["code"], body["unavailable"]) == ("btrfs_unavailable", ["btrfs_unavailable"])
    sc.btrfs.missing = False
    assert agent.client.get("/readyz").status_code == 200


def test_a_job_run_while_docker_is_down_fails_its_actions_with_the_reason(
    agent: AgentUnderTest, caplog: pytest.LogCaptureFixture
) -> None:
    """The action's first snapshot raised out of the job: the job read "failed" with
    no result saying why, no job.finish entry in the audit, and a stack trace in the
    log for an expected outage."""
    h = auth()
    plan = agent.client.post("/v1/plans", headers=h).get_json()
    assert len(plan["actions"]) == 2
    agent.sc.docker.down = True
    job_id = agent.client.post(f"/v1/plans/{plan['id']}/apply", headers=h).get_json()["job_id"]
    agent.wait_job(job_id)
    job = agent.get(f"/v1/jobs/{job_id}").get_json()
    assert job["state"] == "failed"
    assert [r["outcome"] for r in job["results"]] == ["failed", "failed"]
    assert all(r["detail"].startswith("docker_unavailable: ") for r in job["results"])
    assert not [r for r in caplog.records if r.exc_info]
    entries = agent.get("/v1/audit?limit=5000").get_json()["items"]
    assert [e["outcome"] for e in entries if e["detail"].get("job_id") == job_id][-2:] == [
        "failed",
        "failed",
    ]
    assert any(e["action"] == "job.finish" and e["outcome"] == "failed" for e in entries)
    assert agent.sc.btrfs.exists(agent.sc.orphan_layer)


def test_what_gunicorn_answers_itself_is_a_problem_too(tmp_path: Path) -> None:
    """gunicorn answers a request line or headers over its limits, or a malformed
    request, before the app sees it: it wrote an HTML page (schemathesis against the
    real agent: "Undocumented Content-Type" text/html on a 414)."""
    agent = launch(tmp_path / "agent", docker_host="unix:///nonexistent/docker.sock")
    try:
        with agent.client() as c:
            answers = [
                (c.get("/v1/volumes/" + "a" * 9000), 414, "uri_too_long"),
                (c.get("/v1/host", headers={"X-Big": "b" * 9000}), 431, "headers_too_large"),
            ]
        host, port = agent.url.removeprefix("https://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            tls = agent.ssl_context(cert=False).wrap_socket(raw, server_hostname=host)
            tls.sendall(b"GET /v1/host HTTP/1.1 extra\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 "), head
        assert b"Content-Type: application/problem+json" in head, head
        assert json.loads(body)["code"] == "bad_request"
        for r, status, code in answers:
            assert r.status_code == status, r.text
            assert r.headers["content-type"] == "application/problem+json"
            problem = r.json()
            assert (problem["status"], problem["code"]) == (status, code)
            assert {"type", "title", "detail"} <= set(problem)
    finally:
        agent.kill()


def test_a_query_holding_a_whole_path_fits_in_the_request_line(tmp_path: Path) -> None:
    """``under`` may be 4096 characters (PATH_MAX), but gunicorn's default request line
    limit is 4094 bytes: a schema-valid listing was refused with 414."""
    agent = launch(tmp_path / "agent", docker_host="unix:///nonexistent/docker.sock")
    try:
        under = ("/" + "d" * 254) * 16  # sixteen components of 254: 4080 bytes
        under += "/" + "e" * 15
        assert len(under) == 4096
        with agent.client() as c:
            r = c.get("/v1/filesystems/x/subvolumes", params={"under": under, "limit": 5000})
        assert r.status_code == 503 and r.json()["code"] == "docker_unavailable", r.text
    finally:
        agent.kill()
