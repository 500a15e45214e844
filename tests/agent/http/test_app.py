"""The agent's HTTP API over stateful fakes of btrfs and Docker: read side, auth,
problems, deletes, plans, jobs, audit, restart."""

from __future__ import annotations

import logging
import re
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.http.app import scan_at_start
from tests.agent.http.apphelpers import BOTH, CLEAN, READ, AgentUnderTest, auth, build
from tests.fakes import DEFAULT_NOW, FakeBtrfs, FakeDocker, LeakScenario, make_leak_scenario


@pytest.fixture
def agent(tmp_path: Path) -> AgentUnderTest:
    return build(tmp_path / "state")


def subvolume_ids(a: AgentUnderTest) -> dict[int, str]:
    out: dict[int, str] = {}
    cursor = None
    while True:
        url = f"/v1/filesystems/{a.sc.fs_uuid}/subvolumes?limit=3"
        if cursor:
            url += f"&cursor={cursor}"
        body = a.get(url).get_json()
        out.update({i["id"]: i["path"] for i in body["items"]})
        cursor = body["next_cursor"]
        if cursor is None:
            return out


def is_problem(resp: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == "application/problem+json"
    body = resp.get_json()
    assert {"type", "title", "status", "detail", "code"} <= set(body)
    assert body["status"] == status
    assert "Traceback" not in resp.get_data(as_text=True)
    if code:
        assert body["code"] == code, body
    return dict(body)


# -- read side ---------------------------------------------------------------------------


def test_findings_are_exactly_the_seeded_leftovers(agent: AgentUnderTest) -> None:
    items = agent.get("/v1/findings").get_json()["items"]
    got = {(f["kind"], f["target"]["name"] or f["target"]["path"]) for f in items}
    assert got == {
        ("dind-volume", agent.sc.dind_volume),
        ("orphan-layer", agent.sc.orphan_layer.rsplit("/", 1)[1]),
    }
    for f in items:
        assert f["blocked_by"] == []
        assert f["age_seconds"] == 3 * 86400
        assert f["evidence"]
    dind = next(f for f in items if f["kind"] == "dind-volume")
    assert set(dind["subvolume_ids"]) == {
        agent.sc.btrfs.subvolume(p).id  # type: ignore[union-attr]
        for p in agent.sc.dind_nested
    }
    assert any("read-only" in e for e in dind["evidence"])
    # children before parents: the child of the read-only parent comes before it
    child = agent.sc.btrfs.subvolume(agent.sc.dind_ro_parent_child)
    parent = agent.sc.btrfs.subvolume(agent.sc.dind_ro_parent)
    assert child is not None and parent is not None
    assert dind["subvolume_ids"].index(child.id) < dind["subvolume_ids"].index(parent.id)
    assert dind["reclaimable_bytes"] is not None and dind["reclaimable_bytes"] > 0


def test_findings_ids_are_stable_and_kind_filter(agent: AgentUnderTest) -> None:
    a = agent.get("/v1/findings").get_json()["items"]
    b = agent.restart().get("/v1/findings").get_json()["items"]
    assert [f["id"] for f in a] == [f["id"] for f in b]
    only = agent.get("/v1/findings?kind=orphan-layer").get_json()["items"]
    assert [f["kind"] for f in only] == ["orphan-layer"]


def test_young_leftovers_are_blocked_as_too_young(tmp_path: Path) -> None:
    a = build(tmp_path, make_leak_scenario(age=timedelta(minutes=5)))
    items = a.get("/v1/findings").get_json()["items"]
    assert items and all(any("too_young" in b for b in f["blocked_by"]) for f in items)
    lower = a.get("/v1/findings?min_age_seconds=60").json["items"]
    assert all(not f["blocked_by"] for f in lower if f["kind"] != "orphan-layer")
    # an orphan layer 5 minutes old may be one Docker is still writing: no request can
    # lower its minimum age below the floor
    orphans = [f for f in lower if f["kind"] == "orphan-layer"]
    assert orphans and all(
        any(b.startswith("too_young:") and "60 min" in b for b in f["blocked_by"]) for f in orphans
    )
    zero = a.get("/v1/findings?min_age_seconds=0&kind=orphan-layer").json["items"]
    assert zero and all(any("too_young" in b for b in f["blocked_by"]) for f in zero)


def test_anonymous_dangling_volume_is_only_a_dangling_volume(tmp_path: Path) -> None:
    sc = make_leak_scenario()
    sc.docker.remove_container(sc.stopped_container)  # its anonymous volume now dangles
    a = build(tmp_path, sc)
    items = a.get("/v1/findings").get_json()["items"]
    dangling = [f for f in items if f["kind"] == "dangling-volume"]
    assert [f["target"]["name"] for f in dangling] == [sc.stopped_anonymous_volume]
    plan = a.client.post("/v1/plans", json={"min_age_seconds": 0}, headers=auth()).get_json()
    assert all(x["target"]["name"] != sc.stopped_anonymous_volume for x in plan["actions"])


def test_volumes_show_users_nesting_and_protection(agent: AgentUnderTest) -> None:
    vols = {v["name"]: v for v in agent.get("/v1/volumes").get_json()["items"]}
    assert vols[agent.sc.keep_volume]["protected"] == "label keep=true"
    assert vols[agent.sc.in_use_volume]["in_use_by"] == [agent.sc.running_container]
    assert vols[agent.sc.stopped_anonymous_volume]["in_use_by"] == [agent.sc.stopped_container]
    assert vols[agent.sc.stopped_anonymous_volume]["anonymous"] is True
    assert vols[agent.sc.named_volume]["anonymous"] is False
    nested = vols[agent.sc.dind_volume]["nested_subvolumes"]
    assert {n["path"] for n in nested} == set(agent.sc.dind_nested)
    assert {n["path"] for n in nested if n["read_only"]} == set(agent.sc.dind_read_only)
    dangling = agent.get("/v1/volumes?dangling=true").get_json()["items"]
    assert agent.sc.in_use_volume not in {v["name"] for v in dangling}
    assert agent.get(f"/v1/volumes/{agent.sc.dind_volume}").status_code == 200
    is_problem(agent.get("/v1/volumes/nope"), 404, "not_found")


def test_subvolumes_page_and_owners(agent: AgentUnderTest) -> None:
    ids = subvolume_ids(agent)
    assert set(ids.values()) == set(agent.sc.btrfs.subvolume_paths())
    first = agent.get(f"/v1/filesystems/{agent.sc.fs_uuid}/subvolumes?limit=5000").json["items"]
    owners = {i["path"]: i["owner"]["kind"] for i in first}
    assert owners[agent.sc.orphan_layer] == "orphan-layer"
    assert all(owners[p] == "docker-layer" for p in agent.sc.layers)
    assert all(owners[p] == "docker-volume" for p in agent.sc.dind_nested)
    assert owners[agent.sc.share] == "other"
    under = agent.get(
        f"/v1/filesystems/{agent.sc.fs_uuid}/subvolumes?under={agent.sc.dind_mountpoint}"
    ).json["items"]
    assert {i["path"] for i in under} == set(agent.sc.dind_nested)
    one = agent.get(f"/v1/filesystems/{agent.sc.fs_uuid}/subvolumes/{first[0]['id']}")
    assert one.get_json() == first[0]
    is_problem(agent.get(f"/v1/filesystems/{agent.sc.fs_uuid}/subvolumes/99999"), 404)
    is_problem(agent.get("/v1/filesystems/not-a-uuid/subvolumes"), 404)
    is_problem(agent.get(f"/v1/filesystems/{agent.sc.fs_uuid}/subvolumes?cursor=x"), 422)
    is_problem(agent.get(f"/v1/filesystems/{agent.sc.fs_uuid}/subvolumes?limit=0"), 422)
    is_problem(agent.get(f"/v1/filesystems/{agent.sc.fs_uuid}/subvolumes?under=rel"), 422)


def test_host_and_filesystems(agent: AgentUnderTest) -> None:
    host = agent.get("/v1/host").get_json()
    assert host["docker"]["storage_driver"] == "btrfs"
    assert host["roots"] == [agent.sc.data_root]
    assert host["kernel"]["rmdir_deletes_subvolumes"] is True
    fss = agent.get("/v1/filesystems").get_json()["items"]
    assert [f["uuid"] for f in fss] == [agent.sc.fs_uuid]
    assert fss[0]["quota_enabled"] is True and fss[0]["mountpoints"][0] == "/volume1"


def test_old_kernel_is_reported(tmp_path: Path) -> None:
    a = build(tmp_path, make_leak_scenario(kernel="4.4.302+"))
    assert a.get("/v1/host").json["kernel"]["rmdir_deletes_subvolumes"] is False
    dind = next(f for f in a.get("/v1/findings").json["items"] if f["kind"] == "dind-volume")
    assert any("4.18" in e for e in dind["evidence"])


def test_quota_off_gives_null_sizes_not_guesses(tmp_path: Path) -> None:
    a = build(tmp_path, make_leak_scenario(quota=False))
    items = a.get("/v1/findings").json["items"]
    assert all(f["reclaimable_bytes"] is None for f in items)
    subs = a.get(f"/v1/filesystems/{a.sc.fs_uuid}/subvolumes").json["items"]
    assert all(s["exclusive_bytes"] is None for s in subs)


# -- auth, problems, OpenAPI -----------------------------------------------------------


def _operations(agent: AgentUnderTest) -> list[tuple[str, str, dict[str, Any]]]:
    spec = agent.client.get("/openapi.json").get_json()
    ops = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method in {"get", "post", "delete", "put", "patch"}:
                ops.append((method, path, op))
    return ops


def test_every_v1_operation_needs_a_token_with_its_scope(agent: AgentUnderTest) -> None:
    ops = _operations(agent)
    guarded = [(m, p, op) for m, p, op in ops if p.startswith("/v1/") or p == "/metrics"]
    assert len(guarded) >= 15
    for method, path, op in guarded:
        url = re.sub(r"\{[^}]+\}", "1", path)
        call = getattr(agent.client, method)
        r = call(url)
        is_problem(r, 401, "unauthorized")
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        is_problem(call(url, headers=auth("nj_wrong")), 401, "unauthorized")
        is_problem(call(url, headers={"Authorization": "Basic Zm9vOmJhcg=="}), 401)
        needed = "read" if method == "get" else "clean"
        lacking = CLEAN if needed == "read" else READ
        is_problem(call(url, headers=auth(lacking)), 403, "forbidden")
        assert op.get("security") == [{"bearerAuth": []}], path
        assert {"401", "403"} <= set(op["responses"]), path


def test_unauthenticated_endpoints(agent: AgentUnderTest) -> None:
    assert agent.client.get("/healthz").get_json() == {"status": "ok"}
    assert agent.client.get("/readyz").status_code == 200
    spec = agent.client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    assert "/v1/findings" in spec["paths"]


def test_readyz_names_what_is_down_and_recovers(agent: AgentUnderTest) -> None:
    agent.sc.docker.down = True
    is_problem(agent.client.get("/readyz"), 503, "docker_unavailable")
    is_problem(agent.get("/v1/findings"), 503, "docker_unavailable")
    agent.sc.docker.down = False
    agent.sc.btrfs.missing = True
    is_problem(agent.client.get("/readyz"), 503, "btrfs_unavailable")
    is_problem(agent.get("/v1/findings"), 503, "btrfs_unavailable")
    agent.sc.btrfs.missing = False
    assert agent.client.get("/readyz").status_code == 200
    assert agent.get("/v1/findings").status_code == 200


def test_readyz_says_when_what_is_held_open_cannot_be_read(agent: AgentUnderTest) -> None:
    """Every delete is refused then (503); the findings say why each is blocked."""
    agent.sc.btrfs.holders_error = "cannot read what pid 1 holds (fd): Permission denied"
    body = is_problem(agent.client.get("/readyz"), 503, "holders_unavailable")
    assert body["unavailable"] == ["holders_unavailable"]
    assert "pid 1" not in body["detail"]  # where and why: for a read token only
    detail = agent.client.get("/readyz", headers=auth(READ)).get_json()["detail"]
    assert "pid 1 holds (fd)" in detail
    fs = agent.get("/v1/filesystems").get_json()["items"][0]["uuid"]
    sub = agent.sc.btrfs.subvolume(agent.sc.orphan_layer)
    assert sub is not None
    r = agent.client.delete(
        f"/v1/filesystems/{fs}/subvolumes/{sub.id}?dry_run=false", headers=auth(CLEAN)
    )
    is_problem(r, 503, "holders_unavailable")
    items = agent.get("/v1/findings?min_age_seconds=0").get_json()["items"]
    assert items and all(
        any(b.startswith("holders_unavailable:") for b in f["blocked_by"])
        for f in items
        if f["kind"] in ("dind-volume", "orphan-layer")
    )
    agent.sc.btrfs.holders_error = None
    assert agent.client.get("/readyz").status_code == 200


def test_unknown_path_and_method_are_problems(agent: AgentUnderTest) -> None:
    is_problem(agent.client.get("/nope"), 404, "not_found")
    is_problem(agent.client.put("/v1/findings", headers=auth()), 405, "method_not_allowed")
    r = agent.get("/v1/findings?kind=bogus")
    body = is_problem(r, 422, "validation_failed")
    assert "kind" in body["errors"]


def test_bad_json_bodies_are_4xx(agent: AgentUnderTest) -> None:
    h = auth(CLEAN)
    for data, ctype in [
        ("{not json", "application/json"),
        ("[]", "application/json"),
        ('{"kinds": "dind-volume"}', "application/json"),
        ('{"kinds": ["nope"]}', "application/json"),
        ('{"min_age_seconds": -1}', "application/json"),
        ('{"surprise": 1}', "application/json"),
        ("kinds=x", "application/x-www-form-urlencoded"),
    ]:
        r = agent.client.post("/v1/plans", data=data, content_type=ctype, headers=h)
        assert 400 <= r.status_code < 500, (data, r.status_code)
        assert r.mimetype == "application/problem+json"


def test_metrics_need_read_and_count_findings(agent: AgentUnderTest) -> None:
    text = agent.get("/metrics", token=READ).get_data(as_text=True)
    assert 'nas_janitor_findings{kind="dind-volume"} 1.0' in text
    assert 'nas_janitor_findings{kind="orphan-layer"} 1.0' in text
    assert "nas_janitor_http_requests_total" in text


def test_metrics_count_stale_qgroups_by_filesystem(tmp_path: Path) -> None:
    sc = make_leak_scenario(kernel="4.4.302+")
    for name in ("tmp-a", "tmp-b", "tmp-c"):
        sc.btrfs.create_subvolume(f"/volume1/photo/{name}")
    sc.btrfs.delete([f"/volume1/photo/tmp-{n}" for n in "abc"])
    text = build(tmp_path / "state", sc).get("/metrics", token=READ).get_data(as_text=True)
    assert f'nas_janitor_stale_qgroups{{filesystem="{sc.fs_uuid}"}} 3.0' in text
    assert 'nas_janitor_findings{kind="stale-qgroups"} 1.0' in text
    # a kernel that drops them itself leaves none: the family is there, with no sample
    text = (
        build(tmp_path / "b", make_leak_scenario())
        .get("/metrics", token=READ)
        .get_data(as_text=True)
    )
    assert "# TYPE nas_janitor_stale_qgroups gauge" in text
    assert "nas_janitor_stale_qgroups{" not in text


# -- direct deletes ---------------------------------------------------------------------


def test_volume_delete_is_a_dry_run_by_default(agent: AgentUnderTest) -> None:
    before = agent.sc.btrfs.subvolume_paths()
    r = agent.client.delete(f"/v1/volumes/{agent.sc.dind_volume}", headers=auth(CLEAN))
    body = r.get_json()
    assert r.status_code == 200 and body["dry_run"] is True
    assert {d["path"] for d in body["deleted"]} == set(agent.sc.dind_nested)
    assert body["volume"] == agent.sc.dind_volume
    assert agent.sc.btrfs.subvolume_paths() == before
    assert agent.sc.btrfs.calls_to("subvolume delete") == []
    entry = agent.get(f"/v1/audit?after_seq={body['audit_seq'] - 1}&limit=1").json["items"][0]
    assert entry["outcome"] == "dry_run" and entry["actor"] == "cleaner"


def test_volume_delete_for_real(agent: AgentUnderTest) -> None:
    sc = agent.sc
    url = f"/v1/volumes/{sc.dind_volume}?dry_run=false"
    body = agent.client.delete(url, headers=auth(CLEAN)).get_json()
    assert body["dry_run"] is False
    assert {d["path"] for d in body["deleted"]} == set(sc.dind_nested)
    assert not any(sc.btrfs.exists(p) for p in sc.dind_nested)
    assert sc.docker.volume(sc.dind_volume) is None
    assert len(sc.btrfs.calls_to("subvolume delete")) == 1  # one process for the whole batch
    # everything else is still there
    for p in (*sc.layers, sc.orphan_layer, sc.share):
        assert sc.btrfs.exists(p)
    for v in (sc.keep_volume, sc.named_volume, sc.in_use_volume, sc.stopped_anonymous_volume):
        assert sc.docker.volume(v) is not None
    assert agent.get("/v1/audit/verify").json["ok"] is True


def test_subvolume_delete_of_the_orphan(agent: AgentUnderTest) -> None:
    sc = agent.sc
    sv = sc.btrfs.subvolume(sc.orphan_layer)
    assert sv is not None
    url = f"/v1/filesystems/{sc.fs_uuid}/subvolumes/{sv.id}?dry_run=false"
    r = agent.client.delete(url, headers=auth(CLEAN))
    assert r.status_code == 200, r.get_json()
    assert not sc.btrfs.exists(sc.orphan_layer)
    assert [f["kind"] for f in agent.get("/v1/findings").json["items"]] == ["dind-volume"]


def test_deleting_a_child_of_a_kept_read_only_parent_restores_the_flag(
    agent: AgentUnderTest,
) -> None:
    sc = agent.sc
    child = sc.btrfs.subvolume(sc.dind_ro_parent_child)
    assert child is not None
    url = f"/v1/filesystems/{sc.fs_uuid}/subvolumes/{child.id}?dry_run=false"
    assert agent.client.delete(url, headers=auth(CLEAN)).status_code == 200
    assert not sc.btrfs.exists(sc.dind_ro_parent_child)
    parent = sc.btrfs.subvolume(sc.dind_ro_parent)
    assert parent is not None and parent.read_only


def _refusals(agent: AgentUnderTest) -> list[tuple[str, int, str]]:
    sc = agent.sc
    fs = sc.fs_uuid

    def sid(path: str) -> int:
        sv = sc.btrfs.subvolume(path)
        assert sv is not None
        return sv.id

    return [
        (f"/v1/volumes/{sc.keep_volume}", 409, "protected"),
        (f"/v1/volumes/{sc.in_use_volume}", 409, "in_use"),
        (f"/v1/volumes/{sc.stopped_anonymous_volume}", 409, "in_use"),
        ("/v1/volumes/no-such-volume", 404, "not_found"),
        (f"/v1/filesystems/{fs}/subvolumes/5", 409, "protected"),
        (f"/v1/filesystems/{fs}/subvolumes/{sid(sc.data_root)}", 409, "protected"),
        (f"/v1/filesystems/{fs}/subvolumes/{sid(sc.image_layers[0])}", 409, "protected"),
        (f"/v1/filesystems/{fs}/subvolumes/{sid(sc.container_layers[0])}", 409, "protected"),
        (f"/v1/filesystems/{fs}/subvolumes/{sid(sc.share)}", 409, "outside_roots"),
        (f"/v1/filesystems/{fs}/subvolumes/424242", 404, "not_found"),
    ]


@pytest.mark.parametrize("dry_run", ["true", "false"])
def test_refusals_change_nothing_and_are_audited(agent: AgentUnderTest, dry_run: str) -> None:
    before = agent.sc.btrfs.subvolume_paths()
    for url, status, code in _refusals(agent):
        head = agent.get("/v1/audit/verify").json["count"]
        r = agent.client.delete(f"{url}?dry_run={dry_run}", headers=auth(CLEAN))
        is_problem(r, status, code)
        entries = agent.get(f"/v1/audit?after_seq={head}").json["items"]
        assert [e["outcome"] for e in entries] == ["refused"], url
        assert entries[0]["detail"]["code"] == code
    assert agent.sc.btrfs.subvolume_paths() == before
    assert agent.sc.btrfs.calls_to("subvolume delete") == []


TRAVERSAL = [
    "..",
    "%2e%2e",
    "..%2f..%2fetc",
    "%2e%2e%2f%2e%2e%2fvolume1",
    "a%00b",
    "%00",
    "..%5c..",
    "foo%2fbar",
    "%252e%252e%252f",
    "-rf",
    ".hidden",
    "a" * 300,
    "%c0%ae%c0%ae",
    "name%0a",
]


@pytest.mark.parametrize("vector", TRAVERSAL)
def test_traversal_vectors_get_4xx_and_change_nothing(agent: AgentUnderTest, vector: str) -> None:
    before = agent.sc.btrfs.subvolume_paths()
    for url in (
        f"/v1/volumes/{vector}?dry_run=false",
        f"/v1/filesystems/{agent.sc.fs_uuid}/subvolumes/{vector}?dry_run=false",
        f"/v1/filesystems/{vector}/subvolumes/5?dry_run=false",
    ):
        r = agent.client.delete(url, headers=auth(CLEAN))
        assert 400 <= r.status_code < 500, (url, r.status_code)
        assert r.mimetype == "application/problem+json"
    for url in (
        f"/v1/filesystems/{agent.sc.fs_uuid}/subvolumes?under=/volume1/{vector}/..",
        f"/v1/filesystems/{agent.sc.fs_uuid}/subvolumes/-1",
    ):
        r = agent.get(url)
        assert 400 <= r.status_code < 500, (url, r.status_code)
    assert agent.sc.btrfs.subvolume_paths() == before


def _on_real_paths(tmp_path: Path) -> LeakScenario:
    """The leak scenario on a fake filesystem mounted at a real folder, so that symlinks
    made there for real are what the symlink checks meet."""
    vol = tmp_path / "volume1"
    (vol / "docker").mkdir(parents=True)
    fs = FakeBtrfs(now=DEFAULT_NOW)
    filesystem = fs.add_filesystem(mount=str(vol))
    fs.create_subvolume(f"{vol}/docker")
    docker = FakeDocker(btrfs=fs, data_root=f"{vol}/docker")
    leaked = docker.add_volume(created_at=DEFAULT_NOW - timedelta(days=3))
    fs.create_subvolume(f"{leaked.mountpoint}/btrfs/subvolumes/{'a' * 64}")
    return LeakScenario(  # only what these tests read
        **{**make_leak_scenario().__dict__, "btrfs": fs, "docker": docker,
           "fs_uuid": filesystem.uuid, "data_root": f"{vol}/docker",
           "dind_volume": leaked.name, "dind_mountpoint": leaked.mountpoint},
    )  # fmt: skip


def test_a_root_through_a_symlink_is_resolved_once(tmp_path: Path) -> None:
    sc = _on_real_paths(tmp_path)
    link = tmp_path / "packages-docker"
    link.symlink_to(sc.data_root)  # DSM 7: /var/packages/ContainerManager/var/docker
    a = build(tmp_path / "s", sc, roots=[str(link)])
    assert a.get("/v1/host").get_json()["roots"] == [sc.data_root]  # the real path
    r = a.client.delete(f"/v1/volumes/{sc.dind_volume}", headers=auth(CLEAN))
    assert r.status_code == 200, r.get_json()


def test_a_symlink_inside_a_root_is_refused(tmp_path: Path) -> None:
    sc = _on_real_paths(tmp_path)
    volumes = Path(sc.data_root) / "volumes"
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / sc.dind_volume / "_data").mkdir(parents=True)
    volumes.mkdir(parents=True, exist_ok=True)
    (volumes / sc.dind_volume).symlink_to(elsewhere / sc.dind_volume)
    a = build(tmp_path / "s", sc)
    r = a.client.delete(f"/v1/volumes/{sc.dind_volume}?dry_run=false", headers=auth(CLEAN))
    body = is_problem(r, 409, "outside_roots")
    assert "symbolic link" in body["detail"]
    assert sc.btrfs.calls_to("subvolume delete") == []


