"""Delta tables with delta-rs, and the bridge to Spark (which has no Delta JARs here).

Writes from Spark: Spark writes Parquet into a private staging folder, the
files are moved under the table root, and ONE delta-rs transaction commits
them (adds, and removes of what they replace). Either the commit lands and
readers see the whole new version, or it does not and readers see the old one;
files moved but not committed are invisible and vacuum deletes them.

Reads into Spark: the active files of a version are listed from the log and
read as Parquet; partition values come from the log, not from the paths.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import time
import urllib.parse
import uuid
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake import Schema as DeltaSchema
from deltalake.transaction import AddAction, RemoveAction, create_table_with_add_actions


class StorageError(RuntimeError):
    """A table could not be read or written as asked."""


def exists(path: str | Path) -> bool:
    return DeltaTable.is_deltatable(str(path))


def open_table(path: str | Path, version: int | None = None) -> DeltaTable:
    if not exists(path):
        raise StorageError(f"no Delta table at {path}")
    return DeltaTable(str(path), version=version)


def add_actions(path: str | Path, version: int | None = None) -> list[dict]:
    """The active files of a version with their partition values (`partition.<col>`) and stats, from the log."""
    return pa.table(open_table(path, version).get_add_actions(flatten=True)).to_pylist()


def version_of(path: str | Path) -> int | None:
    """Current version of the table, or None when it does not exist yet."""
    return DeltaTable(str(path)).version() if exists(path) else None


def ensure_table(path: str | Path, schema: pa.Schema, partition_by: list[str] | None = None) -> DeltaTable:
    """Create an empty table with `schema` if none exists; return it."""
    if not exists(path):
        Path(path).mkdir(parents=True, exist_ok=True)
        write_deltalake(str(path), schema.empty_table(), partition_by=partition_by or None, mode="ignore")
    return DeltaTable(str(path))


def _commit_props(metadata: dict | None) -> CommitProperties | None:
    if not metadata:
        return None
    return CommitProperties(custom_metadata={k: str(v) for k, v in metadata.items()})


def read_arrow(path: str | Path, version: int | None = None, filter=None, columns: list[str] | None = None) -> pa.Table:
    """Read (part of) a table as Arrow; `filter` is a pyarrow.dataset expression."""
    ds = open_table(path, version).to_pyarrow_dataset()
    return ds.to_table(filter=filter, columns=columns)


def write_arrow(
    path: str | Path,
    data: pa.Table,
    schema: pa.Schema,
    *,
    mode: str = "append",
    partition_by: list[str] | None = None,
    predicate: str | None = None,
    metadata: dict | None = None,
) -> int:
    """Write an Arrow table in one commit (overwrite with `predicate` replaces just those rows). Returns the version."""
    data = data.select(schema.names).cast(schema)
    Path(path).mkdir(parents=True, exist_ok=True)
    write_deltalake(
        str(path),
        data,
        mode=mode,
        partition_by=partition_by or None,
        predicate=predicate,
        commit_properties=_commit_props(metadata),
    )
    return DeltaTable(str(path)).version()


# ------------------------------------------------------------------ Spark
def read_spark(spark, path: str | Path, schema: pa.Schema, version: int | None = None, partition_filters=None):
    """The active files of a version as a Spark DataFrame with `schema` (partition columns from the log)."""
    from pyspark.sql import functions as F

    from userformer.schemas.tables import to_spark

    parts = open_table(path, version).metadata().partition_columns
    data_schema = pa.schema([f for f in schema if f.name not in parts])
    actions = add_actions(path, version)
    groups: dict[tuple, list[str]] = defaultdict(list)
    for a in actions:
        key = tuple(a.get(f"partition.{p}") for p in parts)
        if partition_filters and not _match(dict(zip(parts, key)), partition_filters):
            continue
        groups[key].append(_abs(path, a["path"]))
    frames = []
    for key, files in sorted(groups.items(), key=lambda kv: tuple(str(v) for v in kv[0])):
        df = spark.read.schema(to_spark(data_schema)).parquet(*files)
        for p, v in zip(parts, key):
            df = df.withColumn(p, F.lit(v).cast(to_spark(pa.schema([schema.field(p)]))[0].dataType))
        frames.append(df.select(*schema.names))
    if not frames:
        return spark.createDataFrame([], to_spark(schema))
    out = frames[0]
    for f in frames[1:]:
        out = out.unionByName(f)
    return out


def _match(values: dict, filters) -> bool:
    for col, op, val in filters:
        v = values.get(col)
        v = v.isoformat() if isinstance(v, (_dt.date, _dt.datetime)) else (None if v is None else str(v))
        if op == "=" and v != str(val):
            return False
        if op == "in" and v not in {str(x) for x in val}:
            return False
        if op == "!=" and v == str(val):
            return False
    return True


def _abs(table_path, rel: str) -> str:
    if "://" in rel or rel.startswith("/"):
        return rel
    return str(Path(table_path) / urllib.parse.unquote(rel))


@contextlib.contextmanager
def staging(table_path: str | Path):
    """A fresh folder beside the warehouse for one job's Spark output, deleted on exit whatever happens."""
    root = Path(table_path).parent / "_staging" / Path(table_path).name
    d = root / f"{_dt.datetime.now(_dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}"
    d.mkdir(parents=True)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _stat_value(v):
    if isinstance(v, _dt.datetime):
        return v.astimezone(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    if isinstance(v, _dt.date):
        return v.isoformat()
    if isinstance(v, bytes):
        return None
    if isinstance(v, str) and len(v) > 32:
        return None
    return v


def file_stats(path: str | Path) -> str:
    """Delta stats JSON (numRecords, min/max, nullCount of top-level primitive columns) from a Parquet footer."""
    md = pq.ParquetFile(path).metadata
    schema = md.schema.to_arrow_schema()
    mins, maxs, nulls = {}, {}, {}
    leaf_of = {}
    for i in range(md.num_columns):
        leaf_of[md.schema.column(i).path] = i
    for f in schema:
        i = leaf_of.get(f.name)
        if i is None:  # nested: no stats
            continue
        lo = hi = None
        nc = 0
        ok = True
        for rg in range(md.num_row_groups):
            st = md.row_group(rg).column(i).statistics
            if st is None:
                ok = False
                break
            nc += st.null_count or 0
            if st.has_min_max:
                a, b = st.min, st.max
                lo = a if lo is None or a < lo else lo
                hi = b if hi is None or b > hi else hi
        if not ok:
            continue
        nulls[f.name] = nc
        if pa.types.is_timestamp(f.type) and lo is not None:
            # Delta keeps millisecond stats: floor the min, ceil the max so skipping stays correct.
            lo = lo.replace(microsecond=lo.microsecond // 1000 * 1000)
            hi = hi.replace(microsecond=hi.microsecond // 1000 * 1000) + _dt.timedelta(milliseconds=1 if hi.microsecond % 1000 else 0)
        if lo is not None and _stat_value(lo) is not None and _stat_value(hi) is not None:
            mins[f.name] = _stat_value(lo)
            maxs[f.name] = _stat_value(hi)
    return json.dumps({"numRecords": md.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls})


def _partition_values(rel_dir: Path, partition_by: list[str]) -> dict[str, str | None]:
    values = {}
    for part in rel_dir.parts:
        if "=" in part:
            k, v = part.split("=", 1)
            values[k] = None if v == "__HIVE_DEFAULT_PARTITION__" else urllib.parse.unquote(v)
    missing = [p for p in partition_by if p not in values]
    if missing:
        raise StorageError(f"staged folder {rel_dir} lacks partition {missing}")
    return {p: values[p] for p in partition_by}


def commit_staged(
    table_path: str | Path,
    staged: str | Path,
    schema: pa.Schema,
    *,
    partition_by: list[str] | None = None,
    mode: str = "append",
    partition_filters: list | None = None,
    remove_files: list[str] | None = None,
    metadata: dict | None = None,
) -> int:
    """Commit the Parquet files Spark wrote under `staged` to the table, atomically. Returns the new version.

    mode="overwrite" with partition_filters replaces those partitions (a rerun
    of a day replaces the day); mode="append" with remove_files replaces those
    files (copy-on-write update). Files moved in but not committed are deleted.
    """
    table_path, staged = Path(table_path), Path(staged)
    partition_by = partition_by or []
    moved: list[Path] = []
    try:
        files = sorted(p for p in staged.rglob("*.parquet") if not p.name.startswith((".", "_")))
        run = staged.name
        adds = []
        for f in files:
            rel_dir = f.parent.relative_to(staged)
            pv = _partition_values(rel_dir, partition_by)
            dest_dir = table_path.joinpath(*[f"{p}={urllib.parse.quote(pv[p] or '__HIVE_DEFAULT_PARTITION__', safe='')}" for p in partition_by])
            dest_dir.mkdir(parents=True, exist_ok=True)
            dest = dest_dir / f"{run}-{f.name}"
            os.replace(f, dest)
            moved.append(dest)
            st = dest.stat()
            rel = dest.relative_to(table_path).as_posix()
            adds.append(AddAction(rel, st.st_size, pv, int(st.st_mtime * 1000), True, file_stats(dest)))
        actions: list = list(adds)
        now_ms = int(time.time() * 1000)
        for rel in remove_files or []:
            actions.append(RemoveAction(rel, True, now_ms))
        if not exists(table_path):
            if remove_files:
                raise StorageError(f"cannot remove files from a table that does not exist: {table_path}")
            create_table_with_add_actions(
                str(table_path), DeltaSchema.from_arrow(schema), adds, mode="error", partition_by=partition_by or None,
                commit_properties=_commit_props(metadata),
            )
        else:
            DeltaTable(str(table_path)).create_write_transaction(
                actions, mode, schema, partition_by=partition_by or None,
                partition_filters=partition_filters, commit_properties=_commit_props(metadata),
            )
        return DeltaTable(str(table_path)).version()
    except BaseException:
        # Not referenced by any version: delete now rather than wait for vacuum.
        for m in moved:
            m.unlink(missing_ok=True)
        raise


def missing_files(table_path: str | Path, version: int) -> list[str]:
    """Files a (local) version references that are gone, e.g. vacuumed after its retention window."""
    if "://" in str(table_path):
        return []  # object stores: left to the reader's error
    return [p for p in active_files(table_path, version) if not (Path(table_path) / urllib.parse.unquote(p)).exists()]


def active_files(table_path: str | Path, version: int | None = None) -> list[str]:
    """Relative paths of the files of a version (as in the log)."""
    return [a["path"] for a in add_actions(table_path, version)]


def history(table_path: str | Path, limit: int | None = None) -> list[dict]:
    return open_table(table_path).history(limit)


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
        target = (h.get("operationParameters") or {}).get("version") if h.get("operation") == "RESTORE" else None
        v = int(target) if target is not None and int(target) < v else v - 1
    return out[::-1]
