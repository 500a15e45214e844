"""Plans, jobs and direct deletes over the stateful fakes, through the real app: what the
clean side promises when the world moves under it, and when steps fail part way."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.errors import ToolFailed
from tests.agent.http.apphelpers import AgentUnderTest, auth, build
from tests.fakes import KiB, LeakScenario, MiB, make_leak_scenario


@pytest.fixture
def agent(tmp_path: Path) -> AgentUnderTest:
    return build(tmp_path / "state")


def plan(agent: AgentUnderTest, **policy: Any) -> dict[str, Any]:
    r = agent.client.post("/v1/plans", json={"min_age_seconds": 0, **policy}, headers=auth())
    assert r.status_code == 201, r.get_json()
    body: dict[str, Any] = r.get_json()
    return body


def run(agent: AgentUnderTest, plan_id: str) -> dict[str, Any]:
    r = agent.client.post(f"/v1/plans/{plan_id}/apply", headers=auth())
    assert r.status_code == 202, r.get_json()
    return agent.wait_job(r.get_json()["job_id"])


def audit(agent: AgentUnderTest) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = agent.get("/v1/audit?limit=5000").get_json()["items"]
    return items


def exists(sc: LeakScenario, paths: Any) -> list[str]:
    return [p for p in paths if sc.btrfs.exists(p)]


@contextlib.contextmanager
def back_in_time(sc: LeakScenario, ago: timedelta) -> Iterator[None]:
    """What the fakes make meanwhile is made ``ago`` before the scenario's now."""
    sc.btrfs.now = sc.docker.now = sc.now - ago
    try:
        yield
    finally:
        sc.btrfs.now = sc.docker.now = sc.now


def findings(agent: AgentUnderTest, kind: str) -> list[dict[str, Any]]:
    items = agent.get(f"/v1/findings?min_age_seconds=0&kind={kind}").json["items"]
    return list(items)


# --------------------------------------------------------------------------- other namespaces


def test_a_mount_made_in_another_namespace_after_the_plan_stops_the_action(
    agent: AgentUnderTest,
) -> None:
    """A process with a mount namespace of its own mounts a tmpfs inside the planned
    volume: removing the folder it sits on would detach it there (its files lost)."""
    sc = agent.sc
    p = plan(agent, kinds=["dind-volume"])
    assert len(p["actions"]) == 1
    at = f"{sc.data_root}/volumes/{sc.dind_volume}/_data/private"
    sc.btrfs.make_dirs(at)
    sc.btrfs.add_private_mount(at, pid=4242)
    job = run(agent, p["id"])
    (result,) = job["results"]
    assert result["outcome"] == "skipped" and result["detail"].startswith("in_use:"), result
    assert "pid 4242" in result["detail"]
    assert sc.btrfs.detached == [] and sc.docker.volume(sc.dind_volume) is not None


def test_mount_tables_lost_after_the_plan_fail_the_action_audited(agent: AgentUnderTest) -> None:
    """The host's mount table unreadable at apply time: nothing can be checked, so the
    action fails with the problem's code (not an internal error), is audited as such,
    and nothing is deleted."""
    sc = agent.sc
    p = plan(agent, kinds=["dind-volume"])
    assert len(p["actions"]) == 1
    sc.btrfs.host_mounts_error = "the agent runs in a pid namespace of its own"
    job = run(agent, p["id"])
    (result,) = job["results"]
    assert result["outcome"] == "failed", result
    assert result["detail"].startswith("host_mounts_unavailable: "), result
    assert job["state"] == "failed"
    failed = [e for e in audit(agent) if e["action"] == "remove_volume"]
    assert [e["outcome"] for e in failed] == ["failed"], failed
    assert failed[0]["detail"]["code"] == "host_mounts_unavailable"
    assert sc.docker.volume(sc.dind_volume) is not None
    assert exists(sc, sc.dind_nested) == list(sc.dind_nested)


