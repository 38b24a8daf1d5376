"""`daily_refresh` through Airflow 3 on generated data, against the same days run without Airflow.

Home A runs 3 generated days (300 users, 400 items, a small model) with `pipeline.run_day` in this process, once
for the module (what `userformer run-day` does). Then:

- **end to end**: home B runs the three dates one after another with ``airflow dags test daily_refresh D`` (every
  task of the DAG, in date order, on a throwaway SQLite metadata DB); the tables' contents are checked (events per
  day, user_sequences, user_embeddings = every user, item_embeddings = the catalogue, the index CURRENT, the
  ledger) and must equal A's.
- **repair**: then, in home B, ``airflow dags test repair`` with conf from_dt = day 2, to_dt = day 3, mode =
  restore: the tables must equal A's again (model versions compared without their allocation number); a bad
  mode is refused before any task runs.
- **backfill beside the schedule**: home C starts a Spark Connect server (jobs/tools/connect.py) and Airflow
  standalone on 127.0.0.1 (jobs/tools/orchestrator.py), both started and stopped by PID here, its scheduler
  creating runs; every Spark task is a client of that one server, as in `make demo`. The three dates end
  yesterday, so unpausing `daily_refresh` starts the scheduled run of the last one, which waits for its drop
  (its ready marker is held back). While it is active, one backfill of the two older dates is created through
  ``POST /api/v2/backfills``, and the last drop is then marked ready. The scheduled run must wait for the
  backfill's days (date order), every run must succeed, and after Airflow is stopped the tables must equal A's.

Equal means: events, events_rejected (without source_file, a path into the home), vocab, items and
user_sequences row for row; user_embeddings, user_preference_scores, item_embeddings and user_candidates with a
float tolerance and without the run-specific columns (updated_at, index_version); the model registry's versions
(ids are allocated sequentially per home, so they are equal), their statuses and the published pointer. Training
runs on one thread with the same seed in every home.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tests.conftest import REPO
from tests.integration import warehouses
from userformer.jobs.core import ledger
from userformer.jobs.core import registry as model_registry
from userformer.jobs.core.config import load_config
from userformer.jobs.core.storage import delta
from userformer.jobs.flows import pipeline
from userformer.jobs.tools import generate

pytestmark = [pytest.mark.spark, pytest.mark.slow]

# Ending yesterday (UTC): the scheduler's own run of daily_refresh (no catchup) is the run of the last day.
START = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=3)
DAYS = [START + dt.timedelta(days=i) for i in range(3)]
BIN = Path(sys.executable).parent
# Small and fast, passed to Airflow's task processes through the environment as well.
SETTINGS = {
    "PIPELINE__BOOTSTRAP_EPOCHS": "3",
    "TRAIN__NUM_THREADS": "1",
    "MODEL__D_MODEL": "16",
    "MODEL__MAX_LEN": "20",
    "MODEL__TIME_BUCKETS": "8",
    "TRAIN__BATCH_SIZE": "64",
    "TRAIN__UNIFORM_NEGATIVES": "64",
    "TRAIN__STREAM_CHUNK_USERS": "64",
    "TRAIN__PATIENCE": "2",
    "FINETUNE__EPOCHS": "1",
    # Sensors wait here (the last drop, the previous day): a poke every 20 s, well above a task's start-up time.
    # With pokes due sooner, Airflow 3.3 can mark a reschedule-mode sensor failed when it requeues the next poke
    # before it has processed the end of the previous one (apache/airflow#71172).
    "PIPELINE__SENSOR_POKE_S": "20",
    "PIPELINE__RETRY_DELAY_S": "5",
    # Each Spark task starts a JVM: start it fast (infra/config/demo.toml says why).
    "SPARK__EXTRA": '{"spark.driver.extraJavaOptions" = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"}',
}


def env_of(home: Path) -> dict:
    """USERFORMER_* of a home: no config file, SETTINGS as USERFORMER__ variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("USERFORMER")}
    return {**env, "USERFORMER_HOME": str(home), **{f"USERFORMER__{k}": v for k, v in SETTINGS.items()}}


def config(home: Path):
    return load_config(env=env_of(home))


def new_home(root: Path):
    cfg = config(root / "home")
    generate.generate(cfg, users=300, items=400, days=len(DAYS), start=START, seed=5)
    return cfg


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, spark):
    """Home A: the days one by one, without Airflow."""
    cfg = new_home(tmp_path_factory.mktemp("sequential"))
    for d in DAYS:
        pipeline.run_day(cfg, d)
    return cfg


# ---------------------------------------------------------------- compare
def registry(cfg):
    return [(m["version"], m["kind"], m["status"], m.get("dt")) for m in model_registry.list_versions(cfg)]


