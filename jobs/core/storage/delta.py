"""Delta tables: Spark writes its tables through delta-spark, Python steps through delta-rs.

Who writes what. The Spark jobs (ingest's `events` / `events_rejected`,
`user_sequences`) write, overwrite partitions (`replaceWhere`) and MERGE
through delta-spark (`spark_write`, `spark_merge`, `spark_restore`), and only Spark writes
them: `user_sequences` carries deletion vectors, which delta-rs cannot write.
Python steps (vocab, items, the published outputs, candidates) write with
delta-rs (`write_arrow`); these tables carry no reader-breaking feature, so
every reader (Spark, delta-rs, Polars, pandas, DuckDB) reads them.

Concurrency as Delta defines it. A delta-spark commit that conflicts with a
concurrent one fails with Delta's concurrent-modification error; a delta-rs
write given `read_version` commits against exactly the version it read
(optimistic: any commit since makes it fail instead of silently replacing
it). Either failure becomes `ConcurrentWrite`, which names the table and says
that rerunning the step (from a fresh read) is safe.

Reading from Python (`read_arrow`, `scan`, `data_files`) applies deletion
vectors, so the rows are those of the version, whatever wrote it.
Commit metadata: each commit carries `step`, `dt` and input versions; delta-rs
writes them as commitInfo keys, delta-spark as the JSON `userMetadata`;
`history()` shows both the same way.
"""

from __future__ import annotations

import contextlib
import json
import re
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError

from userformer.jobs.core.errors import TryAgain
from userformer.jobs.core.storage import files

if TYPE_CHECKING:
    import pyarrow.dataset as pds


class StorageError(RuntimeError):
    """A table could not be read or written as asked."""


class ConcurrentWrite(StorageError, TryAgain):
    """Another writer committed to the table while this step ran; nothing of this step was committed.

    Rerunning the step is safe: it reads the table afresh (exit 75; Airflow retries it).
    """

    def __init__(self, path, detail: str = ""):
        self.path = str(path)
        super().__init__(
            f"another writer committed to {self.path} while this step ran, so this commit was refused (the table "
            f"is as the other writer left it){': ' + detail if detail else ''}. Rerun the step (it reads the tables "
            "afresh and completes what an earlier commit of it began); "
            "run one writer per warehouse at a time"
        )


def uri(path: str | Path) -> str:
    """A table location as a URI: object-store URIs unchanged, local paths absolute (file:// is implied)."""
    s = str(path)
    return s if "://" in s else str(Path(s).expanduser().resolve())


def spark_uri(path: str | Path) -> str:
    """A table location as Spark names it: Hadoop's S3A connector serves s3:// buckets as s3a://."""
    s = uri(path)
    return "s3a://" + s[len("s3://") :] if s.startswith("s3://") else s


def is_local(path: str | Path) -> bool:
    s = str(path)
    return "://" not in s or s.startswith("file://")


def exists(path: str | Path) -> bool:
    return DeltaTable.is_deltatable(uri(path))


def open_table(path: str | Path, version: int | None = None) -> DeltaTable:
    if not exists(path):
        raise StorageError(f"no Delta table at {path}")
    return DeltaTable(uri(path), version=version)


def add_actions(path: str | Path, version: int | None = None) -> list[dict]:
    """The active files of a version with their partition values (`partition.<col>`) and stats, from the log.

    `num_records` counts the rows physically in a file, deleted ones included;
    `logical_rows` counts what readers see."""
    return pa.table(open_table(path, version).get_add_actions(flatten=True)).to_pylist()


def version_of(path: str | Path) -> int | None:
    """Current version of the table, or None when it does not exist yet."""
    return DeltaTable(uri(path)).version() if exists(path) else None


def has_deletion_vectors(table: DeltaTable) -> bool:
    return "deletionVectors" in (table.protocol().reader_features or [])


