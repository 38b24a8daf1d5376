"""Ingest one drop: raw/events/dt=D (+ raw/items/dt=D) -> events, events_rejected, vocab, items.

The step is a transaction over day D:
  1. validate every raw file's footer and schema (a corrupt file, a missing
     required column or an impossible type stops the step before anything is
     written, with a message naming the file);
  2. in Spark: normalise types, check every row against the contract, drop
     duplicates (within the drop and against the previous drops' event ids),
     cap single-user bursts; failing rows get a reason;
  3. assign stable ids to new items / categories / brands / event types /
     surfaces (append-only vocab) and update the item catalogue;
  4. the events gate (the `events` suite of `userformer check`) judges the
     staged rows of D, as the tables will be after the commits: a failed gate
     raises GateFailed and commits nothing;
  5. commit events_rejected[dt=D] and events[dt=D] through delta-spark, each
     replacing that partition in one Delta commit, so a rerun of D replaces D.
Everything that can fail on bad input happens before the first commit. Drops
go in date order: a drop older than the last one user_sequences applied is
refused (past days are redone by a repair, which restores first). The events
commit records the drop's files (names and sizes); a drop of the lookback
window whose folder changed since (a file added late) stops the next ingest
with a clear error: it needs a repair, not a silent next day.
Two ingests at once on one warehouse: each commit lands on the version the
step read or fails with ConcurrentWrite (exit 75; rerunning is safe), so ids
are never handed out twice and no drop is silently replaced.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from userformer.jobs.core import drops, hooks, lease
from userformer.jobs.core.config import Config
from userformer.jobs.core.dates import date_arg
from userformer.jobs.core.errors import UserError
from userformer.jobs.core.spark import spark_session
from userformer.jobs.core.storage import delta
from userformer.schemas import tables

log = logging.getLogger(__name__)

# What a raw column may arrive as, beyond the contract's own type.
_STRING_OK = ("string", "large_string", "int8", "int16", "int32", "int64", "uint32", "uint64")
_NUMBER_OK = ("double", "float", "halffloat", "int8", "int16", "int32", "int64", "uint32", "uint64")


@dataclass(frozen=True)
class RawFile:
    path: Path
    rows: int
    ts_kind: str  # "timestamp", "timestamp_ns" or "string"
    columns: tuple  # (name, type) of the contract columns present: files read together must agree


def _type_name(t: pa.DataType) -> str:
    if pa.types.is_timestamp(t):
        return "timestamp"
    if pa.types.is_dictionary(t):
        return _type_name(t.value_type)
    return str(t)


def inspect_raw_files(raw_dir: Path) -> list[RawFile]:
    """Read each raw file's footer; refuse corrupt files and contract-breaking schemas."""
    if not raw_dir.is_dir():
        raise UserError(f"raw partition not found: {raw_dir}")
    paths = sorted(p for p in raw_dir.iterdir() if p.is_file() and not p.name.startswith((".", "_")))
    if not paths:
        raise UserError(f"raw partition {raw_dir} has no files")
    out = []
    for p in paths:
        if p.suffix != ".parquet":
            raise UserError(f"{p}: not a Parquet file (the raw contract is Parquet: *.parquet)")
        try:
            f = pq.ParquetFile(p)
            schema = f.schema_arrow
            rows = f.metadata.num_rows
        except Exception as exc:  # pyarrow raises several types for truncated/corrupt files
            raise UserError(f"{p}: unreadable Parquet file (truncated or corrupt?): {exc}") from None
        names = set(schema.names)
        missing = [c for c in tables.RAW_EVENTS_REQUIRED if c not in names]
        if missing:
            raise UserError(f"{p}: missing required column(s) {missing}; has {sorted(names)}")
        extra = sorted(names - set(tables.RAW_EVENTS.names))
        if extra:
            log.warning("%s: ignoring columns outside the raw contract: %s", p.name, extra)
        ts_kind = "timestamp"
        for field in tables.RAW_EVENTS:
            if field.name not in names:
                continue
            got = schema.field(field.name).type
            name = _type_name(got)
            if field.name == "ts":
                if pa.types.is_timestamp(got):
                    ts_kind = "timestamp_ns" if got.unit == "ns" else "timestamp"
                elif name in ("string", "large_string"):
                    ts_kind = "string"
                else:
                    raise UserError(f"{p}: column ts has type {got}; expected a timestamp or an ISO-8601 string")
            elif pa.types.is_string(field.type) and name not in _STRING_OK:
                raise UserError(f"{p}: column {field.name} has type {got}; expected string")
            elif pa.types.is_floating(field.type) and name not in _NUMBER_OK:
                raise UserError(f"{p}: column {field.name} has type {got}; expected a number")
        out.append(
            RawFile(
                p, rows, ts_kind, tuple((c, str(schema.field(c).type)) for c in tables.RAW_EVENTS.names if c in names)
            )
        )
    return out


