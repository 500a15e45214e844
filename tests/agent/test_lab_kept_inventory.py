"""The kept inventory on the real lab: a real Docker event and a real subvolume change
make the next read scan again; with nothing changed, reads share one scan."""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from agent.domain.inventory import Inventory
from bench.common import make_subvolumes
from lab import Lab
from tests.agent.http.apphelpers import real_inventory


@pytest.fixture
def inv(lab: Lab, tmp_path: Path) -> Iterator[Inventory]:
    inventory = real_inventory(tmp_path / "state", lab.docker_host)
    inventory.current()
    inventory.current()
    assert inventory.watch.wait_connected(10), "Docker's event stream did not open"
    inventory.current()
    yield inventory
    inventory.watch.stop()


def settle(inv: Inventory, cond: object, timeout: float = 10.0) -> None:
    """Wait until ``cond()`` holds on the current snapshot (an event arrives a moment
    after the change that caused it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError("the change was not seen")


def test_nothing_changed_means_no_scan(inv: Inventory) -> None:
    scans = inv.scans
    first = inv.current()
    for _ in range(5):
        assert inv.current() is first
    assert inv.scans == scans


def test_a_real_subvolume_change_is_seen_at_once(inv: Inventory, lab: Lab) -> None:
    path = lab.layer_dir / secrets.token_hex(32)
    make_subvolumes([path])
    try:
        # no waiting: the root tree changed in the running transaction already
        assert any(sv.path == str(path) for sv in inv.current().subvolumes_list())
        subprocess.run(["btrfs", "property", "set", str(path), "ro", "true"], check=True)
        assert [sv.read_only for sv in inv.current().subvolumes_list() if sv.path == str(path)] == [
            True
        ]
        subprocess.run(["btrfs", "property", "set", str(path), "ro", "false"], check=True)
    finally:
        subprocess.run(["btrfs", "subvolume", "delete", str(path)], check=True)
    assert not any(sv.path == str(path) for sv in inv.current().subvolumes_list())


def test_a_real_docker_event_is_seen(inv: Inventory, lab: Lab) -> None:
    api = docker.APIClient(base_url=lab.docker_host, version="auto")
    try:
        name = f"kept-{secrets.token_hex(4)}"
        api.create_volume(name=name)
        settle(inv, lambda: name in inv.current().volumes)
        api.remove_volume(name)
        settle(inv, lambda: name not in inv.current().volumes)
    finally:
        api.close()
