"""The kill -9 fault matrix: every named kill point of a day, killed, run again, compared with a clean run.

    .venv/bin/python -m tests.benchmarks.fault_matrix [--points a,b,...] [--out DIR]

The procedure and what each column means: tests/integration/faults.py (the suite runs a few of the points with the
same harness, tests/integration/test_faults.py). Writes ``fault-matrix.json`` and its summary ``.md`` into
tests/benchmarks/results/ (docs/measured.md shows it). The 19 points took 25 minutes on 2 shared cores (the
result's ``started`` and ``finished``; 53 on a busier day).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from tests.benchmarks.pipeline import REPO, git_info, load, log, machine_info, now
from tests.benchmarks.render import write_summary
from tests.integration import faults


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", help="comma-separated kill points (default: every one of faults.POINTS)")
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "benchmarks" / "results")
    args = ap.parse_args(argv)
    points = args.points.split(",") if args.points else list(faults.POINTS)
    unknown = [p for p in points if p not in faults.POINTS]
    if unknown:
        ap.error(f"unknown kill points: {', '.join(unknown)} (known: {', '.join(faults.POINTS)})")
    doc = {
        "benchmark": "fault-matrix",
        "command": " ".join(
            [Path(sys.executable).name, "-m", "tests.benchmarks.fault_matrix", *(argv or sys.argv[1:])]
        ),
        "git": git_info(),
        "machine": machine_info(),
        "torch": {"torch": torch.__version__},  # the fine-tune and inference of every trial run on it
        "started": now(),
        "load_at_start": load(),
        "day": str(faults.D3),
        "results": [],
    }
    with tempfile.TemporaryDirectory(prefix="userformer-faults-") as tmp:
        root = Path(tmp)
        log("base: two days")
        base = faults.base(root / "base")
        log("reference: the third day, clean")
        ref = faults.reference(base, root / "reference")
        for i, point in enumerate(points):
            log(f"{point}: kill, rerun, compare")
            row = faults.trial(base, ref, point, root / f"trial-{i}")
            log(
                f"  reached {row['reached']}, equal {row['equal']}, mixed {len(row['mixed'])}, orphans "
                f"{row['orphans']}, snapshots seen {row['snapshots_seen']} ({row['snapshot_reads']} reads)"
            )
            doc["results"].append(row)
    doc.update(finished=now(), load_at_end=load())
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "fault-matrix.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(write_summary(path, json.loads(path.read_text())), flush=True)
    bad = [
        r["point"] for r in doc["results"] if not (r["reached"] and r["equal"] and not r["mixed"] and not r["orphans"])
    ]
    log(f"wrote {path} and .md; {len(doc['results']) - len(bad)} of {len(doc['results'])} points as a clean run")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