def _read_raw(spark, files: list[RawFile]):
    """All raw files as one DataFrame of the contract's columns + ts_raw + source_file."""
    from pyspark.sql import functions as F

    groups: dict[tuple, list[str]] = {}
    for f in files:
        groups.setdefault((f.ts_kind, f.columns), []).append(str(f.path))
    frames = []
    for (ts_kind, typed), paths in sorted(groups.items()):
        cols = {name for name, _ in typed}
        df = spark.read.parquet(*paths)
        sel = {}
        for field in tables.RAW_EVENTS:
            if field.name == "ts":
                continue
            c = F.col(field.name) if field.name in cols else F.lit(None)
            sel[field.name] = c.cast("string" if pa.types.is_string(field.type) else "double")
        ts = F.col("ts")
        if ts_kind == "timestamp_ns":  # read as long nanoseconds (see jobs/core/spark.py)
            sel["ts"] = F.timestamp_micros(F.floor(ts / 1000).cast("long"))
            sel["ts_raw"] = F.date_format(sel["ts"], "yyyy-MM-dd'T'HH:mm:ss.SSSSSSXXX")
        elif ts_kind == "string":
            # ISO-8601 with or without zone; no zone means UTC (the session zone).
            sel["ts"] = F.coalesce(
                F.try_to_timestamp(F.trim(ts)),
                F.try_to_timestamp(F.trim(ts), F.lit("yyyy-MM-dd HH:mm:ss[.SSSSSS][ XXX][ zzz]")),
            )
            sel["ts_raw"] = ts
        else:
            sel["ts"] = ts.cast("timestamp")
            sel["ts_raw"] = F.date_format(ts, "yyyy-MM-dd'T'HH:mm:ss.SSSSSSXXX")
        sel["source_file"] = F.col("_metadata.file_name")
        frames.append(df.select(*[c.alias(n) for n, c in sel.items()]))
    df = frames[0]
    for f in frames[1:]:
        df = df.unionByName(f)
    return df


