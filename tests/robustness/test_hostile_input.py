"""Hostile input over the real app and the stateful fakes (issue 12, cases 5 and 7):
numbers beyond any sane value and lists beyond the caps are 4xx problems, never a 500,
and nothing is planned or audited for them."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.policy import MAX_FINDING_IDS, MAX_PROTECT_LABELS
from tests.agent.http.apphelpers import AgentUnderTest, auth, build

BIG = "9" * 5000  # past Python's int-from-string limit (4,300 digits)


@pytest.fixture
def agent(tmp_path: Path) -> AgentUnderTest:
    return build(tmp_path / "state")


def _problem(r, status: int, code: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    assert r.status_code == status, (r.status_code, r.get_data(as_text=True)[:300])
    assert r.mimetype == "application/problem+json"
    body = r.get_json()
    assert body["code"] == code, body
    assert "Traceback" not in r.get_data(as_text=True)
    return body  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "body",
    [
        '{"min_age_seconds": BIG}'.replace("BIG", BIG),
        '{"min_age_seconds": -BIG}'.replace("BIG", BIG),
        '{"finding_ids": [BIG]}'.replace("BIG", BIG),
        '{"kinds": ["orphan-layer"], "x": {"y": [BIG]}}'.replace("BIG", BIG),
        '{"min_age_seconds": 1e99999}',
        '{"min_age_seconds": -1e99999}',
        '{"min_age_seconds": NaN}',
        '{"min_age_seconds": Infinity}',
    ],
)
def test_numbers_beyond_reason_in_a_body_are_400(agent: AgentUnderTest, body: str) -> None:
    before = agent.get("/v1/audit/verify").get_json()["count"]
    for url in ("/v1/plans", "/v1/plans/nope/apply"):
        r = agent.client.post(
            url, data=body, headers={**auth(), "Content-Type": "application/json"}
        )
        problem = _problem(r, 400, "bad_request")
        assert "number" in problem["detail"] or "not JSON" in problem["detail"], problem
    assert agent.get("/v1/audit/verify").get_json()["count"] == before


@pytest.mark.parametrize(
    "url",
    [
        f"/v1/audit?after_seq={BIG}",
        f"/v1/audit?limit={BIG}",
        f"/v1/audit?after_seq={2**63}",
        f"/v1/findings?min_age_seconds={BIG}",
        f"/v1/findings?min_age_seconds=-{BIG}",
        f"/v1/filesystems/x/subvolumes?limit={BIG}",
        f"/v1/filesystems/x/subvolumes?cursor={BIG}",
    ],
)
def test_numbers_beyond_reason_in_a_query_are_422(agent: AgentUnderTest, url: str) -> None:
    _problem(agent.get(url), 422, "validation_failed")


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_numbers_beyond_reason_in_a_path_are_4xx(agent: AgentUnderTest, method: str) -> None:
    r = agent.client.open(f"/v1/filesystems/x/subvolumes/{BIG}", method=method, headers=auth())
    assert 400 <= r.status_code < 500 and r.mimetype == "application/problem+json"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("finding_ids", [f"id-{i}" for i in range(MAX_FINDING_IDS + 1)]),
        ("protect_labels", [f"l{i}" for i in range(MAX_PROTECT_LABELS + 1)]),
        ("kinds", ["orphan-layer"] * 13),
    ],
)
def test_lists_over_their_cap_are_422(agent: AgentUnderTest, field: str, value: list[str]) -> None:
    before = agent.get("/v1/audit/verify").get_json()["count"]
    r = agent.client.post("/v1/plans", json={"min_age_seconds": 0, field: value}, headers=auth())
    problem = _problem(r, 422, "validation_failed")
    assert field in problem["errors"], problem
    assert agent.get("/v1/audit/verify").get_json()["count"] == before


def test_lists_at_their_cap_are_taken(agent: AgentUnderTest) -> None:
    ids = [f"id-{i}" for i in range(MAX_FINDING_IDS)]
    r = agent.client.post(
        "/v1/plans", json={"min_age_seconds": 0, "finding_ids": ids}, headers=auth()
    )
    assert r.status_code == 201, r.get_data(as_text=True)[:300]
    assert len(r.get_json()["skipped"]) == MAX_FINDING_IDS
