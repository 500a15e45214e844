"""``compute_findings`` over snapshots of the stateful fakes: each kind with its evidence,
what is never a finding, ages, and ``blocked_by`` as the safety rules decide it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from agent.domain.findings import Finding, Target
from agent.domain.safety import (
    DeleteSet,
    plan_folder_delete,
    plan_subvolume_delete,
    plan_volume_delete,
)
from agent.domain.snapshot import Snapshot
from agent.errors import Refused, Unavailable
from agent.host.records import LayerRefs
from shared.policy import DEFAULT_PROTECT_LABELS, FINDING_KINDS
from tests.agent.domain.scenes import (
    about,
    advance,
    every_kind,
    findings,
    generation,
    of_kind,
    replace_with_folder,
    snapshot,
    sub_id,
    subvolume,
)
from tests.fakes import KiB, LeakScenario, MiB, fake_hex, make_leak_scenario

THREE_DAYS = 3 * 86400


@pytest.fixture
def sc() -> LeakScenario:
    return make_leak_scenario()


def layer_dir(sc: LeakScenario) -> str:
    return f"{sc.data_root}/btrfs/subvolumes"


def mountpoint(sc: LeakScenario, volume: str) -> str:
    record = sc.docker.volume(volume)
    assert record is not None
    return record.mountpoint


def too_young(f: Finding) -> list[str]:
    return [b for b in f.blocked_by if b.startswith("too_young:")]


# --------------------------------------------------------------------------- each kind


@pytest.mark.parametrize("kernel", ["6.12.48-amd64", "4.4.302+"])
def test_the_leaked_dind_volume_with_its_evidence(tmp_path: Path, kernel: str) -> None:
    sc = make_leak_scenario(kernel=kernel)
    f = about(findings(snapshot(sc, tmp_path), sc), name=sc.dind_volume)
    assert f.kind == "dind-volume" and not f.named
    assert f.target == Target("volume", sc.dind_volume, None, sc.dind_mountpoint)
    assert f.fs_uuid == sc.fs_uuid
    nested = {sub_id(sc, p): p for p in sc.dind_nested}
    assert sorted(f.subvolume_ids) == sorted(nested)
    # children first: the writable child before the read-only subvolume holding it
    child, parent = sub_id(sc, sc.dind_ro_parent_child), sub_id(sc, sc.dind_ro_parent)
    assert f.subvolume_ids.index(child) < f.subvolume_ids.index(parent)
    sizes = {i: subvolume(sc, p).exclusive_bytes for i, p in nested.items()}
    assert f.reclaimable_bytes == sum(sizes.values()) == 8 * MiB + 6 * 16 * KiB
    assert dict(f.generations) == {i: generation(sc, p) for i, p in nested.items()}
    assert f.age_seconds == THREE_DAYS and f.blocked_by == ()
    assert f.qgroup_ids == ()
    text = "\n".join(f.evidence)
    assert f"anonymous volume {sc.dind_volume} (driver local) at {sc.dind_mountpoint}" in text
    assert "used by no container, running or stopped" in text
    assert "holds 7 btrfs subvolume(s), 2 read-only; 5 under _data/btrfs/subvolumes/" in text
    assert "2 nested subvolume(s) are read-only: rm fails with EROFS" in text
    assert "space held in nested subvolumes: 8.1 MiB" in text
    assert "age 3 days (since the last write)" in text
    assert ("cannot remove subvolumes with rmdir" in text) == (kernel == "4.4.302+")
    assert "someone chose this name" not in text


def test_without_quotas_sizes_are_unknown(tmp_path: Path) -> None:
    sc = make_leak_scenario(quota=False)
    found = findings(snapshot(sc, tmp_path), sc)
    dind = about(found, name=sc.dind_volume)
    assert dind.reclaimable_bytes is None
    assert "unknown size (btrfs quotas are off)" in "\n".join(dind.evidence)
    orphan = about(found, path=sc.orphan_layer)
    assert orphan.reclaimable_bytes is None
    assert of_kind(found, "stale-qgroups") == []


def test_the_orphan_layer_with_its_evidence(sc: LeakScenario, tmp_path: Path) -> None:
    found = findings(snapshot(sc, tmp_path), sc)
    [f] = of_kind(found, "orphan-layer")
    oid = sub_id(sc, sc.orphan_layer)
    assert f.target == Target("subvolume", fake_hex("orphan"), oid, sc.orphan_layer)
    assert f.fs_uuid == sc.fs_uuid
    assert f.subvolume_ids == (oid,)
    assert f.generations == ((oid, generation(sc, sc.orphan_layer)),)
    assert f.reclaimable_bytes == 4 * MiB
    assert f.age_seconds == THREE_DAYS and f.blocked_by == () and not f.named
    text = "\n".join(f.evidence)
    assert "referenced by none of 3 image layer(s), 2 container layer(s) and 2 init layer(s)" in (
        text
    )
    assert f"generation {generation(sc, sc.orphan_layer)}, writable" in text
    assert "space: 4.0 MiB" in text
    assert f"created {(sc.now - timedelta(days=3)).isoformat()}" in text


def test_an_orphan_layer_takes_what_is_nested_in_it_children_first(
    sc: LeakScenario, tmp_path: Path
) -> None:
    sc.btrfs.create_subvolume(f"{sc.orphan_layer}/inner", exclusive_bytes=64 * KiB)
    advance(sc, timedelta(hours=2))
    [f] = of_kind(findings(snapshot(sc, tmp_path), sc, min_age_seconds=0), "orphan-layer")
    inner, oid = sub_id(sc, f"{sc.orphan_layer}/inner"), sub_id(sc, sc.orphan_layer)
    assert f.subvolume_ids == (inner, oid)
    assert dict(f.generations) == {
        inner: generation(sc, f"{sc.orphan_layer}/inner"),
        oid: generation(sc, sc.orphan_layer),
    }
    assert f.reclaimable_bytes == 4 * MiB + 64 * KiB
    assert "1 subvolume(s) nested inside it go with it" in f.evidence
    assert f.blocked_by == ()


def test_a_dangling_anonymous_volume(sc: LeakScenario, tmp_path: Path) -> None:
    vol = sc.docker.add_volume()
    advance(sc, timedelta(days=2))
    f = about(findings(snapshot(sc, tmp_path), sc), name=vol.name)
    assert f.kind == "dangling-volume" and not f.named
    assert f.target == Target("volume", vol.name, None, vol.mountpoint)
    assert f.subvolume_ids == () and f.generations == () and f.reclaimable_bytes is None
    assert f.blocked_by == () and f.age_seconds == 2 * 86400
    assert "holds no btrfs subvolume: `docker volume prune` would remove it" in f.evidence


def test_a_plain_folder_no_layer_references(sc: LeakScenario, tmp_path: Path) -> None:
    loose = f"{layer_dir(sc)}/{'c' * 64}"
    sc.btrfs.make_dirs(f"{loose}/etc")
    advance(sc, timedelta(hours=2))
    f = about(findings(snapshot(sc, tmp_path), sc, min_age_seconds=0), path=loose)
    assert f.kind == "orphan-layer-folder"
    assert f.target == Target("folder", "c" * 64, None, loose)
    assert f.fs_uuid == sc.fs_uuid and f.subvolume_ids == () and f.generations == ()
    assert f.blocked_by == () and f.age_seconds == 7200
    text = "\n".join(f.evidence)
    assert "is a plain folder, not a btrfs subvolume" in text
    assert "referenced by none of 3 image layer(s)" in text
    assert f"last changed {(sc.btrfs.now - timedelta(hours=2)).isoformat()}" in text


@pytest.mark.parametrize(
    ("which", "what"),
    [
        ("image", "an image layer"),
        ("container", "a container layer"),
        ("init", "a container's init layer"),
    ],
)
def test_a_referenced_layer_turned_into_a_plain_folder(
    sc: LeakScenario, tmp_path: Path, which: str, what: str
) -> None:
    layer = {
        "image": sc.image_layers[0],
        "container": sc.container_layers[1],  # the running container's layer
        "init": sc.container_layers[0],
    }[which]
    replace_with_folder(sc, layer)
    advance(sc, timedelta(days=2))
    f = about(findings(snapshot(sc, tmp_path), sc), path=layer)
    assert f.kind == "layer-folder"
    assert f.blocked_by == ("protected: a layer Docker references; never removed by this agent",)
    text = "\n".join(f.evidence)
    assert f"{what} references it" in text
    assert "Failed to destroy btrfs snapshot" in text
    name = layer.rsplit("/", 1)[1]
    assert f"`btrfs subvolume create {name}.new`" in text
    assert of_kind(findings(snapshot(sc, tmp_path), sc), "orphan-layer-folder") == []


def test_stale_qgroups_on_a_kernel_that_leaves_them(tmp_path: Path) -> None:
    sc = make_leak_scenario(kernel="4.4.302+")
    a = sc.btrfs.create_subvolume("/volume1/photo/tmp-a")
    b = sc.btrfs.create_subvolume("/volume1/photo/tmp-b")
    sc.btrfs.delete(["/volume1/photo/tmp-b", "/volume1/photo/tmp-a"])
    [f] = of_kind(findings(snapshot(sc, tmp_path), sc), "stale-qgroups")
    assert f.target == Target("filesystem", None, None, "/volume1")
    assert f.fs_uuid == sc.fs_uuid and f.qgroup_ids == (a.id, b.id)
    assert f.reclaimable_bytes == 0 and f.subvolume_ids == () and f.blocked_by == ()
    assert f.age_seconds is None
    assert f.evidence[0] == (
        f"2 level-0 qgroup(s) of filesystem {sc.fs_uuid} belong to no subvolume: 0/{a.id}, 0/{b.id}"
    )
    sc.btrfs.enable_quota("/volume1", False)  # the quota tree goes, and the qgroups with it
    assert of_kind(findings(snapshot(sc, tmp_path), sc), "stale-qgroups") == []


def test_a_current_kernel_leaves_no_stale_qgroups(sc: LeakScenario, tmp_path: Path) -> None:
    sc.btrfs.create_subvolume("/volume1/photo/tmp")
    sc.btrfs.delete(["/volume1/photo/tmp"])
    assert of_kind(findings(snapshot(sc, tmp_path), sc), "stale-qgroups") == []


# --------------------------------------------------------------------------- never findings


def test_the_leak_scenario_has_exactly_its_two_leftovers(sc: LeakScenario, tmp_path: Path) -> None:
    found = findings(snapshot(sc, tmp_path), sc)
    assert sorted((f.kind, f.target.name) for f in found) == sorted(
        [("dind-volume", sc.dind_volume), ("orphan-layer", fake_hex("orphan"))]
    )


def test_named_volumes_are_never_dangling(sc: LeakScenario, tmp_path: Path) -> None:
    found = findings(snapshot(sc, tmp_path), sc, min_age_seconds=0)
    names = {f.target.name for f in found}
    assert sc.named_volume not in names and sc.keep_volume not in names
    assert of_kind(found, "dangling-volume") == []


@pytest.mark.parametrize("user", ["running", "stopped"])
def test_volumes_in_use_are_never_findings(sc: LeakScenario, tmp_path: Path, user: str) -> None:
    """Even when they hold subvolumes (a running or stopped docker-in-docker)."""
    volume = sc.in_use_volume if user == "running" else sc.stopped_anonymous_volume
    sc.btrfs.create_subvolume(f"{mountpoint(sc, volume)}/btrfs/subvolumes/{'d' * 64}")
    snap = snapshot(sc, tmp_path)
    assert snap.volumes[volume].nested  # it would be a dind-volume if nobody used it
    found = findings(snap, sc, min_age_seconds=0)
    assert volume not in {f.target.name for f in found}
    nested = snap.volumes[volume].nested[0].id
    assert all(nested not in f.subvolume_ids for f in found)


def test_referenced_layers_are_never_orphans(sc: LeakScenario, tmp_path: Path) -> None:
    sc.docker.stop_container(sc.running_container)  # a stopped container's layers count
    found = findings(snapshot(sc, tmp_path), sc, min_age_seconds=0)
    layer_ids = {sub_id(sc, p) for p in sc.layers}
    claimed = {i for f in found for i in f.subvolume_ids}
    assert not layer_ids & claimed
    assert [f.target.path for f in of_kind(found, "orphan-layer")] == [sc.orphan_layer]


@pytest.mark.parametrize("roots", [None, ["/volume1"]])
def test_shares_outside_the_data_root_are_never_findings(
    sc: LeakScenario, tmp_path: Path, roots: list[str] | None
) -> None:
    """Not the share, nor what only looks like Docker's layers in it."""
    lookalike = f"{sc.share}/btrfs/subvolumes/{'e' * 64}"
    sc.btrfs.create_subvolume(lookalike)
    sc.btrfs.make_dirs(f"{sc.share}/btrfs/subvolumes/{'f' * 64}/etc")
    advance(sc, timedelta(days=2))
    cfg = {"roots": roots} if roots else {}
    found = findings(snapshot(sc, tmp_path, **cfg), sc, min_age_seconds=0)
    claimed = {i for f in found for i in f.subvolume_ids}
    assert not {sub_id(sc, sc.share), sub_id(sc, lookalike)} & claimed
    assert all(not (f.target.path or "").startswith(sc.share) for f in found)
    assert len(found) == 2