def assert_same_as(a, b, rerun_of: str | None = None, repaired: bool = False):
    """Every table, the model registry and the published pointers of B equal A's (module doc).

    `rerun_of` = D: B ran drop D a second time; its fine-tune may have registered one more candidate of D (the
    rerun's tables have new Delta versions, so it is not the same training data), which must then be rejected.
    `repaired`: B was restored and re-ran days; their models were trained again into new version numbers, so
    model versions are compared without the number and the registry only through what is published."""
    warehouses.assert_same_tables(a, b, renumbered=repaired)
    from userformer.jobs.steps import index as index_step

    if repaired:
        assert warehouses.model_id(model_registry.published(b)["version"]) == warehouses.model_id(
            model_registry.published(a)["version"]
        )
        assert warehouses.model_id(index_step.current(b)["model_version"]) == warehouses.model_id(
            index_step.current(a)["model_version"]
        )
        return
    ra, rb = registry(a), registry(b)
    if rerun_of is None:
        assert rb == ra
    else:
        assert rb[: len(ra)] == ra, (ra, rb)
        assert all(v[1] == "finetune" and v[2] == "rejected" and v[3] == rerun_of for v in rb[len(ra) :]), rb
    assert model_registry.published(b)["version"] == model_registry.published(a)["version"]
    assert index_step.current(b)["model_version"] == index_step.current(a)["model_version"]


def assert_contents(cfg):
    """What three days of daily_refresh leave behind, read from the tables and the ledgers."""
    from userformer.jobs.steps import index as index_step

    events = delta.read_arrow(cfg.table_path("events"))
    per_day = {str(d): n for d, n in zip(*np.unique(np.array(events["dt"].cast(pa.string())), return_counts=True))}
    for d in DAYS:
        led = ledger.read_ledger(cfg, d)
        missing = [s for s in ledger.ENTRIES if s != "infer" and s not in led]
        assert not missing, f"{d}: steps missing from the ledger: {missing}"
        assert per_day[str(d)] == led["ingest"]["result"]["accepted"] > 0
        for c in ("check_events", "check_user_sequences"):
            assert led[c]["result"]["success"] is True
    seqs = delta.read_arrow(cfg.table_path("user_sequences"))
    users = set(events["user_id"].to_pylist())
    assert set(seqs["user_id"].to_pylist()) == users
    assert sum(seqs["lifetime_events"].to_pylist()) == events.num_rows
    ptr = model_registry.published(cfg)
    assert ptr is not None  # day 2 trained the first model (day 1 has no history before its validation window)
    emb = delta.read_arrow(cfg.table_path("user_embeddings"))
    assert emb.num_rows == len(users) and set(emb["user_id"].cast(pa.string()).to_pylist()) == users
    assert set(emb["model_version"].cast(pa.string()).to_pylist()) == {ptr["version"]}
    items = delta.read_arrow(cfg.table_path("items"))
    item_emb = delta.read_arrow(cfg.table_path("item_embeddings"))
    assert item_emb.num_rows == items.num_rows
    cur = index_step.current(cfg)
    assert cur is not None and cur["model_version"] == ptr["version"]
    last = ledger.read_ledger(cfg, DAYS[-1])
    assert last["check_index"]["result"]["recall_at_10"] >= cfg.index.min_recall_at_10
    assert last["check_outputs"]["result"]["success"] is True