# -- plans and jobs ------------------------------------------------------------------------


def plan(a: AgentUnderTest, **policy: Any) -> dict[str, Any]:
    policy.setdefault("min_age_seconds", 0)
    r = a.client.post("/v1/plans", json=policy, headers=auth(CLEAN))
    assert r.status_code == 201, r.get_json()
    return dict(r.get_json())


def apply(a: AgentUnderTest, plan_id: str, key: str | None = None) -> dict[str, Any]:
    h = auth(CLEAN)
    if key:
        h["Idempotency-Key"] = key
    r = a.client.post(f"/v1/plans/{plan_id}/apply", headers=h)
    assert r.status_code == 202, r.get_json()
    assert r.headers["Location"] == f"/v1/jobs/{r.get_json()['job_id']}"
    return dict(r.get_json())


def finish(a: AgentUnderTest, job_id: str) -> dict[str, Any]:
    a.wait_job(job_id)
    return dict(a.get(f"/v1/jobs/{job_id}").get_json())


def test_plan_apply_job(agent: AgentUnderTest) -> None:
    sc = agent.sc
    p = plan(agent)
    ops = {(x["op"], x["target"]["type"]) for x in p["actions"]}
    assert ops == {("remove_volume", "volume"), ("delete_subvolumes", "subvolume")}
    assert p["skipped"] == []
    assert agent.get(f"/v1/plans/{p['id']}").get_json()["id"] == p["id"]
    assert sc.btrfs.calls_to("subvolume delete") == []  # planning changes nothing
    job = finish(agent, apply(agent, p["id"])["job_id"])
    assert job["state"] == "succeeded"
    assert job["progress"] == {"done": 2, "total": 2}
    assert [r["outcome"] for r in job["results"]] == ["deleted", "deleted"]
    assert job["reclaimed_bytes"] > 0
    assert not sc.btrfs.exists(sc.orphan_layer)
    assert sc.docker.volume(sc.dind_volume) is None
    assert agent.get("/v1/findings").json["items"] == []
    # applying again: same job, nothing run twice
    deletes = len(sc.btrfs.calls_to("subvolume delete"))
    again = apply(agent, p["id"])
    assert again["job_id"] == job["id"]
    assert len(sc.btrfs.calls_to("subvolume delete")) == deletes
    assert agent.get("/v1/audit/verify").json["ok"] is True


