"""The synthetic log generator: layout, schema, determinism, and the troubles it must contain."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from userformer.jobs.core.config import load_config
from userformer.jobs.core.errors import UserError
from userformer.jobs.tools import generate
from userformer.schemas.tables import RAW_EVENTS, RAW_ITEMS

START = dt.date(2026, 3, 1)
DAYS = 4
USERFORMER = Path(sys.executable).parent / "userformer"
# Rates well above the defaults so that a small run has enough of each trouble to measure.
RATES = dict(malformed_rate=0.02, late_rate=0.05, duplicate_rate=0.03)


def _cfg(home: Path):
    return load_config(env={"USERFORMER_HOME": str(home)})


def _read_events(root: Path) -> pd.DataFrame:
    parts = []
    for p in sorted((root / "events").glob("dt=*/part-00000.parquet")):
        df = pq.read_table(p).to_pandas()
        df["dt"] = pd.Timestamp(p.parent.name[3:], tz="UTC")
        parts.append(df)
    return pd.concat(parts, ignore_index=True)


def _defects(df: pd.DataFrame, cfg) -> pd.DataFrame:
    """One boolean column per malformed kind, as ingest would judge the row."""
    return pd.DataFrame(
        {
            "null_user": df["user_id"].isna(),
            "unknown_type": ~df["event_type"].isin(cfg.ingest.event_types),
            "future_ts": df["ts"] > df["dt"] + pd.Timedelta(days=1, seconds=cfg.ingest.future_tolerance_s),
            "missing_item": df["event_type"].isin(cfg.ingest.item_event_types) & df["item_id"].isna(),
            "negative_duration": df["duration_s"] < 0,
        }
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One small run with high trouble rates: (cfg, summary, all rows with their dt, defects per row, good rows)."""
    home = tmp_path_factory.mktemp("gen")
    cfg = _cfg(home)
    summary = generate.generate(cfg, users=600, items=500, days=DAYS, start=START, seed=11, **RATES)
    df = _read_events(cfg.raw_root)
    bad = _defects(df, cfg)
    return cfg, summary, df, bad, df[~bad.any(axis=1)]


def test_layout_and_schemas(world):
    cfg, summary, df, _, _ = world
    days = [str(START + dt.timedelta(days=i)) for i in range(DAYS)]
    assert sorted(p.name for p in (cfg.raw_root / "events").iterdir()) == [f"dt={d}" for d in days]
    assert sorted(p.name for p in (cfg.raw_root / "items").iterdir()) == [f"dt={d}" for d in days]
    for d in days:
        ev = pq.read_table(cfg.raw_events_dir(d) / "part-00000.parquet")
        assert ev.schema.equals(RAW_EVENTS, check_metadata=True)
        assert ev.num_rows == summary["events_per_day"][d] > 0
        it = pq.read_table(cfg.raw_items_dir(d) / "items.parquet")
        assert it.schema.equals(RAW_ITEMS, check_metadata=True)
        assert it.num_rows == summary["items_per_day"][d] > 0
    assert len(df) == summary["events_total"] == summary["generated"] + summary["duplicates"] + summary["malformed"]


def test_same_seed_same_files_other_seed_differs(tmp_path):
    cfg = _cfg(tmp_path)
    kw = dict(users=150, items=120, days=3, start=START)
    runs = {name: tmp_path / name for name in ("a", "b", "c")}
    s_a = generate.generate(cfg, seed=5, out=runs["a"], **kw)
    s_b = generate.generate(cfg, seed=5, out=runs["b"], **kw)
    generate.generate(cfg, seed=6, out=runs["c"], **kw)
    assert {k: v for k, v in s_a.items() if k != "out"} == {k: v for k, v in s_b.items() if k != "out"}
    files = sorted(p.relative_to(runs["a"]) for p in runs["a"].rglob("*.parquet"))
    assert len(files) == 6 and files == sorted(p.relative_to(runs["b"]) for p in runs["b"].rglob("*.parquet"))
    for f in files:
        assert pq.read_table(runs["a"] / f).equals(pq.read_table(runs["b"] / f), check_metadata=True), f
    assert not all(pq.read_table(runs["a"] / f).equals(pq.read_table(runs["c"] / f)) for f in files)
    assert not tuple(runs["a"].rglob(".*"))  # no temporary files left behind


