"""Write, audit, publish: the events and user_sequences gates judge a writer's staged rows before its commit, so a
failed gate leaves every table at the version it had and a reader never sees the rows it refused. The same holds
for the two other writers of user_sequences: `sequences --rebuild` and a repair's recompute.

The pipeline's steps are called as `run-day` and the Airflow tasks call them (jobs/flows/pipeline.py), so the
day's ledger is checked too: the gate's result is its entry ``check_<table>``, passed or failed."""

from __future__ import annotations

import json

import pyarrow.compute as pc
import pytest

from userformer.jobs.core import ledger
from userformer.jobs.core.config import load_config
from userformer.jobs.core.errors import GateFailed
from userformer.jobs.core.storage import delta
from userformer.jobs.flows import pipeline, repair
from userformer.jobs.steps import ingest, sequences

from .rawdata import D1, D2, events_table, open_gate, three_days, ts, write_drop

pytestmark = pytest.mark.spark

INGESTED = ("events", "events_rejected", "vocab", "items")


def versions(cfg, names) -> dict:
    return {n: delta.version_of(cfg.table_path(n)) for n in names}


@pytest.fixture
def opened(home, monkeypatch, spark):
    """Hand-made drops D1..D3 with the gate opened for them (rawdata.OPEN_GATE)."""
    open_gate(monkeypatch)
    cfg = load_config()
    three_days(cfg.raw_root)
    return cfg


def test_a_failed_events_gate_commits_nothing(opened, monkeypatch):
    cfg = opened
    pipeline.ingest(cfg, D1)
    assert ledger.read_ledger(cfg, D1)["check_events"]["result"]["success"] is True
    before = versions(cfg, INGESTED)

    # Drop D2 as delivered: most of its rows have an event type the contract does not know, and its good rows
    # bring an item the catalogue has never seen (so vocab and items would change with it).
    bad = [(f"b{i}", f"u{i}", ts(D2, 1, i), "clck", "i1") for i in range(10)]
    good = [("g1", "u1", ts(D2, 2), "view", "i7"), ("g2", "u2", ts(D2, 3), "view", "i1")]
    write_drop(cfg.raw_root, D2, events_table(bad + good))
    monkeypatch.setenv("USERFORMER__QUALITY__MAX_REJECTED_RATIO", "0.05")
    strict = load_config()
    with pytest.raises(GateFailed, match=rf"events check failed for {D2}: expect_column_values_to_be_between"):
        pipeline.ingest(strict, D2)

    assert versions(cfg, INGESTED) == before  # not one commit: the tables are as they were
    events = delta.read_arrow(cfg.table_path("events"))
    assert D2 not in set(events["dt"].to_pylist())
    assert "i7" not in set(delta.read_arrow(cfg.table_path("vocab"))["key"].to_pylist())
    entry = ledger.read_ledger(cfg, D2)
    assert set(entry) == {"check_events"}  # the failed gate is kept, the ingest is not
    assert entry["check_events"]["result"]["success"] is False
    report = json.loads((cfg.reports_root / "checks" / "events" / f"dt={D2}.json").read_text())
    failed = {r["column"]: r for r in report["results"] if not r["success"]}
    assert set(failed) == {"rejected_ratio"}
    assert report["facts"]["rows"] == 2 and report["facts"]["rejected_by_reason"]["unknown_event_type"] == 10

    # The producer re-delivers a clean D2: it passes and lands, judged as what the commit wrote.
    write_drop(cfg.raw_root, D2, events_table(good))
    res = pipeline.ingest(strict, D2)
    assert res["accepted"] == 2 and res["check"]["success"] is True
    assert ledger.read_ledger(cfg, D2)["check_events"]["result"]["success"] is True
    events = delta.read_arrow(cfg.table_path("events"))
    assert pc.sum(pc.equal(events["dt"], D2)).as_py() == 2