def dataset(table: DeltaTable) -> pds.Dataset:
    """delta-rs's pyarrow dataset of `table` (no deletion vectors), a local table's files read by Arrow's own
    filesystem.

    By default delta-rs reads through a filesystem written in Python: Arrow's worker threads then hold Python file
    objects and may release the last of them after a read has returned. In a process that exits meanwhile, the
    worker cannot take the GIL of the finalizing interpreter and the process aborts ("terminate called without an
    active exception"). Arrow's local filesystem holds no Python objects; a table in an object store keeps
    delta-rs's handler."""
    root = table.table_uri
    if not root.startswith("file://") and "://" in root:
        return table.to_pyarrow_dataset()
    local = urllib.parse.unquote(urllib.parse.urlparse(root).path) if root.startswith("file://") else root
    return table.to_pyarrow_dataset(filesystem=pafs.SubTreeFileSystem(local, pafs.LocalFileSystem()))


def ensure_table(path: str | Path, schema: pa.Schema, partition_by: list[str] | None = None) -> DeltaTable:
    """Create an empty table with `schema` if none exists; return it."""
    if not exists(path):
        if is_local(path):
            Path(uri(path)).mkdir(parents=True, exist_ok=True)
        write_deltalake(uri(path), schema.empty_table(), partition_by=partition_by or None, mode="ignore")
    return DeltaTable(uri(path))


def _commit_props(metadata: dict | None, strict: bool = False) -> CommitProperties | None:
    if not metadata and not strict:
        return None
    custom = {k: str(v) for k, v in (metadata or {}).items()}
    # strict: commit exactly on top of the version read, or fail (no rebase onto a newer version).
    return CommitProperties(custom_metadata=custom or None, max_commit_retries=0 if strict else None)


# --------------------------------------------------------------- reading (Python)
@dataclass(frozen=True)
class DataFile:
    """One active data file of a version: its location, partition values, physical rows and the rows to keep."""

    path: str
    partition: dict
    rows: int
    keep: np.ndarray | None  # bool per physical row (deletion vector); None = every row
    # The file's column statistics (min and max per column, as text, in the log's order): what it holds, unlike
    # its name, which is random; readers that must not depend on file names order files by (rows, stats).
    stats: tuple = ()

    def mask(self, start: int, length: int) -> np.ndarray | None:
        """The keep-mask of physical rows [start, start + length), or None when all are kept."""
        if self.keep is None:
            return None
        out = np.ones(length, bool)
        part = self.keep[start : start + length]  # a selection vector may stop early: the rest is kept
        out[: len(part)] = part
        return None if out.all() else out

    @property
    def kept(self) -> int:
        """Rows a reader sees in this file: its physical rows minus those its deletion vector deletes."""
        m = self.mask(0, self.rows)
        return self.rows if m is None else int(m.sum())


def _abs(table_path, rel: str) -> str:
    if "://" in rel or rel.startswith("/"):
        return rel
    base = uri(table_path)
    if "://" in base:
        return base.rstrip("/") + "/" + rel
    return str(Path(base) / urllib.parse.unquote(rel))


def _plain(location: str) -> str:
    """file:///a/b%3D1/c -> /a/b=1/c (other schemes unchanged) so log paths and DV paths compare."""
    if location.startswith("file://"):
        return urllib.parse.unquote(urllib.parse.urlparse(location).path)
    return urllib.parse.unquote(location)


def data_files(path: str | Path, version: int | None = None) -> list[DataFile]:
    """The active files of a version, each with its deletion vector applied as a keep-mask."""
    t = open_table(path, version)
    parts = t.metadata().partition_columns
    keeps: dict[str, np.ndarray] = {}
    if has_deletion_vectors(t):
        dv = pa.table(t.deletion_vectors())
        for f, sel in zip(dv["filepath"].to_pylist(), dv["selection_vector"].to_pylist()):
            keeps[_plain(f)] = np.asarray(sel, bool)
    out = []
    for a in pa.table(t.get_add_actions(flatten=True)).to_pylist():
        loc = _abs(path, a["path"])
        rows = a.get("num_records")
        if rows is None:  # a file committed without stats: its footer has the count
            rows = pq.ParquetFile(loc).metadata.num_rows
        stats = tuple(str(v) for k, v in a.items() if k.startswith(("min.", "max.")))
        out.append(DataFile(loc, {p: a.get(f"partition.{p}") for p in parts}, int(rows), keeps.get(_plain(loc)), stats))
    return out


