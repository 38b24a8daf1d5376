"""Loaders of public datasets into the raw contract, on the real files in ../shared/data."""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import importlib.util
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from userformer.jobs.core.errors import UserError
from userformer.jobs.tools import loaders
from userformer.schemas import tables

UTC = dt.UTC
USERFORMER = Path(sys.executable).with_name("userformer")

FILES = {
    "taobao": "taobao_userbehavior_samples/head_sample_alibaba_xdl_mock.csv",
    "rees46": "rees46_2019oct_head/2019-Oct_head.csv",
    "trivago": "trivago_rs19_val100k/trivago_val_100k.parquet",
    "movielens": "ml-100k/ml-100k.inter",
    "s3rec": "s3rec_beauty/Beauty.txt",
}


@functools.lru_cache(maxsize=None)
def _load(fmt: str, path: str):
    return loaders.LOADERS[fmt](Path(path))


@pytest.fixture
def load(shared_data):
    """load(fmt) -> (events, items, stats) of that format's file; each file is read once per run."""
    return lambda fmt, rel=None: _load(fmt, str(shared_data / (rel or FILES[fmt])))


def types(events) -> Counter:
    return Counter(events["event_type"].to_pylist())


def ts_range(events):
    return pc.min(events["ts"]).as_py(), pc.max(events["ts"]).as_py()


def utc(*a):
    return dt.datetime(*a, tzinfo=UTC)


# ------------------------------------------------------------ every format
def test_registry_lists_the_five_formats():
    assert set(loaders.LOADERS) == {"taobao", "rees46", "trivago", "movielens", "s3rec"}


@pytest.mark.parametrize("fmt", sorted(FILES))
def test_tables_have_exactly_the_raw_schemas(load, fmt):
    events, items, stats = load(fmt)
    assert events.schema.equals(tables.RAW_EVENTS, check_metadata=True)
    assert items.schema.equals(tables.RAW_ITEMS, check_metadata=True)
    assert len(events) == stats["events"] > 0
    assert pc.count_distinct(items["item_id"]).as_py() == len(items) == stats["catalogue_items"]
    for name in tables.RAW_EVENTS_REQUIRED:
        assert events[name].null_count == 0


@pytest.mark.parametrize("fmt", sorted(FILES))
def test_missing_input_is_a_user_error(tmp_path, fmt):
    with pytest.raises(UserError, match="not found"):
        loaders.LOADERS[fmt](tmp_path / "nope.csv")


# ------------------------------------------------------------------ taobao
def test_taobao_maps_behaviours_and_passes_the_bad_timestamp_through(load):
    events, items, stats = load("taobao")
    assert len(events) == 10_000 and stats["rows_skipped"] == 0
    # Counts of pv/cart/fav/buy in the file.
    assert types(events) == {"view": 8986, "cart": 537, "favourite": 298, "purchase": 179}
    # The one row dated 2017-09-11 is kept, for ingest to quarantine.
    assert stats["outside_window"] == 1
    lo, hi = ts_range(events)
    assert lo == utc(2017, 9, 11, 8, 16, 39)
    assert hi < utc(2017, 12, 4)
    in_window = pc.sum(
        pc.cast(pc.greater_equal(events["ts"], pa.scalar(utc(2017, 11, 24), tables.TS)), "int64")
    ).as_py()
    assert in_window == len(events) - 1
    assert items["category_l1"].null_count == 0
    assert items["category_l2"].null_count == items["category_l3"].null_count == len(items)
    row = items.filter(pc.equal(items["item_id"], "2268318")).to_pylist()
    assert row[0]["category_l1"] == "2520377"


def test_taobao_head_and_tail_cover_the_documented_users(load):
    users = set()
    for rel in (FILES["taobao"], "taobao_userbehavior_samples/tail_sample_betashepherd.csv"):
        users |= set(load("taobao", rel)[0]["user_id"].to_pylist())
    assert len(users) == 206


