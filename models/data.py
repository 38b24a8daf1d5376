"""Per-user sequences as flat numpy arrays, splits, and padded torch batches.

One in-memory form serves every source: the ``user_sequences`` Delta table
(parallel list columns, schemas/tables.py) or a loader's raw events + items
(the benchmark files), so training and evaluation never care where data came
from. Ragged sequences are stored CSR-style: flat arrays + ``offsets``.

Padding is on the LEFT: the newest event is always the last column, so the
user embedding for inference is simply position -1, and positions are counted
from the end (recency), which makes outputs independent of the padding length.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

# Integer feature arrays of a sequence (vocabulary ids, 0 = none/unknown) and
# their names in the user_sequences table.
INT_FIELDS = ("item", "category_l1", "category_l2", "category_l3", "brand", "event_type", "surface")
_TABLE_COL = {
    "item": "item_idx",
    "category_l1": "category_l1_idx",
    "category_l2": "category_l2_idx",
    "category_l3": "category_l3_idx",
    "brand": "brand_idx",
    "event_type": "event_type_idx",
    "surface": "surface_idx",
}
ITEM_ATTRS = ("category_l1", "category_l2", "category_l3", "brand")


@dataclass
class ItemCatalog:
    """Attributes per item index (row 0 = padding/unknown), and vocabulary sizes (max id + 1)."""

    attrs: dict[str, np.ndarray]  # name -> int64 array of length n_items + 1
    sizes: dict[str, int]  # vocabulary size of every INT_FIELDS kind

    @property
    def n_items(self) -> int:
        """Number of real items (ids 1..n_items)."""
        return self.sizes["item"] - 1


@dataclass
class Sequences:
    """Users' event sequences, oldest first, as flat arrays with CSR offsets."""

    user_ids: np.ndarray  # (U,) object
    offsets: np.ndarray  # (U+1,) int64
    ints: dict[str, np.ndarray]  # INT_FIELDS -> (N,) int64
    ts: np.ndarray  # (N,) float64 seconds since the epoch
    duration: np.ndarray  # (N,) float32, NaN unknown
    real_time: bool = True  # False for order-only data (times only keep the order)
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take_events(self, keep: np.ndarray) -> Sequences:
        """A copy with only the events where `keep` (a (N,) bool mask) holds; users keep their rows."""
        user_of = np.repeat(np.arange(len(self)), self.lengths)
        counts = np.bincount(user_of[keep], minlength=len(self))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return replace(
            self,
            offsets=offsets,
            ints={k: v[keep] for k, v in self.ints.items()},
            ts=self.ts[keep],
            duration=self.duration[keep],
        )

    def take_users(self, rows: np.ndarray) -> Sequences:
        rows = np.asarray(rows, dtype=np.int64)
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        idx = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if len(rows) else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
        return replace(
            self,
            user_ids=self.user_ids[rows],
            offsets=offsets,
            ints={k: v[idx] for k, v in self.ints.items()},
            ts=self.ts[idx],
            duration=self.duration[idx],
        )

    def position_in_user(self) -> np.ndarray:
        """(N,) index of every event within its user's sequence."""
        return np.arange(len(self.ts)) - np.repeat(self.offsets[:-1], self.lengths)


# ----------------------------------------------------------------- sources
def _ts_seconds(a) -> np.ndarray:
    a = a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a
    return pc.cast(pc.cast(a, pa.timestamp("us")), pa.int64()).to_numpy(zero_copy_only=False) / 1e6


def from_sequences_table(table: pa.Table, real_time: bool = True) -> Sequences:
    """From rows in the user_sequences schema (parallel list columns)."""

    def flat(name):
        col = table[name].combine_chunks()
        return pc.list_flatten(col)

    lengths = pc.list_value_length(table["item_idx"].combine_chunks()).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(np.nan_to_num(lengths))]).astype(np.int64)
    ints = {
        k: pc.fill_null(flat(col), 0).to_numpy(zero_copy_only=False).astype(np.int64) for k, col in _TABLE_COL.items()
    }
    dur = flat("duration_s").to_numpy(zero_copy_only=False).astype(np.float32)
    return Sequences(
        np.asarray(table["user_id"].to_pylist(), dtype=object),
        offsets,
        ints,
        _ts_seconds(flat("ts")),
        dur,
        real_time=real_time,
    )


def _encode(values: pa.Array) -> tuple[np.ndarray, list]:
    """Strings -> ids 1..K in order of first appearance (0 for null)."""
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    enc = pc.dictionary_encode(values)
    codes = pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64) + 1
    return codes, enc.dictionary.to_pylist()


