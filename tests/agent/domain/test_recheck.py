"""``recheck``: is a planned target still as planned, on a snapshot of the fakes taken
after the plan? Its delete set if so; else why not (gone, changed, too young, or the
refusal of a safety rule)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from agent.domain.plans import Action, Plan, build_plan
from agent.domain.recheck import Skipped, recheck
from agent.domain.safety import DeleteSet
from agent.errors import HoldersUnavailable, HostMountsUnavailable
from agent.host.records import LayerRefs
from shared.policy import FINDING_KINDS, ORPHAN_MIN_AGE_FLOOR_SECONDS, Policy
from tests.agent.domain.scenes import (
    advance,
    findings,
    generation,
    snapshot,
    sub_id,
    subvolume,
)
from tests.fakes import LeakScenario, fake_hex, make_leak_scenario

HOUR = timedelta(hours=1)


@dataclass
class Planned:
    """A plan of every kind of action, made two hours after its targets were."""

    sc: LeakScenario
    plan: Plan
    state: Path
    loose_folder: str
    dangling_volume: str
    stale_qgroup: int

    def action(self, kind: str) -> Action:
        [a] = [a for a in self.plan.actions if a.kind == kind]
        return a

    def recheck(
        self, kind: str, *, resuming: bool = False, orphan_floor: int = ORPHAN_MIN_AGE_FLOOR_SECONDS
    ) -> DeleteSet | Skipped:
        """``recheck`` of the action of that kind on a snapshot taken now."""
        snap = snapshot(self.sc, self.state)
        action = self.action(kind)
        return recheck(snap, self.plan, action, resuming=resuming, orphan_floor=orphan_floor)


def make_plan(
    tmp_path: Path,
    before: Callable[[LeakScenario], object] | None = None,
    protect_labels: tuple[str, ...] = (),
) -> Planned:
    sc = make_leak_scenario(kernel="4.4.302+")  # a kernel that leaves stale qgroups
    loose = f"{sc.data_root}/btrfs/subvolumes/{fake_hex('copied')}"
    sc.btrfs.make_dirs(f"{loose}/etc")
    dangling = sc.docker.add_volume()
    gone = sc.btrfs.create_subvolume("/volume1/photo/tmp")
    sc.btrfs.delete(["/volume1/photo/tmp"])
    if before is not None:
        before(sc)
    advance(sc, 2 * HOUR)
    snap = snapshot(sc, tmp_path)
    policy = Policy(kinds=FINDING_KINDS, min_age_seconds=0, protect_labels=protect_labels)
    found = findings(snap, sc, min_age_seconds=0, protect_labels=policy.protect_labels)
    plan = build_plan(found, policy, plan_id="p", now=snap.taken_at, ttl_seconds=900)
    assert len(plan.actions) == 5, plan.skipped
    return Planned(sc, plan, tmp_path, loose, dangling.name, gone.id)


@pytest.fixture
def p(tmp_path: Path) -> Planned:
    return make_plan(tmp_path)


def changed(result: DeleteSet | Skipped) -> str:
    assert isinstance(result, Skipped), result
    assert result.code == "changed", result
    return result.detail


KINDS = ["dind-volume", "dangling-volume", "orphan-layer", "orphan-layer-folder", "stale-qgroups"]


# --------------------------------------------------------------------------- unchanged


@pytest.mark.parametrize("kind", KINDS)
def test_an_unchanged_target_gives_its_delete_set(p: Planned, kind: str) -> None:
    advance(p.sc, 24 * HOUR)  # time alone changes nothing
    action = p.action(kind)
    ds = p.recheck(kind)
    assert isinstance(ds, DeleteSet), ds
    assert tuple(s.id for s in ds.subvolumes) == action.subvolume_ids
    assert tuple((s.id, s.generation) for s in sorted(ds.subvolumes, key=lambda s: s.id)) == (
        tuple(sorted(action.generations))
    )
    assert ds.fs_uuid == action.filesystem_uuid == p.sc.fs_uuid
    if action.op == "remove_volume":
        assert ds.volume is not None and ds.volume.name == action.target.name
    if action.op == "remove_folder":
        assert ds.folder is not None and ds.folder.path == p.loose_folder
    if action.op == "destroy_qgroups":
        assert ds.qgroup_ids == action.qgroup_ids == (p.stale_qgroup,)
    if kind == "dind-volume":
        assert len(ds.subvolumes) == 7 and [s.id for s in ds.clear_readonly] == [
            sub_id(p.sc, p.sc.dind_ro_parent)
        ]


# --------------------------------------------------------------------------- gone


def _remove_dind(p: Planned) -> None:
    for path in reversed(p.sc.dind_nested):  # children first
        p.sc.btrfs.destroy(path)
    p.sc.docker.remove_volume(p.sc.dind_volume)


GONE: dict[str, Callable[[Planned], object]] = {
    "dind-volume": _remove_dind,
    "dangling-volume": lambda p: p.sc.docker.remove_volume(p.dangling_volume),
    "orphan-layer": lambda p: p.sc.btrfs.destroy(p.sc.orphan_layer),
    "orphan-layer-folder": lambda p: p.sc.btrfs.remove_tree(p.loose_folder),
    "stale-qgroups": lambda p: p.sc.btrfs.destroy_qgroup("/volume1", p.stale_qgroup),
}


@pytest.mark.parametrize("kind", KINDS)
def test_a_target_that_is_gone(p: Planned, kind: str) -> None:
    GONE[kind](p)
    result = p.recheck(kind)
    assert isinstance(result, Skipped) and result.code == "gone", result
    assert str(result).startswith("gone: ")


# --------------------------------------------------------------------------- changed


def test_a_new_subvolume_in_the_volume(p: Planned) -> None:
    new = p.sc.btrfs.create_subvolume(f"{p.sc.dind_mountpoint}/btrfs/subvolumes/{'b' * 64}")
    assert (
        changed(p.recheck("dind-volume")) == f"the subvolumes differ from the plan; new [{new.id}]"
    )


def test_a_dangling_volume_that_now_holds_a_subvolume(p: Planned) -> None:
    record = p.sc.docker.volume(p.dangling_volume)
    assert record is not None
    new = p.sc.btrfs.create_subvolume(f"{record.mountpoint}/btrfs/subvolumes/{'b' * 64}")
    assert f"new [{new.id}]" in changed(p.recheck("dangling-volume"))


def test_a_new_subvolume_in_the_orphan(p: Planned) -> None:
    new = p.sc.btrfs.create_subvolume(f"{p.sc.orphan_layer}/inner")
    advance(p.sc, 2 * HOUR)  # past the orphan floor: not merely too young
    assert f"new [{new.id}]" in changed(p.recheck("orphan-layer"))


def test_a_subvolume_of_the_volume_vanished(p: Planned) -> None:
    leaf = f"{p.sc.dind_mountpoint}/btrfs/subvolumes/{fake_hex('inner-container', 2)}"
    gone = sub_id(p.sc, leaf)
    p.sc.btrfs.destroy(leaf)
    assert changed(p.recheck("dind-volume")) == (
        f"the subvolumes differ from the plan; gone [{gone}]"
    )


def test_a_subvolume_moved_out_of_the_volume(p: Planned) -> None:
    moved = sub_id(p.sc, p.sc.dind_ro_leaf)
    p.sc.btrfs.rename(p.sc.dind_ro_leaf, f"{p.sc.data_root}/kept-layer")
    assert f"gone [{moved}]" in changed(p.recheck("dind-volume"))


def test_a_subvolume_of_the_orphan_vanished(tmp_path: Path) -> None:
    def inner(sc: LeakScenario) -> None:
        sc.btrfs.create_subvolume(f"{sc.orphan_layer}/inner")

    p = make_plan(tmp_path, inner)
    gone = sub_id(p.sc, f"{p.sc.orphan_layer}/inner")
    assert gone in p.action("orphan-layer").subvolume_ids
    p.sc.btrfs.destroy(f"{p.sc.orphan_layer}/inner")
    advance(p.sc, 2 * HOUR)
    assert f"gone [{gone}]" in changed(p.recheck("orphan-layer"))


def test_a_generation_that_moved_in_the_volume(p: Planned) -> None:
    child = p.sc.dind_ro_parent_child
    before = generation(p.sc, child)
    p.sc.btrfs.touch(f"{child}/cache.db")  # a write: no new name, the same subvolumes
    assert changed(p.recheck("dind-volume")) == (
        f"subvolume {sub_id(p.sc, child)} generation moved from {before} to "
        f"{generation(p.sc, child)}"
    )


def test_a_generation_that_moved_in_the_orphan(p: Planned) -> None:
    before = generation(p.sc, p.sc.orphan_layer)
    p.sc.btrfs.touch(f"{p.sc.orphan_layer}/layer.tar")
    assert "generation moved from" in changed(p.recheck("orphan-layer"))
    assert generation(p.sc, p.sc.orphan_layer) > before


@pytest.mark.parametrize("to", ["another name in btrfs/subvolumes", "outside it"])
def test_an_orphan_renamed_elsewhere(p: Planned, to: str) -> None:
    """Found again by its id, with its generation: only where it is tells."""
    orphan = subvolume(p.sc, p.sc.orphan_layer)
    oid, gen = orphan.id, orphan.generation
    where = (
        f"{p.sc.data_root}/btrfs/subvolumes/{fake_hex('renamed')}"
        if to != "outside it"
        else f"{p.sc.data_root}/parked"
    )
    p.sc.btrfs.rename(p.sc.orphan_layer, where)
    assert (sub_id(p.sc, where), generation(p.sc, where)) == (oid, gen)
    assert changed(p.recheck("orphan-layer")) == (
        f"subvolume {oid} moved from {p.sc.orphan_layer} to {where}"
    )


# --------------------------------------------------------------------------- refusals


def _mount_inside_dind(p: Planned) -> None:
    p.sc.btrfs.add_mount(f"{p.sc.dind_ro_parent}/tmp-mount", host_only=True)


def _private_mount_inside_folder(p: Planned) -> None:
    p.sc.btrfs.add_private_mount(f"{p.loose_folder}/etc")


def _recorded(p: Planned) -> None:
    """Docker recorded the orphan as a layer after all (a pull that finished)."""
    refs = p.sc.docker.layer_refs(p.sc.data_root)
    name = p.sc.orphan_layer.rsplit("/", 1)[1]
    p.sc.docker.set_layer_refs(
        p.sc.data_root,
        LayerRefs(
            image_cache_ids=refs.image_cache_ids | {name},
            container_mount_ids=refs.container_mount_ids,
            container_init_ids=refs.container_init_ids,
        ),
    )


REFUSALS: dict[str, tuple[str, Callable[[Planned], object], str]] = {
    "a mount inside the volume": ("dind-volume", _mount_inside_dind, "in_use"),
    "a container using the volume": (
        "dind-volume",
        lambda p: p.sc.docker.add_container(
            "dind-again", running=False, volumes=[p.sc.dind_volume]
        ),
        "in_use",
    ),
    "a mount on the orphan": (
        "orphan-layer",
        lambda p: p.sc.btrfs.add_mount(p.sc.orphan_layer),
        "protected",
    ),
    "a container binding inside the orphan": (
        "orphan-layer",
        lambda p: p.sc.docker.add_container(
            "debug", running=False, binds=[(f"{p.sc.orphan_layer}/etc", "/x")]
        ),
        "in_use",
    ),
    "the orphan recorded as a layer": ("orphan-layer", _recorded, "protected"),
    "a private mount inside the folder": (
        "orphan-layer-folder",
        _private_mount_inside_folder,
        "in_use",
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_a_safety_rule_refusing_now_gives_its_code(p: Planned, case: str) -> None:
    kind, make, code = REFUSALS[case]
    make(p)
    result = p.recheck(kind)
    assert isinstance(result, Skipped) and result.code == code, result


def test_the_plans_protect_labels_hold_at_the_recheck(tmp_path: Path) -> None:
    """The volume removed and made again under the same name, with a label the plan's
    policy protects."""
    p = make_plan(tmp_path, protect_labels=("ci.keep",))
    p.sc.docker.remove_volume(p.dangling_volume)
    p.sc.docker.add_volume(p.dangling_volume, labels={"ci.keep": "true"})
    result = p.recheck("dangling-volume")
    assert result == Skipped(
        "protected", f"volume {p.dangling_volume} is protected by its label ci.keep=true"
    )


def test_without_the_hosts_mount_table_nothing_is_decided(p: Planned) -> None:
    """Not a skip, not a delete set: the action cannot be checked at all."""
    p.sc.btrfs.host_mounts_error = "the agent runs in a pid namespace of its own"
    for kind in ("dind-volume", "orphan-layer", "orphan-layer-folder"):
        with pytest.raises(HostMountsUnavailable):
            p.recheck(kind)


# --------------------------------------------------------------------------- resuming


def _inner_containers(p: Planned) -> list[str]:
    inner = f"{p.sc.dind_mountpoint}/btrfs/subvolumes"
    return [f"{inner}/{fake_hex('inner-container', n)}" for n in (1, 2)]


def test_resuming_after_some_planned_subvolumes_went(p: Planned) -> None:
    went = _inner_containers(p)
    ids = [sub_id(p.sc, w) for w in went]
    for w in went:
        p.sc.btrfs.destroy(w)
    ds = p.recheck("dind-volume", resuming=True)
    assert isinstance(ds, DeleteSet), ds
    planned = p.action("dind-volume").subvolume_ids
    assert tuple(s.id for s in ds.subvolumes) == tuple(i for i in planned if i not in ids)
    # not resuming, the same is a change
    assert changed(p.recheck("dind-volume")) == (
        f"the subvolumes differ from the plan; gone {sorted(ids)}"
    )


def test_resuming_after_every_planned_subvolume_went(p: Planned) -> None:
    """What is left is the volume itself (``docker volume rm``)."""
    for path in reversed(p.sc.dind_nested):
        p.sc.btrfs.destroy(path)
    ds = p.recheck("dind-volume", resuming=True)
    assert isinstance(ds, DeleteSet), ds
    assert ds.subvolumes == () and ds.volume is not None and ds.volume.name == p.sc.dind_volume


def test_resuming_does_not_cover_a_change_in_what_is_left(p: Planned) -> None:
    for w in _inner_containers(p):
        p.sc.btrfs.destroy(w)
    p.sc.btrfs.touch(f"{p.sc.dind_ro_parent_child}/cache.db")
    changed(p.recheck("dind-volume", resuming=True))


def test_resuming_does_not_cover_a_new_subvolume(p: Planned) -> None:
    p.sc.btrfs.destroy(_inner_containers(p)[0])
    new = p.sc.btrfs.create_subvolume(f"{p.sc.dind_mountpoint}/btrfs/subvolumes/{'b' * 64}")
    assert f"new [{new.id}]" in changed(p.recheck("dind-volume", resuming=True))


def test_resuming_after_a_nested_child_went_its_holder_has_changed(p: Planned) -> None:
    """Deleting a subvolume makes a change in the one holding it (its generation moves):
    when that one is planned too, what is left is not as planned, and it waits for a
    new plan."""
    child, parent = p.sc.dind_ro_parent_child, p.sc.dind_ro_parent
    child_id, parent_id = sub_id(p.sc, child), sub_id(p.sc, parent)
    planned = dict(p.action("dind-volume").generations)[parent_id]
    p.sc.btrfs.destroy(child)
    assert generation(p.sc, parent) != planned
    assert changed(p.recheck("dind-volume", resuming=True)) == (
        f"the subvolumes differ from the plan; gone [{child_id}]"
    )


# --------------------------------------------------------------------------- too young


def test_an_orphan_folder_changed_within_the_floor(p: Planned) -> None:
    p.sc.btrfs.make_dirs(f"{p.loose_folder}/usr")  # Docker writing it after all
    advance(p.sc, timedelta(minutes=10))
    result = p.recheck("orphan-layer-folder")
    assert isinstance(result, Skipped) and result.code == "too_young", result
    assert result.detail.startswith("changed 600 s ago, less than 3600 s")
    assert isinstance(p.recheck("orphan-layer-folder", orphan_floor=600), DeleteSet)
    assert isinstance(p.recheck("orphan-layer-folder", orphan_floor=601), Skipped)


def test_an_orphan_folder_whose_last_change_cannot_be_told(p: Planned) -> None:
    p.sc.btrfs.forget_folder_time(p.loose_folder)
    result = p.recheck("orphan-layer-folder")
    assert result == Skipped("too_young", "when it last changed cannot be told")
    # whatever the floor: nothing says Docker is not writing it
    assert p.recheck("orphan-layer-folder", orphan_floor=0) == result


def test_an_orphan_layer_changed_within_the_floor(p: Planned) -> None:
    p.sc.btrfs.touch(f"{p.sc.orphan_layer}/layer.tar", new_name=True)
    advance(p.sc, timedelta(minutes=10))
    result = p.recheck("orphan-layer")
    assert isinstance(result, Skipped) and result.code == "too_young", result
    # past the floor it is the generation that moved
    assert "generation moved" in changed(p.recheck("orphan-layer", orphan_floor=0))


# --------------------------------------------------------------------------- held open


@pytest.mark.parametrize("kind", ["dind-volume", "orphan-layer", "orphan-layer-folder"])
def test_a_process_holding_a_file_inside_since_the_plan(p: Planned, kind: str) -> None:
    target = p.action(kind).target
    inside = f"{p.sc.dind_ro_parent_child}/etc" if kind == "dind-volume" else f"{target.path}/etc"
    p.sc.btrfs.hold(inside, "pid 4242 (rsync), open file")
    result = p.recheck(kind)
    assert isinstance(result, Skipped) and result.code == "held_by_process", result
    assert "pid 4242 (rsync), open file holds" in result.detail


def test_a_loop_device_backed_by_a_file_inside_since_the_plan(p: Planned) -> None:
    p.sc.btrfs.back_loop(f"{p.sc.dind_ro_leaf}/disk.img", "/dev/loop5")
    result = p.recheck("dind-volume")
    assert isinstance(result, Skipped) and result.code == "held_by_kernel", result
    assert "loop device /dev/loop5" in result.detail


def test_without_what_is_held_open_nothing_is_decided(p: Planned) -> None:
    p.sc.btrfs.holders_error = "cannot read what pid 1 holds (fd): Permission denied"
    for kind in ("dind-volume", "orphan-layer", "orphan-layer-folder"):
        with pytest.raises(HoldersUnavailable, match="pid 1"):
            p.recheck(kind)
