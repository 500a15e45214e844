"""Attacks on the safety rules: what a busy NAS, or a person, can do that would end in
a delete of something that is not a Docker leftover, each with the rule that stops it
(each was found failing first, and closed since)."""

from __future__ import annotations

import posixpath
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from agent.domain.inventory import Inventory
from agent.domain.plans import Action, Plan, build_plan
from agent.domain.recheck import Skipped, recheck
from agent.domain.safety import DeleteSet, plan_subvolume_delete, plan_volume_delete
from agent.domain.snapshot import Snapshot
from agent.errors import HeldByProcess, InUse, OutsideRoots, Protected, TooYoung
from agent.host.records import VolumeRecord
from shared.policy import DEFAULT_PROTECT_LABELS, Policy
from tests.agent.domain.scenes import advance, findings, subvolume
from tests.agent.http.apphelpers import agent_config
from tests.fakes import FakeBtrfs, FakeDocker, LeakScenario, fake_hex, make_leak_scenario

LABELS = DEFAULT_PROTECT_LABELS


def snapshot(sc: LeakScenario, tmp_path: Path) -> Snapshot:
    return Inventory(agent_config(tmp_path), btrfs=sc.btrfs, docker=sc.docker).take()


def test_a_layer_being_pulled_on_a_daemon_with_no_layer_records_yet_is_not_deletable(
    tmp_path: Path,
) -> None:
    """A fresh (or fully pruned) daemon pulls its first image: the layer's subvolume is
    made in ``btrfs/subvolumes/`` first, and Docker writes its ``layerdb`` record only
    when the layer is complete. Until then no record exists at all, so the agent cannot
    tell layers from orphans (``layerdb_known`` is False) and files the subvolume as
    ``other``: no layer rule and no age floor apply, and a direct delete of it, seconds
    old, is allowed (rule 3 says: not until it has been unchanged for an hour)."""
    sc = make_leak_scenario()  # for its clock only
    fs = FakeBtrfs(now=sc.now)
    filesystem = fs.add_filesystem(mount="/volume1")
    fs.create_subvolume("/volume1/docker")
    docker = FakeDocker(btrfs=fs, data_root="/volume1/docker", now=sc.now)
    pulling = f"/volume1/docker/btrfs/subvolumes/{fake_hex('first-pull')}"
    fs.create_subvolume(pulling)  # made right now, no record yet
    inv = Inventory(agent_config(tmp_path), btrfs=fs, docker=docker)
    snap = inv.take()
    sub = fs.subvolume(pulling)
    assert sub is not None
    assert snap.subvolume(filesystem.uuid, sub.id).owner_kind == "other"  # type: ignore[union-attr]
    with pytest.raises((TooYoung, Protected)):
        plan_subvolume_delete(snap, filesystem.uuid, sub.id, protect_labels=LABELS)


# ------------------------------------------------ Docker's volumes folder on another disk

EXT4 = "8:17"  # /dev/sdb1, an ext4 disk


def _volumes_on_another_disk() -> tuple[LeakScenario, str, VolumeRecord]:
    """``<data_root>/volumes`` bind-mounted from an ext4 disk (a NAS owner moving
    volumes to a bigger disk: ``mount --bind /volumeUSB1/docker-volumes
    /volume1/docker/volumes``), and a dangling anonymous volume there."""
    sc = make_leak_scenario()
    sc.btrfs.add_mount(
        f"{sc.data_root}/volumes",
        fstype="ext4",
        source="/dev/sdb1",
        root="/docker-volumes",
        dev=EXT4,
    )
    vol = sc.docker.add_volume()  # anonymous, no container
    return sc, vol.name, vol