def logical_rows(path: str | Path, version: int | None = None) -> int:
    """Rows a reader sees in a version (file row counts minus deleted rows), from the log alone."""
    return sum(f.kept for f in data_files(path, version))


def partition_rows(path: str | Path, column: str, version: int | None = None) -> dict:
    """Rows a reader sees per value of partition column `column` (as the log holds it), from the log alone."""
    out: dict = {}
    for f in data_files(path, version):
        k = f.partition.get(column)
        out[k] = out.get(k, 0) + f.kept
    return out


def _with_partitions(batch: pa.RecordBatch, f: DataFile, schema: pa.Schema) -> pa.Table:
    t = pa.Table.from_batches([batch])
    for p, v in f.partition.items():
        if p in schema.names and p not in t.column_names:
            t = t.append_column(p, pa.array([v] * t.num_rows).cast(schema.field(p).type))
    return t


class Snapshot:
    """One version of a table opened once for any number of reads, deletion vectors applied.

    Tables without deletion vectors are read through delta-rs's dataset (file
    skipping by stats and partitions); with them, file by file with each
    file's keep-mask, skipping row groups by partition values and Parquet
    statistics. The log (and the deletion vectors) are read once, here: a
    job filtering the same version many times (candidates' purchases per
    batch of users) does not replay it per read.
    """

    def __init__(self, path: str | Path, version: int | None = None):
        t = open_table(path, version)
        self.path, self.version = path, t.version()
        schema = t.schema().to_arrow()
        self.schema = schema if isinstance(schema, pa.Schema) else pa.schema(schema)
        self.deletion_vectors = has_deletion_vectors(t)
        self._ds = None if self.deletion_vectors else dataset(t)
        self._files = data_files(path, self.version) if self.deletion_vectors else None

    def scan(self, columns: list[str] | None = None, filter=None, batch_size: int = 65_536) -> Iterator[pa.Table]:
        """The rows in batches of at most `batch_size`, file by file (bounded memory)."""
        if self._ds is not None:
            for b in self._ds.to_batches(
                columns=columns, filter=filter, batch_size=batch_size, batch_readahead=1, fragment_readahead=1
            ):
                if b.num_rows:
                    yield pa.Table.from_batches([b])
            return
        schema = self.schema
        need = None if columns is None else list(dict.fromkeys(columns + _filter_fields(filter, schema)))
        for f in self._files:
            if not f.kept:
                continue
            pf = pq.ParquetFile(f.path)
            md = pf.metadata
            file_cols = None if need is None else [c for c in need if c in pf.schema_arrow.names]
            starts = np.concatenate([[0], np.cumsum([md.row_group(i).num_rows for i in range(md.num_row_groups)])])
            for rg in _row_groups(f, md.num_row_groups, filter, schema):
                start = int(starts[rg])  # deletion vectors index physical rows of the whole file
                for b in pf.iter_batches(batch_size=batch_size, row_groups=[rg], columns=file_cols):
                    n = b.num_rows
                    m = f.mask(start, n)
                    start += n
                    # Conformed first: a file written by delta-rs holds string_view, which Arrow cannot filter.
                    tab = _conform(_with_partitions(b, f, schema), schema)
                    if m is not None:
                        tab = tab.filter(pa.array(m))
                    if filter is not None and tab.num_rows:
                        tab = tab.filter(filter)
                    if columns is not None:
                        tab = tab.select(columns)
                    if tab.num_rows:
                        yield tab

    def to_table(self, columns: list[str] | None = None, filter=None) -> pa.Table:
        if self._ds is not None:
            return self._ds.to_table(columns=columns, filter=filter)
        parts = list(self.scan(columns, filter))
        if parts:
            return pa.concat_tables(parts)
        return (self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])).empty_table()

    def count_rows(self, filter=None) -> int:
        if self._ds is not None:
            return self._ds.count_rows(filter=filter)
        return sum(t.num_rows for t in self.scan(columns=[self.schema.names[0]], filter=filter))

    def take(self, rows: np.ndarray, columns: list[str]) -> pa.Table:
        """The rows at these positions, in the order a full read returns them."""
        if self._ds is not None:
            return self._ds.take(pa.array(rows), columns=columns)
        return self.to_table(columns).take(pa.array(rows))