def test_good_rows_follow_the_contract(world):
    cfg, _, _, _, good = world
    ic = cfg.ingest
    assert set(good["event_type"]) == set(generate.EVENT_TYPES)
    assert set(generate.EVENT_TYPES) <= set(ic.event_types)
    items = good["event_type"].isin(ic.item_event_types)
    assert good.loc[items, "item_id"].notna().all()
    assert good.loc[~items, "item_id"].isna().all()
    assert good["user_id"].str.fullmatch(r"u\d{7}").all()
    assert good.loc[items, "item_id"].str.fullmatch(r"i\d{7}").all()
    assert good["event_id"].str.fullmatch(r"e11-\d{8}-\d+").all()
    # Columns filled where they mean something, only there.
    search = good["event_type"] == "search"
    assert good.loc[search, "query"].notna().all() and good.loc[~search, "query"].isna().all()
    assert set(good.loc[search, "query"]) <= set(generate.L1_NAMES + generate.L2_NAMES + generate.L3_NAMES)
    view = good["event_type"] == "view"
    assert (good.loc[view, "duration_s"] > 0).all() and good.loc[~view, "duration_s"].isna().all()
    assert (good.loc[view, "duration_s"] <= ic.max_duration_s).all()
    buy = good["event_type"] == "purchase"
    assert (good.loc[buy, "value"] > 0).all() and good.loc[~buy, "value"].isna().all()
    assert {"home", "search", "pdp", "recs"} <= set(good.loc[view, "surface"])
    # Time: within the window, microsecond precision, never after the drop that delivers it.
    assert good["ts"].min() >= pd.Timestamp(START, tz="UTC")
    assert (good["ts"] < good["dt"] + pd.Timedelta(days=1)).all()
    assert (good["ts"].astype("int64") % 1000 != 0).mean() > 0.9


def test_late_events_within_seven_days(world):
    _, summary, _, _, good = world
    lateness = (good["dt"] - good["ts"].dt.floor("D")).dt.days
    assert lateness.min() >= 0 and lateness.max() <= 7
    # Late: even the first delivery came after the event's day (a duplicate's second copy does not count).
    first = good.assign(lateness=lateness).groupby("event_id")["lateness"].min()
    late = first[first > 0]
    assert len(late) == summary["late"] > 0
    assert (lateness[lateness > 0] == 1).mean() > 0.6  # mostly the next drop
    # Rate among events that had a later drop to go to (the last day's cannot be late).
    last = pd.Timestamp(START + dt.timedelta(days=DAYS - 1), tz="UTC")
    could = good[good["ts"] < last].drop_duplicates("event_id")
    assert len(late) / len(could) == pytest.approx(RATES["late_rate"], rel=0.3)


def test_duplicates_share_event_id(world):
    _, summary, _, _, good = world
    copies = good.groupby("event_id").size()
    assert set(copies.unique()) <= {1, 2, 3}
    extra = int((copies - 1).sum())
    assert extra == summary["duplicates"]
    assert extra / copies.size == pytest.approx(RATES["duplicate_rate"], rel=0.3)
    dup = good[good["event_id"].isin(copies[copies > 1].index)]
    content = [c for c in RAW_EVENTS.names if c not in ("duration_s", "value", "query")]
    assert dup.groupby("event_id")[content].nunique(dropna=False).max().max() == 1  # same event, twice
    drops = dup.groupby("event_id")["dt"].nunique()
    assert (drops == 1).mean() > 0.6 and (drops > 1).any()  # mostly the same drop, some the next


