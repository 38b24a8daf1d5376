"""What a gate reads, opened by the runner (`check`) and handed to the suite: `Warehouse`.

A suite never opens storage itself. Everything it judges comes through its
source: the Delta tables (one snapshot per table and version, so every read of
a check sees the same data), the model registry's pointer and manifests, the
staged inference shards of a day, and the item index versions. What a check
reads is listed in one place, and a suite can be run against any object with
these methods.

`Staged` is the warehouse as it will be once a writer's commit lands: the
writer (ingest, sequences) hands it the rows it is about to commit, and the
gate judges them before the commit, so that rows failing a gate never become
visible (write, audit, publish).

Suites read rows with `scan`: batches of at most ``quality.batch_rows`` rows
(jobs/steps/quality/streams.py), never a whole table or day at once; `read`
is left to the index check, which searches all item vectors exactly as the
index it checks holds them.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq

from userformer.jobs.core import registry
from userformer.jobs.core.config import Config
from userformer.jobs.core.errors import UserError
from userformer.jobs.core.storage import delta
from userformer.jobs.core.storage.files import location
from userformer.jobs.steps import infer
from userformer.jobs.steps.quality.streams import read_rows, rebatch
from userformer.jobs.steps.quality.suites import MissingData


class Warehouse:
    """The warehouse of one configuration, read for one check (see the module doc)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._snapshots: dict[tuple[str, int | None], delta.Snapshot] = {}

    @property
    def batch_rows(self) -> int:
        """Rows read and judged at once (``quality.batch_rows``)."""
        return self.cfg.quality.batch_rows

    # ------------------------------------------------------------ Delta tables
    def _table(self, table: str, version: int | None = None) -> delta.Snapshot:
        """`table` at `version` (None: the version current when it is first read, then kept for the check)."""
        key = (table, version)
        if key not in self._snapshots:
            path = self.cfg.table_path(table)
            if not delta.exists(path):
                raise MissingData(f"table {table} does not exist at {path}")
            self._snapshots[key] = delta.Snapshot(path, version)
        return self._snapshots[key]

    def exists(self, table: str) -> bool:
        try:
            self._table(table)
        except MissingData:
            return False
        return True

    def schema(self, table: str) -> pa.Schema:
        return self._table(table).schema

    def version(self, table: str) -> int:
        return self._table(table).version

    def read(self, table: str, columns: list[str], filter=None, version: int | None = None) -> pa.Table:
        """Rows of the table (deletion vectors applied); `filter` is a pyarrow.dataset expression."""
        return self._table(table, version).to_table(columns, filter)

    def scan(self, table: str, columns: list[str], filter=None, version: int | None = None) -> Iterator[pa.Table]:
        """The rows `read` returns, in order, in tables of at most ``quality.batch_rows`` rows; at least one
        (empty when no row matches). Reads at most that many rows (and 65536) at once."""
        snap = self._table(table, version)
        empty = pa.schema([snap.schema.field(c) for c in columns])
        yield from rebatch(snap.scan(columns, filter, read_rows(self.batch_rows)), self.batch_rows, empty)

    def count_rows(self, table: str, filter=None, version: int | None = None) -> int:
        return self._table(table, version).count_rows(filter)

    def take(self, table: str, rows: np.ndarray, columns: list[str]) -> pa.Table:
        """The rows at these positions (ascending) of the table's current snapshot."""
        return self._table(table).take(rows, columns)

    def drops(self, table: str) -> set[datetime.date]:
        """The drop dates whose ingest commit the table's current version holds (an empty drop has no partition)."""
        self._table(table)
        return {
            datetime.date.fromisoformat(c["dt"])
            for c in delta.lineage(self.cfg.table_path(table))
            if c.get("step") == "ingest" and c.get("dt")
        }

    def partition_rows(self, table: str) -> dict[datetime.date, int]:
        """Rows a reader sees per dt, from the log (per-file counts minus deleted rows), without reading data.

        Spark's MERGE and DELETE leave deleted rows in the files of its tables (events, events_rejected,
        user_sequences), which the log's `num_records` still counts."""
        return self._partition_rows(self._table(table))

    @staticmethod
    def _partition_rows(snap: delta.Snapshot) -> dict[datetime.date, int]:
        out: dict[datetime.date, int] = {}
        for day, n in delta.partition_rows(snap.path, "dt", snap.version).items():
            day = datetime.date.fromisoformat(day) if isinstance(day, str) else day
            out[day] = out.get(day, 0) + n
        return out

    # ---------------------------------------------------------- model registry
    def published_model(self) -> str:
        """The published model version."""
        try:
            ptr = registry.published(self.cfg)
        except UserError as exc:
            raise MissingData(str(exc)) from None
        if ptr is None:
            raise MissingData(f"no published model under {self.cfg.models_root}: nothing can have been inferred")
        return ptr["version"]

    def model_config(self, version: str) -> dict:
        """The model configuration a registered version was trained with."""
        try:
            return dict(registry.read_manifest(self.cfg, version)["model_config"])
        except (UserError, KeyError, TypeError, ValueError) as exc:
            raise MissingData(f"cannot read the model configuration of {version}: {exc}") from None

    # ------------------------------------------------------- staged inference
    def staged_dir(self, day: datetime.date, model_version: str) -> str:
        return str(infer.day_dir(self.cfg, day, model_version))

    def staged_shards(self, day: datetime.date, model_version: str, shards: int) -> list[dict | None]:
        """The manifest of each shard 0..shards-1 (with "path", the folder of its files); None for a shard
        that is missing or was never completed."""
        return [infer.read_manifest(infer.shard_dir(self.cfg, day, model_version, i, shards)) for i in range(shards)]

    def staged_parts(self, manifest: dict, table: str) -> list[str]:
        """The files holding a staged shard's `table` (one in-process, one per partition from Spark executors)."""
        return [str(p) for p in infer.staged_parts(manifest, table)]

    def staged_schema(self, file: str) -> pa.Schema:
        with location(file).open("rb") as f:
            return pq.read_schema(f)

    def staged_table(self, file: str, columns: list[str]) -> pa.Table:
        with location(file).open("rb") as f:
            return pq.read_table(f, columns=columns)

    def staged_batches(self, parts: list[str], columns: list[str]) -> Iterator[pa.Table]:
        """Staged files of a shard (local, or in the warehouse's bucket) in batches of at most
        ``quality.batch_rows`` rows (bounded memory)."""
        for file in parts:
            with location(file).open("rb") as f:
                for b in pq.ParquetFile(f).iter_batches(batch_size=read_rows(self.batch_rows), columns=columns):
                    yield pa.Table.from_batches([b])

    def staged_rows(self, parts: list[str]) -> int:
        """Rows of staged files, from their Parquet footers (no data read)."""
        n = 0
        for file in parts:
            with location(file).open("rb") as f:
                n += pq.ParquetFile(f).metadata.num_rows
        return n

    # ------------------------------------------------------------- item index
    def current_index(self) -> str | None:
        """The CURRENT item index version, None when no index is current."""
        try:
            ptr = _index_step().current(self.cfg)
        except UserError as exc:
            raise MissingData(str(exc)) from None
        return None if ptr is None else ptr["version"]

    def item_index(self, version: str):
        """An item index version, opened (`jobs.steps.index.ItemIndex`)."""
        try:
            return _index_step().open_version(self.cfg, version)
        except UserError as exc:
            raise MissingData(str(exc)) from None


