"""The fleet file: a good one loads, every bad field is named by its path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controller.errors import ConfigError
from controller.fleet import (
    AgentSpec,
    Limits,
    NotifyTarget,
    Timeouts,
    default_store_path,
    load_fleet,
    parse_fleet,
)
from shared.models import Policy

EXAMPLE = """\
concurrency: 8
retries: 3
timeouts: {connect: 2, request: 15, job: 600, poll: 1}
store: state/controller.db
policy:
  kinds: [dind-volume]
  min_age_seconds: 3600
  protect_labels: [keep]
agents:
  - name: nas1
    url: https://nas1.lan:8443/
    token_file: tokens/nas1
    ca: ca.pem
    client_cert: ctl.pem
    client_key: ctl.key
    labels: {site: home, tier: main}
  - name: nas2
    url: http://10.0.0.3:8080
    token_env: NAS2_TOKEN
"""


def agent(**kw: Any) -> dict[str, Any]:
    return {"name": "nas1", "url": "http://nas1:8080", "token_env": "T", **kw}


def problems(data: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_fleet(data, base=Path("/etc/nj"))
    return str(info.value)


def test_the_documented_example_loads(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(EXAMPLE, encoding="utf-8")
    fleet = load_fleet(path)
    assert fleet.concurrency == 8 and fleet.retries == 3
    # timeouts.agent defaults to the job's time and 15 minutes more
    assert fleet.timeouts == Timeouts(connect=2, request=15, job=600, agent=1500, poll=1)
    assert fleet.limits == Limits()
    assert fleet.notify == ()
    assert fleet.store == tmp_path / "state/controller.db"
    assert fleet.policy == Policy(
        kinds=("dind-volume",), min_age_seconds=3600, protect_labels=("keep",)
    )
    nas1, nas2 = fleet.agents
    assert nas1 == AgentSpec(
        name="nas1",
        url="https://nas1.lan:8443",
        token_file=tmp_path / "tokens/nas1",
        ca=tmp_path / "ca.pem",
        client_cert=tmp_path / "ctl.pem",
        client_key=tmp_path / "ctl.key",
        labels={"site": "home", "tier": "main"},
    )
    assert nas2.token_env == "NAS2_TOKEN" and nas2.token_file is None
    assert fleet.source == path


def test_the_module_docstring_example_loads(tmp_path: Path) -> None:
    import controller.fleet as mod

    assert mod.__doc__ is not None
    text = mod.__doc__.split("\n\n")[1]
    path = tmp_path / "fleet.yaml"
    path.write_text("\n".join(line[4:] for line in text.splitlines()), encoding="utf-8")
    fleet = load_fleet(path)
    assert [a.name for a in fleet.agents] == ["nas1"]
    assert fleet.timeouts.agent == 4500 and fleet.timeouts.notify == 10
    assert fleet.limits == Limits(answer_bytes=16 << 20, audit_entries=10_000)
    assert fleet.notify == (NotifyTarget("https://ntfy.sh/my-nas-janitor", "ntfy", "failure"),)


def test_notify_entries_limits_and_the_agent_timeout(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(
        """\
timeouts: {job: 60, agent: 90, notify: 3}
limits: {answer_bytes: 65536, audit_entries: 50}
notify:
  - url: http://127.0.0.1:9/hook
  - {url: "https://ntfy.example/nj", format: ntfy, on: failure}
  - {url: "https://hooks.example/x?key=s3cret", "on": always, format: json}
