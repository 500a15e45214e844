"""Rewrite the results sections of BENCHMARKS.md from the benchmarks' JSON files.

Each section sits between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``
(NAME = b1 ... b6); a results file ``NAME.json`` (written by ``--json``) replaces
what is between its markers. Sections without a results file are left as they are.

    .venv/bin/python -m bench.report RESULTS_DIR BENCHMARKS.md
"""

from __future__ import annotations

import json
import platform
import re
import sys
from datetime import UTC, datetime
from pathlib import Path


def section(name: str, data: dict[str, object], stamp: str) -> str:
    body = f"_Recorded {data.get('recorded') or stamp}._\n\n{data['markdown']}"
    return f"<!-- bench:{name} -->\n{body}\n<!-- /bench:{name} -->"


def rewrite(doc: str, results: dict[str, dict[str, object]], stamp: str) -> str:
    for name, data in results.items():
        pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", re.DOTALL)
        if not pattern.search(doc):
            raise SystemExit(f"no <!-- bench:{name} --> section in the document")
        doc = pattern.sub(lambda _m: section(name, data, stamp), doc)  # noqa: B023
    return doc


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    results_dir, doc_path = Path(argv[0]), Path(argv[1])
    results = {p.stem: json.loads(p.read_text()) for p in sorted(results_dir.glob("b[0-9].json"))}
    stamp = (
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.node()} "
        f"(Linux {platform.release()}, {platform.machine()})"
    )
    doc = rewrite(doc_path.read_text(), results, stamp)
    doc_path.write_text(doc)
    print(f"{doc_path}: rewrote {', '.join(results) or 'nothing'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