def test_taobao_survives_broken_rows(tmp_path):
    p = tmp_path / "ub.csv"
    p.write_text(
        "1,10,100,pv,1511544070\n"
        "1,11,100,buy,99999999999\n"  # year 5138: kept for ingest (future_ts)
        "2,12,101,click,1511544071\n"  # unknown behaviour: kept for ingest
        "3,13,102,pv,notatime\n"  # unparseable: skipped
        "4,14,103,pv\n"  # too few fields: skipped
        ",15,104,pv,1511544072\n"  # no user: skipped
        "99999999999999999999,16,105,pv,1511544073\n"
    )
    events, items, stats = loaders.LOADERS["taobao"](p)
    assert len(events) == 4
    assert stats["skipped"] == {
        "malformed CSV row": 1,
        "user_id missing or unparseable": 1,
        "ts missing or unparseable": 1,
    }
    assert stats["unmapped_event_types"] == {"click": 1}
    assert stats["outside_window"] == 1
    assert set(events["event_type"].to_pylist()) == {"view", "purchase", "click"}


# ------------------------------------------------------------------ rees46
def test_rees46_skips_the_truncated_last_row(load):
    events, items, stats = load("rees46")
    assert stats["rows_read"] == 17_435
    assert stats["skipped"] == {"malformed CSV row": 1}
    assert len(events) == 17_434
    # The truncated row's user id is cut short (52040330...): it must not appear.
    assert "52040330" not in set(events["user_id"].to_pylist())
    assert stats["users"] == 4_504 and stats["items"] == 6_493
    assert types(events) == {"view": 17_055, "purchase": 214, "cart": 165}
    assert ts_range(events) == (utc(2019, 10, 1), utc(2019, 10, 1, 2, 50))


def test_rees46_values_and_item_attributes(load):
    events, items, _ = load("rees46")
    purchases = events.filter(pc.equal(events["event_type"], "purchase"))
    assert purchases["value"].null_count == 0 and pc.min(purchases["value"]).as_py() > 0
    assert events.filter(pc.equal(events["event_type"], "view"))["value"].null_count == 17_055
    by_id = {r["item_id"]: r for r in items.to_pylist()}
    assert by_id["3900821"] == {
        "item_id": "3900821",
        "category_l1": "appliances",
        "category_l2": "environment",
        "category_l3": "water_heater",
        "brand": "aqua",
        "title": None,
        "price": 33.2,
    }
    # No category_code: the numeric category_id is the only level.
    assert (by_id["44600062"]["category_l1"], by_id["44600062"]["category_l2"]) == ("2103807459595387724", None)
    assert by_id["44600062"]["brand"] == "shiseido"
    assert items["category_l1"].null_count == 0


def test_rees46_odd_rows(tmp_path):
    p = tmp_path / "rees.csv"
    p.write_text(
        "\ufeffevent_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n"
        "2019-10-01 00:00:01 UTC,purchase,1,7,a.b.c.d,,1.5,u1,s\n"
        "yesterday,view,2,8,,br,2.0,u2,s\n"  # unparseable time: skipped
        "2019-10-01 00:00:02 UTC,view,3,9,x,br,abc,,s\n"  # no user: skipped
        "2019-10-01 00:00:03 UTC,view,3,9,x,br,abc,u3,s\n"  # bad price: price null
    )
    events, items, stats = loaders.LOADERS["rees46"](p)
    assert events["user_id"].to_pylist() == ["u1", "u3"]
    assert stats["skipped"] == {"ts missing or unparseable": 1, "user_id missing or unparseable": 1}
    assert events["value"].to_pylist() == [1.5, None]
    by_id = {r["item_id"]: r for r in items.to_pylist()}
    assert [by_id["1"][k] for k in ("category_l1", "category_l2", "category_l3", "brand")] == ["a", "b", "c.d", None]
    assert [by_id["3"][k] for k in ("category_l1", "category_l2", "price")] == ["x", None, None]


