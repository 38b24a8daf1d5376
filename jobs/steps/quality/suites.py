"""Expectation suites per table, built from the Arrow schemas (schemas.tables) and the config.

A suite builder reads what it needs through the source the runner (jobs/steps/check.py) hands it,
a `Warehouse` (jobs/steps/quality/source.py), turns what Great Expectations cannot express directly
(array properties, row counts, ratios) into plain pandas columns, and returns a
`Plan`: pandas frames with the GE expectations to evaluate on each, plus the
few outcomes decided outside GE (column types, skipped checks), which are
reported the same way.

To gate another table: write ``def my_table(cfg, dt, src) -> Plan`` and add it
to SUITES; ``userformer check`` picks it up. Not only tables: ``index`` gates
an item index version (jobs/steps/quality/index.py).

GE and pandas are imported inside the builders: importing GE takes seconds and
the CLI imports this module just to list the table names.

**Memory.** No suite holds a whole table, a whole day or all the ids of a
table. Rows reach GE as `Stream` frames of at most ``quality.batch_rows``
rows, read as they are evaluated (`Warehouse.scan`); uniqueness (event_id
within a day, user_id over user_sequences) is judged by GE on hash partitions
of the id column, about ``quality.ids_per_pass`` ids each, one pass over that
column per partition (jobs/steps/quality/streams.py). Day- and table-level
numbers (row counts, rejects by reason) are counted as the rows stream by and
judged by GE on a one-row "metrics" frame. A check holds about
``batch_rows`` rows of the frame being judged (plus one read of at most 65536
rows) or ``ids_per_pass`` ids; it costs one read of the rows, plus
ceil(rows / ids_per_pass) reads of the id column.
"""

from __future__ import annotations

import datetime as _dt
import functools
import statistics
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from userformer.schemas import tables

if TYPE_CHECKING:
    from userformer.jobs.core.config import Config
    from userformer.jobs.steps.quality.source import Warehouse


class MissingData(Exception):
    """The table, or the rows of the date, to check are not there: the check fails with this message."""


@dataclass
class Batch:
    """A pandas frame and the GE expectations to evaluate on it."""

    name: str
    frame: Any  # pandas.DataFrame
    expectations: list
    # Expectations with meta {"examples": "ids"} (checks of derived boolean
    # columns) show the ids of the failing rows instead of the values (False).
    id_column: str | None = None


@dataclass
class Stream:
    """The GE expectations to evaluate on each frame of a sequence of bounded frames (row batches of at most
    ``quality.batch_rows`` rows, or the hash partitions of a key for uniqueness: jobs/steps/quality/streams.py).

    The runner validates every frame with the same suite and reports one result per expectation: element,
    unexpected and missing counts summed, examples in frame order up to ``quality.examples``. `frames` is read
    once, when the runner reaches the stream; it gives at least one frame (an empty one when there is no row),
    so that an empty day still reports every expectation."""

    name: str
    frames: Iterable  # of pandas.DataFrame
    expectations: list
    id_column: str | None = None  # as Batch.id_column
    # A column of each row's position among all rows, for frames that are not consecutive runs of rows (hash
    # partitions): the examples are then the first in that order, as one frame of all rows would give them.
    position: str | None = None


POSITION = "_row"  # the position column of hash-partitioned frames (Stream.position)


@dataclass
class Outcome:
    """A check decided outside GE, or skipped; reported like an expectation."""

    expectation: str
    kwargs: dict
    success: bool
    unexpected_count: int | None = None
    element_count: int | None = None
    examples: list = field(default_factory=list)
    description: str = ""
    note: str = ""
    skipped: bool = False
    scope: str = ""  # what it was evaluated on, like Batch.name


@dataclass
class Plan:
    table: str
    dt: _dt.date
    items: list = field(default_factory=list)  # Batch | Stream | Outcome, in report order
    facts: dict = field(default_factory=dict)  # context for the reader of the report (counts, medians)


IDS = {"examples": "ids"}


# ------------------------------------------------------------------ helpers
def _norm(t: pa.DataType) -> pa.DataType:
    """Physical variants that mean the same to us (large/view strings, list field names) compare equal."""
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t) or pa.types.is_large_list_view(t):
        return pa.list_(_norm(t.value_type))
    if pa.types.is_map(t):
        return pa.map_(_norm(t.key_type), _norm(t.item_type))
    return t