def test_a_planned_orphan_renamed_elsewhere_is_left_alone(tmp_path: Path) -> None:
    """Renamed into someone's folder next to it after the plan, the orphan keeps its id
    and its generation: the action must not follow it there."""
    sc = make_leak_scenario(age=timedelta(hours=2))
    agent = build(tmp_path / "state", sc)
    p = plan(agent, kinds=["orphan-layer"])
    assert len(p["actions"]) == 1
    before = sc.btrfs.subvolume(sc.orphan_layer)
    assert before is not None
    ident = (before.id, before.generation)
    kept = f"{sc.data_root}/btrfs/kept"
    sc.btrfs.make_dirs(kept)
    sc.btrfs.rename(sc.orphan_layer, f"{kept}/moved")
    after = sc.btrfs.subvolume(f"{kept}/moved")
    assert after is not None and (after.id, after.generation) == ident
    job = run(agent, p["id"])
    (result,) = job["results"]
    assert result["outcome"] == "skipped" and result["detail"].startswith("changed:"), result
    assert "moved" in result["detail"]
    assert sc.btrfs.exists(f"{kept}/moved")


# --------------------------------------------------------------------------- honest failures


def test_a_volume_whose_docker_rm_fails_lists_what_went(agent: AgentUnderTest) -> None:
    sc = agent.sc
    p = plan(agent)
    real = sc.docker.remove_volume

    def refuse(name: str) -> None:
        raise ToolFailed(f"docker remove volume {name}: driver said no")

    sc.docker.remove_volume = refuse  # type: ignore[method-assign]
    job = run(agent, p["id"])
    sc.docker.remove_volume = real  # type: ignore[method-assign]
    by_op = {a["op"]: a["seq"] for a in p["actions"]}
    results = {r["seq"]: r for r in job["results"]}
    vol = results[by_op["remove_volume"]]
    assert vol["outcome"] == "failed" and "driver said no" in vol["detail"]
    # what it destroyed before failing is told: result, bytes, audit
    assert {d["path"] for d in vol["deleted"]} == set(sc.dind_nested)
    assert vol["reclaimed_bytes"] and vol["reclaimed_bytes"] > 0
    # the other action still ran
    assert results[by_op["delete_subvolumes"]]["outcome"] == "deleted"
    assert job["state"] == "partial"
    assert job["reclaimed_bytes"] >= vol["reclaimed_bytes"]
    entry = next(
        e for e in audit(agent) if e["action"] == "remove_volume" and e["outcome"] == "failed"
    )
    assert {d["path"] for d in entry["detail"]["deleted"]} == set(sc.dind_nested)
    finish = [e for e in audit(agent) if e["action"] == "job.finish"]
    assert finish and finish[-1]["outcome"] == "partial"


def test_one_failing_action_does_not_stop_the_others(agent: AgentUnderTest) -> None:
    sc = agent.sc
    other = f"{sc.data_root}/btrfs/subvolumes/{'e' * 64}"
    sc.btrfs.create_subvolume(other, created_at=sc.now - timedelta(days=3))
    p = plan(agent, kinds=["orphan-layer"])
    assert len(p["actions"]) == 2
    sc.btrfs.refuse_delete(sc.orphan_layer, "Operation not permitted")
    job = run(agent, p["id"])
    outcomes = sorted(r["outcome"] for r in job["results"])
    assert outcomes == ["deleted", "failed"]
    assert sc.btrfs.subvolume(other) is None and sc.btrfs.exists(sc.orphan_layer)
    assert job["state"] == "partial"


def test_a_job_with_nothing_done_says_so(agent: AgentUnderTest) -> None:
    sc = agent.sc
    p = plan(agent, kinds=["orphan-layer"])
    sc.btrfs.destroy(sc.orphan_layer)  # gone before the job runs
    job = run(agent, p["id"])
    assert [r["outcome"] for r in job["results"]] == ["skipped"]
    assert job["state"] == "skipped"
    empty = plan(agent, kinds=["orphan-layer"])
    assert empty["actions"] == []
    assert run(agent, empty["id"])["state"] == "skipped"