def test_default_plan_skips_young_and_excludes_dangling(tmp_path: Path) -> None:
    a = build(tmp_path, make_leak_scenario(age=timedelta(hours=1)))
    r = a.client.post("/v1/plans", json={}, headers=auth(CLEAN)).get_json()
    assert r["actions"] == []
    assert len(r["skipped"]) == 2 and all("too_young" in s["reason"] for s in r["skipped"])


def test_plan_with_chosen_finding_ids(agent: AgentUnderTest) -> None:
    orphan = agent.get("/v1/findings?kind=orphan-layer").json["items"][0]
    p = plan(agent, finding_ids=[orphan["id"], "orphan-layer-0000000000000000"])
    assert [x["finding_id"] for x in p["actions"]] == [orphan["id"]]
    assert p["skipped"][0]["finding_id"] == "orphan-layer-0000000000000000"


def test_idempotency_key(agent: AgentUnderTest) -> None:
    p1, p2 = plan(agent), plan(agent)
    j1 = apply(agent, p1["id"], key="run-42")
    assert apply(agent, p1["id"], key="run-42")["job_id"] == j1["job_id"]
    r = agent.client.post(
        f"/v1/plans/{p2['id']}/apply", headers={**auth(CLEAN), "Idempotency-Key": "run-42"}
    )
    is_problem(r, 409, "conflict")
    finish(agent, j1["job_id"])