# --------------------------------------------------------------------------- named


def test_a_named_volume_holding_subvolumes_is_reported_marked_named(
    sc: LeakScenario, tmp_path: Path
) -> None:
    vol = sc.docker.add_volume("ci-cache")
    inner = f"{vol.mountpoint}/btrfs/subvolumes/{'a' * 64}"
    sc.btrfs.create_subvolume(inner)
    advance(sc, timedelta(days=2))
    found = findings(snapshot(sc, tmp_path), sc)
    f = about(found, name="ci-cache")
    assert f.kind == "dind-volume" and f.named
    assert f.subvolume_ids == (sub_id(sc, inner),) and f.blocked_by == ()
    text = "\n".join(f.evidence)
    assert "named volume ci-cache (driver local)" in text
    assert "someone chose this name" in text
    assert not about(found, name=sc.dind_volume).named


# --------------------------------------------------------------------------- ages


def test_min_age_blocks_what_is_younger(sc: LeakScenario, tmp_path: Path) -> None:
    snap = snapshot(sc, tmp_path)
    for f in findings(snap, sc, min_age_seconds=THREE_DAYS):
        assert f.age_seconds == THREE_DAYS and f.blocked_by == ()
    for f in findings(snap, sc, min_age_seconds=THREE_DAYS + 1):
        assert f.blocked_by == tuple(too_young(f)) and len(f.blocked_by) == 1, f.blocked_by
        assert f.blocked_by[0].endswith("the minimum age is 3 days")


