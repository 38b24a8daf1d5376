"""The data-quality gates (jobs/steps/check.py, jobs/steps/quality/suites.py) on small Delta tables written directly,
no Spark."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest

from userformer.jobs.core.config import load_config
from userformer.jobs.core.storage import delta
from userformer.jobs.steps import check
from userformer.schemas import tables

D = dt.date(2024, 3, 10)
EXE = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "userformer"
TYPES = ["view", "click", "search", "purchase"]  # item, item, non-item, item


def start(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), dt.UTC)


def loose(schema: pa.Schema) -> pa.Schema:
    """The schema with every field nullable, so that tests can store the nulls a broken writer would."""
    return pa.schema([f.with_nullable(True) for f in schema])


# ------------------------------------------------------------------ events
def event(day: dt.date, i: int, **over) -> dict:
    et = TYPES[i % len(TYPES)]
    item = et != "search"
    row = {
        "dt": day,
        "event_id": f"{day}-{i}",
        "user_id": f"u{i % 7}",
        "ts": start(day) + dt.timedelta(seconds=60 * i),
        "event_type": et,
        "event_type_idx": TYPES.index(et) + 1,
        "item_id": f"i{i % 13}" if item else None,
        "item_idx": i % 13 + 1 if item else 0,
        "category_l1_idx": 1 if item else 0,
        "category_l2_idx": 2 if item else 0,
        "category_l3_idx": 3 if item else 0,
        "brand_idx": 1 if item else 0,
        "surface": "home",
        "surface_idx": 1,
        "duration_s": 1.5,
        "value": None,
        "query": "shoes" if not item else None,
    }
    return {**row, **over}


def write_events(cfg, rows: list[dict], schema: pa.Schema = tables.EVENTS) -> None:
    delta.write_arrow(cfg.table_path("events"), pa.Table.from_pylist(rows, schema=schema), schema, partition_by=["dt"])


def write_rejected(cfg, day: dt.date, reasons: dict[str, int]) -> None:
    rows = [
        {
            "dt": day,
            "reason": r,
            "detail": r,
            "source_file": "f.parquet",
            "event_id": f"x{r}{k}",
            "user_id": "u1",
            "ts_raw": "2024-03-10T00:00:00Z",
            "event_type": "view",
            "item_id": "i1",
        }
        for r, n in reasons.items()
        for k in range(n)
    ]
    delta.write_arrow(
        cfg.table_path("events_rejected"),
        pa.Table.from_pylist(rows, schema=tables.EVENTS_REJECTED),
        tables.EVENTS_REJECTED,
        partition_by=["dt"],
    )


def history(cfg, days: int = 7, rows: int = 100, schema: pa.Schema = tables.EVENTS) -> None:
    """`days` partitions of `rows` good events before D, and rejects of D that stay within the ratios."""
    write_events(cfg, [event(D - dt.timedelta(days=k), i) for k in range(1, days + 1) for i in range(rows)], schema)
    write_rejected(cfg, D, {"duplicate": 1, "unknown_event_type": 1})


def day(n: int = 100, **changes) -> list[dict]:
    """The events of D; `changes` maps a row number to the fields to change in it."""
    return [event(D, i, **changes.get(f"r{i}", {})) for i in range(n)]


def failed(res: check.CheckResult, expectation: str, column: str) -> check.ExpectationResult:
    hits = [r for r in res.failed if r.expectation == expectation and r.column == column]
    assert hits, (
        f"expected {expectation} on {column} to fail; failed: {[(r.expectation, r.column) for r in res.failed]}"
    )
    return hits[0]


def test_good_day_passes_and_writes_reports(cfg):
    history(cfg)
    write_events(cfg, day())
    res = check.check(cfg, "events", D)
    assert res.success, check.summary(res)
    assert res.error is None and not res.failed
    names = {(r.expectation, r.column) for r in res.results}
    for col in ("dt", "event_id", "user_id", "ts", "event_type", "event_type_idx"):
        assert ("expect_column_values_to_not_be_null", col) in names
    assert ("expect_column_values_to_be_unique", "event_id") in names
    assert ("expect_column_types_to_match_schema", None) in names
    assert {"row_count", "duplicate_ratio", "rejected_ratio"} <= {r.column for r in res.results}
    assert res.facts["trailing_median"] == 100 and res.facts["raw_rows"] == 102
    assert res.html_path == cfg.reports_root / "checks" / "events" / f"dt={D}.html"
    page = res.html_path.read_text()
    assert "PASSED" in page and "expect_column_values_to_be_unique" in page
    data = json.loads(res.json_path.read_text())
    assert data["success"] is True and data["table"] == "events" and data["dt"] == str(D)
    assert len(data["results"]) == len(res.results)


def test_null_user_id(cfg):
    history(cfg, schema=loose(tables.EVENTS))
    write_events(cfg, day(r3={"user_id": None}, r5={"user_id": None}), loose(tables.EVENTS))
    res = check.check(cfg, "events", D)
    assert not res.success
    r = failed(res, "expect_column_values_to_not_be_null", "user_id")
    assert (r.unexpected_count, r.element_count, r.examples) == (2, 100, [None, None])
    assert [(x.expectation, x.column) for x in res.failed] == [("expect_column_values_to_not_be_null", "user_id")]


def test_unknown_event_type(cfg):
    history(cfg)
    write_events(cfg, day(r0={"event_type": "teleport"}, r4={"event_type": "teleport"}, r9={"event_type": "<b>x</b>"}))
    res = check.check(cfg, "events", D)
    r = failed(res, "expect_column_values_to_be_in_set", "event_type")
    assert r.unexpected_count == 3 and sorted(r.examples) == ["<b>x</b>", "teleport", "teleport"]
    # Values are escaped in the page.
    assert "&lt;b&gt;x&lt;/b&gt;" in res.html_path.read_text() and "<b>x</b>" not in res.html_path.read_text()


@pytest.mark.parametrize("n", [0, 2])
def test_examples_are_capped_by_config(cfg, n):
    cfg.quality.examples = n
    history(cfg)
    write_events(cfg, day(**{f"r{i}": {"event_type": f"bogus{i}"} for i in range(4)}))
    r = failed(check.check(cfg, "events", D), "expect_column_values_to_be_in_set", "event_type")
    assert r.unexpected_count == 4 and len(r.examples) == n


def test_ts_out_of_range(cfg):
    too_old = start(D) - dt.timedelta(days=cfg.ingest.max_late_days, seconds=1)
    future = start(D) + dt.timedelta(days=1, seconds=cfg.ingest.future_tolerance_s + 1)
    edge = start(D) + dt.timedelta(days=1, seconds=cfg.ingest.future_tolerance_s)  # still allowed
    history(cfg)
    write_events(cfg, day(r1={"ts": too_old}, r2={"ts": future}, r3={"ts": edge}))
    res = check.check(cfg, "events", D)
    r = failed(res, "expect_column_values_to_be_between", "ts")
    assert r.unexpected_count == 2
    assert sorted(r.examples) == sorted([too_old.isoformat(), future.isoformat()])


def test_duplicate_event_id(cfg):
    history(cfg)
    write_events(cfg, day(r10={"event_id": "dup"}, r20={"event_id": "dup"}))
    res = check.check(cfg, "events", D)
    r = failed(res, "expect_column_values_to_be_unique", "event_id")
    assert (r.unexpected_count, r.examples) == (2, ["dup", "dup"])


def test_item_event_without_item(cfg):
    history(cfg)
    # Row 0 is a view (item event), row 2 a search: a search without item is fine.
    write_events(cfg, day(r0={"item_id": None, "item_idx": 0}, r2={"item_id": None, "item_idx": 0}))
    res = check.check(cfg, "events", D)
    r = failed(res, "expect_column_values_to_not_be_null", "item_id")
    assert r.unexpected_count == 1 and r.element_count == 75  # only the item events are in scope
    assert "event_type IN" in r.kwargs["row_condition"]
    r = failed(res, "expect_column_values_to_be_between", "item_idx")
    assert (r.unexpected_count, r.examples) == (1, [0])


def test_negative_vocab_id(cfg):
    history(cfg)
    write_events(cfg, day(r2={"surface_idx": -1}))
    r = failed(check.check(cfg, "events", D), "expect_column_values_to_be_between", "surface_idx")
    assert (r.unexpected_count, r.examples) == (1, [-1])


def test_column_with_wrong_type(cfg):
    wrong = tables.EVENTS.set(tables.EVENTS.get_field_index("surface_idx"), pa.field("surface_idx", pa.int64()))
    history(cfg, schema=wrong)
    write_events(cfg, day(), wrong)
    res = check.check(cfg, "events", D)
    assert not res.success
    r = failed(res, "expect_column_types_to_match_schema", None)
    assert r.unexpected_count == 1 and r.examples == ["surface_idx: int64 (expected int32)"]
    # Expectations on that column are not run on data of the wrong type; they say why.
    skipped = [x for x in res.results if x.skipped and x.column == "surface_idx"]
    assert skipped and "wrong type" in skipped[0].note
    assert "expect_column_types_to_match_schema" in res.html_path.read_text()


def test_rejected_ratio_too_high(cfg):
    history(cfg)
    write_rejected(cfg, D, {"unknown_event_type": 15, "null_user_id": 5})  # 2 + 20 rejects of 122 raw rows
    write_events(cfg, day())
    res = check.check(cfg, "events", D)
    r = failed(res, "expect_column_values_to_be_between", "rejected_ratio")
    assert r.unexpected_count == 1 and r.examples == [pytest.approx(21 / 122)]
    assert [x.column for x in res.failed] == ["rejected_ratio"]
    assert res.facts["rejected_by_reason"] == {"duplicate": 1, "null_user_id": 5, "unknown_event_type": 16}


def test_duplicate_ratio_too_high(cfg):
    history(cfg)
    write_rejected(cfg, D, {"duplicate": 9})
    write_events(cfg, day())
    res = check.check(cfg, "events", D)
    r = failed(res, "expect_column_values_to_be_between", "duplicate_ratio")
    assert r.examples == [pytest.approx(10 / 111)]  # 10 duplicates, 1 other reject, 100 accepted
    assert [x.column for x in res.failed] == ["duplicate_ratio"]


@pytest.mark.parametrize("n", [10, 600])
def test_row_count_outside_band(cfg, n):
    history(cfg)
    write_events(cfg, day(n))
    res = check.check(cfg, "events", D)
    r = failed(res, "expect_column_values_to_be_between", "row_count")
    assert r.examples == [n]
    assert (r.kwargs["min_value"], r.kwargs["max_value"]) == (20, 500)  # [0.2, 5] x median 100


def test_row_count_uses_only_the_trailing_days(cfg):
    # An old huge partition outside the window must not move the median.
    write_events(cfg, [event(D - dt.timedelta(days=30), i) for i in range(2000)])
    history(cfg, days=cfg.quality.trailing_days)
    write_events(cfg, day())
    res = check.check(cfg, "events", D)
    assert res.success, check.summary(res)
    assert len(res.facts["trailing_partitions"]) == cfg.quality.trailing_days


def test_row_count_skipped_without_history(cfg):
    write_rejected(cfg, D, {})
    write_events(cfg, day())
    res = check.check(cfg, "events", D)
    assert res.success
    r = [x for x in res.results if x.column == "row_count"][0]
    assert r.skipped and "not enough history" in r.note


def test_missing_rejected_table_fails_the_ratios(cfg):
    write_events(cfg, day())
    res = check.check(cfg, "events", D)
    assert {r.column for r in res.failed} == {"duplicate_ratio", "rejected_ratio"}
    assert "does not exist" in res.failed[0].note


def test_missing_table_or_partition_fails_clearly(cfg):
    res = check.check(cfg, "events", D)
    assert not res.success and "table events does not exist" in res.error
    assert res.html_path.is_file() and "table events does not exist" in res.html_path.read_text()
    assert json.loads(res.json_path.read_text())["error"] == res.error
    history(cfg)
    res = check.check(cfg, "events", D)
    assert not res.success and f"no partition dt={D}" in res.error
    assert "FAILED" in check.summary(res) and f"no partition dt={D}" in check.summary(res)


def test_an_ingested_empty_drop_is_judged_by_the_day_level_checks(cfg, monkeypatch):
    """Ingest of an empty drop commits no partition; the check still knows the drop and the row-count band judges."""
    from deltalake import CommitProperties, write_deltalake

    write_events(cfg, [event(D - dt.timedelta(days=k), i) for k in range(1, 8) for i in range(100)])
    write_rejected(cfg, D, {})
    write_deltalake(
        str(cfg.table_path("events")),
        tables.EVENTS.empty_table(),
        mode="overwrite",
        predicate=f"dt = '{D}'",
        commit_properties=CommitProperties(custom_metadata={"step": "ingest", "dt": str(D)}),
    )
    res = check.check(cfg, "events", D)
    assert res.error is None and res.facts["rows"] == 0
    r = failed(res, "expect_column_values_to_be_between", "row_count")
    assert r.examples == [0] and len(res.failed) == 1
    # A site with quiet days accepts them by starting the band at 0.
    monkeypatch.setenv("USERFORMER__QUALITY__ROW_COUNT_BAND", "[0, 5]")
    res = check.check(load_config(), "events", D)
    assert res.success, check.summary(res)


# ----------------------------------------------------------- user_sequences
def seq(user: str, n: int, updated: dt.date = D, **over) -> dict:
    ts = [start(updated) - dt.timedelta(hours=n - k) for k in range(n)]
    row = {
        "user_id": user,
        "item_idx": list(range(1, n + 1)),
        "event_type_idx": [1] * n,
        "ts": ts,
        "category_l1_idx": [1] * n,
        "category_l2_idx": [2] * n,
        "category_l3_idx": [3] * n,
        "brand_idx": [1] * n,
        "surface_idx": [1] * n,
        "duration_s": [None] * n,
        "seq_len": n,
        "lifetime_events": n + 3,
        "lifetime_counts": [("view", n + 3)],
        "first_event_ts": ts[0] - dt.timedelta(days=3),
        "last_event_ts": ts[-1],
        "updated_dt": updated,
    }
    return {**row, **over}


def write_sequences(cfg, rows: list[dict]) -> None:
    delta.write_arrow(
        cfg.table_path("user_sequences"),
        pa.Table.from_pylist(rows, schema=tables.USER_SEQUENCES),
        tables.USER_SEQUENCES,
        mode="overwrite",
    )


def good_users() -> list[dict]:
    return [seq(f"u{i}", 1 + i % 5) for i in range(20)] + [
        seq(f"old{i}", 3, D - dt.timedelta(days=1)) for i in range(5)
    ]


def test_sequences_good_day_passes(cfg):
    write_sequences(cfg, good_users())
    res = check.check(cfg, "user_sequences", D)
    assert res.success, check.summary(res)
    assert res.facts == {"rows_updated": 20, "users": 25}
    cols = {r.column for r in res.results}
    assert {"arrays_match_seq_len", "ts_sorted", "last_event_ts_is_last_ts", "seq_len", "user_id"} <= cols
    assert (cfg.reports_root / "checks" / "user_sequences" / f"dt={D}.json").is_file()


def test_sequences_unequal_array_lengths(cfg):
    bad = seq("u_bad", 4)
    bad["brand_idx"] = [1, 1, 1]
    write_sequences(cfg, good_users() + [bad])
    res = check.check(cfg, "user_sequences", D)
    r = failed(res, "expect_column_values_to_be_in_set", "arrays_match_seq_len")
    assert (r.unexpected_count, r.element_count, r.examples) == (1, 21, ["u_bad"])
    assert [x.column for x in res.failed] == ["arrays_match_seq_len"]


def test_sequences_unsorted_ts(cfg):
    bad = seq("u_unsorted", 4)
    bad["ts"] = [bad["ts"][1], bad["ts"][0], *bad["ts"][2:]]  # last element unchanged
    write_sequences(cfg, good_users() + [bad, seq("u_null_ts", 2, ts=[None, start(D)], last_event_ts=start(D))])
    res = check.check(cfg, "user_sequences", D)
    r = failed(res, "expect_column_values_to_be_in_set", "ts_sorted")
    assert r.unexpected_count == 2 and sorted(r.examples) == ["u_null_ts", "u_unsorted"]
    assert [x.column for x in res.failed] == ["ts_sorted"]


def test_sequences_last_event_ts_and_lifetime(cfg):
    write_sequences(
        cfg,
        good_users()
        + [
            seq("u_last", 3, last_event_ts=start(D)),
            seq("u_life", 3, lifetime_events=2),
        ],
    )
    res = check.check(cfg, "user_sequences", D)
    assert failed(res, "expect_column_values_to_be_in_set", "last_event_ts_is_last_ts").examples == ["u_last"]
    r = failed(res, "expect_column_pair_values_a_to_be_greater_than_b", "lifetime_events, seq_len")
    assert r.unexpected_count == 1 and r.examples == [[2, 3]]


def test_sequences_seq_len_above_max_len(cfg):
    cfg.sequences.max_len = 5
    write_sequences(cfg, good_users() + [seq("u_long", 6)])
    res = check.check(cfg, "user_sequences", D)
    r = failed(res, "expect_column_values_to_be_between", "seq_len")
    assert (r.unexpected_count, r.examples, r.kwargs["max_value"]) == (1, [6], 5)


def test_sequences_duplicate_user_id_over_the_whole_table(cfg):
    # The second copy is not refreshed today: uniqueness is over the whole table, not just the day.
    write_sequences(cfg, good_users() + [seq("u3", 2, D - dt.timedelta(days=2))])
    res = check.check(cfg, "user_sequences", D)
    r = failed(res, "expect_column_values_to_be_unique", "user_id")
    assert (r.unexpected_count, r.element_count, r.examples) == (2, 26, ["u3", "u3"])


def test_sequences_missing_table_or_day(cfg):
    assert "table user_sequences does not exist" in check.check(cfg, "user_sequences", D).error
    write_sequences(cfg, [seq("u1", 2, D - dt.timedelta(days=1))])
    write_events(cfg, day(3))  # D had events, yet no user was refreshed: the step did not run
    res = check.check(cfg, "user_sequences", D)
    assert not res.success and f"no rows with updated_dt = {D}" in res.error


def test_sequences_of_an_empty_day_pass(cfg):
    """A drop without accepted events refreshes nobody: that is not a failure."""
    write_sequences(cfg, [seq("u1", 2, D - dt.timedelta(days=1))])
    write_events(cfg, [event(D - dt.timedelta(days=1), 0)])
    res = check.check(cfg, "user_sequences", D)
    assert res.success and res.error is None
    assert res.facts["rows_updated"] == 0 and "no user to refresh" in res.facts["note"]


# --------------------------------------------------------------------- CLI
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="userformer")
    check.register(p.add_subparsers(dest="command", required=True))
    return p


def test_run_prints_failures_and_returns_nonzero(cfg, capsys):
    history(cfg)
    write_events(cfg, day(r0={"event_type": "teleport"}))
    args = parser().parse_args(["check", "events", "--dt", str(D)])
    assert args.func(args, cfg) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "expect_column_values_to_be_in_set on event_type" in out
    assert "1 of 100" in out and "teleport" in out and f"dt={D}.html" in out


def test_run_returns_zero_on_success(cfg, capsys):
    history(cfg)
    write_events(cfg, day())
    args = parser().parse_args(["check", "events", "--dt", str(D)])
    assert args.func(args, cfg) == 0
    assert "passed" in capsys.readouterr().out


def test_parser_rejects_unknown_table_and_bad_date(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["check", "vocab", "--dt", str(D)])
    with pytest.raises(SystemExit):
        parser().parse_args(["check", "events", "--dt", "10/03/2024"])


def test_cli_executable_exits_nonzero_on_failure(cfg, home):
    history(cfg)
    write_events(cfg, day(r0={"event_type": "teleport"}))
    proc = subprocess.run(
        [str(EXE), "check", "events", "--dt", str(D)],
        capture_output=True,
        text=True,
        env={**os.environ, "USERFORMER_HOME": str(home)},
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "expect_column_values_to_be_in_set on event_type" in proc.stdout
    assert (cfg.reports_root / "checks" / "events" / f"dt={D}.html").is_file()


def test_expectation_ge_cannot_evaluate_fails_with_its_error():
    import pandas as pd
    from great_expectations import expectations as E

    from userformer.jobs.steps.quality.suites import Batch, Plan

    plan = Plan(
        "t",
        D,
        [
            Batch(
                "rows",
                pd.DataFrame({"a": [1, 2]}),
                [
                    E.ExpectColumnValuesToNotBeNull(column="a"),
                    E.ExpectColumnValuesToNotBeNull(column="nope"),
                ],
            )
        ],
    )
    ok, broken = check.evaluate(plan, 5)
    assert ok.success and (ok.unexpected_count, ok.element_count) == (0, 2)
    assert not broken.success and "nope" in broken.note


def test_frames_reach_ge_with_64_bit_numbers():
    """GE's pandas range check is vectorised only for int64/float64; narrower columns are widened, values kept."""
    import numpy as np
    import pandas as pd

    frame = pd.DataFrame(
        {
            "surface_idx": np.array([1, -1], dtype="int32"),
            "score": np.array([0.5, np.nan], dtype="float32"),
            "n": np.array([3, 4], dtype="int64"),
            "user_id": ["a", None],
            "maybe": pd.array([1, None], dtype="Int32"),  # pandas' nullable type: a cast to int64 would fail on NA
        }
    )
    wide = check._wide(frame)
    assert wide["maybe"].dtype == "Int32"
    assert dict(wide.drop(columns="maybe").dtypes.astype(str)) == {
        "surface_idx": "int64",
        "score": "float64",
        "n": "int64",
        "user_id": "object",
    }
    assert wide["surface_idx"].tolist() == [1, -1] and wide["score"].isna().tolist() == [False, True]
    assert check._wide(wide) is wide  # nothing to widen: the same frame, no copy
