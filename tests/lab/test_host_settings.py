"""A lab's whole life (``Lab.up``, the seeding with its docker-in-docker leak, ``down``)
leaves the host's settings as they were: the sysctls dockerd 20.10 writes when it may
(``net.ipv4.ip_forward`` and every ``*/forwarding``, ``kernel.keys.root_maxkeys`` /
``root_maxbytes``, ``fs.may_detach_mounts`` and ``net.bridge.*`` where they exist), the
network interfaces, the iptables / ip6tables rules, and the mounts outside the lab's
folder. They are recorded before the lab is built, while it runs, and after it is gone.

On a fresh host ``net.ipv4.ip_forward`` is 0: a dockerd without ``--ip-forward=false``
turns it on (and the kernel every ``*/forwarding`` with it) and leaves it on. The root
key limits are raised by every dockerd 20.10 when they are below 1000000 / 25000000 (no
flag turns that off); this kernel's defaults are those values already, so here nothing
changes, and on a host with lower limits this test fails and says so.
"""

from __future__ import annotations

from collections.abc import Callable

from lab import Lab
from tests.lab.checks import HostSettings, host_settings, settings_changes


def _is_a_real_record(rec: HostSettings) -> None:
    """What the record must hold on any Linux host, so an empty one cannot pass."""
    for name in (
        "net.ipv4.ip_forward",
        "net.ipv4.conf.all.forwarding",
        "net.ipv4.conf.default.forwarding",
        "net.ipv4.conf.lo.forwarding",
        "kernel.keys.root_maxkeys",
        "kernel.keys.root_maxbytes",
    ):
        assert name in rec.sysctls, name
    assert "lo" in rec.interfaces
    assert any(point == "/" for point, _, _ in rec.mounts)


def test_a_labs_life_leaves_the_host_settings_as_they_were(
    lab_factory: Callable[..., Lab],
) -> None:
    before = host_settings()
    _is_a_real_record(before)
    lab = lab_factory()  # up and seeded: the inner dockerd of the dind leak ran and went
    try:
        assert lab.seeded.dind.subvolumes
        during = host_settings(exclude=[lab.root])
        more = lab.seed_dind_volume(containers=1)  # and once more, on the running lab
        assert more.subvolumes
        during_again = host_settings(exclude=[lab.root])
    finally:
        report = lab.down()
    assert report.ok and report.removed_dir
    after = host_settings()
    assert settings_changes(before, during) == []
    assert settings_changes(before, during_again) == []
    assert settings_changes(before, after) == []
