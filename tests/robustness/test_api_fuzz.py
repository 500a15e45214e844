"""schemathesis against the agent's served OpenAPI document, every phase and check.

In process: the real app (``agent.app.create_app``) over the stateful fakes, reached
through schemathesis' WSGI transport, with a token holding both scopes so operations run
for real (plans are made and applied, deletes with ``dry_run=false`` delete), and the
auth checks on (``ignored_auth`` re-sends each request without credentials and wants a
401). Outside the stateful phase every request meets a fresh copy of the leak scenario,
so a delete or an apply in one example never leaves the next one an empty NAS; the
agent's own state (plans, jobs, audit) carries over. In the stateful phase the world
carries over too, and DELETEs are real (``dry_run=false``): a DELETE is a dry run by
default (the contract), and ``use_after_free`` rightly expects a 200 DELETE to have
deleted.

The long run (``make robustness``) also fuzzes the real agent under gunicorn over TLS,
on a lab of its own (``lab_factory``), and checks afterwards that everything the safety
rules protect (the keep-labelled volume, the volumes containers use, image and
container layers) is byte for byte as the lab seeded it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from schemathesis.generation.meta import TestPhase

from agent.runtime import Backends
from lab import Lab
from tests.agent.http.apphelpers import BOTH, Swappable, build
from tests.fakes import make_leak_scenario
from tests.robustness import fuzzing, knobs

SECURED_PREFIXES = ("/v1/", "/metrics")
# gunicorn refuses a request line or a header field over 8190 bytes (414, 431, as
# problems) before the app sees it: a limit in bytes on the wire, which the document
# cannot state (a 4096-character 'under' of non-ASCII characters is longer
# percent-encoded). Under gunicorn, these are rejections for the data checks.
TRANSPORT_LIMITS = {
    "negative_data_rejection": {
        "expected-statuses": [
            *("400 401 403 404 405 406 409 415 422 428 429 5xx".split()),
            "414",
            "431",
        ]
    },
    "positive_data_acceptance": {
        "expected-statuses": [*("2xx 3xx 401 403 404 409 429 5xx".split()), "414", "431"]
    },
}


def _config(token: str, *, examples: int, seed: int, **extra: Any) -> Any:
    data: dict[str, Any] = {
        "headers": {"Authorization": f"Bearer {token}"},
        "generation": {"max-examples": examples},
        "seed": seed,
    }
    data.update(extra)
    return schemathesis.Config.from_dict(data)


def _with_examples(doc: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The served document plus ``example`` values for path parameters (real ids), so
    the examples phase reaches past the 404s of random ids."""
    doc = copy.deepcopy(doc)
    for item in doc["paths"].values():
        params = list(item.get("parameters", []))  # path-level: flask-smorest puts them here
        for method, op in item.items():
            if method in ("get", "post", "delete"):
                params.extend(op.get("parameters", []))
        for param in params:
            if param["in"] == "path" and param["name"] in values:
                param["example"] = values[param["name"]]
    return doc


def _stateful(case: Any) -> bool:
    return case.meta is not None and case.meta.phase.name == TestPhase.STATEFUL


def _assert_clean(report: fuzzing.FuzzReport, operations: set[str]) -> None:
    print(f"schemathesis: {report.requests} requests, phases {report.phases}")
    for op, codes in report.exercised().items():
        phases = {p: n for (p, o), n in sorted(report.per_phase.items()) if o == op}
        print(f"  {op}: {codes} ({sum(report.statuses[op].values())} requests: {phases})")
    assert not report.failures and not report.errors, report.describe_failures()
    assert report.stop_reason == "completed", report.stop_reason
    for phase in ("coverage", "fuzzing", "stateful"):
        assert report.phases.get(phase) == "success", report.phases
    # every operation really ran: the token works and the ids led somewhere
    not_ok = [op for op in operations if not any(200 <= c < 300 for c in report.statuses[op])]
    assert not not_ok, f"no 2xx for {not_ok}: {report.exercised()}"
    secured = [op for op in operations if op.split(" ", 1)[1].startswith(SECURED_PREFIXES)]
    unauth = [op for op in secured if 401 not in report.statuses[op]]
    assert not unauth, f"no 401 seen for {unauth}"
    for check in ("not_a_server_error", "response_schema_conformance", "ignored_auth"):
        assert report.checks[(check, "success")] > 0, report.checks
    assert report.checks[("not_a_server_error", "success")] >= report.requests // 2


def _operations(doc: dict[str, Any]) -> set[str]:
    return {
        f"{method.upper()} {path}"
        for path, item in doc["paths"].items()
        for method in item
        if method in ("get", "post", "delete", "put", "patch")
    }


