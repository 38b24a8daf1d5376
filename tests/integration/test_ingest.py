"""Ingest on real Spark into real Delta tables: contract, quarantine, dedupe, vocabularies, reruns, bad input."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from userformer.jobs.core import hooks
from userformer.jobs.core.config import load_config
from userformer.jobs.core.errors import UserError
from userformer.jobs.core.storage import delta
from userformer.jobs.steps import ingest as ingest_mod
from userformer.schemas import tables

from . import procs
from .rawdata import D1, D2, D3, OPEN_GATE, events_table, open_gate, three_days, ts, write_drop

pytestmark = pytest.mark.spark


@pytest.fixture(autouse=True)
def _open_gate(home, monkeypatch):
    """Every test here runs on hand-made drops: the events gate is opened for them (rawdata.OPEN_GATE)."""
    open_gate(monkeypatch)


TABLES = ("events", "events_rejected", "vocab", "items")


def versions(cfg) -> dict:
    return {t: delta.version_of(cfg.table_path(t)) for t in TABLES}


def read(cfg, table, **kw) -> pa.Table:
    return delta.read_arrow(cfg.table_path(table), **kw)


def sort(t: pa.Table, *keys) -> pa.Table:
    return t.sort_by([(k, "ascending") for k in keys])


def same_columns(a: pa.Schema, b: pa.Schema) -> bool:
    """Names and types in order. Not nullability: Spark writes every column nullable (schemas.tables.to_spark)."""
    return [(f.name, f.type) for f in a] == [(f.name, f.type) for f in b]


def tables_of(cfg) -> dict:
    """Every table ingest writes, in an order-free form that two warehouses can be compared in."""
    return {
        "events": sort(read(cfg, "events"), "dt", "event_id"),
        "events_rejected": sort(read(cfg, "events_rejected"), "dt", "reason", "source_file", "ts_raw", "event_id"),
        "vocab": sort(read(cfg, "vocab"), "kind", "idx"),
        "items": sort(read(cfg, "items"), "item_idx"),
    }


def clean_ingest(tmp_path: Path, *days, raw=three_days) -> dict:
    """The tables after an uninterrupted one-process ingest of `days` in order, in a warehouse of their own
    (raw drops made by `raw(raw_root)`)."""
    cfg = load_config(env={"USERFORMER_HOME": str(tmp_path / f"clean-{'-'.join(map(str, days))}"), **OPEN_GATE})
    raw(cfg.raw_root)
    for d in days:
        ingest_mod.ingest(cfg, d)
    return tables_of(cfg)


@pytest.fixture
def three(cfg, spark):
    three_days(cfg.raw_root)
    return cfg


def test_ingest_accepts_quarantines_and_dedupes(three):
    cfg = three
    r1 = ingest_mod.ingest(cfg, D1)
    assert r1["raw_rows"] == 9 and r1["accepted"] == 4
    assert r1["rejected"] == {
        "duplicate": 1,
        "future_ts": 1,
        "missing_item_id": 1,
        "null_user_id": 1,
        "unknown_event_type": 1,
    }
    r2 = ingest_mod.ingest(cfg, D2)
    assert r2["accepted"] == 4 and r2["rejected"] == {"duplicate": 1}

    ev = read(cfg, "events")
    assert same_columns(ev.schema, tables.EVENTS)
    assert {"e1", "e2", "e3", "e4", "e8", "e9", "e10"} < set(ev["event_id"].to_pylist())
    assert len(set(ev["event_id"].to_pylist())) == ev.num_rows == 8
    # The late event of D2 is stored in drop D2 with its real time.
    late = ev.filter(pc.equal(ev["event_id"], "e9")).to_pylist()[0]
    assert late["dt"] == D2 and late["ts"] == ts(D1, 23)
    # No producer id: a content hash, stable.
    hashed = ev.filter((pc.field("user_id") == "u4") & (pc.field("event_type") == "search"))
    assert len(hashed["event_id"][0].as_py()) == 40

    rej = read(cfg, "events_rejected")
    assert same_columns(rej.schema, tables.EVENTS_REJECTED)
    cross = rej.filter(pc.equal(rej["dt"], pa.scalar(D2))).to_pylist()[0]
    assert cross["reason"] == "duplicate" and "2026-01-01" in cross["detail"] and cross["event_id"] == "e1"
    assert all(r["source_file"] == "part-0.parquet" for r in rej.to_pylist())

    # Ids: categories by path, brands, unknown item with unknown attributes.
    items = {r["item_id"]: r for r in read(cfg, "items").to_pylist()}
    assert set(items) == {"i1", "i2", "i3", "i9"}
    assert items["i9"]["has_metadata"] is False and items["i9"]["category_l1_idx"] == 0
    assert items["i1"]["category_l3_idx"] > 0 and items["i2"]["category_l3_idx"] == 0
    e_i1 = ev.filter(pc.equal(ev["item_id"], "i1")).to_pylist()[0]
    assert (e_i1["item_idx"], e_i1["category_l1_idx"], e_i1["brand_idx"]) == (
        items["i1"]["item_idx"],
        items["i1"]["category_l1_idx"],
        items["i1"]["brand_idx"],
    )
    search = ev.filter(pc.equal(ev["event_type"], "search")).to_pylist()
    assert all(r["item_idx"] == 0 and r["item_id"] is None for r in search)


def test_vocab_ids_are_stable_and_append_only(three):
    cfg = three
    ingest_mod.ingest(cfg, D1)
    v1 = {(r["kind"], r["key"]): r["idx"] for r in read(cfg, "vocab").to_pylist()}
    ingest_mod.ingest(cfg, D2)
    ingest_mod.ingest(cfg, D1)  # a rerun must not renumber anything
    v2 = {(r["kind"], r["key"]): r["idx"] for r in read(cfg, "vocab").to_pylist()}
    assert all(v2[k] == v for k, v in v1.items())
    assert ("item", "i9") in v2 and ("item", "i9") not in v1
    for kind in tables.VOCAB_KINDS:
        ids = sorted(v for (k, _), v in v2.items() if k == kind)
        assert ids == list(range(1, len(ids) + 1)), kind
    assert v2[("category_l2", "beauty > skin")] != v2[("category_l2", "home > kitchen")]


def test_rerun_replaces_the_day(three):
    cfg = three
    for d in (D1, D2, D3):
        ingest_mod.ingest(cfg, d)
    ev_before = sort(read(cfg, "events"), "event_id")
    rej_before = sort(read(cfg, "events_rejected"), "dt", "reason", "event_id")
    vocab_before = read(cfg, "vocab").num_rows
    ingest_mod.ingest(cfg, D2)
    assert sort(read(cfg, "events"), "event_id").equals(ev_before)
    assert sort(read(cfg, "events_rejected"), "dt", "reason", "event_id").equals(rej_before)
    assert read(cfg, "vocab").num_rows == vocab_before
    hist = delta.history(cfg.table_path("events"))
    assert hist[0]["dt"] == str(D2) and hist[0]["step"] == "ingest"


def test_same_day_delivered_twice_is_deduplicated(three):
    cfg = three
    src = cfg.raw_events_dir(D1) / "part-0.parquet"
    shutil.copy(src, cfg.raw_events_dir(D1) / "part-0-redelivered.parquet")
    r = ingest_mod.ingest(cfg, D1)
    assert r["accepted"] == 4
    # The in-file duplicate, then every valid row of the copy (e1, e2, e3 twice, e4) again.
    assert r["rejected"]["duplicate"] == 1 + 5
    assert r["rejected"]["null_user_id"] == 2  # bad rows are quarantined once per copy
    ev = read(cfg, "events")
    assert ev.num_rows == 4 and len(set(ev["event_id"].to_pylist())) == 4


def test_unparseable_and_string_timestamps(cfg, spark):
    t = events_table(
        [
            ("a", "u1", ts(D1, 1), "view", "i1"),
            ("b", "u1", ts(D1, 2), "view", "i1"),
            ("c", "u1", ts(D1, 3), "view", "i1"),
        ]
    )
    t = t.set_column(2, "ts", pa.array(["2026-01-01T01:00:00Z", "yesterday-ish", "2026-01-01 03:30:00"]))
    write_drop(cfg.raw_root, D1, t)
    r = ingest_mod.ingest(cfg, D1)
    assert r["accepted"] == 2 and r["rejected"] == {"unparseable_ts": 1}
    got = sorted(read(cfg, "events")["ts"].to_pylist())
    assert got == [ts(D1, 1), ts(D1, 3, 30)]
    rej = read(cfg, "events_rejected").to_pylist()[0]
    assert rej["ts_raw"] == "yesterday-ish" and "yesterday-ish" in rej["detail"]


def test_nanosecond_and_integer_id_columns_are_normalised(cfg, spark):
    t = events_table([("a", "7", ts(D1, 1), "view", "42")])
    t = pa.table(
        {
            "event_id": t["event_id"],
            "user_id": pa.array([7], pa.int64()),
            "ts": t["ts"].cast(pa.timestamp("ns", tz="UTC")),
            "event_type": t["event_type"],
            "item_id": pa.array([42], pa.int64()),
        }
    )
    write_drop(cfg.raw_root, D1, t)
    ingest_mod.ingest(cfg, D1)
    row = read(cfg, "events").to_pylist()[0]
    assert (row["user_id"], row["item_id"], row["ts"]) == ("7", "42", ts(D1, 1))


def test_files_of_one_drop_may_differ_in_types(cfg, spark, caplog):
    """One producer sends string ids and ISO strings, another integers and timestamps and a column the contract
    does not know (ignored, with a warning naming it): both land."""
    a = events_table([("a", "u1", ts(D1, 1), "view", "i1")])
    b = pa.table(
        {
            "user_id": pa.array([2], pa.int64()),
            "ts": pa.array(["2026-01-01T02:00:00Z"]),
            "event_type": ["cart"],
            "item_id": pa.array([42], pa.int64()),
            "session_tag": ["x"],
        }
    )
    write_drop(cfg.raw_root, D1, a, name="part-a.parquet")
    write_drop(cfg.raw_root, D1, b, name="part-b.parquet")
    with caplog.at_level("WARNING", logger=ingest_mod.log.name):
        r = ingest_mod.ingest(cfg, D1)
    assert "part-b.parquet: ignoring columns outside the raw contract: ['session_tag']" in caplog.text
    assert "session_tag" not in read(cfg, "events").column_names
    assert r["accepted"] == 2 and r["raw_files"] == 2
    got = sorted((x["user_id"], x["item_id"], x["ts"]) for x in read(cfg, "events").to_pylist())
    assert got == [("2", "42", ts(D1, 2)), ("u1", "i1", ts(D1, 1))]


def test_old_events_and_bad_durations_are_rejected(cfg, spark):
    t = events_table(
        [
            ("a", "u1", ts(D1, 1) - dt.timedelta(days=30), "view", "i1"),
            ("b", "u1", ts(D1, 2), "view", "i1"),
            ("c", "u1", ts(D1, 3), "view", "i1"),
        ]
    )
    t = t.set_column(6, "duration_s", pa.array([1.0, -5.0, 2.0]))
    write_drop(cfg.raw_root, D1, t)
    r = ingest_mod.ingest(cfg, D1)
    assert r["rejected"] == {"ts_too_old": 1, "bad_duration": 1} and r["accepted"] == 1


def test_single_user_burst_is_capped(home, monkeypatch, spark):
    monkeypatch.setenv("USERFORMER__INGEST__MAX_EVENTS_PER_USER_PER_DAY", "50")
    from userformer.jobs.core.config import load_config

    cfg = load_config()
    rows = [(f"b{i}", "bot", ts(D1, 0) + dt.timedelta(seconds=i), "view", "i1") for i in range(500)]
    rows += [("n1", "u1", ts(D1, 5), "view", "i1")]
    write_drop(cfg.raw_root, D1, events_table(rows))
    r = ingest_mod.ingest(cfg, D1)
    assert r["accepted"] == 51 and r["rejected"] == {"user_burst": 450}
    kept = read(cfg, "events").filter(pc.field("user_id") == "bot")
    # The latest events are the ones kept.
    assert min(kept["ts"].to_pylist()) == ts(D1, 0) + dt.timedelta(seconds=450)


# ---------------------------------------------------------------- refusals
def _assert_refused(cfg, day, match):
    before = versions(cfg)
    with pytest.raises(UserError, match=match):
        ingest_mod.ingest(cfg, day)
    assert versions(cfg) == before, "a refused drop must leave every table as it was"
    for table in ("events", "events_rejected"):  # not even uncommitted files
        assert not list(cfg.table_path(table).glob(f"dt={day}/*"))


def test_missing_required_column_is_refused(three):
    cfg = three
    ingest_mod.ingest(cfg, D1)
    t = events_table([("x", "u1", ts(D2, 1), "view", "i1")]).drop_columns(["user_id"])
    write_drop(cfg.raw_root, D2, t, name="part-1.parquet")
    _assert_refused(cfg, D2, r"missing required column\(s\) \['user_id'\]")


def test_wrong_type_is_refused(three):
    cfg = three
    ingest_mod.ingest(cfg, D1)
    t = events_table([("x", "u1", ts(D2, 1), "view", "i1")])
    t = t.set_column(2, "ts", pa.array([True]))
    write_drop(cfg.raw_root, D2, t, name="part-1.parquet")
    _assert_refused(cfg, D2, "column ts has type bool")


def test_truncated_parquet_is_refused(three):
    cfg = three
    ingest_mod.ingest(cfg, D1)
    f = cfg.raw_events_dir(D2) / "part-0.parquet"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _assert_refused(cfg, D2, "part-0.parquet: unreadable Parquet file")


def test_missing_and_empty_partitions(three):
    cfg = three
    ingest_mod.ingest(cfg, D1)
    _assert_refused(cfg, dt.date(2026, 2, 1), "raw partition not found")
    empty = cfg.raw_events_dir(dt.date(2026, 1, 4))
    empty.mkdir(parents=True)
    _assert_refused(cfg, dt.date(2026, 1, 4), "has no files")
    write_drop(cfg.raw_root, dt.date(2026, 1, 4), events_table([]))
    _assert_refused(cfg, dt.date(2026, 1, 4), "no rows")
    # An expected empty day: commits an empty partition and succeeds.
    r = ingest_mod.ingest(cfg, dt.date(2026, 1, 4), allow_empty=True)
    assert r["accepted"] == 0
    assert delta.history(cfg.table_path("events"))[0]["dt"] == "2026-01-04"


def test_killed_before_the_events_commit_leaves_events_as_they_were(three, spark, tmp_path):
    """A real `userformer ingest` SIGKILLed (with its Spark) at its last commit: events stay at their previous
    version and readable; the rerun completes the day, equal to an uninterrupted run."""
    cfg = three
    ingest_mod.ingest(cfg, D1)
    before = delta.version_of(cfg.table_path("events"))
    events_before = sort(read(cfg, "events"), "event_id")
    pause = tmp_path / "pause"
    step = procs.start(
        cfg.paths.home,
        tmp_path / "logs",
        "ingest",
        "--dt",
        str(D2),
        pause_at="ingest.before_events_commit",
        pause_dir=pause,
    )
    try:
        procs.wait_paused(pause, "ingest.before_events_commit", [step])
        step.kill()
    finally:
        procs.stop_all([step])
    assert step.proc.returncode == -9

    assert delta.version_of(cfg.table_path("events")) == before
    assert sort(read(cfg, "events"), "event_id").equals(events_before)
    assert delta.spark_read(spark, cfg.table_path("events")).count() == events_before.num_rows
    # What it committed before the kill (vocab, items, events_rejected[D2]) is what a rerun commits again.
    assert delta.history(cfg.table_path("events_rejected"))[0]["dt"] == str(D2)

    ingest_mod.ingest(cfg, D2)
    got, want = tables_of(cfg), clean_ingest(tmp_path, D1, D2)
    for name in want:
        assert got[name].equals(want[name]), name


def test_a_lookback_drop_committed_meanwhile_refuses_the_commit(three, monkeypatch, tmp_path):
    """D3 deduplicates against D2. When D2 is committed while D3 runs (after D3 read events), D3's commit is
    refused as ConcurrentWrite, before any of its commits; the rerun gives the one-at-a-time result."""

    def raw(root):
        three_days(root)
        # D3 redelivers an event of D2: its verdict depends on whether D2 is in events.
        write_drop(root, D3, events_table([("e8", "u1", ts(D2, 1), "purchase", "i1")]), name="part-1.parquet")

    cfg = three
    raw(cfg.raw_root)
    ingest_mod.ingest(cfg, D1)
    real = hooks.pause
    started, after_d2 = [], []

    def d2_meanwhile(name):
        if name == "ingest.before_commit" and not started:
            started.append(True)
            ingest_mod.ingest(cfg, D2)  # the other writer, between D3's reads and its commits
            after_d2.append(versions(cfg))
        real(name)

    monkeypatch.setattr(hooks, "pause", d2_meanwhile)
    with pytest.raises(delta.ConcurrentWrite, match="was committed after this step read"):
        ingest_mod.ingest(cfg, D3)
    assert after_d2 and versions(cfg) == after_d2[0], "the refused D3 committed nothing"
    monkeypatch.setattr(hooks, "pause", real)

    r = ingest_mod.ingest(cfg, D3)
    assert r["rejected"] == {"duplicate": 1}
    got, want = tables_of(cfg), clean_ingest(tmp_path, D1, D2, D3, raw=raw)
    for name in want:
        assert got[name].equals(want[name]), name


def test_events_table_layout_and_rerun_touches_only_its_day(three):
    """Spark creates events partitioned by dt, readable by delta-rs; files sorted by user_id, ts; a rerun of D2
    replaces D2's files only."""
    cfg = three
    for d in (D1, D2, D3):
        ingest_mod.ingest(cfg, d)
    path = cfg.table_path("events")
    t = delta.open_table(path)
    assert t.metadata().partition_columns == ["dt"]
    assert t.protocol().min_reader_version == 1 and not t.protocol().reader_features
    first = delta.history(path)[-1]
    assert (first["version"], first["step"], first["dt"]) == (0, "ingest", str(D1))
    for f in delta.active_files(path):
        rows = pq.read_table(str(path / f), columns=["user_id", "ts"]).to_pylist()
        assert rows == sorted(rows, key=lambda r: (r["user_id"], r["ts"])), f

    def files_by_day():
        return {
            d: sorted(a["path"] for a in delta.add_actions(path) if str(a["partition.dt"]) == str(d))
            for d in (D1, D2, D3)
        }

    files = files_by_day()
    ingest_mod.ingest(cfg, D2)
    after = files_by_day()
    assert after[D1] == files[D1] and after[D3] == files[D3]
    assert set(after[D2]).isdisjoint(files[D2]) and after[D2]