def type_check(table: str, expected: pa.Schema, actual: pa.Schema) -> tuple[Outcome, set[str]]:
    """Compare the stored schema with the contract. Returns the outcome and the columns that are unusable."""
    problems, bad = [], set()
    for f in expected:
        if f.name not in actual.names:
            problems.append(f"{f.name}: missing (expected {f.type})")
            bad.add(f.name)
        elif _norm(actual.field(f.name).type) != _norm(f.type):
            problems.append(f"{f.name}: {actual.field(f.name).type} (expected {f.type})")
            bad.add(f.name)
    problems += [f"{name}: not in the schema" for name in actual.names if name not in expected.names]
    outcome = Outcome(
        "expect_column_types_to_match_schema",
        {"schema": table},
        success=not problems,
        unexpected_count=len(problems),
        element_count=len(expected),
        examples=problems,
        description=f"every column has the type schemas.tables declares for {table}",
        scope="schema",
    )
    return outcome, bad


def _columns_used(e) -> set[str]:
    kw = e.configuration.kwargs
    cols = {kw.get(k) for k in ("column", "column_A", "column_B")}
    cond_col = getattr(getattr(e, "row_condition", None), "column", None)
    cols.add(getattr(cond_col, "name", None))
    return cols - {None}


def without_columns(expectations: list, bad: set[str], scope: str) -> tuple[list, list[Outcome]]:
    """Drop expectations on unusable columns (the type check already failed on them) and say so."""
    kept, skipped = [], []
    for e in expectations:
        hit = sorted(_columns_used(e) & bad)
        if not hit:
            kept.append(e)
            continue
        kw = {k: v for k, v in e.configuration.kwargs.items() if k != "batch_id"}
        skipped.append(
            Outcome(
                e.configuration.type,
                kw,
                success=True,
                skipped=True,
                description=e.description or "",
                note=f"skipped: column {', '.join(hit)} is missing or has the wrong type",
                scope=scope,
            )
        )
    return kept, skipped


def _day_start(d: _dt.date) -> _dt.datetime:
    return _dt.datetime.combine(d, _dt.time(), _dt.UTC)


def _dt_is(d: _dt.date, col: str = "dt") -> pc.Expression:
    return pc.field(col) == pa.scalar(d, pa.date32())


def _frames(tables: Iterable[pa.Table], derive: Callable[[pa.Table], Any] | None = None) -> Iterator:
    """pandas frames of a stream of Arrow tables (`derive`: table -> frame, default its columns as they are)."""
    for t in tables:
        yield derive(t) if derive else t.to_pandas()


def _unique_frames(src: Warehouse, table: str, key: str, filter=None, version: int | None = None) -> Iterator:
    """The `key` column of the table's rows (those `filter` selects), as frames of its hash partitions: every copy
    of an id in one frame, so that GE's uniqueness of each frame, summed, is that of the whole column."""
    from userformer.jobs.steps.quality.streams import partitions

    rows = src.count_rows(table, filter=filter, version=version)
    read = functools.partial(src.scan, table, [key], filter, version)
    for _, _, part in partitions(read, [key], rows, src.cfg.quality.ids_per_pass, position=POSITION):
        yield part.to_pandas()


def _known(parts) -> str:
    ds = sorted(parts)
    return f"{len(ds)} partitions, {ds[0]}..{ds[-1]}" if ds else "no partitions"