def test_schemathesis_in_process_over_the_fakes(tmp_path: Path) -> None:
    sc = make_leak_scenario()
    btrfs, docker = Swappable(sc.btrfs), Swappable(sc.docker)
    agent = build(
        tmp_path / "state",
        sc,
        backends=Backends(btrfs=btrfs, docker=docker),  # type: ignore[arg-type]
    )
    h = {"Authorization": f"Bearer {BOTH}"}
    plan = agent.client.post("/v1/plans", json={"kinds": ["orphan-layer"]}, headers=h)
    assert plan.status_code == 201
    plan_id = plan.get_json()["id"]
    job = agent.client.post(f"/v1/plans/{plan_id}/apply", headers=h)
    assert job.status_code == 202
    agent.wait_job(job.get_json()["job_id"])
    orphan = sc.btrfs.subvolume(sc.orphan_layer)
    assert orphan is None  # the job deleted it: the examples' id now reads 404
    served = agent.client.get("/openapi.json").get_json()
    values = {
        "fs_uuid": sc.fs_uuid,
        "sub_id": sc.btrfs.subvolume(sc.dind_ro_leaf).id,  # type: ignore[union-attr]
        "name": sc.dind_volume,
        "plan_id": plan_id,
        "job_id": job.get_json()["job_id"],
    }

    resets = 0

    def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
        nonlocal resets
        if _stateful(case):
            if case.method.upper() == "DELETE":
                case.query = {**(case.query or {}), "dry_run": "false"}
            return
        fresh = make_leak_scenario()
        btrfs.inner, docker.inner = fresh.btrfs, fresh.docker
        resets += 1

    seed = knobs.seed()
    config = _config(BOTH, examples=knobs.FUZZ_EXAMPLES, seed=seed)
    schema = schemathesis.openapi.from_wsgi("/openapi.json", agent.app, config=config)
    assert schema.raw_schema == served  # what is fuzzed below is the served document
    enriched = schemathesis.openapi.from_dict(_with_examples(served, values), config=config)
    enriched.app = agent.app
    enriched.location = "/openapi.json"

    started = time.monotonic()
    with fuzzing.wsgi_probe_fix(), fuzzing.global_hook("before_call", before_call):
        report = fuzzing.run(enriched)
    print(f"seed {seed}, {time.monotonic() - started:.0f} s, {resets} resets")
    _assert_clean(report, _operations(served))
    verify = agent.get("/v1/audit/verify").get_json()
    assert verify["ok"] is True, verify


# -- the real agent under gunicorn on a lab of its own (long run) ----------------------------


@pytest.mark.long
@pytest.mark.timeout(3600)
def test_schemathesis_against_the_real_agent_on_its_own_lab(
    lab_factory: Callable[..., Lab], tmp_path: Path
) -> None:
    from tests.agent.test_lab_agent import never_touch_digests
    from tests.agentproc import start_agent

    lab = lab_factory()
    before = never_touch_digests(lab)
    agent = start_agent(tmp_path / "agent", docker_host=lab.docker_host)
    try:
        with agent.client() as c:
            fs = next(
                f["uuid"]
                for f in c.get("/v1/filesystems").json()["items"]
                if str(lab.mnt) in f["mountpoints"]
            )
            plan = c.post("/v1/plans", json={"kinds": ["orphan-layer"], "min_age_seconds": 0})
            plan_id = plan.json()["id"]
        seed = knobs.seed()
        print(f"seed {seed}")
        config = _config(
            agent.token,
            examples=knobs.LAB_FUZZ_EXAMPLES,
            seed=seed,
            **{
                "tls-verify": str(agent.pki.ca_pem),
                "request-timeout": 60,
                "checks": TRANSPORT_LIMITS,
            },
        )
        schema = schemathesis.openapi.from_url(
            f"{agent.url}/openapi.json", config=config, verify=str(agent.pki.ca_pem)
        )
        served = schema.raw_schema
        subs = {s["path"]: s["id"] for s in _items(agent, f"/v1/filesystems/{fs}/subvolumes")}
        values = {
            "fs_uuid": fs,
            "sub_id": subs[str(lab.seeded.orphan.path)],
            "name": lab.seeded.dind.volume,
            "plan_id": plan_id,
            "job_id": "0" * 32,
        }
        enriched = schemathesis.openapi.from_dict(_with_examples(served, values), config=config)
        enriched.location = f"{agent.url}/openapi.json"

        def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
            if _stateful(case) and case.method.upper() == "DELETE":
                case.query = {**(case.query or {}), "dry_run": "false"}

        with fuzzing.global_hook("before_call", before_call):
            report = fuzzing.run(enriched)
        ops = _operations(served) - {"GET /v1/jobs/{job_id}"}  # no job unless one is applied
        _assert_clean(report, ops)
        after = never_touch_digests(lab)
        # The stateful phase deletes for real what the answers name, on this lab of its
        # own; everything the rules protect (keep label, a named volume holding no
        # subvolume, used by a container, image and container layers) must be exactly as
        # it was.
        assert after == before
        with agent.client() as c:
            assert c.get("/v1/audit/verify").json()["ok"] is True
    finally:
        agent.kill()


def _items(agent: Any, path: str) -> list[dict[str, Any]]:
    with agent.client() as c:
        r = c.get(path, params={"limit": 5000})
        assert r.status_code == 200, r.text
        items: list[dict[str, Any]] = r.json()["items"]
        return items
