"""Direct deletes over the stateful fakes: what a DELETE reads from the host."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import BtrfsUnavailable, Refused
from agent.runtime import Backends, Runtime, build_runtime
from tests.agent.http.apphelpers import agent_config
from tests.fakes import LeakScenario, make_leak_scenario


@pytest.fixture
def sc() -> LeakScenario:
    return make_leak_scenario()


@pytest.fixture
def rt(sc: LeakScenario, tmp_path: Path) -> Iterator[Runtime]:
    runtime = build_runtime(agent_config(tmp_path), backends=Backends(sc.btrfs, sc.docker))
    yield runtime
    runtime.inventory.watch.stop()


def listings(sc: LeakScenario) -> int:
    """Listings of subvolumes: the whole filesystem's, or a delete's scope."""
    return len(sc.btrfs.calls_to("tree search")) + len(sc.btrfs.calls_to("tree search scope"))


def full_listings(sc: LeakScenario) -> int:
    return len(sc.btrfs.calls_to("tree search"))


def test_a_volume_delete_decides_on_one_fresh_snapshot(rt: Runtime, sc: LeakScenario) -> None:
    """The volume's filesystem is the one the agent knows: its lock is taken first and
    the delete decides once, under it (not once without the lock and again under it)."""
    rt.inventory.current()  # the agent has looked at the host before
    before = listings(sc)
    answer = rt.deletes.volume(sc.dind_volume, dry_run=False, actor="test")
    assert answer.volume == sc.dind_volume and answer.deleted
    assert listings(sc) - before == 1
    assert sc.docker.volume(sc.dind_volume) is None


def test_a_delete_lists_only_what_it_touches(rt: Runtime, sc: LeakScenario) -> None:
    """Neither delete walks the whole filesystem's subvolumes, and neither starts a
    btrfs process to decide (the default subvolume is read by tree search too)."""
    rt.inventory.current()
    full, processes = full_listings(sc), len(sc.btrfs.calls)
    sid = sc.btrfs.subvolume(sc.orphan_layer)
    assert sid is not None
    rt.deletes.volume(sc.dind_volume, dry_run=True, actor="test")
    with contextlib.suppress(Refused):  # too young, maybe: decided all the same
        rt.deletes.subvolume(sc.fs_uuid, sid.id, dry_run=True, actor="test")
    assert full_listings(sc) == full
    ops = {c.op for c in sc.btrfs.calls[processes:]}
    assert ops <= {"tree search scope", "tree search quota"}, ops


def test_the_first_volume_delete_of_a_fresh_agent_still_decides_under_the_lock(
    rt: Runtime, sc: LeakScenario
) -> None:
    """Nothing known yet: decide to learn the filesystem, then again under its lock."""
    answer = rt.deletes.volume(sc.dind_volume, dry_run=False, actor="test")
    assert answer.deleted
    assert sc.docker.volume(sc.dind_volume) is None


def test_no_delete_is_decided_while_btrfs_progs_is_gone(rt: Runtime, sc: LeakScenario) -> None:
    """A scoped snapshot starts no process, but a delete still answers 503 (as a full
    scan did, and as /readyz says) rather than deciding without the tool."""
    rt.inventory.current()
    sc.btrfs.missing = True
    data_root = sc.btrfs.subvolume(sc.data_root)
    assert data_root is not None
    with pytest.raises(BtrfsUnavailable):
        rt.deletes.subvolume(sc.fs_uuid, data_root.id, dry_run=False, actor="test")
    with pytest.raises(BtrfsUnavailable):
        rt.deletes.volume(sc.dind_volume, dry_run=False, actor="test")
    sc.btrfs.missing = False
    assert sc.docker.volume(sc.dind_volume) is not None
    assert all(sc.btrfs.subvolume(p) is not None for p in sc.dind_nested)
