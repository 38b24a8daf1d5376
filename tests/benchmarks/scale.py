"""Scale: what a day costs against a full rebuild, and each step's peak memory, as users grow.

    python -m tests.benchmarks.scale [--users 100k,1m] [--days 30] [--active-frac 0.05]
                                     [--master local|cluster] [--infer-engine local|spark]
                                     [--driver-memory 6g] [--out DIR]

Each size runs in a child process of its own (a fresh USERFORMER_HOME under /tmp, deleted afterwards), so
that its Spark driver starts with the memory given and gives it all back. For one size:

  history (setup, timed per step too)
    generate `days` drops of `users` users (``--active-frac`` of them active a day, ~20 events each);
    ingest the first days-1 drops one by one (the daily step with its events gate);
    `sequences --rebuild` up to day days-1 (the table as after a compaction);
    a small model trained as of day days-1 (1 epoch, at most 5,000 users) and published;
    the first full publish of day days-1: `infer --all-users`, `publish`, `index`, `candidates`.
  the measured day D (the last one), each step once, in the daily order:
    ingest, `sequences --dt` (one MERGE), `infer` (the day's users), `publish` (MERGEs), `index`, `candidates`;
  then the full path of the same day:
    `sequences --rebuild` (upto D; its table must equal the MERGEd one), `infer --all-users`, `publish`
    (overwrites), `candidates` (every user).

Per step: wall seconds, events/s where events are its input, and peak resident memory: the high-water mark
of the driver's Python process and of the Spark JVM (reset before the step through /proc/PID/clear_refs),
and the peak of the whole process tree's total RSS (Python workers included; on the standalone cluster its
master, workers and executors too), sampled every 0.2 s. The ratio day / full is reported for sequences,
infer, publish and candidates. Nothing is asserted. Results: DIR/scale.json and DIR/scale.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.benchmarks.pipeline import (
    REPO,
    StageLog,
    git_info,
    load,
    log,
    machine_info,
    make_cfg,
    mem_available_gib,
    now,
    start_spark,
)
from tests.benchmarks.render import write_summary

RESULTS = Path(__file__).resolve().parent / "results"
START = dt.date(2026, 3, 1)
SEED = 31
PAGE = os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------ memory
def _ppid_map() -> dict[int, int]:
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            # The command name may hold spaces or parentheses: the fields after its closing ')' are fixed.
            stat = (p / "stat").read_text()
            out[int(p.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError):
            continue
    return out


def _tree(roots: list[int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in _ppid_map().items():
        children.setdefault(ppid, []).append(pid)
    seen, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        todo.extend(children.get(pid, []))
    return seen


def _status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0


def _is_java(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "java"
    except OSError:
        return False


class Memory:
    """Peak resident memory of the benchmark's process tree during one step (see the module doc)."""

    def __init__(self, extra_roots: list[int] | None = None, every_s: float = 0.2):
        self.extra_roots = extra_roots or []
        self.every_s = every_s
        self._stop = threading.Event()
        self._peak_total = 0
        self._thread: threading.Thread | None = None

    def _pids(self) -> list[int]:
        return _tree([os.getpid(), *self.extra_roots])

    def _jvms(self) -> list[int]:
        return [p for p in self._pids() if _is_java(p)]

    def __enter__(self):
        for pid in [os.getpid(), *self._jvms()]:
            try:  # "5" resets the process's VmHWM to its current RSS (Linux >= 4.0)
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                pass
        self._peak_total = sum(_rss_bytes(p) for p in self._pids())
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self._peak_total = max(self._peak_total, sum(_rss_bytes(p) for p in self._pids()))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._peak_total = max(self._peak_total, sum(_rss_bytes(p) for p in self._pids()))
        gib = 2**30
        jvm_hwm = [_status_kib(p, "VmHWM") or 0 for p in self._jvms()]
        # The driver's JVM (the one the local session runs in) is the largest; executors are in the tree total.
        self.result = {
            "driver_python_peak_gib": round((_status_kib(os.getpid(), "VmHWM") or 0) * 1024 / gib, 3),
            "jvm_peak_gib": round(max(jvm_hwm, default=0) * 1024 / gib, 3),
            "jvms": len(jvm_hwm),
            "tree_peak_gib": round(self._peak_total / gib, 3),
        }
        return False


