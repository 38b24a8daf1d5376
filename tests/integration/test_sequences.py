"""user_sequences: incremental updates (one MERGE a day, deletion vectors) equal a rebuild from events; reruns
replace; order is enforced; a killed update leaves a state the next run completes."""

from __future__ import annotations

import datetime as dt
import logging
import time

import pyarrow as pa
import pytest

from userformer.jobs.core import drops
from userformer.jobs.core.config import load_config
from userformer.jobs.core.errors import UserError
from userformer.jobs.core.storage import delta
from userformer.jobs.steps import ingest, sequences
from userformer.jobs.tools import maintain
from userformer.schemas import tables

from . import procs
from .rawdata import D1, D2, D3, events_table, open_gate, three_days, ts, write_drop

pytestmark = pytest.mark.spark


@pytest.fixture(autouse=True)
def _open_gate(home, monkeypatch):
    """Every test here runs on hand-made drops: the events gate is opened for them (rawdata.OPEN_GATE)."""
    open_gate(monkeypatch)


def table(cfg) -> pa.Table:
    return delta.read_arrow(cfg.table_path("user_sequences")).sort_by("user_id")


def rows(cfg) -> dict:
    return {r["user_id"]: r for r in table(cfg).to_pylist()}


def _plain(t: pa.DataType) -> pa.DataType:
    """A type without its nested field names and nullability (Spark names a list's value "element")."""
    if pa.types.is_list(t):
        return pa.list_(_plain(t.value_type))
    if pa.types.is_map(t):
        return pa.map_(_plain(t.key_type), _plain(t.item_type))
    return t


def same_columns(a: pa.Schema, b: pa.Schema) -> bool:
    """Names and types in order. Not nullability: Spark writes every column nullable (schemas.tables.to_spark)."""
    return [(f.name, _plain(f.type)) for f in a] == [(f.name, _plain(f.type)) for f in b]


def equals_rebuild(cfg) -> bool:
    """The table as it is equals `sequences --rebuild` of the same drops (which replaces it)."""
    incremental = table(cfg)
    sequences.rebuild(cfg)
    return table(cfg).equals(incremental)


@pytest.fixture
def small(home, monkeypatch, spark):
    """max_len 3, so truncation and late events interact on the hand-made drops."""
    monkeypatch.setenv("USERFORMER__SEQUENCES__MAX_LEN", "3")
    cfg = load_config()
    three_days(cfg.raw_root)
    return cfg


def test_incremental_days_merge_late_events_in_time_order(small):
    cfg = small
    results = []
    for d in (D1, D2, D3):
        ingest.ingest(cfg, d)
        results.append(sequences.update(cfg, d))
    assert [(r["active_users"], r["new_users"]) for r in results] == [(3, 3), (3, 1), (2, 0)]
    t = table(cfg)
    assert same_columns(t.schema, tables.USER_SEQUENCES)
    r = rows(cfg)
    # u2: view i2 (D1 03:00), late view i3 (D1 23:00, delivered D2), late cart i3 (D2 22:00, delivered D3),
    # view i2 (D3 02:00).
    # max_len 3 keeps the newest three, oldest first.
    assert r["u2"]["ts"] == [ts(D1, 23), ts(D2, 22), ts(D3, 2)]
    assert r["u2"]["seq_len"] == 3 and r["u2"]["lifetime_events"] == 4
    assert r["u2"]["lifetime_counts"] == [("cart", 1), ("view", 3)]
    assert r["u2"]["first_event_ts"] == ts(D1, 3) and r["u2"]["last_event_ts"] == ts(D3, 2)
    assert r["u2"]["updated_dt"] == D3
    # u3 had only a search on D1: untouched since.
    assert r["u3"]["updated_dt"] == D1 and r["u3"]["item_idx"] == [0]
    for name in tables.SEQUENCE_ARRAYS:
        assert all(len(x[name]) == x["seq_len"] for x in r.values()), name


def test_rebuild_equals_incremental(small):
    cfg = small
    for d in (D1, D2, D3):
        ingest.ingest(cfg, d)
        sequences.update(cfg, d)
    incremental = table(cfg)
    res = sequences.rebuild(cfg)
    assert res["upto"] == str(D3)
    assert table(cfg).equals(incremental)


