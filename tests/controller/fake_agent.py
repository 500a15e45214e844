"""An in-process, stateful fake of one agent's HTTP API (version 1), for the
controller's unit tests: ``httpx.MockTransport(FakeAgent())``.

It keeps state the way the agent does, in small: volumes and subvolumes that deleting
really removes, findings derived from that state, plans, jobs that move one action per
look, an idempotent apply, and a hash-chained audit log (``shared.auditchain``) that a
test can tamper with. Auth follows the contract (401 / 403 by scope). Faults are set by
the test: ``fail_next`` (answers or exceptions for the next matching requests),
``down`` (connection refused), ``delay`` (seconds per request), ``docker_down``.
Every request is kept in ``requests``.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from shared import auditchain

UUID = "0f5b6f7a-1c2d-4e5f-8a9b-0c1d2e3f4a5b"
ROOT = "/volume1/docker"
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
TOKENS = {"tok-read": {"read"}, "tok-clean": {"clean"}, "tok-all": {"read", "clean"}}


def at_text(at: datetime) -> str:
    return at.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


@dataclass
class FakeSubvol:
    id: int
    path: str
    owner: str  # docker-layer, docker-volume, orphan-layer, other
    read_only: bool = False
    exclusive_bytes: int | None = 1 << 20


@dataclass
class FakeVolume:
    name: str
    subvolumes: list[int]
    labels: dict[str, str] = field(default_factory=dict)
    in_use_by: list[str] = field(default_factory=list)
    exclusive_bytes: int | None = 10 << 20
    age_seconds: int = 7 * 86400


@dataclass
class Fault:
    """What to do instead of answering, for the next request ``match`` accepts."""

    match: Callable[[httpx.Request], bool]
    status: int = 503
    code: str = "docker_unavailable"
    exc: type[Exception] | None = None
    times: int = 1
    lose_answer: bool = False  # do the work, then lose the answer (raise ``exc``)


class FakeAgent:
    def __init__(self, *, hostname: str = "nas1", kernel: str = "4.4.302+") -> None:
        self.hostname = hostname
        self.kernel = kernel
        self.lock = threading.Lock()
        self.subvols: dict[int, FakeSubvol] = {}
        self.volumes: dict[str, FakeVolume] = {}
        self.plans: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.job_of_plan: dict[str, str] = {}
        self.job_of_key: dict[str, str] = {}
        self.expired: set[str] = set()
        self.fail_targets: set[str] = set()  # finding ids whose action fails
        self.audit: list[dict[str, Any]] = []
        self.requests: list[httpx.Request] = []
        self.faults: list[Fault] = []
        self.down = False
        self.docker_down = False
        self.delay = 0.0
        self.page_limit_cap: int | None = None  # answer shorter pages than asked
        self.extra_fields = False  # add fields the contract may grow
        self.jobs_stuck = False  # jobs never move
        # after a job ends: how many more looks at it still find its space not freed
        # (None: the agent does not say, as one before pending_bytes)
        self.freed_after_looks: int | None = 0
        self.t0 = T0  # time of the first audit entry; one second more for each next one
        self._ids = itertools.count(256)
        self._plan_ids = itertools.count(1)
        self._job_ids = itertools.count(1)

    # -- building state ------------------------------------------------------------

    def add_subvolume(self, path: str, *, owner: str = "other", read_only: bool = False) -> int:
        sid = next(self._ids)
        self.subvols[sid] = FakeSubvol(sid, path, owner, read_only)
        return sid

    def add_dind_volume(self, name: str, *, nested: int = 2, **kw: Any) -> FakeVolume:
        ids = [
            self.add_subvolume(f"{ROOT}/volumes/{name}/_data/btrfs/subvolumes/{i}", owner="other")
            for i in range(nested)
        ]
        vol = FakeVolume(name, ids, **kw)
        self.volumes[name] = vol
        return vol

    def add_orphan_layer(self, name: str) -> int:
        return self.add_subvolume(f"{ROOT}/btrfs/subvolumes/{name}", owner="orphan-layer")

    def fail_next(self, match: Callable[[httpx.Request], bool] | None = None, **kw: Any) -> None:
        self.faults.append(Fault(match=match or (lambda r: True), **kw))

    def log(self, action: str, target: str, outcome: str, detail: dict[str, Any]) -> int:
        prev = self.audit[-1]["hash"] if self.audit else auditchain.GENESIS
        entry: dict[str, Any] = {
            "seq": len(self.audit) + 1,
            "at": at_text(self.t0 + timedelta(seconds=len(self.audit))),
            "actor": "tok-all",
            "action": action,
            "target": target,
            "outcome": outcome,
            "detail": detail,
            "prev_hash": prev,
        }
        entry["hash"] = auditchain.item_hash(entry)
        self.audit.append(entry)
        return int(entry["seq"])

    def rewrite_audit(self, seq: int, **changes: Any) -> None:
        """Change an entry and recompute every hash from it on (a clean rewrite that the
        agent's own verify cannot see)."""
        self.audit[seq - 1].update(changes)
        for i in range(seq - 1, len(self.audit)):
            e = self.audit[i]
            e["prev_hash"] = self.audit[i - 1]["hash"] if i else auditchain.GENESIS
            e["hash"] = auditchain.item_hash(e)

    # -- derived views -------------------------------------------------------------

    def findings(self) -> list[dict[str, Any]]:
        out = []
        for v in self.volumes.values():
            kind = "dind-volume" if v.subvolumes else "dangling-volume"
            blocked = [f"used by container {c}" for c in v.in_use_by]
            out.append(
                {
                    "id": f"{kind}:{v.name}",
                    "kind": kind,
                    "target": {"type": "volume", "name": v.name, "id": None, "path": None},
                    "reclaimable_bytes": v.exclusive_bytes,
                    "evidence": [f"{len(v.subvolumes)} nested subvolumes"],
                    "blocked_by": blocked,
                    "age_seconds": v.age_seconds,
                }
            )
        for s in self.subvols.values():
            if s.owner == "orphan-layer":
                out.append(
                    {
                        "id": f"orphan-layer:{s.id}",
                        "kind": "orphan-layer",
                        "target": {"type": "subvolume", "name": None, "id": s.id, "path": s.path},
                        "reclaimable_bytes": s.exclusive_bytes,
                        "evidence": ["no layer references it"],
                        "blocked_by": [],
                        "age_seconds": 30 * 86400,
                    }
                )
        return out

    def subvolume_json(self, s: FakeSubvol) -> dict[str, Any]:
        return {
            "id": s.id,
            "parent_id": 5,
            "path": s.path,
            "read_only": s.read_only,
            "generation": 100 + s.id,
            "created_at": "2024-04-01T00:00:00Z",
            "uuid": f"u-{s.id}",
            "parent_uuid": None,
            "referenced_bytes": s.exclusive_bytes,
            "exclusive_bytes": s.exclusive_bytes,
            "owner": {"kind": s.owner, "ref": None},
        }

    def volume_json(self, v: FakeVolume) -> dict[str, Any]:
        return {
            "name": v.name,
            "driver": "local",
            "mountpoint": f"{ROOT}/volumes/{v.name}/_data",
            "labels": v.labels,
            "created_at": None,
            "anonymous": True,
            "in_use_by": v.in_use_by,
            "nested_subvolumes": [
                {"id": i, "path": self.subvols[i].path, "read_only": self.subvols[i].read_only}
                for i in v.subvolumes
            ],
            "exclusive_bytes": v.exclusive_bytes,
            "protected": None,
        }

    # -- the transport handler -------------------------------------------------------

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.delay:
            time.sleep(self.delay)
        if self.down:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        for fault in self.faults:
            if fault.times > 0 and fault.match(request):
                fault.times -= 1
                if fault.lose_answer:
                    with self.lock:
                        self.route(request)
                if fault.exc is not None:
                    raise fault.exc("injected", request=request)  # type: ignore[call-arg]
                return problem(fault.status, fault.code, "injected fault")
        with self.lock:
            return self.route(request)

    def route(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        method = request.method
        q = request.url.params
        if path == "/healthz":
            return ok({"status": "ok"})
        if path == "/readyz":
            if self.docker_down:
                return problem(503, "docker_unavailable", "cannot reach the Docker daemon")
            return ok({"status": "ok"})
        scopes = self.scopes(request)
        if scopes is None:
            return problem(401, "unauthorized", "a bearer token is needed", www=True)
        parts = path.strip("/").split("/")
        needed = "read" if method == "GET" else "clean"
        if needed not in scopes:
            return problem(403, "forbidden", f"this token lacks the {needed} scope")
        if path == "/metrics":
            return httpx.Response(200, text="nas_janitor_findings 1\n")
        match method, parts[1:]:
            case "GET", ["host"]:
                return ok(self.host())
            case "GET", ["filesystems"]:
                return ok({"items": [self.filesystem()], "next_cursor": None})
            case "GET", ["filesystems", uuid, "subvolumes"]:
                if uuid != UUID:
                    return problem(404, "not_found", "no such filesystem")
                items = [self.subvolume_json(s) for s in self.subvols.values()]
                if under := q.get("under"):
                    items = [i for i in items if i["path"].startswith(under)]
                return self.paged(items, q)
            case "GET", ["filesystems", _, "subvolumes", sid]:
                s = self.subvols.get(int(sid))
                if s is None:
                    return problem(404, "not_found", f"no subvolume {sid}")
                return ok(self.subvolume_json(s))
            case "DELETE", ["filesystems", _, "subvolumes", sid]:
                return self.delete_subvolume(int(sid), q.get("dry_run", "true") == "true")
            case "GET", ["volumes"]:
                return self.paged([self.volume_json(v) for v in self.volumes.values()], q)
            case "GET", ["volumes", name]:
                if name not in self.volumes:
                    return problem(404, "not_found", f"no volume {name}")
                return ok(self.volume_json(self.volumes[name]))
            case "DELETE", ["volumes", name]:
                return self.delete_volume(name, q.get("dry_run", "true") == "true")
            case "GET", ["findings"]:
                kinds = q.get_list("kind")
                items = [f for f in self.findings() if not kinds or f["kind"] in kinds]
                return self.paged(items, q)
            case "POST", ["plans"]:
                return self.create_plan(json.loads(request.content or b"{}"))
            case "GET", ["plans", pid]:
                if pid not in self.plans:
                    return problem(404, "not_found", f"no plan {pid}")
                return ok(self.plans[pid])
            case "POST", ["plans", pid, "apply"]:
                return self.apply(pid, request.headers.get("Idempotency-Key"))
            case "GET", ["jobs", jid]:
                if jid not in self.jobs:
                    return problem(404, "not_found", f"no job {jid}")
                self.step(jid)
                return ok({k: v for k, v in self.jobs[jid].items() if k != "looks_to_free"})
            case "GET", ["audit"]:
                after = int(q.get("after_seq", "0"))
                limit = int(q.get("limit", "500"))
                items = [e for e in self.audit if e["seq"] > after][:limit]
                return ok({"items": items, "next_cursor": None})
            case "GET", ["audit", "verify"]:
                bad = auditchain.first_bad_seq(self.audit)
                head = self.audit[-1]["hash"] if self.audit else auditchain.GENESIS
                return ok(
                    {
                        "ok": bad is None,
                        "count": len(self.audit),
                        "head": head,
                        "first_bad_seq": bad,
                    }
                )
        return problem(404, "not_found", f"no route {method} {path}")

    def scopes(self, request: httpx.Request) -> set[str] | None:
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme != "Bearer" or token not in TOKENS:
            return None
        return TOKENS[token]

    def paged(self, items: list[dict[str, Any]], q: httpx.QueryParams) -> httpx.Response:
        limit = int(q.get("limit", "500"))
        if self.page_limit_cap:
            limit = min(limit, self.page_limit_cap)
        start = int(q.get("cursor") or 0)
        chunk = items[start : start + limit]
        more = start + limit < len(items)
        return ok({"items": chunk, "next_cursor": str(start + limit) if more else None})

    def host(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "hostname": self.hostname,
            "agent_version": "0.3.0",
            "kernel": {"release": self.kernel, "rmdir_deletes_subvolumes": False},
            "btrfs_progs_version": "4.4.1",
            "docker": {
                "server_version": "20.10.3",
                "api_version": "1.41",
                "storage_driver": "btrfs",
                "data_root": ROOT,
            },
            "roots": [ROOT],
        }
        if self.extra_fields:
            body["uptime_seconds"] = 5
            body["kernel"]["arch"] = "x86_64"
        return body

    def filesystem(self) -> dict[str, Any]:
        return {
            "uuid": UUID,
            "label": "volume1",
            "mountpoints": ["/volume1"],
            "size_bytes": 1 << 40,
            "used_bytes": 1 << 39,
            "free_bytes": 1 << 39,
            "quota_enabled": True,
        }

    # -- clean -----------------------------------------------------------------------

    def delete_subvolume(self, sid: int, dry_run: bool) -> httpx.Response:
        s = self.subvols.get(sid)
        if s is None:
            return problem(404, "not_found", f"no subvolume {sid}")
        if sid == 5 or s.owner == "docker-layer":
            seq = self.log("delete_subvolume", s.path, "refused", {"code": "protected"})
            return problem(409, "protected", f"subvolume {sid} is protected (audit {seq})")
        if not dry_run:
            del self.subvols[sid]
        seq = self.log("delete_subvolume", s.path, "dry_run" if dry_run else "done", {})
        return ok(
            {
                "dry_run": dry_run,
                "deleted": [{"id": sid, "path": s.path}],
                "reclaimable_bytes": s.exclusive_bytes,
                "audit_seq": seq,
            }
        )

    def delete_volume(self, name: str, dry_run: bool) -> httpx.Response:
        v = self.volumes.get(name)
        if v is None:
            return problem(404, "not_found", f"no volume {name}")
        if v.in_use_by:
            self.log("delete_volume", name, "refused", {"code": "in_use"})
            return problem(409, "in_use", f"volume {name} is used by {v.in_use_by[0]}")
        deleted = [{"id": i, "path": self.subvols[i].path} for i in reversed(v.subvolumes)]
        if not dry_run:
            self.remove_volume(name)
        seq = self.log("delete_volume", name, "dry_run" if dry_run else "done", {})
        return ok(
            {
                "dry_run": dry_run,
                "deleted": deleted,
                "reclaimable_bytes": v.exclusive_bytes,
                "audit_seq": seq,
                "volume": name,
            }
        )

    def remove_volume(self, name: str) -> None:
        v = self.volumes.pop(name)
        for i in v.subvolumes:
            self.subvols.pop(i, None)

    def create_plan(self, body: dict[str, Any]) -> httpx.Response:
        kinds = body.get("kinds", ["dind-volume", "orphan-layer"])
        min_age = body.get("min_age_seconds", 86400)
        protect = body.get("protect_labels", ["keep", "nas-janitor.keep"])
        if not isinstance(min_age, int) or min_age < 0:
            return problem(
                422, "validation_failed", "bad request", errors={"min_age_seconds": ["bad"]}
            )
        actions, skipped = [], []
        for f in self.findings():
            if f["kind"] not in kinds:
                continue
            vol = self.volumes.get(f["target"]["name"] or "")
            if f["blocked_by"]:
                skipped.append({"finding_id": f["id"], "reason": "; ".join(f["blocked_by"])})
            elif (f["age_seconds"] or 0) < min_age:
                skipped.append({"finding_id": f["id"], "reason": "younger than min_age_seconds"})
            elif vol is not None and any(k in vol.labels for k in protect):
                skipped.append({"finding_id": f["id"], "reason": "protected by label"})
            else:
                actions.append(
                    {
                        "seq": len(actions) + 1,
                        "finding_id": f["id"],
                        "op": "remove_volume" if vol is not None else "delete_subvolumes",
                        "target": f["target"],
                        "subvolume_ids": vol.subvolumes if vol else [f["target"]["id"]],
                        "reclaimable_bytes": f["reclaimable_bytes"],
                    }
                )
        pid = f"p{next(self._plan_ids)}"
        plan = {
            "id": pid,
            "created_at": "2024-05-01T12:00:00Z",
            "expires_at": "2024-05-01T13:00:00Z",
            "actions": actions,
            "skipped": skipped,
            "reclaimable_bytes": sum(a["reclaimable_bytes"] or 0 for a in actions),
        }
        self.plans[pid] = plan
        self.log("plan", pid, "done", {"actions": len(actions)})
        return ok(plan, status=201)

    def apply(self, pid: str, key: str | None) -> httpx.Response:
        if pid not in self.plans:
            return problem(404, "not_found", f"no plan {pid}")
        if pid in self.expired:
            return problem(409, "plan_expired", f"plan {pid} expired")
        jid = self.job_of_plan.get(pid) or (self.job_of_key.get(key) if key else None)
        if jid is None:
            jid = f"j{next(self._job_ids)}"
            self.jobs[jid] = {
                "id": jid,
                "plan_id": pid,
                "state": "queued",
                "progress": {"done": 0, "total": len(self.plans[pid]["actions"])},
                "results": [],
                "reclaimed_bytes": 0,
                "started_at": None,
                "finished_at": None,
            }
            self.job_of_plan[pid] = jid
            if key:
                self.job_of_key[key] = jid
            self.log("apply", pid, "started", {"job": jid})
        return ok(
            {"job_id": jid, "plan_id": pid}, status=202, headers={"Location": f"/v1/jobs/{jid}"}
        )

    def step(self, jid: str) -> None:
        """One action per look at the job."""
        job = self.jobs[jid]
        if job["state"] in ("succeeded", "partial", "failed", "interrupted"):
            self._free(job)
            return
        if self.jobs_stuck:
            return
        if job["state"] == "queued":
            job["state"], job["started_at"] = "running", "2024-05-01T12:00:01Z"
            return
        actions = self.plans[job["plan_id"]]["actions"]
        done = job["progress"]["done"]
        if done < len(actions):
            a = actions[done]
            result = self.run_action(a)
            job["results"].append(result)
            job["reclaimed_bytes"] += result["reclaimed_bytes"] or 0
            job["progress"]["done"] = done + 1
        if job["progress"]["done"] == len(actions):
            outcomes = {r["outcome"] for r in job["results"]}
            if "failed" in outcomes:
                job["state"] = "partial" if outcomes - {"failed"} else "failed"
            else:
                job["state"] = "succeeded"
            job["finished_at"] = "2024-05-01T12:00:09Z"
            job["looks_to_free"] = self.freed_after_looks
            self._free(job)

    def _free(self, job: dict[str, Any]) -> None:
        """The kernel frees the space a look at a time."""
        looks = job.get("looks_to_free")
        if looks is None:
            job.pop("pending_bytes", None)
            return
        job["pending_bytes"] = job["reclaimed_bytes"] if looks > 0 else 0
        job["looks_to_free"] = looks - 1

    def run_action(self, a: dict[str, Any]) -> dict[str, Any]:
        name = a["target"]["name"]
        if a["finding_id"] in self.fail_targets:
            self.log("apply_action", a["finding_id"], "failed", {})
            return {
                "seq": a["seq"],
                "outcome": "failed",
                "detail": "btrfs: Read-only file system",
                "reclaimed_bytes": None,
            }
        gone = (name and name not in self.volumes) or (
            not name and a["target"]["id"] not in self.subvols
        )
        if gone:
            return {
                "seq": a["seq"],
                "outcome": "skipped",
                "detail": "gone",
                "reclaimed_bytes": None,
            }
        if name:
            self.remove_volume(name)
        else:
            del self.subvols[a["target"]["id"]]
        self.log("apply_action", a["finding_id"], "done", {})
        return {
            "seq": a["seq"],
            "outcome": "deleted",
            "detail": "deleted",
            "reclaimed_bytes": a["reclaimable_bytes"],
        }


def ok(body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers)


def problem(
    status: int, code: str, detail: str, *, www: bool = False, errors: Any = None
) -> httpx.Response:
    body: dict[str, Any] = {
        "type": f"https://nas-janitor.invalid/problems/{code}",
        "title": code.replace("_", " "),
        "status": status,
        "detail": detail,
        "code": code,
    }
    if errors is not None:
        body["errors"] = errors
    headers = {"Content-Type": "application/problem+json"}
    if www:
        headers["WWW-Authenticate"] = "Bearer"
    return httpx.Response(status, content=json.dumps(body).encode(), headers=headers)


def leaky_agent(hostname: str = "nas1") -> FakeAgent:
    """An agent with what a CI runner leaves behind: two dind volumes (one in use), a
    dangling volume and an orphaned layer."""
    agent = FakeAgent(hostname=hostname)
    agent.add_subvolume(f"{ROOT}", owner="other")
    agent.add_subvolume(f"{ROOT}/btrfs/subvolumes/layer1", owner="docker-layer")
    agent.add_dind_volume("ci-old", nested=3, exclusive_bytes=3 << 30)
    agent.add_dind_volume("ci-busy", nested=2, in_use_by=["c0ffee"])
    agent.add_dind_volume("empty", nested=0, exclusive_bytes=0)
    agent.add_orphan_layer("deadbeef")
    return agent
