"""The readers the docs name read the warehouse alike (docs/readers.md "Reading the outputs": the reader table).

One small warehouse (2 generated days, 150 users, 200 items) is run with
`pipeline.run_day`. Each published table (user_embeddings,
user_preference_scores, item_embeddings, user_candidates) is read at the
version the published snapshot names (``_published/snapshot.json``) by Spark by
path and as a named catalog table (`register_tables`), Polars, pandas, DuckDB
and `read_snapshot`: same rows, same values. item_embeddings carries no reader
feature, so delta-rs and DuckDB over the version's Parquet files read it too.
The user-keyed tables (and user_sequences) are MERGEd with deletion vectors:
delta-rs's own pyarrow reader refuses them, and pandas and DuckDB read them
through Polars' Arrow.
"""

from __future__ import annotations

import datetime as dt
import json
import math

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from tests.integration import warehouses
from userformer.jobs.core.spark import register_tables
from userformer.jobs.core.storage import delta
from userformer.jobs.tools.serve import read_snapshot

pytestmark = [pytest.mark.spark, pytest.mark.slow]

D1, D2 = warehouses.D1, warehouses.D2
KEYS = {
    "user_embeddings": ("user_id",),
    "user_preference_scores": ("user_id", "task"),
    "item_embeddings": ("item_idx",),
    "user_candidates": ("user_id",),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory, spark):
    cfg = warehouses.two_days(tmp_path_factory.mktemp("readers") / "home")
    assert delta.exists(cfg.table_path("user_candidates"))
    snap = json.loads((cfg.warehouse_root / "_published" / "snapshot.json").read_text())
    assert snap["dt"] == str(D2)  # the last day released everything it published
    assert {t: snap["tables"][t] for t in KEYS} == {t: delta.version_of(cfg.table_path(t)) for t in KEYS}
    return cfg


