"""user_sequences: incremental updates equal a rebuild from events; reruns replace; order is enforced."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest

from userformer.jobs import ingest, sequences
from userformer.jobs.common import UserError
from userformer.jobs.config import load_config
from userformer.jobs.storage import delta
from userformer.schemas import tables as S

from .rawdata import D1, D2, D3, events_table, three_days, ts, write_drop

pytestmark = pytest.mark.spark


def table(cfg) -> pa.Table:
    return delta.read_arrow(cfg.table_path("user_sequences")).sort_by("user_id")


def rows(cfg) -> dict:
    return {r["user_id"]: r for r in table(cfg).to_pylist()}


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
    assert t.schema.equals(S.USER_SEQUENCES, check_metadata=False)
    r = rows(cfg)
    # u2: view i2 (D1 03:00), late view i3 (D1 23:00, delivered D2), late cart i3 (D2 22:00, delivered D3), view i2 (D3 02:00).
    # max_len 3 keeps the newest three, oldest first.
    assert r["u2"]["ts"] == [ts(D1, 23), ts(D2, 22), ts(D3, 2)]
    assert r["u2"]["seq_len"] == 3 and r["u2"]["lifetime_events"] == 4
    assert r["u2"]["lifetime_counts"] == [("cart", 1), ("view", 3)]
    assert r["u2"]["first_event_ts"] == ts(D1, 3) and r["u2"]["last_event_ts"] == ts(D3, 2)
    assert r["u2"]["updated_dt"] == D3
    # u3 had only a search on D1: untouched since.
    assert r["u3"]["updated_dt"] == D1 and r["u3"]["item_idx"] == [0]
    for name in S.SEQUENCE_ARRAYS:
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


def test_only_files_of_active_users_are_rewritten(home, monkeypatch, spark):
    """Copy-on-write granularity: with small files, a day touching one user rewrites one file."""
    monkeypatch.setenv("USERFORMER__SEQUENCES__ROWS_PER_FILE", "1000")
    cfg = load_config()
    rows_d1 = [(f"a{i}", f"u{i:05d}", ts(D1, 1), "view", "i1") for i in range(3000)]
    write_drop(cfg.raw_root, D1, events_table(rows_d1))
    write_drop(cfg.raw_root, D2, events_table([("b1", "u00007", ts(D2, 1), "view", "i1")]))
    for d in (D1, D2):
        ingest.ingest(cfg, d)
    sequences.update(cfg, D1)
    files_before = set(delta.active_files(cfg.table_path("user_sequences")))
    assert len(files_before) == 3
    r = sequences.update(cfg, D2)
    files_after = set(delta.active_files(cfg.table_path("user_sequences")))
    assert r["files_rewritten"] == 1 and len(files_before & files_after) == 2
    assert rows(cfg)["u00007"]["seq_len"] == 2 and len(table(cfg)) == 3000


def test_failed_commit_leaves_sequences_as_they_were(small, monkeypatch):
    cfg = small
    for d in (D1, D2):
        ingest.ingest(cfg, d)
    sequences.update(cfg, D1)
    before, v = table(cfg), delta.version_of(cfg.table_path("user_sequences"))
    real = delta.commit_staged

    def boom(*a, **kw):
        raise OSError("object store unavailable (injected)")

    monkeypatch.setattr(delta, "commit_staged", boom)
    with pytest.raises(OSError):
        sequences.update(cfg, D2)
    assert delta.version_of(cfg.table_path("user_sequences")) == v and table(cfg).equals(before)
    assert not list((cfg.warehouse_root / "_staging").rglob("*.parquet")), "staged files must not linger"
    monkeypatch.setattr(delta, "commit_staged", real)
    assert sequences.update(cfg, D2)["rerun"] is False  # the failed attempt left no trace of D2
    after = table(cfg)
    sequences.rebuild(cfg)
    assert table(cfg).equals(after)


def test_every_table_is_readable_by_other_engines(small):
    """Downstream reads: delta-rs/pandas, Polars and DuckDB see the same rows as our reader, for every table."""
    import duckdb
    import polars as pl
    from deltalake import DeltaTable

    cfg = small
    for d in (D1, D2):
        ingest.ingest(cfg, d)
        sequences.update(cfg, d)
    for name in S.FOUNDATION_TABLES:
        path = str(cfg.table_path(name))
        n = delta.read_arrow(path).num_rows
        assert n > 0, name
        assert len(DeltaTable(path).to_pandas()) == n, name
        assert pl.read_delta(path).height == n, name
        ds = DeltaTable(path).to_pyarrow_dataset()
        assert duckdb.sql("select count(*) from ds").fetchall()[0][0] == n, name
    seq = pl.read_delta(str(cfg.table_path("user_sequences")))
    assert seq.schema["ts"] == pl.List(pl.Datetime("us", "UTC"))


def test_a_manual_restore_is_followed(small):
    """On-call restores user_sequences by hand (plain delta-rs restore): the order check follows it."""
    from deltalake import DeltaTable

    cfg = small
    versions = []
    for d in (D1, D2, D3):
        ingest.ingest(cfg, d)
        versions.append(sequences.update(cfg, d)["version"])
    DeltaTable(str(cfg.table_path("user_sequences"))).restore(versions[0])
    assert sequences.applied_drop(cfg.table_path("user_sequences"))[0] == D1
    for d in (D2, D3):
        assert sequences.update(cfg, d)["rerun"] is False
    replayed = table(cfg)
    sequences.rebuild(cfg)
    assert table(cfg).equals(replayed)
