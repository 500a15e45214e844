"""A delete's scoped snapshot (``Scope``: only the subvolumes the delete touches are
listed) decides exactly as a full snapshot does: over the stateful fakes, for states
built from many combinations of what makes a target unsafe (a mount inside it, its
subvolume mounted elsewhere, a bind mount of it, a container using it, something held
open in it, a default subvolume inside it, an inner daemon's volume labelled keep or
its volume store unreadable, a subvolume inside a layer, a read-only
parent, a path the kernel cannot give, protect labels, named volumes, the data root,
layers and orphans...), every volume and every subvolume is decided on both, and the
answers (refused with which error and reason, or the same delete set) are the same."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.domain.inventory import Inventory
from agent.domain.safety import DeleteSet, plan_subvolume_delete, plan_volume_delete
from agent.domain.snapshot import Scope, Snapshot
from agent.errors import AgentError
from shared.policy import DEFAULT_PROTECT_LABELS
from tests.agent.domain.scenes import advance, every_kind
from tests.agent.http.apphelpers import agent_config
from tests.fakes import LeakScenario, fake_hex

Mutation = Callable[[LeakScenario], None]


def _mount_inside(sc: LeakScenario) -> None:
    sc.btrfs.add_mount(f"{sc.dind_nested[1]}/mnt")


def _nested_mounted_elsewhere(sc: LeakScenario) -> None:
    sc.btrfs.mount_subvolume(sc.dind_nested[2], "/mnt/elsewhere")


def _bind_of_volume_data(sc: LeakScenario) -> None:
    sc.btrfs.bind_mount(sc.dind_mountpoint, "/srv/bound")


def _held_open(sc: LeakScenario) -> None:
    sc.btrfs.hold(sc.dind_nested[-1])


def _stopped_container_uses(sc: LeakScenario) -> None:
    sc.docker.container(sc.stopped_container).volume_names.append(sc.dind_volume)


def _default_inside(sc: LeakScenario) -> None:
    sc.btrfs.set_default(sc.dind_nested[0])


def _subvolume_in_a_layer(sc: LeakScenario) -> None:
    sc.btrfs.create_subvolume(f"{sc.container_layers[0]}/var-lib-docker")


def _subvolume_in_the_orphan(sc: LeakScenario) -> None:
    sc.btrfs.create_subvolume(f"{sc.orphan_layer}/inner")


def _path_unknown(sc: LeakScenario) -> None:
    sc.btrfs.hide_path(sc.dind_nested[1])


def _deep_nesting(sc: LeakScenario) -> None:
    deep = f"{sc.dind_ro_parent_child}/a"
    sc.btrfs.create_subvolume(deep)
    sc.btrfs.create_subvolume(f"{deep}/b", read_only=True)


def _volume_folder_itself_a_subvolume(sc: LeakScenario) -> None:
    vol = sc.docker.add_volume()
    sc.btrfs.create_subvolume(f"{sc.data_root}/volumes/{vol.name}/_data/sub")


def _kept_named_volume_with_subvolumes(sc: LeakScenario) -> None:
    vol = sc.docker.add_volume("ci-keep", labels={"keep": "true"})
    sc.btrfs.create_subvolume(f"{vol.mountpoint}/btrfs/subvolumes/{fake_hex('k')}")


def _a_private_mount_in_another_namespace(sc: LeakScenario) -> None:
    sc.btrfs.add_private_mount(f"{sc.dind_nested[0]}", pid=4321)


def _inner_volume_labelled_keep(sc: LeakScenario) -> None:
    sc.docker.record_inner_volumes(sc.dind_mountpoint, {"results": {"keep": "true"}})


def _unreadable_volume_store(sc: LeakScenario) -> None:
    sc.docker.break_volume_store(sc.dind_mountpoint)


def _many_other_subvolumes(sc: LeakScenario) -> None:
    for i in range(30):
        sc.btrfs.create_subvolume(f"{sc.share}/others/s{i:03d}")


MUTATIONS: tuple[Mutation, ...] = (
    _mount_inside,
    _nested_mounted_elsewhere,
    _bind_of_volume_data,
    _held_open,
    _stopped_container_uses,
    _default_inside,
    _subvolume_in_a_layer,
    _subvolume_in_the_orphan,
    _path_unknown,
    _deep_nesting,
    _volume_folder_itself_a_subvolume,
    _kept_named_volume_with_subvolumes,
    _a_private_mount_in_another_namespace,
    _inner_volume_labelled_keep,
    _unreadable_volume_store,
    _many_other_subvolumes,
)


def decision(decide: Callable[[], DeleteSet]) -> tuple[Any, ...]:
    try:
        ds = decide()
    except AgentError as exc:
        return ("refused", type(exc).__name__, exc.detail)
    return (
        "delete",
        ds.fs_uuid,
        tuple(s.id for s in ds.subvolumes),
        tuple((s.id, s.path, s.read_only, s.exclusive_bytes) for s in ds.subvolumes),
        tuple(s.id for s in ds.clear_readonly),
        ds.guard,
        ds.volume.name if ds.volume else None,
        tuple(s.id for s in ds.volume.nested) if ds.volume else (),
    )


def compare(sc: LeakScenario, tmp_path: Path, floor: int) -> int:
    """Decide every volume and every subvolume on a full and on a scoped snapshot;
    returns how many decisions were compared."""
    inv = Inventory(
        agent_config(tmp_path, orphan_min_age_seconds=floor),
        btrfs=sc.btrfs,
        docker=sc.docker,
        clock=lambda: sc.btrfs.now,
    )
    try:
        full = inv.fresh_snapshot()
        assert full.scope is None
        compared = 0
        names = [v.name for v in sc.docker.volumes()] + ["no-such-volume", "bad/name"]
        for name in names:
            scoped = inv.fresh_snapshot(scope=Scope(volume=name))
            assert scoped.scope is not None

            def on(snap: Snapshot, name: str = name) -> Callable[[], DeleteSet]:
                return lambda: plan_volume_delete(snap, name, protect_labels=DEFAULT_PROTECT_LABELS)

            assert decision(on(scoped)) == decision(on(full)), name
            compared += 1
        for uuid, subs in full.subvolumes.items():
            for sid in [*subs, 5, 999_999]:
                scoped = inv.fresh_snapshot(scope=Scope(fs_uuid=uuid, ids=(sid,)))

                def sub(
                    snap: Snapshot, uuid: str = uuid, sid: int = sid
                ) -> Callable[[], DeleteSet]:
                    return lambda: plan_subvolume_delete(
                        snap, uuid, sid, protect_labels=DEFAULT_PROTECT_LABELS, orphan_floor=floor
                    )

                assert decision(sub(scoped)) == decision(sub(full)), (uuid, sid)
                compared += 1
        return compared
    finally:
        inv.watch.stop()


def test_a_scoped_snapshot_lists_less_than_a_full_one(tmp_path: Path) -> None:
    ek = every_kind()
    sc = ek.sc
    _many_other_subvolumes(sc)
    inv = Inventory(agent_config(tmp_path), btrfs=sc.btrfs, docker=sc.docker)
    try:
        full = inv.fresh_snapshot()
        scoped = inv.fresh_snapshot(scope=Scope(volume=sc.dind_volume))
    finally:
        inv.watch.stop()
    n_full = sum(len(s) for s in full.subvolumes.values())
    n_scoped = sum(len(s) for s in scoped.subvolumes.values())
    assert n_scoped < n_full / 3, (n_scoped, n_full)
    # the volume's subvolumes and the data root holding them, no more
    listed = {sv.path for subs in scoped.subvolumes.values() for sv in subs.values()}
    assert listed == {*sc.dind_nested, sc.data_root}


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.__name__.strip("_"))
def test_each_unsafe_state_is_decided_alike(mutation: Mutation, tmp_path: Path) -> None:
    sc = every_kind().sc
    mutation(sc)
    assert compare(sc, tmp_path, floor=3600) > 20


@pytest.mark.parametrize("seed", range(12))
def test_random_combinations_are_decided_alike(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    sc = every_kind().sc
    for mutation in rng.sample(MUTATIONS, rng.randint(2, 6)):
        mutation(sc)
    if rng.random() < 0.5:
        advance(sc, timedelta(hours=3))  # the orphans old enough
    floor = rng.choice((0, 3600))
    assert compare(sc, tmp_path, floor=floor) > 20