def test_tables_readable_by_other_engines(three):
    import duckdb
    import polars as pl

    cfg = three
    ingest_mod.ingest(cfg, D1)
    path = str(cfg.table_path("events"))
    assert pl.read_delta(path).height == 4
    ds = delta.open_table(path).to_pyarrow_dataset()  # noqa: F841 (DuckDB reads the local by its name)
    assert duckdb.sql("select count(distinct user_id) from ds").fetchall()[0][0] == 3
    assert pq.read_table(path + "/" + delta.active_files(path)[0]).num_rows == 4


# ------------------------------------------------------------ more bad input
def test_bad_bytes_long_ids_and_infinite_durations_are_quarantined(cfg, spark):
    """Each bad row gets its reason; what events_rejected keeps of it stays readable and small."""
    t = events_table(
        [
            ("a", "u1", ts(D1, 1), "view", "i1"),
            ("b", "BAD", ts(D1, 2), "view", "i1"),
            ("c", "u" * 100_000, ts(D1, 3), "view", "i1"),
            ("d", "u2", ts(D1, 4), "view", "i2"),
            ("e", "u2", ts(D1, 5), "view", "i2"),
            ("f", "u3", ts(D1, 6), "view", "i" * 600),
        ]
    )
    # Bytes that are not UTF-8 in a Parquet string column (pyarrow writes them unchecked, as a producer might).
    users = t["user_id"].to_pylist()
    raw = pa.array([u.encode() if u != "BAD" else b"u\xff\xfe9" for u in users], pa.binary()).view(pa.string())
    t = t.set_column(1, "user_id", raw)
    t = t.set_column(6, "duration_s", pa.array([1.0, 1.0, 1.0, float("inf"), float("nan"), 1.0]))
    write_drop(cfg.raw_root, D1, t)
    r = ingest_mod.ingest(cfg, D1)
    assert r["accepted"] == 1
    assert r["rejected"] == {"invalid_utf8": 1, "too_long": 2, "bad_duration": 2}
    rej = {x["event_id"]: x for x in read(cfg, "events_rejected").to_pylist()}  # decodes every string
    assert rej["b"]["user_id"] == "u\ufffd\ufffd9" and "not UTF-8" in rej["b"]["detail"]
    assert len(rej["c"]["user_id"]) == cfg.ingest.max_id_chars and "100000 characters" in rej["c"]["detail"]
    assert rej["f"]["reason"] == "too_long"