def test_target_changed_after_planning_is_skipped(agent: AgentUnderTest) -> None:
    sc = agent.sc
    p = plan(agent)
    sc.docker.add_container("late", image=sc.image, running=False, volumes=[sc.dind_volume])
    sc.btrfs.touch(f"{sc.orphan_layer}/new-file", add_bytes=10)  # generation moves
    job = finish(agent, apply(agent, p["id"])["job_id"])
    assert [r["outcome"] for r in job["results"]] == ["skipped", "skipped"]
    reasons = " ".join(r["detail"] for r in job["results"])
    assert "in_use" in reasons and "generation" in reasons
    assert sc.btrfs.exists(sc.orphan_layer) and sc.docker.volume(sc.dind_volume) is not None


def test_expired_plan(agent: AgentUnderTest) -> None:
    p = plan(agent)
    later = build(agent.state_dir, agent.sc)
    later.sc.btrfs.now = later.sc.docker.now = agent.sc.now + timedelta(hours=2)

    # move the app's clock: a new app whose clock is two hours on
    from agent.http.app import create_app
    from agent.runtime import Backends
    from tests.agent.http.apphelpers import agent_config

    app = create_app(
        agent_config(agent.state_dir),
        backend=Backends(btrfs=agent.sc.btrfs, docker=agent.sc.docker),
        clock=lambda: agent.sc.now + timedelta(hours=2),
    )
    r = app.test_client().post(f"/v1/plans/{p['id']}/apply", headers=auth(CLEAN))
    is_problem(r, 409, "plan_expired")
    is_problem(agent.client.post("/v1/plans/nope/apply", headers=auth(CLEAN)), 404)


