"""``janitorctl run`` notifies the fleet's ``notify`` targets: real HTTP to catchers on
loopback (``tests/robustness/hostile.py``), the agents in-process (fakes). The formats,
``on: failure``, and webhooks that fail (refused, an error status, no answer) without
changing the run's result, each within ``timeouts.notify``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.controller.conftest import Fleet
from tests.robustness.hostile import Catcher, HostileServer

MakeFleet = Callable[..., Fleet]


def notify_fleet(make_fleet: MakeFleet, *targets: dict[str, Any], **timeouts: float) -> Fleet:
    fleet = make_fleet("nas1", "nas2")
    fleet.data["policy"] = {"min_age_seconds": 0}
    fleet.data["notify"] = list(targets)
    fleet.data["timeouts"].update(timeouts)
    fleet.write()
    return fleet


def test_json_and_ntfy_messages(make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str]) -> None:
    with HostileServer(Catcher()) as hook, HostileServer(Catcher()) as ntfy:
        fleet = notify_fleet(
            make_fleet,
            {"url": f"{hook.url}/hooks/s3cret-key", "format": "json", "on": "always"},
            {"url": f"{ntfy.url}/nas-janitor-topic", "format": "ntfy"},
        )
        assert fleet.cli("run") == 0
        (posted,) = hook.requests
        (published,) = ntfy.requests
    err = capsys.readouterr().err
    assert f"notify {hook.url}/… (json): sent in" in err
    assert f"notify {ntfy.url}/… (ntfy): sent in" in err
    assert "s3cret-key" not in err and "nas-janitor-topic" not in err  # secrets stay hidden

    assert (posted.method, posted.path) == ("POST", "/hooks/s3cret-key")
    assert posted.headers["content-type"] == "application/json"
    body = json.loads(posted.body)
    assert body["source"] == "nas-janitor" and body["kind"] == "run"
    assert (body["run"], body["dry_run"], body["ok"], body["exit_code"]) == (1, False, True, 0)
    assert (body["agents_total"], body["agents_failed"]) == (2, 0)
    agents = {a["agent"]: a for a in body["agents"]}
    assert set(agents) == {"nas1", "nas2"}
    for a in agents.values():
        assert set(a) == {
            "agent", "reachable", "deleted", "reclaimed_bytes", "failed", "audit", "problem",
        }  # fmt: skip
        assert a["reachable"] is True and a["deleted"] > 0 and a["failed"] == 0
        assert a["audit"] == "ok" and a["problem"] is None
    assert body["reclaimed_bytes"] == sum(a["reclaimed_bytes"] for a in agents.values()) > 0

    assert (published.method, published.path) == ("POST", "/nas-janitor-topic")
    assert published.headers["title"] == "nas-janitor run 1: ok, 2 agents"
    assert published.headers["priority"] == "default"
    assert published.headers["tags"] == "broom"
    assert published.headers["content-type"] == "text/plain; charset=utf-8"
    text = published.body.decode()
    lines = text.splitlines()
    assert lines[0].startswith("nas1: reachable, deleted ")
    assert ", 0 failed, audit ok" in lines[0]
    assert lines[-1].startswith("reclaimed in all: ")


def test_on_failure_only_after_a_failed_run(
    make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str], closed_port: int
) -> None:
    with HostileServer(Catcher()) as ntfy:
        target = {"url": f"{ntfy.url}/t", "format": "ntfy", "on": "failure"}
        fleet = notify_fleet(make_fleet, target)
        assert fleet.cli("run") == 0
        assert ntfy.requests == []
        assert "(ntfy): not sent (on: failure, and the run went well)" in capsys.readouterr().err
        dead = {"name": "nas3", "url": f"http://127.0.0.1:{closed_port}", "token_env": "NJ_TOKEN"}
        fleet.data["agents"].append(dead)  # not a fake: over the network, refused
        fleet.write()
        assert fleet.cli("run") == 1
        (published,) = ntfy.requests
    assert published.headers["title"] == "nas-janitor run 2: FAILED on 1 of 3 agents"
    assert published.headers["priority"] == "high"
    assert published.headers["tags"] == "warning,broom"
    nas3 = published.body.decode().splitlines()[2]
    assert nas3.startswith(
        "nas3: UNREACHABLE, deleted 0, reclaimed 0 B, 0 failed, audit not pulled"
    )
    assert "problem: GET /v1/findings" in nas3


def test_failing_webhooks_never_fail_the_run_and_are_reported(
    make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str], closed_port: int
) -> None:
    with (
        HostileServer(Catcher(500)) as broken,
        HostileServer(Catcher(hang=True)) as silent,
        HostileServer(Catcher()) as good,
    ):
        fleet = notify_fleet(
            make_fleet,
            {"url": f"http://127.0.0.1:{closed_port}/refused"},
            {"url": f"{broken.url}/broken", "format": "ntfy"},
            {"url": f"{silent.url}/silent"},
            {"url": f"{good.url}/good"},
            notify=1.0,
        )
        start = time.monotonic()
        assert fleet.cli("run", "--json") == 0  # the run went well, whatever the webhooks did
        took = time.monotonic() - start
        assert len(good.requests) == 1 and len(broken.requests) == 1
    captured = capsys.readouterr()
    err = captured.err
    assert f"notify http://127.0.0.1:{closed_port}/… (json): NOT SENT: ConnectError" in err
    assert f"notify {broken.url}/… (ntfy): NOT SENT: answered 500" in err
    assert f"notify {silent.url}/… (json): NOT SENT: no answer within 1s" in err
    assert f"notify {good.url}/… (json): sent in" in err
    assert "(the run's result stands)" in err and "Traceback" not in err
    results = json.loads(captured.out)["notify"]
    assert [(r["sent"], r["skipped"]) for r in results] == [(False, False)] * 3 + [(True, False)]
    assert results[2]["error"] == "no answer within 1s"
    # the webhooks are tried at once, each within timeouts.notify
    assert took < 4, took


def test_a_dry_run_says_so(make_fleet: MakeFleet) -> None:
    with HostileServer(Catcher()) as ntfy, HostileServer(Catcher()) as hook:
        fleet = notify_fleet(
            make_fleet, {"url": f"{ntfy.url}/t", "format": "ntfy"}, {"url": f"{hook.url}/h"}
        )
        assert fleet.cli("run", "--dry-run") == 0
        (published,) = ntfy.requests
        (posted,) = hook.requests
    assert published.headers["title"] == "nas-janitor run 1 (dry run): ok, 2 agents"
    body = json.loads(posted.body)
    assert body["dry_run"] is True and all(a["deleted"] == 0 for a in body["agents"])
