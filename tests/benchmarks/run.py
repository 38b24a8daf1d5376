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


def write(out_dir: Path, scenario: str, doc: dict, md: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"pipeline-{scenario}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (out_dir / f"pipeline-{scenario}.md").write_text(md)
    print(md, flush=True)
    log(f"wrote {out_dir / f'pipeline-{scenario}.json'} and .md")


# ---------------------------------------------------------------- markdown
def _n(x) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:,.0f}" if isinstance(x, float) else str(x)


def _s(xs) -> str:
    return ", ".join(f"{x:.1f}" for x in xs)


def _machine_line(doc: dict) -> str:
    m, g = doc["machine"], doc["git"]
    return (
        f"{m['cpu_count']} CPUs ({m['cpu_model']}), {m['memory_total_gib']} GiB; Python {m['python']}, "
        f"PySpark {m['pyspark']}, deltalake {m['deltalake']}, pyarrow {m['pyarrow']}; "
        f"commit {str(g['commit'])[:10]}{' (dirty)' if g['dirty'] else ''}; {doc['started']} .. {doc['finished']}; "
        f"load avg at start {doc['load_at_start']}"
    )


def _stages(run: dict, k: int = 3) -> str:
    sp = run.get("spark") or {}
    slow = sp.get("slowest") or []
    if not slow:
        return ""
    top = "; ".join(f"{s['name']} {s['wall_s']:.1f}s/{s['tasks']}t" for s in slow[:k])
    return f"{sp['n_stages']} stages, {sp['stages_wall_s']:.1f}s: {top}"


def md_throughput(doc: dict) -> str:
    lines = [
        "## pipeline throughput (one drop)",
        "",
        _machine_line(doc),
        "",
        "| raw events | users | step | median s | events/s | samples s | Spark |",
        "|---:|---:|---|---:|---:|---|---|",
    ]
    for r in doc["results"]:
        st = r["steps"]
        sp = r["config"]["spark"]
        label = {
            "ingest": "ingest",
            "sequences_first_build": "sequences.update (first build)",
            "sequences_rebuild": "sequences.rebuild",
        }
        for i, (k, name) in enumerate(label.items()):
            s = st[k]
            extra = " (reduced)" if s["reduced"] else ""
            lines.append(
                f"| {_n(r['events_raw']) if i == 0 else ''} | {_n(r['users']) if i == 0 else ''} | {name} | "
                f"{s['median_s']:.1f} | {_n(s['events_per_s'])} | {_s(s['samples_s'])}{extra} | "
                f"{sp['driver_memory'] + ', ' + str(sp['shuffle_partitions']) + ' partitions' if i == 0 else ''} |"
            )
        b = r["ingest_plus_sequences"]
        lines.append(
            f"| | | **ingest + sequences** | **{b['median_s']:.1f}** | **{_n(b['events_per_s'])}** | sum of medians | |"
        )
    lines += [
        "",
        "Generation (not timed above): "
        + "; ".join(f"{_n(r['events_raw'])} events in {r['generate']['seconds']:.1f}s" for r in doc["results"]),
        "",
    ]
    lines += [
        "Slowest Spark stages of the median-nearest sample (stage wall time / tasks):",
        "",
        "| raw events | step | stages |",
        "|---:|---|---|",
    ]
    for r in doc["results"]:
        for k, s in r["steps"].items():
            runs = s["runs"]
            best = min(runs, key=lambda x: abs(x["seconds"] - s["median_s"]))
            lines.append(f"| {_n(r['events_raw'])} | {k} | {_stages(best)} |")
    return "\n".join(lines) + "\n"