def test_timezone_naive_timestamps_are_utc_and_ids_are_normalised(cfg, spark):
    """Policy: a timestamp without a zone (Parquet or text) is UTC. Ids are trimmed text: 7, "7" and " 7 " are one
    user. Columns outside the contract are ignored."""
    naive = pa.table(
        {
            "event_id": ["a", "b"],
            "user_id": pa.array([7, 7], pa.int64()),
            "ts": pa.array([dt.datetime(2026, 1, 1, 1), dt.datetime(2026, 1, 1, 2)], pa.timestamp("us")),
            "event_type": ["view", "view"],
            "item_id": ["i1", "i2"],
            "producer_debug": ["x", "y"],  # not in the contract
        }
    )
    text = events_table([("c", " 7 ", ts(D1, 3), "view", "i3"), ("d", "7", ts(D1, 4), "view", "i1")])
    text = text.set_column(2, "ts", pa.array(["2026-01-01T03:00:00", "2026-01-01 04:00:00"]))
    write_drop(cfg.raw_root, D1, naive, name="part-a.parquet")
    write_drop(cfg.raw_root, D1, text, name="part-b.parquet")
    r = ingest_mod.ingest(cfg, D1)
    assert r["accepted"] == 4 and not r["rejected"]
    ev = read(cfg, "events")
    assert set(ev["user_id"].to_pylist()) == {"7"}
    assert sorted(ev["ts"].to_pylist()) == [ts(D1, h) for h in (1, 2, 3, 4)]
    assert "producer_debug" not in ev.column_names