def test_rerun_of_a_day_replaces_it(small):
    cfg = small
    for d in (D1, D2):
        ingest.ingest(cfg, d)
        sequences.update(cfg, d)
    once = table(cfg)
    r = sequences.update(cfg, D2)
    assert r["rerun"] is True
    assert table(cfg).equals(once), "rerunning D2 must not merge its events twice"
    sequences.update(cfg, D2)
    assert table(cfg).equals(once)
    # ... and the next day still applies on top.
    ingest.ingest(cfg, D3)
    sequences.update(cfg, D3)
    after = table(cfg)
    sequences.rebuild(cfg)
    assert table(cfg).equals(after)


def test_rerun_after_the_drop_changed(small):
    """On-call re-delivers a corrected D2 and reruns it: the sequences reflect the new D2 only."""
    cfg = small
    for d in (D1, D2):
        ingest.ingest(cfg, d)
        sequences.update(cfg, d)
    (cfg.raw_events_dir(D2) / "part-0.parquet").unlink()
    write_drop(cfg.raw_root, D2, events_table([("z1", "u9", ts(D2, 9), "view", "i1")]))
    ingest.ingest(cfg, D2)
    sequences.update(cfg, D2)
    r = rows(cfg)
    assert "u4" not in r and "u9" in r
    assert r["u1"]["lifetime_events"] == 2  # D1 only: the purchase of the first D2 is gone
    incremental = table(cfg)
    sequences.rebuild(cfg)
    assert table(cfg).equals(incremental)


def test_out_of_order_day_is_refused(small):
    cfg = small
    for d in (D1, D2):
        ingest.ingest(cfg, d)
        sequences.update(cfg, d)
    v = delta.version_of(cfg.table_path("user_sequences"))
    with pytest.raises(UserError, match="out of order"):
        sequences.update(cfg, D1)
    assert delta.version_of(cfg.table_path("user_sequences")) == v


def test_day_not_ingested_is_refused(small):
    cfg = small
    with pytest.raises(UserError, match="no events table"):
        sequences.update(cfg, D1)
    ingest.ingest(cfg, D1)
    with pytest.raises(UserError, match="no partition dt=2026-01-02"):
        sequences.update(cfg, D2)


def test_empty_day_changes_nothing(small):
    cfg = small
    ingest.ingest(cfg, D1)
    sequences.update(cfg, D1)
    v = delta.version_of(cfg.table_path("user_sequences"))
    empty = dt.date(2026, 1, 2)
    (cfg.raw_events_dir(empty) / "part-0.parquet").unlink()
    write_drop(cfg.raw_root, empty, events_table([]))
    ingest.ingest(cfg, empty, allow_empty=True)
    r = sequences.update(cfg, empty)
    assert r["active_users"] == 0 and delta.version_of(cfg.table_path("user_sequences")) == v


def test_a_day_writes_only_the_active_users_rows(home, monkeypatch, spark):
    """One MERGE: the day's users' rows are written (updated or inserted), their old rows are marked in
    deletion vectors, no file is rewritten and no other row is copied."""
    monkeypatch.setenv("USERFORMER__SEQUENCES__ROWS_PER_FILE", "1000")
    cfg = load_config()
    seq_path = cfg.table_path("user_sequences")
    rows_d1 = [(f"a{i}", f"u{i:05d}", ts(D1, 1), "view", "i1") for i in range(3000)]
    write_drop(cfg.raw_root, D1, events_table(rows_d1))
    write_drop(
        cfg.raw_root,
        D2,
        events_table(
            [
                ("b1", "u00007", ts(D2, 1), "view", "i1"),
                ("b2", "u02500", ts(D2, 2), "cart", "i1"),
                ("b3", "new-user", ts(D2, 3), "view", "i1"),
            ]
        ),
    )
    for d in (D1, D2):
        ingest.ingest(cfg, d)
    sequences.update(cfg, D1)
    files_before = set(delta.active_files(seq_path))
    assert len(files_before) == 3  # rows_per_file
    assert delta.open_table(seq_path).metadata().configuration.get("delta.enableDeletionVectors") == "true"

    r = sequences.update(cfg, D2)
    assert (r["active_users"], r["new_users"], r["rows_updated"], r["rows_written"]) == (3, 1, 2, 3)
    assert r["files_rewritten"] == 0 and r["target_rows_copied"] == 0
    assert r["files_added"] == 1 and r["deletion_vectors_added"] >= 1
    h = delta.history(seq_path, 1)[0]
    assert h["operation"] == "MERGE" and (h["step"], h["dt"]) == ("sequences", str(D2))
    m = h["operationMetrics"]
    assert int(m["numTargetRowsUpdated"]) == 2 and int(m["numTargetRowsInserted"]) == 1
    files_after = set(delta.active_files(seq_path))
    assert files_before <= files_after and len(files_after - files_before) == 1
    assert delta.has_deletion_vectors(delta.open_table(seq_path))
    # Physically the old rows are still in their files; readers see one row per user.
    assert sum(a["num_records"] for a in delta.add_actions(seq_path)) == 3003
    assert delta.logical_rows(seq_path) == len(table(cfg)) == 3001
    assert delta.spark_read(spark, seq_path).count() == 3001
    assert rows(cfg)["u00007"]["seq_len"] == 2 and rows(cfg)["new-user"]["seq_len"] == 1
    assert equals_rebuild(cfg)


