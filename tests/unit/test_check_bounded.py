"""The gates in bounded memory (jobs/steps/quality/streams.py): with `quality.batch_rows` and `quality.ids_per_pass`
small, what a gate finds is what it finds in one frame of all rows (counts, examples), a defect whose rows sit in
different batches included, and no frame handed to Great Expectations, nor any batch read, is larger than the bound.
"""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

from tests.unit.test_check import D, day, event, failed, good_users, history, loose, seq, start, write_events
from userformer.jobs.core.storage import delta
from userformer.jobs.steps import check, infer
from userformer.jobs.steps.quality import source, streams
from userformer.schemas import tables

BATCH = 7


def small(cfg, ids: int = BATCH):
    cfg.quality.batch_rows, cfg.quality.ids_per_pass = BATCH, ids
    return cfg


def results(res: check.CheckResult) -> list[tuple]:
    """Everything a report says of each expectation, in a form two runs can be compared by."""
    assert res.error is None, res.error
    return sorted(
        (
            r.scope,
            r.expectation,
            json.dumps(r.kwargs, sort_keys=True, default=str),
            r.success,
            r.unexpected_count,
            r.element_count,
            None if r.unexpected_percent is None else round(r.unexpected_percent, 9),
            json.dumps(r.examples, default=str),
            r.skipped,
            r.note,
        )
        for r in res.results
    )


@pytest.fixture
def measured(monkeypatch):
    """The largest table a source's `scan` yields and every frame size GE is handed, per scope."""
    seen = {"scan": 0, "frames": {}}

    def wrap(cls):
        scan = cls.scan

        def recording(self, *a, **k):
            for t in scan(self, *a, **k):
                seen["scan"] = max(seen["scan"], t.num_rows)
                yield t

        monkeypatch.setattr(cls, "scan", recording)

    wrap(source.Warehouse)
    wrap(source.Staged)
    results_of = check._results

    def frames(table, batch, *args):
        seen["frames"].setdefault(batch.name, []).append(len(batch.frame))
        return results_of(table, batch, *args)

    monkeypatch.setattr(check, "_results", frames)
    return seen


# ------------------------------------------------------------------ events
def bad_day() -> list[dict]:
    """100 events of D, each defect's rows far apart (in different batches of 7)."""
    return day(
        r1={"event_id": "dup"},
        r95={"event_id": "dup"},
        r3={"event_type": "teleport"},
        r50={"event_type": "teleport2"},
        r99={"event_type": "teleport3"},
        r10={"user_id": None},
        r80={"user_id": None},
        r60={"ts": start(D) + dt.timedelta(days=3)},
    )


def test_events_in_small_batches_find_what_one_batch_finds(cfg, measured):
    history(cfg, schema=loose(tables.EVENTS))
    write_events(cfg, bad_day(), loose(tables.EVENTS))
    whole = check.check(cfg, "events", D)
    assert max(measured["frames"]["rows"]) == 100  # the default bound holds the day in one frame
    measured["frames"].clear(), measured.update(scan=0)

    res = check.check(small(cfg), "events", D)
    assert results(res) == results(whole)
    r = failed(res, "expect_column_values_to_be_unique", "event_id")
    assert (r.unexpected_count, r.element_count, r.examples) == (2, 100, ["dup", "dup"])
    r = failed(res, "expect_column_values_to_be_in_set", "event_type")
    assert (r.unexpected_count, r.element_count, r.examples) == (3, 100, ["teleport", "teleport2", "teleport3"])
    r = failed(res, "expect_column_values_to_not_be_null", "user_id")
    assert (r.unexpected_count, r.element_count, r.examples) == (2, 100, [None, None])
    assert failed(res, "expect_column_values_to_be_between", "ts").unexpected_count == 1
    assert {x.column for x in res.failed} == {"event_id", "event_type", "user_id", "ts"}
    assert res.facts["rows"] == 100 and res.facts["raw_rows"] == 102

    # Bounded: no batch read nor frame judged is larger than quality.batch_rows; the rows took many frames.
    assert measured["scan"] <= BATCH
    assert max(n for sizes in measured["frames"].values() for n in sizes) <= BATCH
    assert len(measured["frames"]["rows"]) >= 2 * 100 // BATCH