def from_raw(events: pa.Table, items: pa.Table, real_time: bool = True) -> tuple[Sequences, ItemCatalog]:
    """From a loader's raw tables (RAW_EVENTS, RAW_ITEMS): builds in-memory vocabularies like ingest does
    (ids from 1 in order of first appearance, 0 = unknown) and orders every user's events by time."""
    item_ids = pa.concat_arrays(
        [
            pc.cast(events["item_id"].combine_chunks(), pa.string()),
            pc.cast(items["item_id"].combine_chunks(), pa.string()),
        ]
    )
    codes, item_vocab = _encode(item_ids)
    ev_item, it_item = codes[: len(events)], codes[len(events) :]
    n_items = len(item_vocab) + 1
    attrs, sizes = {}, {"item": n_items}
    for a in ITEM_ATTRS:
        col = items[a] if a in items.column_names else pa.nulls(len(items), pa.string())
        c, vocab = _encode(pc.cast(col, pa.string()))
        arr = np.zeros(n_items, np.int64)
        arr[it_item] = c
        attrs[a] = arr
        sizes[a] = len(vocab) + 1
    ints = {"item": ev_item}
    for a in ITEM_ATTRS:
        ints[a] = attrs[a][ev_item]
    for k, col in (("event_type", "event_type"), ("surface", "surface")):
        c, vocab = _encode(pc.cast(events[col], pa.string()))
        ints[k], sizes[k] = c, len(vocab) + 1
    ts = _ts_seconds(events["ts"])
    user_codes, user_vocab = _encode(pc.cast(events["user_id"], pa.string()))
    order = np.lexsort((ts, user_codes))  # stable: ties keep file order
    user_codes = user_codes[order]
    counts = np.bincount(user_codes, minlength=len(user_vocab) + 1)[1:]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    dur = (
        events["duration_s"].to_numpy(zero_copy_only=False).astype(np.float32)
        if "duration_s" in events.column_names
        else np.full(len(events), np.nan, np.float32)
    )
    seqs = Sequences(
        np.asarray(user_vocab, dtype=object),
        offsets,
        {k: v[order] for k, v in ints.items()},
        ts[order],
        dur[order],
        real_time=real_time,
        extra={"item_vocab": item_vocab},
    )
    return seqs, ItemCatalog(attrs, sizes)


# ------------------------------------------------------------------ splits
@dataclass
class EvalSet:
    """Users to evaluate: the history each one is embedded from, and their target item(s)."""

    history: Sequences
    targets: np.ndarray  # (U,) item id of the (first) target
    target_sets: list | None = None  # per user, all positives (time split); None = just `targets`
    target_event_type: np.ndarray | None = None  # (U,) event type id of the (first) target event
    ref_ts: np.ndarray | None = None  # (U,) time each user is embedded at (time split: the split time)
    # Rank only items not in the user's history (S3-Rec's and the eSASRec benchmark's protocol; right where an
    # item is consumed once, wrong where users repeat, e.g. views).
    exclude_history: bool = False


def leave_one_out(seqs: Sequences, min_len: int = 3) -> tuple[Sequences, EvalSet, EvalSet]:
    """Order-only protocol (SASRec, S3-Rec, eSASRec): per user the last event is the test target, the one
    before it the validation target; training sees everything before the validation target. The test
    history includes the validation item. Users shorter than `min_len` are only trained on."""
    n = seqs.lengths
    pos = seqs.position_in_user()
    rev = np.repeat(n, n) - 1 - pos  # 0 = newest event
    ok = np.repeat(n >= min_len, n)
    train = seqs.take_events(~ok | (rev >= 2))
    users = np.flatnonzero(n >= min_len)
    last = seqs.offsets[1:] - 1
    ev = seqs.take_users(users)
    ev_pos = ev.position_in_user()
    ev_rev = np.repeat(ev.lengths, ev.lengths) - 1 - ev_pos
    et = seqs.ints["event_type"]
    valid = EvalSet(
        ev.take_events(ev_rev >= 2), seqs.ints["item"][last[users] - 1], target_event_type=et[last[users] - 1]
    )
    test = EvalSet(ev.take_events(ev_rev >= 1), seqs.ints["item"][last[users]], target_event_type=et[last[users]])
    return train, valid, test


def time_split(seqs: Sequences, t_split: float, horizon_s: float) -> tuple[Sequences, EvalSet]:
    """Time protocol (PinnerFormer, MCM): train on events before `t_split`; evaluate users with an item
    event in [t_split, t_split + horizon_s), embedded from their history before `t_split` (which may be
    empty: cold users are kept), every item in the window is a positive."""
    train = seqs.take_events(seqs.ts < t_split)
    in_win = (seqs.ts >= t_split) & (seqs.ts < t_split + horizon_s) & (seqs.ints["item"] > 0)
    user_of = np.repeat(np.arange(len(seqs)), seqs.lengths)
    order = np.argsort(user_of[in_win], kind="stable")
    its, us = seqs.ints["item"][in_win][order], user_of[in_win][order]
    ets = seqs.ints["event_type"][in_win][order]
    users = np.unique(us)
    lo, hi = np.searchsorted(us, users, side="left"), np.searchsorted(us, users, side="right")
    sets = [np.unique(its[a:b]) for a, b in zip(lo, hi)]
    first = its[lo] if len(users) else np.zeros(0, np.int64)  # the first positive in time
    hist = train.take_users(users)
    return train, EvalSet(
        hist, first, sets, ets[lo] if len(users) else np.zeros(0, np.int64), np.full(len(users), float(t_split))
    )