def test_a_volume_on_another_disk_exposed_elsewhere_is_not_emptied(tmp_path: Path) -> None:
    """The dangling volume's ``_data`` is also bind-mounted elsewhere (shared over SMB
    at ``/volume1/public/exports``): rule 4 says "nothing mounted elsewhere too (a bind
    mount of it or of anything in it)". The agent places the volume's folder in the
    btrfs filesystem whose mount point holds its path by string (``fs_for_host_path``),
    not in the ext4 disk that is mounted there, so the bind mount of it (a mount of the
    ext4 disk) is not seen: the volume's files, which the share serves, are removed."""
    sc, name, _ = _volumes_on_another_disk()
    sc.btrfs.make_dirs("/volume1/public/exports")
    sc.btrfs.add_mount(
        "/volume1/public/exports",
        fstype="ext4",
        source="/dev/sdb1",
        root=f"/docker-volumes/{name}/_data",
        dev=EXT4,
    )
    snap = snapshot(sc, tmp_path)
    # refused whatever shows it: the folder does not lie on the btrfs filesystem
    with pytest.raises(Protected, match=r"not on the btrfs filesystem.*ext4 from /dev/sdb1"):
        plan_volume_delete(snap, name, protect_labels=LABELS)


def test_a_file_held_open_in_a_volume_on_another_disk_blocks_it(tmp_path: Path) -> None:
    """A process (not a container: a backup job, a media indexer) has a file open in the
    dangling volume's ``_data``. The held path is placed, rightly, in the ext4 disk; the
    volume's folder, wrongly, in the btrfs filesystem under it: they never meet, and
    the volume is emptied under the open file."""
    sc, name, vol = _volumes_on_another_disk()
    sc.btrfs.hold(f"{vol.mountpoint}/library.db", "pid 777 (indexer), open file")
    snap = snapshot(sc, tmp_path)
    with pytest.raises(Protected, match="not on the btrfs filesystem"):
        plan_volume_delete(snap, name, protect_labels=LABELS)


def test_the_same_volume_on_the_btrfs_filesystem_is_blocked(tmp_path: Path) -> None:
    """The control: without the ext4 disk, the same open file blocks the same volume."""
    sc = make_leak_scenario()
    vol = sc.docker.add_volume()
    sc.btrfs.hold(f"{vol.mountpoint}/library.db", "pid 777 (indexer), open file")
    snap = snapshot(sc, tmp_path)
    with pytest.raises(HeldByProcess):
        plan_volume_delete(snap, vol.name, protect_labels=LABELS)


# ------------------------------------------------------------------ resuming a named volume


def test_resuming_a_named_dind_volume_whose_subvolumes_all_went_finishes_it(
    tmp_path: Path,
) -> None:
    """Not a lost file, a broken promise (README, rule 8: "a job cut short reads
    interrupted, and applying its plan again finishes it"). A plan with
    ``include_named_volumes`` removes the named docker-in-docker volume ``ci-cache``;
    the agent is cut short after its subvolumes went and before ``docker volume rm``.
    Resumed, the volume is a named volume holding no subvolume, which the safety rules
    refuse outright: the job can never finish it, and what the inner daemon left as
    plain files stays."""
    sc = make_leak_scenario()
    vol = sc.docker.add_volume("ci-cache")
    inner = f"{vol.mountpoint}/btrfs/subvolumes/{fake_hex('ci-layer')}"
    sc.btrfs.create_subvolume(inner)
    sc.btrfs.write_file(f"{vol.mountpoint}/image/btrfs/repositories.json")
    advance(sc, timedelta(hours=2))
    snap = snapshot(sc, tmp_path)
    policy = Policy(
        kinds=("dind-volume",), min_age_seconds=0, protect_labels=(), include_named_volumes=True
    )
    found = findings(snap, sc, min_age_seconds=0, protect_labels=policy.protect_labels)
    plan = build_plan(found, policy, plan_id="p", now=snap.taken_at, ttl_seconds=900)
    [action] = [a for a in plan.actions if a.target.name == "ci-cache"]
    sc.btrfs.destroy(inner)  # the first attempt, cut short after this
    result = recheck(snapshot(sc, tmp_path), plan, action, resuming=True)
    assert isinstance(result, DeleteSet), result
    assert result.subvolumes == () and result.volume is not None