def plain(v):
    """One value as Python, whatever the reader's container (numpy arrays, pandas timestamps, tz objects)."""
    if isinstance(v, dict):  # a map: {k: v}, or one entry as {"key": k, "value": v}
        if v.keys() == {"key", "value"}:
            return [plain(v["key"]), plain(v["value"])]
        return sorted([plain(k), plain(x)] for k, x in v.items())
    if isinstance(v, (np.ndarray, list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, pd.Timestamp):
        v = v.to_pydatetime()
    if isinstance(v, dt.datetime):
        return v.astimezone(dt.UTC) if v.tzinfo else v.replace(tzinfo=dt.UTC)
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def by_key(records: list[dict], keys) -> dict:
    out = {}
    for r in records:
        r = {c: plain(v) for c, v in r.items()}
        k = tuple(r[c] for c in keys)
        assert k not in out, f"{k} twice"
        out[k] = r
    return out


def arrow(t: pa.Table) -> list[dict]:
    return t.to_pylist()


DELETION_VECTORS = {"user_embeddings", "user_preference_scores", "user_candidates"}


def readers(spark, cfg, table: str) -> dict:
    """table as of the published snapshot as {reader: records}, each reader the way docs/readers.md shows."""
    path = str(cfg.table_path(table))
    v = json.loads((cfg.warehouse_root / "_published" / "snapshot.json").read_text())["tables"][table]
    names = register_tables(spark, cfg)
    assert f"userformer.{table}" in names
    out = {
        "read_snapshot": arrow(read_snapshot(table, cfg=cfg)),
        "spark (path)": arrow(spark.read.format("delta").option("versionAsOf", v).load(path).toArrow()),
        "spark (catalog)": arrow(spark.sql(f"select * from userformer.{table} version as of {v}").toArrow()),
        "polars": pl.read_delta(path, version=v).to_dicts(),
    }
    if table in DELETION_VECTORS:
        with pytest.raises(Exception, match="deletionVectors"):  # documented: delta-rs 1.6 refuses the table
            DeltaTable(path, version=v).to_pyarrow_table()
        via_polars = pl.read_delta(path, version=v).to_arrow()  # noqa: F841 (DuckDB reads it by name)
        return {
            **out,
            # Through Arrow: Polars' own to_pandas turns dates into datetime64.
            "pandas (via polars)": pl.read_delta(path, version=v).to_arrow().to_pandas().to_dict("records"),
            "duckdb (polars arrow)": arrow(duckdb.sql("select * from via_polars").to_arrow_table()),
        }
    dtab = DeltaTable(path, version=v)
    from_rs = dtab.to_pyarrow_table()
    return {
        **out,
        "delta-rs": arrow(from_rs),
        "pandas": dtab.to_pandas().to_dict("records"),
        "duckdb (arrow)": arrow(duckdb.sql("select * from from_rs").to_arrow_table()),
        # Only right for tables without deletion vectors (the active files are the table).
        "duckdb (files)": arrow(duckdb.read_parquet(dtab.file_uris()).to_arrow_table()),
    }


@pytest.mark.parametrize("table", list(KEYS))
def test_every_reader_reads_a_published_table_alike(built, spark, table):
    cfg = built
    proto = delta.open_table(cfg.table_path(table)).protocol()
    if table in DELETION_VECTORS:
        # MERGEd with deletion vectors (a day rewrites its users' rows only): reader version 3, that one feature.
        assert proto.min_reader_version == 3 and list(proto.reader_features or []) == ["deletionVectors"]
    else:
        # No reader feature (deletion vectors, column mapping): any Delta reader of version 1 reads it.
        assert proto.min_reader_version == 1 and not proto.reader_features
    assert "delta.columnMapping.mode" not in delta.open_table(cfg.table_path(table)).metadata().configuration
    got = {name: by_key(records, KEYS[table]) for name, records in readers(spark, cfg, table).items()}
    want = got["spark (path)"]
    assert len(want) > 50
    assert {r["as_of"] for r in want.values()} == {D2}
    sample = sorted(want)[:: max(1, len(want) // 7)]
    for name, rows in got.items():
        assert rows.keys() == want.keys(), f"{table}: {name} has other rows than Spark"
        for k in sample:
            assert rows[k] == want[k], f"{table}: {name} differs at {k}"


def test_user_sequences_with_deletion_vectors_spark_polars_and_read_arrow_agree(built, spark):
    cfg = built
    path = str(cfg.table_path("user_sequences"))
    t = delta.open_table(path)
    assert delta.has_deletion_vectors(t)  # D2's MERGE marked replaced rows instead of rewriting files
    assert any(f.keep is not None for f in delta.data_files(path))
    with pytest.raises(Exception, match="deletionVectors"):  # documented: delta-rs 1.6 refuses the table
        DeltaTable(path).to_pyarrow_table()
    ours = by_key(arrow(delta.read_arrow(path)), ("user_id",))
    spark_rows = by_key(arrow(spark.read.format("delta").load(path).toArrow()), ("user_id",))
    polars_rows = by_key(pl.read_delta(path).to_dicts(), ("user_id",))
    assert ours.keys() == spark_rows.keys() == polars_rows.keys()
    assert len(ours) == delta.logical_rows(path) < sum(a["num_records"] for a in delta.add_actions(path))
    for k in sorted(ours)[::11]:
        assert ours[k] == spark_rows[k] == polars_rows[k], k
    # DuckDB through Polars' Arrow (the docs' way for this table)
    seqs = pl.read_delta(path).to_arrow()  # noqa: F841 (DuckDB reads the local by its name)
    assert duckdb.sql("select count(*) from seqs").fetchall()[0][0] == len(ours)
    # Time travel: the version of D1 (before the MERGE) reads alike too.
    v1 = next(h["version"] for h in delta.lineage(path) if h.get("dt") == str(D1))
    assert sorted(delta.read_arrow(path, v1)["user_id"].to_pylist()) == sorted(
        r["user_id"]
        for r in spark.read.format("delta").option("versionAsOf", v1).load(path).select("user_id").collect()
    )