def test_examples_across_batches_are_capped(cfg):
    history(cfg)
    write_events(cfg, day(**{f"r{i}": {"event_type": f"bogus{i}"} for i in (0, 20, 40, 60, 80)}))
    cfg.quality.examples = 3
    r = failed(check.check(small(cfg), "events", D), "expect_column_values_to_be_in_set", "event_type")
    assert (r.unexpected_count, r.examples) == (5, ["bogus0", "bogus20", "bogus40"])
    assert r.unexpected_percent == pytest.approx(5.0)


def test_an_empty_day_in_small_batches(cfg):
    """An ingested drop without accepted events: no row to stream, still every expectation reported."""
    from deltalake import CommitProperties, write_deltalake

    write_events(cfg, [event(D - dt.timedelta(days=k), i) for k in range(1, 8) for i in range(30)])
    write_deltalake(
        str(cfg.table_path("events")),
        tables.EVENTS.empty_table(),
        mode="overwrite",
        predicate=f"dt = '{D}'",
        commit_properties=CommitProperties(custom_metadata={"step": "ingest", "dt": str(D)}),
    )
    whole = check.check(cfg, "events", D)
    res = check.check(small(cfg), "events", D)
    assert results(res) == results(whole)
    unique = [r for r in res.results if r.column == "event_id" and r.expectation == "expect_column_values_to_be_unique"]
    assert unique[0].success and unique[0].element_count == 0
    assert {r.column for r in res.failed} == {"row_count", "duplicate_ratio", "rejected_ratio"}


def test_a_staged_day_in_small_batches(cfg, measured):
    """Staged rows (ingest's gate) judged in place of the stored partition, batch by batch: the stored rows of D
    count for nothing, the staged duplicate in different batches is found."""
    history(cfg)
    write_events(cfg, day(40))  # the stored partition D the staged rows replace
    extra = [event(D, 200, event_id="dup"), event(D, 201, event_id=f"{D}-5")]  # r1 and r5 again, batches later
    rows = pa.Table.from_pylist(bad_day()[:70] + extra, schema=loose(tables.EVENTS))
    rejected = pa.Table.from_pylist([], schema=tables.EVENTS_REJECTED)

    def staged():
        day_d = pc.field("dt") == pa.scalar(D, pa.date32())
        v_ev, v_rej = delta.version_of(cfg.table_path("events")), delta.version_of(cfg.table_path("events_rejected"))
        return source.Staged(
            cfg,
            {
                "events": source.Change(rows, day_d, v_ev, drop=D),
                "events_rejected": source.Change(rejected, day_d, v_rej, drop=D),
            },
        )

    whole = check.check(cfg, "events", D, source=staged())
    measured["frames"].clear(), measured.update(scan=0)
    res = check.check(small(cfg), "events", D, source=staged())
    assert results(res) == results(whole)
    assert res.facts["rows"] == 72
    r = failed(res, "expect_column_values_to_be_unique", "event_id")
    assert (r.unexpected_count, r.element_count, r.examples) == (4, 72, ["dup", f"{D}-5", "dup", f"{D}-5"])
    assert measured["scan"] <= BATCH
    assert max(n for sizes in measured["frames"].values() for n in sizes) <= BATCH


# ----------------------------------------------------------- user_sequences
def write_sequences(cfg, rows: list[dict]) -> None:
    delta.write_arrow(
        cfg.table_path("user_sequences"),
        pa.Table.from_pylist(rows, schema=loose(tables.USER_SEQUENCES)),
        loose(tables.USER_SEQUENCES),
        mode="overwrite",
    )


def bad_users() -> list[dict]:
    unsorted = seq("u_unsorted", 4)
    unsorted["ts"] = [unsorted["ts"][1], unsorted["ts"][0], *unsorted["ts"][2:]]
    short = seq("u_short", 4)
    short["brand_idx"] = [1, 1, 1]
    return (
        [seq("u3", 2, D - dt.timedelta(days=2))]  # a second row of u3, far from the first
        + good_users()
        + [seq(f"more{i}", 2) for i in range(20)]
        + [unsorted, seq("u_life", 3, lifetime_events=2), short, seq(None, 2)]
    )


