"""Snapshots and findings of the stateful fakes for the domain's unit tests, on the
fakes' own clock (moved with ``advance``), and a scene with a finding of every kind."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from agent.domain.findings import Finding, compute_findings
from agent.domain.inventory import Inventory
from agent.domain.snapshot import Snapshot
from tests.agent.http.apphelpers import agent_config
from tests.fakes import FakeSubvolume, LeakScenario, fake_hex, make_leak_scenario


def snapshot(sc: LeakScenario, tmp_path: Path, **cfg: Any) -> Snapshot:
    """A snapshot of the fakes taken at the fakes' clock."""
    inv = Inventory(
        agent_config(tmp_path, **cfg),
        btrfs=sc.btrfs,
        docker=sc.docker,
        clock=lambda: sc.btrfs.now,
    )
    return inv.take()


def findings(snap: Snapshot, sc: LeakScenario, **kw: Any) -> list[Finding]:
    """``compute_findings`` at the snapshot's time, the kernel's rmdir as the fake's."""
    kw.setdefault("created_at", {})
    return compute_findings(
        snap,
        now=snap.taken_at,
        rmdir_deletes_subvolumes=sc.btrfs.rmdir_deletes_subvolumes(),
        **kw,
    )


def advance(sc: LeakScenario, by: timedelta) -> None:
    """Time passes for both fakes."""
    sc.btrfs.now += by
    sc.docker.now = sc.btrfs.now


def subvolume(sc: LeakScenario, path: str) -> FakeSubvolume:
    """The fake's live subvolume at local ``path`` (which must be one)."""
    sub = sc.btrfs.subvolume(path)
    assert sub is not None, path
    return sub


def sub_id(sc: LeakScenario, path: str) -> int:
    return subvolume(sc, path).id


def generation(sc: LeakScenario, path: str) -> int:
    return subvolume(sc, path).generation


def of_kind(found: Sequence[Finding], kind: str) -> list[Finding]:
    return [f for f in found if f.kind == kind]


def about(found: Sequence[Finding], name: str | None = None, path: str | None = None) -> Finding:
    """The one finding whose target has that name (or that path)."""
    hits = [
        f
        for f in found
        if (name is not None and f.target.name == name)
        or (path is not None and f.target.path == path)
    ]
    assert len(hits) == 1, (name, path, [f.target for f in found])
    return hits[0]


def replace_with_folder(sc: LeakScenario, path: str) -> None:
    """What copying a data root to another volume (``cp -a``, ``rsync``) makes of the
    layer subvolume at ``path``: a plain folder of the same name."""
    sc.btrfs.destroy(path)
    sc.btrfs.make_dirs(f"{path}/etc")


@dataclass(frozen=True)
class EveryKind:
    """``make_leak_scenario`` on Synology's kernel with a finding of every kind, all
    two hours old (older than the orphan floor, younger than the default minimum age)."""

    sc: LeakScenario
    dangling_volume: str  # anonymous, holds no subvolume
    named_dind: str  # a named volume holding a subvolume
    kept_dind: str  # labelled keep=true, holding a subvolume: blocked
    loose_folder: str  # a plain folder in btrfs/subvolumes/ no layer references
    layer_folder: str  # an image layer's subvolume turned into a plain folder
    stale_qgroup: int  # the level-0 qgroup that layer's subvolume left behind


def every_kind() -> EveryKind:
    sc = make_leak_scenario(kernel="4.4.302+")
    layer_dir = f"{sc.data_root}/btrfs/subvolumes"
    dangling = sc.docker.add_volume()
    named = sc.docker.add_volume("ci-cache")
    sc.btrfs.create_subvolume(f"{named.mountpoint}/btrfs/subvolumes/{fake_hex('ci')}")
    kept = sc.docker.add_volume("kept-cache", labels={"keep": "true"})
    sc.btrfs.create_subvolume(f"{kept.mountpoint}/btrfs/subvolumes/{fake_hex('kept')}")
    loose = f"{layer_dir}/{fake_hex('copied')}"
    sc.btrfs.make_dirs(f"{loose}/etc")
    layer = sc.image_layers[1]
    stale = sub_id(sc, layer)
    replace_with_folder(sc, layer)
    advance(sc, timedelta(hours=2))
    return EveryKind(
        sc=sc,
        dangling_volume=dangling.name,
        named_dind=named.name,
        kept_dind=kept.name,
        loose_folder=loose,
        layer_folder=layer,
        stale_qgroup=stale,
    )