# --------------------------------------------------------------------------- the world moves


def test_a_write_between_plan_and_apply_is_seen_even_before_btrfs_commits(
    agent: AgentUnderTest,
) -> None:
    sc = agent.sc
    p = plan(agent, kinds=["dind-volume"])
    # written now; btrfs moves the generation only when it commits
    sc.btrfs.touch(sc.dind_ro_leaf, add_bytes=4 * KiB, committed=False)
    job = run(agent, p["id"])
    (result,) = job["results"]
    assert result["outcome"] == "skipped" and result["detail"].startswith("changed:")
    assert exists(sc, sc.dind_nested) == list(sc.dind_nested)


def test_a_mount_made_after_the_plan_stops_the_action(agent: AgentUnderTest) -> None:
    sc = agent.sc
    p = plan(agent, kinds=["dind-volume"])
    sc.btrfs.add_mount(f"{sc.dind_mountpoint}/scratch", host_only=True)
    sc.btrfs.make_dirs(f"{sc.dind_mountpoint}/scratch")
    job = run(agent, p["id"])
    (result,) = job["results"]
    assert result["outcome"] == "skipped" and result["detail"].startswith("in_use:")
    assert exists(sc, sc.dind_nested) == list(sc.dind_nested)
    assert sc.btrfs.emptied_mounts == []


def test_a_mount_made_during_the_delete_is_never_crossed(agent: AgentUnderTest) -> None:
    """Between destroying the subvolumes and emptying the volume, a tmpfs appears inside
    it: the volume's files and Docker's RemoveAll stop there."""
    sc = agent.sc
    p = plan(agent, kinds=["dind-volume"])
    real = sc.btrfs.delete

    def delete_then_mount(paths: Any) -> Any:
        out = real(paths)
        sc.btrfs.add_mount(f"{sc.dind_mountpoint}/late", host_only=True)
        return out

    sc.btrfs.delete = delete_then_mount  # type: ignore[method-assign]
    removes = sc.docker.calls.count("remove_volume")
    job = run(agent, p["id"])
    (result,) = job["results"]
    assert result["outcome"] == "failed" and "late" in result["detail"]
    assert {d["path"] for d in result["deleted"]} == set(sc.dind_nested)
    assert sc.docker.calls.count("remove_volume") == removes  # Docker never asked
    assert sc.btrfs.emptied_mounts == []
    assert sc.docker.volume(sc.dind_volume) is not None


def test_a_volumes_plain_files_are_removed_before_docker_rm(agent: AgentUnderTest) -> None:
    sc = agent.sc
    sc.btrfs.write_file(f"{sc.dind_mountpoint}/containers/abc/config.v2.json")
    sc.btrfs.write_file(f"{sc.dind_mountpoint}/network/files/local-kv.db")
    job = run(agent, plan(agent, kinds=["dind-volume"])["id"])
    assert job["state"] == "succeeded"
    assert sc.docker.volume(sc.dind_volume) is None
    assert not sc.btrfs.exists(f"{sc.dind_mountpoint}/containers")


# --------------------------------------------------------------------------- orphans in flight


def test_an_orphan_changed_after_the_plan_is_left_alone(tmp_path: Path) -> None:
    sc = make_leak_scenario(age=timedelta(hours=2))
    agent = build(tmp_path / "state", sc)
    p = plan(agent, kinds=["orphan-layer"])
    assert len(p["actions"]) == 1
    sc.btrfs.touch(sc.orphan_layer, new_name=True)  # Docker extracting into it
    job = run(agent, p["id"])
    (result,) = job["results"]
    assert result["outcome"] == "skipped"
    assert result["detail"].startswith(("too_young:", "changed:"))
    assert sc.btrfs.exists(sc.orphan_layer)