def _wait_for(get, timeout: float, poll: float = 2.0):
    """`get()` once it returns something truthy; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (got := get()):
        assert time.monotonic() < deadline, f"nothing after {timeout:.0f}s"
        time.sleep(poll)
    return got


# ------------------------------------------------------------------ tests
@pytest.mark.timeout(2400)  # three DAG runs and a repair run, each task its own process (and JVM)
def test_daily_refresh_end_to_end_three_days(sequential, tmp_path):
    """`airflow dags test` for three consecutive dates: every task of the DAG, in date order."""
    cfg = new_home(tmp_path)
    env = {
        **env_of(cfg.home),
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": sys.executable,
    }
    r = subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for d in DAYS:
        r = subprocess.run(
            [str(BIN / "airflow"), "dags", "test", "daily_refresh", str(d)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        out = r.stdout + r.stderr
        assert r.returncode == 0 and "state=success" in out and "state=failed" not in out, out[-6000:]
        assert f"DagRun Finished: dag_id=daily_refresh, logical_date={d} 00:00:00+00:00" in out
    assert_contents(cfg)
    assert_same_as(sequential, cfg)

    # The repair DAG (manual, params as conf): restore to before day 2 and redo days 2-3. Nothing was bad here,
    # so the repaired warehouse must equal the clean one again.
    conf = {"from_dt": str(DAYS[1]), "to_dt": str(DAYS[2]), "mode": "restore"}
    r = subprocess.run(
        [str(BIN / "airflow"), "dags", "test", "repair", "--conf", json.dumps(conf)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "state=failed" not in out and "DagRun Finished: dag_id=repair" in out, out[-6000:]
    assert_contents(cfg)
    assert_same_as(sequential, cfg, repaired=True)
    # A bad param is refused before any task runs.
    r = subprocess.run(
        [str(BIN / "airflow"), "dags", "test", "repair", "--conf", json.dumps({**conf, "mode": "rebuild-everything"})],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode != 0 and "rebuild-everything" in r.stdout + r.stderr


def test_a_backfill_beside_the_scheduled_run_goes_in_date_order(sequential, tmp_path):
    """Standalone on 127.0.0.1 with the schedule on: the scheduled run of the last date is active (waiting for its
    drop) when a backfill of the two older dates is created via POST /api/v2/backfills; then the last date is
    backfilled again; stopped by PID."""
    from userformer.jobs.tools import connect, orchestrator

    cfg = new_home(tmp_path)
    server = connect.start(cfg)
    marker = cfg.raw_events_dir(DAYS[-1]) / cfg.pipeline.ready_marker
    held = marker.with_name(marker.name + ".held")
    marker.rename(held)  # the producer has not finished the last drop yet
    saved = {k: os.environ.get(k) for k in env_of(cfg.home) if k.startswith("USERFORMER")}
    os.environ.update({k: v for k, v in env_of(cfg.home).items() if k.startswith("USERFORMER")})
    try:
        af = orchestrator.start(
            cfg, orchestrator.free_port(), scheduled_runs=True, env={"USERFORMER__SPARK__REMOTE": server["url"]}
        )
    except BaseException:
        connect.stop(cfg)
        raise
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        assert af.url.startswith("http://127.0.0.1:") and af.password
        assert af.api("GET", f"/pools/{cfg.pipeline.gpu_pool}")["slots"] == cfg.pipeline.gpu_pool_slots
        af.unpause("daily_refresh")
        scheduled = _wait_for(lambda: [r for r in af.dag_runs("daily_refresh") if r["run_type"] == "scheduled"], 180)
        assert [(r["logical_date"][:10], r["state"]) for r in scheduled] == [(str(DAYS[-1]), "running")]
        b = af.backfill("daily_refresh", DAYS[0], DAYS[-2], reprocess="failed")
        assert b["dag_id"] == "daily_refresh" and b["max_active_runs"] == 1
        held.rename(marker)  # the last drop is complete now: its run may go on once the older days are done
        runs = af.wait_runs("daily_refresh", start=DAYS[0], end=DAYS[-1], timeout=1500)
        states = {r["logical_date"][:10]: (r["run_type"], r["state"]) for r in runs}
        failed = {
            r["dag_run_id"]: af.failed_tasks("daily_refresh", r["dag_run_id"]) for r in runs if r["state"] != "success"
        }
        want = {str(d): ("backfill", "success") for d in DAYS[:-1]} | {str(DAYS[-1]): ("scheduled", "success")}
        assert states == want, (states, failed, orchestrator._tail(af.log_path, 80))
        # In date order: no run wrote before the previous one ended; the scheduled run said what it waited for.
        ordered = sorted(runs, key=lambda r: r["logical_date"])
        for prev, nxt in zip(ordered, ordered[1:]):
            tis = {t["task_id"]: t for t in af.task_instances("daily_refresh", nxt["dag_run_id"])}
            assert tis["ingest"]["start_date"] >= prev["end_date"], (prev, tis["ingest"])
        waited = af.task_log_path("daily_refresh", ordered[-1]["dag_run_id"], "wait_for_previous_day")
        assert waited and any(f"previous run {ordered[-2]['dag_run_id']}" in p.read_text() for p in waited)
        tis = af.task_instances("daily_refresh", ordered[-1]["dag_run_id"])
        assert {t["task_id"] for t in tis} >= {"wait_for_raw", "ingest", "infer", "publish", "report"}
        assert all(t["state"] == "success" for t in tis)
        assert [t["pool"] for t in tis if t["task_id"] == "infer"] == [cfg.pipeline.gpu_pool]
        # Each day's release is an event of the outputs' assets, naming the day it made visible (day 1 has no
        # model yet: its release changed nothing).
        events = af.api("GET", "/assets/events?limit=100")["asset_events"]
        ue = [e["extra"] for e in events if e["uri"] == "userformer://user_embeddings/"]
        assert sorted(x["dt"] for x in ue if x.get("changed")) == [str(d) for d in DAYS[1:]], ue
        # The admin password is in its private file, not in Airflow's log.
        assert af.password not in af.log_path.read_text()
        # The report task links the day's report from its log.
        logs = af.task_log_path("daily_refresh", ordered[-1]["dag_run_id"], "report")
        assert logs and "file://" in logs[-1].read_text()
        # Idempotent: the last date once more (a second backfill, reprocessing completed runs); the tables must
        # still equal those of the days run once each (checked below).
        rerun = af.backfill("daily_refresh", DAYS[-1], DAYS[-1], reprocess="completed", wait_running_s=120)
        assert rerun["reprocess_behavior"] == "completed"
        again = af.wait_runs("daily_refresh", start=DAYS[-1], end=DAYS[-1], timeout=900)
        assert [r["state"] for r in again] == ["success"]
        assert af.task_instances("daily_refresh", again[0]["dag_run_id"])[0]["try_number"] >= 2
    finally:
        pid = af.pid
        af.stop()
        connect.stop(cfg)
    assert af.proc.returncode is not None
    for group in (pid, server["pid"]):
        with pytest.raises(ProcessLookupError):
            os.killpg(group, 0)  # no process of Airflow's group, nor of the Spark server's, is left
    assert_contents(cfg)
    assert_same_as(sequential, cfg, rerun_of=str(DAYS[-1]))
