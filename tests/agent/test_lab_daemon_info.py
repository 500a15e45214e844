"""On the real lab: Docker's info is asked once while the same dockerd process
answers, and asked again of a daemon restarted, here on another data root
(``agent.domain.snapshot.DaemonInfo``, ``DockerClient.daemon_identity``)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.domain.snapshot import Scope
from lab import Lab
from tests.agent.http.apphelpers import real_inventory

pytestmark = pytest.mark.lab


def test_the_info_is_kept_for_one_daemon_process_only(
    lab_factory: Callable[..., Lab], tmp_path: Path
) -> None:
    own = lab_factory(seed=False)  # a lab of its own: its daemon is restarted
    inv = real_inventory(tmp_path / "state", own.docker_host)
    first_pid = own.dockerd_pid
    assert inv.fresh_snapshot().docker.data_root == str(own.data_root)
    again = inv.fresh_snapshot(scope=Scope(volume="no-such-volume"))
    assert again.docker.data_root == str(own.data_root)
    assert inv.daemon_info.reused == 1

    other = own.mnt / "docker-moved"
    subprocess.run(["btrfs", "subvolume", "create", str(other)], check=True, capture_output=True)
    assert own.restart_dockerd(data_root=other) != first_pid
    moved = inv.fresh_snapshot()
    assert moved.docker.data_root == str(other)  # asked of the new process
    assert inv.daemon_info.reused == 1
    own.docker("volume", "create", "made-after-the-move")
    snap = inv.fresh_snapshot()
    assert snap.docker.data_root == str(other) and inv.daemon_info.reused == 2
    made = snap.volumes["made-after-the-move"].record.mountpoint
    assert made == f"{other}/volumes/made-after-the-move/_data"
