"""Nightly runs of the CronJob, one pod after another, with the volumes the manifests
give them: each run sees the history of the runs before it, and an audit log rewritten
between two runs is caught.

No cluster runs here; what a pod sees is emulated, honestly, from the manifests
themselves: a folder per run stands for the pod's file system, and each volume the
CronJob mounts is a folder at its mount path in it: a configMap volume holds the
ConfigMap's keys, a secret volume is written as the kubelet writes one (defaultMode,
fsGroup), a persistentVolumeClaim is one folder per claim that every run gets (what a
bound claim is), an emptyDir a fresh folder per run. janitorctl runs in-process with
the CronJob's own command line, its absolute paths taken into the run's folder, against
the real agent app (over the stateful fakes) through httpx's WSGITransport; the agent
keeps its state directory from run to run, as a NAS does.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import httpx
import pytest
import yaml

from controller.cli import main
from controller.store import Store
from shared import auditchain

try:  # the agent's tests moved into rooms (tests/agent/http/) on main meanwhile
    from tests.agent.http.apphelpers import BOTH, AgentUnderTest, build
except ImportError:
    from tests.agent.apphelpers import BOTH, AgentUnderTest, build  # type: ignore[no-redef]
from tests.deploy.test_k8s_manifests import (
    cronjob_container,
    secret_volume_as_kubelet_makes_it,
    the_object,
)


@dataclass
class Pod:
    """One run's pod: its root folder and where each mount path is in it."""

    root: Path
    mounts: dict[PurePosixPath, Path]

    def path(self, in_pod: str) -> Path:
        """Where a path of the pod's file system is here (its deepest mount's folder)."""
        pure = PurePosixPath(in_pod)
        for mount in sorted(self.mounts, key=lambda m: len(m.parts), reverse=True):
            if pure == mount or mount in pure.parents:
                return self.mounts[mount] / pure.relative_to(mount)
        raise AssertionError(f"{in_pod} is on no volume of the pod (read-only root)")


class Cluster:
    """The node's folders: claims outlive pods, everything else is per pod."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.claims = base / "claims"
        self.pods = 0

    def new_pod(self, tokens: dict[str, str]) -> Pod:
        self.pods += 1
        root = self.base / f"pod-{self.pods}"
        spec = the_object("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        fs_group = spec["securityContext"].get("fsGroup")
        mounts: dict[PurePosixPath, Path] = {}
        for n, m in enumerate(cronjob_container()["volumeMounts"]):
            volume = volumes[m["name"]]
            if "persistentVolumeClaim" in volume:
                folder = self.claims / volume["persistentVolumeClaim"]["claimName"]
                folder.mkdir(parents=True, exist_ok=True)
            else:
                folder = root / "volumes" / f"{n}-{m['name']}"
                if "configMap" in volume:
                    data = the_object("ConfigMap")
                    assert data["metadata"]["name"] == volume["configMap"]["name"]
                    folder.mkdir(parents=True)
                    for key, text in data["data"].items():
                        (folder / key).write_text(text)
                elif "secret" in volume:
                    secret_volume_as_kubelet_makes_it(
                        folder,
                        tokens,
                        default_mode=volume["secret"].get("defaultMode", 0o644),
                        fs_group=fs_group,
                    )
                elif "emptyDir" in volume:
                    folder.mkdir(parents=True)
                else:
                    raise AssertionError(f"a volume this emulation does not know: {volume}")
            mounts[PurePosixPath(m["mountPath"])] = folder
        # A volume mounted inside another (tokens inside the fleet's folder) is seen there.
        for mount, folder in mounts.items():
            for parent, outer in mounts.items():
                if parent in mount.parents:
                    link = outer / mount.relative_to(parent)
                    if not link.exists():
                        link.symlink_to(folder, target_is_directory=True)
        return Pod(root, mounts)


def rewrite_fleet_paths(pod: Pod, fleet_in_pod: str) -> Path:
    """The fleet file with its absolute paths (the store's) taken into the pod's folder,
    as the pod sees them."""
    path = pod.path(fleet_in_pod)
    data = yaml.safe_load(path.read_text())
    store = data.get("store")
    if store and store.startswith("/"):
        data["store"] = str(pod.path(store))
    local = path.with_name("fleet.local.yaml")  # the configMap folder is ours to write
    local.write_text(yaml.safe_dump(data))
    return local


def run_the_cronjob(pod: Pod, agent: AgentUnderTest) -> tuple[int, str, str]:
    """The CronJob's command line in the pod, janitorctl in-process; (exit, out, err)."""
    container = cronjob_container()
    argv = [*container.get("command", []), *container.get("args", [])]
    assert argv[0] == "janitorctl"
    args = list(argv[1:])
    at = args.index("--fleet") + 1
    args[at] = str(rewrite_fleet_paths(pod, args[at]))
    return run_janitorctl(args, agent)


def run_janitorctl(args: list[str], agent: AgentUnderTest) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(
            [*args, "--json"],
            environ={},
            transport_factory=lambda spec: httpx.WSGITransport(app=agent.app),
        )
    return code, out.getvalue(), err.getvalue()


def forge_audit_log(state_dir: Path) -> int:
    """Rewrite the agent's audit log the way someone with write access to the agent's
    state directory can: entry 1 changed, every hash after it and the head record made
    to match, and the head the agent remembers (the state store's audit mark) moved to
    the forged one, so that the agent's own checks still pass. Returns the number of
    entries."""
    with sqlite3.connect(state_dir / "audit.db") as db:
        rows = db.execute(
            "SELECT seq, at, actor, action, target, outcome, detail FROM audit ORDER BY seq"
        ).fetchall()
        prev = auditchain.GENESIS
        for seq, at, actor, action, target, outcome, detail in rows:
            if seq == 1:
                target = "something else"
            digest = auditchain.entry_hash(
                seq=seq,
                at=at,
                actor=actor,
                action=action,
                target=target,
                outcome=outcome,
                detail=json.loads(detail),
                prev_hash=prev,
            )
            db.execute(
                "UPDATE audit SET target = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                (target, prev, digest, seq),
            )
            prev = digest
        db.execute("UPDATE audit_head SET seq = ?, hash = ?", (len(rows), prev))
    with sqlite3.connect(state_dir / "state.db") as db:
        db.execute("UPDATE audit_mark SET seq = ?, hash = ?", (len(rows), prev))
    return len(rows)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentUnderTest]:
    yield build(tmp_path / "nas1-state")


