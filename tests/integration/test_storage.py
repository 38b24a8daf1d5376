"""Python readers of tables with deletion vectors (jobs/core/storage/delta.py) against Spark's own read.

delta-spark's MERGE and DELETE mark replaced rows in deletion vectors instead
of rewriting files: the Parquet files of such a version still hold the deleted
rows, and delta-rs's pyarrow reader refuses the table. `read_arrow`, `scan`,
`data_files`, `logical_rows`, `partition_rows` and `DeltaSequences` must give
the rows Spark gives, version by version, with filters and row-group skipping.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from delta.tables import DeltaTable as SparkDeltaTable
from deltalake import DeltaTable

from tests.unit.test_stream import DAY, seq_rows
from userformer.jobs.core import stream
from userformer.jobs.core.storage import delta
from userformer.schemas import tables

pytestmark = pytest.mark.spark

D1, D2 = dt.date(2026, 11, 1), dt.date(2026, 11, 2)


def small_row_groups(spark):
    """Several row groups per file, so that a deletion vector's rows span row groups."""

    class _Ctx:
        def __enter__(self):
            spark.conf.set("parquet.block.size", str(16 * 1024))

        def __exit__(self, *exc):
            spark.conf.unset("parquet.block.size")

    return _Ctx()


@pytest.fixture(scope="module")
def dv_table(tmp_path_factory, spark):
    """A table partitioned by dt: v0 written, v1 a MERGE (updates + inserts), v2 a DELETE; DVs for both."""
    path = tmp_path_factory.mktemp("dv") / "t"
    with small_row_groups(spark):
        df = (
            spark.range(0, 6000)
            .selectExpr(
                "cast(id as string) as k",
                "id as v",
                "repeat('x', 20) as pad",
                "date_add(date'2026-11-01', cast(id % 2 as int)) as dt",
            )
            .repartition(2)
        )
        delta.spark_write(
            df,
            path,
            mode="overwrite",
            partition_by=["dt"],
            properties={"delta.enableDeletionVectors": "true"},
            metadata={"step": "t"},
        )
        upd = spark.range(0, 7000, 7).selectExpr(
            "cast(id as string) as k",
            "-id as v",
            "'merged' as pad",
            "date_add(date'2026-11-01', cast(id % 2 as int)) as dt",
        )
        with delta.spark_commit(spark, path, {"step": "merge"}):
            (
                SparkDeltaTable.forPath(spark, delta.spark_uri(path))
                .alias("t")
                .merge(upd.alias("s"), "t.k = s.k and t.dt = s.dt")
                .whenMatchedUpdateAll()
                .whenNotMatchedInsertAll()
                .execute()
            )
        with delta.spark_commit(spark, path, {"step": "delete"}):
            SparkDeltaTable.forPath(spark, delta.spark_uri(path)).delete("v % 11 = 0 and v > 0")
    return path


def spark_rows(spark, path, version=None, where=None, columns=("k", "v", "pad", "dt")) -> list[tuple]:
    df = delta.spark_read(spark, path, version)
    if where:
        df = df.where(where)
    return sorted(tuple(r) for r in df.select(*columns).collect())


def arrow_rows(t: pa.Table, columns=("k", "v", "pad", "dt")) -> list[tuple]:
    return sorted(zip(*[t[c].to_pylist() for c in columns]))


def test_the_table_has_deletion_vectors_and_plain_readers_are_wrong_or_refuse(dv_table, spark):
    t = delta.open_table(dv_table)
    assert delta.has_deletion_vectors(t)
    with pytest.raises(Exception, match="deletionVectors"):
        DeltaTable(str(dv_table)).to_pyarrow_table()
    files = delta.data_files(dv_table)
    assert any(f.keep is not None for f in files)
    physical = sum(pq.ParquetFile(f.path).metadata.num_rows for f in files)
    n = delta_spark_count = delta.spark_read(spark, dv_table).count()
    # The active files hold the deleted rows too; the log's num_records counts them.
    assert physical == sum(a["num_records"] for a in delta.add_actions(dv_table)) > n
    assert delta.logical_rows(dv_table) == sum(f.kept for f in files) == delta_spark_count


