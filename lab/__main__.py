"""``python -m lab up|down|status|seed-dind|seed-orphan FOLDER``.

Exit codes: 0 done; 1 failed (the message says why); 2 usage; 3 this host cannot run a lab.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lab import host
from lab.core import DEFAULT_SIZE, Lab
from lab.errors import LabError, LabUnavailable
from lab.manifest import to_jsonable
from lab.proc import ref_for
from lab.state import LabState, Layout
from lab.teardown import down, report_json


def _parse_size(text: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    text = text.strip().upper()
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def status(root: Path) -> dict[str, object]:
    layout = Layout(root)
    out: dict[str, object] = {"root": str(root), "exists": root.exists()}
    if layout.state_file.exists():
        state = LabState.load(root)
        out["phase"] = state.phase
        for ref in (state.dockerd, state.containerd):
            if ref is not None:
                out[f"{ref.name}_pid"] = ref.pid
                out[f"{ref.name}_alive"] = ref.alive()
        out["loop_device"] = state.loop_device
    out["docker_answers"] = host.docker_ping(layout.socket)
    out["mounts"] = [m.mountpoint for m in host.mounts_below(root)]
    out["loop_devices"] = host.loop_devices_backed_by(layout.image_file)
    out["cgroup_pids"] = sorted(p for p in host.cgroup_pids(layout.cgroup_parent) if ref_for(p, ""))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up_p = sub.add_parser("up", help="build a lab in FOLDER and print its manifest as JSON")
    up_p.add_argument("folder", type=Path)
    up_p.add_argument("--size", default=str(DEFAULT_SIZE), help="image file size, e.g. 6G")
    up_p.add_argument("--no-seed", action="store_true", help="images only, no leftovers")
    for name, text in (
        ("down", "tear the lab in FOLDER down (idempotent)"),
        ("status", "what of the lab in FOLDER is running"),
        ("seed-dind", "seed one more leaked dind volume; print it as JSON"),
        ("seed-orphan", "seed one more orphaned layer subvolume; print its path"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    folder = Path(os.path.realpath(args.folder))
    try:
        if args.command == "up":
            lab = Lab.up(folder, size=_parse_size(args.size), seed=not args.no_seed)
            print(json.dumps(lab.describe(), indent=2))
        elif args.command == "down":
            report = down(folder, check=False)
            print(report_json(report))
            return 0 if report.ok else 1
        elif args.command == "status":
            print(json.dumps(status(folder), indent=2))
        elif args.command == "seed-dind":
            print(json.dumps(to_jsonable(Lab.load(folder).seed_dind_volume()), indent=2))
        elif args.command == "seed-orphan":
            print(Lab.load(folder).seed_orphan_subvolume())
    except LabUnavailable as exc:
        print(f"lab unavailable: {exc}", file=sys.stderr)
        return 3
    except LabError as exc:
        print(f"lab {args.command} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
