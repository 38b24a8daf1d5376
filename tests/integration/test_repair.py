"""`userformer repair` (jobs/flows/repair.py) on real pipeline runs: corrupt a day, detect it, repair, compare with a
clean run.

Home A runs 3 generated days (300 users, 400 items) cleanly with `pipeline.run_day`, once for the module. Each
test builds home B from the same raw files, damages it, repairs it and compares every table with home A's:
events, events_rejected, vocab, items and user_sequences exactly; user_embeddings, user_preference_scores,
item_embeddings and user_candidates with a float tolerance, without the run-specific columns (updated_at: when
the inference ran; index_version) and with model versions compared without their allocation number (a home
that trained a model on the bad data allocates later numbers: v0003-20261102-train there is v0001-20261102-train
in A). Training uses 1 thread and the same seed, so the re-trained models are bit-identical to A's.
"""

from __future__ import annotations

import datetime as dt
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from delta.tables import DeltaTable as SparkDeltaTable

from tests.integration import procs, warehouses
from userformer.jobs.core import ledger, registry, snapshot
from userformer.jobs.core.config import load_config
from userformer.jobs.core.errors import GateFailed, UserError
from userformer.jobs.core.storage import delta
from userformer.jobs.flows import pipeline, repair
from userformer.jobs.tools import generate
from userformer.schemas import tables

pytestmark = [pytest.mark.spark, pytest.mark.slow]

START = dt.date(2026, 11, 1)
D1, D2, D3 = (START + dt.timedelta(days=i) for i in range(3))
SETTINGS = {
    "PIPELINE__BOOTSTRAP_EPOCHS": "3",
    "TRAIN__NUM_THREADS": "1",
    "MODEL__D_MODEL": "16",
    "MODEL__MAX_LEN": "20",
    "MODEL__TIME_BUCKETS": "8",
    "TRAIN__BATCH_SIZE": "64",
    "TRAIN__UNIFORM_NEGATIVES": "64",
    "TRAIN__STREAM_CHUNK_USERS": "64",
}


def config(home):
    return load_config(env={"USERFORMER_HOME": str(home), **{f"USERFORMER__{k}": v for k, v in SETTINGS.items()}})


@pytest.fixture(scope="module")
def clean(tmp_path_factory, spark):
    """Home A: the three days run cleanly."""
    home = tmp_path_factory.mktemp("clean") / "home"
    cfg = config(home)
    generate.generate(cfg, users=300, items=400, days=3, start=START, seed=3)
    for d in (D1, D2, D3):
        pipeline.run_day(cfg, d)
    assert registry.published(cfg) is not None and delta.exists(cfg.table_path("user_candidates"))
    return cfg


def fresh(clean, tmp_path, name="b", copy_all=False):
    """Home B: A's raw files only (or all of A's state, `copy_all`)."""
    home = tmp_path / name
    if copy_all:
        shutil.copytree(clean.home, home)
    else:
        shutil.copytree(clean.raw_root, home / "raw")
    return config(home)


def raw_file(cfg, day):
    return next(cfg.raw_events_dir(day).glob("*.parquet"))


# ---------------------------------------------------------------- compare
def assert_same_tables(a, b, tables=None, users=None):
    """Every table of B equals A's (tests/integration/warehouses.py; model versions without their numbers)."""
    warehouses.assert_same_tables(a, b, tables, renumbered=True, users=users)


def effective_publish_history(cfg):
    """The published model versions (without their numbers) since the last repair's line in publish_log."""
    log = registry.publish_log(cfg)
    last = max((i for i, e in enumerate(log) if e.get("repair")), default=-1)
    return [warehouses.model_id(e["version"]) for e in log[last + 1 :]]


def assert_same_as_clean(a, b):
    assert_same_tables(a, b)
    assert effective_publish_history(b) == effective_publish_history(a)
    assert warehouses.model_id(registry.published(b)["version"]) == warehouses.model_id(
        registry.published(a)["version"]
    )
    from userformer.jobs.steps import index

    assert warehouses.model_id(index.current(b)["model_version"]) == warehouses.model_id(
        index.current(a)["model_version"]
    )
    from userformer.jobs.steps import publish

    ma, mb = publish.published_outputs(a), publish.published_outputs(b)
    assert (mb["dt"], warehouses.model_id(mb["model_version"])) == (ma["dt"], warehouses.model_id(ma["model_version"]))
    sa, sb = snapshot.current(a), snapshot.current(b)  # what readers read: the same day and model
    assert (sb["dt"], warehouses.model_id(sb["model_version"])) == (sa["dt"], warehouses.model_id(sa["model_version"]))
    assert sorted(p.name for p in (b.reports_root / "runs").iterdir()) == sorted(
        p.name for p in (a.reports_root / "runs").iterdir()
    )