def test_incremental_equals_rebuild_after_maintain(small):
    """maintain compacts the day files and purges the deletion vectors; days applied after it, and a rerun
    of the last one, still equal a rebuild."""
    cfg = small
    seq_path = cfg.table_path("user_sequences")
    for d in (D1, D2):
        ingest.ingest(cfg, d)
        sequences.update(cfg, d)
    before = table(cfg)
    assert len(delta.active_files(seq_path)) == 2 and delta.has_deletion_vectors(delta.open_table(seq_path))
    res = maintain.maintain(cfg)["tables"]["user_sequences"]
    assert res["optimize"]["numRemovedFiles"] == 2 and res["optimize"]["numAddedFiles"] == 1
    assert len(delta.active_files(seq_path)) == 1
    assert all(f.keep is None for f in delta.data_files(seq_path)), "no deletion vector left"
    assert table(cfg).equals(before)
    assert drops.last_drop(seq_path)[0] == D2  # maintenance commits hold no drop
    ingest.ingest(cfg, D3)
    sequences.update(cfg, D3)
    assert sequences.update(cfg, D3)["rerun"] is True
    assert equals_rebuild(cfg)


def test_a_failed_merge_leaves_sequences_as_they_were(small, monkeypatch):
    """The MERGE's Spark job fails while it writes (a task error in a column of the rows it writes): nothing is
    committed, the files it wrote are invisible, and the day applies normally afterwards."""
    from pyspark.sql import functions as F

    cfg = small
    for d in (D1, D2):
        ingest.ingest(cfg, d)
    sequences.update(cfg, D1)
    before, v = table(cfg), delta.version_of(cfg.table_path("user_sequences"))
    real = sequences._merge

    def failing(spark, seq_path, staged, read_version, meta):
        boom = F.when(F.col("user_id").isNotNull(), F.raise_error(F.lit("disk full (injected)"))).cast("int")
        return real(spark, seq_path, staged.withColumn("seq_len", boom), read_version, meta)

    monkeypatch.setattr(sequences, "_merge", failing)
    with pytest.raises(Exception, match="disk full"):
        sequences.update(cfg, D2)
    assert delta.version_of(cfg.table_path("user_sequences")) == v and table(cfg).equals(before)
    monkeypatch.setattr(sequences, "_merge", real)
    assert sequences.update(cfg, D2)["rerun"] is False  # the failed attempt left no trace of D2
    assert equals_rebuild(cfg)


def test_another_writers_commit_after_the_rows_were_computed_refuses_the_merge(small, monkeypatch, spark):
    """Writers without a shared lease (two hosts, one bucket): another writer commits to user_sequences after this
    step computed and judged D's rows. Merging them would put back rows computed on the older version, so the
    step refuses with ConcurrentWrite (exit 75, retried), the other commit stays, and the retry lands."""
    from delta.tables import DeltaTable

    cfg = small
    for d in (D1, D2):
        ingest.ingest(cfg, d)
    sequences.update(cfg, D1)
    path = cfg.table_path("user_sequences")
    real = sequences._gate

    def judged_then_another_writer(*args, **kwargs):
        out = real(*args, **kwargs)
        DeltaTable.forPath(spark, delta.spark_uri(path)).delete("user_id = 'u3'")
        return out

    monkeypatch.setattr(sequences, "_gate", judged_then_another_writer)
    with pytest.raises(delta.ConcurrentWrite, match="computed on version"):
        sequences.update(cfg, D2)
    got = rows(cfg)  # the other writer's commit, nothing of D2
    assert "u3" not in got and all(r["updated_dt"] == D1 for r in got.values())
    monkeypatch.setattr(sequences, "_gate", real)
    assert sequences.update(cfg, D2)["rerun"] is False


