"""The kill -9 fault matrix: a day killed at a named point, run again, compared with a clean run.

A base home holds two small days run with `pipeline.run_day` (150 users, 200 items, the first model trained on D2;
the settings of tests/integration/warehouses.py) and the raw drop of D3. The reference runs D3 once, cleanly. For
a kill point, a copy of the base runs ``userformer run-day --dt D3`` as a real process, held at the point
(jobs/core/hooks.py) and SIGKILLed there with its Spark JVM, so no ``finally`` or ``except`` of it runs. One point
is not in the Python code: ``ingest.mid_events_write`` kills the process as soon as Spark has begun writing D3's
events files and before their commit (an uncommitted file appears in the table's folder). Then the day runs
again (`pipeline.run_day` in this process) and the outcome is measured:

- ``equal``: every table equals the clean run's (warehouses.assert_same_tables; model versions without their
  allocation numbers), and so do the published model, the index CURRENT's model and the published snapshot's
  day and model;
- ``snapshots_seen`` / ``mixed``: a reader polling the published snapshot all along (SnapshotWatcher, from before
  the kill to the end of the rerun) reads each snapshot it sees; mixed = one whose outputs carry another model
  than the snapshot names, or whose index is of another model or gone;
- ``orphans``: files in a table's folder that no version references, after `maintain` with a window of 0 (its
  floor lowered): the killed writer's leftovers must be gone.

`tests/integration/test_faults.py` runs a few points in the suite; ``python -m tests.benchmarks.fault_matrix``
runs every point and writes the matrix that docs/reliability.md shows.
"""

from __future__ import annotations

import datetime as dt
import shutil
import threading
import time
from pathlib import Path

from tests.integration import procs, warehouses
from userformer.jobs.core import registry, snapshot
from userformer.jobs.core.config import Config, load_config
from userformer.jobs.core.storage import delta
from userformer.jobs.flows import pipeline
from userformer.jobs.steps import index as index_step
from userformer.jobs.tools import generate

START = dt.date(2026, 11, 1)
D1, D2, D3 = (START + dt.timedelta(days=i) for i in range(3))
SPARK_WRITE = "ingest.mid_events_write"

# Every kill point of a day, in the order the day reaches them, with what is half done there.
POINTS = {
    "lease.acquired": "the day's lease taken, nothing read",
    SPARK_WRITE: "Spark writing D's events files, not committed",
    "ingest.before_commit": "raw drop read and checked, nothing committed",
    "ingest.before_events_commit": "vocab, items and events_rejected committed, events not",
    "ingest.after_commit": "every ingest commit landed, the step not finished",
    "sequences.before_merge": "the day's sequences computed, the MERGE not begun",
    "sequences.after_merge": "user_sequences committed, the step not finished",
    "registry.checkpoint_written": "the fine-tuned candidate's checkpoint in its temporary file, not renamed",
    "gate.before_publish": "the candidate judged, the verdict not applied to PUBLISHED",
    "versions.between_log_and_pointer": "a pointer switch logged, the pointer not written",
    "infer.before_manifest": "a shard's embeddings staged, its manifest not written",
    "publish.after_user_embeddings": "user_embeddings committed, user_preference_scores and item_embeddings not",
    "publish.after_user_preference_scores": "both user tables committed, item_embeddings not",
    "publish.before_record": "every output committed, the publish record not written",
    "index.before_rename": "the index version built in _building, not moved into place",
    "index.before_switch": "the index version checked and accepted, CURRENT not switched",
    "candidates.before_commit": "the day's candidates staged, not committed",
    "release.before_flip": "everything of D committed and checked, the snapshot still D-1's",
    "release.before_log": "the snapshot flipped to D, its log line not written",
}


def env(cfg: Config) -> dict:
    """The environment of a `userformer` process on `cfg`'s home: its settings, and the same shuffle partitions as
    this process's Spark (the clean run's): they decide the order of the rows training reads, so the model."""
    return {
        **warehouses.small_env(cfg.home),
        "USERFORMER__SPARK__SHUFFLE_PARTITIONS": str(cfg.spark.shuffle_partitions),
    }


def config(home: Path) -> Config:
    return load_config(env=warehouses.small_env(home))


def base(home: Path) -> Config:
    """Two days run, D3's raw drop ready."""
    cfg = config(home)
    generate.generate(cfg, users=150, items=200, days=3, start=D1, seed=5)
    for day in (D1, D2):
        pipeline.run_day(cfg, day)
    return cfg


def copy(cfg: Config, home: Path) -> Config:
    shutil.copytree(cfg.home, home)
    return config(home)


def reference(base_cfg: Config, home: Path) -> Config:
    """The clean run of D3."""
    cfg = copy(base_cfg, home)
    pipeline.run_day(cfg, D3)
    return cfg


# ------------------------------------------------------------------ reader
def mixed_reason(cfg: Config) -> str | None:
    """Why the published snapshot as a reader opens it now is not one consistent state (None: it is)."""
    rec = snapshot.current(cfg)
    if rec is None:
        return None
    model = rec["model_version"]
    for table in ("user_embeddings", "item_embeddings", "user_candidates"):
        v = rec["tables"].get(table)
        if v is None:
            continue
        t = delta.read_arrow(cfg.table_path(table), v, columns=["model_version"])
        seen = set(t["model_version"].cast("string").to_pylist())
        if seen - {model}:
            return f"{table} v{v} holds models {sorted(seen)}, the snapshot names {model}"
    idx = (rec.get("index") or {}).get("version")
    if idx:
        try:
            man = index_step.read_manifest(cfg, idx)
        except Exception as exc:  # the index the snapshot names is gone or unreadable
            return f"index {idx}: {exc}"
        if man.get("model_version") != model:
            return f"index {idx} is of model {man.get('model_version')}, the snapshot names {model}"
    return None


