"""Where a lab keeps things in its folder, and the state file that lets any process
(``python -m lab down`` included) find and tear down what an ``up`` created."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from lab.manifest import Seeded, from_jsonable, to_jsonable
from lab.proc import ProcessRef

STATE_FILE = "lab.json"


@dataclass(frozen=True)
class Layout:
    """Every path of a lab, derived from its folder alone."""

    root: Path

    @property
    def state_file(self) -> Path:
        return self.root / STATE_FILE

    @property
    def image_file(self) -> Path:
        return self.root / "fs.img"

    @property
    def mnt(self) -> Path:
        return self.root / "mnt"

    @property
    def data_root(self) -> Path:
        return self.mnt / "docker"

    @property
    def socket(self) -> Path:
        return self.root / "outer.sock"

    @property
    def pidfile(self) -> Path:
        return self.root / "outer.pid"

    @property
    def exec_root(self) -> Path:
        return self.root / "exec"

    @property
    def daemon_json(self) -> Path:
        return self.root / "daemon.json"

    @property
    def containerd_dir(self) -> Path:
        return self.root / "containerd"

    @property
    def containerd_socket(self) -> Path:
        return self.containerd_dir / "containerd.sock"

    @property
    def containerd_config(self) -> Path:
        return self.containerd_dir / "config.toml"

    @property
    def docker_config(self) -> Path:
        """DOCKER_CONFIG for the lab's clients: no user config, contexts or helpers leak in."""
        return self.root / "docker-config"

    @property
    def dind_dir(self) -> Path:
        return self.root / "dind"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def cgroup_parent(self) -> str:
        """A top-level cgroup of the lab's own, so its container processes can be found."""
        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:12]
        return f"nas-janitor-lab-{digest}"


@dataclass
class LabState:
    root: Path
    phase: str = "starting"  # "starting" until up finished, then "ready"
    loop_device: str | None = None
    containerd: ProcessRef | None = None
    dockerd: ProcessRef | None = None
    seeded: Seeded | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def save(self) -> None:
        path = Layout(self.root).state_file
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(to_jsonable(self), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, root: Path) -> LabState:
        data = json.loads(Layout(root).state_file.read_text())
        return from_jsonable(cls, data)
