"""Bugs the robustness suite found in the agent, each pinned by a small test over the
stateful fakes (the schemathesis runs find them again only by chance)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.agent.apphelpers import AgentUnderTest, auth, build


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
