"""janitorctl end to end, in-process, against fake agents: output, store, exit codes."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from controller.cli import main
from controller.store import Store
from tests.controller.conftest import Fleet

MakeFleet = Callable[..., Fleet]


def out_json(capsys: pytest.CaptureFixture[str]) -> Any:
    return json.loads(capsys.readouterr().out)


def table_rows(out: str) -> list[list[str]]:
    """The cells of every body row of the tables printed."""
    return [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in out.splitlines()
        if line.startswith("│")
    ]


def store_of(fleet: Fleet) -> Store:
    return Store.open(fleet.path.parent / "controller.db")


# -- config and usage: exit 2, nothing done -----------------------------------------------


def test_no_fleet_file_is_exit_2(capsys: pytest.CaptureFixture[str], monkeypatch: Any) -> None:
    monkeypatch.delenv("NAS_JANITOR_FLEET", raising=False)
    assert main(["findings"], environ={}) == 2
    assert "no fleet file: give --fleet PATH or set NAS_JANITOR_FLEET" in capsys.readouterr().err


def test_fleet_from_the_environment(make_fleet: MakeFleet, monkeypatch: Any) -> None:
    fleet = make_fleet("nas1")
    monkeypatch.setenv("NAS_JANITOR_FLEET", str(fleet.path))
    assert (
        main(["findings"], environ={"NJ_TOKEN": "tok-all"}, transport_factory=fleet.transport) == 0
    )


@pytest.mark.parametrize("command", ["agents", "findings", "plan", "run", "audit"])
def test_a_bad_fleet_file_is_exit_2_and_calls_no_agent(
    make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    fleet = make_fleet("nas1", "nas2")
    fleet.data["agents"][1]["url"] = "nas2:8080"
    fleet.data["timeouts"]["poll"] = -1
    fleet.write()
    assert fleet.cli(command) == 2
    err = capsys.readouterr().err
    assert "bad config" in err and "agents[1].url" in err and "timeouts.poll" in err
    assert fleet.fakes["nas1"].requests == []


def test_a_missing_token_is_exit_2_before_any_agent_is_called(
    make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = make_fleet("nas1", "nas2")
    fleet.data["agents"][1]["token_env"] = "NAS2_TOKEN"
    fleet.write()
    assert fleet.cli("run") == 2
    assert "agent nas2: NAS2_TOKEN: environment variable NAS2_TOKEN is not set" in (
        capsys.readouterr().err
    )
    assert fleet.fakes["nas1"].requests == []


def test_usage_errors_are_exit_2(make_fleet: MakeFleet) -> None:
    fleet = make_fleet("nas1")
    assert fleet.cli("no-such-command") == 2
    assert fleet.cli("findings", "--kind", "everything") == 2
    assert fleet.cli("--agent", "zz", "findings") == 2
    assert fleet.cli("apply", "--plan", "nas1") == 2
    assert fleet.cli("--help") == 0
    assert main(["--version"]) == 0


# -- agents and findings -------------------------------------------------------------------


def test_agents(make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str]) -> None:
    fleet = make_fleet("nas1", "nas2")
    assert fleet.cli("agents") == 0
    out = capsys.readouterr().out
    assert "nas1" in out and "4.4.302+" in out and "btrfs" in out and "20.10.3" in out
    fleet.fakes["nas2"].docker_down = True
    assert fleet.cli("agents", "--json") == 1
    data = out_json(capsys)
    assert [a["ready"] for a in data] == [True, False]
    assert data[1]["not_ready"] == "docker_unavailable"
    assert data[0]["host"]["kernel"]["rmdir_deletes_subvolumes"] is False


def test_agents_with_a_dead_one(
    make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str], closed_port: int
) -> None:
    fleet = make_fleet(
        "nas1",
        more_agents=[
            {"name": "dead", "url": f"http://127.0.0.1:{closed_port}", "token_env": "NJ_TOKEN"}
        ],
    )
    assert fleet.cli("--json", "agents") == 1
    data = out_json(capsys)
    assert data[0]["ok"] is True
    assert data[1]["ok"] is False and "GET /healthz" in data[1]["error"]


def test_findings_one_table_for_the_fleet(
    make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = make_fleet("nas1", "nas2")
    fleet.fakes["nas2"].add_dind_volume("only-on-nas2", nested=1)
    assert fleet.cli("findings") == 0
    out = capsys.readouterr().out
    agents = [row[0] for row in table_rows(out)]
    assert agents.count("nas1") == 4 and agents.count("nas2") == 5
    assert "volume only-on-nas2" in out and "used by container c0ffee" in out
    assert "9 findings on 2 agent(s)" in out
    assert fleet.cli("findings", "--kind", "orphan-layer", "--json") == 0
    data = out_json(capsys)
    assert [len(a["findings"]) for a in data] == [1, 1]
    assert data[0]["findings"][0]["kind"] == "orphan-layer"
    assert fleet.fakes["nas1"].requests[-1].url.params.get_list("kind") == ["orphan-layer"]


def test_findings_with_one_agent_failing(
    make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = make_fleet("nas1", "nas2")
    fleet.data["agents"][1]["token_env"] = "BAD"
    fleet.write()
    assert fleet.cli("findings", env={"BAD": "not-a-token"}) == 1
    captured = capsys.readouterr()
    assert "4 findings on 1 agent(s)" in captured.out
    assert "nas2" in captured.err and "401 unauthorized" in captured.err


# -- plan and apply ------------------------------------------------------------------------


def test_plan_then_apply_exactly_that_plan(
    make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = make_fleet("nas1", "nas2")
    assert fleet.cli("plan") == 0
    out = capsys.readouterr().out
    assert "remove_volume" in out and "volume ci-old" in out and "dind-volume:ci-busy" in out
    assert fleet.fakes["nas1"].volumes.keys() >= {"ci-old"}  # planning deleted nothing
    # something appears after the plan was shown: apply must not touch it
    fleet.fakes["nas1"].add_dind_volume("new-leak", nested=1)
    assert fleet.cli("apply", "--yes") == 0
    captured = capsys.readouterr()
    assert "nas1: plan p1" in captured.err and "job j1 succeeded 2/2" in captured.err
    for fake in fleet.fakes.values():
        assert "ci-old" not in fake.volumes and "ci-busy" in fake.volumes
    assert "new-leak" in fleet.fakes["nas1"].volumes
    assert "3.0 GiB" in captured.out
    # applied plans are not applied twice
    assert fleet.cli("apply", "--yes") == 0
    assert "nothing to apply" in capsys.readouterr().err
    with store_of(fleet) as store:
        (record,) = [r for r in store.run_agents(1) if r.agent == "nas1"]
    assert (record.planned, record.deleted, record.reclaimed_bytes) == (2, 2, (3 << 30) + (1 << 20))


def test_apply_a_named_plan_and_confirmation(
    make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = make_fleet("nas1", "nas2")
    assert fleet.cli("--agent", "nas2", "plan", "--json") == 0
    (entry,) = out_json(capsys)
    plan_id = entry["plan"]["id"]
    # not a terminal and no --yes: refused as a usage error, nothing applied
    assert fleet.cli("apply", "--plan", f"nas2={plan_id}") == 2
    assert fleet.fakes["nas2"].jobs == {}
    assert fleet.cli("apply", "--plan", f"nas2={plan_id}", "--yes", "--json") == 0
    data = out_json(capsys)
    assert [a["agent"] for a in data["agents"]] == ["nas2"]
    assert data["agents"][0]["deleted"] == 2
    assert fleet.fakes["nas1"].jobs == {}
    assert fleet.cli("apply", "--plan", "zz=p1", "--yes") == 2


def test_an_expired_plan_fails_apply(
    make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = make_fleet("nas1")
    assert fleet.cli("plan") == 0
    fleet.fakes["nas1"].expired.add("p1")
    assert fleet.cli("apply", "--yes") == 1
    assert "plan_expired" in capsys.readouterr().out


# -- run -------------------------------------------------------------------------------------


def test_run_all_well(make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str]) -> None:
    fleet = make_fleet("nas1", "nas2", "nas3")
    assert fleet.cli("run") == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "run 1" in out and "3.0 GiB (3222274048)" in out  # human readable and exact
    assert "reclaimed in all: 9.0 GiB" in out
    for fake in fleet.fakes.values():
        assert "ci-old" not in fake.volumes
        assert not any(s.owner == "orphan-layer" for s in fake.subvols.values())
    assert "job j1 running 1/2" in captured.err  # plain progress lines when not a terminal
    assert fleet.sleeps and set(fleet.sleeps) == {0.001}  # polls at the fleet's pace
    with store_of(fleet) as store:
        records = store.run_agents(1)
        assert [r.agent for r in records] == ["nas1", "nas2", "nas3"]
        assert all(r.audit_ok and r.deleted == 2 and r.skipped == 0 for r in records)
        assert all(r.plan_skipped == 1 for r in records)  # the busy volume
        assert store.audit_entries("nas1") == fleet.fakes["nas1"].audit


def test_run_waits_for_the_space_to_be_freed(
    make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = make_fleet("nas1")
    fleet.fakes["nas1"].freed_after_looks = 3  # the kernel frees it three looks later
    assert fleet.cli("--json", "run") == 0
    (nas1,) = json.loads(capsys.readouterr().out)["agents"]
    assert nas1["pending_bytes"] == 0 and nas1["reclaimed_bytes"] > 0
    with store_of(fleet) as store:
        assert store.run_agents(1)[0].pending_bytes == 0


def test_run_says_what_is_not_freed_when_the_wait_runs_out(
    make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = make_fleet("nas1", extra={"timeouts": {"poll": 0.001, "job": 30, "freed": 0.05}})
    fleet.fakes["nas1"].freed_after_looks = 10**9  # a slow cleaner
    assert fleet.cli("run") == 0  # the deletes are done: not a failure
    out = capsys.readouterr().out
    assert "nas1: 3.0 GiB (3222274048) deleted but not freed yet" in out
    with store_of(fleet) as store:
        assert store.run_agents(1)[0].pending_bytes == 3222274048


def test_run_does_not_wait_on_an_agent_that_does_not_say(make_fleet: MakeFleet) -> None:
    fleet = make_fleet("nas1")
    fleet.fakes["nas1"].freed_after_looks = None  # an older agent: no pending_bytes
    assert fleet.cli("run") == 0
    with store_of(fleet) as store:
        assert store.run_agents(1)[0].pending_bytes is None


def test_run_dry_run_changes_nothing(
    make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = make_fleet("nas1")
    before = dict(fleet.fakes["nas1"].volumes)
    assert fleet.cli("run", "--dry-run", "--json") == 0
    data = out_json(capsys)
    assert data["dry_run"] is True and data["exit"] == 0
    (agent,) = data["agents"]
    assert (agent["planned"], agent["deleted"], agent["job_id"]) == (2, 0, None)
    assert agent["findings"] == 4 and agent["findings_by_kind"]["dind-volume"] == 2
    assert fleet.fakes["nas1"].volumes == before and fleet.fakes["nas1"].jobs == {}
    assert not any(r.url.path.endswith("/apply") for r in fleet.fakes["nas1"].requests)


def test_run_policy_from_the_fleet_and_options(make_fleet: MakeFleet) -> None:
    fleet = make_fleet("nas1")
    fleet.data["policy"] = {
        "kinds": ["orphan-layer"],
        "min_age_seconds": 60,
        "protect_labels": ["k"],
    }
    fleet.write()
    assert fleet.cli("run", "--dry-run") == 0
    (post,) = [r for r in fleet.fakes["nas1"].requests if r.method == "POST"]
    assert json.loads(post.content) == {
        "kinds": ["orphan-layer"],
        "min_age_seconds": 60,
        "protect_labels": ["k"],
    }
    assert fleet.cli("run", "--dry-run", "--kind", "dind-volume", "--min-age", "5") == 0
    post = [r for r in fleet.fakes["nas1"].requests if r.method == "POST"][-1]
    assert json.loads(post.content)["kinds"] == ["dind-volume"]
    assert json.loads(post.content)["min_age_seconds"] == 5


def test_run_with_a_dead_agent_still_cleans_the_others(
    make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str], closed_port: int
) -> None:
    fleet = make_fleet(
        "nas1",
        "nas2",
        more_agents=[
            {"name": "dead", "url": f"http://127.0.0.1:{closed_port}", "token_env": "NJ_TOKEN"}
        ],
    )
    assert fleet.cli("run", "--json") == 1
    data = out_json(capsys)
    by_name = {a["agent"]: a for a in data["agents"]}
    assert (
        by_name["dead"]["reachable"] is False and "Connection refused" in by_name["dead"]["error"]
    )
    assert by_name["dead"]["audit_ok"] is None
    assert by_name["nas1"]["deleted"] == by_name["nas2"]["deleted"] == 2
    assert "ci-old" not in fleet.fakes["nas1"].volumes


def test_run_with_a_failed_action_is_exit_1(
    make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = make_fleet("nas1", "nas2")
    fleet.fakes["nas2"].fail_targets.add("dind-volume:ci-old")
    assert fleet.cli("run") == 1
    out = capsys.readouterr().out
    rows = {row[0]: row for row in table_rows(out)}
    # AGENT REACHABLE FINDINGS PLANNED DELETED SKIPPED FAILED RECLAIMED AUDIT-OK PROBLEM
    assert rows["nas1"][1:7] == ["yes", "4", "2", "2", "1", "0"]
    assert rows["nas2"][1:7] == ["yes", "4", "2", "1", "1", "1"]
    assert rows["nas2"][7] == "1.0 MiB (1048576)" and rows["nas2"][8] == "yes"
    with store_of(fleet) as store:
        (r1, r2) = store.run_agents(1)
    assert (r1.failed, r1.deleted) == (0, 2)
    assert (r2.failed, r2.deleted, r2.job_state) == (1, 1, "partial")


def test_run_with_skipped_actions_only_is_exit_0(make_fleet: MakeFleet) -> None:
    fleet = make_fleet("nas1")
    real = fleet.fakes["nas1"].create_plan

    def plan_then_someone_cleans(body: dict[str, Any]) -> Any:
        response = real(body)
        fleet.fakes["nas1"].remove_volume("ci-old")  # gone before the job runs
        return response

    fleet.fakes["nas1"].create_plan = plan_then_someone_cleans  # type: ignore[method-assign]
    assert fleet.cli("run") == 0
    with store_of(fleet) as store:
        (r,) = store.run_agents(1)
    assert (r.deleted, r.skipped, r.failed) == (1, 1, 0)


def test_run_with_a_job_that_never_ends(
    make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = make_fleet("nas1", "nas2")
    fleet.data["timeouts"]["job"] = 0.05
    fleet.data["timeouts"]["poll"] = 0.01
    fleet.write()
    fleet.fakes["nas2"].jobs_stuck = True
    assert fleet.cli("run", "--json") == 1
    data = {a["agent"]: a for a in out_json(capsys)["agents"]}
    assert data["nas1"]["error"] is None and data["nas1"]["deleted"] == 2
    assert "still queued" in data["nas2"]["error"] and data["nas2"]["job_id"] == "j1"


def test_run_notices_a_rewritten_audit(
    make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = make_fleet("nas1", "nas2")
    assert fleet.cli("run") == 0
    fleet.fakes["nas1"].rewrite_audit(len(fleet.fakes["nas1"].audit), outcome="nothing happened")
    assert fleet.cli("run", "--dry-run") == 1
    captured = capsys.readouterr()
    assert "nas1" in captured.err and "audit rewritten" in captured.err
    with store_of(fleet) as store:
        assert [r.audit_ok for r in store.run_agents(2)] == [False, True]


# -- audit and report -------------------------------------------------------------------------


def test_audit_command(make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str]) -> None:
    fleet = make_fleet("nas1", "nas2")
    for fake in fleet.fakes.values():
        fake.log("delete_volume", "x", "refused", {"code": "in_use"})
    assert fleet.cli("audit", "--json") == 0
    data = out_json(capsys)
    assert [(a["agent"], a["status"], a["new"]) for a in data] == [
        ("nas1", "ok", 1),
        ("nas2", "ok", 1),
    ]
    fleet.fakes["nas2"].rewrite_audit(1, outcome="done")
    assert fleet.cli("audit") == 1
    captured = capsys.readouterr()
    assert "REWRITTEN" in captured.out and "--accept-rewrite nas2" in captured.err
    assert fleet.cli("audit", "--accept-rewrite", "nas2") == 0
    assert fleet.cli("audit", "--accept-rewrite", "zz") == 2


def test_report_reads_only_the_store(
    make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = make_fleet("nas1", "nas2")
    fleet.fakes["nas2"].fail_targets.add("orphan-layer:263")
    today = datetime.now(UTC)
    fleet.fakes["nas1"].t0 = today
    fleet.fakes["nas1"].log("delete_volume", "ci-busy", "refused", {"code": "in_use"})
    fleet.fakes["nas2"].log("delete_volume", "ci-busy", "refused", {"code": "in_use"})  # 2024
    assert fleet.cli("run") == 1
    fleet.fakes["nas2"].fail_targets.clear()
    assert fleet.cli("run") == 0  # the second time the orphan goes too
    capsys.readouterr()
    # no fleet file needed, and no agent called
    store = str(fleet.path.parent / "controller.db")
    calls = {n: len(f.requests) for n, f in fleet.fakes.items()}
    assert main(["--store", store, "report", "--json"], environ={}) == 0
    data = out_json(capsys)
    rows = {r["agent"]: r for r in data["rows"]}
    assert rows["nas1"]["runs"] == 2 and rows["nas1"]["deleted"] == 2
    assert rows["nas1"]["reclaimed_bytes"] == (3 << 30) + (1 << 20)
    assert rows["nas2"]["failed"] == 1 and rows["nas2"]["refused"] == 2  # ci-busy, twice
    assert rows["nas2"]["deleted"] == 2 and rows["nas2"]["found"] == 4
    assert data["audit_refusals"] == [
        {"agent": "nas1", "day": today.date().isoformat(), "count": 1}
    ]  # nas2's refusal is older than 30 days
    assert {n: len(f.requests) for n, f in fleet.fakes.items()} == calls
    assert main(["--store", store, "report", "--by", "run"], environ={}) == 0
    out = capsys.readouterr().out
    assert "#1" in out and "#2" in out and "nas1: reclaimed 3.0 GiB" in out
    assert main(["--store", store, "--agent", "nas2", "report", "--json"], environ={}) == 0
    assert {r["agent"] for r in out_json(capsys)["rows"]} == {"nas2"}


def test_store_option_wins_over_the_fleet_file(make_fleet: MakeFleet, tmp_path: Path) -> None:
    fleet = make_fleet("nas1")
    other = tmp_path / "elsewhere" / "other.db"
    assert fleet.cli("--store", str(other), "run", "--dry-run") == 0
    assert other.exists() and not (fleet.path.parent / "controller.db").exists()


# -- global options after the command, as kubectl takes them --------------------------------


def cli_after(fleet: Fleet, *argv: str) -> int:
    """janitorctl with ``argv`` exactly (no --fleet put first)."""
    return main(
        list(argv),
        environ={"NJ_TOKEN": "tok-all"},
        transport_factory=fleet.transport,
        sleep=fleet.sleeps.append,
    )


@pytest.mark.parametrize("command", ["agents", "findings", "plan", "run", "audit"])
def test_fleet_and_json_after_the_command(
    make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    fleet = make_fleet("nas1", "nas2")
    assert cli_after(fleet, command, "--fleet", str(fleet.path), "--json") == 0
    after = out_json(capsys)
    assert fleet.fakes["nas1"].requests and fleet.fakes["nas2"].requests
    assert cli_after(fleet, "--fleet", str(fleet.path), "--json", command) == 0
    before = out_json(capsys)
    assert type(after) is type(before)
    if isinstance(after, list):
        assert [a["agent"] for a in after] == [a["agent"] for a in before] == ["nas1", "nas2"]


def test_agent_label_store_and_verbose_after_the_command(
    make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fleet = make_fleet("nas1", "nas2", "nas3")
    fleet.data["agents"][1]["labels"] = {"site": "attic"}
    fleet.data["agents"][2]["labels"] = {"site": "attic"}
    fleet.write()
    store = tmp_path / "after" / "ctl.db"
    code = cli_after(
        fleet, "run", "--dry-run", "--fleet", str(fleet.path), "--store", str(store),
        "--label", "site=attic", "--agent", "nas2", "-v", "--json",
    )  # fmt: skip
    assert code == 0
    assert [a["agent"] for a in out_json(capsys)["agents"]] == ["nas2"]
    assert store.exists() and not (fleet.path.parent / "controller.db").exists()
    assert not fleet.fakes["nas1"].requests and not fleet.fakes["nas3"].requests
    # before and after add up: --agent nas1 before the command, --agent nas3 after
    assert cli_after(
        fleet, "--fleet", str(fleet.path), "--agent", "nas1", "findings", "--agent", "nas3",
        "--json",
    ) == 0  # fmt: skip
    assert [a["agent"] for a in out_json(capsys)] == ["nas1", "nas3"]


def test_the_fleet_after_the_command_wins(
    make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fleet = make_fleet("nas1")
    missing = tmp_path / "missing.yaml"
    assert cli_after(fleet, "--fleet", str(missing), "agents", "--fleet", str(fleet.path)) == 0
    assert cli_after(fleet, "--fleet", str(fleet.path), "agents", "--fleet", str(missing)) == 2
    assert "cannot read fleet file" in capsys.readouterr().err


def test_report_takes_the_store_after_the_command(
    make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = make_fleet("nas1")
    assert fleet.cli("run") == 0
    capsys.readouterr()
    store = str(fleet.path.parent / "controller.db")
    assert main(["report", "--store", store, "--json"], environ={}) == 0
    assert [r["agent"] for r in out_json(capsys)["rows"]] == ["nas1"]


def test_help_of_a_command_lists_the_global_options(
    make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--help"], environ={}) == 0
    out = capsys.readouterr().out
    for option in ("--fleet", "--store", "--agent", "--label", "--json", "--verbose"):
        assert option in out
    assert "also before the command" in out