def test_a_failed_delete_makes_the_job_partial(agent: AgentUnderTest) -> None:
    sc = agent.sc
    p = plan(agent)
    sc.btrfs.refuse_delete(sc.orphan_layer, "Operation not permitted")
    job = finish(agent, apply(agent, p["id"])["job_id"])
    assert job["state"] == "partial"
    assert sorted(r["outcome"] for r in job["results"]) == ["deleted", "failed"]


def test_restart_marks_interrupted_and_apply_resumes(agent: AgentUnderTest) -> None:
    sc = agent.sc
    p = plan(agent)
    state = agent.runtime.state
    audit = agent.runtime.audit
    # What a crash leaves: a running job whose first action was deleted and audited
    # as started, but whose result was never recorded.
    job, _ = state.create_job_for_plan(
        job_id="j" * 32,
        plan_id=p["id"],
        idempotency_key=None,
        body={"total": 2, "audit_from": audit.head_entry()[0]},
        state="running",
    )
    first = p["actions"][0]
    audit.append(
        actor="cleaner",
        action=first["op"],
        target="x",
        outcome="started",
        detail={"job_id": job.id, "seq": 1},
    )
    client = agent.app.test_client()
    client.delete(
        f"/v1/volumes/{first['target']['name']}?dry_run=false"
        if first["op"] == "remove_volume"
        else f"/v1/filesystems/{sc.fs_uuid}/subvolumes/{first['target']['id']}?dry_run=false",
        headers=auth(CLEAN),
    )
    restarted = agent.restart()
    assert restarted.get(f"/v1/jobs/{job.id}").json["state"] == "interrupted"
    assert apply(restarted, p["id"])["job_id"] == job.id
    done = finish(restarted, job.id)
    assert done["state"] == "succeeded"
    assert [r["outcome"] for r in done["results"]] == ["deleted", "deleted"]
    assert "before the agent restarted" in done["results"][0]["detail"]
    assert restarted.get("/v1/findings").json["items"] == []
    actions = [e["action"] for e in restarted.get("/v1/audit?limit=5000").json["items"]]
    assert "job.interrupted" in actions
    assert restarted.get("/v1/audit/verify").json["ok"] is True


