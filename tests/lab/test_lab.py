"""The lab builds what it claims, checked on the filesystem and through Docker."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lab import (
    BUSYBOX_IMAGE,
    DIND_IMAGE,
    Lab,
    LabError,
    TeardownError,
    down,
    fill,
    is_subvolume,
    layer_refs,
)
from lab.manifest import Seeded, from_jsonable, to_jsonable
from lab.proc import run
from tests.lab.checks import (
    footprint,
    leftovers,
    loops_backed_by,
    mountpoints_below,
    pids_naming,
    starttime,
)

pytestmark = pytest.mark.lab
REPO = Path(__file__).resolve().parents[2]
HEX64 = re.compile(r"^[0-9a-f]{64}$")


def ro(path: Path) -> bool:
    out = run(["btrfs", "property", "get", str(path), "ro"]).stdout.strip()
    assert out in ("ro=true", "ro=false"), out
    return out == "ro=true"


def subvolume_paths(lab: Lab) -> set[Path]:
    """Every subvolume of the lab's filesystem, as absolute paths (btrfs prints them
    relative to the top level, which is mounted at ``lab.mnt``)."""
    out = run(["btrfs", "subvolume", "list", str(lab.mnt)]).stdout
    return {lab.mnt / line.split(" path ", 1)[1] for line in out.splitlines() if " path " in line}


def volume_users(lab: Lab, volume: str) -> list[str]:
    return lab.docker("ps", "-a", "-q", "--no-trunc", "--filter", f"volume={volume}").stdout.split()


# --- the session lab: read only ------------------------------------------------------------


def test_btrfs_on_a_loop_device_of_the_lab_image(lab: Lab) -> None:
    line = next(
        ln.split()
        for ln in Path("/proc/self/mountinfo").read_text().splitlines()
        if ln.split()[4] == str(lab.mnt)
    )
    tail = line[line.index("-") + 1 :]
    assert tail[0] == "btrfs"
    assert tail[1] == lab.loop_device
    backing = Path(f"/sys/block/{Path(lab.loop_device).name}/loop/backing_file").read_text()
    assert backing.strip() == str(lab.image_file)
    assert "subvolid=5," in tail[2] + ","  # the top level is what is mounted at mnt
    assert is_subvolume(lab.data_root)
    assert lab.data_root == lab.mnt / "docker"


def test_private_dockerd_with_btrfs_driver(lab: Lab) -> None:
    info = json.loads(lab.docker("info", "--format", "{{json .}}").stdout)
    assert info["Driver"] == "btrfs"
    assert info["DockerRootDir"] == str(lab.data_root)
    assert lab.docker_host == f"unix://{lab.root}/outer.sock"
    assert int((lab.root / "outer.pid").read_text()) == lab.dockerd_pid
    args = Path(f"/proc/{lab.dockerd_pid}/cmdline").read_bytes().decode().split("\0")
    for flag, value in (
        ("--exec-root", str(lab.exec_root)),
        ("--containerd", str(lab.containerd_socket)),
        ("--storage-driver", "btrfs"),
        ("--pidfile", str(lab.root / "outer.pid")),
    ):
        assert args[args.index(flag) + 1] == value
    for flag in ("--iptables=false", "--bridge=none"):
        assert flag in args
    containerd_args = Path(f"/proc/{lab.containerd_pid}/cmdline").read_bytes().decode()
    assert str(lab.root) in containerd_args


def test_images_are_local_and_their_layers_are_subvolumes(lab: Lab) -> None:
    names = lab.docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
    assert {BUSYBOX_IMAGE, DIND_IMAGE} <= set(names)
    refs = layer_refs(lab.data_root)
    for image in lab.seeded.never_touch.images:
        assert image.layer_subvolumes
        for path in image.layer_subvolumes:
            assert path.parent == lab.layer_dir
            assert is_subvolume(path)
            assert path.name in refs
    out = lab.docker("run", "--rm", "--network", "none", BUSYBOX_IMAGE, "echo", "hello").stdout
    assert out == "hello\n"


def test_dind_volume_is_dangling_and_holds_nested_subvolumes(lab: Lab) -> None:
    d = lab.seeded.dind
    assert HEX64.match(d.volume)  # anonymous
    dangling = lab.docker("volume", "ls", "-q", "--filter", "dangling=true").stdout.split()
    assert d.volume in dangling
    assert volume_users(lab, d.volume) == []
    assert lab.docker("inspect", d.container_id, check=False).returncode != 0  # removed
    assert d.mountpoint == lab.data_root / "volumes" / d.volume / "_data"
    # every nested subvolume is real, and they are all there is below the volume
    below = {p for p in subvolume_paths(lab) if d.mountpoint in p.parents}
    assert below == set(d.subvolumes)
    assert len(d.inner_container_subvolumes) == 4  # 2 containers: layer + init layer each
    for path in d.subvolumes:
        assert is_subvolume(path), path
    # the inner daemon made them: its own layerdb names them
    inner_refs = layer_refs(d.mountpoint)
    made_by_inner = {p.name for p in (*d.inner_image_subvolumes, *d.inner_container_subvolumes)}
    assert made_by_inner == inner_refs
    assert all(p.parent == d.mountpoint / "btrfs" / "subvolumes" for p in d.inner_image_subvolumes)


def test_dind_read_only_flags(lab: Lab) -> None:
    d = lab.seeded.dind
    assert ro(d.ro_leaf)
    assert ro(d.ro_parent)
    assert d.ro_parent_child.parent == d.ro_parent
    assert not ro(d.ro_parent_child)
    assert set(d.read_only) == {d.ro_leaf, d.ro_parent}
    for path in d.writable:
        assert not ro(path), path
    # the read-only leaf has files (so rm fails on it) and no subvolume below it
    assert (d.ro_leaf / "bin" / "busybox").is_file()
    assert not [p for p in d.subvolumes if d.ro_leaf in p.parents]
    with pytest.raises(OSError) as err:
        (d.ro_leaf / "new-file").write_text("x")
    assert err.value.errno == 30  # EROFS


def test_orphan_subvolume_is_referenced_by_nothing(lab: Lab) -> None:
    o = lab.seeded.orphan
    assert HEX64.match(o.name)
    assert o.path == lab.layer_dir / o.name
    assert is_subvolume(o.path)
    refs = layer_refs(lab.data_root)
    assert o.name not in refs
    # and it is the only one: every other subvolume there is a layer Docker knows
    unreferenced = {p.name for p in lab.layer_dir.iterdir()} - refs
    assert unreferenced == {o.name}


def test_never_touch_set(lab: Lab) -> None:
    nt = lab.seeded.never_touch
    listed = set(lab.docker("volume", "ls", "-q").stdout.split())
    for vol in nt.volumes:
        assert vol.name in listed
        assert vol.files
        for rel, content in vol.files.items():
            assert (vol.mountpoint / rel).read_text() == content
    keep = lab.inspect(nt.keep_volume.name, kind="volume")[0]
    assert keep["Labels"] == {"keep": "true"}
    assert nt.keep_volume.labels == {"keep": "true"}
    assert volume_users(lab, nt.keep_volume.name) == []
    assert volume_users(lab, nt.named_volume.name) == []
    assert not nt.named_volume.anonymous and not nt.keep_volume.anonymous
    running = lab.inspect(nt.running_container.name)[0]
    assert running["State"]["Running"] is True
    assert running["Config"]["Cmd"][0] == "sleep"
    assert volume_users(lab, nt.in_use_volume.name) == [nt.running_container.id]
    stopped = lab.inspect(nt.stopped_container.name)[0]
    assert stopped["State"]["Status"] == "exited"
    assert stopped["State"]["ExitCode"] == 0
    assert nt.stopped_anonymous_volume.anonymous
    assert volume_users(lab, nt.stopped_anonymous_volume.name) == [nt.stopped_container.id]
    refs = layer_refs(lab.data_root)
    for path in nt.subvolumes:
        assert is_subvolume(path), path
        assert path.name in refs


def test_manifest_round_trips_and_another_process_can_load_it(lab: Lab) -> None:
    again = from_jsonable(Seeded, json.loads(json.dumps(to_jsonable(lab.seeded))))
    assert again == lab.seeded
    loaded = Lab.load(lab.root)
    assert loaded.seeded == lab.seeded
    assert loaded.dockerd_pid == lab.dockerd_pid
    assert loaded.loop_device == lab.loop_device
    out = subprocess.run(
        [sys.executable, "-m", "lab", "status", str(lab.root)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    status = json.loads(out.stdout)
    assert status["dockerd_alive"] is True
    assert status["docker_answers"] is True
    assert status["loop_devices"] == [lab.loop_device]


# --- a scratch lab for the seeding functions ----------------------------------------------


@pytest.fixture(scope="module")
def scratch(lab_factory: Callable[..., Lab]) -> Iterator[Lab]:
    new = lab_factory(seed=False)
    yield new
    new.down()


def test_unseeded_lab_has_images_and_nothing_else(scratch: Lab) -> None:
    with pytest.raises(LabError):
        _ = scratch.seeded
    assert scratch.docker("ps", "-a", "-q").stdout == ""
    assert scratch.docker("volume", "ls", "-q").stdout == ""
    names = scratch.docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
    assert set(names) == {BUSYBOX_IMAGE, DIND_IMAGE}


def test_seed_dind_volume_makes_a_fresh_leak_each_time(scratch: Lab) -> None:
    first = scratch.seed_dind_volume(containers=3)
    second = scratch.seed_dind_volume(containers=1)
    assert first.volume != second.volume
    assert len(first.inner_container_subvolumes) == 6
    assert len(second.inner_container_subvolumes) == 2
    dangling = scratch.docker("volume", "ls", "-q", "--filter", "dangling=true").stdout.split()
    assert {first.volume, second.volume} <= set(dangling)
    for d in (first, second):
        assert all(is_subvolume(p) for p in d.subvolumes)
        assert ro(d.ro_leaf) and ro(d.ro_parent) and not ro(d.ro_parent_child)
    assert scratch.docker("ps", "-a", "-q").stdout == ""  # the dind containers are gone


def test_seed_dind_volume_with_files(scratch: Lab) -> None:
    d = scratch.seed_dind_volume(containers=1, files_per_subvolume=120)
    for path in d.subvolumes:
        files = [p for p in (path / "lab-fill").rglob("*") if p.is_file()]
        assert len(files) == 120, path


def test_seed_orphan_subvolume(scratch: Lab) -> None:
    path = scratch.seed_orphan_subvolume(files=5)
    assert path.parent == scratch.layer_dir
    assert is_subvolume(path)
    assert path.name not in layer_refs(scratch.data_root)
    assert len([p for p in path.rglob("*") if p.is_file()]) == 5


def test_fill_writes_the_files_it_says(scratch: Lab) -> None:
    target = scratch.mnt / "fill-test"
    written = fill(target, 2500, size=100)
    files = [p for p in target.rglob("*") if p.is_file()]
    assert len(files) == 2500
    assert written == 2500 * 100
    assert {p.stat().st_size for p in files} == {100}
    assert len(list(target.iterdir())) == 3  # 1000 per folder


def qgroup_sizes(lab: Lab) -> dict[int, tuple[int, int]]:
    out = run(["btrfs", "qgroup", "show", "--raw", str(lab.mnt)]).stdout
    sizes = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0].startswith("0/"):
            sizes[int(parts[0][2:])] = (int(parts[1]), int(parts[2]))
    return sizes


def subvolume_id(path: Path) -> int:
    out = run(["btrfs", "subvolume", "show", str(path)]).stdout
    match = re.search(r"Subvolume ID:\s+(\d+)", out)
    assert match, out
    return int(match.group(1))


def test_quotas_are_off_until_enabled(scratch: Lab) -> None:
    assert not scratch.quotas_enabled()
    failed = run(["btrfs", "qgroup", "show", str(scratch.mnt)], check=False)
    assert failed.returncode != 0
    d = scratch.seed_dind_volume(containers=1)
    scratch.enable_quotas()
    try:
        assert scratch.quotas_enabled()
        sizes = qgroup_sizes(scratch)
        referenced, exclusive = sizes[subvolume_id(d.ro_leaf)]
        busybox_size = (d.ro_leaf / "bin" / "busybox").stat().st_size
        assert referenced >= busybox_size
        assert exclusive > 0
        # seeding a leak while quotas are on leaves them on
        scratch.seed_dind_volume(containers=1)
        assert scratch.quotas_enabled()
    finally:
        scratch.disable_quotas()
    assert not scratch.quotas_enabled()


# --- life cycle: CLI from other processes, crash, failed up ------------------------------


def lab_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lab", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def wait_dead(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while starttime(pid) is not None:
        assert time.monotonic() < deadline, f"pid {pid} still alive"
        time.sleep(0.05)


@pytest.mark.usefixtures("lab_host")
def test_cli_up_then_crash_then_down_from_another_process_leaves_nothing() -> None:
    root = Path(tempfile.mkdtemp(prefix="nas-janitor-lab-"))
    try:
        up = lab_cli("up", str(root))
        assert up.returncode == 0, up.stderr
        manifest = json.loads(up.stdout)
        assert manifest["seeded"]["dind"]["volume"]
        assert manifest["timings"]["total"] < 60
        lab = Lab.load(root)
        fp = footprint(lab)
        shims = [pid for pid, (_, cmd) in fp.processes.items() if "containerd-shim" in cmd]
        assert shims  # the running container's shim
        # crash the daemons: the shim and the container process survive them
        for pid in (lab.dockerd_pid, lab.containerd_pid):
            os.kill(pid, signal.SIGKILL)
            wait_dead(pid)
        still = footprint(lab)
        assert lab.dockerd_pid not in still.processes
        assert set(shims) <= set(still.processes)
        assert any("in cgroup" in cmd for _, cmd in still.processes.values())
        assert mountpoints_below(root)
        link = Path(tempfile.mkdtemp(prefix="nas-janitor-lab-link-")) / "lab"
        link.symlink_to(root)  # down resolves it: mountinfo names the real path
        try:
            first = lab_cli("down", str(link))
        finally:
            link.unlink()
            link.parent.rmdir()
        assert first.returncode == 0, first.stdout + first.stderr
        report = json.loads(first.stdout)
        assert report["ok"] and report["removed_dir"]
        assert leftovers(fp) == []
        second = lab_cli("down", str(root))  # idempotent
        assert second.returncode == 0
        assert json.loads(second.stdout)["stopped"] == []
    finally:
        down(root, check=False)


@pytest.mark.usefixtures("lab_host")
def test_failed_up_tears_down_what_it_built() -> None:
    root = Path(tempfile.mkdtemp(prefix="nas-janitor-lab-"))
    image = root / "fs.img"
    try:
        with pytest.raises(LabError, match="dockerd exited during start-up"):
            Lab.up(root, dockerd="/bin/false")
        assert not root.exists()
        assert mountpoints_below(root) == []
        assert loops_backed_by(image) == []
        assert pids_naming(root) == {}
    finally:
        down(root, check=False)


def test_down_refuses_a_folder_that_is_not_a_lab(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("mine")
    with pytest.raises(TeardownError, match="not a lab folder"):
        down(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "mine"
    assert down(tmp_path / "missing").ok  # nothing there: already torn down


@pytest.mark.usefixtures("lab_host")
def test_down_never_deletes_through_another_filesystem(tmp_path: Path) -> None:
    from lab.teardown import _other_filesystems

    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    run(["mount", "-t", "tmpfs", "-o", "size=1m", "lab-test", str(inner)])
    try:
        (inner / "file").write_text("x")
        assert _other_filesystems(tmp_path) == [str(inner)]
    finally:
        run(["umount", str(inner)])
    assert _other_filesystems(tmp_path) == []