def scan(
    path: str | Path,
    version: int | None = None,
    *,
    columns: list[str] | None = None,
    filter=None,
    batch_size: int = 65_536,
) -> Iterator[pa.Table]:
    """A version's rows in batches, file by file (bounded memory), deletion vectors applied (see `Snapshot`).

    `filter` is a pyarrow.dataset expression."""
    yield from Snapshot(path, version).scan(columns, filter, batch_size)


def _row_groups(f: DataFile, n: int, filter, schema: pa.Schema) -> list[int]:
    """The row groups of `f` that may hold rows matching `filter` (partition values and Parquet statistics),
    so that a filtered read of a table with deletion vectors skips files and row groups as delta-rs's
    dataset does for the others (e.g. infer's updated_dt = D reads the day's MERGE output, not the table)."""
    if filter is None or n == 0:
        return list(range(n))
    try:
        import pyarrow.dataset as pds

        fs, p = pafs.FileSystem.from_uri(f.path) if "://" in f.path else (pafs.LocalFileSystem(), f.path)
        part = pc.scalar(True)
        for k, v in f.partition.items():
            if k in schema.names:
                part = part & (
                    pc.field(k).is_null() if v is None else pc.field(k) == pa.array([v]).cast(schema.field(k).type)[0]
                )
        frag = pds.ParquetFileFormat().make_fragment(p, filesystem=fs, partition_expression=part)
        return [rg.id for rg in frag.subset(filter, schema=schema).row_groups]
    except Exception:  # pruning only saves reading: when it cannot be worked out, read everything
        return list(range(n))


def _conform(tab: pa.Table, schema: pa.Schema) -> pa.Table:
    """A file's rows in the table's schema (from the log). Files of one table differ in nested field names and
    nullability by writer (Spark's DataFrame writes, its OPTIMIZE, delta-rs), which must not change what a read
    returns, nor make batches of two files impossible to concatenate."""
    want = pa.schema([schema.field(n) for n in tab.column_names])
    return tab if tab.schema.equals(want) else tab.cast(want)


def _filter_fields(expr, schema: pa.Schema) -> list[str]:
    if expr is None:
        return []
    text = str(expr)
    return [n for n in schema.names if re.search(rf"\b{re.escape(n)}\b", text)]


def read_arrow(path: str | Path, version: int | None = None, filter=None, columns: list[str] | None = None) -> pa.Table:
    """Read (part of) a version as one Arrow table, deletion vectors applied; `filter` is a pyarrow.dataset
    expression."""
    return Snapshot(path, version).to_table(columns, filter)


# --------------------------------------------------------------- writing (Python, delta-rs)
def write_arrow(
    path: str | Path,
    data: pa.Table,
    schema: pa.Schema,
    *,
    mode: str = "append",
    partition_by: list[str] | None = None,
    predicate: str | None = None,
    metadata: dict | None = None,
    read_version: int | None = None,
) -> int:
    """Write an Arrow table in one commit (overwrite with `predicate` replaces just those rows). Returns the version.

    `read_version`: the version the step read to compute `data` (-1: it found no
    table). The commit then lands on exactly that version or raises
    `ConcurrentWrite`; without it the write is blind (appends of independent rows).
    """
    data = data.select(schema.names).cast(schema)
    if is_local(path):
        Path(uri(path)).mkdir(parents=True, exist_ok=True)
    strict = read_version is not None
    create = strict and read_version < 0
    if strict and read_version >= 0:
        target = DeltaTable(uri(path), version=read_version)
    else:
        target = uri(path)
        if create and exists(path):  # the step found no table, but one exists now
            raise ConcurrentWrite(path, "the table was created meanwhile")
    try:
        write_deltalake(
            target,
            data,
            # Creating: "error", so that a table created by another writer since the check above is
            # refused rather than appended to or overwritten.
            mode="error" if create else mode,
            partition_by=partition_by or None,
            predicate=None if create else predicate,
            commit_properties=_commit_props(metadata, strict),
        )
    except CommitFailedError as exc:
        raise ConcurrentWrite(path, f"read version {read_version}, now {version_of(path)}") from exc
    except DeltaError as exc:
        if create and exists(path):
            raise ConcurrentWrite(path, "the table was created meanwhile") from exc
        raise
    return read_version + 1 if strict else DeltaTable(uri(path)).version()