def test_a_young_orphan_is_never_deleted_whatever_the_request(tmp_path: Path) -> None:
    agent = build(tmp_path / "state", make_leak_scenario(age=timedelta(minutes=10)))
    p = plan(agent, kinds=["orphan-layer"], min_age_seconds=0)
    assert p["actions"] == []
    assert p["skipped"] and p["skipped"][0]["reason"].startswith("too_young:")
    # a direct delete is a request too: a layer Docker is writing looks just like this
    for dry_run in ("true", "false"):
        r = agent.client.delete(
            f"/v1/filesystems/{agent.sc.fs_uuid}/subvolumes/"
            f"{agent.sc.btrfs.subvolume(agent.sc.orphan_layer).id}?dry_run={dry_run}",  # type: ignore[union-attr]
            headers=auth(),
        )
        assert r.status_code == 409 and r.get_json()["code"] == "too_young", r.get_json()
    assert agent.sc.btrfs.exists(agent.sc.orphan_layer)


# --------------------------------------------------------------------------- named volumes


def _named_dind(sc: LeakScenario, *, written: timedelta | None = None) -> str:
    with back_in_time(sc, timedelta(days=30)):
        vol = sc.docker.add_volume("ci-dind-cache")
        sc.btrfs.create_subvolume(
            f"{vol.mountpoint}/btrfs/subvolumes/{'c' * 64}", exclusive_bytes=8 * MiB
        )
    if written is not None:
        with back_in_time(sc, written):
            sc.btrfs.write_file(f"{vol.mountpoint}/containers/x/config.v2.json")
    return vol.name


def test_a_named_volume_is_found_but_not_planned_unless_asked(tmp_path: Path) -> None:
    sc = make_leak_scenario()
    name = _named_dind(sc)
    agent = build(tmp_path / "state", sc)
    found = {f["target"]["name"]: f for f in findings(agent, "dind-volume")}
    assert found[name]["kind"] == "dind-volume" and found[name]["named"] is True
    assert not found[name]["blocked_by"]
    p = plan(agent, kinds=["dind-volume"])
    assert [a["target"]["name"] for a in p["actions"]] == [sc.dind_volume]
    assert any(s["reason"].startswith("named:") for s in p["skipped"])
    opted = plan(agent, kinds=["dind-volume"], include_named_volumes=True)
    assert {a["target"]["name"] for a in opted["actions"]} == {sc.dind_volume, name}
    chosen = plan(agent, finding_ids=[found[name]["id"]], kinds=["dind-volume"])
    assert [a["target"]["name"] for a in chosen["actions"]] == [name]


def test_a_volume_is_aged_from_its_last_write(tmp_path: Path) -> None:
    sc = make_leak_scenario()
    name = _named_dind(sc, written=timedelta(hours=2))
    agent = build(tmp_path / "state", sc)
    found = {f["target"]["name"]: f for f in agent.get("/v1/findings").json["items"]}
    mine = found[name]
    assert mine["age_seconds"] == 2 * 3600
    assert any(b.startswith("too_young:") for b in mine["blocked_by"])
    assert any("last written" in e for e in mine["evidence"])
    p = plan(agent, kinds=["dind-volume"], include_named_volumes=True, min_age_seconds=86400)
    assert name not in [a["target"]["name"] for a in p["actions"]]


# --------------------------------------------------------------------------- layer folders


def test_an_unreferenced_layer_folder_is_found_and_removed(agent: AgentUnderTest) -> None:
    sc = agent.sc
    loose = f"{sc.data_root}/btrfs/subvolumes/{'f' * 64}"
    with back_in_time(sc, timedelta(days=2)):
        sc.btrfs.write_file(f"{loose}/etc/passwd")
    found = findings(agent, "orphan-layer-folder")
    assert [f["target"]["path"] for f in found] == [loose]
    p = plan(agent, kinds=["orphan-layer-folder"])
    assert [a["op"] for a in p["actions"]] == ["remove_folder"]
    job = run(agent, p["id"])
    assert job["state"] == "succeeded", job
    assert not sc.btrfs.exists(loose)