# ------------------------------------------------------------------ staged rows
@dataclass
class Change:
    """Rows a writer is about to commit to a table, in one commit on the version it read (`version`; -1: the
    commit creates the table). They replace the rows of that version that `replaces` selects (a pyarrow
    expression; None: they are added). `rows` is a table in memory, or a pyarrow dataset of staged files (a
    rebuild's rows, read only as far as a suite asks)."""

    rows: pa.Table | pds.Dataset
    replaces: pc.Expression | None
    version: int
    drop: datetime.date | None = None  # the commit is the ingest of this drop date

    def staged(self, columns: list[str], filter=None) -> pa.Table:
        if isinstance(self.rows, pa.Table):
            return (self.rows if filter is None else self.rows.filter(filter)).select(columns)
        return self.rows.to_table(columns=columns, filter=filter)

    def batches(self, columns: list[str], filter=None, rows: int = 65_536) -> Iterator[pa.Table]:
        """The staged rows `staged` returns, at most `rows` at a time (a table in memory is filtered slice by
        slice, not copied whole)."""
        if isinstance(self.rows, pa.Table):
            for start in range(0, self.rows.num_rows, rows):
                part = self.rows.slice(start, rows)
                yield (part if filter is None else part.filter(filter)).select(columns)
            return
        for b in self.rows.to_batches(columns=columns, filter=filter, batch_size=rows):
            yield pa.Table.from_batches([b])