def md_incremental(doc: dict) -> str:
    r = doc["results"][0]
    ld = r["last_day"]
    lines = [
        f"## pipeline incremental ({r['days']} days, {_n(r['users'])} users, active_frac {r['active_frac']})",
        "",
        _machine_line(doc),
        "",
        f"History: {_n(r['generate']['events_total'])} raw events generated in {r['generate']['seconds']:.1f}s, "
        f"{_n(r['events_total_accepted'])} accepted; last day {ld['dt']}: {_n(ld['raw_events'])} raw events, "
        f"{_n(ld['active_users'])} active users of {_n(ld['user_sequences_rows'])} in user_sequences.",
        "",
        "| measure (day " + ld["dt"] + ") | median s | samples s | events/s |",
        "|---|---:|---|---:|",
    ]
    for name, key in (
        ("ingest of the day", "ingest_last_day"),
        ("sequences.update (incremental, state after the previous day)", "sequences_incremental"),
        ("sequences.rebuild(upto=day) (all history)", "sequences_rebuild"),
    ):
        s = r[key]
        ev = ld["raw_events"] if key != "sequences_rebuild" else r["events_total_accepted"]
        lines.append(f"| {name} | {s['median_s']:.1f} | {_s(s['samples_s'])} | {_n(round(ev / s['median_s']))} |")
    lines += [
        "",
        f"**ratio median(incremental) / median(rebuild) = {r['ratio_incremental_to_rebuild']:.3f}** "
        f"(rebuild {r['speedup_rebuild_over_incremental']:.1f}x slower); "
        f"**tables_equal = {str(r['tables_equal']).lower()}**"
        + (f" — first difference: {r['tables_difference']}" if not r["tables_equal"] else ""),
        "",
    ]
    w = r.get("written")
    if w:
        lines += [
            "What each wrote (the median-nearest sample's commit, from its operationMetrics):",
            "",
            "| path | rows written | files added | MB added | files rewritten | deletion vectors added | "
            "rows copied | MERGE scan s | MERGE rewrite s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name in ("incremental", "rebuild"):
            x = w[name]
            ms = lambda k: f"{x[k] / 1000:.1f}" if x.get(k) is not None else ""  # noqa: E731
            lines.append(
                f"| {name} | {_n(x.get('rows_written'))} | {_n(x.get('files_added'))} | "
                f"{(x.get('bytes_added') or 0) / 2**20:.1f} | {_n(x.get('files_rewritten', 0))} | "
                f"{_n(x.get('deletion_vectors_added', 0))} | {_n(x.get('target_rows_copied', 0))} | "
                f"{ms('scan_ms')} | {ms('rewrite_ms')} |"
            )
        lines.append("")
    mt = r.get("maintain")
    if mt:
        us = mt["tables"].get("user_sequences") or {}
        lines += [
            f"`maintain` after the incremental samples: {mt['seconds']:.1f}s; user_sequences "
            f"{mt['user_sequences_files_before']} files → {mt['user_sequences_files_after']} "
            f"(OPTIMIZE {us.get('optimize')}, purge {us.get('purge')}, {us.get('files_deleted')} files vacuumed).",
            "",
        ]
    inc = r["sequences_incremental"]["runs"]
    reb = r["sequences_rebuild"]["runs"]
    if inc and reb:
        lines += [
            f"Spark, incremental: {_stages(inc[len(inc) // 2])}",
            "",
            f"Spark, rebuild: {_stages(reb[len(reb) // 2])}",
            "",
        ]
    ps = r["per_day_summary"]
    lines += [
        "Day-by-day pass (each day: ingest, then sequences.update):",
        "",
        "| step | total s | median s | min s | max s |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, name in (("ingest_s", "ingest"), ("sequences_s", "sequences.update")):
        lines.append(
            f"| {name} | {ps[k]['total_s']:.1f} | {ps[k]['median_s']:.1f} | {ps[k]['min_s']:.1f} | {ps[k]['max_s']:.1f} |"
        )
    lines += [
        "",
        "<details><summary>per day</summary>",
        "",
        "| dt | raw events | ingest s | active users | sequences s | rows written | files added | files rewritten |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in r["per_day"]:
        lines.append(
            f"| {p['dt']} | {_n(p['raw_events'])} | {p['ingest_s']:.1f} | {_n(p['active_users'])} | "
            f"{p['sequences_s']:.1f} | {_n(p.get('rows_written'))} | {_n(p.get('files_added'))} | "
            f"{p['files_rewritten']} |"
        )
    lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


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
        write(a.out, "throughput", doc, md_throughput(doc))

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
        write(a.out, "incremental", doc, md_incremental(doc))

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