def test_a_referenced_layer_folder_is_reported_and_never_touched(agent: AgentUnderTest) -> None:
    sc = agent.sc
    image = sc.docker.images[next(iter(sc.docker.images))]
    name = image.cache_ids[0]
    layer = f"{sc.data_root}/btrfs/subvolumes/{name}"
    sc.btrfs.destroy(layer)  # as a copy of the data root leaves it: a plain folder
    with back_in_time(sc, timedelta(days=2)):
        sc.btrfs.write_file(f"{layer}/bin/sh")  # a plain folder where Docker wants a subvolume
    found = findings(agent, "layer-folder")
    assert [f["target"]["path"] for f in found] == [layer]
    assert found[0]["blocked_by"] and found[0]["blocked_by"][0].startswith("protected:")
    assert any("btrfs subvolume create" in e for e in found[0]["evidence"])
    p = plan(agent, kinds=["layer-folder"], finding_ids=[found[0]["id"]])
    assert p["actions"] == []
    assert sc.btrfs.exists(f"{layer}/bin")


def test_a_mount_made_right_before_docker_rm_is_never_crossed(agent: AgentUnderTest) -> None:
    sc = agent.sc
    p = plan(agent, kinds=["dind-volume"])
    real = sc.btrfs.remove_tree

    def empty_then_mount(path: str, *, keep_top: bool = False) -> Any:
        out = real(path, keep_top=keep_top)
        sc.btrfs.add_mount(f"{sc.dind_mountpoint}/late", host_only=True)
        return out

    sc.btrfs.remove_tree = empty_then_mount  # type: ignore[method-assign]
    removes = sc.docker.calls.count("remove_volume")
    (result,) = run(agent, p["id"])["results"]
    assert result["outcome"] == "failed" and "docker volume rm" in result["detail"]
    assert sc.docker.calls.count("remove_volume") == removes
    assert sc.btrfs.emptied_mounts == []


def test_a_container_mounting_into_the_volume_during_the_delete_keeps_its_files(
    agent: AgentUnderTest,
) -> None:
    sc = agent.sc
    p = plan(agent, kinds=["dind-volume"])
    kept = f"{sc.dind_mountpoint}/shared/work.txt"
    sc.btrfs.write_file(kept)
    real = sc.btrfs.delete

    def delete_then_bind(paths: Any) -> Any:
        out = real(paths)
        sc.docker.add_container("late-user", binds=[(f"{sc.dind_mountpoint}/shared", "/w")])
        return out

    sc.btrfs.delete = delete_then_bind  # type: ignore[method-assign]
    (result,) = run(agent, p["id"])["results"]
    assert result["outcome"] == "failed" and "late-user" in result["detail"]
    assert {d["path"] for d in result["deleted"]} == set(sc.dind_nested)
    assert kept in {f"/volume1/{f}" for f in sc.btrfs.filesystem_at(kept).files}


def test_an_error_after_something_was_deleted_keeps_the_record(agent: AgentUnderTest) -> None:
    from agent.errors import BtrfsUnavailable

    sc = agent.sc
    p = plan(agent, kinds=["dind-volume"])

    def broken(path: str, *, keep_top: bool = False) -> Any:
        raise BtrfsUnavailable("the disk went away")

    sc.btrfs.remove_tree = broken  # type: ignore[method-assign]
    job = run(agent, p["id"])
    (result,) = job["results"]
    assert result["outcome"] == "failed" and "the disk went away" in result["detail"]
    assert {d["path"] for d in result["deleted"]} == set(sc.dind_nested)
    assert job["state"] == "partial"


