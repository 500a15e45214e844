"""The kept inventory over the stateful fakes: a read uses the kept scan while nothing
changed, and scans again when Docker, btrfs, the mount tables or the agent itself
changed something, or when it is too old; a delete never decides on it."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.domain.inventory import Inventory
from agent.domain.snapshot import Snapshot
from agent.errors import DockerUnavailable, InUse
from agent.runtime import Backends, Runtime, build_runtime
from tests.agent.http.apphelpers import agent_config
from tests.fakes import LeakScenario, make_leak_scenario


@pytest.fixture
def sc() -> LeakScenario:
    return make_leak_scenario()


@pytest.fixture
def inv(sc: LeakScenario, tmp_path: Path) -> Iterator[Inventory]:
    inventory = Inventory(agent_config(tmp_path), btrfs=sc.btrfs, docker=sc.docker)
    yield inventory
    inventory.watch.stop()


def warm(inv: Inventory) -> int:
    """Two reads: the first scan has nothing to compare with, the second is kept."""
    inv.current()
    inv.current()
    assert inv.watch.wait_connected(5)
    inv.current()
    return inv.scans


def test_nothing_changed_no_scan(inv: Inventory) -> None:
    scans = warm(inv)
    first = inv.current()
    for _ in range(5):
        assert inv.current() is first
        inv.findings()
    assert inv.scans == scans


def test_the_safety_checks_symlink_answers_are_not_kept_with_the_scan(inv: Inventory) -> None:
    warm(inv)
    snap = inv.current()
    found = inv.findings()
    assert found and snap.path_memo.no_link("/") and not snap.path_memo._folders
    # asked another way, the same scan is checked again from the file system
    assert [f.id for f in inv.findings(kinds=["dind-volume"])] == [
        f.id for f in found if f.kind == "dind-volume"
    ]
    assert not snap.path_memo._folders and inv.current() is snap


def test_a_new_subvolume_is_seen(inv: Inventory, sc: LeakScenario) -> None:
    scans = warm(inv)
    sub = sc.btrfs.create_subvolume(f"{sc.data_root}/btrfs/subvolumes/{'e' * 64}")
    snap = inv.current()
    assert inv.scans == scans + 1
    assert sub.id in snap.subvolumes[sc.fs_uuid]
    assert any(f.target.id == sub.id for f in inv.findings())


def test_a_read_only_flag_and_a_delete_are_seen(inv: Inventory, sc: LeakScenario) -> None:
    warm(inv)
    sc.btrfs.set_readonly(sc.orphan_layer, True)
    sid = sc.btrfs.subvolume(sc.orphan_layer).id  # type: ignore[union-attr]
    assert inv.current().subvolume(sc.fs_uuid, sid).read_only  # type: ignore[union-attr]
    sc.btrfs.set_readonly(sc.orphan_layer, False)
    sc.btrfs.destroy(sc.orphan_layer)
    assert inv.current().subvolume(sc.fs_uuid, sid) is None


def test_quota_numbers_are_seen(inv: Inventory, sc: LeakScenario) -> None:
    warm(inv)
    sub = sc.btrfs.subvolume(sc.orphan_layer)
    assert sub is not None
    sub.exclusive_bytes = 123 * 1024 * 1024
    assert inv.current().subvolume(sc.fs_uuid, sub.id).exclusive_bytes == sub.exclusive_bytes  # type: ignore[union-attr]


def test_a_docker_change_is_seen(inv: Inventory, sc: LeakScenario) -> None:
    scans = warm(inv)
    sc.docker.add_volume("fresh-one")
    assert "fresh-one" in inv.current().volumes
    assert inv.scans == scans + 1
    # a container now uses the leaked volume: no longer a finding, at once
    assert any(f.target.name == sc.dind_volume for f in inv.findings())
    sc.docker.add_container("late", volumes=[sc.dind_volume])
    assert not any(f.target.name == sc.dind_volume for f in inv.findings())


def test_a_docker_event_alone_is_seen(inv: Inventory, sc: LeakScenario) -> None:
    """A change that touches nothing on btrfs: only Docker's event tells."""
    scans = warm(inv)

    def running() -> bool:
        (c,) = [c for c in inv.current().containers if c.id == sc.running_container]
        return c.running

    assert running()
    sc.docker.stop_container(sc.running_container)
    assert not running()
    assert inv.scans == scans + 1


def test_a_lost_event_stream_means_scanning_again(inv: Inventory, sc: LeakScenario) -> None:
    scans = warm(inv)
    opened = sc.docker.events_opened
    sc.docker.quiet = True  # what changes now sends no event...
    sc.docker.add_volume("unannounced")
    sc.docker.cut_event_streams()  # ...but the stream is lost: events may be missed
    assert "unannounced" in inv.current().volumes
    assert inv.scans > scans
    deadline = time.monotonic() + 5
    while sc.docker.events_opened == opened and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sc.docker.events_opened > opened  # the watch opened the stream again


