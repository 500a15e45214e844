"""On the real lab: a delete's scoped snapshot (real tree searches of only what the
delete touches) decides every volume and every subvolume exactly as a full snapshot
does, with a nested subvolume bind-mounted elsewhere, a process working inside another
volume's subvolume, and other subvolumes beside them."""

from __future__ import annotations

import secrets
import subprocess
from functools import partial
from pathlib import Path

import pytest

from agent.domain.safety import plan_subvolume_delete, plan_volume_delete
from agent.domain.snapshot import Scope
from bench.common import make_subvolumes
from lab import Lab
from shared.policy import DEFAULT_PROTECT_LABELS
from tests.agent.domain.test_scoped_snapshot import decision
from tests.agent.http.apphelpers import real_inventory

pytestmark = pytest.mark.lab


def test_scoped_and_full_snapshots_decide_alike_on_the_lab(lab: Lab, tmp_path: Path) -> None:
    bound = lab.seed_dind_volume()
    held = lab.seed_dind_volume()
    plain = lab.seed_dind_volume()
    make_subvolumes(lab.mnt / f"others-{secrets.token_hex(3)}" / f"s{i}" for i in range(40))
    at = lab.root / f"bound-{secrets.token_hex(3)}"
    at.mkdir()
    subprocess.run(["mount", "--bind", str(bound.ro_parent_child), str(at)], check=True)
    sleeper = subprocess.Popen(["sleep", "600"], cwd=held.inner_container_subvolumes[0])
    inv = real_inventory(tmp_path / "state", lab.docker_host, orphan_min_age_seconds=0)
    try:
        full = inv.fresh_snapshot()
        names = list(full.volumes)
        assert {bound.volume, held.volume, plain.volume} <= set(names)
        outcomes = {}
        labels = DEFAULT_PROTECT_LABELS
        for name in names:
            scoped = inv.fresh_snapshot(scope=Scope(volume=name))
            got = decision(partial(plan_volume_delete, scoped, name, protect_labels=labels))
            want = decision(partial(plan_volume_delete, full, name, protect_labels=labels))
            assert got == want, name
            outcomes[name] = got
        assert outcomes[plain.volume][0] == "delete"
        assert outcomes[bound.volume][:2] == ("refused", "Protected")
        assert "mounted elsewhere" in outcomes[bound.volume][2]
        assert outcomes[held.volume][:2] == ("refused", "HeldByProcess")
        listed = sum(len(s) for s in full.subvolumes.values())
        scoped_plain = inv.fresh_snapshot(scope=Scope(volume=plain.volume))
        assert sum(len(s) for s in scoped_plain.subvolumes.values()) < listed / 4
        for uuid, subs in full.subvolumes.items():
            for sid in subs:
                scoped = inv.fresh_snapshot(scope=Scope(fs_uuid=uuid, ids=(sid,)))
                kw = {"protect_labels": labels, "orphan_floor": 0}
                got = decision(partial(plan_subvolume_delete, scoped, uuid, sid, **kw))
                want = decision(partial(plan_subvolume_delete, full, uuid, sid, **kw))
                assert got == want, (sid, subs[sid].path)
    finally:
        inv.watch.stop()
        sleeper.kill()
        sleeper.wait()
        subprocess.run(["umount", str(at)], check=True)
