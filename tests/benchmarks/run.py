"""Run the benchmarks and write their results (see README.md beside this file).

    python -m tests.benchmarks.run [--scenario throughput|incremental|model|infer|all] [--events 1000000,10000000]
                                   [--users-30d N] [--repeats K] [--device cpu|cuda|auto] [--out DIR]

Each measured pipeline configuration runs in a child process (python -m tests.benchmarks.pipeline)
with its own temporary USERFORMER_HOME under /tmp, deleted afterwards. Results go to
DIR/pipeline-<scenario>.json and DIR/pipeline-<scenario>.md; the Markdown is printed too.
The model scenario runs python -m tests.benchmarks.model_speed in a child process (no Spark, no
files but its results: DIR/model-speed.json and .md); the infer scenario runs
python -m tests.benchmarks.infer_incremental (DIR/infer-incremental.json and .md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.benchmarks.pipeline import REPO, git_info, load, log, machine_info, mem_available_gib, now
from tests.benchmarks.render import write_summary

RESULTS = Path(__file__).resolve().parent / "results"


def parse_sizes(text: str, repeats: int) -> list[tuple[int, int]]:
    """'1000000,10M:1' -> [(1000000, repeats), (10000000, 1)]: an optional :K sets that size's repeats."""
    out = []
    for part in text.split(","):
        part = part.strip().replace("_", "")
        if not part:
            continue
        size, _, k = part.partition(":")
        mult = 1
        if size[-1:].lower() in ("k", "m"):
            mult = 1_000 if size[-1].lower() == "k" else 1_000_000
            size = size[:-1]
        n = int(float(size) * mult)
        if n < 10_000:
            raise argparse.ArgumentTypeError(f"--events: {n} is too small to measure (at least 10000)")
        out.append((n, int(k) if k else repeats))
    return out


def spark_settings(n_events: int, args) -> tuple[str, int]:
    """Driver memory and shuffle partitions suited to a one-drop size (overridable)."""
    mem = args.driver_memory or ("4g" if n_events <= 2_000_000 else "6g" if n_events <= 5_000_000 else "8g")
    parts = args.shuffle_partitions or (8 if n_events <= 2_000_000 else 16)
    return mem, parts


def child(scenario: str, extra: list[str]) -> dict:
    """Run one scenario configuration in a fresh process and temporary home; return its JSON."""
    home = Path(tempfile.mkdtemp(prefix=f"userformer-bench-{scenario}-", dir="/tmp"))
    result = home.parent / f"{home.name}.json"
    try:
        cmd = [
            sys.executable,
            "-m",
            "tests.benchmarks.pipeline",
            scenario,
            "--home",
            str(home / "home"),
            "--result",
            str(result),
            *extra,
        ]
        log(f"$ {' '.join(cmd)}")
        r = subprocess.run(cmd, cwd=REPO)
        if r.returncode != 0:
            raise SystemExit(f"benchmark child failed with exit code {r.returncode}: {' '.join(cmd)}")
        return json.loads(result.read_text())
    finally:
        shutil.rmtree(home, ignore_errors=True)
        result.unlink(missing_ok=True)


def child_module(module: str, args: list[str], repeats: int | None) -> None:
    """Run a benchmark module that writes its own results, in a child process; fail loudly if it fails."""
    cmd = [sys.executable, "-m", module, *args] + (["--repeats", str(repeats)] if repeats is not None else [])
    log(f"$ {' '.join(cmd)}")
    r = subprocess.run(cmd, cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"{module} failed with exit code {r.returncode}: {' '.join(cmd)}")


def header(scenario: str, params: dict) -> dict:
    return {
        "benchmark": f"pipeline-{scenario}",
        "scenario": scenario,
        "params": params,
        "machine": machine_info(),
        "git": git_info(),
        "started": now(),
        "load_at_start": load(),
        "mem_available_gib_at_start": mem_available_gib(),
        "command": " ".join(sys.argv),
    }