def test_without_docker_events_nothing_is_kept(sc: LeakScenario, tmp_path: Path) -> None:
    real_events = sc.docker.events

    def refuse() -> object:
        raise DockerUnavailable("no events here")

    sc.docker.events = refuse  # type: ignore[method-assign,assignment]
    inv = Inventory(agent_config(tmp_path), btrfs=sc.btrfs, docker=sc.docker)
    try:
        for n in range(1, 4):
            inv.current()
            assert inv.scans == n
    finally:
        inv.watch.stop()
        sc.docker.events = real_events  # type: ignore[method-assign]


def test_a_mount_is_seen(inv: Inventory, sc: LeakScenario) -> None:
    scans = warm(inv)
    sc.btrfs.add_mount(f"{sc.dind_mountpoint}/proc", fstype="proc", source="proc")
    (finding,) = [f for f in inv.findings() if f.target.name == sc.dind_volume]
    assert inv.scans == scans + 1
    assert any(b.startswith("in_use") for b in finding.blocked_by)


def test_a_scan_that_could_not_read_what_is_held_is_not_kept(
    inv: Inventory, sc: LeakScenario
) -> None:
    """No signal says when what processes hold becomes readable again: such a scan is
    not used again, and the findings recover at the next read."""
    warm(inv)
    sc.btrfs.holders_error = "cannot read what pid 1 holds (fd): Permission denied"
    inv.forget_kept()
    (finding,) = [f for f in inv.findings() if f.target.name == sc.dind_volume]
    assert any(b.startswith("holders_unavailable:") for b in finding.blocked_by)
    sc.btrfs.holders_error = None
    scans = inv.scans
    (finding,) = [f for f in inv.findings() if f.target.name == sc.dind_volume]
    assert inv.scans == scans + 1
    assert not any(b.startswith("holders_unavailable:") for b in finding.blocked_by)


def test_own_changes_and_age(sc: LeakScenario, tmp_path: Path) -> None:
    inv = Inventory(
        agent_config(tmp_path, inventory_max_age_seconds=1), btrfs=sc.btrfs, docker=sc.docker
    )
    try:
        scans = warm(inv)
        inv.forget_kept()
        inv.current()
        assert inv.scans == scans + 1
        inv.current()
        assert inv.scans == scans + 1
        time.sleep(1.1)
        inv.current()
        assert inv.scans == scans + 2
    finally:
        inv.watch.stop()


def test_max_age_zero_keeps_nothing(sc: LeakScenario, tmp_path: Path) -> None:
    inv = Inventory(
        agent_config(tmp_path, inventory_max_age_seconds=0), btrfs=sc.btrfs, docker=sc.docker
    )
    for n in range(1, 4):
        inv.current()
        assert inv.scans == n


def test_concurrent_reads_of_a_stale_scan_share_one_scan(inv: Inventory, sc: LeakScenario) -> None:
    scans = warm(inv)
    sc.btrfs.create_subvolume(f"{sc.data_root}/btrfs/subvolumes/{'f' * 64}")
    start = threading.Barrier(8)
    seen: list[int] = []

    def read() -> None:
        start.wait()
        seen.append(len(inv.current().subvolumes[sc.fs_uuid]))

    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert inv.scans == scans + 1
    assert len(set(seen)) == 1


def test_metrics_never_wait_and_catch_up(inv: Inventory, sc: LeakScenario) -> None:
    warm(inv)
    before = len(inv.kept_findings())
    sc.btrfs.create_subvolume(f"{sc.data_root}/btrfs/subvolumes/{'a' * 64}")
    assert len(inv.kept_findings()) == before  # the kept scan's, at once
    deadline = time.monotonic() + 5
    while len(inv.kept_findings()) == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(inv.kept_findings()) == before + 1  # scanned in the background


@pytest.fixture
def rt(sc: LeakScenario, tmp_path: Path) -> Iterator[Runtime]:
    runtime = build_runtime(agent_config(tmp_path), backends=Backends(sc.btrfs, sc.docker))
    yield runtime
    runtime.inventory.watch.stop()