def strict_commit(metadata: dict | None = None) -> CommitProperties:
    """Commit properties for a delta-rs operation (merge, delete) on a table opened at the version read:
    land on that version or fail (see `conflicts`)."""
    return _commit_props(metadata, strict=True)


@contextlib.contextmanager
def conflicts(path: str | Path):
    """Turn a refused commit (delta-rs or delta-spark) inside the block into `ConcurrentWrite`."""
    try:
        yield
    except CommitFailedError as exc:
        raise ConcurrentWrite(path, str(exc).splitlines()[0]) from exc
    except Exception as exc:
        if is_conflict(exc):
            raise ConcurrentWrite(path, _conflict_kind(exc)) from exc
        raise


# Delta's error classes for a commit that lost to a concurrent one (io.delta.exceptions.*).
_CONFLICT = re.compile(r"DELTA_CONCURRENT_\w+|DELTA_METADATA_CHANGED|DELTA_PROTOCOL_CHANGED|Concurrent\w*Exception")


def is_conflict(exc: BaseException) -> bool:
    return bool(_CONFLICT.search(f"{type(exc).__name__} {exc}"[:4000]))


def _conflict_kind(exc: BaseException) -> str:
    m = _CONFLICT.search(f"{type(exc).__name__} {exc}"[:4000])
    return m.group(0) if m else type(exc).__name__


# --------------------------------------------------------------- Spark (delta-spark)
def spark_read(spark, path: str | Path, version: int | None = None):
    """A table (or one of its versions) as a Spark DataFrame, through delta-spark."""
    r = spark.read.format("delta")
    if version is not None:
        r = r.option("versionAsOf", int(version))
    return r.load(spark_uri(path))


def spark_sql_name(path: str | Path) -> str:
    """A table's location as Spark SQL names it: delta.`<uri>`."""
    return "delta.`" + spark_uri(path).replace("`", "``") + "`"


# MERGE and RESTORE are SQL, not delta-spark's Python DeltaTable: SQL runs the same on a driver in this process and
# through a Spark Connect server (DeltaTable reaches into the driver's JVM, which a Connect client has not).
def spark_restore(spark, path: str | Path, version: int) -> None:
    spark.sql(f"RESTORE TABLE {spark_sql_name(path)} TO VERSION AS OF {int(version)}")


def spark_merge(spark, path: str | Path, source, on: str, clauses: str) -> None:
    """MERGE INTO the table (alias t) USING the DataFrame `source` (alias s) ON `on`, then the SQL `clauses`
    (WHEN [NOT] MATCHED ... THEN ...)."""
    view = f"merge_source_{uuid.uuid4().hex}"
    source.createOrReplaceTempView(view)
    try:
        spark.sql(f"MERGE INTO {spark_sql_name(path)} AS t USING {view} AS s ON {on} {clauses}")
    finally:
        spark.catalog.dropTempView(view)


def spark_delete(spark, path: str | Path, where: str) -> None:
    """DELETE FROM the table WHERE `where` (SQL); with deletion vectors it marks the rows instead of rewriting."""
    spark.sql(f"DELETE FROM {spark_sql_name(path)} WHERE {where}")


def spark_parquet(spark, files: list[str], ddl: str):
    """Parquet files (a step's staged output) as a DataFrame of the columns and types of `ddl` (SQL type text,
    schemas.tables.spark_ddl: parsed by the driver, so that no explicit string collation reaches Delta)."""
    return spark.read.schema(ddl).parquet(*[spark_uri(f) for f in files])