def test_a_late_copy_within_the_late_window_is_a_duplicate(home, monkeypatch, spark):
    """An event delivered on D1 and again, late, on D1 + max_late_days: still a duplicate (the lookback covers the
    late window; a configuration where it would not is refused)."""
    monkeypatch.setenv("USERFORMER__INGEST__MAX_LATE_DAYS", "3")
    monkeypatch.setenv("USERFORMER__INGEST__DEDUPE_LOOKBACK_DAYS", "3")
    cfg = load_config()
    late = D1 + dt.timedelta(days=3)
    write_drop(cfg.raw_root, D1, events_table([("a", "u1", ts(D1, 1), "view", "i1")]))
    for d in (D2, D3):
        write_drop(cfg.raw_root, d, events_table([(f"x{d}", "u2", ts(d, 1), "view", "i1")]))
    write_drop(cfg.raw_root, late, events_table([("a", "u1", ts(D1, 1), "view", "i1")]))
    for d in (D1, D2, D3, late):
        ingest_mod.ingest(cfg, d)
    assert read(cfg, "events_rejected").to_pylist()[0]["detail"] == f"already delivered in drop dt={D1}"
    monkeypatch.setenv("USERFORMER__INGEST__DEDUPE_LOOKBACK_DAYS", "2")
    with pytest.raises(Exception, match="dedupe_lookback_days=2 is under ingest.max_late_days=3"):
        load_config()


