"""Do two builds of userformer write the same tables from the same drops? (A check for refactors, not a timing.)

Generates a few small days once, runs them with `userformer run-day` through each build's own executable (each in
its own home, both reading the same raw drops), and compares every table with the test suite's comparison
(tests/integration/warehouses.py: exact tables row by row; model outputs within float tolerance, also reported
as how many rows are identical). Each build needs its own installed checkout, e.g. for a commit REV::

    git worktree add /tmp/before REV && make -C /tmp/before venv   # its own .venv: torch==2.13.0 first, then the lock
    .venv/bin/python -m tests.benchmarks.same_tables --before /tmp/before/.venv/bin/userformer \\
        --after .venv/bin/userformer --days 3

Prints a JSON summary; exits 1 when a table differs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.integration import warehouses
from userformer.jobs.core.config import load_config


def _env(home: Path, raw: Path) -> dict:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("USERFORMER")},
        **warehouses.small_env(home, raw_root=raw),
        "SPARK_LOCAL_IP": "127.0.0.1",
    }


def _run(exe: str, args: list[str], env: dict) -> None:
    # The build's own Python runs Spark's Python workers too.
    env = {**env, "PYSPARK_PYTHON": str(Path(exe).with_name("python"))}
    r = subprocess.run([exe, *args], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{exe} {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-4000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", required=True, help="the first build's `userformer` executable")
    p.add_argument("--after", required=True, help="the second build's `userformer` executable")
    p.add_argument("--days", type=int, default=3, help="generated drops (the first model is trained on day 2)")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--work", help="folder for the homes (default: a temporary one, deleted)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="userformer-same-") as tmp:
        root = Path(args.work or tmp)
        raw = root / "raw"
        homes = {"before": root / "before", "after": root / "after"}
        start = warehouses.D1
        last = start + dt.timedelta(days=args.days - 1)
        _run(args.after, ["generate", "--users", "150", "--items", "200", "--days", str(args.days), "--start",
                          str(start), "--seed", str(args.seed), "--out", str(raw)], _env(homes["after"], raw))  # fmt: skip
        for side, home in homes.items():
            exe = getattr(args, side)
            _run(exe, ["run-day", "--dt", str(start), "--to", str(last)], _env(home, raw))
        before, after = (load_config(env=warehouses.small_env(h, raw_root=raw)) for h in homes.values())
        out = {"before": args.before, "after": args.after, "days": args.days, "seed": args.seed, "tables": {}}
        failed = None
        try:
            warehouses.assert_same_tables(before, after)
        except AssertionError as exc:
            failed = str(exc)
        for table in [*warehouses.EXACT, *warehouses.FLOATS]:
            keys = warehouses.EXACT.get(table, warehouses.FLOATS.get(table))
            ra = warehouses.table_rows(before, table, keys)
            rb = warehouses.table_rows(after, table, keys)
            out["tables"][table] = {"rows": len(ra), "identical_rows": sum(rb.get(k) == row for k, row in ra.items())}
        out["same"] = failed is None
        out["difference"] = failed
        print(json.dumps(out, indent=2))
        return 0 if failed is None else 1


if __name__ == "__main__":
    sys.exit(main())