def _validate_rows(df, cfg: Config, day: dt.date):
    """Add `reason`/`detail` (null when the row is accepted). First failing rule wins; duplicates within the drop
    are quarantined here, those of earlier drops by `_mark_redelivered`, bursts by `_cap_bursts`."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    ic = cfg.ingest
    day_start = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
    latest = day_start + dt.timedelta(days=1, seconds=ic.future_tolerance_s)
    earliest = day_start - dt.timedelta(days=ic.max_late_days)
    # Parquet strings must be UTF-8, but a producer can write other bytes: such a row is rejected, and its strings
    # are stored with U+FFFD in place of the bad bytes (readers decode every row of events_rejected).
    texts = [f.name for f in tables.RAW_EVENTS if pa.types.is_string(f.type)]
    bad_utf8 = F.lit(False)
    for c in texts:
        bad_utf8 = bad_utf8 | ~F.coalesce(F.is_valid_utf8(c), F.lit(True))
    df = df.withColumn("_bad_utf8", bad_utf8)
    for c in texts:
        df = df.withColumn(c, F.make_valid_utf8(c))
    ids = ["event_id", "user_id", "item_id", "event_type", "surface"]
    longest = F.greatest(*[F.coalesce(F.char_length(c), F.lit(0)) for c in ids])
    df = df.withColumn("_longest", longest)
    df = (
        df.withColumn("user_id", F.nullif(F.trim("user_id"), F.lit("")))
        .withColumn("item_id", F.nullif(F.trim("item_id"), F.lit("")))
        .withColumn("event_type", F.lower(F.trim("event_type")))
        .withColumn("surface", F.nullif(F.lower(F.trim("surface")), F.lit("")))
    )
    item_types = list(ic.item_event_types)
    known = item_types + list(ic.non_item_event_types)
    rules = [
        ("invalid_utf8", F.col("_bad_utf8"), F.lit("a string column holds bytes that are not UTF-8")),
        (
            "too_long",
            F.col("_longest") > ic.max_id_chars,
            F.concat(
                F.lit("an id, event type or surface of "),
                F.col("_longest").cast("string"),
                F.lit(f" characters (limit {ic.max_id_chars})"),
            ),
        ),
        ("null_user_id", F.col("user_id").isNull(), F.lit("user_id is null or empty")),
        ("null_ts", F.col("ts_raw").isNull(), F.lit("ts is null")),
        ("unparseable_ts", F.col("ts").isNull(), F.concat(F.lit("cannot parse ts "), F.col("ts_raw"))),
        ("null_event_type", F.col("event_type").isNull() | (F.col("event_type") == ""), F.lit("event_type is null")),
        (
            "unknown_event_type",
            ~F.col("event_type").isin(known),
            F.concat(F.lit("unknown event_type "), F.col("event_type")),
        ),
        (
            "future_ts",
            F.col("ts") > F.lit(latest),
            F.concat(F.lit(f"ts after {latest.isoformat()}: "), F.col("ts_raw")),
        ),
        (
            "ts_too_old",
            F.col("ts") < F.lit(earliest),
            F.concat(F.lit(f"ts more than {ic.max_late_days} days before the drop: "), F.col("ts_raw")),
        ),
        (
            "missing_item_id",
            F.col("event_type").isin(item_types) & F.col("item_id").isNull(),
            F.lit("item event without item_id"),
        ),
        (
            "bad_duration",
            # NaN and +/-inf included (inf is above the limit, -inf below 0)
            (F.col("duration_s") < 0) | (F.col("duration_s") > ic.max_duration_s) | F.isnan("duration_s"),
            F.concat(F.lit("duration_s out of [0, %g]: " % ic.max_duration_s), F.col("duration_s").cast("string")),
        ),
    ]
    reason, detail = F.lit(None).cast("string"), F.lit(None).cast("string")
    for name, cond, msg in reversed(rules):
        reason = F.when(F.coalesce(cond, F.lit(False)), F.lit(name)).otherwise(reason)
        detail = F.when(F.coalesce(cond, F.lit(False)), msg).otherwise(detail)
    df = df.withColumn("reason", reason).withColumn("detail", detail)
    cut = F.col("reason") == "too_long"  # kept for the record, not whole: one row must not weigh megabytes
    for c in ids:
        df = df.withColumn(c, F.when(cut, F.substring(c, 1, ic.max_id_chars)).otherwise(F.col(c)))
    df = df.drop("_bad_utf8", "_longest")
    # Non-item actions carry no item: a stray item_id would create a phantom item.
    df = df.withColumn("item_id", F.when(F.col("event_type").isin(item_types), F.col("item_id")))

    # Content hash when the producer gave no id: the same event delivered twice hashes the same.
    content_id = F.sha1(
        F.concat_ws("|", "user_id", F.col("ts").cast("string"), "event_type", F.coalesce("item_id", F.lit("")))
    )
    df = df.withColumn("event_id", F.coalesce(F.nullif(F.trim("event_id"), F.lit("")), content_id))

    # Duplicates within the drop: keep the first by (ts, file); later copies are quarantined.
    # (A window over the whole drop: ranking only the duplicated ids via a join and a
    # union measured 3x slower, as each branch recomputes the read.)
    ok = F.col("reason").isNull()
    w = Window.partitionBy("event_id", ok).orderBy(F.col("ts").asc_nulls_last(), "source_file")
    df = df.withColumn("_rank", F.row_number().over(w))
    dup = ok & (F.col("_rank") > 1)
    df = df.withColumn("detail", F.when(dup, F.lit("duplicate event_id within the drop")).otherwise(F.col("detail")))
    df = df.withColumn("reason", F.when(dup, F.lit("duplicate")).otherwise(F.col("reason"))).drop("_rank")
    return df


def _mark_redelivered(df, lookback_ids):
    """Quarantine the accepted rows whose event_id an earlier drop of the lookback window already delivered.

    The lookback holds several drops' ids (7 x a day's): joining them with the day on the id text shuffles and
    sorts all of them. Only 64-bit hashes of the ids are shuffled instead, to find the ids of the lookback that
    may be the day's (normally a few); those rows are then read with their text and joined on it, so a hash
    collision never rejects an event. `df` is read twice (checkpoint it)."""
    from pyspark.sql import functions as F

    day_hashes = df.where(F.col("reason").isNull()).select(F.xxhash64("event_id").alias("_h"))
    hit = lookback_ids.select(F.xxhash64("event_id").alias("_h")).join(day_hashes, "_h", "left_semi").distinct()
    seen = (
        lookback_ids.withColumn("_h", F.xxhash64("event_id"))
        .join(hit, "_h", "left_semi")
        .select(F.col("event_id").alias("_seen_id"), F.col("dt").alias("_seen_dt"))
        .dropDuplicates(["_seen_id"])
    )
    df = df.join(seen, df.event_id == seen._seen_id, "left")
    prior = F.col("reason").isNull() & F.col("_seen_id").isNotNull()
    df = df.withColumn(
        "detail",
        F.when(prior, F.concat(F.lit("already delivered in drop dt="), F.col("_seen_dt").cast("string"))).otherwise(
            F.col("detail")
        ),
    )
    df = df.withColumn("reason", F.when(prior, F.lit("duplicate")).otherwise(F.col("reason")))
    return df.drop("_seen_id", "_seen_dt")


def _cap_bursts(df, cfg: Config):
    """Quarantine a user's accepted rows beyond ingest.max_events_per_user_per_day (the earliest go)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    # A single user flooding the drop (bot, replayed client buffer): keep the latest N events.
    cap = cfg.ingest.max_events_per_user_per_day
    ok = F.col("reason").isNull()
    wu = Window.partitionBy("user_id", ok).orderBy(F.col("ts").desc(), F.col("event_id").desc())
    df = df.withColumn("_rank", F.row_number().over(wu))
    burst = ok & (F.col("_rank") > cap)
    df = df.withColumn("detail", F.when(burst, F.lit(f"user over {cap} events in one drop")).otherwise(F.col("detail")))
    return df.withColumn("reason", F.when(burst, F.lit("user_burst")).otherwise(F.col("reason"))).drop("_rank")


