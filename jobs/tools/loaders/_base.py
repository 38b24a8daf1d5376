"""What every loader shares: defensive CSV reading, vectorised parsing, contract tables, stats."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from userformer.jobs.core.errors import UserError
from userformer.schemas import tables

log = logging.getLogger("userformer.jobs.tools.loaders")

# Seconds since the epoch that still print as ISO dates (years 1..9999). Anything
# inside passes through, so that ingest can quarantine an absurd time with a
# reason; anything outside cannot even be written as a timestamp and is skipped.
_TS_MIN_S = int(dt.datetime(1, 1, 1, tzinfo=dt.UTC).timestamp())
_TS_MAX_S = int(dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC).timestamp())

_INT_RE = r"^\s*[+-]?\d{1,18}\s*$"
_FLOAT_RE = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"


# ------------------------------------------------------------------ inputs
def require_file(path, what: str = "input") -> Path:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} file not found: {p}")
    return p


def refuse_items(fmt: str, items_path) -> None:
    if items_path is not None:
        raise UserError(
            f"format {fmt} has no separate item file: its item attributes come from the events (drop --items)"
        )


def header_names(path: Path, delimiter: str) -> list[str]:
    """Column names of a header line; RecBole's typed names ('user_id:token') lose the type."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        first = f.readline().rstrip("\r\n")
    return [n.strip().split(":", 1)[0] for n in first.split(delimiter)]


def read_csv_strings(
    path: Path, names: list[str], *, header: bool, delimiter: str = ",", quoting: bool = True
) -> tuple[pa.Table, int]:
    """Every column as string (null when empty); rows with the wrong field count are skipped and counted.

    Reading as text and parsing afterwards keeps one bad value from failing the
    whole file, as a typed read would.
    """
    bad: list = []

    def on_invalid(row):
        if not bad:
            log.warning(
                "%s: skipping malformed row (%d fields, expected %d): %.120r",
                path.name,
                row.actual_columns,
                row.expected_columns,
                row.text,
            )
        bad.append(row.number)
        return "skip"

    try:
        t = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1 if header else 0),
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter, quote_char='"' if quoting else False, invalid_row_handler=on_invalid
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names}, strings_can_be_null=True, quoted_strings_can_be_null=True
            ),
        )
    except pa.ArrowInvalid as exc:
        raise UserError(f"{path}: cannot read as CSV: {exc}") from None
    return t, len(bad)


def check_columns(path: Path, have, need) -> None:
    missing = [c for c in need if c not in have]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}; has {list(have)}")


# ----------------------------------------------------------------- parsing
def null_if_empty(a):
    return pc.if_else(pc.equal(a, ""), pa.scalar(None, a.type), a)


def to_int(a):
    """int64; null where the text is not an integer."""
    if pa.types.is_integer(a.type):
        return pc.cast(a, pa.int64())
    ok = pc.match_substring_regex(a, _INT_RE)
    return pc.cast(pc.utf8_trim_whitespace(pc.if_else(ok, a, pa.scalar(None, a.type))), pa.int64())


def to_float(a):
    """float64; null where the text is not a number."""
    if pa.types.is_integer(a.type) or pa.types.is_floating(a.type):
        return pc.cast(a, pa.float64())
    ok = pc.match_substring_regex(a, _FLOAT_RE)
    return pc.cast(pc.utf8_trim_whitespace(pc.if_else(ok, a, pa.scalar(None, a.type))), pa.float64())


def seconds_to_ts(secs):
    """Unix seconds (int or float) -> timestamp[us, UTC]; null outside years 1..9999."""
    inside = pc.and_(pc.greater_equal(secs, _TS_MIN_S), pc.less_equal(secs, _TS_MAX_S))
    secs = pc.if_else(inside, secs, pa.scalar(None, secs.type))
    if pa.types.is_integer(secs.type):
        us = pc.multiply(pc.cast(secs, pa.int64()), 1_000_000)
    else:
        us = pc.cast(pc.round(pc.multiply(secs, 1e6)), pa.int64())
    return pc.cast(us, tables.TS)


