"""``janitor-agent scan`` and ``clean`` over the stateful fakes, through click: the API's
findings, plans, jobs and audit log on the same state directory, the local actor, exit
codes, and the state directory's lease between a running agent and a local clean."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from rich.console import Console

from agent.cli import cli
from agent.config import load_config
from agent.local import CleanOptions, LocalEnv, local_actor
from agent.local import clean as local_clean
from agent.runtime import Backends
from tests.agent.http.apphelpers import AgentUnderTest, auth, build
from tests.fakes import LeakScenario, make_leak_scenario

ACTOR = local_actor()


@pytest.fixture
def sc() -> LeakScenario:
    return make_leak_scenario()


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(
        yaml.safe_dump({"listen": "127.0.0.1:8443", "state_dir": str(tmp_path / "state")})
    )
    return path


def env_for(sc: LeakScenario) -> LocalEnv:
    return LocalEnv(
        backends=Backends(btrfs=sc.btrfs, docker=sc.docker),
        clock=lambda: sc.now,
        poll_seconds=0.01,
    )


def run(sc: LeakScenario, *args: str) -> Result:
    return CliRunner().invoke(cli, list(args), obj=env_for(sc), catch_exceptions=False)


def api(tmp_path: Path, sc: LeakScenario) -> AgentUnderTest:
    """The HTTP agent on the same state directory and the same fake NAS."""
    return build(tmp_path / "state", sc)


def audit(agent: AgentUnderTest) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = agent.get("/v1/audit?limit=5000").get_json()["items"]
    return items


def never_touched(sc: LeakScenario) -> list[str]:
    """What must stay, and is missing."""
    paths = [sc.share, *sc.layers, f"{sc.data_root}"]
    missing = [p for p in paths if not sc.btrfs.exists(p)]
    for name in (sc.keep_volume, sc.named_volume, sc.in_use_volume, sc.stopped_anonymous_volume):
        if sc.docker.volume(name) is None:
            missing.append(f"volume {name}")
    return missing


def leak_left(sc: LeakScenario) -> list[str]:
    left = [p for p in (*sc.dind_nested, sc.orphan_layer) if sc.btrfs.exists(p)]
    if sc.docker.volume(sc.dind_volume) is not None:
        left.append(f"volume {sc.dind_volume}")
    return left


# --------------------------------------------------------------------------- scan


def test_scan_shows_the_findings_in_a_table_and_exits_3(sc: LeakScenario, cfg: Path) -> None:
    r = run(sc, "scan", "--config", str(cfg))
    assert r.exit_code == 3, r.output
    assert "KIND" in r.stdout and "dind-volume" in r.stdout and "orphan-layer" in r.stdout
    assert sc.dind_volume in r.stdout and sc.orphan_layer in r.stdout
    assert "2 finding(s); 2 cleanable by default" in r.stdout


def test_scan_json_is_the_apis_findings(sc: LeakScenario, cfg: Path, tmp_path: Path) -> None:
    r = run(sc, "scan", "--config", str(cfg), "--json", "--min-age", "0")
    assert r.exit_code == 3, r.output
    local = json.loads(r.stdout)["items"]
    served = api(tmp_path, sc).get("/v1/findings?min_age_seconds=0").get_json()["items"]
    assert local == served and len(local) == 2
    only = run(sc, "scan", "--config", str(cfg), "--json", "--kind", "orphan-layer")
    assert [f["kind"] for f in json.loads(only.stdout)["items"]] == ["orphan-layer"]


def test_scan_with_nothing_left_exits_0(sc: LeakScenario, cfg: Path) -> None:
    assert run(sc, "clean", "--config", str(cfg), "--yes").exit_code == 0
    r = run(sc, "scan", "--config", str(cfg))
    assert r.exit_code == 0, r.output
    assert "nothing found" in r.stdout


def test_scan_with_docker_away_exits_1(sc: LeakScenario, cfg: Path) -> None:
    sc.docker.down = True
    r = run(sc, "scan", "--config", str(cfg))
    assert r.exit_code == 1
    assert "docker_unavailable" in r.output


# --------------------------------------------------------------------------- clean


def test_clean_is_a_dry_run_without_yes(sc: LeakScenario, cfg: Path, tmp_path: Path) -> None:
    r = run(sc, "clean", "--config", str(cfg))
    assert r.exit_code == 3, r.output
    assert "dry run" in r.stdout and "run again with --yes" in r.stdout
    plan_bytes = 8 * 1024 * 1024  # the inner image layer alone: more goes with the rest
    assert "would delete" in r.stdout and "subvolume(s) and 1 volume(s)" in r.stdout
    total = int(r.stdout.rsplit("(", 1)[1].split(")", 1)[0])
    assert total > plan_bytes
    assert leak_left(sc) == [*sc.dind_nested, sc.orphan_layer, f"volume {sc.dind_volume}"]
    entries = audit(api(tmp_path, sc))
    assert [(e["actor"], e["action"], e["outcome"]) for e in entries] == [
        (ACTOR, "plan.create", "created")
    ]


def test_clean_yes_deletes_through_a_job_audited_as_local(
    sc: LeakScenario, cfg: Path, tmp_path: Path
) -> None:
    r = run(sc, "clean", "--config", str(cfg), "--yes")
    assert r.exit_code == 0, r.output
    assert leak_left(sc) == []
    assert never_touched(sc) == []
    assert "[1/2] deleted" in r.stdout and "[2/2] deleted" in r.stdout
    assert "succeeded: 2 deleted" in r.stdout
    job_id = next(
        x.split()[1] for x in r.stdout.splitlines() if x.startswith("job ") and "succeeded" in x
    )
    # the API on the same state directory: the same job, one audit chain
    agent = api(tmp_path, sc)
    job = agent.get(f"/v1/jobs/{job_id}").get_json()
    assert job["state"] == "succeeded" and job["progress"] == {"done": 2, "total": 2}
    entries = audit(agent)
    assert {e["actor"] for e in entries} == {ACTOR}
    assert ACTOR.startswith("local:")
    actions = [e["action"] for e in entries]
    assert actions[0] == "plan.create" and actions[1] == "plan.apply"
    assert actions[-1] == "job.finish" and entries[-1]["outcome"] == "succeeded"
    assert agent.get("/v1/audit/verify").get_json()["ok"] is True
    assert f"by {ACTOR}" in r.stdout
    # the API's next entries go on the same chain
    agent.client.post("/v1/plans", json={}, headers=auth())
    verify = agent.get("/v1/audit/verify").get_json()
    assert verify["ok"] is True and verify["count"] == len(entries) + 1
    # nothing left: nothing to do
    again = run(sc, "clean", "--config", str(cfg), "--yes")
    assert again.exit_code == 0 and "nothing to clean" in again.stdout


def test_kind_and_min_age_make_the_policy(sc: LeakScenario, cfg: Path) -> None:
    r = run(sc, "clean", "--config", str(cfg), "--yes", "--kind", "orphan-layer")
    assert r.exit_code == 0, r.output
    assert leak_left(sc) == [*sc.dind_nested, f"volume {sc.dind_volume}"]
    # everything is 3 days old: a 10-day minimum blocks it, found but not cleaned
    blocked = run(sc, "clean", "--config", str(cfg), "--yes", "--min-age", str(10 * 86400))
    assert blocked.exit_code == 3, blocked.output
    assert "not planned" in blocked.stdout and "too_young" in blocked.stdout
    assert sc.dind_volume in blocked.stdout
    assert leak_left(sc) == [*sc.dind_nested, f"volume {sc.dind_volume}"]


def test_a_named_dind_volume_needs_include_named(sc: LeakScenario, cfg: Path) -> None:
    vol = sc.docker.add_volume("ci-cache")
    sc.btrfs.create_subvolume(f"{vol.mountpoint}/btrfs/subvolumes/{'c' * 64}")
    sc.btrfs.now = sc.docker.now = sc.now  # written now: give it the minimum age of 0
    r = run(sc, "clean", "--config", str(cfg), "--yes", "--min-age", "0")
    assert r.exit_code == 3, r.output  # the leak went, the named one was held back
    assert "named" in r.stdout and sc.docker.volume("ci-cache") is not None
    r = run(sc, "clean", "--config", str(cfg), "--yes", "--min-age", "0", "--include-named")
    assert r.exit_code == 0, r.output
    assert sc.docker.volume("ci-cache") is None


def test_a_failed_action_exits_1(sc: LeakScenario, cfg: Path) -> None:
    sc.btrfs.refuse_delete(sc.orphan_layer, "Operation not permitted")
    r = run(sc, "clean", "--config", str(cfg), "--yes")
    assert r.exit_code == 1, r.output
    assert "failed" in r.stdout and "Operation not permitted" in r.stdout
    assert "partial" in r.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["clean", "--kind", "no-such-kind"],
        ["clean", "--min-age", "-1"],
        ["scan", "--min-age", "x"],
        ["clean", "--wait", "-5"],
    ],
)
def test_bad_usage_exits_2(sc: LeakScenario, cfg: Path, args: list[str]) -> None:
    r = run(sc, *args, "--config", str(cfg))
    assert r.exit_code == 2, r.output
    assert leak_left(sc) != []


def test_a_bad_config_exits_2(sc: LeakScenario, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: nowhere\nstate_dir: relative\n")
    for command in ("scan", "clean"):
        r = run(sc, command, "--config", str(bad))
        assert r.exit_code == 2
        assert "state_dir: must be an absolute path" in r.output


def test_a_broken_audit_log_refuses_the_clean(sc: LeakScenario, cfg: Path, tmp_path: Path) -> None:
    assert run(sc, "clean", "--config", str(cfg)).exit_code == 3  # a first entry, a mark
    (tmp_path / "state" / "audit.db").unlink()  # the log replaced by a fresh one
    for name in ("audit.db-wal", "audit.db-shm"):
        (tmp_path / "state" / name).unlink(missing_ok=True)
    r = run(sc, "clean", "--config", str(cfg), "--yes")
    assert r.exit_code == 1
    assert "audit_unavailable" in r.output and "audit accept" in r.output
    assert len(leak_left(sc)) > 0


# --------------------------------------------------------------------------- the lease


def gate_deletes(sc: LeakScenario) -> tuple[threading.Event, threading.Event, Callable[[], None]]:
    """btrfs deletes wait for ``gate`` (``entered`` is set when one is waiting)."""
    gate, entered = threading.Event(), threading.Event()
    real = sc.btrfs.delete

    def slow(paths: Any) -> Any:
        entered.set()
        assert gate.wait(30)
        return real(paths)

    sc.btrfs.delete = slow  # type: ignore[method-assign]

    def undo() -> None:
        gate.set()
        del sc.btrfs.delete

    return gate, entered, undo


@pytest.fixture
def gated(sc: LeakScenario) -> Iterator[tuple[threading.Event, threading.Event]]:
    gate, entered, undo = gate_deletes(sc)
    yield gate, entered
    undo()


def wait_state(agent: AgentUnderTest, job_id: str, *states: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        job: dict[str, Any] = agent.get(f"/v1/jobs/{job_id}").get_json()
        if job["state"] in states or time.monotonic() > deadline:
            return job
        time.sleep(0.01)


def test_a_local_clean_waits_for_the_agents_job_and_never_runs_beside_it(
    sc: LeakScenario,
    cfg: Path,
    tmp_path: Path,
    gated: tuple[threading.Event, threading.Event],
) -> None:
    gate, entered = gated
    agent = api(tmp_path, sc)
    plan = agent.client.post("/v1/plans", json={"kinds": ["dind-volume"]}, headers=auth())
    job_id = agent.client.post(
        f"/v1/plans/{plan.get_json()['id']}/apply", headers=auth()
    ).get_json()["job_id"]
    assert entered.wait(10)  # the agent's job is deleting

    deletes_before = len(sc.btrfs.calls_to("delete"))
    busy = run(sc, "clean", "--config", str(cfg), "--yes", "--wait", "0")
    assert busy.exit_code == 1, busy.output
    assert "busy" in busy.output and "janitor-agent serve" in busy.output
    # a scan and a refused clean built the runtime on the same state directory: the
    # agent's running job was not taken for one a crash cut short
    assert run(sc, "scan", "--config", str(cfg)).exit_code == 3
    assert agent.get(f"/v1/jobs/{job_id}").get_json()["state"] == "running"
    assert not any(e["action"] == "job.interrupted" for e in audit(agent))
    assert len(sc.btrfs.calls_to("delete")) == deletes_before  # the local one deleted nothing

    # with --wait, it goes once the agent's job is done
    result: list[Result] = []
    waiter = threading.Thread(
        target=lambda: result.append(
            run(sc, "clean", "--config", str(cfg), "--yes", "--wait", "20")
        )
    )
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive()
    gate.set()
    waiter.join(30)
    assert agent.get(f"/v1/jobs/{job_id}").get_json()["state"] == "succeeded"
    (done,) = result
    assert done.exit_code == 0, done.output
    assert "waiting up to 20 s" in done.output
    assert leak_left(sc) == []
    entries = audit(agent)
    finishes = [e for e in entries if e["action"] == "job.finish"]
    assert [e["actor"] for e in finishes] == ["ops", ACTOR]
    assert agent.get("/v1/audit/verify").get_json()["ok"] is True


def test_the_agent_refuses_to_mutate_while_a_local_clean_runs(
    sc: LeakScenario,
    cfg: Path,
    tmp_path: Path,
    gated: tuple[threading.Event, threading.Event],
) -> None:
    gate, entered = gated
    config = load_config(cfg, env={})
    out, err = io.StringIO(), io.StringIO()
    codes: list[int] = []
    local = threading.Thread(
        target=lambda: codes.append(
            local_clean(
                config,
                env_for(sc),
                CleanOptions(yes=True),
                Console(file=out, width=200),
                Console(file=err, width=200),
            )
        )
    )
    local.start()
    try:
        assert entered.wait(10)  # the local clean is deleting
        agent = api(tmp_path, sc)  # an agent starting meanwhile: no recovery of that job
        jobs = agent.runtime.state
        running = [j for j in (jobs.get_job_for_plan(p) for p in _plan_ids(agent)) if j]
        assert [j.state for j in running] == ["running"]
        plan = agent.client.post("/v1/plans", json={}, headers=auth())
        assert plan.status_code == 201  # planning changes nothing on the NAS
        r = agent.client.post(f"/v1/plans/{plan.get_json()['id']}/apply", headers=auth())
        assert r.status_code == 409, r.get_json()
        body = r.get_json()
        assert body["code"] == "busy" and f"janitor-agent clean by {ACTOR}" in body["detail"]
        assert r.headers["Content-Type"] == "application/problem+json"
        url = f"/v1/volumes/{sc.dind_volume}"
        assert agent.client.delete(f"{url}?dry_run=false", headers=auth()).status_code == 409
        assert agent.client.delete(f"{url}?dry_run=true", headers=auth()).status_code == 200
        sub = agent.get("/v1/findings?kind=orphan-layer").get_json()["items"][0]
        d = agent.client.delete(
            f"/v1/filesystems/{sc.fs_uuid}/subvolumes/{sub['target']['id']}?dry_run=false",
            headers=auth(),
        )
        assert d.status_code == 409 and d.get_json()["code"] == "busy"
    finally:
        gate.set()
        local.join(30)
    assert codes == [0], out.getvalue() + err.getvalue()
    assert leak_left(sc) == []
    # free again: the agent mutates (nothing left to do, but the apply is taken)
    plan = agent.client.post("/v1/plans", json={}, headers=auth()).get_json()
    assert agent.client.post(f"/v1/plans/{plan['id']}/apply", headers=auth()).status_code == 202


def _plan_ids(agent: AgentUnderTest) -> list[str]:
    ids = []
    for e in audit(agent):
        if e["action"] == "plan.create":
            ids.append(e["target"].removeprefix("plan "))
    return ids


def test_a_crashed_local_clean_is_recovered_by_the_next_process(
    sc: LeakScenario, cfg: Path, tmp_path: Path
) -> None:
    """A clean cut short (its job left ``running``, as a killed process leaves it) reads
    interrupted once a process takes the lease from free, and applying resumes it."""
    r = run(sc, "clean", "--config", str(cfg))  # a plan
    plan_id = r.stdout.split()[1]
    agent = api(tmp_path, sc)
    state = agent.runtime.state
    state.create_job_for_plan(
        job_id="c" * 32, plan_id=plan_id, idempotency_key=None, body={"total": 2}, state="running"
    )
    assert run(sc, "scan", "--config", str(cfg)).exit_code == 3  # takes it from free
    assert agent.get(f"/v1/jobs/{'c' * 32}").get_json()["state"] == "interrupted"
    assert any(e["action"] == "job.interrupted" for e in audit(agent))
    assert agent.client.post(f"/v1/plans/{plan_id}/apply", headers=auth()).status_code == 202
    assert wait_state(agent, "c" * 32, "succeeded")["state"] == "succeeded"
    assert leak_left(sc) == []
