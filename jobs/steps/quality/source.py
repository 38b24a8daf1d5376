"""What a gate reads, opened by the runner (`check`) and handed to the suite: `Warehouse`.

A suite never opens storage itself. Everything it judges comes through its
source: the Delta tables (one snapshot per table and version, so every read of
a check sees the same data), the model registry's pointer and manifests, the
staged inference shards of a day, and the item index versions. What a check
reads is listed in one place, and a suite can be run against any object with
these methods.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from userformer.jobs.core import registry
from userformer.jobs.core.config import Config
from userformer.jobs.core.errors import UserError
from userformer.jobs.core.storage import delta
from userformer.jobs.core.storage.files import location
from userformer.jobs.steps import infer
from userformer.jobs.steps.quality.suites import MissingData


class Warehouse:
    """The warehouse of one configuration, read for one check (see the module doc)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._snapshots: dict[tuple[str, int | None], delta.Snapshot] = {}

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
        snap = self._table(table)
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

    def staged_schema(self, folder: str, name: str) -> pa.Schema:
        with (location(folder) / name).open("rb") as f:
            return pq.read_schema(f)

    def staged_table(self, folder: str, name: str, columns: list[str]) -> pa.Table:
        with (location(folder) / name).open("rb") as f:
            return pq.read_table(f, columns=columns)

    def staged_batches(self, folder: str, name: str, columns: list[str]) -> Iterator[pa.Table]:
        """A staged file of a shard (local, or in the warehouse's bucket) in batches (bounded memory)."""
        with (location(folder) / name).open("rb") as f:
            for b in pq.ParquetFile(f).iter_batches(batch_size=65536, columns=columns):
                yield pa.Table.from_batches([b])

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


def _index_step():
    # Imported when used: the index step runs its gate on what it builds, so it imports the check runner.
    from userformer.jobs.steps import index

    return index