agents: [{name: a, url: "http://a:1", token_env: T}]
""",
        encoding="utf-8",
    )
    fleet = load_fleet(path)
    assert fleet.timeouts.agent == 90 and fleet.timeouts.notify == 3
    assert fleet.limits == Limits(answer_bytes=65536, audit_entries=50)
    assert fleet.notify == (
        NotifyTarget("http://127.0.0.1:9/hook", "json", "always"),
        NotifyTarget("https://ntfy.example/nj", "ntfy", "failure"),
        NotifyTarget("https://hooks.example/x?key=s3cret", "json", "always"),
    )
    # what reports show of a webhook: never its path or query (a key, a topic)
    assert fleet.notify[2].shown == "https://hooks.example/…"
    assert fleet.notify[0].shown == "http://127.0.0.1:9/…"
    client = fleet.client(fleet.agents[0], environ={"T": "t"})
    assert client.max_answer_bytes == 65536 and client.timeout == 30


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"notify": [{"url": "ftp://x"}]}, "notify[0].url: must be http://host"),
        ({"notify": [{"url": "http://x", "format": "xml"}]}, "notify[0].format: Must be one of"),
        ({"notify": [{"url": "http://x", True: "sometimes"}]}, "notify[0].on: Must be one of"),
        ({"notify": [{"format": "json"}]}, "notify[0].url: Missing data"),
        ({"notify": {"url": "http://x"}}, "notify: Not a valid list"),
        ({"limits": {"answer_bytes": 10}}, "limits.answer_bytes: from 4096 to 1 GiB"),
        ({"limits": {"audit_entries": 0}}, "limits.audit_entries"),
        ({"timeouts": {"agent": 0}}, "timeouts.agent: agent must be > 0"),
    ],
)
def test_bad_notify_limits_and_timeouts_are_named(data: dict[str, Any], expected: str) -> None:
    assert expected in problems({"agents": [agent()], **data})


def test_defaults() -> None:
    fleet = parse_fleet({"agents": [agent()]}, base=Path("/x"))
    assert fleet.policy == Policy() and fleet.concurrency == 4 and fleet.retries == 2
    assert fleet.timeouts == Timeouts() and fleet.store is None
    assert fleet.agents[0].labels == {}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({}, "agents: Missing data for required field"),
        ({"agents": []}, "agents: name at least one agent"),
        ({"agents": [agent(url="ftp://nas1")]}, "agents[0].url: must be http://"),
        ({"agents": [agent(url="nas1:8080")]}, "agents[0].url"),
        ({"agents": [agent(url="http://nas1/?x=1")]}, "agents[0].url: must not carry a query"),
        ({"agents": [agent(), agent(name="ok")]}, None),
        ({"agents": [agent(), agent()]}, "agents[1].name: duplicate 'nas1'"),
        ({"agents": [agent(name="has space")]}, "agents[0].name: letters, digits"),
        ({"agents": [agent(token_env=None)]}, "agents[0].token_env"),
        ({"agents": [{"name": "a", "url": "http://a"}]}, "agents[0].token_file: give exactly one"),
        ({"agents": [agent(token_file="t")]}, "agents[0].token_file: give exactly one"),
        ({"agents": [agent(token_env="1BAD")]}, "agents[0].token_env: not a variable name"),
        ({"agents": [agent(ca="ca.pem")]}, "agents[0].ca: only for an https url"),
        ({"agents": [agent(client_key="k")]}, "agents[0].client_key: needs client_cert"),
        ({"agents": [agent(labels={"a": 1})]}, "agents[0].labels"),
        ({"agents": [agent(tokn="x")]}, "agents[0].tokn: Unknown field"),
        ({"agents": [agent()], "concurrency": 0}, "concurrency:"),
        ({"agents": [agent()], "concurrency": "4"}, "concurrency: Not a valid integer"),
        ({"agents": [agent()], "timeouts": {"job": 0}}, "timeouts.job: job must be > 0"),
        ({"agents": [agent()], "timeouts": {"jobs": 5}}, "timeouts.jobs: Unknown field"),
        ({"agents": [agent()], "policy": {"kinds": ["x"]}}, "policy.kinds[0]: Must be one of"),
        ({"agents": [agent()], "policy": {"min_age_seconds": -1}}, "policy.min_age_seconds"),
        ({"agents": [agent()], "policy": {"finding_ids": ["x"]}}, "policy.finding_ids: Unknown"),
        ({"agents": [agent()], "policy": ["dind-volume"]}, "policy: Invalid input type"),
        ({"agents": [agent()], "colour": "red"}, "colour: Unknown field"),
        (["agents"], "must be a mapping"),
        (None, "must be a mapping"),
    ],
)
def test_bad_fields_are_named_by_path(data: Any, expected: str | None) -> None:
    if expected is None:
        parse_fleet(data, base=Path("/x"))
        return
    assert expected in problems(data)


def test_every_problem_is_reported_at_once() -> None:
    text = problems(
        {"agents": [agent(url="ftp://x"), agent(name="b", tokn=1)], "policy": {"kinds": []}}
    )
    assert "agents[0].url" in text and "agents[1].tokn" in text and "policy.kinds" in text


def test_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read fleet file"):
        load_fleet(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("agents: [\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_fleet(bad)
    assert info.value.where == str(bad)


def test_tokens_are_read_when_a_client_is_made(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("s3cret\n", encoding="utf-8")
    (tmp_path / "tok").chmod(0o640)
    fleet = parse_fleet(
        {
            "agents": [
                {"name": "nas1", "url": "http://nas1", "token_file": "tok"},
                agent(name="b", token_env="B"),
            ]
        },
        base=tmp_path,
    )
    a, b = fleet.agents
    assert a.token() == "s3cret"
    assert b.token({"B": "x"}) == "x"
    with pytest.raises(ConfigError, match="agent b: B: environment variable B is not set"):
        fleet.client(b, environ={})
    (tmp_path / "tok").unlink()
    with pytest.raises(ConfigError, match="agent nas1"):
        fleet.client(a)


def test_select_by_name_and_label() -> None:
    fleet = parse_fleet(
        {
            "agents": [
                agent(name="a", labels={"site": "home"}),
                agent(name="b", labels={"site": "office"}),
                agent(name="c", labels={"site": "home", "tier": "backup"}),
            ]
        },
        base=Path("/x"),
    )
    names = lambda agents: [x.name for x in agents]  # noqa: E731
    assert names(fleet.select()) == ["a", "b", "c"]
    assert names(fleet.select(["c", "a", "c"])) == ["c", "a"]
    assert names(fleet.select(labels=["site=home"])) == ["a", "c"]
    assert names(fleet.select(labels=["site=home", "tier=backup"])) == ["c"]
    assert names(fleet.select(["b"], ["site=home"])) == []
    with pytest.raises(ConfigError, match="no such agent in the fleet: zz"):
        fleet.select(["zz"])
    with pytest.raises(ConfigError, match="expected key=value"):
        fleet.select(labels=["site"])


def test_default_store_path() -> None:
    assert default_store_path({}, euid=0) == Path("/var/lib/nas-janitor/controller.db")
    assert default_store_path({"HOME": "/home/u"}, euid=1000) == Path(
        "/home/u/.local/state/nas-janitor/controller.db"
    )
    assert default_store_path({"XDG_STATE_HOME": "/s", "HOME": "/h"}, euid=1000) == Path(
        "/s/nas-janitor/controller.db"
    )
