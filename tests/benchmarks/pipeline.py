"""The measured pipeline scenarios (not tests: nothing here asserts a time).

Each scenario runs in its own process (see run.py), so that Spark starts with
the driver memory suited to the size and gives all of it back afterwards:

    python -m tests.benchmarks.pipeline throughput --events N --repeats K --home DIR --result FILE
    python -m tests.benchmarks.pipeline incremental --users N --days 30 --repeats K --home DIR --result FILE

`DIR` is a fresh, empty USERFORMER_HOME under /tmp (the caller deletes it);
`FILE` receives the scenario's measurements as JSON.

Spark's event log is written into DIR, and after every timed step the stages
that completed during it are summarised (the slowest few), so a result says
where the time of a step went.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
START = dt.date(2026, 1, 1)
SEED = 11


# ------------------------------------------------------------------ context
def machine_info() -> dict:
    mem_kb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    versions = {}
    for mod in ("pyspark", "deltalake", "pyarrow", "numpy", "pandas"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - informative only
            versions[mod] = None
    try:
        java = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30).stderr.splitlines()[0]
    except Exception:
        java = None
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_total_gib": round(mem_kb / 2**20, 1) if mem_kb else None,
        "python": platform.python_version(),
        "java": java,
        **versions,
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def git_info() -> dict:
    def git(*args):
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
        return r.stdout.strip() if r.returncode == 0 else None

    changed = git("status", "--porcelain", "--untracked-files=no")
    untracked = git("status", "--porcelain", "--untracked-files=normal")
    return {
        "commit": git("rev-parse", "HEAD"),
        # dirty: tracked files differ from the commit (untracked files listed apart).
        "dirty": bool(changed) if changed is not None else None,
        "changed_files": changed.splitlines()[:30] if changed else [],
        "untracked": [l[3:] for l in (untracked or "").splitlines() if l.startswith("??")][:30],
    }


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def mem_available_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def summary(samples: list[float]) -> dict:
    return {
        "samples_s": [round(s, 3) for s in samples],
        "median_s": round(statistics.median(samples), 3) if samples else None,
        "min_s": round(min(samples), 3) if samples else None,
        "max_s": round(max(samples), 3) if samples else None,
    }


# ------------------------------------------------------------------ config
def make_cfg(home: Path, *, driver_memory: str, shuffle_partitions: int):
    from userformer.jobs.core.config import load_config

    cfg = load_config(
        env={
            "USERFORMER_HOME": str(home),
            "USERFORMER__SPARK__DRIVER_MEMORY": driver_memory,
            "USERFORMER__SPARK__SHUFFLE_PARTITIONS": str(shuffle_partitions),
        }
    )
    (home / "spark-events").mkdir(parents=True, exist_ok=True)
    (home / "spark-local").mkdir(parents=True, exist_ok=True)
    cfg.spark.extra = {
        **cfg.spark.extra,
        # Where the time goes: stage completions are flushed to the event log as they happen.
        "spark.eventLog.enabled": "true",
        "spark.eventLog.dir": (home / "spark-events").as_uri(),
        "spark.eventLog.compress": "false",
        "spark.eventLog.rolling.enabled": "false",
        # Shuffle/spill files inside the temporary home, so they go with it.
        "spark.local.dir": str(home / "spark-local"),
    }
    return cfg


def cfg_used(cfg) -> dict:
    d = cfg.to_dict()
    return {k: d[k] for k in ("spark", "ingest", "sequences")}


class StageLog:
    """Reads Spark's event log incrementally: the stages completed since the last call.

    A stage is labelled with the call site of its job (PySpark sets it to the Python line that
    triggered the job, e.g. `parquet at /.../ingest.py:377`) and the operators of its RDDs
    (e.g. `Scan parquet > Exchange`), since AQE's stage names alone say nothing.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.offset = 0
        self.file: Path | None = None
        self.stage_job: dict[int, dict] = {}
        self.sql: dict[str, str] = {}

    def _find(self) -> Path | None:
        # The newest log: a Spark session started again (after a step that runs without one) writes a new file.
        files = [p for p in self.folder.rglob("*") if p.is_file() and not p.name.startswith(".")]
        newest = max(files, key=lambda p: p.stat().st_mtime, default=None)
        if newest != self.file:
            self.file, self.offset = newest, 0
        return self.file

    def _label(self, si: dict) -> str:
        job = self.stage_job.get(si["Stage ID"], {})
        props = job.get("Properties") or {}
        site = (
            self.sql.get(str(props.get("spark.sql.execution.id")))
            or props.get("callSite.short")
            or si.get("Stage Name", "")
        )
        site = (
            site.replace(str(REPO) + "/", "")
            .replace(" at NativeMethodAccessorImpl.java:0", "")
            .replace(" at <unknown>:0", "")
        )
        if "withThreadLocalCaptured" in site:  # AQE's query stages carry no useful call site
            site = ""
        ops = []
        for rdd in sorted(si.get("RDD Info", []), key=lambda r: r.get("RDD ID", 0)):
            try:
                name = json.loads(rdd.get("Scope") or "{}").get("name")
            except ValueError:
                name = None
            name = (name or "").split(" (")[0].strip()
            if (
                name
                and name not in ops
                and name not in ("WholeStageCodegen", "mapPartitionsInternal", "map", "mapPartitions")
            ):
                ops.append(name)
        return f"{site} [{' > '.join(ops)}]".strip() if ops else site

    def read(self, top: int = 5) -> dict:
        f = self._find()
        if f is None:
            return {}
        with open(f, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n")
        if end < 0:
            return {}
        self.offset += end + 1
        stages = []
        for line in data[: end + 1].splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            kind = ev.get("Event", "")
            if kind == "SparkListenerJobStart":
                for sid in ev.get("Stage IDs", []):
                    self.stage_job[sid] = ev
            elif kind.endswith("SparkListenerSQLExecutionStart"):
                self.sql[str(ev.get("executionId"))] = ev.get("description", "")
            elif kind == "SparkListenerStageCompleted":
                si = ev["Stage Info"]
                sub, done = si.get("Submission Time"), si.get("Completion Time")
                if sub is None or done is None:
                    continue
                run_ms = 0
                for acc in si.get("Accumulables", []):
                    if acc.get("Name") == "internal.metrics.executorRunTime":
                        run_ms = int(acc.get("Value") or 0)
                stages.append(
                    {
                        "stage": si["Stage ID"],
                        "name": self._label(si),
                        "tasks": si.get("Number of Tasks"),
                        "wall_s": round((done - sub) / 1000, 2),
                        "task_time_s": round(run_ms / 1000, 2),
                    }
                )
        slow = sorted(stages, key=lambda s: -s["wall_s"])[:top]
        return {
            "n_stages": len(stages),
            "stages_wall_s": round(sum(s["wall_s"] for s in stages), 2),
            "stages_task_time_s": round(sum(s["task_time_s"] for s in stages), 2),
            "slowest": slow,
        }


def start_spark(cfg) -> float:
    """Start the (process-wide) Spark session and run a trivial job: not part of any timed step."""
    from userformer.jobs.core.spark import spark_session

    t0 = time.perf_counter()
    spark = spark_session(cfg)
    spark.range(1000).selectExpr("sum(id)").collect()
    return round(time.perf_counter() - t0, 2)


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    res = fn(*args, **kw)
    return time.perf_counter() - t0, res


def log(msg: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", flush=True)


def _reduce(repeats: int, first_s: float, budget_s: float | None) -> int:
    """How many samples to take in all, given the first took first_s and the step may use budget_s."""
    if budget_s is None or repeats <= 1:
        return repeats
    return max(1, min(repeats, int(budget_s // max(first_s, 1e-9))))


# --------------------------------------------------------------- throughput
def events_per_user(active_frac: float = 1.0, per_user: float = 20.0) -> float:
    """Raw events per user of a one-day drop, measured on a small generator run (the generator's
    activity draw makes it less than per_user x active_frac)."""
    import tempfile

    from userformer.jobs.core.config import load_config
    from userformer.jobs.tools.generate import generate

    d = Path(tempfile.mkdtemp(prefix="userformer-bench-cal-", dir="/tmp"))
    try:
        cfg = load_config(env={"USERFORMER_HOME": str(d)})
        s = generate(
            cfg,
            users=20_000,
            items=5_000,
            days=1,
            start=START,
            seed=SEED,
            active_frac=active_frac,
            events_per_active_user=per_user,
        )
        return s["events_total"] / 20_000
    finally:
        shutil.rmtree(d, ignore_errors=True)


def throughput(
    home: Path,
    n_events: int,
    repeats: int,
    *,
    driver_memory: str,
    shuffle_partitions: int,
    step_budget_s: float | None = None,
) -> dict:
    """One drop of ~n_events: ingest (first + reruns), sequences first build, rebuild."""
    from userformer.jobs.core.spark import stop_spark
    from userformer.jobs.core.storage import delta
    from userformer.jobs.steps import ingest, sequences
    from userformer.jobs.tools.generate import generate

    started = now()
    cfg = make_cfg(home, driver_memory=driver_memory, shuffle_partitions=shuffle_partitions)
    epu = events_per_user()
    users = max(1000, round(n_events / epu))
    items = max(10_000, n_events // 100)
    day = START
    log(f"throughput {n_events:,}: generate users={users:,} items={items:,} (calibrated {epu:.2f} events/user)")
    gen_s, gen = timed(
        generate,
        cfg,
        users=users,
        items=items,
        days=1,
        start=day,
        seed=SEED,
        active_frac=1.0,
        events_per_active_user=20.0,
    )
    raw = gen["events_total"]
    log(f"  generated {raw:,} raw events in {gen_s:.1f}s")
    spark_start_s = start_spark(cfg)
    stages = StageLog(home / "spark-events")
    stages.read()
    seq_path = cfg.table_path("user_sequences")
    out = {
        "events_target": n_events,
        "events_raw": raw,
        "users": users,
        "items": items,
        "generate": {
            "seconds": round(gen_s, 2),
            "summary": {k: gen[k] for k in ("events_total", "late", "duplicates", "malformed", "users_new")},
        },
        "spark_start_s": spark_start_s,
        "repeats_requested": repeats,
        "steps": {},
    }

    def measure(name, fn, before=None):
        samples, details, n = [], [], repeats
        i = 0
        while i < n:
            if before is not None:
                before()
            stages.read()
            la, mem = load(), mem_available_gib()
            s, res = timed(fn)
            samples.append(s)
            details.append(
                {
                    "seconds": round(s, 3),
                    "load_before": la,
                    "mem_available_gib_before": mem,
                    "result": _small(res),
                    "spark": stages.read(),
                }
            )
            log(f"  {name} #{i + 1}: {s:.1f}s")
            if i == 0:
                n = _reduce(repeats, s, step_budget_s)
            i += 1
        out["steps"][name] = {
            **summary(samples),
            "repeats": len(samples),
            "reduced": len(samples) < repeats,
            "events_per_s": round(raw / statistics.median(samples)),
            "runs": details,
        }
        return details[-1]["result"]

    ing = measure("ingest", lambda: ingest.ingest(cfg, day))
    accepted = ing["accepted"]
    out["accepted"] = accepted

    def drop_sequences():
        shutil.rmtree(seq_path, ignore_errors=True)

    measure("sequences_first_build", lambda: sequences.update(cfg, day), before=drop_sequences)
    measure("sequences_rebuild", lambda: sequences.rebuild(cfg))
    st = out["steps"]
    both = st["ingest"]["median_s"] + st["sequences_first_build"]["median_s"]
    out["ingest_plus_sequences"] = {"median_s": round(both, 3), "events_per_s": round(raw / both)}
    out["table_sizes_mb"] = {t: _du(cfg.table_path(t)) for t in ("events", "events_rejected", "user_sequences")}
    out["user_sequences_rows"] = delta.logical_rows(seq_path)  # deletion vectors: delta-rs refuses the table
    out["config"] = cfg_used(cfg)
    out["started"], out["finished"] = started, now()
    stop_spark()
    return out


def _small(res):
    """A job's result dict without the bulky parts."""
    if not isinstance(res, dict):
        return res
    return {k: v for k, v in res.items() if k not in ("new_vocab",)}


def _du(path: Path) -> float:
    total = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).exists() else 0
    return round(total / 2**20, 1)


# -------------------------------------------------------------- incremental
def incremental(
    home: Path,
    users: int,
    days: int,
    repeats: int,
    *,
    active_frac: float,
    per_user: float,
    driver_memory: str,
    shuffle_partitions: int,
) -> dict:
    """`days` drops processed in order; then on the last day: incremental update vs full rebuild."""
    from userformer.jobs.core import drops
    from userformer.jobs.core.spark import stop_spark
    from userformer.jobs.core.storage import delta
    from userformer.jobs.steps import ingest, sequences
    from userformer.jobs.tools import maintain
    from userformer.jobs.tools.generate import generate

    started = now()
    cfg = make_cfg(home, driver_memory=driver_memory, shuffle_partitions=shuffle_partitions)
    items = max(10_000, users // 2)
    dates = [START + dt.timedelta(days=i) for i in range(days)]
    last, prev = dates[-1], dates[-2]
    log(f"incremental: generate users={users:,} items={items:,} days={days} active_frac={active_frac}")
    gen_s, gen = timed(
        generate,
        cfg,
        users=users,
        items=items,
        days=days,
        start=START,
        seed=SEED,
        active_frac=active_frac,
        events_per_active_user=per_user,
    )
    log(f"  generated {gen['events_total']:,} raw events in {gen_s:.1f}s")
    spark_start_s = start_spark(cfg)
    stages = StageLog(home / "spark-events")
    stages.read()
    seq_path = cfg.table_path("user_sequences")

    per_day = []
    for d in dates:
        t_i, ing = timed(ingest.ingest, cfg, d)
        t_s, seq = timed(sequences.update, cfg, d)
        per_day.append(
            {
                "dt": str(d),
                "raw_events": ing["raw_rows"],
                "accepted": ing["accepted"],
                "ingest_s": round(t_i, 3),
                "sequences_s": round(t_s, 3),
                "active_users": seq["active_users"],
                "new_users": seq["new_users"],
                "files_rewritten": seq["files_rewritten"],
                "files_added": seq.get("files_added"),
                "bytes_added": seq.get("bytes_added"),
                "rows_written": seq.get("rows_written"),
                "seq_version": seq["version"],
            }
        )
        log(f"  {d}: ingest {t_i:.1f}s ({ing['raw_rows']:,} raw)  sequences {t_s:.1f}s ({seq['active_users']:,} users)")
    stages.read()
    events_total_accepted = sum(p["accepted"] for p in per_day)

    # Ingest of the last day again (a rerun replaces the day: the same work as the first time).
    ing_samples, ing_runs = [per_day[-1]["ingest_s"]], []
    for i in range(repeats - 1):
        stages.read()
        s, res = timed(ingest.ingest, cfg, last)
        ing_samples.append(s)
        ing_runs.append({"seconds": round(s, 3), "load_before": load(), "spark": stages.read()})
        log(f"  ingest {last} rerun #{i + 1}: {s:.1f}s")

    # The incremental cost: update(D_last) applied to the state after D_prev, K times.
    applied, base = drops.last_drop(seq_path)
    assert applied == last and base is not None and base >= 0, (applied, base)
    inc_samples, inc_runs, inc_version = [], [], None
    for i in range(repeats):
        _restore_state(cfg, seq_path, base, prev)
        a, _ = drops.last_drop(seq_path)
        if a != prev:
            raise RuntimeError(f"after restoring version {base}, applied_drop says {a}, expected {prev}")
        stages.read()
        la, mem = load(), mem_available_gib()
        s, res = timed(sequences.update, cfg, last)
        if res.get("rerun"):
            raise RuntimeError(f"update({last}) ran as a rerun after the restore: {res}")
        inc_samples.append(s)
        inc_version = res["version"]
        inc_runs.append(
            {
                "seconds": round(s, 3),
                "load_before": la,
                "mem_available_gib_before": mem,
                "applied_before": str(a),
                "restored_version": base,
                "result": res,
                "spark": stages.read(),
            }
        )
        log(f"  sequences.update({last}) incremental #{i + 1}: {s:.1f}s  {res}")

    # What the daily MERGEs left (one small file a day, deletion vectors), then `maintain` on it, once:
    # compaction + purge (OPTIMIZE, REORG ... PURGE) and a vacuum that deletes nothing (30-day window).
    files_before_maintain = len(delta.active_files(seq_path))
    stages.read()
    t_m, maint = timed(maintain.maintain, cfg)
    maintain_run = {
        "seconds": round(t_m, 3),
        "user_sequences_files_before": files_before_maintain,
        "user_sequences_files_after": len(delta.active_files(seq_path)),
        "tables": maint["tables"],
        "spark": stages.read(),
    }
    log(f"  maintain: {t_m:.1f}s  user_sequences {maint['tables'].get('user_sequences')}")

    # The full-rebuild cost: rebuild(upto=D_last), K times.
    reb_samples, reb_runs, reb_version = [], [], None
    for i in range(repeats):
        stages.read()
        la, mem = load(), mem_available_gib()
        s, res = timed(sequences.rebuild, cfg, last)
        reb_samples.append(s)
        reb_version = res["version"]
        reb_runs.append(
            {
                "seconds": round(s, 3),
                "load_before": la,
                "mem_available_gib_before": mem,
                "result": res,
                "spark": stages.read(),
            }
        )
        log(f"  sequences.rebuild(upto={last}) #{i + 1}: {s:.1f}s")

    # Same table either way?
    a = delta.read_arrow(seq_path, version=inc_version).sort_by("user_id")
    b = delta.read_arrow(seq_path, version=reb_version).sort_by("user_id")
    equal = a.schema.equals(b.schema, check_metadata=False) and a.num_rows == b.num_rows and a.equals(b)
    diff = None
    if not equal:
        diff = _first_difference(a, b)
        log(f"  tables differ: {diff}")
    inc, reb = summary(inc_samples), summary(reb_samples)
    inc_mid = min(inc_runs, key=lambda r: abs(r["seconds"] - inc["median_s"]))["result"]
    reb_mid = min(reb_runs, key=lambda r: abs(r["seconds"] - reb["median_s"]))["result"]
    # Files, bytes and rows each path wrote, from the commits' operationMetrics (MERGE vs WRITE).
    written = {
        name: {
            k: r.get(k)
            for k in (
                "rows_written",
                "files_added",
                "bytes_added",
                "files_rewritten",
                "deletion_vectors_added",
                "target_rows_copied",
                "scan_ms",
                "rewrite_ms",
            )
            if k in r
        }
        for name, r in (("incremental", inc_mid), ("rebuild", reb_mid))
    }
    out = {
        "users": users,
        "items": items,
        "days": days,
        "active_frac": active_frac,
        "events_per_active_user": per_user,
        "generate": {"seconds": round(gen_s, 2), "events_total": gen["events_total"], "users_new": gen["users_new"]},
        "events_total_accepted": events_total_accepted,
        "spark_start_s": spark_start_s,
        "per_day": per_day,
        "per_day_summary": {
            k: summary([p[k] for p in per_day]) | {"total_s": round(sum(p[k] for p in per_day), 2)}
            for k in ("ingest_s", "sequences_s")
        },
        "last_day": {
            "dt": str(last),
            "raw_events": per_day[-1]["raw_events"],
            "accepted": per_day[-1]["accepted"],
            "active_users": per_day[-1]["active_users"],
            "user_sequences_rows": a.num_rows,
        },
        "ingest_last_day": {
            **summary(ing_samples),
            "note": "sample 1 from the day-by-day pass, then reruns of the day",
            "runs": ing_runs,
        },
        "sequences_incremental": {**inc, "runs": inc_runs},
        "sequences_rebuild": {**reb, "runs": reb_runs},
        "written": written,
        "maintain": maintain_run,
        "ratio_incremental_to_rebuild": round(inc["median_s"] / reb["median_s"], 4),
        "speedup_rebuild_over_incremental": round(reb["median_s"] / inc["median_s"], 2),
        "tables_equal": bool(equal),
        "tables_difference": diff,
        "compared_versions": {"incremental": inc_version, "rebuild": reb_version},
        "table_sizes_mb": {t: _du(cfg.table_path(t)) for t in ("events", "events_rejected", "user_sequences")},
        "config": cfg_used(cfg),
        "started": started,
        "finished": now(),
    }
    stop_spark()
    return out


def _restore_state(cfg, seq_path: Path, version: int, applied: dt.date) -> None:
    """user_sequences back to `version` (Spark's RESTORE, a new commit: delta-rs must not restore a table with
    deletion vectors). The commit is tagged as the state after drop `applied`, so `drops.last_drop`
    reports it (with no rerun base: step is not "sequences")."""
    from userformer.jobs.core.spark import spark_session
    from userformer.jobs.core.storage import delta

    spark = spark_session(cfg)
    meta = {"step": "sequences-restore", "dt": str(applied), "restored_version": str(version), "by": "tests.benchmarks"}
    with delta.spark_commit(spark, seq_path, meta):
        delta.spark_restore(spark, seq_path, version)


def _first_difference(a, b) -> dict:
    if a.num_rows != b.num_rows:
        return {"rows": [a.num_rows, b.num_rows]}
    for name in a.column_names:
        if name not in b.column_names:
            return {"column_missing": name}
        x, y = a[name].to_pylist(), b[name].to_pylist()
        for i, (u, v) in enumerate(zip(x, y)):
            if u != v:
                return {
                    "column": name,
                    "row": i,
                    "user_id": a["user_id"][i].as_py(),
                    "incremental": str(u)[:300],
                    "rebuild": str(v)[:300],
                }
    return {"note": "schemas differ", "incremental": str(a.schema), "rebuild": str(b.schema)}


# --------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.pipeline", description="one scenario, in this process")
    p.add_argument("scenario", choices=["throughput", "incremental"])
    p.add_argument("--home", type=Path, required=True, help="an empty folder to use as USERFORMER_HOME")
    p.add_argument("--result", type=Path, required=True, help="where to write the JSON result")
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--active-frac", type=float, default=0.05)
    p.add_argument("--events-per-user", type=float, default=20.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--step-budget-s", type=float, default=None)
    p.add_argument("--driver-memory", required=True)
    p.add_argument("--shuffle-partitions", type=int, required=True)
    a = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    if a.scenario == "throughput":
        res = throughput(
            a.home,
            a.events,
            a.repeats,
            driver_memory=a.driver_memory,
            shuffle_partitions=a.shuffle_partitions,
            step_budget_s=a.step_budget_s,
        )
    else:
        res = incremental(
            a.home,
            a.users,
            a.days,
            a.repeats,
            active_frac=a.active_frac,
            per_user=a.events_per_user,
            driver_memory=a.driver_memory,
            shuffle_partitions=a.shuffle_partitions,
        )
    a.result.write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