def test_an_orphan_changed_within_the_floor_is_skipped_at_apply(tmp_path: Path) -> None:
    """The generation check sees a write; the age check at apply stands behind it for a
    name made without one (here: only the change time moves)."""
    sc = make_leak_scenario(age=timedelta(hours=2))
    agent = build(tmp_path / "state", sc)
    p = plan(agent, kinds=["orphan-layer"])
    sub = sc.btrfs.subvolume(sc.orphan_layer)
    assert sub is not None
    sub.changed_at = sc.now - timedelta(minutes=1)
    (result,) = run(agent, p["id"])["results"]
    assert result["outcome"] == "skipped" and result["detail"].startswith("too_young:")
    assert sc.btrfs.exists(sc.orphan_layer)


# --------------------------------------------------------------------------- deleted, not freed


def pending_metric(agent: AgentUnderTest, fs_uuid: str) -> float | None:
    text = agent.get("/metrics").get_data(as_text=True)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "nas_janitor_pending_bytes" and sample.labels == {
                "filesystem": fs_uuid
            }:
                return float(sample.value)
    return None


def test_a_job_says_what_is_deleted_but_not_freed_yet(agent: AgentUnderTest) -> None:
    sc = agent.sc
    sc.btrfs.lazy_free = True  # the kernel's cleaner gives the space back later
    job = run(agent, plan(agent, kinds=["dind-volume"])["id"])
    assert job["state"] == "succeeded"
    assert job["reclaimed_bytes"] > 0
    assert job["pending_bytes"] == job["reclaimed_bytes"]  # nothing freed yet
    assert pending_metric(agent, sc.fs_uuid) == job["pending_bytes"]
    sc.btrfs.sync(sc.mount)  # the cleaner is done
    assert agent.get(f"/v1/jobs/{job['id']}").get_json()["pending_bytes"] == 0
    assert pending_metric(agent, sc.fs_uuid) == 0  # freed: said once, then forgotten
    assert pending_metric(agent, sc.fs_uuid) is None


# --------------------------------------------------------------------------- held open


def test_a_process_holding_a_file_right_before_docker_rm_stops_it(agent: AgentUnderTest) -> None:
    """The guard right before ``docker volume rm`` reads what is held open again: a
    process that opened a file in the volume's folder meanwhile stops the step, and
    nothing it holds is removed under it."""
    sc = agent.sc
    p = plan(agent, kinds=["dind-volume"])
    real = sc.btrfs.remove_tree
    held = f"{sc.dind_mountpoint}/late.log"

    def empty_then_hold(path: str, *, keep_top: bool = False) -> Any:
        out = real(path, keep_top=keep_top)
        sc.btrfs.write_file(held)
        sc.btrfs.hold(held, "pid 4243 (tail), open file")
        return out

    sc.btrfs.remove_tree = empty_then_hold  # type: ignore[method-assign]
    removes = sc.docker.calls.count("remove_volume")
    (result,) = run(agent, p["id"])["results"]
    assert result["outcome"] == "failed" and "docker volume rm" in result["detail"]
    assert "held_by_process" in result["detail"] and "pid 4243" in result["detail"]
    assert sc.docker.calls.count("remove_volume") == removes
    assert sc.btrfs.lost_held == []


def test_what_is_held_unreadable_after_the_plan_fails_the_action_audited(
    agent: AgentUnderTest,
) -> None:
    sc = agent.sc
    p = plan(agent, kinds=["dind-volume"])
    assert len(p["actions"]) == 1
    sc.btrfs.holders_error = "cannot read what pid 1 holds (fd): Permission denied"
    job = run(agent, p["id"])
    (result,) = job["results"]
    assert result["outcome"] == "failed", result
    assert result["detail"].startswith("holders_unavailable: "), result
    failed = [e for e in audit(agent) if e["action"] == "remove_volume"]
    assert [e["outcome"] for e in failed] == ["failed"], failed
    assert failed[0]["detail"]["code"] == "holders_unavailable"
    assert exists(sc, sc.dind_nested) == list(sc.dind_nested)
    assert sc.btrfs.lost_held == []