def test_malformed_rows_of_every_kind(world):
    cfg, summary, df, bad, _ = world
    assert (bad.sum(axis=1) <= 1).all()  # one defect per row
    assert (bad.sum(axis=0) > 0).all(), bad.sum(axis=0)  # every kind occurs
    n_bad = int(bad.any(axis=1).sum())
    assert n_bad == summary["malformed"]
    assert n_bad / len(df) == pytest.approx(RATES["malformed_rate"], rel=0.3)
    assert set(df.loc[bad["unknown_type"], "event_type"]) <= set(generate.BAD_TYPES)
    future = df.loc[bad["future_ts"]]
    assert ((future["ts"] - future["dt"]).dt.days >= 2).all()
    assert df.loc[bad.any(axis=1), "event_id"].is_unique  # extra rows, not redeliveries


def test_purchases_follow_a_cart_of_the_same_item(world):
    _, _, _, _, good = world
    ev = good.drop_duplicates("event_id")
    buys = ev[ev["event_type"] == "purchase"]
    carts = ev[ev["event_type"] == "cart"][["user_id", "item_id", "ts"]]
    assert len(buys) > 20
    m = buys.reset_index().merge(carts, on=["user_id", "item_id"], suffixes=("", "_cart"))
    preceded = m[m["ts_cart"] < m["ts"]].groupby("index").size()
    assert len(preceded) == len(buys)
    assert 0.1 < len(buys) / len(carts) < 0.7


def test_new_users_start_with_signup(world):
    _, summary, _, _, good = world
    ev = good.drop_duplicates("event_id").sort_values(["ts", "event_id"])
    signups = ev[ev["event_type"] == "signup"]
    # Every user who arrives in the window (ids ascend with arrival) signs up once, in their first event.
    assert signups["user_id"].is_unique and len(signups) == summary["users_new"] > 0
    n_old = summary["users"] - summary["users_new"]
    assert set(signups["user_id"]) == {u for u in ev["user_id"].unique() if int(u[1:]) >= n_old}
    first = ev.groupby("user_id")["event_type"].first()
    assert (first[signups["user_id"]] == "signup").all()
    # The users who existed before the window show up on every day.
    old = ev[ev["user_id"].str[1:].astype(int) < n_old]
    assert old.groupby(old["ts"].dt.date)["user_id"].nunique().gt(0.2 * n_old).all()


def test_popularity_is_skewed(tmp_path):
    cfg = _cfg(tmp_path)
    generate.generate(cfg, users=800, items=1000, days=2, start=START, seed=3)
    ev = _read_events(cfg.raw_root)
    counts = ev.loc[ev["event_type"].isin(cfg.ingest.item_event_types), "item_id"].value_counts()
    top = counts.iloc[:10].sum() / counts.sum()  # top 1% of the catalogue
    assert top > 0.15, top