def test_the_orphan_floor_holds_whatever_min_age_says(sc: LeakScenario, tmp_path: Path) -> None:
    fresh = f"{layer_dir(sc)}/{fake_hex('being-pulled')}"
    sc.btrfs.create_subvolume(fresh)
    advance(sc, timedelta(minutes=10))
    snap = snapshot(sc, tmp_path)

    def fresh_finding(**kw: int) -> Finding:
        return about(findings(snap, sc, **kw), path=fresh)

    f = fresh_finding(min_age_seconds=0)
    assert f.age_seconds == 600
    assert f.blocked_by == ("too_young: 10 min since its last change, the minimum age is 60 min",)
    assert fresh_finding(min_age_seconds=0, orphan_floor_seconds=0).blocked_by == ()
    assert fresh_finding(min_age_seconds=0, orphan_floor_seconds=600).blocked_by == ()
    assert fresh_finding(min_age_seconds=0, orphan_floor_seconds=601).blocked_by != ()
    # a min_age above the floor is what counts then
    assert fresh_finding(min_age_seconds=7200).blocked_by == (
        "too_young: 10 min since its last change, the minimum age is 2 h",
    )
    # the old orphan is past any floor of less than its age
    old = about(findings(snap, sc, min_age_seconds=0, orphan_floor_seconds=86400), path=fresh)
    assert old.blocked_by != ()
    old = about(
        findings(snap, sc, min_age_seconds=0, orphan_floor_seconds=86400), path=sc.orphan_layer
    )
    assert old.blocked_by == ()


