"""Attacks on the safety rules that the rules do not stop yet (each test fails until
the hole is closed): what a busy NAS, or a person, can do that ends in a delete of
something that is not a Docker leftover."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.domain.inventory import Inventory
from agent.domain.safety import plan_subvolume_delete
from agent.errors import Protected, TooYoung
from shared.policy import DEFAULT_PROTECT_LABELS
from tests.agent.http.apphelpers import agent_config
from tests.fakes import FakeBtrfs, FakeDocker, fake_hex, make_leak_scenario

LABELS = DEFAULT_PROTECT_LABELS


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