def map_values(a, mapping: dict[str, str]):
    """Vectorised dict lookup; values not in the mapping pass through unchanged."""
    keys = pa.array(list(mapping), pa.string())
    vals = pa.array(list(mapping.values()), pa.string())
    return pc.coalesce(pc.take(vals, pc.index_in(a, value_set=keys)), a)


def unmapped(a, mapping: dict[str, str]) -> dict[str, int]:
    """Counts of the values a mapping does not know (passed through for ingest to reject)."""
    rest = pc.filter(a, pc.invert(pc.is_in(a, value_set=pa.array(list(mapping), pa.string()))))
    return {r["values"]: r["counts"] for r in pc.value_counts(rest).to_pylist() if r["values"] is not None}


# ------------------------------------------------------------------ tables
def _nullable(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f.with_nullable(True) for f in schema], metadata=schema.metadata)


def _build(schema: pa.Schema, cols: dict) -> pa.Table:
    """A table of `schema` (all nullable for now) from columns by name; absent columns are null."""
    n = len(next(iter(cols.values())))
    arrays = []
    for f in schema:
        a = cols.get(f.name)
        if a is None:
            a = pa.nulls(n, f.type)
        elif isinstance(a, pa.ChunkedArray):
            a = a.combine_chunks()
        arrays.append(pc.cast(a, f.type))
    return pa.Table.from_arrays(arrays, schema=_nullable(schema))


def events_table(cols: dict, skipped: dict[str, int]) -> pa.Table:
    """RAW_EVENTS from columns by name; rows lacking a required value are dropped and counted in `skipped`."""
    t = _build(tables.RAW_EVENTS, cols)
    keep = pa.array([True] * len(t), pa.bool_())
    for name in tables.RAW_EVENTS_REQUIRED:
        lost = pc.and_(keep, pc.is_null(t[name]))
        n = pc.sum(pc.cast(lost, pa.int64())).as_py() or 0
        if n:
            reason = f"{name} missing or unparseable"
            skipped[reason] = skipped.get(reason, 0) + n
            log.warning("skipping %d row(s): %s", n, reason)
            keep = pc.and_(keep, pc.invert(lost))
    return t.filter(keep).cast(tables.RAW_EVENTS)


def items_table(cols: dict) -> pa.Table:
    """RAW_ITEMS from columns by name; rows without item_id are dropped, a repeated item keeps its last row."""
    t = _build(tables.RAW_ITEMS, cols)
    t = t.filter(pc.is_valid(t["item_id"]))
    if len(t) and pc.count_distinct(t["item_id"]).as_py() < len(t):
        pos = t.append_column("_i", pa.array(range(len(t)), pa.int64()))
        last = pos.group_by("item_id", use_threads=False).aggregate([("_i", "max")])["_i_max"]
        t = t.take(last)
    return t.cast(tables.RAW_ITEMS)


def last_per_item(t: pa.Table, item_col: str, cols: list[str], order_by: str) -> pa.Table:
    """Per item, the last non-null value of each column in `order_by` order (latest snapshot wins)."""
    t = t.select([item_col, order_by, *cols]).filter(pc.is_valid(t[item_col]))
    t = t.take(pc.sort_indices(t, sort_keys=[(order_by, "ascending")]))
    g = t.group_by(item_col, use_threads=False).aggregate([(c, "last") for c in cols])
    return g.select([item_col, *(f"{c}_last" for c in cols)]).rename_columns([item_col, *cols])


# ------------------------------------------------------------------- stats
def make_stats(
    fmt: str, path: Path, rows_in: int, events: pa.Table, items: pa.Table, skipped: dict[str, int], **extra
) -> dict:
    ts = events["ts"]
    first, last = (pc.min(ts).as_py(), pc.max(ts).as_py()) if len(events) else (None, None)
    return {
        "format": fmt,
        "input": str(path),
        "rows_read": rows_in,
        "events": len(events),
        "users": pc.count_distinct(events["user_id"]).as_py(),
        "items": pc.count_distinct(events["item_id"], mode="only_valid").as_py(),
        "catalogue_items": len(items),
        "first_ts": first.isoformat() if first else None,
        "last_ts": last.isoformat() if last else None,
        "skipped": dict(skipped),
        "rows_skipped": sum(skipped.values()),
        **extra,
    }