# ------------------------------------------------------------------ tests
def test_detected_corruption_commits_nothing_and_the_redelivered_day_gives_the_clean_tables(clean, tmp_path):
    b = fresh(clean, tmp_path)
    good = pq.read_table(raw_file(b, D2))
    # A third of day 2's rows get an event type the contract does not know: the rejected-ratio check fails.
    n = good.num_rows
    bad_types = pc.if_else(pa.array(np.arange(n) % 3 == 0), pa.scalar("clik"), good["event_type"])
    pq.write_table(good.set_column(good.schema.get_field_index("event_type"), "event_type", bad_types), raw_file(b, D2))
    pipeline.run_day(b, D1)
    before = {t: delta.version_of(b.table_path(t)) for t in tables.TABLES}
    with pytest.raises(GateFailed, match="events check failed"):
        pipeline.run_day(b, D2)
    # The gate judged D2 before ingest committed: no table changed, nothing downstream ran.
    assert {t: delta.version_of(b.table_path(t)) for t in tables.TABLES} == before
    assert str(D2) not in {str(d) for d in delta.read_arrow(b.table_path("events"))["dt"].to_pylist()}
    assert registry.published(b) is None
    assert set(ledger.read_ledger(b, D2)) == {"check_events"}
    # Nothing of D2 to undo: a repair's plan restores no table (only D2's ledger of the failed gate would move).
    plan = repair.repair(b, D2, D3, "restore", dry_run=True)["plan"]
    assert {t["action"] for t in plan["tables"].values()} <= {"unchanged", "absent"}, plan["tables"]

    pq.write_table(good, raw_file(b, D2))  # the producer re-delivers the clean drop: the days simply run
    for d in (D2, D3):
        pipeline.run_day(b, d)
    assert ledger.read_ledger(b, D2)["check_events"]["result"]["success"] is True
    assert_same_as_clean(clean, b)


def test_undetected_corruption_restore_twice_gives_the_clean_tables(clean, tmp_path):
    b = fresh(clean, tmp_path)
    good = pq.read_table(raw_file(b, D2))
    # Same rows, same counts, valid ids: day 2's item events point at the wrong items (a shifted join upstream).
    items = good["item_id"].combine_chunks()
    has = pc.is_valid(items).to_numpy(zero_copy_only=False)
    vals = np.array(items.to_pylist(), object)
    vals[has] = np.roll(vals[has], 7)
    pq.write_table(
        good.set_column(good.schema.get_field_index("item_id"), "item_id", pa.array(vals, pa.string())), raw_file(b, D2)
    )
    for d in (D1, D2, D3):
        pipeline.run_day(b, d)  # the checks pass: nothing noticed
    with pytest.raises(AssertionError):
        assert_same_tables(clean, b, ["user_sequences"])
    pq.write_table(good, raw_file(b, D2))

    before = {t: delta.version_of(b.table_path(t)) for t in tables.TABLES}
    plan = repair.repair(b, D2, D3, "restore", dry_run=True)["plan"]
    assert {t: delta.version_of(b.table_path(t)) for t in tables.TABLES} == before  # the dry run changed nothing
    assert plan["model"]["action"] == "unpublish" and plan["index"]["action"] == "unset"
    assert plan["tables"]["user_embeddings"]["action"] == "move_aside"
    assert plan["tables"]["user_sequences"]["to_version"] == 0
    with pytest.raises(UserError, match="before 2026-11-03, the latest drop"):
        repair.repair(b, D2, D2, "restore")
    with pytest.raises(UserError, match="is before --from"):
        repair.repair(b, D3, D2, "restore")

    res = repair.repair(b, D2, D3, "restore")
    assert res["restored"]["model"]["action"] == "unpublish"
    assert_same_as_clean(clean, b)
    # Spark's tables went back through delta-spark (delta-rs's restore would drop their deletion vectors).
    restored = [t for t in tables.SPARK_TABLES if plan["tables"][t]["action"] == "restore"]
    assert {"events", "user_sequences"} <= set(restored)  # the outputs, created on D2, are moved aside
    for t in restored:
        restores = [h for h in delta.history(b.table_path(t)) if h.get("operation") == "RESTORE"]
        assert restores and all("Apache-Spark" in str(h.get("engineInfo")) for h in restores), t
        assert all(h.get("repair_id") == res["id"] for h in restores), t
    # The corrupt run's models stay registered; publish_log says what happened.
    assert [e["version"] for e in registry.publish_log(b)][2] is None
    # Idempotent: the same repair again ends with the same tables.
    res2 = repair.repair(b, D2, D3, "restore")
    assert res2["status"] == "done"
    assert_same_as_clean(clean, b)