def test_a_delete_decides_on_fresh_state_not_on_the_kept_scan(
    rt: Runtime, sc: LeakScenario
) -> None:
    inv = rt.inventory
    warm(inv)
    assert not inv.current().volumes[sc.dind_volume].in_use_by
    # a change no signal shows: a stopped container now mounts the volume (no event)
    sc.docker.container(sc.stopped_container).volume_names.append(sc.dind_volume)
    assert not inv.current().volumes[sc.dind_volume].in_use_by  # the reads: kept
    with pytest.raises(InUse):
        rt.deletes.volume(sc.dind_volume, dry_run=False, actor="test")
    assert sc.docker.volume(sc.dind_volume) is not None
    assert sc.btrfs.subvolume(sc.dind_nested[0]) is not None


def test_a_delete_drops_the_kept_scan(rt: Runtime, sc: LeakScenario) -> None:
    inv = rt.inventory
    warm(inv)
    sc.docker.quiet = True  # the agent's own change must show without any event
    rt.deletes.volume(sc.dind_volume, dry_run=False, actor="test")
    assert sc.dind_volume not in inv.current().volumes


def test_a_complete_listing_keeps_the_kept_scan(inv: Inventory, sc: LeakScenario) -> None:
    """The last page drops the listing's own snapshot, not the scan every read shares."""
    scans = warm(inv)
    items, cursor = inv.subvolumes(sc.fs_uuid, under=None, limit=2, cursor=None)
    pages = [items]
    while cursor is not None:
        items, cursor = inv.subvolumes(sc.fs_uuid, under=None, limit=2, cursor=cursor)
        pages.append(items)
    assert len(pages) > 1
    inv.current()
    assert inv.scans == scans
    # a real change still makes the next read scan
    sc.btrfs.create_subvolume(f"{sc.data_root}/btrfs/subvolumes/{'f' * 64}")
    inv.current()
    assert inv.scans == scans + 1


def test_btrfs_progs_gone_is_said_at_the_next_read(inv: Inventory, sc: LeakScenario) -> None:
    """No signal moves when the binary goes away; the kept scan is not used then, so
    the read fails as a scan would (BtrfsUnavailable: a 503). Back, with nothing else
    changed, the kept scan serves again."""
    from agent.errors import BtrfsUnavailable

    scans = warm(inv)
    sc.btrfs.missing = True
    with pytest.raises(BtrfsUnavailable):
        inv.current()
    sc.btrfs.missing = False
    assert sc.fs_uuid in inv.current().subvolumes
    assert inv.scans == scans


def test_a_serving_agent_tunes_the_collector() -> None:
    import gc

    from agent.domain.keptscan import COLLECTOR_THRESHOLDS, tune_collector

    before = gc.get_threshold()
    try:
        tune_collector()
        assert gc.get_threshold() == COLLECTOR_THRESHOLDS
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def _watch_takes(inv: Inventory, before_take: Callable[[], None]) -> None:
    """Run ``before_take`` each time the kept scan starts a scan (the real one after)."""
    take = inv.kept._take

    def watched() -> Snapshot:
        before_take()
        return take()

    inv.kept._take = watched


def test_a_big_stale_scan_is_let_go_before_the_scan_replacing_it(
    inv: Inventory, sc: LeakScenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two full scans are never held at once: the stale one is freed (and its memory
    given back) before the new one is made, which is then kept and trusted."""
    from agent.domain import keptscan

    monkeypatch.setattr(keptscan, "BIG_SCAN", 0)  # the fakes' few subvolumes count as big
    scans = warm(inv)
    old = weakref.ref(inv.current())
    alive: list[bool] = []
    _watch_takes(inv, lambda: alive.append(old() is not None))
    sc.btrfs.create_subvolume(f"{sc.data_root}/btrfs/subvolumes/{'f' * 64}")
    new = inv.current()
    assert alive == [False] and old() is None
    assert inv.scans == scans + 1
    assert inv.current() is new and inv.scans == scans + 1  # kept, and trusted


def test_metrics_answer_the_let_go_scans_findings_while_its_successor_is_made(
    inv: Inventory, sc: LeakScenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.domain import keptscan

    monkeypatch.setattr(keptscan, "BIG_SCAN", 0)
    warm(inv)
    before = inv.kept_findings()
    scanning, finish = threading.Event(), threading.Event()

    def slow() -> None:
        scanning.set()
        assert finish.wait(10)

    _watch_takes(inv, slow)
    sc.btrfs.create_subvolume(f"{sc.data_root}/btrfs/subvolumes/{'a' * 64}")
    reader = threading.Thread(target=inv.current)
    reader.start()
    try:
        assert scanning.wait(5)
        t0 = time.monotonic()
        assert inv.kept_findings() is before  # at once: the scan let go, its findings
        assert time.monotonic() - t0 < 1
    finally:
        finish.set()
        reader.join(10)
    deadline = time.monotonic() + 5
    while len(inv.kept_findings()) == len(before) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(inv.kept_findings()) == len(before) + 1