def test_runs_share_their_history_and_a_rewritten_audit_is_caught(
    tmp_path: Path, agent: AgentUnderTest
) -> None:
    cluster = Cluster(tmp_path / "node")
    fleet_keys = yaml.safe_load(the_object("ConfigMap")["data"]["fleet.yaml"])
    tokens = {Path(a["token_file"]).name: BOTH + "\n" for a in fleet_keys["agents"]}
    assert list(tokens) == ["nas1"]  # the ConfigMap's agent: the app in-process here

    first = cluster.new_pod(tokens)
    code, out, err = run_the_cronjob(first, agent)
    assert code == 0, err
    one = json.loads(out)
    assert one["run"] == 1
    (nas1,) = one["agents"]
    assert nas1["agent"] == "nas1" and nas1["reachable"] and nas1["audit_ok"] is True

    # The next night: a new pod; the agent restarted in between, on its state.
    agent = agent.restart()
    second = cluster.new_pod(tokens)
    assert second.root != first.root
    code, out, err = run_the_cronjob(second, agent)
    assert code == 0, err
    assert json.loads(out)["run"] == 2  # it sees the first run: the store is the same
    store_path = second.path(fleet_keys["store"])
    code, out, err = run_janitorctl(["--store", str(store_path), "report", "--by", "run"], agent)
    assert code == 0, err
    runs = [r for r in json.loads(out)["rows"] if r["agent"] == "nas1"]
    assert [r["period"].split("#")[1] for r in runs] == ["1", "2"]
    with Store.open(store_path) as store:
        kept = store.audit_state("nas1").last_seq
    assert kept > 0

    # Someone with write access to the agent's audit database rewrites its history
    # consistently: the agent's own check passes, only what the store kept can tell.
    count = forge_audit_log(agent.state_dir)
    agent = agent.restart()
    verify = agent.get("/v1/audit/verify").get_json()
    assert verify["ok"] is True and verify["count"] == count >= kept

    third = cluster.new_pod(tokens)
    code, out, err = run_the_cronjob(third, agent)
    assert code == 1, (out, err)
    result = json.loads(out)
    assert result["run"] == 3
    (nas1,) = result["agents"]
    assert nas1["audit_ok"] is False
    assert "nas1: audit rewritten" in err
    with Store.open(store_path) as store:
        events = [e for e in store.audit_events("nas1") if e.kind == "rewritten"]
    assert events and "history rewritten" in events[-1].detail