def test_recompute_rebuilds_the_damaged_users_and_leaves_the_others(clean, tmp_path, monkeypatch):
    b = fresh(clean, tmp_path, copy_all=True)
    seq = delta.read_arrow(b.table_path("user_sequences"))
    d3 = seq.filter(pc.equal(seq["updated_dt"], pa.scalar(D3, pa.date32())))
    victims = sorted(d3["user_id"].to_pylist())[:5]
    # A bad hand-made fix: their sequences lose their newest 3 events (one MERGE without metadata).
    rows = d3.filter(pc.is_in(d3["user_id"], pa.array(victims))).to_pylist()
    for r in rows:
        for c in tables.SEQUENCE_ARRAYS:
            r[c] = r[c][:-3]
        r["seq_len"] -= 3
    src = pa.Table.from_pylist(rows, schema=tables.USER_SEQUENCES)
    # Through delta-spark: delta-rs cannot write a table with deletion vectors.
    from userformer.jobs.core.spark import spark_session

    spark = spark_session(b)
    sdf = spark.createDataFrame(
        [{**r, "lifetime_counts": dict(r["lifetime_counts"])} for r in src.to_pylist()],
        schema=tables.to_spark(tables.USER_SEQUENCES),
    )
    SparkDeltaTable.forPath(spark, delta.spark_uri(b.table_path("user_sequences"))).alias("t").merge(
        sdf.alias("s"), "t.user_id = s.user_id"
    ).whenMatchedUpdateAll().execute()
    with pytest.raises(AssertionError):
        assert_same_tables(clean, b, ["user_sequences"])
    outputs = {t: delta.version_of(b.table_path(t)) for t in repair.USER_OUTPUTS + ("item_embeddings",)}

    # A failure after the sequences commit (inference dies): the published tables are as they were.
    from userformer.jobs.steps import infer

    def boom(*a, **k):
        raise RuntimeError("worker lost")

    monkeypatch.setattr(infer, "infer", boom)
    with pytest.raises(RuntimeError, match="worker lost"):
        repair.repair(b, D3, D3, "recompute", users=victims)
    assert {t: delta.version_of(b.table_path(t)) for t in outputs} == outputs
    monkeypatch.undo()

    res = repair.repair(b, D3, D3, "recompute", users=victims)
    assert res["status"] == "done" and res["sequences"]["rebuilt"] == 5
    assert res["outputs"]["inferred"] == 5 and res["outputs"]["published"]["users"] == 5
    # Those users equal the clean run; every other row is untouched (updated_at included).
    assert_same_tables(clean, b)
    ua, ub = (delta.read_arrow(c.table_path("user_embeddings")) for c in (clean, b))
    others = lambda t: t.filter(pc.invert(pc.is_in(t["user_id"].cast(pa.string()), pa.array(victims))))  # noqa: E731
    key = [("user_id", "ascending")]
    assert others(ub).cast(others(ua).schema).sort_by(key).equals(others(ua).sort_by(key))
    # Idempotent.
    repair.repair(b, D3, D3, "recompute", users=victims)
    assert_same_tables(clean, b)


def test_a_killed_restore_is_continued_by_running_it_again(clean, tmp_path):
    """SIGKILL after the tables went back to before D2 (no cleanup runs): the same command again finishes it."""
    b = fresh(clean, tmp_path, copy_all=True)
    env = {f"USERFORMER__{k}": v for k, v in SETTINGS.items()}
    pause = tmp_path / "pause"
    args = ("repair", "--from", str(D2), "--to", str(D3), "--mode", "restore")
    step = procs.start(b.home, tmp_path / "logs", *args, pause_at="repair.after_state", pause_dir=pause, env=env)
    try:
        procs.wait_paused(pause, "repair.after_state", [step], timeout=600)
    finally:
        step.kill()
    # Killed with the warehouse before D2: readers are back on the last snapshot released before D2.
    assert snapshot.current(b) is None or snapshot.current(b)["dt"] < str(D2)
    (report,) = (b.reports_root / "repairs").glob("r*.json")
    assert repair.unfinished(b)["id"] == report.stem
    res = repair.repair(b, D2, D3, "restore")  # as on-call would: the same repair again
    assert res["id"] == report.stem and res["status"] == "done" and res.get("resumed_at")
    assert [r["dt"] for r in res["rerun"]] == [str(D2), str(D3)]
    assert_same_as_clean(clean, b)
    assert repair.unfinished(b) is None


def test_restore_beyond_the_retention_window_is_refused(clean, tmp_path):
    from userformer.jobs.tools.maintain import maintain

    b = fresh(clean, tmp_path, copy_all=True)
    b.storage.min_retention_days = 0  # allowed only by lowering the floor, as an operator would
    maintain(b, retention_days=0)  # every file no current version references is gone
    with pytest.raises(UserError, match="beyond the retention window"):
        repair.repair(b, D2, D3, "restore", dry_run=True)
    with pytest.raises(UserError, match="--users applies to --mode recompute"):
        repair.repair(b, D2, D3, "restore", users=["u1"])