def _named_dind_plan(sc: LeakScenario, tmp_path: Path) -> tuple[Plan, Action, str]:
    """A plan removing the named docker-in-docker volume ``ci-cache`` (its one inner
    layer subvolume's path returned too), made with ``include_named_volumes``."""
    vol = sc.docker.add_volume("ci-cache")
    inner = f"{vol.mountpoint}/btrfs/subvolumes/{fake_hex('ci-layer')}"
    sc.btrfs.create_subvolume(inner)
    advance(sc, timedelta(hours=2))
    snap = snapshot(sc, tmp_path)
    policy = Policy(
        kinds=("dind-volume",), min_age_seconds=0, protect_labels=(), include_named_volumes=True
    )
    found = findings(snap, sc, min_age_seconds=0, protect_labels=policy.protect_labels)
    plan = build_plan(found, policy, plan_id="p", now=snap.taken_at, ttl_seconds=900)
    [action] = [a for a in plan.actions if a.target.name == "ci-cache"]
    return plan, action, inner


def _refused(result: object, code: str = "protected") -> str:
    assert isinstance(result, Skipped), result
    assert result.code == code, result
    return result.detail


def test_a_resumed_named_volume_finishes_from_the_stored_plan_too(tmp_path: Path) -> None:
    """The plan as the state store keeps it (JSON) carries the volume's identity."""
    sc = make_leak_scenario()
    plan, action, inner = _named_dind_plan(sc, tmp_path)
    assert action.volume_identity is not None
    stored = Plan.from_json(plan.to_json())
    sc.btrfs.destroy(inner)
    result = recheck(snapshot(sc, tmp_path), stored, stored.action(action.seq), resuming=True)
    assert isinstance(result, DeleteSet), result
    assert result.volume is not None and result.volume.name == "ci-cache"


def test_a_resumed_named_volume_is_known_by_its_folder_not_dockers_creation_time(
    tmp_path: Path,
) -> None:
    """Docker's local driver reports the change time of ``_data`` as a volume's
    creation (seen on the lab: it moved when the subvolumes went): the identity is the
    volume's folder, which stays."""
    sc = make_leak_scenario()
    plan, action, inner = _named_dind_plan(sc, tmp_path)
    sc.btrfs.destroy(inner)
    rec = sc.docker.volumes_by_name["ci-cache"]
    sc.docker.volumes_by_name["ci-cache"] = replace(rec, created_at=sc.btrfs.now)
    result = recheck(snapshot(sc, tmp_path), plan, action, resuming=True)
    assert isinstance(result, DeleteSet), result


def test_a_named_volume_emptied_by_others_is_not_removed_by_a_fresh_run(tmp_path: Path) -> None:
    """Not resuming (no attempt of this job started it): a named volume whose
    subvolumes went by other hands is a named volume holding nothing, refused."""
    sc = make_leak_scenario()
    plan, action, inner = _named_dind_plan(sc, tmp_path)
    sc.btrfs.destroy(inner)
    assert "named volume holding no btrfs subvolume" in _refused(
        recheck(snapshot(sc, tmp_path), plan, action, resuming=False)
    )


def test_a_named_volume_made_again_under_the_same_name_is_not_finished(tmp_path: Path) -> None:
    """After the crash someone removed ``ci-cache`` and made a new, empty ``ci-cache``
    (a database's, say): the same name, another volume. Resuming refuses it."""
    sc = make_leak_scenario()
    plan, action, inner = _named_dind_plan(sc, tmp_path)
    sc.btrfs.destroy(inner)
    sc.docker.remove_volume("ci-cache")
    advance(sc, timedelta(minutes=5))
    sc.docker.add_volume("ci-cache")
    sc.btrfs.write_file(f"{sc.data_root}/volumes/ci-cache/_data/pgdata/PG_VERSION")
    detail = _refused(recheck(snapshot(sc, tmp_path), plan, action, resuming=True))
    assert "not provably the volume the plan named" in detail