# ------------------------------------------------------------------- events
def events(cfg: Config, day: _dt.date, src: Warehouse) -> Plan:
    """The accepted events of drop date `dt` (partition dt=D), and the day's counts against history."""
    import pandas as pd
    from great_expectations import expectations as E
    from great_expectations.expectations.row_conditions import Column

    actual = src.schema("events")
    rows_by_dt = src.partition_rows("events")
    if day not in rows_by_dt:
        if day not in src.drops("events"):
            raise MissingData(f"events has no partition dt={day} ({_known(rows_by_dt)}); was ingest run for {day}?")
        # Ingested, no accepted event: the day-level checks judge it (the row-count band fails it unless
        # quality.row_count_band starts at 0, for sites with quiet days).
        rows_by_dt = {**rows_by_dt, day: 0}
    plan = Plan("events", day)
    types, bad = type_check("events", tables.EVENTS, actual)
    plan.items.append(types)
    if "dt" in bad:
        return plan  # cannot select the day's rows; the type check says why

    required = [f.name for f in tables.EVENTS if not f.nullable]
    idx_cols = [f.name for f in tables.EVENTS if f.name.endswith("_idx")]
    columns = [c for c in dict.fromkeys([*required, "item_id", *idx_cols]) if c not in bad]
    n = src.count_rows("events", filter=_dt_is(day))

    ic = cfg.ingest
    earliest = _day_start(day) - _dt.timedelta(days=ic.max_late_days)
    latest = _day_start(day) + _dt.timedelta(days=1, seconds=ic.future_tolerance_s)
    is_item = Column("event_type").is_in(list(ic.item_event_types))
    rows = [E.ExpectColumnValuesToNotBeNull(column=c, description=f"{c} is required") for c in required]
    unique = [E.ExpectColumnValuesToBeUnique(column="event_id", description="no event twice in the partition")]
    rows += [
        E.ExpectColumnValuesToBeInSet(
            column="event_type",
            value_set=list(ic.event_types),
            description="event_type is one the contract knows (ingest.event_types)",
        ),
        E.ExpectColumnValuesToNotBeNull(
            column="item_id", row_condition=is_item, description="item events (ingest.item_event_types) name their item"
        ),
        E.ExpectColumnValuesToBeBetween(
            column="item_idx",
            min_value=1,
            row_condition=is_item,
            description="item events have a real item id (item_idx > 0)",
        ),
    ]
    rows += [
        E.ExpectColumnValuesToBeBetween(column=c, min_value=0, description="vocabulary ids are >= 0") for c in idx_cols
    ]
    rows.append(
        E.ExpectColumnValuesToBeBetween(
            column="ts",
            min_value=earliest,
            max_value=latest,
            description=f"ts from {ic.max_late_days} days before the drop date to its end + {ic.future_tolerance_s} s",
        )
    )
    rows, skipped = without_columns(rows, bad, "rows")
    plan.items.append(Stream("rows", _frames(src.scan("events", columns, filter=_dt_is(day))), rows))
    unique, skipped_unique = without_columns(unique, bad, "rows")
    if unique:  # across the day's batches: on hash partitions of the day's event ids
        plan.items.append(
            Stream("rows", _unique_frames(src, "events", "event_id", _dt_is(day)), unique, position=POSITION)
        )
    plan.items += skipped + skipped_unique

    # Day-level metrics, as a one-row frame so that GE still evaluates and reports them.
    metrics: dict[str, float] = {"row_count": n}
    exps, outcomes = [], []
    trailing = sorted(d for d in rows_by_dt if d < day)[-cfg.quality.trailing_days :]
    plan.facts["rows"] = n
    if trailing:
        median = statistics.median(rows_by_dt[d] for d in trailing)
        lo, hi = cfg.quality.row_count_band
        plan.facts["trailing_partitions"] = {str(d): rows_by_dt[d] for d in trailing}
        plan.facts["trailing_median"] = median
        exps.append(
            E.ExpectColumnValuesToBeBetween(
                column="row_count",
                min_value=lo * median,
                max_value=hi * median,
                description=f"rows of dt={day} within {lo}..{hi} x {median:g}, the median of the {len(trailing)} "
                f"previous partitions ({trailing[0]}..{trailing[-1]})",
            )
        )
    else:
        outcomes.append(
            Outcome(
                "expect_column_values_to_be_between",
                {"column": "row_count"},
                success=True,
                skipped=True,
                description="row count within quality.row_count_band x the median of the trailing days",
                note="not enough history: no events partition before this date",
                scope="metrics",
            )
        )
    try:
        by_reason: dict | None = {}
        for t in src.scan("events_rejected", ["reason"], filter=_dt_is(day)):
            for r in pc.value_counts(t.column("reason")).to_pylist():
                by_reason[r["values"]] = by_reason.get(r["values"], 0) + r["counts"]
    except MissingData as exc:
        by_reason = None
        for name in ("duplicate_ratio", "rejected_ratio"):
            outcomes.append(
                Outcome(
                    "expect_column_values_to_be_between",
                    {"column": name},
                    success=False,
                    description="needs the day's events_rejected rows",
                    note=str(exc),
                    scope="metrics",
                )
            )
    if by_reason is not None:
        raw = n + sum(by_reason.values())
        dup = by_reason.get("duplicate", 0)
        metrics["duplicate_ratio"] = dup / raw if raw else 0.0
        metrics["rejected_ratio"] = (raw - n - dup) / raw if raw else 0.0
        plan.facts.update(raw_rows=raw, rejected_by_reason=dict(sorted(by_reason.items())))
        q = cfg.quality
        exps += [
            E.ExpectColumnValuesToBeBetween(
                column="duplicate_ratio",
                min_value=0,
                max_value=q.max_duplicate_ratio,
                description=f"duplicates dropped ({dup}) / raw rows of the drop ({raw}) <= quality.max_duplicate_ratio",
            ),
            E.ExpectColumnValuesToBeBetween(
                column="rejected_ratio",
                min_value=0,
                max_value=q.max_rejected_ratio,
                description=f"contract violations ({raw - n - dup}) / raw rows of the drop ({raw}) "
                "<= quality.max_rejected_ratio",
            ),
        ]
    plan.facts["metrics"] = metrics
    if exps:
        plan.items.append(Batch("metrics", pd.DataFrame([metrics]), exps))
    plan.items += outcomes
    return plan