def test_the_orphan_floor_holds_for_orphan_layer_folders(sc: LeakScenario, tmp_path: Path) -> None:
    loose = f"{layer_dir(sc)}/{'c' * 64}"
    sc.btrfs.make_dirs(f"{loose}/etc")
    advance(sc, timedelta(minutes=10))
    snap = snapshot(sc, tmp_path)
    assert about(findings(snap, sc, min_age_seconds=0), path=loose).blocked_by == (
        "too_young: 10 min since its last change, the minimum age is 60 min",
    )
    f = about(findings(snap, sc, min_age_seconds=0, orphan_floor_seconds=0), path=loose)
    assert f.blocked_by == ()


def test_the_orphan_floor_is_not_a_volumes(sc: LeakScenario, tmp_path: Path) -> None:
    vol = sc.docker.add_volume()
    sc.btrfs.create_subvolume(f"{vol.mountpoint}/btrfs/subvolumes/{'a' * 64}")
    advance(sc, timedelta(minutes=10))
    f = about(findings(snapshot(sc, tmp_path), sc, min_age_seconds=0), name=vol.name)
    assert f.kind == "dind-volume" and f.age_seconds == 600 and f.blocked_by == ()


def test_an_orphans_age_counts_from_its_last_change(sc: LeakScenario, tmp_path: Path) -> None:
    advance(sc, timedelta(minutes=-10))
    sc.btrfs.touch(f"{sc.orphan_layer}/layer.tar", new_name=True)
    advance(sc, timedelta(minutes=10))
    f = about(findings(snapshot(sc, tmp_path), sc, min_age_seconds=0), path=sc.orphan_layer)
    assert f.age_seconds == 600
    assert too_young(f) and f"last changed {(sc.now - timedelta(minutes=10)).isoformat()}" in (
        f.evidence
    )