class SnapshotWatcher(threading.Thread):
    """Reads the published snapshot every `every` seconds until stopped; keeps what it saw."""

    def __init__(self, cfg: Config, every: float = 0.25):
        super().__init__(daemon=True)
        self.cfg, self.every = cfg, every
        self.seen: set[str] = set()
        self.reads = 0
        self.mixed: list[str] = []
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            try:
                rec = snapshot.current(self.cfg)
                why = mixed_reason(self.cfg)
            except Exception as exc:  # a reader that cannot read the snapshot at all counts as mixed
                rec, why = None, f"{type(exc).__name__}: {exc}"
            self.reads += 1
            if rec is not None:
                self.seen.add(rec["dt"])
            if why:
                self.mixed.append(why)
            self._halt.wait(self.every)

    def stop(self) -> SnapshotWatcher:
        self._halt.set()
        self.join(timeout=30)
        return self


# -------------------------------------------------------------------- kill
def _wait_spark_write(cfg: Config, step: procs.Step, timeout: float) -> bool:
    """Until a data file of D3 appears in events/ (Spark is writing, nothing committed yet)."""
    part = cfg.table_path("events") / f"dt={D3}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if part.is_dir() and any(part.glob("*.parquet")):
            return True
        if step.proc.poll() is not None:
            return False
        time.sleep(0.005)
    return False


def kill_at(cfg: Config, point: str, logs: Path, timeout: float = 600) -> dict:
    """Run D3 in a process of `cfg`'s home and SIGKILL it at `point`. {"reached", "seconds"}."""
    pause = logs / "pause"
    t0 = time.perf_counter()
    kw = {} if point == SPARK_WRITE else {"pause_at": point, "pause_dir": pause}
    step = procs.start(cfg.home, logs, "run-day", "--dt", str(D3), name=point, env=env(cfg), **kw)
    try:
        if point == SPARK_WRITE:
            reached = _wait_spark_write(cfg, step, timeout)
        else:
            try:
                procs.wait_paused(pause, point, [step], timeout=timeout)
                reached = True
            except AssertionError:
                reached = False
    finally:
        if step.proc.poll() is None:
            step.kill()
    return {"reached": reached, "exit": step.proc.returncode, "seconds": round(time.perf_counter() - t0, 1)}


def orphans(cfg: Config) -> dict[str, int]:
    """After `maintain` with a zero window: per table, files in its folder that its current version does not
    reference (none expected)."""
    from userformer.jobs.tools import maintain

    cfg.storage.min_retention_days = 0
    maintain.maintain(cfg, retention_days=0)
    out = {}
    for name in delta_tables(cfg):
        path = cfg.table_path(name)
        active = {str((path / f).resolve()) for f in delta.active_files(path)}
        on_disk = {str(p.resolve()) for p in path.rglob("*.parquet") if "_delta_log" not in p.parts}
        if on_disk - active:
            out[name] = len(on_disk - active)
    staging = cfg.warehouse_root / "_staging"
    left = [p for p in staging.glob("*/*") if p.parent.name != "infer"] if staging.is_dir() else []
    if left:
        out["_staging"] = len(left)
    return out


def delta_tables(cfg: Config) -> list[str]:
    from userformer.schemas.tables import TABLES

    return [t for t in TABLES if delta.exists(cfg.table_path(t))]


def same_as(ref: Config, cfg: Config) -> str | None:
    """None when `cfg` equals the clean run `ref` (module doc), else what differs."""
    try:
        warehouses.assert_same_tables(ref, cfg, renumbered=True)
    except AssertionError as exc:
        return str(exc).splitlines()[0]
    mid = warehouses.model_id
    pairs = {
        "published model": (registry.published(ref), registry.published(cfg), "version"),
        "index CURRENT": (index_step.current(ref), index_step.current(cfg), "model_version"),
        "published snapshot": (snapshot.current(ref), snapshot.current(cfg), "model_version"),
    }
    for what, (a, b, key) in pairs.items():
        if (a is None) != (b is None) or (a and mid(a[key]) != mid(b[key])):
            return f"{what}: {a and a.get(key)} in the clean run, {b and b.get(key)} here"
    sa, sb = snapshot.current(ref), snapshot.current(cfg)
    if sa["dt"] != sb["dt"]:
        return f"the published snapshot is of {sb['dt']}, the clean run's of {sa['dt']}"
    return None


def trial(base_cfg: Config, ref: Config, point: str, work: Path) -> dict:
    """One row of the matrix: kill at `point`, rerun the day, compare (module doc)."""
    cfg = copy(base_cfg, work / "home")
    watcher = SnapshotWatcher(cfg)
    watcher.start()
    try:
        killed = kill_at(cfg, point, work / "logs")
        t0 = time.perf_counter()
        error = None
        try:
            pipeline.run_day(cfg, D3)
        except Exception as exc:
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        rerun_s = round(time.perf_counter() - t0, 1)
    finally:
        watcher.stop()
    diff = same_as(ref, cfg) if error is None else None
    return {
        "point": point,
        "what": POINTS[point],
        "reached": killed["reached"],
        "kill_seconds": killed["seconds"],
        "rerun_seconds": rerun_s,
        "rerun_error": error,
        "equal": error is None and diff is None,
        "difference": diff,
        "snapshots_seen": sorted(watcher.seen),
        "snapshot_reads": watcher.reads,
        "mixed": watcher.mixed[:5],
        "orphans": orphans(cfg) if error is None else None,
    }
