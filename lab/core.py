"""The lab: a btrfs filesystem on a loop file, a private dockerd on it with the btrfs
storage driver, and the leftovers the product exists to clean, made for real.

    lab = Lab.up(Path(tempfile.mkdtemp(prefix="nas-janitor-lab-")))
    try:
        lab.seeded.dind.volume        # the leaked docker-in-docker volume
        more = lab.seed_dind_volume() # a fresh one, for a destructive test
    finally:
        lab.down()
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import stat
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from lab import host, images, registry
from lab.errors import LabError, LabUnavailable, TeardownError
from lab.manifest import (
    NeverTouch,
    Seeded,
    SeededContainer,
    SeededDind,
    SeededImage,
    SeededOrphan,
    SeededVolume,
    to_jsonable,
)
from lab.proc import ProcessRef, Result, run, spawn
from lab.state import LabState, Layout
from lab.teardown import TeardownReport, docker_env, down

DEFAULT_SIZE = 6 * 1024**3  # sparse: costs only what is written
HEX64 = re.compile(r"^[0-9a-f]{64}$")

# What docker:dind needs on this kind of host, named one by one: --privileged fails where
# the capability bounding set lacks CAP_SYS_RESOURCE.
DIND_RUN_FLAGS = (
    "--network", "host",
    "-v", "/usr:/usr:ro",
    "--cap-add", "SYS_ADMIN", "--cap-add", "NET_ADMIN", "--cap-add", "MKNOD",
    "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
    "--device-cgroup-rule", "a *:* rwm",
)  # fmt: skip

# Everything a cleaner must leave alone, by the names the lab gives it.
KEEP_VOLUME = "lab-keep"
NAMED_VOLUME = "lab-named"
IN_USE_VOLUME = "lab-in-use"
RUNNING_CONTAINER = "lab-running"
STOPPED_CONTAINER = "lab-stopped"


class Lab:
    """A running lab. Build one with ``Lab.up``, reattach to one with ``Lab.load``."""

    def __init__(self, state: LabState) -> None:
        self._state = state
        self._layout = Layout(state.root)
        self._children: list[subprocess.Popen[bytes]] = []

    # --- what other code reads -------------------------------------------------------
    @property
    def root(self) -> Path:
        return self._layout.root

    @property
    def mnt(self) -> Path:
        """Where the lab's btrfs filesystem (top level, subvolume 5) is mounted."""
        return self._layout.mnt

    @property
    def data_root(self) -> Path:
        """The outer dockerd's --data-root, a subvolume of its own (``mnt/docker``)."""
        return self._layout.data_root

    @property
    def docker_host(self) -> str:
        return f"unix://{self._layout.socket}"

    @property
    def docker_socket(self) -> Path:
        return self._layout.socket

    @property
    def image_file(self) -> Path:
        return self._layout.image_file

    @property
    def loop_device(self) -> str:
        if self._state.loop_device is None:
            raise LabError("no loop device attached")
        return self._state.loop_device

    @property
    def dockerd_pid(self) -> int:
        return self._require(self._state.dockerd, "dockerd").pid

    @property
    def containerd_pid(self) -> int:
        return self._require(self._state.containerd, "containerd").pid

    @property
    def cgroup_parent(self) -> str:
        return self._layout.cgroup_parent

    @property
    def exec_root(self) -> Path:
        return self._layout.exec_root

    @property
    def containerd_socket(self) -> Path:
        return self._layout.containerd_socket

    @property
    def layer_dir(self) -> Path:
        """``<data_root>/btrfs/subvolumes``: where the outer daemon keeps its layers."""
        return self.data_root / "btrfs" / "subvolumes"

    @property
    def seeded(self) -> Seeded:
        if self._state.seeded is None:
            raise LabError("this lab was brought up with seed=False")
        return self._state.seeded

    @property
    def timings(self) -> dict[str, float]:
        """Seconds each step of ``up`` took."""
        return dict(self._state.timings)

    @property
    def env(self) -> dict[str, str]:
        """Environment for a docker client that talks to this lab and nothing else."""
        return docker_env(self._layout)

    @staticmethod
    def _require(ref: ProcessRef | None, name: str) -> ProcessRef:
        if ref is None:
            raise LabError(f"{name} was not started")
        return ref

    def describe(self) -> dict[str, Any]:
        """Everything about this lab as JSON-ready data (what ``python -m lab up`` prints)."""
        return {
            "root": str(self.root),
            "mnt": str(self.mnt),
            "data_root": str(self.data_root),
            "docker_host": self.docker_host,
            "image_file": str(self.image_file),
            "loop_device": self._state.loop_device,
            "dockerd_pid": self._state.dockerd.pid if self._state.dockerd else None,
            "containerd_pid": self._state.containerd.pid if self._state.containerd else None,
            "containerd_socket": str(self.containerd_socket),
            "exec_root": str(self.exec_root),
            "cgroup_parent": self.cgroup_parent,
            "timings": self.timings,
            "seeded": to_jsonable(self._state.seeded),
        }

    # --- life cycle --------------------------------------------------------------------
    @classmethod
    def up(
        cls,
        root: Path | str,
        *,
        size: int = DEFAULT_SIZE,
        seed: bool = True,
        dockerd: str = "dockerd",
        containerd: str = "containerd",
        ready_timeout: float = 60.0,
    ) -> Lab:
        """Build a lab in ``root`` (created if missing, must be empty).

        On any failure, what was built so far is torn down before the error propagates.
        """
        problems = host.host_problems()
        if problems:
            raise LabUnavailable(problems)
        root = Path(os.path.realpath(root))
        root.mkdir(parents=True, exist_ok=True)
        if any(root.iterdir()):
            raise LabError(f"{root} is not empty")
        layout = Layout(root)
        if len(str(layout.containerd_socket)) + len(".ttrpc") > 100:
            raise LabError(f"{root} is too long a path for the lab's unix sockets")
        state = LabState(root=root)
        state.save()
        registry.track(root)
        lab = cls(state)
        try:
            lab._build(size=size, seed=seed, dockerd=dockerd, containerd=containerd,
                       ready_timeout=ready_timeout)  # fmt: skip
        except BaseException as exc:
            report = down(root, check=False)
            lab._reap_children()
            registry.untrack(root)
            if isinstance(exc, Exception) and not report.ok:
                raise LabError(f"{exc} (and teardown: {'; '.join(report.errors)})") from exc
            raise
        return lab

    @classmethod
    def load(cls, root: Path | str) -> Lab:
        """Attach to a lab that an ``up`` (in this or another process) left in ``root``."""
        root = Path(os.path.realpath(root))
        if not Layout(root).state_file.exists():
            raise LabError(f"no lab in {root}")
        return cls(LabState.load(root))

    def down(self, *, check: bool = True) -> TeardownReport:
        """Stop and remove everything of this lab; idempotent."""
        report = down(self.root, check=False)
        self._reap_children()
        if not self.root.exists():
            registry.untrack(self.root)
        if check and report.errors:
            raise TeardownError(report)
        return report

    def _reap_children(self) -> None:
        for child in self._children:
            with contextlib.suppress(Exception):
                child.poll()
        self._children.clear()

    @contextlib.contextmanager
    def _step(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        yield
        self._state.timings[name] = round(time.monotonic() - started, 3)
        self._state.save()

    def _build(
        self, *, size: int, seed: bool, dockerd: str, containerd: str, ready_timeout: float
    ) -> None:
        started = time.monotonic()
        layout = self._layout
        for d in (layout.logs, layout.docker_config, layout.dind_dir, layout.exec_root):
            d.mkdir(parents=True)
        with self._step("filesystem"):
            with layout.image_file.open("wb") as f:
                f.truncate(size)
            run(["mkfs.btrfs", "-q", "-f", "-L", "nas-janitor-lab", str(layout.image_file)])
            dev = run(["losetup", "--find", "--show", str(layout.image_file)]).stdout.strip()
            self._state.loop_device = dev
            self._state.save()
            layout.mnt.mkdir()
            run(["mount", "-t", "btrfs", dev, str(layout.mnt)])
            run(["btrfs", "subvolume", "create", str(layout.data_root)])
        with self._step("containerd"):
            self._start_containerd(containerd, ready_timeout)
        with self._step("dockerd"):
            self._start_dockerd(dockerd, ready_timeout)
        with self._step("images"):
            self.docker("import", "-", images.BUSYBOX_IMAGE, input=images.busybox_tar())
            changes = [a for c in images.DIND_CHANGES for a in ("--change", c)]
            self.docker("import", *changes, "-", images.DIND_IMAGE, input=images.dind_tar())
        if seed:
            with self._step("seed"):
                never_touch = self._seed_never_touch()
                dind = self.seed_dind_volume()
                orphan_path = self.seed_orphan_subvolume()
                orphan = SeededOrphan(orphan_path.name, orphan_path)
                self._state.seeded = Seeded(dind=dind, orphan=orphan, never_touch=never_touch)
        self._state.timings["total"] = round(time.monotonic() - started, 3)
        self._state.phase = "ready"
        self._state.save()

    def _start_containerd(self, binary: str, timeout: float) -> None:
        """A containerd of the lab's own: dockerd would otherwise share the host's
        /run/containerd/containerd.sock whenever one runs, mixing labs' containers."""
        layout = self._layout
        d = layout.containerd_dir
        d.mkdir()
        config = "\n".join(
            [
                "version = 2",
                f'root = "{d / "root"}"',
                f'state = "{d / "state"}"',
                'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
                "[grpc]",
                f'  address = "{layout.containerd_socket}"',
                "[ttrpc]",
                f'  address = "{layout.containerd_socket}.ttrpc"',
                "[debug]",
                '  address = ""',
                "[metrics]",
                '  address = ""',
                '[plugins."io.containerd.internal.v1.opt"]',
                f'  path = "{d / "opt"}"',
                "",
            ]
        )
        layout.containerd_config.write_text(config)
        child, ref = spawn(
            [binary, "--config", str(layout.containerd_config)],
            log=layout.logs / "containerd.log",
            name="containerd",
        )
        self._children.append(child)
        self._state.containerd = ref
        self._state.save()
        self._wait(
            lambda: host.socket_accepts(layout.containerd_socket),
            ref,
            layout.logs / "containerd.log",
            timeout,
        )

    def restart_dockerd(
        self,
        *,
        data_root: Path | None = None,
        binary: str = "dockerd",
        timeout: float = 60.0,
    ) -> int:
        """Stop the lab's dockerd (SIGTERM, as a service manager does) and start it
        again, on ``data_root`` (a folder on the lab's filesystem) when given; the new
        daemon's pid. The lab's own helpers (``data_root``, ``layer_dir``, seeding)
        keep naming the first data root."""
        ref = self._require(self._state.dockerd, "dockerd")
        ref.stop(grace=20.0)
        self._start_dockerd(binary, timeout, data_root=data_root)
        return self.dockerd_pid

    def _start_dockerd(self, binary: str, timeout: float, *, data_root: Path | None = None) -> None:
        layout = self._layout
        root = data_root or layout.data_root
        layout.daemon_json.write_text("{}\n")  # never the host's /etc/docker/daemon.json
        cmd = [
            binary,
            "--config-file", str(layout.daemon_json),
            "--data-root", str(root),
            "--storage-driver", "btrfs",
            "--host", self.docker_host,
            "--pidfile", str(layout.pidfile),
            "--exec-root", str(layout.exec_root),
            "--containerd", str(layout.containerd_socket),
            "--cgroup-parent", "/" + layout.cgroup_parent,
            "--iptables=false", "--ip-masq=false", "--ip-forward=false", "--bridge=none",
            "--shutdown-timeout", "3",
        ]  # fmt: skip
        child, ref = spawn(cmd, log=layout.logs / "dockerd.log", name="dockerd")
        self._children.append(child)
        self._state.dockerd = ref
        self._state.save()
        self._wait(
            lambda: host.docker_ping(layout.socket), ref, layout.logs / "dockerd.log", timeout
        )
        info = json.loads(self.docker("info", "--format", "{{json .}}").stdout)
        if info.get("Driver") != "btrfs" or info.get("DockerRootDir") != str(root):
            raise LabError(
                f"dockerd runs with driver {info.get('Driver')!r} at {info.get('DockerRootDir')!r}"
            )

    @staticmethod
    def _wait(ready: Callable[[], bool], ref: ProcessRef, log: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if not ref.alive():
                raise LabError(f"{ref.name} exited during start-up: {_tail(log)}")
            if time.monotonic() > deadline:
                raise LabError(f"{ref.name} not ready after {timeout:g}s: {_tail(log)}")
            time.sleep(0.05)

    # --- talking to Docker -------------------------------------------------------------
    def docker(
        self, *args: str, check: bool = True, input: bytes | None = None, timeout: float = 120.0
    ) -> Result:
        """Run the docker CLI against this lab's daemon."""
        return run(["docker", *args], check=check, input=input, env=self.env, timeout=timeout)

    def inspect(self, *names: str, kind: str = "container") -> list[dict[str, Any]]:
        out = self.docker(kind, "inspect", *names).stdout
        data: list[dict[str, Any]] = json.loads(out)
        return data

    # --- what Docker itself records about btrfs layers ----------------------------------
    def layer_refs(self, data_root: Path | None = None) -> set[str]:
        """Names under ``btrfs/subvolumes/`` that the daemon's layerdb references."""
        return layer_refs(data_root or self.data_root)

    def _image_layers(self, image: str) -> SeededImage:
        info = self.inspect(image, kind="image")[0]
        chain = chain_ids(info["RootFS"]["Layers"])
        db = self.data_root / "image" / "btrfs" / "layerdb" / "sha256"
        paths = tuple(
            self.layer_dir / (db / c.split(":", 1)[1] / "cache-id").read_text().strip()
            for c in chain
        )
        return SeededImage(name=image, id=info["Id"], layer_subvolumes=paths)

    def _container_layers(
        self, container_id: str, data_root: Path | None = None
    ) -> tuple[Path, ...]:
        base = data_root or self.data_root
        mounts = base / "image" / "btrfs" / "layerdb" / "mounts" / container_id
        names = [(mounts / f).read_text().strip() for f in ("init-id", "mount-id")]
        return tuple(base / "btrfs" / "subvolumes" / n for n in names)

    # --- seeding -------------------------------------------------------------------------
    def _volume(self, name: str, files: dict[str, str]) -> SeededVolume:
        info = self.inspect(name, kind="volume")[0]
        mountpoint = Path(info["Mountpoint"])
        for rel, content in files.items():
            path = mountpoint / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                path.write_text(content)
        return SeededVolume(
            name=name,
            mountpoint=mountpoint,
            labels=dict(info.get("Labels") or {}),
            anonymous=HEX64.match(name) is not None,
            files=files,
        )

    def _seed_never_touch(self) -> NeverTouch:
        bb = images.BUSYBOX_IMAGE
        self.docker("volume", "create", "--label", "keep=true", KEEP_VOLUME)
        self.docker("volume", "create", NAMED_VOLUME)
        self.docker("volume", "create", IN_USE_VOLUME)
        keep = self._volume(KEEP_VOLUME, {"data.txt": "keep me\n", "sub/more.txt": "x" * 4096})
        named = self._volume(NAMED_VOLUME, {"data.txt": "named data\n"})
        in_use = self._volume(IN_USE_VOLUME, {"data.txt": "in use\n"})
        run_flags = ["--network", "none", "--stop-timeout", "1"]
        running_id = self.docker(
            "run", "-d", "--name", RUNNING_CONTAINER, *run_flags,
            "-v", f"{IN_USE_VOLUME}:/data", bb, "sleep", "2147483647",
        ).stdout.strip()  # fmt: skip
        stopped = self.docker(
            "run", "--name", STOPPED_CONTAINER, *run_flags, "-v", "/data", bb,
            "sh", "-c", "echo anonymous > /data/data.txt",
        )  # fmt: skip
        stopped_info = self.inspect(STOPPED_CONTAINER)[0]
        anon_name = next(m["Name"] for m in stopped_info["Mounts"] if m["Destination"] == "/data")
        anon = self._volume(anon_name, {"data.txt": "anonymous\n"})
        if not (anon.mountpoint / "data.txt").read_text() == "anonymous\n":
            raise LabError(f"stopped container did not write its volume: {stopped.stderr}")
        running = SeededContainer(
            name=RUNNING_CONTAINER,
            id=running_id,
            running=True,
            volume=IN_USE_VOLUME,
            layer_subvolumes=self._container_layers(running_id),
        )
        stopped_c = SeededContainer(
            name=STOPPED_CONTAINER,
            id=stopped_info["Id"],
            running=False,
            volume=anon_name,
            layer_subvolumes=self._container_layers(stopped_info["Id"]),
        )
        imgs = tuple(self._image_layers(i) for i in (images.BUSYBOX_IMAGE, images.DIND_IMAGE))
        return NeverTouch(
            keep_volume=keep,
            named_volume=named,
            in_use_volume=in_use,
            stopped_anonymous_volume=anon,
            running_container=running,
            stopped_container=stopped_c,
            images=imgs,
        )

    def seed_dind_volume(
        self,
        *,
        containers: int = 2,
        files_per_subvolume: int = 0,
        timeout: float = 60.0,
        volume: str | None = None,
        inner_volumes: dict[str, dict[str, str]] | None = None,
    ) -> SeededDind:
        """Reproduce the leak: run a docker-in-docker container, let its daemon make btrfs
        subvolumes in its anonymous /var/lib/docker volume (import an image, create
        ``containers`` containers), stop and remove it without ``-v``. Then, in the dangling
        volume, make the inner image layer read-only and add a read-only subvolume holding
        a child subvolume, as snapshot tools leave them.

        ``files_per_subvolume`` adds that many small files to every nested subvolume first
        (for benchmarks of big volumes). ``volume``: the inner daemon's data root is this
        named volume (``-v NAME:/var/lib/docker``, created when missing) instead of the
        image's anonymous one. ``inner_volumes``: volumes the inner daemon creates (name to
        labels), each holding one small file; the inner daemon records them in its
        ``volumes/metadata.db``.
        """
        quotas_before = self.quotas_enabled()
        tag = secrets.token_hex(4)
        name = f"lab-dind-{tag}"
        run_dir = self._layout.dind_dir / tag
        run_dir.mkdir(parents=True)
        inner_sock = run_dir / "docker.sock"
        container_id = self.docker(
            "run", "-d", "--name", name, *DIND_RUN_FLAGS, "-v", f"{run_dir}:/var/run",
            *(["-v", f"{volume}:/var/lib/docker"] if volume else []), images.DIND_IMAGE,
        ).stdout.strip()  # fmt: skip
        try:
            deadline = time.monotonic() + timeout
            while not host.docker_ping(inner_sock):
                if time.monotonic() > deadline:
                    logs = self.docker("logs", "--tail", "20", name, check=False)
                    raise LabError(f"inner dockerd in {name} not ready: {logs.stderr[-1500:]}")
                time.sleep(0.05)
            inner_env = {**self.env, "DOCKER_HOST": f"unix://{inner_sock}"}

            def inner(*args: str, input: bytes | None = None) -> Result:
                return run(["docker", *args], env=inner_env, input=input)

            driver = inner("info", "--format", "{{.Driver}}").stdout.strip()
            if driver != "btrfs":
                raise LabError(f"inner dockerd picked storage driver {driver!r}, not btrfs")
            inner("import", "-", images.INNER_IMAGE, input=images.busybox_tar())
            inner_ids = tuple(
                inner("create", "--network", "none", images.INNER_IMAGE, "true").stdout.strip()
                for _ in range(containers)
            )
            for vol_name, labels in (inner_volumes or {}).items():
                label_args = [a for k, v in labels.items() for a in ("--label", f"{k}={v}")]
                inner("volume", "create", *label_args, vol_name)
            info = self.inspect(name)[0]
            volume = next(
                m["Name"] for m in info["Mounts"] if m["Destination"] == "/var/lib/docker"
            )
        finally:
            self.docker("stop", "-t", "10", name, check=False, timeout=60)
            self.docker("rm", "-f", name, check=False, timeout=60)  # no -v: the volume stays
        inner_root = self.data_root / "volumes" / volume / "_data"
        layers = inner_root / "btrfs" / "subvolumes"
        for vol_name in inner_volumes or {}:
            (inner_root / "volumes" / vol_name / "_data" / "data.txt").write_text(
                f"inside the inner volume {vol_name}\n"
            )
        image_layer_names = {
            p.read_text().strip()
            for p in (inner_root / "image" / "btrfs" / "layerdb" / "sha256").glob("*/cache-id")
        }
        image_subvols = tuple(sorted(layers / n for n in image_layer_names))
        container_subvols = tuple(
            p for cid in inner_ids for p in self._container_layers(cid, data_root=inner_root)
        )
        ro_parent = inner_root / "ro-parent"
        child = ro_parent / "child"
        run(["btrfs", "subvolume", "create", str(ro_parent)])
        (ro_parent / "data.txt").write_text("inside a read-only subvolume\n")
        run(["btrfs", "subvolume", "create", str(child)])
        (child / "data.txt").write_text("a child of a read-only subvolume\n")
        if files_per_subvolume:
            for sv in (*image_subvols, *container_subvols, ro_parent, child):
                fill(sv / "lab-fill", files_per_subvolume)
        ro_leaf = image_subvols[0]
        for path in (ro_leaf, ro_parent):
            run(["btrfs", "property", "set", str(path), "ro", "true"])
        if quotas_before and not self.quotas_enabled():
            self.enable_quotas()
        self.settle()
        return SeededDind(
            volume=volume,
            mountpoint=inner_root,
            container_name=name,
            container_id=container_id,
            inner_image_subvolumes=image_subvols,
            inner_container_subvolumes=container_subvols,
            ro_leaf=ro_leaf,
            ro_parent=ro_parent,
            ro_parent_child=child,
            inner_container_ids=inner_ids,
        )

    def seed_orphan_subvolume(self, *, files: int = 3) -> Path:
        """A subvolume in ``<data_root>/btrfs/subvolumes/`` named like a layer (64 hex)
        that no image layer and no container references."""
        refs = self.layer_refs()
        name = secrets.token_hex(32)
        while name in refs:  # pragma: no cover - 256 random bits
            name = secrets.token_hex(32)
        path = self.layer_dir / name
        run(["btrfs", "subvolume", "create", str(path)])
        fill(path, files, size=1024)
        self.settle()
        return path

    def settle(self) -> None:
        """Commit what was written, so the seeded subvolumes' generations stop moving
        (pending writeback would otherwise bump them at the next periodic commit, and a
        plan made before that would see its targets as changed)."""
        run(["btrfs", "filesystem", "sync", str(self.mnt)])

    # --- quotas --------------------------------------------------------------------------
    def quotas_enabled(self) -> bool:
        return run(["btrfs", "qgroup", "show", str(self.mnt)], check=False).returncode == 0

    def enable_quotas(self) -> None:
        """Turn btrfs quotas on and wait for the rescan, so qgroup sizes are exact."""
        run(["btrfs", "quota", "enable", str(self.mnt)])
        run(["btrfs", "quota", "rescan", "-w", str(self.mnt)], timeout=600)

    def disable_quotas(self) -> None:
        run(["btrfs", "quota", "disable", str(self.mnt)])


def layer_refs(data_root: Path) -> set[str]:
    """Every cache-id, mount-id and init-id in ``<data_root>/image/btrfs/layerdb``."""
    db = data_root / "image" / "btrfs" / "layerdb"
    files = [
        *db.glob("sha256/*/cache-id"),
        *db.glob("mounts/*/mount-id"),
        *db.glob("mounts/*/init-id"),
    ]
    return {p.read_text().strip() for p in files}


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """Docker's chain ids of a layer stack: chain(0) = diff(0),
    chain(n) = sha256(chain(n-1) + " " + diff(n))."""
    out: list[str] = []
    for diff in diff_ids:
        if not out:
            out.append(diff)
        else:
            digest = hashlib.sha256(f"{out[-1]} {diff}".encode()).hexdigest()
            out.append(f"sha256:{digest}")
    return out


def fill(path: Path | str, nfiles: int, *, size: int = 16, per_dir: int = 1000) -> int:
    """Write ``nfiles`` files of ``size`` bytes under ``path`` (``per_dir`` per folder).
    Returns the bytes written."""
    base = Path(path)
    payload = (b"nas-janitor-lab\n" * (size // 16 + 1))[:size]
    current: Path | None = None
    for i in range(nfiles):
        if i % per_dir == 0:
            current = base / f"d{i // per_dir:05d}"
            current.mkdir(parents=True, exist_ok=True)
        assert current is not None
        fd = os.open(current / f"f{i:07d}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, payload)
        finally:
            os.close(fd)
    return nfiles * size


def _tail(log: Path, lines: int = 15) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def is_subvolume(path: Path) -> bool:
    """A btrfs subvolume's root directory always has inode number 256."""
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_ino == 256 and stat.S_ISDIR(st.st_mode)