def test_user_sequences_in_small_batches_find_what_one_batch_finds(cfg, measured):
    write_sequences(cfg, bad_users())
    whole = check.check(cfg, "user_sequences", D)
    measured["frames"].clear(), measured.update(scan=0)
    res = check.check(small(cfg, ids=5), "user_sequences", D)
    assert results(res) == results(whole)
    assert res.facts == whole.facts == {"rows_updated": 44, "users": 50}
    r = failed(res, "expect_column_values_to_be_unique", "user_id")
    assert (r.unexpected_count, r.element_count, r.examples) == (2, 50, ["u3", "u3"])
    r = failed(res, "expect_column_values_to_not_be_null", "user_id")
    assert (r.unexpected_count, r.element_count) == (1, 50)
    assert failed(res, "expect_column_values_to_be_in_set", "ts_sorted").examples == ["u_unsorted"]
    assert failed(res, "expect_column_values_to_be_in_set", "arrays_match_seq_len").examples == ["u_short"]
    assert failed(res, "expect_column_pair_values_a_to_be_greater_than_b", "lifetime_events, seq_len").examples == [
        [2, 3]
    ]
    assert measured["scan"] <= BATCH
    assert max(measured["frames"]["rows"]) <= BATCH and len(measured["frames"]["rows"]) == -(-44 // BATCH)
    # The id partitions hold at most ids_per_pass ids each (a part that turns out larger is split again).
    assert max(measured["frames"]["users"]) <= 5 and sum(measured["frames"]["users"]) == 50


def test_a_rebuilt_table_staged_as_files_in_small_batches(cfg, tmp_path):
    """`sequences --rebuild` stages its rows as Parquet files (a pyarrow dataset): they are read batch by batch."""
    write_sequences(cfg, good_users())
    f = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(bad_users(), schema=loose(tables.USER_SEQUENCES)), f, row_group_size=5)

    def staged():
        change = source.Change(pds.dataset(str(f), format="parquet"), None, -1)
        return source.Staged(cfg, {"user_sequences": change})

    whole = check.check(cfg, "user_sequences", D, source=staged())
    res = check.check(small(cfg, ids=5), "user_sequences", D, source=staged())
    assert results(res) == results(whole)
    assert failed(res, "expect_column_values_to_be_unique", "user_id").examples == ["u3", "u3"]


# ------------------------------------------------------------------ streams
def test_partitions_put_every_copy_of_a_key_in_one_part():
    ids = [f"u{i % 37}" for i in range(200)] + [None] * 30
    t = pa.table({"user_id": ids})

    def read():
        for s in range(0, t.num_rows, 9):
            yield t.slice(s, 9)

    parts = list(streams.partitions(read, ["user_id"], t.num_rows, 20))
    assert sum(p.num_rows for _, _, p in parts) == t.num_rows
    owner = {}
    for m, r, p in parts:
        for u in set(p["user_id"].to_pylist()) - {None}:
            assert owner.setdefault(u, (m, r)) == (m, r)
    assert len(owner) == 37
    assert max(p.num_rows for _, _, p in parts) <= 20  # split again where the hash put more than 20 in a part
    # The nulls are spread by position, not piled into one part.
    assert max(pc.sum(p["user_id"].is_null()).as_py() or 0 for _, _, p in parts) < 30


def test_rebatch_keeps_order_and_bound():
    t = pa.table({"x": np.arange(50)})
    pieces = [t.slice(0, 3), t.slice(3, 0), t.slice(3, 20), t.slice(23, 27)]
    out = list(streams.rebatch(pieces, 7))
    assert [b.num_rows for b in out] == [7] * 7 + [1]
    assert pa.concat_tables(out)["x"].to_pylist() == list(range(50))
    empty = list(streams.rebatch([t.slice(0, 0)], 7))
    assert len(empty) == 1 and empty[0].num_rows == 0 and empty[0].schema == t.schema


# ------------------------------------------------------------------ outputs
TASKS = ["brand", "event_type"]
DIM = 4


class StagedOutputs(source.Warehouse):
    """The staged shards of a model written by hand (no model, no registry): the rest is the test's warehouse."""

    def __init__(self, cfg, root, manifests, items):
        super().__init__(cfg)
        self.root, self.manifests, self.items = root, manifests, items

    def published_model(self) -> str:
        return "v1"

    def model_config(self, version: str) -> dict:
        return {"d_model": DIM}

    def staged_dir(self, day, model_version) -> str:
        return str(self.root)

    def staged_shards(self, day, model_version, shards):
        return self.manifests

    def staged_parts(self, manifest, table):
        return [f"{manifest['path']}/{table}.parquet"]

    def count_rows(self, table, filter=None, version=None):
        return self.items if table == "items" else super().count_rows(table, filter, version)


def unit(rng) -> list[float]:
    v = rng.normal(size=DIM)
    return (v / np.linalg.norm(v)).tolist()