def test_a_plan_stored_without_the_volumes_identity_is_not_finished(tmp_path: Path) -> None:
    """A plan stored before plans recorded a volume's creation time: what volume it
    named cannot be proved, so an empty named volume stays refused."""
    sc = make_leak_scenario()
    plan, action, inner = _named_dind_plan(sc, tmp_path)
    data = plan.to_json()
    for a in data["actions"]:
        del a["volume_identity"]
    old = Plan.from_json(data)
    sc.btrfs.destroy(inner)
    _refused(recheck(snapshot(sc, tmp_path), old, old.action(action.seq), resuming=True))


def test_an_action_that_planned_no_subvolume_does_not_finish_a_named_volume(
    tmp_path: Path,
) -> None:
    """An action naming a named volume with no subvolume planned in it (no plan makes
    one: such a volume is refused at plan time) never opens the way, resuming or not."""
    sc = make_leak_scenario()
    plan, action, inner = _named_dind_plan(sc, tmp_path)
    bare = replace(action, generations=(), subvolume_ids=())
    forged = replace(plan, actions=(bare,))
    sc.btrfs.destroy(inner)
    _refused(recheck(snapshot(sc, tmp_path), forged, bare, resuming=True))


@pytest.mark.parametrize("change", ["keep-label", "container", "new-subvolume"])
def test_resuming_a_named_volume_keeps_every_other_rule(tmp_path: Path, change: str) -> None:
    """Resumed and provably the planned volume, it is still refused when it is now
    labelled ``keep``, used by a (stopped) container, or holds a new subvolume."""
    sc = make_leak_scenario()
    plan, action, inner = _named_dind_plan(sc, tmp_path)
    sc.btrfs.destroy(inner)
    if change == "keep-label":
        rec = sc.docker.volumes_by_name["ci-cache"]
        sc.docker.volumes_by_name["ci-cache"] = replace(rec, labels={"keep": "true"})
        code = "protected"
    elif change == "container":
        sc.docker.add_container("runner", running=False, volumes=["ci-cache"])
        code = "in_use"
    else:
        sc.btrfs.create_subvolume(f"{sc.data_root}/volumes/ci-cache/_data/btrfs/new")
        code = "changed"
    _refused(recheck(snapshot(sc, tmp_path), plan, action, resuming=True), code)


# ------------------------------------------- a subvolume holding Docker's data root itself


def test_the_data_root_holding_a_kept_volume_is_not_deletable_under_a_wider_root(
    tmp_path: Path,
) -> None:
    """The roots are wider than Docker's data root (``roots: [/volume1]``, to reach an
    old data root left beside it). Docker has no image and no container (``docker
    system prune -a`` with everything stopped: volumes stay), and one volume, ``db``,
    labelled ``keep=true``, holds a database as plain files. A direct delete of the
    data root's subvolume checks only the subvolumes it destroys: no layer is left to
    refuse, the volumes inside are not looked at, and ``db`` goes with it (rule 3:
    never "a volume labelled keep"; nor "a named volume that holds no subvolume").

    Emulated: the fake dockerd's bind mounts of its data root onto itself are taken
    away, as on a host where dockerd does not make them; where it does, the mount
    refuses the delete instead (the only thing that does)."""
    sc = make_leak_scenario()  # for its clock only
    fs = FakeBtrfs(now=sc.now)
    filesystem = fs.add_filesystem(mount="/volume1")
    fs.create_subvolume("/volume1/docker")
    docker = FakeDocker(btrfs=fs, data_root="/volume1/docker", now=sc.now)
    fs.unmount("/volume1/docker/btrfs")
    fs.unmount("/volume1/docker")
    db = docker.add_volume("db", labels={"keep": "true"})
    fs.write_file(f"{db.mountpoint}/pgdata/base/16384/1259")
    inv = Inventory(agent_config(tmp_path, roots=["/volume1"]), btrfs=fs, docker=docker)
    snap = inv.take()
    root = fs.subvolume("/volume1/docker")
    assert root is not None
    with pytest.raises(Protected):
        plan_subvolume_delete(snap, filesystem.uuid, root.id, protect_labels=LABELS)