# ----------------------------------------------------------------- trivago
def test_trivago_maps_actions(load):
    events, items, stats = load("trivago")
    assert len(events) == 100_003 and stats["users"] == 6_593
    assert types(events) == {
        "view": 68_538 + 1_829 + 1_445 + 1_159 + 1_044,
        "click": 13_597,
        "filter": 5_303 + 2_948,
        "search": 3_060 + 1_080,
    }
    non_item = events.filter(pc.is_in(events["event_type"], pa.array(["search", "filter"])))
    assert non_item["item_id"].null_count == len(non_item)
    assert non_item["query"].null_count == 0
    item_ev = events.filter(pc.is_in(events["event_type"], pa.array(["view", "click"])))
    assert item_ev["query"].null_count == len(item_ev)
    # Only the four "unknown" hotel references lack an item id (ingest rejects them).
    assert item_ev["item_id"].null_count == stats["unknown_item_refs"] == 4
    surfaces = Counter(events["surface"].to_pylist())
    assert set(surfaces) == {"desktop", "mobile", "tablet", "search"} and surfaces["search"] == 1_044
    assert pc.count_distinct(events["event_id"]).as_py() == len(events)
    assert ts_range(events)[0] >= utc(2018, 11, 7) and ts_range(events)[1] < utc(2018, 11, 9)
    assert len(items) == 13_949
    for c in ("category_l1", "brand", "title", "price"):
        assert items[c].null_count == len(items)


def test_trivago_first_rows(load):
    events, _, _ = load("trivago")
    first = events.slice(0, 3).to_pylist()
    assert [(r["event_type"], r["item_id"], r["surface"]) for r in first] == [
        ("view", "5967314", "tablet"),
        ("view", "5967314", "tablet"),
        ("click", "5967314", "tablet"),
    ]
    assert first[0]["event_id"] == "82cafdca18b3c:1:1541599523"


# --------------------------------------------------------------- movielens
def test_movielens_events(load):
    events, items, stats = load("movielens")
    assert (len(events), stats["users"], stats["items"]) == (100_000, 943, 1_682)
    assert types(events) == {"rate": 100_000}
    assert pc.min(events["value"]).as_py() == 1 and pc.max(events["value"]).as_py() == 5
    lo, hi = ts_range(events)
    assert utc(1997, 9, 1) <= lo and hi < utc(1998, 5, 1)


def test_movielens_items(load, shared_data):
    _, items, _ = load("movielens")
    assert len(items) == 1_682
    by_id = {r["item_id"]: r for r in items.to_pylist()}
    assert by_id["1"] == {
        "item_id": "1",
        "category_l1": "Animation",
        "category_l2": "1990s",
        "category_l3": None,
        "brand": None,
        "title": "Toy Story",
        "price": None,
    }
    # Its year column reads "V"; the decade comes from the title's "(1995)".
    assert by_id["1412"]["category_l2"] == "1990s"
    assert items["category_l1"].null_count == 0 and items["title"].null_count == 0
    assert items["category_l2"].null_count == 1  # item 267: title, year and genre all "unknown"
    assert items["brand"].null_count == len(items)
    # An explicit --items gives the same; a missing explicit one is an error.
    inter = shared_data / FILES["movielens"]
    assert loaders.LOADERS["movielens"](inter, inter.with_suffix(".item"))[1].equals(items)
    with pytest.raises(UserError, match="item file not found"):
        loaders.LOADERS["movielens"](inter, inter.with_name("nope.item"))


def test_trivago_accepts_the_challenge_csv(tmp_path):
    p = tmp_path / "train.csv"
    p.write_text(
        "user_id,session_id,timestamp,step,action_type,reference,platform,city,device,"
        "current_filters,impressions,prices\n"
        'u,s,1541548939,1,search for poi,Eiffel Tower,FR,"Paris, France",mobile,,,\n'
        'u,s,1541548940,2,clickout item,42,FR,"Paris, France",mobile,,42|43,10|20\n'
        "u,s,1541548941,3,new action,42,FR,Paris,mobile,,,\n"
    )
    events, items, stats = loaders.LOADERS["trivago"](p)
    assert [(r["event_type"], r["item_id"], r["query"]) for r in events.to_pylist()] == [
        ("search", None, "Eiffel Tower"),
        ("click", "42", None),
        ("new action", None, None),
    ]
    assert stats["unmapped_event_types"] == {"new action": 1}
    assert items["item_id"].to_pylist() == ["42"]


