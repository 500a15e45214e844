"""The findings' shortcuts give what the plain code gave: the safety rules are the
same, so every finding, its blockers and its subvolumes must be too.

The plain versions of what was replaced are kept here as they were and put back in
place (``monkeypatch``) to compute the same findings the old way."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence
from pathlib import Path

import pytest

from agent.domain import paths, safety
from agent.domain.paths import VOLUME_NAME, LinkMemo
from agent.domain.safety import (
    DeleteSet,
    _check_member,
    _check_root_path,
    _check_volume_usable,
    _guard_entry,
    _readonly_parents,
    check_guard,
)
from agent.domain.snapshot import Snapshot, SubvolView
from agent.errors import NotFound, OutsideRoots, Protected, ValidationFailed
from tests.agent.domain.scenes import findings, snapshot
from tests.fakes import LeakScenario, fake_hex, make_leak_scenario

# ------------------------------------------------------------- the plain versions


def old_layer_of(snap: Snapshot, path: str) -> str | None:
    layer_dir = posixpath.join(snap.docker.data_root, "btrfs", "subvolumes")
    if not paths.is_under(path, layer_dir) or path.rstrip("/") == layer_dir.rstrip("/"):
        return None
    name = path[len(layer_dir.rstrip("/")) + 1 :].split("/", 1)[0]
    return posixpath.join(layer_dir, name)


def old_no_link(self: LinkMemo, path: str) -> bool:
    parent, name = posixpath.split(path)
    if not name:
        return True
    ok = self._folders.get(parent)
    if ok is None:
        ok = self._folders[parent] = self.no_link(parent)
    return ok and not self._is_link(parent, name, path)


def old_plan_volume_delete(
    snap: Snapshot, name: str, *, protect_labels: Sequence[str]
) -> DeleteSet:
    if not VOLUME_NAME.match(name):
        raise ValidationFailed("invalid volume name", errors={"name": ["not a Docker volume name"]})
    vol = snap.volumes.get(name)
    if vol is None:
        raise NotFound(f"no volume named {name}")
    _check_volume_usable(vol, protect_labels)
    if not vol.nested and not vol.record.anonymous:
        raise Protected(
            f"volume {name} is a named volume holding no btrfs subvolume: not a leftover "
            "this agent removes (`docker volume rm` can, if that is what you want)"
        )
    mountpoint = _check_root_path(snap, vol.record.mountpoint, f"volume {name}")
    own = posixpath.join(snap.docker.data_root, "volumes", name, "_data")
    if vol.record.driver != "local" or mountpoint.rstrip("/") != own:
        raise Protected(
            f"volume {name} (driver {vol.record.driver}) has its data at {mountpoint}, "
            f"not at {own} where Docker's local driver keeps a volume's data"
        )
    folder = posixpath.dirname(mountpoint)
    holder = snap.fs_for_host_path(folder)
    if holder is None:
        raise OutsideRoots(f"volume {name} lives at {mountpoint}, on no btrfs filesystem here")
    guard = (_guard_entry(snap, holder.uuid, folder),)
    check_guard(snap, guard, snap.mounts)
    members: dict[tuple[str, int], SubvolView] = {}
    for sv in vol.nested:
        for member in snap.subtree(sv.fs_uuid, sv.id):
            members[(member.fs_uuid, member.id)] = member
    if {k[0] for k in members} - {holder.uuid}:
        raise Protected(f"volume {name} spans several filesystems; refusing")
    for member in members.values():
        _check_member(snap, member, protect_labels, own_volume=name)
    ordered = tuple(snap.delete_order(members.values()))
    return DeleteSet(
        fs_uuid=holder.uuid,
        subvolumes=ordered,
        clear_readonly=_readonly_parents(snap, ordered),
        volume=vol,
        guard=guard,
    )


def the_old_way(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safety, "_layer_of", old_layer_of)
    monkeypatch.setattr(LinkMemo, "no_link", old_no_link)
    monkeypatch.setattr(safety, "plan_volume_delete", old_plan_volume_delete)
    import agent.domain.findings as found

    monkeypatch.setattr(found, "plan_volume_delete", old_plan_volume_delete)


# ------------------------------------------------------------- a scene with much in it


def big_scene() -> LeakScenario:
    """The leak scenario and more: dind volumes whose subvolumes nest two and three
    deep (some inside read-only ones), one labelled keep, one used by a stopped
    container, one holding a subvolume mounted elsewhere and the default subvolume;
    orphan layers, one holding a subvolume; a subvolume inside a referenced layer."""
    sc = make_leak_scenario()
    fs, docker = sc.btrfs, sc.docker
    for v in range(4):
        labels = {"keep": "true"} if v == 1 else None
        vol = docker.add_volume(labels=labels)
        base = f"{vol.mountpoint}/btrfs/subvolumes"
        for i in range(12):
            top = f"{base}/{fake_hex('sv', v, i)}"
            fs.create_subvolume(top, read_only=(i == 3))
            if i % 3 == 0:
                inner = f"{top}/nested-{i}"
                fs.create_subvolume(inner)
                if i % 6 == 0:
                    fs.create_subvolume(f"{inner}/deeper")
        if v == 2:
            docker.add_container("user", image=sc.image, running=False, volumes=[vol.name])
        if v == 3:
            fs.mount_subvolume(f"{base}/{fake_hex('sv', v, 5)}", "/mnt/elsewhere")
            fs.set_default(f"{base}/{fake_hex('sv', v, 7)}")  # someone's default subvolume
    layers = f"{sc.data_root}/btrfs/subvolumes"
    for k in range(5):
        orphan = f"{layers}/{fake_hex('orphan-more', k)}"
        fs.create_subvolume(orphan)
        if k == 2:
            fs.create_subvolume(f"{orphan}/inside")
    fs.create_subvolume(f"{sc.container_layers[0]}/dind-data")
    return sc


def test_the_findings_are_the_old_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sc = big_scene()
    for min_age in (0, 86400):
        new = findings(snapshot(sc, tmp_path), sc, min_age_seconds=min_age)
        with monkeypatch.context() as m:
            the_old_way(m)
            old = findings(snapshot(sc, tmp_path), sc, min_age_seconds=min_age)
        assert new == old
        assert any(f.blocked_by for f in new) and any(not f.blocked_by for f in new)
        assert sum(len(f.subvolume_ids) for f in new) > 60


def test_a_volume_delete_is_planned_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sc = big_scene()
    snap = snapshot(sc, tmp_path)
    for name in sorted(snap.volumes):
        outcomes = []
        for plan in (safety.plan_volume_delete, old_plan_volume_delete):
            try:
                outcomes.append(plan(snap, name, protect_labels=("keep",)))
            except Exception as exc:  # the refusal itself is compared
                outcomes.append((type(exc), str(exc)))
        assert outcomes[0] == outcomes[1], name


def test_the_symlink_answers_are_the_old_ones(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "a" / "b").mkdir(parents=True)
    (root / "real").mkdir()
    (root / "a" / "link").symlink_to(root / "real")
    (root / "a" / "b" / "file").write_text("x")
    for n in range(12):  # enough entries for the folder to be read at once
        (root / "a" / f"e{n}").mkdir()
    asked = [
        "/",
        str(tmp_path),
        str(root / "a" / "link"),
        str(root / "a" / "link" / "inside"),
        str(root / "a" / "b" / "file"),
        str(root / "a" / "missing"),
        *(str(root / "a" / f"e{n}") for n in range(12)),
        str(root / "a" / "link"),
    ]
    new, old = LinkMemo(), LinkMemo()
    for path in asked:
        assert new.no_link(path) == old_no_link(old, path), path
    assert new.no_link(str(root / "a" / "link")) is False
    assert os.path.islink(root / "a" / "link")