# ------------------------------------------------- a container's bind source through a link


def test_a_stopped_container_binding_the_volume_through_a_symlink_blocks_it(
    tmp_path: Path,
) -> None:
    """A NAS owner made a shortcut ``/volume1/shortcuts/ci -> <the dind volume>/_data``
    and a CI runner container, stopped between jobs, bind-mounts the shortcut as its
    ``/var/lib/docker`` (Docker keeps a bind's source as it was written, and the kernel
    follows the link only when the container starts). Rule 4: "nothing a container,
    running or stopped, mounts as ... a bind mount". The container uses are matched by
    the source's spelling alone, so the stopped runner's data root is removed.

    Closed: bind sources are resolved on the host, and both the written path and the
    resolved one count as in use."""
    sc = make_leak_scenario()
    sc.btrfs.symlink("/volume1/shortcuts/ci", sc.dind_mountpoint)
    sc.docker.add_container(
        "ci-runner", running=False, binds=[("/volume1/shortcuts/ci", "/var/lib/docker")]
    )
    snap = snapshot(sc, tmp_path)
    with pytest.raises(InUse):
        plan_volume_delete(snap, sc.dind_volume, protect_labels=LABELS)


def _runner_binding(sc: LeakScenario, source: str, *, running: bool = False) -> None:
    sc.docker.add_container("ci-runner", running=running, binds=[(source, "/var/lib/docker")])


@pytest.mark.parametrize(
    ("links", "source"),
    [
        # a relative link
        ({"/volume1/docker/volumes/ci": "{vol}/_data"}, "/volume1/docker/volumes/ci"),
        # a chain of links, absolute then relative
        (
            {"/volume1/a": "/volume1/b", "/volume1/b": "docker/volumes/{name}"},
            "/volume1/a/_data/btrfs",
        ),
        # a link as a middle component, then the rest as written
        ({"/volume1/s": "/volume1/docker/volumes"}, "/volume1/s/{name}/_data"),
        # a link to a folder holding the volume (not the data root)
        ({"/volume1/vols": "/volume1/docker/volumes"}, "/volume1/vols"),
        # ".." out of a link's target, and past the host's root (stays at /)
        ({"/volume1/x/up": "../../../../volume1/docker"}, "/volume1/x/up/volumes/{name}"),
    ],
    ids=["relative", "chain", "middle", "holder", "dotdot"],
)
def test_a_bind_through_any_symlink_blocks_the_volume(
    tmp_path: Path, links: dict[str, str], source: str
) -> None:
    sc = make_leak_scenario()
    vol = posixpath.dirname(sc.dind_mountpoint)
    name = sc.dind_volume
    for link, target in links.items():
        sc.btrfs.symlink(link, target.format(vol=vol, name=name))
    _runner_binding(sc, source.format(vol=vol, name=name))
    with pytest.raises(InUse, match="resolves to"):
        plan_volume_delete(snapshot(sc, tmp_path), name, protect_labels=LABELS)


def test_a_bind_through_a_symlink_to_the_data_root_is_a_wide_view(tmp_path: Path) -> None:
    """As when written as the data root itself: a backup container's view of all."""
    sc = make_leak_scenario()
    sc.btrfs.symlink("/volume1/all-of-docker", sc.data_root)
    _runner_binding(sc, "/volume1/all-of-docker")
    assert plan_volume_delete(snapshot(sc, tmp_path), sc.dind_volume, protect_labels=LABELS)