# ------------------------------------------------------------------- s3rec
def test_s3rec_events_keep_the_order(load, shared_data):
    events, items, stats = load("s3rec")
    assert (len(events), stats["users"], stats["items"]) == (198_502, 22_363, 12_101)
    assert types(events) == {"purchase": 198_502}
    base = utc(2020, 1, 1)
    got: dict[str, list] = {}
    for u, ts, i in zip(events["user_id"].to_pylist(), events["ts"].to_pylist(), events["item_id"].to_pylist()):
        got.setdefault(u, []).append((ts, i))
    for line in (shared_data / FILES["s3rec"]).read_text().splitlines():
        user, *seq = line.split()
        evs = sorted(got[user])
        assert [i for _, i in evs] == seq
        assert [t for t, _ in evs] == [base + dt.timedelta(hours=k) for k in range(len(seq))]


def test_s3rec_item_attributes(load):
    _, items, stats = load("s3rec")
    assert len(items) == 12_101 and stats["top_level_categories"] == 6
    by_id = {r["item_id"]: r for r in items.to_pylist()}
    # "165": [7, 8, 9, 10] -> brand 7, path 8 > 9 > 10; "4": [1, 2, 3] has no brand.
    assert [by_id["165"][k] for k in ("brand", "category_l1", "category_l2", "category_l3")] == ["7", "8", "9", "10"]
    assert [by_id["4"][k] for k in ("brand", "category_l1", "category_l2", "category_l3")] == [None, "1", "2", "3"]
    # "7354": [52, 17, 2, 39, 184, 522]: levels below the third stay in category_l3.
    assert by_id["7354"]["category_l3"] == "39.184.522"
    assert items["category_l1"].null_count == 0
    assert set(items["category_l1"].to_pylist()) == {"1", "4", "8", "15", "17", "64"}
    assert 7_000 < len(items) - items["brand"].null_count < 8_000


def test_s3rec_attribute_split_rules():
    from userformer.jobs.tools.loaders import s3rec

    tops = {1, 4}
    assert s3rec.split_attributes([9, 4, 5, 6], tops) == (9, [4, 5, 6])
    assert s3rec.split_attributes([4, 5], tops) == (None, [4, 5])
    assert s3rec.split_attributes([1, 1, 2, 3], tops) == (None, [1, 2, 3])  # repeated top: longest path
    assert s3rec.split_attributes([4, 5, 5], tops) == (None, [4, 5])
    assert s3rec.split_attributes([], tops) == (None, [])
    assert s3rec.attribute_roles({"a": [9, 4, 5], "b": [4, 6], "c": [8, 1, 2]}) == ({9, 8}, {4, 1})


def test_items_table_keeps_the_last_row_of_an_item():
    from userformer.jobs.tools.loaders import _base

    t = _base.items_table({"item_id": pa.array(["a", "b", "a", None]), "brand": pa.array(["x1", "y", "x2", "z"])})
    assert t.schema.equals(tables.RAW_ITEMS, check_metadata=True)
    assert [(r["item_id"], r["brand"]) for r in t.to_pylist()] == [("a", "x2"), ("b", "y")]


# --------------------------------------------------------------- write_raw
def _dt_dirs(root: Path, kind: str = "events") -> list[str]:
    return sorted(p.name for p in (root / kind).iterdir())


def test_write_raw_one_folder_per_utc_day(load, tmp_path):
    events, items, _ = load("trivago")
    days = loaders.write_raw(events, items, tmp_path, fmt="trivago")
    assert days == [dt.date(2018, 11, 7), dt.date(2018, 11, 8)]
    assert _dt_dirs(tmp_path) == ["dt=2018-11-07", "dt=2018-11-08"]
    assert _dt_dirs(tmp_path, "items") == ["dt=2018-11-07"]
    assert [p.name for p in (tmp_path / "items" / "dt=2018-11-07").iterdir()] == ["items.parquet"]
    total = 0
    for d in days:
        f = tmp_path / "events" / f"dt={d}" / "part-trivago.parquet"
        t = pq.read_table(f)
        assert t.schema.equals(tables.RAW_EVENTS, check_metadata=True)
        assert set(pc.cast(t["ts"], pa.date32()).to_pylist()) == {d}
        total += len(t)
    assert total == len(events)
    assert pq.read_table(tmp_path / "items" / "dt=2018-11-07" / "items.parquet").equals(items)