@contextlib.contextmanager
def spark_staged(df, parent) -> Iterator[tuple[object, pds.Dataset]]:
    """`df` written once to Parquet in a fresh folder under `parent` (warehouse/_staging/<step>/); yields those
    rows as a DataFrame (for the commit) and as a pyarrow dataset (for the gate), so that the gate judges exactly
    what is committed and no process holds the rows in memory. The folder goes on exit; `maintain` clears the
    folders of runs that died."""
    import pyarrow.dataset as pds

    with files.scratch(parent) as d:
        out = d / "rows"
        df.write.parquet(spark_uri(out))
        fs, where = files.arrow(out)
        yield df.sparkSession.read.parquet(spark_uri(out)), pds.dataset(where, filesystem=fs, format="parquet")


# Written at creation by the steps that MERGE by user, and set on tables written before by
# `ensure_deletion_vectors`: a MERGE or DELETE then marks the replaced rows in a small file beside the data
# instead of rewriting every data file that holds one of them (a day costs its changed rows, not the table).
DELETION_VECTORS = {"delta.enableDeletionVectors": "true"}


def ensure_deletion_vectors(spark, path: str | Path, step: str) -> bool:
    """Enable deletion vectors on a table that lacks them (one ALTER commit, a protocol upgrade to reader
    version 3). True when it changed the table."""
    props = open_table(path).metadata().configuration or {}
    if all(str(props.get(k, "")).lower() == v for k, v in DELETION_VECTORS.items()):
        return False
    settings = ", ".join(f"'{k}' = '{v}'" for k, v in DELETION_VECTORS.items())
    with spark_commit(spark, path, {"step": f"{step}-migrate", "enable": "deletionVectors"}):
        spark.sql(f"ALTER TABLE {spark_sql_name(path)} SET TBLPROPERTIES ({settings})")
    return True


def ensure_merge_table(spark, path: str | Path, schema: pa.Schema, step: str) -> None:
    """A table Spark MERGEs by key: created empty with the contract's schema when missing (so its NOT NULL
    columns are Delta's invariants, checked on every write, and readers see the documented types), then with
    deletion vectors enabled."""
    ensure_table(path, schema)
    ensure_deletion_vectors(spark, path, step)


def expect_version(path: str | Path, read_version: int | None) -> None:
    """Refuse (ConcurrentWrite) unless the table is still at the version a step read (None: it found none).

    For Spark's commits, which cannot be pinned to a version as delta-rs's can: a step checks right before its
    commit, and Delta's own conflict detection covers a writer that commits while the commit runs."""
    now = version_of(path)
    if now != read_version:
        raise ConcurrentWrite(path, f"read version {read_version}, now {now}")


def _tagged(metadata: dict | None) -> tuple[dict, str]:
    tag = uuid.uuid4().hex
    return {**(metadata or {}), "commit_tag": tag}, tag


def _tagged_commit(path, tag: str) -> dict:
    """The history entry of the commit carrying `tag`."""
    for h in history(path, 50):
        if h.get("commit_tag") == tag:
            return h
    raise StorageError(f"the commit just made to {path} is not in its recent history")


def _version_tagged(path, tag: str) -> int:
    return int(_tagged_commit(path, tag)["version"])


def spark_write(
    df,
    path: str | Path,
    *,
    mode: str = "append",
    partition_by: list[str] | None = None,
    replace_where: str | None = None,
    metadata: dict | None = None,
    properties: dict | None = None,
) -> int:
    """Write a DataFrame in one Delta commit; `replace_where` replaces just the rows it matches
    (a partition, e.g. "dt = '2026-11-01'"). `properties` (delta.*) apply when the table is created.
    Returns the version this commit made."""
    meta, tag = _tagged(metadata)
    w = df.write.format("delta").mode(mode).option("userMetadata", json.dumps(meta, default=str))
    if partition_by:
        w = w.partitionBy(*partition_by)
    if replace_where is not None:
        w = w.option("replaceWhere", replace_where)
    for k, v in (properties or {}).items():
        w = w.option(k, str(v))
    # Delta skips a commit that adds and removes nothing (an empty day replacing an empty partition); the
    # step's commit, with its metadata, must still be in the log (the lineage records which drops are in).
    spark, key = df.sparkSession, "spark.databricks.delta.skipRecordingEmptyCommits"
    before = spark.conf.get(key, None)
    spark.conf.set(key, "false")
    try:
        with conflicts(path):
            w.save(spark_uri(path))
    finally:
        if before is None:
            spark.conf.unset(key)
        else:
            spark.conf.set(key, before)
    return _version_tagged(path, tag)