def test_a_file_added_to_an_ingested_drop_stops_the_next_day(three):
    """A producer adds a file to drop D1 after D1 was ingested: the D2 ingest refuses with the way out, and a
    non-Parquet file in a drop is refused by name."""
    cfg = three
    ingest_mod.ingest(cfg, D1)
    before = versions(cfg)
    write_drop(cfg.raw_root, D1, events_table([("late-file", "u9", ts(D1, 9), "view", "i1")]), name="part-9.parquet")
    _assert_refused(cfg, D2, f"raw drop {D1} changed after it was ingested")
    assert versions(cfg) == before
    (cfg.raw_events_dir(D1) / "part-9.parquet").unlink()  # put back as it was: the next day goes on
    (cfg.raw_events_dir(D2) / "export.csv").write_text("user_id,ts\n")
    _assert_refused(cfg, D2, "export.csv: not a Parquet file")
    (cfg.raw_events_dir(D2) / "export.csv").unlink()
    assert ingest_mod.ingest(cfg, D2)["accepted"] > 0


def test_a_skipped_day_then_its_late_drop(three):
    """Drop D2 never came: D3 goes on after D1 (nothing requires every date). When D2 arrives after D3 was applied,
    it is refused before anything is written, with the way out (a repair restores to before D2 and runs D2, D3 in
    order); re-ingesting the latest applied drop stays a plain rerun."""
    from userformer.jobs.steps import sequences

    cfg = three
    for d in (D1, D3):
        ingest_mod.ingest(cfg, d)
        sequences.update(cfg, d)
    before = versions(cfg)
    with pytest.raises(UserError, match=rf"already includes drops up to {D3}: ingesting the older drop {D2}.*repair"):
        ingest_mod.ingest(cfg, D2)
    assert versions(cfg) == before
    ingest_mod.ingest(cfg, D3)  # the same day again: allowed