def test_an_orphan_of_unknown_age_is_too_young_unless_its_creation_is_told(
    sc: LeakScenario, tmp_path: Path
) -> None:
    sc.btrfs.make_legacy(sc.orphan_layer)
    snap = snapshot(sc, tmp_path)
    f = about(findings(snap, sc, min_age_seconds=0), path=sc.orphan_layer)
    assert f.age_seconds is None
    assert f.blocked_by == (
        "too_young: its age is unknown, and a layer Docker is still writing looks orphaned",
    )
    assert "creation time unknown on this kernel" in f.evidence
    # the creation time the caller asked the btrfs side for
    told = {(sc.fs_uuid, sub_id(sc, sc.orphan_layer)): sc.now - timedelta(days=2)}
    f = about(findings(snap, sc, min_age_seconds=0, created_at=told), path=sc.orphan_layer)
    assert f.age_seconds == 2 * 86400 and f.blocked_by == ()
    assert f"created {(sc.now - timedelta(days=2)).isoformat()}" in f.evidence
    # without a uuid it is still found by its id, and its id is stable
    assert f.id == about(findings(snap, sc, min_age_seconds=0), path=sc.orphan_layer).id


WRITES: dict[str, Callable[[LeakScenario], object]] = {
    "a new name in a nested subvolume": lambda sc: sc.btrfs.touch(
        f"{sc.dind_ro_parent_child}/cache.db", new_name=True
    ),
    "a new folder at the top of its data": lambda sc: sc.btrfs.make_dirs(
        f"{sc.dind_mountpoint}/tmp"
    ),
    "a new nested subvolume": lambda sc: sc.btrfs.create_subvolume(
        f"{sc.dind_mountpoint}/btrfs/subvolumes/{'b' * 64}"
    ),
}


@pytest.mark.parametrize("write", WRITES)
def test_a_volumes_age_counts_from_its_last_write(
    sc: LeakScenario, tmp_path: Path, write: str
) -> None:
    """Created three days ago, written ten minutes ago: ten minutes old."""
    advance(sc, timedelta(minutes=-10))
    WRITES[write](sc)
    advance(sc, timedelta(minutes=10))
    f = about(findings(snapshot(sc, tmp_path), sc), name=sc.dind_volume)
    assert f.age_seconds == 600
    assert f.blocked_by == ("too_young: 10 min since the last write, the minimum age is 24 h",)
    text = "\n".join(f.evidence)
    assert f"created {(sc.now - timedelta(days=3)).isoformat()}" in text
    assert f"last written {(sc.now - timedelta(minutes=10)).isoformat()}" in text


# --------------------------------------------------------------------------- blocked_by


def _mount_in_dind(sc: LeakScenario) -> None:
    sc.btrfs.add_mount(f"{sc.dind_ro_parent}/tmp-mount")


