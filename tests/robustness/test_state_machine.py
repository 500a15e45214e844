"""A Hypothesis state machine over the real agent app and the stateful fakes.

Rules: plan, apply (with and without an Idempotency-Key, replayed), direct deletes of
any subvolume or volume (dry and real, protected and in-use ones included), restart (a
new app on the same state directory and the same fake NAS), and changes to the world
(a container starts using a volume, a volume is labelled keep=true, a subvolume is
written to so its generation moves, a container goes away, new leaks appear).

A model, computed from the fakes' state and not from the agent's code, says what may be
deleted at each moment. After every rule:

- nothing outside the roots, protected or in use was deleted; nothing was deleted by a
  dry run; a job deleted exactly the actions whose targets were still as planned;
- the read-only flags of everything that stayed are as they were;
- ``btrfs subvolume delete`` was never asked for the same path twice;
- every subvolume the agent deleted is in the audit log as deleted, and the audit log
  names nothing as deleted that still exists; ``/v1/audit/verify`` is ok;
- replaying an apply (same plan, same Idempotency-Key) gives the same answer, across
  restarts too; a key reused for another plan is a 409 naming the first job.
"""

from __future__ import annotations

import dataclasses
import itertools
import posixpath
import re
import tempfile
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from shared.policy import ORPHAN_MIN_AGE_FLOOR_SECONDS
from tests.agent.http.apphelpers import AgentUnderTest, auth, build
from tests.fakes import TOP_LEVEL, fake_hex, make_leak_scenario
from tests.robustness import knobs

DEFAULT_LABELS = ("keep", "nas-janitor.keep")
ANONYMOUS = re.compile(r"[0-9a-f]{64}")
EXTRA_LABEL = "precious"
KEYS = ("k-1", "k-2", "k-3")


FLOOR = timedelta(seconds=ORPHAN_MIN_AGE_FLOOR_SECONDS)


@dataclasses.dataclass(frozen=True)
class Sub:
    id: int
    path: str
    read_only: bool
    generation: int
    changed: datetime  # its creation, or the last name made, renamed or removed in it


@dataclasses.dataclass
class PlannedAction:
    seq: int
    op: str
    name: str | None  # volume name
    target_id: int | None  # subvolume id
    generations: dict[int, int]  # every subvolume it deletes, at plan time


@dataclasses.dataclass
class Plan:
    id: str
    labels: tuple[str, ...]
    actions: list[PlannedAction]