# --------------------------------------------------------------- one size
class Steps:
    """Runs and records the steps of one size: seconds, input events, memory, Spark stages."""

    def __init__(self, home: Path, roots: list[int]):
        self.roots = roots
        self.stages = StageLog(home / "spark-events")
        self.records: list[dict] = []

    def run(self, name: str, fn, *, phase: str, events: int | None = None, **info) -> dict:
        self.stages.read()
        la = load()
        with Memory(self.roots) as mem:
            t0 = time.perf_counter()
            res = fn()
            s = time.perf_counter() - t0
        rec = {
            "step": name,
            "phase": phase,
            "seconds": round(s, 3),
            "events": events,
            "events_per_s": round(events / s) if events else None,
            "memory": mem.result,
            "load_before": la,
            "spark": self.stages.read(top=3),
            **info,
        }
        self.records.append(rec)
        log(
            f"  {phase:8s} {name:28s} {s:8.1f}s  driver {mem.result['driver_python_peak_gib']:.2f} GiB  "
            f"jvm {mem.result['jvm_peak_gib']:.2f} GiB  tree {mem.result['tree_peak_gib']:.2f} GiB"
        )
        rec["result"] = res
        return res


def _start_cluster(home: Path) -> tuple[str, list[int]]:
    """The local standalone cluster (infra/spark/start-cluster.sh), state inside the home; (master URL, daemon PIDs)."""
    env = {**os.environ, "USERFORMER_SPARK_RUN_DIR": str(home / "run" / "spark"), "VENV": str(Path(sys.prefix))}
    r = subprocess.run(
        ["bash", str(REPO / "infra/spark/start-cluster.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    if r.returncode != 0:
        raise SystemExit(f"start-cluster.sh failed:\n{r.stderr[-3000:]}")
    pids = [int(p.read_text().split()[0]) for p in (home / "run/spark/pids").glob("*.pid")]
    return r.stdout.strip().splitlines()[-1], pids


def _stop_cluster(home: Path) -> None:
    env = {**os.environ, "USERFORMER_SPARK_RUN_DIR": str(home / "run" / "spark"), "VENV": str(Path(sys.prefix))}
    subprocess.run(["bash", str(REPO / "infra/spark/stop-cluster.sh")], env=env, capture_output=True, timeout=300)


def _same_table(cfg, version_a: int, version_b: int) -> dict:
    """Do two versions of user_sequences hold the same rows? Spark's exceptAll both ways (bounded memory)."""
    from userformer.jobs.core.spark import spark_session

    spark = spark_session(cfg)
    path = str(cfg.table_path("user_sequences"))
    from pyspark.sql import functions as F

    def at(v):  # set operations refuse map columns: a map compares as its sorted entries
        df = spark.read.format("delta").option("versionAsOf", v).load(path)
        maps = [f.name for f in df.schema.fields if f.dataType.typeName() == "map"]
        return df.select(*[F.array_sort(F.map_entries(c)).alias(c) if c in maps else c for c in df.columns])

    a, b = at(version_a), at(version_b)
    only_a, only_b = a.exceptAll(b).count(), b.exceptAll(a).count()
    return {"rows": a.count(), "only_incremental": only_a, "only_rebuild": only_b, "equal": only_a == only_b == 0}


def one_size(
    home: Path,
    users: int,
    days: int,
    *,
    active_frac: float,
    per_user: float,
    driver_memory: str,
    shuffle_partitions: int,
    master: str,
    infer_engine: str,
) -> dict:
    from userformer.jobs.core.spark import stop_spark
    from userformer.jobs.flows import pipeline
    from userformer.jobs.steps import sequences as sequences_step
    from userformer.jobs.steps import train as train_step
    from userformer.jobs.tools.generate import generate

    started = now()
    roots: list[int] = []
    master_url = "local[2]"
    if master == "cluster":
        master_url, roots = _start_cluster(home)
    try:
        cfg = make_cfg(home, driver_memory=driver_memory, shuffle_partitions=shuffle_partitions)
        cfg.spark.master = master_url
        cfg.infer.engine = infer_engine
        cfg.infer.device = "cpu"
        cfg.train.device = "cpu"
        items = max(10_000, users // 20)
        dates = [START + dt.timedelta(days=i) for i in range(days)]
        prev, day = dates[-2], dates[-1]
        log(f"scale {users:,} users, {items:,} items, {days} days, {active_frac:.0%} active, master {master_url}")
        t0 = time.perf_counter()
        gen = generate(
            cfg,
            users=users,
            items=items,
            days=days,
            start=START,
            seed=SEED,
            active_frac=active_frac,
            events_per_active_user=per_user,
        )
        gen_s = time.perf_counter() - t0
        log(f"  generated {gen['events_total']:,} raw events in {gen_s:.0f}s")
        spark_start_s = start_spark(cfg)
        steps = Steps(home, roots)

        # ---- history: the days before D
        accepted = {}
        for d in dates[:-1]:
            ing = steps.run("ingest", lambda d=d: pipeline.ingest(cfg, d), phase="history", events=_raw(cfg, d))
            accepted[d] = ing["accepted"]
        hist_events = sum(accepted.values())
        steps.run("sequences --rebuild", lambda: sequences_step.rebuild(cfg, prev), phase="history", events=hist_events)
        stop_spark()  # training runs without Spark's JVM beside it, as its own Airflow task does
        tr = steps.run(
            "train (1 epoch, 5,000 users)",
            lambda: train_step.train(cfg, day=prev, epochs=1, max_users=5000, publish=True, progress=False, log=log),
            phase="history",
        )
        start_spark(cfg)
        steps.run("infer --all-users", lambda: pipeline.infer(cfg, prev, full=True), phase="history")
        steps.run("publish (first)", lambda: pipeline.publish(cfg, prev), phase="history")
        steps.run("index", lambda: pipeline.index(cfg, prev), phase="history")
        steps.run("candidates (first)", lambda: pipeline.candidates(cfg, prev), phase="history")

        # ---- the day D: the daily path
        day_raw = _raw(cfg, day)
        ing = steps.run("ingest", lambda: pipeline.ingest(cfg, day), phase="day", events=day_raw)
        seq = steps.run("sequences", lambda: pipeline.sequences(cfg, day), phase="day", events=ing["accepted"])
        inf = steps.run("infer", lambda: pipeline.infer(cfg, day), phase="day")
        steps.run("publish", lambda: pipeline.publish(cfg, day), phase="day")
        steps.run("index", lambda: pipeline.index(cfg, day), phase="day")
        steps.run("candidates", lambda: pipeline.candidates(cfg, day), phase="day")

        # ---- the same day, the full path
        total_accepted = hist_events + ing["accepted"]
        reb = steps.run(
            "sequences --rebuild", lambda: sequences_step.rebuild(cfg, day), phase="full", events=total_accepted
        )
        full = steps.run("infer --all-users", lambda: pipeline.infer(cfg, day, full=True), phase="full")
        steps.run("publish", lambda: pipeline.publish(cfg, day), phase="full")
        steps.run("candidates", lambda: pipeline.candidates(cfg, day), phase="full")
        same = _same_table(cfg, seq["version"], reb["version"])
        log(f"  user_sequences MERGEd = rebuilt: {same}")
        stop_spark()

        def sec(phase, step):
            return next(r["seconds"] for r in steps.records if r["phase"] == phase and r["step"] == step)

        ratio = {
            "sequences": sec("day", "sequences") / sec("full", "sequences --rebuild"),
            "infer": sec("day", "infer") / sec("full", "infer --all-users"),
            "publish": sec("day", "publish") / sec("full", "publish"),
            "candidates": sec("day", "candidates") / sec("full", "candidates"),
        }
        day_users, all_users = inf["users"], full["users"]
        return {
            "users": users,
            "items": items,
            "days": days,
            "active_frac": active_frac,
            "events_per_active_user": per_user,
            "master": master_url,
            "infer_engine": infer_engine,
            "driver_memory": driver_memory,
            "shuffle_partitions": shuffle_partitions,
            "generate": {"seconds": round(gen_s, 1), "events_total": gen["events_total"]},
            "spark_start_s": spark_start_s,
            "model": tr["version"],
            "events_accepted_history": hist_events,
            "day": {"dt": str(day), "raw_events": day_raw, "accepted": ing["accepted"], "users": day_users},
            "users_in_table": all_users,
            "day_share_of_users": round(day_users / all_users, 4),
            "sequences_equal": same,
            "steps": [_strip(r) for r in steps.records],
            "ratio_day_to_full": {k: round(v, 4) for k, v in ratio.items()},
            "ingest_plus_sequences_events_per_s": round(day_raw / (sec("day", "ingest") + sec("day", "sequences"))),
            "started": started,
            "finished": now(),
        }
    finally:
        if master == "cluster":
            _stop_cluster(home)


def _raw(cfg, d: dt.date) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in sorted(cfg.raw_events_dir(d).glob("*.parquet")))


def _strip(rec: dict) -> dict:
    """A step's record with the result cut to its small scalar fields."""
    res = rec.pop("result", None)
    small = {}
    if isinstance(res, dict):
        small = {k: v for k, v in res.items() if isinstance(v, int | float | str | bool) and len(str(v)) < 200}
    return {**rec, "result": small}


# ------------------------------------------------------------------- main
def parse_users(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower().replace("_", "")
        mult = {"k": 1_000, "m": 1_000_000}.get(part[-1:], 1)
        out.append(int(float(part.rstrip("km")) * mult))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--users", default="100k,1m", help="sizes, e.g. 100k,1m (default)")
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--active-frac", type=float, default=0.05)
    p.add_argument("--events-per-user", type=float, default=20.0)
    p.add_argument("--master", choices=["local", "cluster"], default="local")
    p.add_argument("--infer-engine", choices=["local", "spark"], default="local")
    p.add_argument("--driver-memory", default="6g")
    p.add_argument("--shuffle-partitions", type=int, default=16)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="scale", help="results file stem (default scale)")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one size, in this process
    p.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    kw = dict(
        active_frac=a.active_frac,
        per_user=a.events_per_user,
        driver_memory=a.driver_memory,
        shuffle_partitions=a.shuffle_partitions,
        master=a.master,
        infer_engine=a.infer_engine,
    )
    if a.child:
        import logging

        logging.basicConfig(level=logging.WARNING)
        a.result.write_text(json.dumps(one_size(a.home, a.child, a.days, **kw), indent=2, default=str))
        return 0
    doc = {
        "benchmark": "scale",
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if v is not None},
        "machine": machine_info(),
        "git": git_info(),
        "started": now(),
        "load_at_start": load(),
        "mem_available_gib_at_start": mem_available_gib(),
        "command": " ".join(["python -m tests.benchmarks.scale", *sys.argv[1:]]),
        "sizes": [],
        "stopped": None,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"{a.name}.json"
    for n in parse_users(a.users):
        home = Path(tempfile.mkdtemp(prefix="userformer-bench-scale-", dir="/tmp"))
        result = home / "result.json"
        cmd = [sys.executable, "-m", "tests.benchmarks.scale", "--child", str(n), "--home", str(home / "home")]
        cmd += ["--result", str(result), "--days", str(a.days), "--active-frac", str(a.active_frac)]
        cmd += ["--events-per-user", str(a.events_per_user), "--master", a.master, "--infer-engine", a.infer_engine]
        cmd += ["--driver-memory", a.driver_memory, "--shuffle-partitions", str(a.shuffle_partitions)]
        log(f"$ {' '.join(cmd)}")
        try:
            r = subprocess.run(cmd, cwd=REPO)
            if r.returncode != 0:
                doc["stopped"] = f"{n:,} users: the run failed (exit code {r.returncode}); larger sizes not run"
                log(doc["stopped"])
                break
            doc["sizes"].append(json.loads(result.read_text()))
        finally:
            shutil.rmtree(home, ignore_errors=True)
        doc["finished"] = now()
        path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    doc["finished"] = now()
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(write_summary(path, json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