@pytest.mark.parametrize("version", [1, 2, None])
def test_read_arrow_equals_spark_version_by_version(dv_table, spark, version):
    assert arrow_rows(delta.read_arrow(dv_table, version)) == spark_rows(spark, dv_table, version)
    assert delta.logical_rows(dv_table, version) == len(spark_rows(spark, dv_table, version))


def test_filters_columns_batches_and_partition_counts_equal_spark(dv_table, spark):
    merged = delta.read_arrow(dv_table, filter=pc.field("pad") == "merged", columns=["k", "v"])
    assert arrow_rows(merged, ("k", "v")) == spark_rows(spark, dv_table, where="pad = 'merged'", columns=("k", "v"))
    day = delta.read_arrow(dv_table, filter=(pc.field("dt") == pa.scalar(D2, pa.date32())) & (pc.field("v") < 100))
    assert arrow_rows(day) == spark_rows(spark, dv_table, where="dt = date'2026-11-02' and v < 100")
    assert day.num_rows and set(day["dt"].to_pylist()) == {D2}
    batches = list(delta.scan(dv_table, batch_size=500))
    assert all(b.num_rows <= 500 for b in batches)
    assert arrow_rows(pa.concat_tables(batches)) == spark_rows(spark, dv_table)
    assert delta.read_arrow(dv_table, filter=pc.field("k") == "no such key").num_rows == 0
    counts = {dt.date.fromisoformat(str(k)): n for k, n in delta.partition_rows(dv_table, "dt").items()}
    want = {r["dt"]: r["count"] for r in delta.spark_read(spark, dv_table).groupBy("dt").count().collect()}
    assert counts == want


def test_filtered_reads_skip_row_groups_without_matches(dv_table, monkeypatch):
    """A filter on a column's range reads only row groups whose statistics may match (DV masks still right)."""
    read = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *a, row_groups=None, **k):
        read.append(tuple(row_groups or ()))
        return real(self, *a, row_groups=row_groups, **k)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    total = sum(pq.ParquetFile(f.path).metadata.num_row_groups for f in delta.data_files(dv_table))
    got = delta.read_arrow(dv_table, filter=pc.field("pad") == "merged")
    assert got.num_rows and 0 < len(read) < total


def test_delta_sequences_read_a_merged_user_sequences_table(tmp_path, spark):
    """DeltaSequences over row groups of files with deletion vectors: each user once, the merged row, logical counts."""
    path = tmp_path / "user_sequences"
    with small_row_groups(spark):
        df = spark.createDataFrame(seq_rows(range(0, 400), DAY - dt.timedelta(days=1))).repartition(2)
        delta.spark_write(df, path, mode="overwrite", properties={"delta.enableDeletionVectors": "true"})
        new = spark.createDataFrame(seq_rows(range(0, 400, 3), DAY))
        with delta.spark_commit(spark, path, {"step": "sequences"}):
            (
                SparkDeltaTable.forPath(spark, delta.spark_uri(path))
                .alias("t")
                .merge(new.alias("s"), "t.user_id = s.user_id")
                .whenMatchedUpdateAll()
                .execute()
            )
    assert delta.has_deletion_vectors(delta.open_table(path))
    src = stream.DeltaSequences(path, delta.version_of(path), 32, min_len=1)
    assert src.n_rows == 400 < sum(p.physical for p in src.pieces)
    chunks = list(src.tables(np.random.default_rng(0)))
    assert all(c.num_rows <= 32 for c in chunks)
    got = {u: d for c in chunks for u, d in zip(c["user_id"].to_pylist(), c["updated_dt"].to_pylist())}
    assert sum(c.num_rows for c in chunks) == len(got) == 400
    assert got == {f"u{u:04d}": DAY if u % 3 == 0 else DAY - dt.timedelta(days=1) for u in range(400)}
    # What infer reads: the day's rows only, through the same masks.
    day = delta.read_arrow(path, filter=pc.field("updated_dt") == pa.scalar(DAY, pa.date32()), columns=stream.COLUMNS)
    assert sorted(day["user_id"].to_pylist()) == [f"u{u:04d}" for u in range(0, 400, 3)]
    assert day.schema.names == stream.COLUMNS and set(tables.USER_SEQUENCES.names) >= set(stream.COLUMNS)