def test_write_raw_window_sends_outliers_to_the_first_drop(load, tmp_path):
    events, items, stats = load("taobao")
    days = loaders.write_raw(events, items, tmp_path / "w", fmt="taobao", window=stats["window"])
    assert days == [dt.date(2017, 11, 24) + dt.timedelta(days=i) for i in range(10)]
    first = pq.read_table(tmp_path / "w" / "events" / "dt=2017-11-24" / "part-taobao.parquet")
    assert pc.min(first["ts"]).as_py() == utc(2017, 9, 11, 8, 16, 39)
    # Without the window the outlier opens a drop of its own.
    assert loaders.write_raw(events, items, tmp_path / "n", fmt="taobao")[0] == dt.date(2017, 9, 11)


def test_write_raw_s3rec_synthetic_days(load, tmp_path):
    events, items, _ = load("s3rec")
    days = loaders.write_raw(events, items, tmp_path, fmt="s3rec")
    assert days[0] == dt.date(2020, 1, 1) and len(days) == len(_dt_dirs(tmp_path))
    assert (
        sum(pq.ParquetFile(tmp_path / "events" / f"dt={d}" / "part-s3rec.parquet").metadata.num_rows for d in days)
        == 198_502
    )


# --------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="userformer")
    loaders.register(p.add_subparsers(dest="command", required=True))
    return p


def test_register_adds_load_with_help_on_every_option(capsys):
    sub = _parser()._subparsers._group_actions[0].choices["load"]
    for action in sub._actions:
        assert action.help, action.dest
    with pytest.raises(SystemExit):
        _parser().parse_args(["load", "--help"])
    out = capsys.readouterr().out
    for word in ("--input", "--items", "--out", *loaders.LOADERS):
        assert word in out
    with pytest.raises(SystemExit):
        _parser().parse_args(["load", "nosuchformat", "--input", "x"])


def test_run_writes_to_the_configured_raw_root(cfg, shared_data, capsys):
    args = _parser().parse_args(["load", "rees46", "--input", str(shared_data / FILES["rees46"])])
    assert args.func(args, cfg) == 0
    out = capsys.readouterr().out
    assert "events 17,434" in out and "rows skipped 1" in out and "days written 1" in out
    assert (cfg.raw_root / "events" / "dt=2019-10-01" / "part-rees46.parquet").is_file()
    assert (cfg.raw_root / "items" / "dt=2019-10-01" / "items.parquet").is_file()


def test_run_missing_input_and_stray_items(cfg, tmp_path, shared_data):
    args = _parser().parse_args(["load", "taobao", "--input", str(tmp_path / "missing.csv")])
    with pytest.raises(UserError, match="missing.csv"):
        args.func(args, cfg)
    args = _parser().parse_args(["load", "taobao", "--input", str(shared_data / FILES["taobao"]), "--items", "x"])
    with pytest.raises(UserError, match="--items"):
        args.func(args, cfg)


def _cli_ready() -> str | None:
    """Why the real CLI cannot start yet (a step module of cli.py not written yet), or None."""
    from userformer.jobs import cli

    missing = [m for m in cli.STEP_MODULES if importlib.util.find_spec(m) is None]
    return f"cli.py imports step modules that do not exist yet: {missing}" if missing else None


@pytest.fixture
def cli_env(home):
    if reason := _cli_ready():
        pytest.skip(reason)
    return {**os.environ, "USERFORMER_HOME": str(home)}


def test_cli_load_help(cli_env):
    r = subprocess.run([str(USERFORMER), "load", "--help"], env=cli_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--input" in r.stdout and "s3rec" in r.stdout


def test_cli_load_real_file(cli_env, home, shared_data, tmp_path):
    out = tmp_path / "raw"
    r = subprocess.run(
        [str(USERFORMER), "load", "movielens", "--input", str(shared_data / FILES["movielens"]), "--out", str(out)],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "events 100,000" in r.stdout and "users 943" in r.stdout
    assert len(_dt_dirs(out)) == 213
    assert (out / "items" / "dt=1997-09-20" / "items.parquet").is_file()
    r = subprocess.run(
        [str(USERFORMER), "load", "movielens", "--input", str(tmp_path / "none.inter")],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "not found" in r.stderr