# ----------------------------------------------------------- user_sequences
def _lengths_match(data: pa.Table, arrays: list[str]) -> np.ndarray:
    ok = np.ones(data.num_rows, dtype=bool)
    for a in arrays:
        same = pc.equal(pc.list_value_length(data[a]), data["seq_len"])
        ok &= pc.fill_null(same, False).to_numpy(zero_copy_only=False)
    return ok


def _flat_int(arr: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """The list values as int64 (timestamps: microseconds) and a mask of the null ones."""
    flat = pc.list_flatten(arr)
    return pc.fill_null(flat.cast(pa.int64()), 0).to_numpy(), flat.is_null().to_numpy(zero_copy_only=False)


def _ts_sorted(ts: pa.ChunkedArray) -> np.ndarray:
    """Per row: the ts array ascending (vectorised over the flattened values; a null element is unsorted)."""
    arr = ts.combine_chunks()
    v, nulls = _flat_int(arr)
    parent = pc.list_parent_indices(arr).to_numpy()
    bad = np.zeros(len(arr), dtype=bool)
    down = (v[1:] < v[:-1]) & (parent[1:] == parent[:-1])
    bad[parent[1:][down]] = True
    bad[parent[nulls]] = True
    return ~bad


def _last_is(ts: pa.ChunkedArray, last: pa.ChunkedArray) -> np.ndarray:
    """Per row: last == ts[-1] (false for an empty or null array)."""
    arr = ts.combine_chunks()
    v, nulls = _flat_int(arr)
    lens = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
    if not len(v):
        return np.zeros(len(arr), dtype=bool)
    end = np.clip(np.cumsum(lens) - 1, 0, len(v) - 1)
    want = pc.fill_null(last.cast(pa.int64()), 0).to_numpy()
    want_null = last.is_null().to_numpy(zero_copy_only=False)
    return (lens > 0) & ~nulls[end] & ~want_null & (v[end] == want)


def user_sequences(cfg: Config, day: _dt.date, src: Warehouse) -> Plan:
    """The users refreshed on `dt` (updated_dt == D); user_id uniqueness over the whole table."""
    from great_expectations import expectations as E

    actual = src.schema("user_sequences")
    plan = Plan("user_sequences", day)
    types, bad = type_check("user_sequences", tables.USER_SEQUENCES, actual)
    plan.items.append(types)
    if "updated_dt" in bad:
        return plan  # cannot tell which rows belong to the day; the type check says why

    scalars = [f.name for f in tables.USER_SEQUENCES if not f.nullable and f.name != "user_id" and f.name not in bad]
    arrays = [a for a in tables.SEQUENCE_ARRAYS if a not in bad]
    columns = [c for c in ["user_id", *arrays, *scalars] if c not in bad]
    updated = _dt_is(day, "updated_dt")
    n = src.count_rows("user_sequences", filter=updated)
    # No refreshed rows is right only when drop D had no accepted events (an empty day).
    empty_day = n == 0 and src.partition_rows("events").get(day, 0) == 0
    if n == 0 and not empty_day:
        raise MissingData(f"user_sequences has no rows with updated_dt = {day}; was the sequences step run for {day}?")
    plan.facts["rows_updated"] = n
    if "user_id" not in bad:
        # Over the whole table, on hash partitions of its user ids (never all of them at once).
        plan.facts["users"] = src.count_rows("user_sequences")
        plan.items.append(
            Stream(
                "users",
                _unique_frames(src, "user_sequences", "user_id"),
                [
                    E.ExpectColumnValuesToNotBeNull(column="user_id", description="every row has a user"),
                    E.ExpectColumnValuesToBeUnique(
                        column="user_id", description="one row per user, over the whole table"
                    ),
                ],
                position=POSITION,
            )
        )

    if empty_day:
        plan.facts["note"] = f"events has no rows for {day}: no user to refresh"
        return plan
    derived = {  # flag -> (inputs, how, description)
        "arrays_match_seq_len": (
            [*tables.SEQUENCE_ARRAYS, "seq_len"],
            lambda data: _lengths_match(data, list(tables.SEQUENCE_ARRAYS)),
            "every array column has seq_len elements",
        ),
        "ts_sorted": (["ts"], lambda data: _ts_sorted(data["ts"]), "ts ascending within each row"),
        "last_event_ts_is_last_ts": (
            ["ts", "last_event_ts"],
            lambda data: _last_is(data["ts"], data["last_event_ts"]),
            "last_event_ts equals the last element of ts",
        ),
    }
    computed = {flag: how for flag, (inputs, how, _) in derived.items() if not set(inputs) & bad}

    def frame(data: pa.Table):
        """The batch's scalar columns and the flags derived from its arrays (the arrays themselves go)."""
        df = data.select([c for c in data.column_names if c not in tables.SEQUENCE_ARRAYS]).to_pandas()
        for flag, how in computed.items():
            df[flag] = how(data)
        return df

    rows = [E.ExpectColumnValuesToNotBeNull(column=c, description=f"{c} is required") for c in scalars]
    rows += [
        E.ExpectColumnValuesToBeBetween(
            column="seq_len",
            min_value=1,
            max_value=cfg.sequences.max_len,
            description="1 <= seq_len <= sequences.max_len",
        ),
        E.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="lifetime_events",
            column_B="seq_len",
            or_equal=True,
            description="lifetime_events >= seq_len (kept events are a subset)",
        ),
    ]
    for flag, (_, _, desc) in derived.items():
        rows.append(
            E.ExpectColumnValuesToBeInSet(
                column=flag, value_set=[True], meta=IDS, description=f"{desc} (examples: user_id)"
            )
        )
    # A flag whose inputs are unusable was not computed: skip its expectation like the others on bad columns.
    bad = bad | (set(derived) - set(computed))
    rows, skipped = without_columns(rows, bad, "rows")
    frames = _frames(src.scan("user_sequences", columns, filter=updated), frame)
    plan.items.append(Stream("rows", frames, rows, id_column="user_id" if "user_id" in columns else None))
    plan.items += skipped
    return plan


# ------------------------------------------------------------ model outputs
def outputs(cfg: Config, day: _dt.date, src: Warehouse, shards: int | None = None) -> Plan:
    """The staged inference outputs of drop D, before publishing (jobs/steps/quality/outputs.py)."""
    # Imported here: that module builds on this one's Batch, Plan and Outcome.
    from userformer.jobs.steps.quality.outputs import outputs as build

    return build(cfg, day, src, shards=shards)


# ---------------------------------------------------------------- item index
def index(cfg: Config, day: _dt.date, src: Warehouse, version: str | None = None) -> Plan:
    """An item index version, CURRENT by default: recall, vectors, ids, model version (jobs/steps/quality/index.py)."""
    # Imported here: it imports the index step (FAISS), which imports the check runner, which imports this module.
    from userformer.jobs.steps.quality.index import index as build

    return build(cfg, day, src, version=version)


# Table -> suite builder. `userformer check` offers exactly these tables.
SUITES: dict[str, Callable[..., Plan]] = {
    "events": events,
    "user_sequences": user_sequences,
    "outputs": outputs,
    "index": index,
}