class Staged(Warehouse):
    """The warehouse as it will be once the staged `changes` commit (table -> `Change`); other tables as they are.

    What a suite reads of a changed table is the version the writer read, minus the rows the change replaces,
    plus the staged rows: what a reader will see after the commit, judged before it."""

    def __init__(self, cfg: Config, changes: dict[str, Change]):
        super().__init__(cfg)
        self.changes = changes

    def _committed(self, table: str) -> delta.Snapshot | None:
        v = self.changes[table].version
        return None if v < 0 else self._table(table, v)

    def exists(self, table: str) -> bool:
        return table in self.changes or super().exists(table)

    def schema(self, table: str) -> pa.Schema:
        if table not in self.changes:
            return super().schema(table)
        snap = self._committed(table)  # the commit keeps an existing table's schema
        return self.changes[table].rows.schema if snap is None else snap.schema

    def version(self, table: str) -> int:
        return self.changes[table].version if table in self.changes else super().version(table)

    def read(self, table: str, columns: list[str], filter=None, version: int | None = None) -> pa.Table:
        if table not in self.changes or version is not None:
            return super().read(table, columns, filter, version)
        change, snap = self.changes[table], self._committed(table)
        schema = self.schema(table)
        # One type per column for both parts (nullable: the staged rows are judged, not trusted).
        target = pa.schema([schema.field(c).with_nullable(True) for c in columns])
        staged = change.staged(columns, filter).cast(target)
        if snap is None:
            return staged
        keep = None if change.replaces is None else ~change.replaces
        where = keep if filter is None else (filter if keep is None else filter & keep)
        return pa.concat_tables([snap.to_table(columns, where).cast(target), staged])

    def scan(self, table: str, columns: list[str], filter=None, version: int | None = None) -> Iterator[pa.Table]:
        if table not in self.changes or version is not None:
            yield from super().scan(table, columns, filter, version)
            return
        change, snap = self.changes[table], self._committed(table)
        schema = self.schema(table)
        target = pa.schema([schema.field(c).with_nullable(True) for c in columns])  # as in `read`
        n = read_rows(self.batch_rows)

        def parts() -> Iterator[pa.Table]:
            if snap is not None:
                keep = None if change.replaces is None else ~change.replaces
                where = keep if filter is None else (filter if keep is None else filter & keep)
                for t in snap.scan(columns, where, n):
                    yield t.cast(target)
            for t in change.batches(columns, filter, n):
                yield t.cast(target)

        yield from rebatch(parts(), self.batch_rows, target)

    def count_rows(self, table: str, filter=None, version: int | None = None) -> int:
        if table not in self.changes or version is not None:
            return super().count_rows(table, filter, version)
        return sum(t.num_rows for t in self.scan(table, [self.schema(table).names[0]], filter))

    def take(self, table: str, rows: np.ndarray, columns: list[str]) -> pa.Table:
        if table not in self.changes:
            return super().take(table, rows, columns)
        return self.read(table, columns).take(pa.array(rows))

    def drops(self, table: str) -> set[datetime.date]:
        if table not in self.changes:
            return super().drops(table)
        change = self.changes[table]
        before = set() if change.version < 0 else super().drops(table)
        return before | ({change.drop} if change.drop else set())

    def partition_rows(self, table: str) -> dict[datetime.date, int]:
        if table not in self.changes:
            return super().partition_rows(table)
        change, snap = self.changes[table], self._committed(table)
        out = {} if snap is None else self._partition_rows(snap)
        n = read_rows(self.batch_rows)
        if snap is not None and change.replaces is not None:
            for day, k in _counts(snap.scan(["dt"], change.replaces, n)).items():
                out[day] = out.get(day, 0) - k
        for day, k in _counts(change.batches(["dt"], None, n)).items():
            out[day] = out.get(day, 0) + k
        return {d: k for d, k in out.items() if k > 0}


def _counts(batches) -> dict[datetime.date, int]:
    """Rows per dt of a stream of tables with a dt column."""
    out: dict[datetime.date, int] = {}
    for t in batches:
        for r in pc.value_counts(t["dt"].cast(pa.date32())).to_pylist():
            out[r["values"]] = out.get(r["values"], 0) + r["counts"]
    return out


def _index_step():
    # Imported when used: the index step runs its gate on what it builds, so it imports the check runner.
    from userformer.jobs.steps import index

    return index