@pytest.mark.parametrize("what", ["dangling", "loop", "unreadable"])
def test_a_bind_source_that_cannot_be_resolved_blocks_every_target(
    tmp_path: Path, what: str
) -> None:
    """A dangling link (once its target is made it may point anywhere), a loop, a part
    that cannot be read: what the container will use cannot be told, so nothing looks
    unused, and the blocker says why. The finding says it too."""
    sc = make_leak_scenario()
    if what == "dangling":
        sc.btrfs.symlink("/volume1/shortcuts/ci", "/volume1/usb/not-plugged-in")
    elif what == "loop":
        sc.btrfs.symlink("/volume1/shortcuts/ci", "ci2")
        sc.btrfs.symlink("/volume1/shortcuts/ci2", "/volume1/shortcuts/ci")
    else:
        sc.btrfs.unreadable.add("/volume1/shortcuts")
    _runner_binding(sc, "/volume1/shortcuts/ci/docker")
    snap = snapshot(sc, tmp_path)
    with pytest.raises(InUse, match="cannot be resolved on the host") as err:
        plan_volume_delete(snap, sc.dind_volume, protect_labels=LABELS)
    assert {"dangling": "dangling", "loop": "loop", "unreadable": "Permission"}[what] in str(
        err.value.detail
    )
    with pytest.raises(InUse):
        plan_subvolume_delete(
            snap, sc.fs_uuid, subvolume(sc, sc.orphan_layer).id, protect_labels=LABELS
        )
    [dind] = [f for f in findings(snap, sc, min_age_seconds=0) if f.target.name == sc.dind_volume]
    assert any("cannot be resolved" in b for b in dind.blocked_by), dind.blocked_by


def test_a_symlink_made_after_the_plan_is_seen_by_the_job(tmp_path: Path) -> None:
    """The runner is set up between plan and apply: the job's check sees it."""
    sc = make_leak_scenario()
    advance(sc, timedelta(hours=2))
    policy = Policy(kinds=("dind-volume",), min_age_seconds=0, protect_labels=())
    snap = snapshot(sc, tmp_path)
    plan = build_plan(
        findings(snap, sc, min_age_seconds=0, protect_labels=()),
        policy,
        plan_id="p",
        now=snap.taken_at,
        ttl_seconds=900,
    )
    [action] = [a for a in plan.actions if a.target.name == sc.dind_volume]
    sc.btrfs.symlink("/volume1/shortcuts/ci", sc.dind_mountpoint)
    _runner_binding(sc, "/volume1/shortcuts/ci")
    assert "resolves to" in _refused(recheck(snapshot(sc, tmp_path), plan, action), "in_use")


def test_the_same_container_binding_the_volume_by_its_own_path_blocks_it(
    tmp_path: Path,
) -> None:
    """The control: bound by the volume's own path, the stopped runner blocks it."""
    sc = make_leak_scenario()
    sc.docker.add_container(
        "ci-runner", running=False, binds=[(sc.dind_mountpoint, "/var/lib/docker")]
    )
    snap = snapshot(sc, tmp_path)
    with pytest.raises(InUse):
        plan_volume_delete(snap, sc.dind_volume, protect_labels=LABELS)


# ------------------------------------------------------------ colliding volume mountpoints


def test_a_dangling_volume_reporting_another_volumes_data_as_its_mountpoint_is_refused(
    tmp_path: Path,
) -> None:
    """An anonymous volume of a volume plugin (a legacy, unmanaged one: it may report
    any ``Mountpoint``) says its mountpoint is ``<data_root>/volumes/named/_data``,
    the data of the named volume ``named``. The agent takes the mountpoint as the
    volume's own folder: it plans the anonymous volume as dangling, guards only
    ``volumes/named`` (which no container uses), and empties ``named``'s data before
    asking Docker to remove the anonymous volume. Nothing checks that a volume's
    mountpoint is ``<data_root>/volumes/<its own name>/_data``, nor its driver."""
    sc = make_leak_scenario()
    sc.btrfs.write_file(f"{sc.data_root}/volumes/named/_data/important.txt")
    name = "ab" * 32
    sc.docker.volumes_by_name[name] = VolumeRecord(
        name=name,
        driver="legacy-plugin",
        mountpoint=f"{sc.data_root}/volumes/named/_data",
        labels={},
        created_at=sc.now,
        anonymous=True,
    )
    snap = snapshot(sc, tmp_path)
    with pytest.raises((Protected, OutsideRoots)):
        plan_volume_delete(snap, name, protect_labels=LABELS)