class World:
    """What the model reads from the fakes."""

    def __init__(self, agent: AgentUnderTest) -> None:
        self.sc = agent.sc

    @property
    def root(self) -> str:
        return self.sc.data_root

    def subs(self) -> dict[str, Sub]:
        fs = self.sc.btrfs.filesystem_at(self.sc.mount)
        out = {}
        for s in fs.subvolumes.values():
            if s.id == TOP_LEVEL:
                continue
            path = posixpath.join(self.sc.mount, s.path)
            out[path] = Sub(s.id, path, s.read_only, s.generation, s.changed_at or s.created_at)
        return out

    def volumes(self) -> dict[str, dict[str, str]]:
        return {n: dict(v.labels) for n, v in self.sc.docker.volumes_by_name.items()}

    def users(self, volume: str) -> list[str]:
        return [c.id for c in self.sc.docker.containers_by_id.values() if volume in c.volume_names]

    def volume_dir(self, name: str) -> str:
        return f"{self.root}/volumes/{name}"

    def subtree(self, path: str) -> dict[str, Sub]:
        return {p: s for p, s in self.subs().items() if p == path or p.startswith(path + "/")}

    def protected(self, labels: dict[str, str], keys: tuple[str, ...]) -> bool:
        # keep and nas-janitor.keep protect whatever the policy's own labels are
        return any(
            k in labels and labels[k].lower() not in ("false", "0", "no", "off")
            for k in (*DEFAULT_LABELS, *keys)
        )

    def volume_ok(self, name: str, keys: tuple[str, ...]) -> bool:
        labels = self.volumes().get(name)
        return labels is not None and not self.users(name) and not self.protected(labels, keys)

    def may_delete_subvolume(self, path: str, keys: tuple[str, ...] = DEFAULT_LABELS) -> bool:
        """The safety rules, restated over the fakes: under the root and not the root,
        not the top level or default subvolume, no mount point on or in it, not a layer
        Docker references nor inside one, not in a volume that is used or protected, not
        an orphan layer (or in one, or in one that) changed less than the agent's age
        floor ago."""
        fs = self.sc.btrfs.filesystem_at(self.sc.mount)
        sub = self.subs().get(path)
        if sub is None or not path.startswith(self.root + "/"):
            return False
        if sub.id == fs.default_id:
            return False
        mounts = [m.mountpoint for m in self.sc.btrfs.mounts()]
        if any(m == path or m.startswith(path + "/") for m in mounts):
            return False
        layers = self.sc.docker.layer_paths()
        layer_dir = f"{self.root}/btrfs/subvolumes/"
        if path.startswith(layer_dir):
            layer = layer_dir + path[len(layer_dir) :].split("/", 1)[0]
            if layer in layers:  # a layer Docker references, or inside one
                return False
            holder = self.subs().get(layer)
            for one in (sub, holder):
                if one is not None and self.sc.now - one.changed < FLOOR:
                    return False
        vols = f"{self.root}/volumes/"
        if path.startswith(vols):
            name = path[len(vols) :].split("/", 1)[0]
            if name in self.volumes() and not self.volume_ok(name, keys):
                return False
        return True

    def may_delete_tree(self, path: str, keys: tuple[str, ...] = DEFAULT_LABELS) -> bool:
        tree = self.subtree(path)
        return bool(tree) and all(self.may_delete_subvolume(p, keys) for p in tree)

    def may_remove_volume(self, name: str, keys: tuple[str, ...] = DEFAULT_LABELS) -> bool:
        if not self.volume_ok(name, keys):
            return False
        inside = self.subtree(self.volume_dir(name))
        if not inside and not ANONYMOUS.fullmatch(name):
            return False  # a named volume holding no subvolume is not a leftover
        return all(self.may_delete_subvolume(p, keys) for p in inside)


class AgentMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory(prefix="nj-machine-")
        self.agent = build(Path(self.tmp.name) / "state", make_leak_scenario())
        self.world = World(self.agent)
        self.plans: dict[str, Plan] = {}
        self.applied: dict[tuple[str, str | None], tuple[int, dict[str, Any]]] = {}
        self.key_owner: dict[str, tuple[str, str]] = {}  # key -> (plan id, job id)
        self.jobs: dict[str, dict[str, Any]] = {}  # finished jobs as last read
        self.deleted_by_agent: set[str] = set()
        self.audited_deleted: set[str] = set()
        self.audit_seq = 0
        self.counter = itertools.count(1)
        self.restarts = 0

    def teardown(self) -> None:
        self.tmp.cleanup()

    # -- helpers ---------------------------------------------------------------------------
    def call(self, method: str, url: str, **kw: Any) -> Any:
        headers = {**auth(), **kw.pop("headers", {})}
        return self.agent.client.open(url, method=method, headers=headers, **kw)

    def delete_calls(self) -> list[str]:
        return [p for args in self.agent.sc.btrfs.calls_to("subvolume delete") for p in args]

    def agent_step(self, fn: Any) -> tuple[dict[str, Sub], set[str], Any]:
        """Run an agent call; return the subvolumes before, the volumes gone, the result.
        Checks what every agent step must respect."""
        before = self.world.subs()
        vols_before = self.world.volumes()
        result = fn()
        after = self.world.subs()
        gone = set(before) - set(after)
        self.deleted_by_agent |= gone
        assert set(after) <= set(before), f"the agent made subvolumes: {set(after) - set(before)}"
        for path in after:  # what stayed keeps its read-only flag
            assert after[path].read_only == before[path].read_only, path
        vols_gone = set(vols_before) - set(self.world.volumes())
        for name, labels in self.world.volumes().items():
            assert labels == vols_before[name], name
        self.read_audit()
        return before, vols_gone, result

    def read_audit(self) -> None:
        while True:
            page = self.call("GET", f"/v1/audit?after_seq={self.audit_seq}&limit=1000")
            assert page.status_code == 200
            items = page.get_json()["items"]
            if not items:
                return
            for e in items:
                if e["outcome"] == "deleted":
                    for d in e["detail"].get("deleted") or []:
                        self.audited_deleted.add(d["path"] if isinstance(d, dict) else d)
            self.audit_seq = items[-1]["seq"]

    def wait_job(self, job_id: str) -> dict[str, Any]:
        self.agent.wait_job(job_id, 60)
        deadline = time.monotonic() + 60
        while True:
            job = self.call("GET", f"/v1/jobs/{job_id}").get_json()
            if job["state"] not in ("queued", "running"):
                return dict(job)
            assert time.monotonic() < deadline, job
            time.sleep(0.01)

    # -- plans and jobs -------------------------------------------------------------------
    @rule(
        min_age=st.sampled_from([0, 0, 86400]),
        kinds=st.sampled_from(
            [None, ["orphan-layer"], ["dind-volume"], ["dind-volume", "orphan-layer"]]
        ),
        extra_label=st.booleans(),
        pick=st.one_of(st.none(), st.lists(st.integers(0, 9), max_size=3)),
    )
    def plan(
        self, min_age: int, kinds: list[str] | None, extra_label: bool, pick: list[int] | None
    ) -> None:
        labels = DEFAULT_LABELS + ((EXTRA_LABEL,) if extra_label else ())
        body: dict[str, Any] = {"min_age_seconds": min_age, "protect_labels": list(labels)}
        if kinds is not None:
            body["kinds"] = kinds
        if pick is not None:
            found = self.call("GET", "/v1/findings?min_age_seconds=0").get_json()["items"]
            ids = [f["id"] for f in found]
            body["finding_ids"] = [ids[i % len(ids)] for i in pick] if ids else ["nope"]
        before = self.world.subs()
        r = self.call("POST", "/v1/plans", json=body)
        assert r.status_code == 201, r.get_json()
        assert self.world.subs() == before  # planning changes nothing
        plan = r.get_json()
        by_id = {s.id: s for s in before.values()}
        actions = []
        for a in plan["actions"]:
            gens = {i: by_id[i].generation for i in a["subvolume_ids"]}
            actions.append(
                PlannedAction(
                    seq=a["seq"],
                    op=a["op"],
                    name=a["target"]["name"] if a["op"] == "remove_volume" else None,
                    target_id=a["target"]["id"] if a["op"] == "delete_subvolumes" else None,
                    generations=gens,
                )
            )
            # a plan only proposes what may be deleted now
            if a["op"] == "remove_volume":
                assert self.world.may_remove_volume(a["target"]["name"], labels), a
            else:
                assert self.world.may_delete_tree(a["target"]["path"], labels), a
        self.plans[plan["id"]] = Plan(plan["id"], labels, actions)
        self.read_audit()

    def expected_outcomes(self, plan: Plan) -> dict[int, bool]:
        """For each action: will the job delete it (target still as planned and still
        allowed), judged from the world now."""
        subs = self.world.subs()
        by_id = {s.id: s for s in subs.values()}
        out = {}
        for a in plan.actions:
            if a.op == "remove_volume":
                assert a.name is not None
                now = self.world.subtree(self.world.volume_dir(a.name))
                ok = a.name in self.world.volumes() and self.world.may_remove_volume(
                    a.name, plan.labels
                )
            else:
                target = by_id.get(a.target_id or -1)
                now = self.world.subtree(target.path) if target else {}
                ok = target is not None and self.world.may_delete_tree(target.path, plan.labels)
            same = {s.id: s.generation for s in now.values()} == a.generations
            out[a.seq] = ok and same
        return out

    @precondition(lambda self: bool(self.plans))
    @rule(data=st.data(), key=st.sampled_from((None, *KEYS)))
    def apply(self, data: st.DataObject, key: str | None) -> None:
        plan = self.plans[data.draw(st.sampled_from(list(self.plans)))]  # made in this order
        headers = {"Idempotency-Key": key} if key else {}
        first_time = not any(p == plan.id for p, _ in self.applied)
        expected = self.expected_outcomes(plan) if first_time else {}

        def run() -> tuple[Any, dict[str, Any] | None]:
            r = self.call("POST", f"/v1/plans/{plan.id}/apply", headers=headers)
            job = self.wait_job(r.get_json()["job_id"]) if r.status_code == 202 else None
            return r, job

        before, vols_gone, (r, job) = self.agent_step(run)
        gone = set(before) - set(self.world.subs())
        if key is not None and key in self.key_owner and self.key_owner[key][0] != plan.id:
            # the key belongs to another plan: refused, nothing runs
            event("apply: key of another plan")
            assert r.status_code == 409, r.get_json()
            assert r.get_json()["job_id"] == self.key_owner[key][1]
            assert not gone and not vols_gone
            return
        assert r.status_code == 202, r.get_json()
        body = r.get_json()
        assert r.headers["Location"] == f"/v1/jobs/{body['job_id']}"
        earlier = next((b for (p, _), (_, b) in self.applied.items() if p == plan.id), None)
        if earlier is not None:  # the same plan again: the same job, nothing runs again
            assert body == earlier, (body, earlier)
            assert not gone and not vols_gone
        self.applied[(plan.id, key)] = (202, body)
        if key is not None:
            self.key_owner.setdefault(key, (plan.id, body["job_id"]))
        assert job is not None
        assert job["progress"] == {"done": len(plan.actions), "total": len(plan.actions)}
        if first_time:
            outcomes = {res["seq"]: res["outcome"] for res in job["results"]}
            # nothing done is said as such; anything deleted without a failure succeeded
            want_state = "succeeded" if "deleted" in outcomes.values() else "skipped"
            assert job["state"] == want_state, job
            event(f"job: {sorted(Counter(outcomes.values()).items())}")
            want = {seq: ("deleted" if ok else "skipped") for seq, ok in expected.items()}
            assert outcomes == want, (outcomes, want, job)
            # exactly the subvolumes of the actions it ran went, all of them allowed
            by_id = {s.id: p for p, s in before.items()}
            doomed = {by_id[i] for a in plan.actions if expected[a.seq] for i in a.generations}
            assert gone == doomed, (gone, doomed)
            names = {a.name for a in plan.actions if expected[a.seq] and a.name}
            assert vols_gone == names, (vols_gone, names)
        self.jobs[body["job_id"]] = job

    @precondition(lambda self: bool(self.applied))
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        """The same apply again (the same key, or none): the same answer."""
        (plan_id, key), (status, body) = data.draw(
            st.sampled_from(list(self.applied.items()))  # ids are random: keep the order made
        )
        headers = {"Idempotency-Key": key} if key else {}
        _, vols_gone, r = self.agent_step(
            lambda: self.call("POST", f"/v1/plans/{plan_id}/apply", headers=headers)
        )
        assert (r.status_code, r.get_json()) == (status, body)
        assert not vols_gone
        job = self.call("GET", f"/v1/jobs/{body['job_id']}").get_json()
        assert job == self.jobs[body["job_id"]]

    # -- direct deletes -------------------------------------------------------------------
    @rule(data=st.data(), dry=st.booleans())
    def delete_subvolume(self, data: st.DataObject, dry: bool) -> None:
        subs = self.world.subs()
        choices = [*sorted(s.id for s in subs.values()), TOP_LEVEL, 99999]
        sub_id = data.draw(st.sampled_from(choices))
        path = next((p for p, s in subs.items() if s.id == sub_id), None)
        allowed = path is not None and self.world.may_delete_tree(path)
        tree = set(self.world.subtree(path)) if path else set()
        calls = len(self.agent.sc.btrfs.calls)
        url = f"/v1/filesystems/{self.agent.sc.fs_uuid}/subvolumes/{sub_id}"
        _, vols_gone, r = self.agent_step(
            lambda: self.call("DELETE", url + ("" if dry else "?dry_run=false"))
        )
        gone = set(subs) - set(self.world.subs())
        assert not vols_gone
        if path is None:
            assert r.status_code in (404, 409), r.get_json()
        elif not allowed:
            assert r.status_code == 409, (path, r.get_json())
        else:
            assert r.status_code == 200, (path, r.get_json())
            body = r.get_json()
            assert {d["path"] for d in body["deleted"]} == tree
            assert body["dry_run"] is dry
        event(f"delete subvolume: {'dry' if dry else 'real'} {r.status_code}")
        if dry or r.status_code != 200:
            assert not gone, gone
            ops = {c.op for c in self.agent.sc.btrfs.calls[calls:]}
            assert not ops & {"subvolume delete", "property set ro"}, ops
        else:
            assert gone == tree

    @rule(data=st.data(), dry=st.booleans())
    def delete_volume(self, data: st.DataObject, dry: bool) -> None:
        names = [*sorted(self.world.volumes()), "no-such-volume"]
        name = data.draw(st.sampled_from(names))
        exists = name in self.world.volumes()
        allowed = exists and self.world.may_remove_volume(name)
        tree = set(self.world.subtree(self.world.volume_dir(name))) if exists else set()
        before = self.world.subs()
        url = f"/v1/volumes/{name}" + ("" if dry else "?dry_run=false")
        _, vols_gone, r = self.agent_step(lambda: self.call("DELETE", url))
        gone = set(before) - set(self.world.subs())
        event(f"delete volume: {'dry' if dry else 'real'} {r.status_code}")
        if not exists:
            assert r.status_code == 404
        elif not allowed:
            assert r.status_code == 409, (name, r.get_json())
        else:
            assert r.status_code == 200, (name, r.get_json())
            assert {d["path"] for d in r.get_json()["deleted"]} == tree
        if dry or r.status_code != 200:
            assert not gone and not vols_gone
        else:
            assert gone == tree and vols_gone == {name}

    # -- restart ---------------------------------------------------------------------------
    @rule()
    def restart(self) -> None:
        jobs = {j: self.call("GET", f"/v1/jobs/{j}").get_json() for j in self.jobs}
        head = self.call("GET", "/v1/audit/verify").get_json()
        self.agent = self.agent.restart()
        self.restarts += 1
        for j, body in jobs.items():  # jobs read the same after a restart
            assert self.call("GET", f"/v1/jobs/{j}").get_json() == body
        again = self.call("GET", "/v1/audit/verify").get_json()
        assert again == head  # no job was cut short: nothing to mark interrupted
        for plan_id in self.plans:
            assert self.call("GET", f"/v1/plans/{plan_id}").status_code == 200

    # -- the world changes -------------------------------------------------------------------
    @precondition(lambda self: bool(self.world.volumes()))
    @rule(data=st.data(), running=st.booleans())
    def container_uses_a_volume(self, data: st.DataObject, running: bool) -> None:
        name = data.draw(st.sampled_from(sorted(self.world.volumes())))
        self.agent.sc.docker.add_container(
            f"c{next(self.counter)}", image=self.agent.sc.image, running=running, volumes=[name]
        )

    @precondition(lambda self: len(self.agent.sc.docker.containers_by_id) > 0)
    @rule(data=st.data())
    def container_goes_away(self, data: st.DataObject) -> None:
        cid = data.draw(st.sampled_from(sorted(self.agent.sc.docker.containers_by_id)))
        self.agent.sc.docker.remove_container(cid)

    @precondition(lambda self: bool(self.world.volumes()))
    @rule(data=st.data(), label=st.sampled_from(["keep", "nas-janitor.keep", EXTRA_LABEL]))
    def label_a_volume(self, data: st.DataObject, label: str) -> None:
        docker = self.agent.sc.docker
        name = data.draw(st.sampled_from(sorted(self.world.volumes())))
        record = docker.volumes_by_name[name]
        docker.volumes_by_name[name] = dataclasses.replace(
            record, labels={**record.labels, label: "true"}
        )

    @rule(data=st.data())
    def write_into_a_subvolume(self, data: st.DataObject) -> None:
        path = data.draw(st.sampled_from(sorted(self.world.subs())))
        self.agent.sc.btrfs.touch(path, add_bytes=4096)

    @rule(nested=st.booleans(), read_only=st.booleans(), old=st.booleans())
    def new_orphan_layer(self, nested: bool, read_only: bool, old: bool) -> None:
        """An orphan layer made now (younger than the agent's floor: Docker may be
        writing it) or two hours ago (a name made in it later moves its change time)."""
        btrfs = self.agent.sc.btrfs
        path = (
            f"{self.world.root}/btrfs/subvolumes/{fake_hex('machine-orphan', next(self.counter))}"
        )
        made = self.agent.sc.now - timedelta(hours=2) if old else None
        btrfs.create_subvolume(path, exclusive_bytes=64 * 1024, created_at=made)
        if nested:
            btrfs.create_subvolume(f"{path}/inner", created_at=made)
        if read_only:
            btrfs.set_readonly(path, True)

    @rule(layers=st.integers(1, 3), read_only_parent=st.booleans())
    def new_dind_volume(self, layers: int, read_only_parent: bool) -> None:
        sc = self.agent.sc
        volume = sc.docker.add_volume()
        inner = f"{volume.mountpoint}/btrfs/subvolumes"
        n = next(self.counter)
        for i in range(layers):
            sc.btrfs.create_subvolume(
                f"{inner}/{fake_hex('machine-layer', n, i)}", read_only=i == 0
            )
        if read_only_parent:
            sc.btrfs.create_subvolume(f"{volume.mountpoint}/ro")
            sc.btrfs.create_subvolume(f"{volume.mountpoint}/ro/child")
            sc.btrfs.set_readonly(f"{volume.mountpoint}/ro", True)

    @precondition(lambda self: bool(self.world.volumes()))
    @rule(data=st.data())
    def new_subvolume_in_a_volume(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.world.volumes())))
        mountpoint = self.agent.sc.docker.volumes_by_name[name].mountpoint
        path = f"{mountpoint}/late-{next(self.counter)}"
        if self.agent.sc.btrfs.exists(posixpath.dirname(path)):
            self.agent.sc.btrfs.create_subvolume(path)

    @rule()
    def new_share_outside_the_root(self) -> None:
        self.agent.sc.btrfs.create_subvolume(f"/volume1/share-{next(self.counter)}")

    # -- invariants ------------------------------------------------------------------------
    @invariant()
    def audit_chain_holds(self) -> None:
        verify = self.call("GET", "/v1/audit/verify").get_json()
        assert verify["ok"] is True, verify

    @invariant()
    def every_delete_is_audited_and_only_once(self) -> None:
        self.read_audit()
        assert self.deleted_by_agent == self.audited_deleted, (
            self.deleted_by_agent ^ self.audited_deleted
        )
        counts = Counter(self.delete_calls())
        assert all(n == 1 for n in counts.values()), [p for p, n in counts.items() if n > 1]

    @invariant()
    def never_outside_the_root_nor_the_root(self) -> None:
        subs = self.world.subs()
        assert self.agent.sc.data_root in subs
        assert self.agent.sc.share in subs
        assert all(p.startswith(self.agent.sc.data_root + "/") for p in self.deleted_by_agent)
        for layer in self.agent.sc.docker.layer_paths():
            assert layer in subs, layer


AgentMachine.TestCase.settings = settings(
    max_examples=knobs.MACHINE_EXAMPLES,
    stateful_step_count=knobs.MACHINE_STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    derandomize=not knobs.LONG,
    print_blob=True,
)
TestAgentStateMachine = AgentMachine.TestCase
