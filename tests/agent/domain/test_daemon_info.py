"""Docker's info kept while the same daemon process answers
(``agent.domain.snapshot.DaemonInfo``), over the stateful fakes: asked once per daemon
process, asked again after a restart, never used for a snapshot whose answers came
(even in part) from another process."""

from __future__ import annotations

from agent.domain.snapshot import DaemonInfo, Snapshot, take_snapshot
from agent.host.records import VolumeRecord
from tests.fakes import LeakScenario, make_leak_scenario


def _take(sc: LeakScenario, kept: DaemonInfo | None) -> Snapshot:
    return take_snapshot(sc.btrfs, sc.docker, now=sc.now, daemon_info=kept)


def _asked(sc: LeakScenario) -> int:
    return sc.docker.calls.count("info")


def test_the_info_is_asked_once_while_the_same_daemon_answers() -> None:
    sc = make_leak_scenario()
    kept = DaemonInfo()
    first = _take(sc, kept)
    again = [_take(sc, kept) for _ in range(3)]
    assert _asked(sc) == 1 and kept.reused == 3
    assert all(s.docker == first.docker for s in again)
    assert _take(sc, None).docker == first.docker and _asked(sc) == 2  # no cache: asked


def test_a_restarted_daemon_is_asked_again() -> None:
    sc = make_leak_scenario()
    kept = DaemonInfo()
    _take(sc, kept)
    sc.docker.restart()
    sc.docker.server_version = "24.0.7"
    assert _take(sc, kept).docker.server_version == "24.0.7"
    assert _asked(sc) == 2
    sc.docker.restart()  # the same settings, another process: asked all the same
    _take(sc, kept)
    assert _asked(sc) == 3 and kept.reused == 0


def test_a_daemon_that_cannot_be_told_apart_is_asked_every_time() -> None:
    sc = make_leak_scenario()
    sc.docker.identity_known = False  # a tcp:// daemon, a socket made by systemd
    kept = DaemonInfo()
    for _ in range(3):
        _take(sc, kept)
    assert _asked(sc) == 3 and kept.reused == 0


def test_a_daemon_restarted_with_another_data_root_while_a_snapshot_is_read() -> None:
    """The kept info names the old data root; the volumes come from the new daemon:
    that snapshot is dropped and read again, asking the new daemon."""
    sc = make_leak_scenario()
    sc.btrfs.add_filesystem(mount="/volume2")
    kept = DaemonInfo()
    old_root = _take(sc, kept).docker.data_root
    docker = sc.docker
    real_volumes = docker.volumes
    restarted: list[str] = []

    def volumes() -> list[VolumeRecord]:
        if not restarted:  # the daemon restarts with another data root meanwhile
            docker.restart()
            docker.data_root = "/volume2/docker"
            restarted.append(docker.data_root)
        return real_volumes()

    docker.volumes = volumes  # type: ignore[method-assign]
    snap = _take(sc, kept)
    assert restarted and snap.docker.data_root == "/volume2/docker" != old_root
    assert _asked(sc) == 2 and kept.reused == 0
    # and the info of the new process is kept for it
    assert _take(sc, kept).docker.data_root == "/volume2/docker" and _asked(sc) == 2


def test_info_asked_of_a_daemon_that_restarts_meanwhile_is_not_kept() -> None:
    sc = make_leak_scenario()
    kept = DaemonInfo()
    docker = sc.docker
    real_info = docker.info

    def info():  # type: ignore[no-untyped-def]
        answer = real_info()
        docker.restart()  # answered by the old process, which then goes
        return answer

    docker.info = info  # type: ignore[method-assign]
    _take(sc, kept)
    docker.info = real_info  # type: ignore[method-assign]
    _take(sc, kept)
    assert _asked(sc) == 2 and kept.reused == 0