def _kill_at_merge(cfg, tmp_path, day, *, then_s: float | None = None) -> None:
    """Run `userformer sequences --dt day` in its own process, hold it before its MERGE and SIGKILL it (with its
    Spark) there, or `then_s` seconds after letting the MERGE start."""
    pause = tmp_path / "pause"
    step = procs.start(
        cfg.paths.home,
        tmp_path / "logs",
        "sequences",
        "--dt",
        str(day),
        pause_at="sequences.before_merge",
        pause_dir=pause,
    )
    try:
        procs.wait_paused(pause, "sequences.before_merge", [step])
        if then_s is not None:
            procs.release(pause, "sequences.before_merge")
            time.sleep(then_s)
        step.kill()
    finally:
        procs.stop_all([step])


def test_a_rerun_killed_between_its_restore_and_its_merge(small, tmp_path):
    """A rerun of D2 restores the state before D2, then MERGEs: SIGKILLed in between, the table is the state
    before D2 and says so (applied drop D1), so running D2 applies it once."""
    cfg = small
    seq_path = cfg.table_path("user_sequences")
    for d in (D1, D2):
        ingest.ingest(cfg, d)
        sequences.update(cfg, d)
    after_d2 = table(cfg)
    v_d1 = next(h["version"] for h in delta.history(seq_path) if h.get("dt") == str(D1))
    before_d2 = delta.read_arrow(seq_path, version=v_d1).sort_by("user_id")

    _kill_at_merge(cfg, tmp_path, D2)
    assert delta.history(seq_path, 1)[0]["operation"] == "RESTORE"
    assert table(cfg).equals(before_d2)
    assert drops.last_drop(seq_path)[0] == D1
    assert sequences.update(cfg, D2)["rerun"] is False
    assert table(cfg).equals(after_d2)
    assert equals_rebuild(cfg)


def test_an_update_killed_during_its_merge(small, tmp_path):
    """SIGKILLed while its MERGE runs (wherever it got to: scan, file writes, commit), the table is at its
    version before the day or after it, never in between; running the day again gives the rebuild."""
    cfg = small
    seq_path = cfg.table_path("user_sequences")
    for d in (D1, D2):
        ingest.ingest(cfg, d)
    sequences.update(cfg, D1)
    before, v = table(cfg), delta.version_of(seq_path)

    _kill_at_merge(cfg, tmp_path, D2, then_s=4.0)
    now = delta.version_of(seq_path)
    assert now in (v, v + 1)
    if now == v:
        assert table(cfg).equals(before) and drops.last_drop(seq_path)[0] == D1
    else:
        assert drops.last_drop(seq_path)[0] == D2
    sequences.update(cfg, D2)
    assert equals_rebuild(cfg)


def test_a_table_without_deletion_vectors_is_migrated(small, caplog):
    """A warehouse written before user_sequences was MERGEd (a plain delta-rs table, drop in its commit
    metadata): the next day enables deletion vectors (one logged ALTER commit) and MERGEs."""
    from deltalake import CommitProperties, write_deltalake

    cfg = small
    seq_path = cfg.table_path("user_sequences")
    for d in (D1, D2):
        ingest.ingest(cfg, d)
    sequences.update(cfg, D1)
    old = table(cfg)
    import shutil

    shutil.rmtree(seq_path)
    write_deltalake(
        str(seq_path),
        old.cast(tables.USER_SEQUENCES),
        mode="overwrite",
        commit_properties=CommitProperties(custom_metadata={"step": "sequences", "dt": str(D1)}),
    )
    assert not delta.has_deletion_vectors(delta.open_table(seq_path))
    assert drops.last_drop(seq_path) == (D1, -1)

    with caplog.at_level(logging.WARNING, logger="userformer.jobs.steps.sequences"):
        r = sequences.update(cfg, D2)
    assert any("enabled them" in m for m in caplog.messages)
    ops = [h["operation"] for h in delta.history(seq_path, 2)]
    assert ops == ["MERGE", "SET TBLPROPERTIES"]
    assert delta.open_table(seq_path).metadata().configuration["delta.enableDeletionVectors"] == "true"
    assert r["files_rewritten"] == 0 and r["deletion_vectors_added"] >= 1
    assert drops.last_drop(seq_path) == (D2, r["version"] - 1)
    assert sequences.update(cfg, D2)["rerun"] is True  # the rerun starts from the migrated state
    assert equals_rebuild(cfg)