def test_a_failed_user_sequences_gate_commits_nothing(opened, spark):
    cfg = opened
    ingest.ingest(cfg, D1)
    ingest.ingest(cfg, D2)
    pipeline.sequences(cfg, D1)
    entry = ledger.read_ledger(cfg, D1)["check_user_sequences"]["result"]
    assert entry["success"] is True

    # Corruption from outside the pipeline: a second row of user u1.
    path = cfg.table_path("user_sequences")
    uri = delta.spark_uri(path)
    spark.read.format("delta").load(uri).where("user_id = 'u1'").write.format("delta").mode("append").save(uri)
    corrupted = delta.version_of(path)

    with pytest.raises(GateFailed, match=rf"user_sequences check failed for {D2}: expect_column_values_to_be_unique"):
        pipeline.sequences(cfg, D2)
    assert delta.version_of(path) == corrupted  # D2's merge did not commit
    assert D2 not in set(delta.read_arrow(path)["updated_dt"].to_pylist())
    report = json.loads((cfg.reports_root / "checks" / "user_sequences" / f"dt={D2}.json").read_text())
    # It judged the rows D2 gives its users (u1, u2, u4 accepted on D2) in place of their stored rows: u1's two
    # stored rows each merged with D2's events, as the MERGE would have written them.
    active = {r["user_id"] for r in delta.read_arrow(cfg.table_path("events")).to_pylist() if r["dt"] == D2}
    assert len(active) == 3 and report["facts"]["rows_updated"] == 4
    unique = [r for r in report["results"] if r["expectation"] == "expect_column_values_to_be_unique"]
    assert [set(r["examples"]) for r in unique] == [{"u1"}]
    assert ledger.read_ledger(cfg, D2)["check_user_sequences"]["result"]["success"] is False


def _rows_with_a_defect(monkeypatch):
    """A defect in how rows are computed (here: seq_len off by max_len), the kind of error a gate is there to
    stop, put into the one function the rebuild and the repair's recompute build rows with."""
    from pyspark.sql import functions as F

    finish = sequences._finish
    monkeypatch.setattr(sequences, "_finish", lambda df, n: finish(df, n).withColumn("seq_len", F.col("seq_len") + n))
    return lambda: monkeypatch.setattr(sequences, "_finish", finish)


def _staging_left(cfg) -> list:
    root = cfg.warehouse_root / "_staging"
    return sorted(str(p) for p in root.glob("*/*")) if root.is_dir() else []


def _two_days(cfg):
    """D1 and D2 ingested and applied to user_sequences; that table's path."""
    for day in (D1, D2):
        ingest.ingest(cfg, day)
        sequences.update(cfg, day)
    return cfg.table_path("user_sequences")


def test_a_rebuild_that_fails_the_gate_replaces_nothing(opened, monkeypatch):
    cfg = opened
    path = _two_days(cfg)
    before, rows = delta.version_of(path), delta.read_arrow(path).sort_by("user_id")

    fixed = _rows_with_a_defect(monkeypatch)
    with pytest.raises(GateFailed, match=rf"user_sequences check failed for {D2}: expect_column_values_to_be_between"):
        sequences.rebuild(cfg)
    assert delta.version_of(path) == before and delta.read_arrow(path).sort_by("user_id").equals(rows)
    assert _staging_left(cfg) == []  # the staged Parquet went with the failed run

    fixed()
    res = sequences.rebuild(cfg)
    assert res["check"]["success"] is True and res["version"] == before + 1
    assert delta.read_arrow(path).sort_by("user_id").equals(rows)  # a rebuild of the same drops: the same rows
    assert _staging_left(cfg) == []


def test_a_recompute_that_fails_the_gate_commits_nothing(opened, monkeypatch):
    cfg = opened
    path = _two_days(cfg)
    before = delta.version_of(path)

    fixed = _rows_with_a_defect(monkeypatch)
    with pytest.raises(GateFailed, match=rf"user_sequences check failed for {D2}"):
        repair.recompute_sequences(cfg, ["u1", "u2"], D2, "test-repair")
    assert delta.version_of(path) == before
    assert _staging_left(cfg) == []

    fixed()
    res = repair.recompute_sequences(cfg, ["u1", "u2"], D2, "test-repair")
    assert res["committed"] and res["check"]["success"] is True and res["version"] == before + 1