def _private_mount_in_orphan(sc: LeakScenario) -> None:
    sc.btrfs.make_dirs(f"{sc.orphan_layer}/run")
    sc.btrfs.add_private_mount(f"{sc.orphan_layer}/run")


def _no_host_mount_table(sc: LeakScenario) -> None:
    sc.btrfs.host_mounts_error = "the agent runs in a pid namespace of its own"


ATTACKS: dict[str, Callable[[LeakScenario], object]] = {
    "nothing": lambda sc: None,
    "a tmpfs inside the dind volume": _mount_in_dind,
    "a stopped container binding a nested subvolume": lambda sc: sc.docker.add_container(
        "ci-user", running=False, binds=[(sc.dind_ro_parent_child, "/cache")]
    ),
    "a private mount inside the orphan": _private_mount_in_orphan,
    "the orphan mounted elsewhere": lambda sc: sc.btrfs.mount_subvolume(
        sc.orphan_layer, "/srv/cache"
    ),
    "the orphan as the default subvolume": lambda sc: sc.btrfs.set_default(sc.orphan_layer),
    "a container binding inside the loose folder": lambda sc: sc.docker.add_container(
        "peek", binds=[(f"{layer_dir(sc)}/{'c' * 64}/etc", "/etc2")]
    ),
    "a mount on the loose folder": lambda sc: sc.btrfs.add_mount(f"{layer_dir(sc)}/{'c' * 64}"),
    "no host mount table": _no_host_mount_table,
}


def _safety(snap: Snapshot, f: Finding) -> DeleteSet:
    if f.target.type == "volume":
        return plan_volume_delete(snap, str(f.target.name), protect_labels=DEFAULT_PROTECT_LABELS)
    if f.target.type == "folder":
        return plan_folder_delete(snap, str(f.target.path), protect_labels=DEFAULT_PROTECT_LABELS)
    return plan_subvolume_delete(
        snap, str(f.fs_uuid), int(f.target.id or 0), protect_labels=DEFAULT_PROTECT_LABELS
    )


@pytest.mark.parametrize("attack", ATTACKS)
def test_blocked_by_is_what_the_safety_rules_refuse(
    sc: LeakScenario, tmp_path: Path, attack: str
) -> None:
    """A finding is shown blocked exactly when a delete of it would be refused, with the
    refusal's code and words."""
    sc.btrfs.make_dirs(f"{layer_dir(sc)}/{'c' * 64}/etc")
    ATTACKS[attack](sc)
    advance(sc, timedelta(hours=2))  # every target older than the orphan floor
    snap = snapshot(sc, tmp_path)
    found = findings(snap, sc, min_age_seconds=0)
    assert {f.kind for f in found} == {"dind-volume", "orphan-layer", "orphan-layer-folder"}
    blocked = 0
    for f in found:
        assert not too_young(f)
        try:
            _safety(snap, f)
        except (Refused, Unavailable) as exc:
            assert f.blocked_by == (f"{exc.code}: {exc.detail}",), f.target
            blocked += 1
        else:
            assert f.blocked_by == (), f.target
    assert blocked == {"nothing": 0, "no host mount table": 3}.get(attack, 1)


def test_a_blocked_volume_still_says_what_it_holds(sc: LeakScenario, tmp_path: Path) -> None:
    _mount_in_dind(sc)
    f = about(findings(snapshot(sc, tmp_path), sc), name=sc.dind_volume)
    assert f.blocked_by and f.blocked_by[0].startswith("in_use: ")
    assert sorted(f.subvolume_ids) == sorted(sub_id(sc, p) for p in sc.dind_nested)
    child, parent = sub_id(sc, sc.dind_ro_parent_child), sub_id(sc, sc.dind_ro_parent)
    assert f.subvolume_ids.index(child) < f.subvolume_ids.index(parent)
    assert f.reclaimable_bytes == 8 * MiB + 6 * 16 * KiB and f.fs_uuid == sc.fs_uuid


def test_every_reason_is_listed(sc: LeakScenario, tmp_path: Path) -> None:
    _mount_in_dind(sc)
    f = about(findings(snapshot(sc, tmp_path), sc, min_age_seconds=4 * 86400), name=sc.dind_volume)
    assert [b.split(":", 1)[0] for b in f.blocked_by] == ["in_use", "too_young"]