def test_every_table_is_readable_by_other_engines(small):
    """Downstream reads: delta-rs/pandas, Polars and DuckDB see the same rows as our reader, for every table."""
    import duckdb
    import polars as pl
    from deltalake import DeltaTable

    cfg = small
    for d in (D1, D2):
        ingest.ingest(cfg, d)
        sequences.update(cfg, d)
    for name in tables.FOUNDATION_TABLES:
        path = str(cfg.table_path(name))
        n = delta.read_arrow(path).num_rows
        assert n > 0, name
        assert pl.read_delta(path).height == n, name
        if delta.has_deletion_vectors(delta.open_table(path)):
            continue  # delta-rs's own pyarrow reader refuses deletion vectors: our reader or Polars
        assert len(DeltaTable(path).to_pandas()) == n, name
        ds = DeltaTable(path).to_pyarrow_dataset()  # noqa: F841 (DuckDB reads the local by its name)
        assert duckdb.sql("select count(*) from ds").fetchall()[0][0] == n, name
    seq = pl.read_delta(str(cfg.table_path("user_sequences")))
    assert seq.schema["ts"] == pl.List(pl.Datetime("us", "UTC"))


def test_a_manual_restore_is_followed(small, spark):
    """On-call restores user_sequences by hand (Spark's RESTORE, no metadata; delta-rs must not restore a table
    with deletion vectors): the order check follows it to the version in its operationParameters."""
    cfg = small
    seq_path = cfg.table_path("user_sequences")
    versions = []
    for d in (D1, D2, D3):
        ingest.ingest(cfg, d)
        versions.append(sequences.update(cfg, d)["version"])
    spark.sql(f"RESTORE TABLE {delta.spark_sql_name(seq_path)} TO VERSION AS OF {versions[0]}")
    h = delta.history(seq_path, 1)[0]
    assert h["operation"] == "RESTORE" and int(h["operationParameters"]["version"]) == versions[0]
    assert drops.last_drop(seq_path)[0] == D1
    for d in (D2, D3):
        assert sequences.update(cfg, d)["rerun"] is False
    replayed = table(cfg)
    sequences.rebuild(cfg)
    assert table(cfg).equals(replayed)


def test_two_days_at_once_queue_on_the_lease(small, tmp_path):
    """`sequences --dt D1` and `--dt D2` started together: D1 holds the lease (held right after taking it), D2
    waits and says for whom, then applies after D1. Unique users, every update present: the rebuild's table."""
    cfg = small
    for d in (D1, D2):
        ingest.ingest(cfg, d)
    pause, logs, env = tmp_path / "pause", tmp_path / "logs", {"USERFORMER__SEQUENCES__MAX_LEN": "3"}
    first = procs.start(
        cfg.paths.home, logs, "sequences", "--dt", str(D1), pause_at="lease.acquired", pause_dir=pause, env=env
    )
    second = None
    try:
        procs.wait_paused(pause, "lease.acquired", [first])
        second = procs.start(cfg.paths.home, logs, "sequences", "--dt", str(D2), env=env)
        procs.wait_said(second, "waiting up to", timeout=120)
        assert f"held by step sequences (pid {first.pid} on " in second.stderr
        procs.release(pause, "lease.acquired")
        codes = [first.wait(), second.wait()]
    finally:
        procs.stop_all([first] + ([second] if second else []))
    assert codes == [0, 0], (first.stderr[-3000:], second.stderr[-3000:])
    assert drops.last_drop(cfg.table_path("user_sequences"))[0] == D2
    t = table(cfg)
    assert t.num_rows == len(set(t["user_id"].to_pylist()))  # one row per user
    assert equals_rebuild(cfg)  # both days applied once, in order