def test_catalogue_grows_and_changes(world):
    cfg, summary, _, _, good = world
    snaps = {
        i: pq.read_table(cfg.raw_items_dir(START + dt.timedelta(days=i)) / "items.parquet").to_pandas()
        for i in range(DAYS)
    }
    assert len(snaps[0]) == 500 - summary["items_launched_later"]
    seen = set(snaps[0]["item_id"])
    launched = {}
    for i in range(1, DAYS):
        new = set(snaps[i]["item_id"]) - seen
        assert new, f"no item launched on day {i}"
        launched.update(dict.fromkeys(new, START + dt.timedelta(days=i)))
        seen |= new
    assert len(seen) == 500
    # Items are used in events only from their launch day on.
    used = good[good["item_id"].isin(launched)].groupby("item_id")["ts"].min().dt.date
    assert used.size and all(used[i] >= launched[i] for i in used.index)
    # Later snapshots also carry price changes of existing items.
    day1 = snaps[0].set_index("item_id")["price"]
    again = snaps[1][snaps[1]["item_id"].isin(day1.index)].set_index("item_id")["price"]
    assert len(again) and (again != day1[again.index]).any()
    # The category tree: three named levels, consistent paths; brands ~ items / 20.
    cat = pd.concat(snaps.values())
    assert cat[["category_l1", "category_l2", "category_l3", "brand", "title", "price"]].notna().all().all()
    assert cat.groupby("category_l2")["category_l1"].nunique().max() == 1
    assert set(cat["category_l1"]) <= set(generate.L1_NAMES) and cat["category_l1"].nunique() >= 6
    assert 10 <= cat["brand"].nunique() <= 25
    assert (cat["price"] > 0).all()


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(users=0), "--users"),
        (dict(items=-1), "--items"),
        (dict(days=0), "--days"),
        (dict(seed=-1), "--seed"),
        (dict(late_rate=1.5), "--late-rate"),
        (dict(duplicate_rate=-0.1), "--duplicate-rate"),
        (dict(malformed_rate=2.0), "--malformed-rate"),
        (dict(active_frac=0.0), "--active-frac"),
        (dict(events_per_active_user=0.0), "--events-per-user"),
    ],
)
def test_rejects_bad_arguments(cfg, bad, message):
    args = dict(users=10, items=10, days=1, start=START, seed=1) | bad
    with pytest.raises(UserError, match=message):
        generate.generate(cfg, **args)
    assert not cfg.raw_root.exists()


def test_unknown_config_types_are_refused(cfg):
    cfg.ingest.non_item_event_types = ["search", "signup"]  # no login
    with pytest.raises(UserError, match="login"):
        generate.generate(cfg, users=10, items=10, days=1, start=START, seed=1)


def test_register_and_run_in_process(cfg, capsys):
    parser = argparse.ArgumentParser(prog="userformer")
    generate.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "generate",
            "--users",
            "40",
            "--items",
            "30",
            "--days",
            "2",
            "--start",
            "2026-03-01",
            "--seed",
            "2",
            "--late-rate",
            "0.1",
        ]
    )
    assert args.func(args, cfg) == 0
    assert "wrote" in capsys.readouterr().out
    assert (cfg.raw_events_dir(dt.date(2026, 3, 2)) / "part-00000.parquet").is_file()
    with pytest.raises(SystemExit):
        parser.parse_args(
            ["generate", "--users", "4", "--items", "3", "--days", "2", "--start", "March", "--seed", "1"]
        )


def _cli(*argv, home: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("USERFORMER")}
    env["USERFORMER_HOME"] = str(home)
    return subprocess.run([str(USERFORMER), *argv], capture_output=True, text=True, env=env, timeout=120)


def test_cli_help(tmp_path):
    r = _cli("generate", "--help", home=tmp_path)
    assert r.returncode == 0, r.stderr
    for opt in (
        "--users",
        "--items",
        "--days",
        "--start",
        "--seed",
        "--out",
        "--malformed-rate",
        "--late-rate",
        "--duplicate-rate",
        "--active-frac",
        "--events-per-user",
    ):
        assert opt in r.stdout


def test_cli_generate(tmp_path):
    out = tmp_path / "drops"
    r = _cli(
        "generate",
        "--users",
        "60",
        "--items",
        "50",
        "--days",
        "2",
        "--start",
        "2026-03-01",
        "--seed",
        "4",
        "--out",
        str(out),
        home=tmp_path / "home",
    )
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    assert pq.read_table(out / "events" / "dt=2026-03-02" / "part-00000.parquet").schema.equals(RAW_EVENTS)
    assert not (tmp_path / "home").exists()  # --out, not the config's raw_root
    r = _cli(
        "generate",
        "--users",
        "6",
        "--items",
        "5",
        "--days",
        "2",
        "--start",
        "2026-03-01",
        "--seed",
        "4",
        "--late-rate",
        "2",
        home=tmp_path / "home",
    )
    assert r.returncode == 2 and "--late-rate" in r.stderr and "Traceback" not in r.stderr