@pytest.mark.parametrize(
    ("labels", "protect", "why"),
    [
        ({"ci.keep": "true"}, ("ci.keep",), "label ci.keep=true"),
        ({"ci.keep": "true"}, DEFAULT_PROTECT_LABELS, None),
        ({"ci.keep": "no"}, ("ci.keep",), None),
        ({"keep": ""}, (), "label keep"),  # always protects, whatever the policy lists
        ({"nas-janitor.keep": "1"}, (), "label nas-janitor.keep=1"),
        ({"keep": "false"}, (), None),
    ],
)
def test_protect_labels_block_a_volume(
    sc: LeakScenario,
    tmp_path: Path,
    labels: dict[str, str],
    protect: tuple[str, ...],
    why: str | None,
) -> None:
    vol = sc.docker.add_volume("kc", labels=labels)
    sc.btrfs.create_subvolume(f"{vol.mountpoint}/btrfs/subvolumes/{'a' * 64}")
    advance(sc, timedelta(days=2))
    snap = snapshot(sc, tmp_path)
    f = about(findings(snap, sc, protect_labels=protect), name="kc")
    assert f.blocked_by == ((f"protected: volume kc is protected by its {why}",) if why else ())
    # the other findings do not depend on labels they do not carry
    assert about(findings(snap, sc, protect_labels=protect), name=sc.dind_volume).blocked_by == ()


# --------------------------------------------------------------------------- layerdb, kinds, ids


def test_nothing_about_layers_when_the_layerdb_cannot_be_read(
    sc: LeakScenario, tmp_path: Path
) -> None:
    """An empty layer store (the data root copied without ``image/``) would make every
    layer look orphaned: no layer finding of any kind then."""
    sc.btrfs.make_dirs(f"{layer_dir(sc)}/{'c' * 64}/etc")
    replace_with_folder(sc, sc.image_layers[0])
    sc.docker.set_layer_refs(sc.data_root, LayerRefs())  # what read_layer_refs answers then
    advance(sc, timedelta(days=2))
    snap = snapshot(sc, tmp_path)
    assert not snap.layerdb_known
    assert len(snap.layer_folders) == 2
    found = findings(snap, sc, min_age_seconds=0)
    assert [f.kind for f in found] == ["dind-volume"]
    claimed = {i for f in found for i in f.subvolume_ids}
    assert sub_id(sc, sc.orphan_layer) not in claimed


def test_kinds_choose_what_is_computed(tmp_path: Path) -> None:
    scene = every_kind()
    snap = snapshot(scene.sc, tmp_path)
    every = findings(snap, scene.sc, min_age_seconds=0)
    assert {f.kind for f in every} == set(FINDING_KINDS)
    for kind in FINDING_KINDS:
        only = findings(snap, scene.sc, min_age_seconds=0, kinds=(kind,))
        assert [f.id for f in only] == [f.id for f in every if f.kind == kind], kind
    two = findings(snap, scene.sc, min_age_seconds=0, kinds=("layer-folder", "dangling-volume"))
    assert {f.kind for f in two} == {"layer-folder", "dangling-volume"}
    assert findings(snap, scene.sc, kinds=()) == []


def test_finding_ids_are_stable_for_the_same_state(tmp_path: Path) -> None:
    scene = every_kind()
    sc = scene.sc
    first = findings(snapshot(sc, tmp_path), sc, min_age_seconds=0)
    again = findings(snapshot(sc, tmp_path), sc, min_age_seconds=0)
    assert [f.id for f in first] == [f.id for f in again]
    assert len({f.id for f in first}) == len(first)
    assert all(f.id.startswith(f.kind + "-") for f in first)
    # time passing and writes that change no target's identity keep them
    advance(sc, timedelta(hours=5))
    sc.btrfs.touch(f"{sc.dind_ro_parent_child}/x")
    sc.btrfs.touch(sc.orphan_layer)
    later = findings(snapshot(sc, tmp_path), sc, min_age_seconds=0)
    assert [f.id for f in later] == [f.id for f in first]
    assert later[0].generations != first[0].generations
    # and the same state built again gives the same ids
    rebuilt = every_kind()
    assert [f.id for f in findings(snapshot(rebuilt.sc, tmp_path), rebuilt.sc)] == [
        f.id for f in first
    ]
