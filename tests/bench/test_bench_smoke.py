"""Every benchmark script runs end to end in a tiny configuration (each on a lab of its
own), so the scripts cannot rot; and ``bench.report`` rewrites BENCHMARKS.md's sections
from their results. The real numbers come from ``make bench`` (see BENCHMARKS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import rewrite

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.lab

TINY = {
    "b1_scan": ["--subvolumes", "200", "--volumes", "20", "--runs", "1", "--warmup", "0"],
    "b2_reclaim": ["--files", "1000,2000", "--runs", "1", "--others", "50"],
    "b3_fleet": ["--agents", "5", "--runs", "1", "--orphans", "1"],
    "b4_footprint": ["--subvolumes", "200", "--volumes", "20", "--runs", "1", "--load-runs", "1"],
    "b5_enumeration": ["--subvolumes", "200", "--volumes", "20", "--runs", "1"],
    "b6_kept": ["--subvolumes", "200", "--volumes", "20", "--runs", "1", "--load", "4x1"],
    "b7_holders": ["--runs", "1", "--processes", "5", "--fds", "2"],
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_runs_tiny(script: str, lab_host: None, tmp_path: Path) -> None:
    out = tmp_path / f"{script}.json"
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{script}", *TINY[script], "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["name"] == script[:2]
    assert data["tables"] and all(t["rows"] for t in data["tables"])
    assert "| ---" in proc.stdout  # the Markdown table was printed
    doc = f"# x\n<!-- bench:{data['name']} -->\nSTALE-SECTION\n<!-- /bench:{data['name']} -->\n"
    new = rewrite(doc, {data["name"]: data}, "now")
    assert "STALE-SECTION" not in new and data["markdown"] in new


def test_benchmarks_md_has_a_section_per_benchmark() -> None:
    doc = (REPO / "BENCHMARKS.md").read_text()
    for name in ("b1", "b2", "b3", "b4", "b5", "b7"):
        assert f"<!-- bench:{name} -->" in doc and f"<!-- /bench:{name} -->" in doc
