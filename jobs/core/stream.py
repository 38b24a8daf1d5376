"""The warehouse as model input: catalogue and vocabulary as of a day, and user_sequences streamed in chunks.

Nothing here materialises the whole ``user_sequences`` table. A
`DeltaSequences` source pins one version of it and reads the Parquet files
that version's log lists, row group by row group, `chunk_users` rows at a
time. Per epoch the order of row groups is shuffled and up to `INTERLEAVE`
row groups are open at once, the next chunk drawn from one of them at random
(weighted by what each has left), so chunks of different files mix; the rows of
a chunk are shuffled by the batcher (data.batches). Memory is bounded by
INTERLEAVE x (one chunk decoded + a reader's buffer), whatever the table size.

"As of day D": the vocabulary and the catalogue are the rows with
``first_dt <= D`` (ids are append-only, so this is exactly the vocabulary of
that day; attributes are the current ones), and user_sequences is read at the
last version that applied a drop <= D (Delta time travel), so a model trained
"as of D" sees what the pipeline had on D even after later drops landed.

Users are sampled by a stable hash of their id (`user_buckets`), never by
position: the same users land in validation / held-out / replay whatever the
file layout, the chunk size or the machine.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from userformer.jobs.core.errors import UserError
from userformer.jobs.core.storage import delta
from userformer.models.data import (
    INT_FIELDS,
    ITEM_ATTRS,
    EvalSet,
    ItemCatalog,
    Sequences,
    from_sequences_table,
    item_counts,
    time_split,
)
from userformer.models.metrics import RankingAccumulator
from userformer.schemas.tables import SEQUENCE_ARRAYS

# Row groups read at once while streaming (the mixing width of the chunk order).
INTERLEAVE = 4
COLUMNS = ["user_id", *SEQUENCE_ARRAYS, "updated_dt"]


# ------------------------------------------------------------- sampling
def user_buckets(user_ids, salt: str) -> np.ndarray:
    """A stable pseudo-random number in [0, 1) per user id (blake2b of salt + id): the same on every machine."""
    salt_b = salt.encode()
    out = np.empty(len(user_ids), np.float64)
    for i, u in enumerate(user_ids):
        h = hashlib.blake2b(str(u).encode(), digest_size=8, key=salt_b[:64]).digest()
        out[i] = int.from_bytes(h, "big") / 2.0**64
    return out


def vocab_sizes(vocab: pa.Table, day: dt.date | None = None) -> dict[str, int]:
    """Vocabulary size (max id + 1) of every kind the model embeds, counting ids first seen on or before `day`."""
    if day is not None:
        vocab = vocab.filter(pc.less_equal(vocab["first_dt"], pa.scalar(day, pa.date32())))
    sizes = {k: 1 for k in INT_FIELDS}
    if vocab.num_rows:
        agg = vocab.group_by("kind").aggregate([("idx", "max")]).to_pylist()
        for r in agg:
            if r["kind"] in sizes:
                sizes[r["kind"]] = int(r["idx_max"]) + 1
    return sizes


@dataclass
class Catalog:
    catalog: ItemCatalog
    versions: dict  # table -> Delta version read
    day: dt.date | None


def warehouse_catalog(cfg, day: dt.date | None = None, versions: dict | None = None) -> Catalog:
    """The item catalogue and vocabulary sizes as of `day` (None: everything), from `items` + `vocab` (their
    current versions, or `versions` = {"items": v, "vocab": v} to re-read exactly what a run read)."""
    vpath, ipath = cfg.table_path("vocab"), cfg.table_path("items")
    for p in (vpath, ipath):
        if not delta.exists(p):
            raise UserError(f"no {p.name} table at {p}: run `userformer ingest --dt D` first")
    versions = versions or {}
    vv = versions.get("vocab", delta.version_of(vpath))
    iv = versions.get("items", delta.version_of(ipath))
    try:
        sizes = vocab_sizes(delta.read_arrow(vpath, vv), day)
        items = delta.read_arrow(ipath, iv, columns=["item_idx", "first_dt", *[f"{a}_idx" for a in ITEM_ATTRS]])
    except (OSError, delta.StorageError) as exc:
        raise UserError(f"cannot read vocab version {vv} / items version {iv} (vacuumed?): {exc}") from None
    if day is not None:
        items = items.filter(pc.less_equal(items["first_dt"], pa.scalar(day, pa.date32())))
    n = sizes["item"]
    idx = items["item_idx"].to_numpy().astype(np.int64)
    if len(idx) and idx.max() >= n:
        raise UserError(
            f"items at {ipath} has item ids up to {idx.max()} but vocab at {vpath} only up to {n - 1}: "
            "the tables are inconsistent (rerun `userformer ingest`)"
        )
    attrs = {}
    for a in ITEM_ATTRS:
        arr = np.zeros(n, np.int64)
        arr[idx] = pc.fill_null(items[f"{a}_idx"], 0).to_numpy(zero_copy_only=False)
        attrs[a] = arr
        sizes[a] = max(sizes[a], int(arr.max(initial=0)) + 1)
    return Catalog(ItemCatalog(attrs, sizes), {"items": iv, "vocab": vv}, day)


@dataclass
class _Piece:
    file: delta.DataFile
    row_group: int
    start: int  # the row group's first physical row in its file (where its slice of the keep-mask starts)
    physical: int  # rows stored in the row group, deleted ones included
    rows: int  # rows a reader sees: physical minus those a deletion vector deletes

    @property
    def path(self) -> str:
        return self.file.path


class DeltaSequences:
    """One pinned version of user_sequences as chunks of Sequences (see module doc).

    `t_max`: training uses only events before it; `t_min`: and none before this one (a
    training window). `select(table) -> bool mask`:
    which rows (users) of a chunk take part. `chunks(rng)` yields the training
    part of every chunk; `summarise()` must run once first (item counts for
    logQ / popularity, the number of trainable sequences) and can feed the
    full chunks to visitors (e.g. `WindowUsers`) in the same pass.
    """

    def __init__(
        self,
        path: str | Path,
        version: int,
        chunk_users: int,
        *,
        t_max: float | None = None,
        select: Callable[[pa.Table], np.ndarray] | None = None,
        min_len: int = 2,
        interleave: int = INTERLEAVE,
        t_min: float | None = None,
    ):
        self.path, self.version, self.chunk_users = path, version, chunk_users
        self.t_max, self.select, self.min_len, self.interleave = t_max, select, min_len, interleave
        self.t_min = t_min
        self.real_time = True
        self.pieces: list[_Piece] = []
        # Spark's MERGE marks replaced rows in deletion vectors instead of rewriting files: a piece keeps
        # the slice of its file's keep-mask that covers its row group's physical rows.
        try:
            files = delta.data_files(path, version)
        except Exception as exc:  # the version's log or deletion vectors are gone; the message says which
            raise UserError(
                f"cannot read user_sequences version {version} ({str(exc).splitlines()[0][:300]}): "
                "vacuumed after storage.retention_days? read a later version"
            ) from None
        # Files in an order set by what they hold, not by their (random) names or the log's order of them: the
        # same table content gives the same chunks, hence the same model, in any warehouse.
        for f in sorted(files, key=lambda f: (f.rows, f.stats, f.path)):
            try:
                md = pq.ParquetFile(f.path).metadata
            except FileNotFoundError:
                raise UserError(
                    f"user_sequences version {version} lacks its file {f.path} (vacuumed after "
                    "storage.retention_days?): read a later version"
                ) from None
            start = 0
            for rg in range(md.num_row_groups):
                n = md.row_group(rg).num_rows
                m = f.mask(start, n)
                kept = n if m is None else int(m.sum())
                if kept:
                    self.pieces.append(_Piece(f, rg, start, n, kept))
                start += n
        self.n_rows = sum(p.rows for p in self.pieces)  # logical rows (what Spark or Polars would count)
        self.n_users = self.n_sequences = None
        self._counts = None

    # -- raw reading
    def _read(self, piece: _Piece) -> Iterator[pa.Table]:
        pf = pq.ParquetFile(piece.path, buffer_size=1 << 20, pre_buffer=False)
        at = piece.start
        for b in pf.iter_batches(batch_size=self.chunk_users, row_groups=[piece.row_group], columns=COLUMNS):
            t = pa.Table.from_batches([b])
            m = piece.file.mask(at, b.num_rows)
            at += b.num_rows
            if m is not None:
                t = t.filter(pa.array(m))
            if t.num_rows:
                yield t

    def tables(self, rng: np.random.Generator | None = None) -> Iterator[pa.Table]:
        """The selected rows, chunk by chunk: in file order, or shuffled and interleaved with `rng`."""
        order = deque(rng.permutation(len(self.pieces)).tolist() if rng is not None else range(len(self.pieces)))
        width = self.interleave if rng is not None else 1
        open_: list[list] = []  # [reader, chunks left (weight)]
        while order or open_:
            while order and len(open_) < width:
                p = self.pieces[order.popleft()]
                open_.append([self._read(p), math.ceil(p.rows / self.chunk_users)])
            if rng is not None and len(open_) > 1:
                w = np.array([max(o[1], 1) for o in open_], np.float64)
                k = int(rng.choice(len(open_), p=w / w.sum()))
            else:
                k = 0
            t = next(open_[k][0], None)
            if t is None:
                open_.pop(k)
                continue
            open_[k][1] -= 1
            if self.select is not None:
                t = t.filter(pa.array(np.asarray(self.select(t), bool)))
            if t.num_rows:
                yield t

    def training_part(self, seqs: Sequences) -> Sequences:
        """Events in [t_min, t_max); users with at least `min_len` of them."""
        if self.t_max is not None and self.t_min is not None:
            seqs = seqs.take_events((seqs.ts >= self.t_min) & (seqs.ts < self.t_max))
        elif self.t_max is not None:
            seqs = seqs.take_events(seqs.ts < self.t_max)
        elif self.t_min is not None:
            seqs = seqs.take_events(seqs.ts >= self.t_min)
        return seqs.take_users(np.flatnonzero(seqs.lengths >= self.min_len))

    def summarise(self, n_items: int, visitors: tuple = ()) -> DeltaSequences:
        """One pass in file order: item counts and trainable sequences; every visitor gets (table, Sequences)."""
        counts, n_seq, n_users = np.zeros(n_items + 1), 0, 0
        for t in self.tables():
            seqs = from_sequences_table(t)
            for v in visitors:
                v(t, seqs)
            tr = self.training_part(seqs)
            counts += item_counts(tr, n_items)
            n_seq += len(tr)
            n_users += len(seqs)
        self._counts, self.n_sequences, self.n_users = counts, n_seq, n_users
        return self

    # -- the training-source protocol (models/train.py: fit)
    def item_counts(self, n_items: int) -> np.ndarray:
        if self._counts is None:
            self.summarise(n_items)
        c = self._counts
        return c[: n_items + 1] if len(c) >= n_items + 1 else np.concatenate([c, np.zeros(n_items + 1 - len(c))])

    def chunks(self, rng: np.random.Generator | None = None) -> Iterator[Sequences]:
        for t in self.tables(rng):
            tr = self.training_part(from_sequences_table(t))
            if len(tr):
                yield tr


# --------------------------------------------------------- window users
def concat_sequences(parts: list[Sequences]) -> Sequences:
    parts = [p for p in parts if p is not None]
    if not parts:
        return Sequences(
            np.zeros(0, object),
            np.zeros(1, np.int64),
            {k: np.zeros(0, np.int64) for k in INT_FIELDS},
            np.zeros(0),
            np.zeros(0, np.float32),
        )
    offs, base = [np.zeros(1, np.int64)], 0
    for p in parts:
        offs.append(p.offsets[1:] + base)
        base += int(p.offsets[-1])
    return replace(
        parts[0],
        user_ids=np.concatenate([p.user_ids for p in parts]),
        offsets=np.concatenate(offs),
        ints={k: np.concatenate([p.ints[k] for p in parts]) for k in parts[0].ints},
        ts=np.concatenate([p.ts for p in parts]),
        duration=np.concatenate([p.duration for p in parts]),
    )


def take_eval(ev: EvalSet, rows: np.ndarray) -> EvalSet:
    rows = np.asarray(rows, np.int64)
    return EvalSet(
        ev.history.take_users(rows),
        ev.targets[rows],
        None if ev.target_sets is None else [ev.target_sets[i] for i in rows],
        None if ev.target_event_type is None else ev.target_event_type[rows],
        None if ev.ref_ts is None else ev.ref_ts[rows],
    )


def concat_eval(parts: list[EvalSet]) -> EvalSet:
    return EvalSet(
        concat_sequences([p.history for p in parts]),
        np.concatenate([p.targets for p in parts]) if parts else np.zeros(0, np.int64),
        [s for p in parts for s in p.target_sets],
        np.concatenate([p.target_event_type for p in parts]) if parts else np.zeros(0, np.int64),
        np.concatenate([p.ref_ts for p in parts]) if parts else np.zeros(0),
    )


@dataclass
class WindowUsers:
    """Collects, chunk by chunk, the users with item events in [start, end): their history before `start`
    (possibly empty: cold users stay), every item of the window as a positive, embedded at `start`.

    `keep(table) -> mask`: which rows may be collected. At most `cap` users are kept: the ones with the
    smallest hash (a uniform sample that does not depend on the order the chunks come in)."""

    start: float
    end: float
    cap: int
    keep: Callable[[pa.Table], np.ndarray] | None = None
    salt: str = "sample"
    total: int = 0
    _parts: list = field(default_factory=list)
    _hashes: list = field(default_factory=list)

    def __call__(self, table: pa.Table, seqs: Sequences) -> None:
        rows = np.arange(len(seqs)) if self.keep is None else np.flatnonzero(np.asarray(self.keep(table), bool))
        if not len(rows):
            return
        s = seqs.take_users(rows)
        s = s.take_events(s.ts < self.end)
        _, ev = time_split(s, self.start, self.end - self.start)
        if not len(ev.targets):
            return
        self.total += len(ev.targets)
        self._parts.append(ev)
        self._hashes.append(user_buckets(ev.history.user_ids, self.salt))
        if sum(len(h) for h in self._hashes) > 2 * self.cap:
            self._prune()

    def _prune(self) -> None:
        h = np.concatenate(self._hashes)
        ev = concat_eval(self._parts)
        keep = np.sort(np.argsort(h, kind="stable")[: self.cap])
        self._parts, self._hashes = [take_eval(ev, keep)], [h[keep]]

    def result(self) -> EvalSet:
        """The collected users, ordered by user id."""
        if not self._parts:
            return concat_eval([])
        self._prune()
        ev = self._parts[0]
        return take_eval(ev, np.argsort(ev.history.user_ids.astype(str), kind="stable"))


# ------------------------------------------------------------ baselines
def evaluate_counts(
    counts: np.ndarray, ev: EvalSet, catalog: ItemCatalog, category: str = "category_l2", chunk: int = 2048
) -> dict:
    """Most-popular in the same harness as train.evaluate: every user gets `counts` (per item id) as scores."""
    c = np.zeros(catalog.n_items + 1)
    n = min(len(counts), len(c))
    c[:n] = counts[:n]
    scores = torch.from_numpy(c).float()
    acc = RankingAccumulator(catalog.n_items, catalog.attrs.get(category))
    targets = torch.as_tensor(ev.targets, dtype=torch.long)
    for i in range(0, len(targets), chunk):
        acc.add_shared(scores, targets[i : i + chunk], ev.target_sets[i : i + chunk])
    return acc.result()


@torch.no_grad()
def evaluate_embeddings(
    users: torch.Tensor,
    items: torch.Tensor,
    ev: EvalSet,
    catalog: ItemCatalog,
    category: str = "category_l2",
    chunk: int = 2048,
) -> dict:
    """Full-catalogue metrics of given user embeddings against given item vectors (e.g. stale users x new items)."""
    acc = RankingAccumulator(catalog.n_items, catalog.attrs.get(category))
    targets = torch.as_tensor(ev.targets, dtype=torch.long)
    for i in range(0, len(users), chunk):
        acc.add_embeddings(users[i : i + chunk], items, targets[i : i + chunk], ev.target_sets[i : i + chunk])
    return acc.result()