# -- audit -------------------------------------------------------------------------------------


def test_audit_pages_and_detects_an_edit(agent: AgentUnderTest) -> None:
    for _ in range(3):
        agent.client.delete(f"/v1/volumes/{agent.sc.dind_volume}", headers=auth(CLEAN))
    page = agent.get("/v1/audit?limit=2").get_json()
    assert len(page["items"]) == 2 and page["next_cursor"] == str(page["items"][-1]["seq"])
    rest = agent.get(f"/v1/audit?after_seq={page['next_cursor']}").get_json()
    assert [e["seq"] for e in page["items"] + rest["items"]] == [1, 2, 3]
    assert page["items"][1]["prev_hash"] == page["items"][0]["hash"]
    ok = agent.get("/v1/audit/verify").get_json()
    assert ok["ok"] is True and ok["count"] == 3 and ok["head"] == rest["items"][-1]["hash"]
    with sqlite3.connect(agent.state_dir / "audit.db") as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        table = next(t for t in tables if "audit" in t or "entries" in t)
        db.execute(f"UPDATE {table} SET outcome = 'deleted' WHERE seq = 2")
    bad = agent.get("/v1/audit/verify").get_json()
    assert bad["ok"] is False and bad["first_bad_seq"] == 2


def test_token_in_no_response_or_audit(agent: AgentUnderTest) -> None:
    agent.client.delete(f"/v1/volumes/{agent.sc.dind_volume}", headers=auth(BOTH))
    text = agent.get("/v1/audit").get_data(as_text=True)
    assert BOTH not in text and "ops" in text