def time_protocol(
    seqs: Sequences, valid_at: float, test_at: float, horizon_s: float
) -> tuple[Sequences, EvalSet, EvalSet]:
    """Time-based train / validation / test (PinnerFormer): train on events before `valid_at`; validation
    (early stopping only) = positives in [valid_at, test_at), embedded from history before `valid_at`; test =
    positives in [test_at, test_at + horizon_s), embedded from ALL history before `test_at` (events the model
    was not trained on are read as input, as the daily pipeline does with a model trained earlier)."""
    if not valid_at < test_at:
        raise ValueError(f"validation time {valid_at} must be before test time {test_at}")
    train, valid = time_split(seqs, valid_at, test_at - valid_at)
    _, test = time_split(seqs, test_at, horizon_s)
    return train, valid, test


# ----------------------------------------------------------------- batches
def pad_batch(
    seqs: Sequences, rows: np.ndarray, max_len: int, ref_ts: np.ndarray | None = None, keep: int = 0, trim: bool = True
) -> dict[str, torch.Tensor]:
    """The newest `max_len` events of users `rows`, LEFT-padded into (B, max_len) tensors.

    `keep`: when > 0, the newest `keep` events are dropped first (kept out of the input).
    `trim`: narrow the batch to its longest row (most sequences are far shorter than max_len).
    `ref_ts`: per user, the time the user is embedded at (the time-to-reference feature's reference: the
    pipeline's as-of time, a time split's split time), never before the user's newest kept event (a later
    event moves it there); default: the newest kept event.
    Returns ints (long), ts/duration (float), `mask` (True = real event), `from_start` (B,) (the row holds
    the user's first event).
    """
    rows = np.asarray(rows, np.int64)
    ends = seqs.offsets[rows + 1] - keep
    starts = np.maximum(seqs.offsets[rows], ends - max_len)
    lens = np.maximum(ends - starts, 0)
    if trim:  # only as wide as the longest row: positions count from the end, so this changes nothing
        max_len = max(int(lens.max(initial=0)), 1)
    col = np.arange(max_len)[None, :]
    first_col = (max_len - lens)[:, None]
    valid = col >= first_col
    src = np.where(valid, starts[:, None] + col - first_col, 0)

    def take(a, fill):  # a set of users without a single event has nothing to index
        return np.where(valid, a[src], fill) if len(a) else np.full(valid.shape, fill, a.dtype)

    out = {k: torch.from_numpy(take(v, 0)) for k, v in seqs.ints.items()}
    ts = take(seqs.ts, 0.0)
    out["ts"] = torch.from_numpy(ts)
    out["duration"] = torch.from_numpy(take(seqs.duration, np.nan).astype(np.float32))
    out["mask"] = torch.from_numpy(valid)
    # The window starts at the user's first event (nothing older was cut off): training then also learns
    # to predict that first event from an empty history (the cold-start embedding, see model.py).
    out["from_start"] = torch.from_numpy((starts == seqs.offsets[rows]) & (lens > 0))
    newest = np.where(lens > 0, ts[:, -1], 0.0)
    out["ref_ts"] = torch.from_numpy(newest if ref_ts is None else np.maximum(np.asarray(ref_ts, np.float64), newest))
    return out


def batches(
    n: int, batch_size: int, rng: np.random.Generator | None = None, lengths: np.ndarray | None = None, bucket: int = 32
):
    """Row index arrays of size `batch_size` (shuffled when `rng` is given). With `lengths`, rows are sorted
    by length within windows of `bucket` batches, so a batch pads to similar lengths (trimmed batches are
    then far narrower), and the batch order is shuffled again."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    if lengths is None:
        for i in range(0, n, batch_size):
            yield order[i : i + batch_size]
        return
    win = batch_size * bucket
    out = []
    for i in range(0, n, win):
        w = order[i : i + win]
        w = w[np.argsort(lengths[w], kind="stable")]
        out.extend(w[j : j + batch_size] for j in range(0, len(w), batch_size))
    for k in rng.permutation(len(out)) if rng is not None else range(len(out)):
        yield out[k]


def item_counts(seqs: Sequences, n_items: int) -> np.ndarray:
    """Occurrences of every item id in the training events (for logQ and most-popular)."""
    return np.bincount(seqs.ints["item"], minlength=n_items + 1)[: n_items + 1].astype(np.float64)


# --------------------------------------------------------------- training sources
class MemorySource:
    """In-memory Sequences as a training source: one chunk, the whole thing (no RNG drawn)."""

    def __init__(self, seqs: Sequences, min_len: int = 2):
        self.seqs, self.min_len, self.real_time = seqs, min_len, seqs.real_time

    @property
    def n_sequences(self) -> int:
        return int((self.seqs.lengths >= self.min_len).sum())

    def item_counts(self, n_items: int) -> np.ndarray:
        return item_counts(self.seqs, n_items)

    def chunks(self, rng: np.random.Generator | None = None) -> Iterator[Sequences]:
        yield self.seqs


def as_source(train):
    """A training source from Sequences (in memory) or anything with `chunks(rng)` (e.g. DeltaSequences)."""
    return train if hasattr(train, "chunks") else MemorySource(train)