# ------------------------------------------------------------------ vocab
def _load(cfg: Config, name: str, schema: pa.Schema) -> tuple[pa.Table, int]:
    """A small table as of its current version, and that version (-1: no table yet).

    vocab and items are rewritten from what was read here, so their commits must
    land on exactly this version: a concurrent ingest that committed first makes
    this one fail (ConcurrentWrite) instead of handing out the same ids again.
    """
    path = cfg.table_path(name)
    v = delta.version_of(path)
    if v is None:
        return schema.empty_table(), -1
    return delta.read_arrow(path, version=v), v


def extend_vocab(vocab: pa.Table, kind: str, keys, day: dt.date) -> tuple[pa.Table, dict]:
    """New keys of `kind` get the next ids, in sorted order (deterministic). Returns (new rows, key->id of all)."""
    mine = vocab.filter(pc.equal(vocab["kind"], kind))
    mapping = dict(zip(mine["key"].to_pylist(), mine["idx"].to_pylist()))
    new = sorted({k for k in keys if k is not None and k not in mapping})
    start = max(mapping.values(), default=0) + 1
    for i, k in enumerate(new):
        mapping[k] = start + i
    rows = pa.table(
        {
            "kind": [kind] * len(new),
            "key": new,
            "idx": list(range(start, start + len(new))),
            "first_dt": [day] * len(new),
        },
        schema=tables.VOCAB,
    )
    return rows, mapping


def _category_keys(snap):
    """Vocab keys of the category levels: a level's key is its path, so 'shoes' under two lines stays two ids."""
    l1, l2, l3 = (
        snap[c].where(snap[c].notna() & (snap[c] != "")) for c in ("category_l1", "category_l2", "category_l3")
    )
    k1 = l1
    k2 = (l1 + " > " + l2).where(l1.notna() & l2.notna())
    k3 = (l1 + " > " + l2 + " > " + l3).where(l1.notna() & l2.notna() & l3.notna())
    return [k1, k2, k3]