# -- the agent in a container that sees the host under a prefix ----------------------------


class HostView:
    """The scenario's Docker as the host's daemon would speak of it when the agent's
    container mounts the host's / at /host: the fakes live under /host, Docker's
    answers carry host paths."""

    def __init__(self, docker: Any, prefix: str) -> None:
        self._d, self._p = docker, prefix

    def __getattr__(self, name: str) -> Any:
        return getattr(self._d, name)

    def info(self) -> Any:
        import dataclasses

        i = self._d.info()
        return dataclasses.replace(i, data_root=i.data_root.removeprefix(self._p))

    def volumes(self) -> list[Any]:
        import dataclasses

        return [
            dataclasses.replace(v, mountpoint=v.mountpoint.removeprefix(self._p))
            for v in self._d.volumes()
        ]

    def layer_refs(self, data_root: str) -> Any:
        assert data_root.startswith(self._p), "layerdb must be read through the prefix"
        return self._d.layer_refs(data_root)


def test_host_prefix_maps_paths_both_ways(tmp_path: Path) -> None:
    from agent.http.app import create_app
    from agent.runtime import Backends
    from tests.agent.http.apphelpers import agent_config
    from tests.fakes import FakeBtrfs, FakeDocker

    fs = FakeBtrfs()
    fs.add_filesystem(mount="/host/volume1", quota=True)
    fs.create_subvolume("/host/volume1/docker")
    docker = FakeDocker(btrfs=fs, data_root="/host/volume1/docker")
    leak = docker.add_volume()
    nested = f"{docker.volume(leak.name).mountpoint}/btrfs/subvolumes/x"  # type: ignore[union-attr]
    fs.create_subvolume(nested, read_only=True)
    app = create_app(
        agent_config(tmp_path, host_prefix="/host"),
        backend=Backends(btrfs=fs, docker=HostView(docker, "/host")),  # type: ignore[arg-type]
    )
    c = app.test_client()
    host = c.get("/v1/host", headers=auth()).get_json()
    assert host["roots"] == ["/volume1/docker"]
    f = next(
        x
        for x in c.get("/v1/findings?min_age_seconds=0", headers=auth()).get_json()["items"]
        if x["kind"] == "dind-volume"
    )
    assert f["target"]["path"].startswith("/volume1/docker/volumes/")
    assert f["blocked_by"] == []
    r = c.delete(f"/v1/volumes/{leak.name}?dry_run=false", headers=auth(CLEAN))
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["deleted"][0]["path"] == nested.removeprefix("/host")
    assert not fs.exists(nested)  # deleted through the local (prefixed) path