@contextlib.contextmanager
def spark_commit(spark, path: str | Path, metadata: dict | None = None):
    """Run a delta-spark operation (MERGE, DELETE, RESTORE, OPTIMIZE) as one tagged commit.

    Yields a dict whose "version" is the commit's version after the block
    (None when the operation committed nothing) and "metrics" its numeric operation metrics.
    Conflicts become ConcurrentWrite.
    """
    meta, tag = _tagged(metadata)
    key = "spark.databricks.delta.commitInfo.userMetadata"
    spark.conf.set(key, json.dumps(meta, default=str))
    out: dict = {"version": None}
    try:
        with conflicts(path):
            yield out
    finally:
        spark.conf.unset(key)
    with contextlib.suppress(StorageError):
        h = _tagged_commit(path, tag)
        out["version"] = int(h["version"])
        out["metrics"] = {k: int(v) for k, v in (h.get("operationMetrics") or {}).items() if str(v).isdigit()}


# --------------------------------------------------------------- log
# Operations (prefixes of commitInfo.operation) that change no rows: maintenance (compaction, purge of
# deletion vectors, vacuum) and table properties. A version after one holds the rows of the version before.
NO_DATA_CHANGE = ("VACUUM", "OPTIMIZE", "CHECKPOINT", "REORG", "SET TBLPROPERTIES", "UPGRADE PROTOCOL")


def missing_files(table_path: str | Path, version: int) -> list[str]:
    """Files a (local) version references that are gone, e.g. vacuumed after its retention window."""
    if not is_local(table_path):
        return []  # object stores: left to the reader's error
    gone = [p for a in add_actions(table_path, version) if not Path(_plain(p := _abs(table_path, a["path"]))).exists()]
    if gone:
        return gone
    try:  # the version's deletion vectors are files too (vacuumed with the data files they belong to)
        data_files(table_path, version)
    except Exception as exc:  # noqa: BLE001 - any failure to load them means the version cannot be read
        return [f"deletion vectors of version {version}: {str(exc).splitlines()[0][:300]}"]
    return []


def active_files(table_path: str | Path, version: int | None = None) -> list[str]:
    """Relative paths of the files of a version (as in the log)."""
    return [a["path"] for a in add_actions(table_path, version)]


def history(table_path: str | Path, limit: int | None = None) -> list[dict]:
    """Commits, newest first, with their metadata keys at the top level whoever wrote them."""
    out = []
    for h in open_table(table_path).history(limit):
        um = h.get("userMetadata")
        if isinstance(um, str) and um.startswith("{"):
            with contextlib.suppress(ValueError):
                for k, v in json.loads(um).items():
                    h.setdefault(k, v if isinstance(v, str) or v is None else str(v))
        out.append(h)
    return out


def lineage(table_path: str | Path) -> list[dict]:
    """The commits whose effects the current version holds, oldest first.

    The history minus the commits a RESTORE undid: from the latest commit back,
    a RESTORE to version v continues at v (the RESTORE itself is kept, it is
    how the table got here). `repair` restores tables to before a bad drop and
    re-runs the drops; whatever reads "the last commit of step X / drop D" from
    the log (publish's order check, sequences' applied drop, an empty drop's
    ingest) reads the lineage, so the undone commits no longer count.
    Stops where the log was cleaned up (`maintain`).
    """
    hist = {h["version"]: h for h in history(table_path)}
    out: list[dict] = []
    v = max(hist, default=-1)
    while v in hist:
        h = hist[v]
        out.append(h)
        params = h.get("operationParameters") or {}
        target = params.get("version") if h.get("operation") == "RESTORE" else None
        v = int(target) if target is not None and int(target) < v else v - 1
    return out[::-1]