def write(out_dir: Path, scenario: str, doc: dict) -> None:
    """The result file and its summary beside it (render.py, as the docs site shows it); the summary is printed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"pipeline-{scenario}.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(write_summary(path, json.loads(path.read_text())), flush=True)
    log(f"wrote {out_dir / f'pipeline-{scenario}.json'} and .md")


# -------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", choices=["throughput", "incremental", "model", "infer", "all"], default="all")
    p.add_argument(
        "--events",
        default="1000000,10000000",
        help="throughput: comma-separated drop sizes; 1M/10M accepted; SIZE:K sets K repeats for that size",
    )
    p.add_argument(
        "--users-30d", type=int, default=100_000, help="incremental: users of the 30-day history (default 100000)"
    )
    p.add_argument("--days", type=int, default=30, help="incremental: days of history (default 30)")
    p.add_argument(
        "--active-frac", type=float, default=0.05, help="incremental: share of users active per day (default 0.05)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="samples per measured step (default 3; model: samples per measurement, default 5)",
    )
    p.add_argument(
        "--step-budget-s",
        type=float,
        default=None,
        help="throughput: take fewer repeats of a step when first-sample x repeats would exceed this",
    )
    p.add_argument("--driver-memory", default=None, help="override spark.driver_memory (default: by size)")
    p.add_argument(
        "--shuffle-partitions", type=int, default=None, help="override spark.shuffle_partitions (default: by size)"
    )
    p.add_argument(
        "--device", choices=["cpu", "cuda", "auto"], default="auto", help="model: where the model runs (default auto)"
    )
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS.relative_to(REPO)})")
    a = p.parse_args(argv)
    if a.repeats is not None and a.repeats < 1:
        p.error("--repeats must be >= 1")
    model_repeats, a.repeats = a.repeats, a.repeats or 3
    if a.days < 2:
        p.error("--days must be >= 2")
    sizes = parse_sizes(a.events, a.repeats)

    if a.scenario in ("throughput", "all"):
        doc = header(
            "throughput",
            {
                "events": [n for n, _ in sizes],
                "repeats": {str(n): k for n, k in sizes},
                "step_budget_s": a.step_budget_s,
                "days": 1,
                "active_frac": 1.0,
                "events_per_active_user": 20.0,
            },
        )
        doc["results"] = []
        for n, k in sizes:
            mem, parts = spark_settings(n, a)
            extra = [
                "--events",
                str(n),
                "--repeats",
                str(k),
                "--driver-memory",
                mem,
                "--shuffle-partitions",
                str(parts),
            ]
            if a.step_budget_s:
                extra += ["--step-budget-s", str(a.step_budget_s)]
            doc["results"].append(child("throughput", extra))
        doc["finished"] = now()
        write(a.out, "throughput", doc)

    if a.scenario in ("incremental", "all"):
        mem = a.driver_memory or "4g"
        parts = a.shuffle_partitions or 8
        doc = header(
            "incremental",
            {
                "users": a.users_30d,
                "days": a.days,
                "active_frac": a.active_frac,
                "events_per_active_user": 20.0,
                "repeats": a.repeats,
            },
        )
        extra = [
            "--users",
            str(a.users_30d),
            "--days",
            str(a.days),
            "--active-frac",
            str(a.active_frac),
            "--repeats",
            str(a.repeats),
            "--driver-memory",
            mem,
            "--shuffle-partitions",
            str(parts),
        ]
        doc["results"] = [child("incremental", extra)]
        doc["finished"] = now()
        write(a.out, "incremental", doc)

    if a.scenario in ("model", "all"):
        # Its own process: torch's threads and allocations stay out of this one; it writes its own results.
        child_module("tests.benchmarks.model_speed", ["--device", a.device, "--out", str(a.out)], model_repeats)
    if a.scenario in ("infer", "all"):
        # Inference of an incremental day vs a full re-embed (its own process and temporary home).
        child_module(
            "tests.benchmarks.infer_incremental",
            ["--device", a.device, "--out", str(a.out), "--active-share", str(a.active_frac)],
            model_repeats,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