def outputs(cfg, root) -> StagedOutputs:
    """Two staged shards of 40 users (a second row of u5 at the end of its shard, a NaN vector, a second
    (user, task) row far from the first) and 30 items (a second row of item 3 at the end)."""
    rng = np.random.default_rng(0)
    users = [f"u{i}" for i in range(40)]
    write_sequences(cfg, [seq(u, 2) for u in users])
    shard = infer.shard_of(users, 2)
    asof = pa.scalar(D, pa.date32())
    manifests = []
    for s in (0, 1):
        mine = [u for u, k in zip(users, shard) if k == s]
        if "u5" in mine:
            mine = mine + ["u5"]
        emb = [unit(rng) for _ in mine]
        if s == 0:
            emb[2] = [float("nan")] * DIM
        folder = root / f"shard={s}"
        folder.mkdir(parents=True)
        pq.write_table(
            pa.Table.from_pylist(
                [
                    {"user_id": u, "embedding": e, "model_version": "v1", "as_of": D, "updated_at": start(D)}
                    for u, e in zip(mine, emb)
                ],
                schema=tables.USER_EMBEDDINGS,
            ),
            folder / "user_embeddings.parquet",
        )
        prefs = [
            {
                "user_id": u,
                "task": t,
                "label_idx": [1, 2, 3],
                "labels": ["a", "b", "c"],
                "scores": [0.5, 0.3, 0.1],
                "model_version": "v1",
                "as_of": D,
            }
            for u in dict.fromkeys(mine)
            for t in TASKS
        ]
        if s == 1:
            prefs.append({**prefs[1], "scores": [0.9, 0.05, 0.01]})
        pq.write_table(
            pa.Table.from_pylist(prefs, schema=tables.USER_PREFERENCE_SCORES),
            folder / "user_preference_scores.parquet",
        )
        manifests.append(
            {
                "shard": s,
                "path": str(folder),
                "dt": str(D),
                "model_version": "v1",
                "full": True,
                "reason": "test",
                "inputs": {"user_sequences": {"version": 0}, "items": {"version": 0}},
                "tasks": TASKS,
                "top_k_labels": 3,
                "labels_per_task": dict.fromkeys(TASKS, 3),
                "selection": None,
                "users": len(mine),
            }
        )
    items = [
        {
            "item_id": f"i{k}",
            "item_idx": k,
            "embedding": unit(rng),
            "has_metadata": True,
            "model_version": "v1",
            "as_of": asof.as_py(),
        }
        for k in [*range(1, 31), 3]
    ]
    pq.write_table(
        pa.Table.from_pylist(items, schema=tables.ITEM_EMBEDDINGS), root / "shard=0" / "item_embeddings.parquet"
    )
    return StagedOutputs(cfg, root, manifests, items=30)


def test_outputs_in_small_batches_find_what_one_batch_finds(cfg, tmp_path, measured):
    src = outputs(cfg, tmp_path / "staged")
    whole = check.check(cfg, "outputs", D, {"shards": 2}, source=src)
    measured["frames"].clear(), measured.update(scan=0)
    res = check.check(small(cfg, ids=5), "outputs", D, {"shards": 2}, source=src)
    assert results(res) == results(whole)
    assert res.facts == whole.facts

    r = failed(res, "expect_column_values_to_be_unique", "user_id")
    assert (r.unexpected_count, r.element_count, r.examples) == (2, 41, ["u5", "u5"])
    r = failed(res, "expect_compound_columns_to_be_unique", None)
    assert (r.unexpected_count, r.element_count) == (2, 81)
    r = failed(res, "expect_column_values_to_be_unique", "item_idx")
    assert (r.unexpected_count, r.element_count, r.examples) == (2, 31, [3, 3])
    assert failed(res, "expect_column_values_to_be_in_set", "finite").unexpected_count == 1
    # u5's two rows: each counts u5's preference rows; the user with the extra (user, task) row has 3.
    assert failed(res, "expect_column_values_to_be_in_set", "tasks").unexpected_count == 1
    assert {r.column for r in res.failed} >= {"user_id", "item_idx", "finite", "tasks", "users", "items"}
    assert res.facts["metrics"]["top1_mean_brand"] == pytest.approx(0.5)
    assert measured["scan"] <= BATCH
    sizes = [n for ns in measured["frames"].values() for n in ns]
    assert max(sizes) <= BATCH