def test_unrelated_filesystems_are_not_looked_at(tmp_path: Path) -> None:
    sc = make_leak_scenario()
    sc.btrfs.add_filesystem(mount="/volumeUSB")
    sc.btrfs.create_subvolume("/volumeUSB/backup")
    a = build(tmp_path, sc)
    assert [f["mountpoints"][0] for f in a.get("/v1/filesystems").json["items"]] == ["/volume1"]
    assert len(a.get("/v1/findings").json["items"]) == 2
    assert not any("/volumeUSB" in arg for c in sc.btrfs.calls for arg in c.args)


def test_keep_labels_protect_whatever_the_policy_says(tmp_path: Path) -> None:
    sc = make_leak_scenario()
    kept = sc.docker.add_volume(labels={"nas-janitor.keep": "yes"})
    sc.btrfs.create_subvolume(f"{kept.mountpoint}/btrfs/subvolumes/layer")
    a = build(tmp_path, sc)
    p = plan(a, protect_labels=[])
    assert kept.name not in {x["target"]["name"] for x in p["actions"]}
    skipped = {s["finding_id"]: s["reason"] for s in p["skipped"]}
    assert any("protected" in r and "nas-janitor.keep" in r for r in skipped.values())
    r = a.client.delete(f"/v1/volumes/{kept.name}?dry_run=false", headers=auth(CLEAN))
    is_problem(r, 409, "protected")


def test_a_named_volume_without_subvolumes_is_not_ours_to_remove(agent: AgentUnderTest) -> None:
    r = agent.client.delete(
        f"/v1/volumes/{agent.sc.named_volume}?dry_run=false", headers=auth(CLEAN)
    )
    body = is_problem(r, 409, "protected")
    assert "docker volume rm" in body["detail"]
    assert agent.sc.docker.volume(agent.sc.named_volume) is not None


def test_the_start_up_scan_leaves_the_first_delete_less_to_learn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What a scan learns and keeps (the filesystems' identities, Docker's info) is
    known before the first request: the first delete asks neither again."""
    a = build(tmp_path / "state")
    inv = a.runtime.inventory
    assert inv.scans == 0
    with caplog.at_level(logging.INFO, logger="nas_janitor.agent"):
        scan_at_start(a.app).join(30)
    assert inv.scans == 2  # the first is never kept; the second is
    assert any("start-up scan: " in r.getMessage() for r in caplog.records)
    assert a.get("/v1/findings").status_code == 200
    assert a.get("/metrics").status_code == 200
    assert inv.scans == 2  # both answered by the kept scan

    def asked() -> tuple[int, int]:
        return a.sc.docker.calls.count("info"), len(a.sc.btrfs.calls_to("filesystem show"))

    before = asked()
    assert before[0] == 1 and before[1] >= 1
    r = a.client.delete(
        f"/v1/volumes/{a.sc.dind_volume}", query_string={"dry_run": "false"}, headers=auth(CLEAN)
    )
    assert r.status_code == 200, r.get_json()
    assert asked() == before
    assert inv.daemon_info.reused == 2  # the second scan and the delete


def test_with_no_kept_scan_one_start_up_scan_learns_what_is_kept(tmp_path: Path) -> None:
    a = build(tmp_path / "state", inventory_max_age_seconds=0)
    scan_at_start(a.app).join(30)
    assert a.runtime.inventory.scans == 1
    assert a.sc.docker.calls.count("info") == 1


def test_a_start_up_scan_that_fails_is_logged_and_the_next_read_tries_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = build(tmp_path / "state")
    a.sc.docker.down = True
    with caplog.at_level(logging.WARNING, logger="nas_janitor.agent"):
        scan_at_start(a.app).join(30)
    assert any("start-up scan failed: docker_unavailable" in r.getMessage() for r in caplog.records)
    a.sc.docker.down = False
    assert a.get("/v1/findings").status_code == 200
