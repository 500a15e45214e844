"""The baseline nas-janitor must beat: what Docker's own commands do to the leak.

Each test asserts what really happens on the lab (dockerd 20.10, kernel 6.x), so it fails
the day that changes. It is destructive, so it runs on a lab of its own, built while the
session lab is up; the last tests check that the two labs never touched each other and that
tearing this one down leaves nothing on the host.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lab import BUSYBOX_IMAGE, DIND_IMAGE, Lab, SeededDind, is_subvolume, layer_refs
from tests.lab.checks import footprint, leftovers

pytestmark = pytest.mark.lab

UNLINK_EROFS = re.compile(r"unlinkat (?P<path>/\S+): read-only file system$")


@pytest.fixture(scope="module")
def own(lab_factory: Callable[..., Lab]) -> Iterator[Lab]:
    """The baseline's own lab: these tests delete what the session lab must keep."""
    new = lab_factory()
    yield new
    new.down()


def volumes(lab: Lab) -> set[str]:
    return set(lab.docker("volume", "ls", "-q").stdout.split())


def section(output: str, title: str) -> list[str]:
    """The lines under ``title:`` in prune output, up to the next blank line."""
    lines = output.splitlines()
    start = lines.index(title + ":") + 1
    out = []
    for line in lines[start:]:
        if not line.strip():
            break
        out.append(line.strip())
    return out


def assert_half_deleted(d: SeededDind) -> None:
    """The writable nested subvolumes are gone, the read-only ones and what is under them
    are still there, and so is the volume's folder."""
    for path in (*d.inner_container_subvolumes, *d.inner_image_subvolumes[1:]):
        assert not path.exists(), f"{path} survived"
    for path in (d.ro_leaf, d.ro_parent, d.ro_parent_child):
        assert is_subvolume(path), f"{path} is gone"
    assert (d.ro_leaf / "bin" / "busybox").is_file()
    assert d.mountpoint.is_dir()
    assert not (d.mountpoint / "image").exists()  # the inner daemon's metadata went first


def test_volume_rm_fails_on_the_read_only_nested_subvolume(own: Lab) -> None:
    d = own.seeded.dind
    result = own.docker("volume", "rm", d.volume, check=False)
    assert result.returncode == 1
    assert result.stdout == ""
    err = result.stderr.strip()
    prefix = (
        f"Error response from daemon: remove {d.volume}: "
        f"error removing volume path '{d.mountpoint}': "
    )
    assert err.startswith(prefix), err
    match = UNLINK_EROFS.search(err)
    assert match, err
    failed_at = Path(match["path"])
    assert d.ro_leaf in failed_at.parents or d.ro_parent in failed_at.parents, failed_at
    # the volume stays listed, half deleted
    assert d.volume in volumes(own)
    assert_half_deleted(d)
    # and asking again does not get further
    again = own.docker("volume", "rm", d.volume, check=False)
    assert again.returncode == 1 and "read-only file system" in again.stderr
    assert d.volume in volumes(own)


def test_volume_prune_deletes_wanted_volumes_and_leaves_the_leak(own: Lab) -> None:
    fresh = own.seed_dind_volume()
    nt = own.seeded.never_touch
    result = own.docker("volume", "prune", "-f", check=False)
    assert result.returncode == 0, result.stderr
    deleted = section(result.stdout, "Deleted Volumes")
    # it deleted what users wanted: the named volume, and the keep=true one (label ignored)
    assert sorted(deleted) == sorted([nt.keep_volume.name, nt.named_volume.name])
    for vol in (nt.keep_volume, nt.named_volume):
        assert not vol.mountpoint.exists()
    left = volumes(own)
    assert nt.keep_volume.name not in left
    assert nt.named_volume.name not in left
    # it left the leak listed (half deleted), and what containers use
    assert fresh.volume in left
    assert fresh.volume not in deleted
    assert_half_deleted(fresh)
    assert nt.in_use_volume.name in left
    assert nt.stopped_anonymous_volume.name in left
    for vol in (nt.in_use_volume, nt.stopped_anonymous_volume):
        for rel, content in vol.files.items():
            assert (vol.mountpoint / rel).read_text() == content


def test_system_prune_leaves_read_only_remains_and_the_orphan(own: Lab) -> None:
    fresh = own.seed_dind_volume()
    nt = own.seeded.never_touch
    orphan = own.seeded.orphan
    result = own.docker("system", "prune", "-af", "--volumes", check=False)
    assert result.returncode == 0, result.stderr
    # it removes the stopped container, then its anonymous volume, and the unused image
    assert section(result.stdout, "Deleted Containers") == [nt.stopped_container.id]
    assert section(result.stdout, "Deleted Volumes") == [nt.stopped_anonymous_volume.name]
    assert f"untagged: {DIND_IMAGE}" in section(result.stdout, "Deleted Images")
    # the leak stays listed, read-only remains and all
    assert fresh.volume in volumes(own)
    assert_half_deleted(fresh)
    # the orphaned layer subvolume is not Docker's to know: untouched
    assert is_subvolume(orphan.path)
    assert orphan.name not in layer_refs(own.data_root)
    # what still runs survives
    images = own.docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
    assert images == [BUSYBOX_IMAGE]
    assert own.inspect(nt.running_container.name)[0]["State"]["Running"] is True


def test_two_labs_do_not_collide(lab: Lab, own: Lab) -> None:
    assert lab.root != own.root
    for attr in ("docker_host", "mnt", "exec_root", "containerd_socket", "loop_device"):
        assert getattr(lab, attr) != getattr(own, attr), attr
    assert lab.dockerd_pid != own.dockerd_pid
    assert lab.containerd_pid != own.containerd_pid
    assert lab.cgroup_parent != own.cgroup_parent
    # each daemon sees only its own containers and volumes
    ids = {x: set(x.docker("ps", "-a", "-q", "--no-trunc").stdout.split()) for x in (lab, own)}
    assert ids[lab].isdisjoint(ids[own])
    assert lab.seeded.dind.volume not in volumes(own)
    assert own.seeded.dind.volume not in volumes(lab)
    # what the baseline destroyed on its own lab is intact on the session lab
    nt = lab.seeded.never_touch
    left = volumes(lab)
    for vol in nt.volumes:
        assert vol.name in left
        for rel, content in vol.files.items():
            assert (vol.mountpoint / rel).read_text() == content
    assert all(is_subvolume(p) for p in lab.seeded.dind.subvolumes)
    assert all(is_subvolume(p) for p in nt.subvolumes)
    # the container processes of each lab live in that lab's cgroup only
    for x in (lab, own):
        running = x.seeded.never_touch.running_container.id
        cgroup = Path(f"/sys/fs/cgroup/pids/{x.cgroup_parent}/{running}")
        if Path("/sys/fs/cgroup/pids").is_dir():
            assert cgroup.is_dir(), cgroup


def test_teardown_leaves_nothing(own: Lab) -> None:
    fp = footprint(own)
    assert fp.processes  # dockerd, containerd, a shim, the running container
    report = own.down()
    assert report.ok and report.removed_dir
    assert report.lazily_unmounted == []
    assert leftovers(fp) == []
    assert own.down().ok  # twice is fine