def read_raw_items(cfg: Config, day: dt.date) -> pa.Table | None:
    """The item snapshot delivered with drop D (optional), cast to RAW_ITEMS."""
    d = cfg.raw_items_dir(day)
    if not d.is_dir():
        return None
    parts = []
    for p in sorted(d.glob("*.parquet")):
        try:
            t = pq.read_table(p)
        except Exception as exc:
            raise UserError(f"{p}: unreadable Parquet file (truncated or corrupt?): {exc}") from None
        if "item_id" not in t.column_names:
            raise UserError(f"{p}: missing required column item_id")
        cols = {}
        for f in tables.RAW_ITEMS:
            if f.name in t.column_names:
                try:
                    cols[f.name] = t[f.name].cast(f.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise UserError(f"{p}: column {f.name} cannot be read as {f.type}: {exc}") from None
            else:
                cols[f.name] = pa.nulls(len(t), f.type)
        t = pa.table(cols, schema=tables.RAW_ITEMS)
        parts.append(t.filter(pc.is_valid(t["item_id"])))
    if not parts:
        return None
    t = pa.concat_tables(parts)
    # Last row per item wins (a snapshot may repeat an item).
    df = t.to_pandas().drop_duplicates("item_id", keep="last")
    return pa.Table.from_pandas(df, preserve_index=False)


def update_items(
    current: pa.Table, day: dt.date, snapshot: pa.Table | None, event_item_ids: list[str], vocab: pa.Table
):
    """New items table and new vocab rows after drop D (from the `current` items). Items seen only in events get
    unknown attributes."""
    import pandas as pd

    cur = current.to_pandas()
    snap = (snapshot if snapshot is not None else tables.RAW_ITEMS.empty_table()).to_pandas()
    attrs = ["category_l1", "category_l2", "category_l3", "brand", "title", "price"]

    unknown = sorted(set(event_item_ids) - set(cur["item_id"]) - set(snap["item_id"]))
    vocab_rows = []
    rows, item_map = extend_vocab(vocab, "item", list(snap["item_id"]) + unknown, day)
    vocab_rows.append(rows)
    snap["item_idx"] = snap["item_id"].map(item_map).astype("int64")
    for kind, keys in zip(("category_l1", "category_l2", "category_l3"), _category_keys(snap)):
        rows, mapping = extend_vocab(vocab, kind, keys.dropna().tolist(), day)
        vocab_rows.append(rows)
        snap[f"{kind}_idx"] = keys.map(mapping).fillna(0).astype("int32")
    brands = snap["brand"].where(snap["brand"].notna() & (snap["brand"] != ""))
    rows, mapping = extend_vocab(vocab, "brand", brands.dropna().tolist(), day)
    vocab_rows.append(rows)
    snap["brand_idx"] = brands.map(mapping).fillna(0).astype("int32")
    snap["has_metadata"] = True

    # A snapshot row changes the item only if an attribute differs (or it had none before).
    old = cur.set_index("item_id").reindex(snap["item_id"])
    same = pd.Series(True, index=snap.index)
    for a in attrs:
        o, n = old[a].to_numpy(), snap[a].to_numpy()
        same &= pd.Series((o == n) | (pd.isna(o) & pd.isna(n)), index=snap.index)
    same &= old["has_metadata"].eq(True).to_numpy()
    upd = snap[~same].copy()
    upd["first_dt"] = old.loc[upd["item_id"], "first_dt"].fillna(day).to_numpy() if len(upd) else []
    upd["updated_dt"] = day
    new_unknown = pd.DataFrame(
        {
            "item_id": unknown,
            "item_idx": [item_map[i] for i in unknown],
            "has_metadata": False,
            "first_dt": day,
            "updated_dt": day,
        }
    )
    for c in ("category_l1_idx", "category_l2_idx", "category_l3_idx", "brand_idx"):
        new_unknown[c] = 0
    parts = [cur[~cur["item_id"].isin(upd["item_id"])], upd, new_unknown]
    merged = pd.concat([p.reindex(columns=tables.ITEMS.names) for p in parts if len(p)], ignore_index=True)
    merged = (
        merged.sort_values("item_idx").reset_index(drop=True) if len(merged) else tables.ITEMS.empty_table().to_pandas()
    )
    items = pa.Table.from_pandas(merged, schema=tables.ITEMS, preserve_index=False)
    return items, pa.concat_tables(vocab_rows), {"items_changed": int(len(upd)), "items_unknown_new": len(unknown)}


# ------------------------------------------------------------------- main
@lease.writer("ingest")
def ingest(cfg: Config, day: dt.date, *, allow_empty: bool = False) -> dict:
    """Ingest the raw drop of `day` (see module doc). Returns counts."""
    from pyspark.sql import functions as F

    applied, _ = drops.last_drop(cfg.table_path("user_sequences"))
    if applied is not None and day < applied:
        raise UserError(
            f"user_sequences already includes drops up to {applied}: ingesting the older drop {day} now would "
            "process it out of date order (the later days were built without it, and deduplicated against drops "
            f"without it). Redo past days with a repair: `userformer repair --from {day} --to <latest drop> "
            "--mode restore`, or the repair DAG"
        )
    files = inspect_raw_files(cfg.raw_events_dir(day))
    raw_rows = sum(f.rows for f in files)
    if raw_rows == 0 and not allow_empty:
        raise UserError(
            f"raw partition dt={day} has {len(files)} file(s) but no rows "
            "(pass --allow-empty if an empty day is expected)"
        )
    snapshot = read_raw_items(cfg, day)

    spark = spark_session(cfg)
    # The version of each table this step starts from (-1: none yet); its commits are checked against them.
    read = {name: _version(cfg, name) for name in ("events", "events_rejected")}
    lookback_days = [day - dt.timedelta(days=i) for i in range(1, cfg.ingest.dedupe_lookback_days + 1)]
    _drops_unchanged(cfg, lookback_days)
    lookback = None
    if read["events"] >= 0 and lookback_days:
        lookback = (
            delta.spark_read(spark, cfg.table_path("events"), version=read["events"])
            .where(F.col("dt").isin(lookback_days))
            .select("event_id", "dt")
        )

    checked = _validate_rows(_read_raw(spark, files), cfg, day)
    first = None
    if lookback is not None:
        first = checked.localCheckpoint()  # the day's rows once: _mark_redelivered reads them twice
        checked = _mark_redelivered(first, lookback)
    checked = _cap_bursts(checked, cfg).localCheckpoint()
    if first is not None:
        first.unpersist()
    try:
        return _publish(cfg, spark, day, files, raw_rows, snapshot, checked, read, lookback_days)
    finally:
        checked.unpersist()  # a long session (run-day over many days) must not keep every day's blocks


def fingerprint(files) -> str:
    """What a drop held when it was ingested: its files' names and sizes (kept in the commit metadata)."""
    import hashlib

    paths = [f.path if isinstance(f, RawFile) else f for f in files]
    listing = "\n".join(sorted(f"{p.name}\t{p.stat().st_size}" for p in paths))
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def _drops_unchanged(cfg: Config, days: list[dt.date]) -> None:
    """Refuse to go on when a drop of the lookback window changed after it was ingested (a file added, replaced
    or removed): its events are no longer what the raw folder holds, and deduplicating against them would hide
    the difference. The fix is a repair of that drop, not a silent next day."""
    path = cfg.table_path("events")
    if not delta.exists(path) or not days:
        return
    want = {str(d) for d in days}
    seen: dict[str, dict] = {}
    for h in delta.history(path, 20 * len(days)):
        if h.get("step") == "ingest" and h.get("dt") in want and h["dt"] not in seen:
            seen[h["dt"]] = h
    for d, h in sorted(seen.items()):
        raw = cfg.raw_events_dir(dt.date.fromisoformat(d))
        if not h.get("raw_fingerprint") or not raw.is_dir():
            continue
        files = [p for p in raw.iterdir() if p.is_file() and not p.name.startswith((".", "_"))]
        if fingerprint(files) != h["raw_fingerprint"]:
            raise UserError(
                f"raw drop {d} changed after it was ingested ({len(files)} files now, {h.get('raw_files')} then): "
                f"its events are not what {raw} holds. Repair it (`userformer repair --from {d} --to <latest drop> "
                "--mode restore`) or put the folder back as it was, then ingest this drop"
            )


def _version(cfg: Config, name: str) -> int:
    v = delta.version_of(cfg.table_path(name))
    return -1 if v is None else v


def _unchanged_since(path, read_version: int, days) -> None:
    """Refuse to commit when, since this step read `path`, another step committed one of `days` to it.

    Delta itself only sees conflicts on the partition a commit replaces. Ingest
    also depends on the previous drops it deduplicates against: committing
    after a concurrent commit of one of them would give a result no
    one-at-a-time order of the two steps gives. Checked right before each
    commit (a write still racing within those seconds is Delta's to refuse
    when it touches the same partition).
    """
    now = delta.version_of(path)
    if now is None or now <= read_version:
        return
    names = {str(d) for d in days}
    for h in delta.history(path, now - read_version):
        if int(h["version"]) > read_version and (h.get("dt") in names or h.get("operation") == "RESTORE"):
            raise delta.ConcurrentWrite(
                path,
                f"version {h['version']} ({h.get('step') or h.get('operation')} "
                f"dt={h.get('dt')}) was committed after this step read version {read_version}",
            )


def _publish(
    cfg: Config, spark, day: dt.date, files, raw_rows: int, snapshot, checked, read: dict, lookback_days: list[dt.date]
) -> dict:
    """Vocab, items, then events_rejected[D] and events[D], each in one commit."""
    from pyspark.sql import functions as F

    events_path, rejected_path = cfg.table_path("events"), cfg.table_path("events_rejected")
    accepted = checked.where(F.col("reason").isNull())

    # Small collects: the day's distinct keys, for the vocabularies.
    keys = accepted.select("event_type", "surface", "item_id").distinct().toArrow()
    vocab, read["vocab"] = _load(cfg, "vocab", tables.VOCAB)
    current_items, read["items"] = _load(cfg, "items", tables.ITEMS)
    event_items = sorted(set(keys["item_id"].drop_null().to_pylist()))
    items, vocab_new, item_stats = update_items(current_items, day, snapshot, event_items, vocab)
    rows_et, et_map = extend_vocab(vocab, "event_type", keys["event_type"].to_pylist(), day)
    rows_sf, sf_map = extend_vocab(vocab, "surface", keys["surface"].drop_null().to_pylist(), day)
    vocab_new = pa.concat_tables([vocab_new, rows_et, rows_sf])

    id_cols = ["item_id", "item_idx", "category_l1_idx", "category_l2_idx", "category_l3_idx", "brand_idx"]
    item_ids = spark.createDataFrame(items.select(id_cols).to_pandas())
    small = spark.createDataFrame(
        [("event_type", k, int(v)) for k, v in et_map.items()] + [("surface", k, int(v)) for k, v in sf_map.items()],
        "kind string, key string, idx long",
    )
    et = small.where("kind = 'event_type'").select(
        F.col("key").alias("event_type"), F.col("idx").cast("int").alias("event_type_idx")
    )
    sf = small.where("kind = 'surface'").select(
        F.col("key").alias("surface"), F.col("idx").cast("int").alias("surface_idx")
    )
    events = (
        accepted.join(F.broadcast(et), "event_type", "left")
        .join(F.broadcast(sf), "surface", "left")
        .join(item_ids, "item_id", "left")
        .withColumn("dt", F.lit(day))
        .fillna(
            0, subset=["item_idx", "category_l1_idx", "category_l2_idx", "category_l3_idx", "brand_idx", "surface_idx"]
        )
    )
    events = events.select(*[F.col(f.name).cast(_spark_type(f)) for f in tables.EVENTS])
    rejected = checked.where(F.col("reason").isNotNull()).withColumn("dt", F.lit(day))
    rejected = rejected.select(*[F.col(f.name).cast(_spark_type(f)) for f in tables.EVENTS_REJECTED])
    counts = {r["reason"] or "accepted": r["count"] for r in checked.groupBy("reason").count().collect()}

    # Write, audit, publish: the events gate judges exactly the rows the commits below write (staged files, read
    # in batches), on the tables as they will be after them; when it fails, nothing is committed.
    staging = cfg.warehouse_root / "_staging" / "ingest"
    with (
        delta.spark_staged(events, staging) as (events, events_files),
        delta.spark_staged(rejected, staging) as (rejected, rejected_files),
    ):
        gate = _gate(cfg, day, events_files, rejected_files, read)

        # Every read is done and every check passed: from here on, commits. vocab first (it reserves the ids that
        # items and events refer to); vocab and items land on the versions read above or fail as ConcurrentWrite,
        # so two concurrent ingests never hand out one id twice.
        hooks.pause("ingest.before_commit")
        meta = {"step": "ingest", "dt": str(day), "raw_files": str(len(files)), "raw_fingerprint": fingerprint(files)}
        depends = {"events": [day, *lookback_days], "events_rejected": [day]}
        for name, days in depends.items():
            _unchanged_since(cfg.table_path(name), read[name], days)
        write_items = bool(item_stats["items_changed"] or item_stats["items_unknown_new"] or read["items"] < 0)
        # Both small tables first, so that a lost race on items is found before vocab commits anything.
        for name, writes in (("vocab", len(vocab_new) > 0), ("items", write_items)):
            if writes and _version(cfg, name) != read[name]:
                raise delta.ConcurrentWrite(
                    cfg.table_path(name), f"read version {read[name]}, now {_version(cfg, name)}"
                )
        if len(vocab_new):
            delta.write_arrow(
                cfg.table_path("vocab"),
                vocab_new,
                tables.VOCAB,
                mode="append",
                metadata=meta,
                read_version=read["vocab"],
            )
        if write_items:
            delta.write_arrow(
                cfg.table_path("items"),
                items,
                tables.ITEMS,
                mode="overwrite",
                metadata=meta,
                read_version=read["items"],
            )

        # events_rejected[D] and events[D]: each one commit replacing just partition D (a rerun of D replaces D).
        part = {"mode": "overwrite", "partition_by": ["dt"], "replace_where": f"dt = '{day}'", "metadata": meta}
        _unchanged_since(rejected_path, read["events_rejected"], depends["events_rejected"])
        v_rej = delta.spark_write(rejected.coalesce(1), rejected_path, **part)
        hooks.pause("ingest.before_events_commit")
        _unchanged_since(events_path, read["events"], depends["events"])
        n_files = max(1, int(raw_rows // 2_000_000) + 1)
        # dt leads the sort so the writer's own ordering by partition column is already met and keeps user_id, ts.
        v_ev = delta.spark_write(
            events.repartition(n_files).sortWithinPartitions("dt", "user_id", "ts"), events_path, **part
        )
        hooks.pause("ingest.after_commit")
        result = {
            "dt": str(day),
            "raw_files": len(files),
            "raw_rows": raw_rows,
            "accepted": counts.pop("accepted", 0),
            "rejected": dict(sorted(counts.items())),
            "new_vocab": dict(Counter(vocab_new["kind"].to_pylist())),
            **item_stats,
            "events_version": v_ev,
            "events_rejected_version": v_rej,
            "check": gate,
        }
        log.info("ingest dt=%s: %s", day, result)
        return result


def _gate(cfg: Config, day: dt.date, events, rejected, read: dict) -> dict:
    """The events gate (jobs/steps/quality/suites.py `events`) on the staged partition D of events and
    events_rejected (pyarrow datasets of the staged files), which replace their partition D of the versions read;
    raises GateFailed when it fails."""
    from userformer.jobs.steps import check
    from userformer.jobs.steps.quality.source import Change, Staged

    day_d = pc.field("dt") == pa.scalar(day, pa.date32())
    staged = Staged(
        cfg,
        {
            "events": Change(events, day_d, read["events"], drop=day),
            "events_rejected": Change(rejected, day_d, read["events_rejected"], drop=day),
        },
    )
    return check.gate(cfg, "events", day, staged)


def _spark_type(f: pa.Field) -> str:
    """The Spark type of a contract column, as SQL type text (e.g. "string"): parsed by the driver, so that a
    client of a Spark Connect server casts to the default string type. A StringType object sent by such a client
    arrives as an explicit UTF8_BINARY collation, which Delta writes into the table's schema and delta-rs refuses."""
    return tables.to_spark(pa.schema([f]))[0].dataType.simpleString()


# -------------------------------------------------------------------- CLI
def register(sub) -> None:
    p = sub.add_parser(
        "ingest",
        help="raw drop dt=D -> events, events_rejected, vocab, items (Spark, Delta)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--dt", type=date_arg, required=True, help="drop (arrival) date YYYY-MM-DD; reads raw/events/dt=D")
    p.add_argument(
        "--allow-empty", action="store_true", help="accept a drop with files but zero rows (commits an empty day)"
    )
    p.set_defaults(func=run)


def run(args, cfg: Config) -> int:
    import json

    print(json.dumps(ingest(cfg, args.dt, allow_empty=args.allow_empty), indent=2, default=str))
    return 0
