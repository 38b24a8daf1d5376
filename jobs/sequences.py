"""Per-user sequences: events -> user_sequences, incrementally (one drop) or rebuilt (all drops).

`update(cfg, D)` touches only the users with events in drop D: their stored
last-max_len events and D's events (late ones included) are merged in time
order and cut to the last max_len; lifetime counts add up. Only the files that
hold those users are rewritten, in one Delta commit (copy-on-write).

`rebuild(cfg)` computes the same table from `events` alone. The two agree
exactly because both sort events by the same total order (the full event
struct, time first) and keep the top max_len of it: the newest max_len of
(newest max_len of the old events + the new events) are the newest max_len
of all events.
"""

from __future__ import annotations

import datetime as dt
import logging

from userformer.jobs.common import UserError, date_arg
from userformer.jobs.config import Config
from userformer.jobs.storage import delta
from userformer.schemas import tables as S

log = logging.getLogger(__name__)

# Field order is the sort order of a user's events (ts first; the rest breaks ties deterministically).
_EVENT_FIELDS = ["ts", "item_idx", "event_type_idx", "category_l1_idx", "category_l2_idx",
                 "category_l3_idx", "brand_idx", "surface_idx", "duration_s"]


def _per_user(events):
    """Aggregate events to one row per user: event structs, counts per type, first/last time, last drop date.

    One shuffle: the per-type counts come from the same aggregation (a small
    array of type names per user) instead of a second groupBy and a join.
    """
    from pyspark.sql import functions as F

    ev = F.struct(*[F.col(c) for c in _EVENT_FIELDS])
    agg = events.groupBy("user_id").agg(
        F.collect_list(ev).alias("events"),
        F.collect_list("event_type").alias("_types"),
        F.count("*").alias("n_events"),
        F.min("ts").alias("first_ts"),
        F.max("ts").alias("last_ts"),
        F.max("dt").alias("last_dt"),
    )
    counts = F.map_from_entries(F.transform(
        F.array_distinct("_types"),
        lambda t: F.struct(t.alias("k"), F.size(F.filter("_types", lambda x: x == t)).cast("long").alias("v")),
    ))
    return agg.withColumn("counts", counts).drop("_types")


def _finish(df, max_len: int):
    """From (user_id, events[], n_events, counts, first_ts, last_ts, last_dt) to the user_sequences schema."""
    from pyspark.sql import functions as F

    # The newest max_len events, kept oldest first.
    df = df.withColumn("events", F.expr(f"slice(sort_array(events), greatest(size(events) - {max_len}, 0) + 1, {max_len})"))
    cols = [F.col("user_id")]
    for name in S.SEQUENCE_ARRAYS:
        cols.append(F.col(f"events.{name}").alias(name))
    cols += [
        F.size("events").cast("int").alias("seq_len"),
        F.col("n_events").cast("long").alias("lifetime_events"),
        # Sorted entries: the same counts always give the same map, whatever the merge order.
        F.map_from_entries(F.array_sort(F.map_entries("counts"))).alias("lifetime_counts"),
        F.col("first_ts").alias("first_event_ts"),
        F.col("last_ts").alias("last_event_ts"),
        F.col("last_dt").alias("updated_dt"),
    ]
    return df.select(*cols)


def _to_struct_events(seq):
    """Stored arrays back to an array of event structs (the inverse of _finish)."""
    from pyspark.sql import functions as F

    return F.arrays_zip(*[F.col(f"{seq}.{c}").alias(c) for c in _EVENT_FIELDS])


def _write(df, cfg: Config, n_rows: int, *, remove_files=None, overwrite=False, meta=None) -> int:
    path = cfg.table_path("user_sequences")
    n_files = max(1, -(-n_rows // cfg.sequences.rows_per_file))
    with delta.staging(path) as staged:
        df.repartition(n_files, "user_id").sortWithinPartitions("user_id").write.mode("overwrite").parquet(str(staged))
        return delta.commit_staged(
            path, staged, S.USER_SEQUENCES, mode="overwrite" if overwrite else "append",
            remove_files=remove_files, metadata=meta,
        )


_NO_DATA_CHANGE = ("VACUUM", "OPTIMIZE", "CHECKPOINT")


def applied_drop(seq_path) -> tuple[dt.date | None, int | None]:
    """(last drop applied to user_sequences, version holding the state just before it).

    Read from the commit metadata. The second value is where a rerun of that
    same drop starts from, so a rerun replaces the drop's effect instead of
    merging its events twice (-1 when that drop created the table; None after a
    rebuild, which has no single drop to undo). A restore done by hand (no
    metadata) is followed to the version it restored.
    """
    if not delta.exists(seq_path):
        return None, None
    hist = {h["version"]: h for h in delta.history(seq_path)}
    v = max(hist)
    # Maintenance commits (vacuum, optimize) change no rows: look past them.
    while v - 1 in hist and str(hist[v].get("operation", "")).startswith(_NO_DATA_CHANGE):
        v -= 1
    h = hist[v]
    while h.get("operation") == "RESTORE" and not (h.get("dt") or h.get("upto")):
        h = hist.get(int(h["operationParameters"]["version"]), {})
    applied = h.get("dt") or h.get("upto")
    if not applied:
        return None, None
    if h.get("step") != "sequences":
        return dt.date.fromisoformat(applied), None
    base = h["version"] - 1
    while base in hist and hist[base].get("step") == "sequences" and hist[base].get("dt") == applied:
        base -= 1
    return dt.date.fromisoformat(applied), base


def update(cfg: Config, day: dt.date) -> dict:
    """Merge drop D's events into user_sequences for the users active on D (idempotent: a rerun of D replaces D)."""
    from userformer.jobs.spark import spark_session

    events_path, seq_path = cfg.table_path("events"), cfg.table_path("user_sequences")
    if not delta.exists(events_path):
        raise UserError(f"no events table at {events_path}: run `userformer ingest --dt {day}` first")
    if not _drop_ingested(events_path, day):
        raise UserError(f"events has no partition dt={day}: run `userformer ingest --dt {day}` first")
    applied, base = applied_drop(seq_path)
    rerun = applied == day
    if rerun and base is None:
        raise UserError(f"user_sequences was rebuilt up to {day}; to redo {day}, rebuild again (`userformer sequences --rebuild`)")
    if applied is not None and day < applied:
        raise UserError(
            f"user_sequences already includes drops up to {applied}; updating {day} now would apply it out of order. "
            f"Rerun the days in order from a restored table (repair) or `userformer sequences --rebuild`."
        )
    if rerun and base >= 0 and delta.missing_files(seq_path, base):
        raise UserError(
            f"cannot rerun {day}: the state before it (user_sequences version {base}) was vacuumed "
            f"(storage.retention_days); recompute with `userformer sequences --rebuild --upto {day}`"
        )
    spark = spark_session(cfg)
    meta = {"step": "sequences", "dt": str(day), "events_version": delta.version_of(events_path)}
    events = delta.read_spark(spark, events_path, S.EVENTS, partition_filters=[("dt", "=", str(day))])
    new = _per_user(events).localCheckpoint()
    try:
        return _merge_day(cfg, spark, day, new, rerun, base, meta)
    finally:
        new.unpersist()  # a long session (run-day over many days) must not keep every day's blocks


def _merge_day(cfg: Config, spark, day: dt.date, new, rerun: bool, base: int | None, meta: dict) -> dict:
    from pyspark.sql import functions as F

    seq_path = cfg.table_path("user_sequences")
    n_active = new.count()
    # The state D is applied to: the current table, or on a rerun the version before D.
    base_exists = delta.exists(seq_path) and (not rerun or base >= 0)
    if n_active == 0:
        version = delta.version_of(seq_path)
        if rerun and base_exists:
            version = _restore(seq_path, base, meta)
        log.info("sequences dt=%s: no active users%s", day, " (rerun: restored the state before the drop)" if rerun else "")
        return {"dt": str(day), "active_users": 0, "new_users": 0, "files_rewritten": 0, "version": version}
    if not base_exists:
        version = _write(_finish(new, cfg.sequences.max_len), cfg, n_active, meta=meta, overwrite=rerun)
        return {"dt": str(day), "active_users": n_active, "new_users": n_active, "files_rewritten": 0, "version": version}

    cur = delta.read_spark(spark, seq_path, S.USER_SEQUENCES, version=base if rerun else None)
    cur = cur.withColumn("_file", F.col("_metadata.file_path"))
    if rerun:  # everything is rewritten from the base version
        touched = None
        old = cur.drop("_file")
    else:
        touched = [r["_file"] for r in cur.join(new.select("user_id"), "user_id", "left_semi").select("_file").distinct().collect()]
        old = cur.where(F.col("_file").isin(touched)).drop("_file")
    active = new.select("user_id")
    old_active = old.join(active, "user_id", "left_semi")
    keep = old.join(active, "user_id", "left_anti")

    o = old_active.select(
        "user_id",
        F.struct(*[F.col(c) for c in S.SEQUENCE_ARRAYS]).alias("seq"),
        F.col("lifetime_events").alias("o_n"), F.col("lifetime_counts").alias("o_counts"),
        F.col("first_event_ts").alias("o_first"), F.col("last_event_ts").alias("o_last"),
    )
    m = new.join(o, "user_id", "left")
    merged = m.select(
        "user_id",
        F.when(F.col("seq").isNull(), F.col("events")).otherwise(F.concat(_to_struct_events("seq"), F.col("events"))).alias("events"),
        (F.col("n_events") + F.coalesce(F.col("o_n"), F.lit(0))).alias("n_events"),
        F.when(F.col("o_counts").isNull(), F.col("counts"))
        .otherwise(F.map_zip_with("o_counts", "counts", lambda k, a, b: F.coalesce(a, F.lit(0)) + F.coalesce(b, F.lit(0))))
        .alias("counts"),
        F.least("first_ts", "o_first").alias("first_ts"),
        F.greatest("last_ts", "o_last").alias("last_ts"),
        F.col("last_dt"),
    )
    out = _finish(merged, cfg.sequences.max_len).unionByName(keep.select(*S.USER_SEQUENCES.names))
    # Row counts from the Delta log's file stats: no extra pass over the data.
    before = delta.add_actions(seq_path, base if rerun else None)
    rel = None if rerun else _relative(seq_path, touched)
    n_old = sum(a["num_records"] for a in before if rerun or a["path"] in set(rel))
    users_before = sum(a["num_records"] for a in before)
    if rerun:
        version = _write(out, cfg, n_old + n_active, overwrite=True, meta=meta)
    else:
        version = _write(out, cfg, n_old + n_active, remove_files=rel, meta=meta)
    n_new_users = sum(a["num_records"] for a in delta.add_actions(seq_path)) - users_before
    result = {"dt": str(day), "active_users": n_active, "new_users": n_new_users, "rerun": rerun,
              "files_rewritten": len(before) if rerun else len(rel), "rows_written": n_old + n_new_users,
              "version": version}
    log.info("sequences dt=%s: %s", day, result)
    return result


def _restore(seq_path, version: int, meta: dict) -> int:
    from deltalake import CommitProperties

    t = delta.open_table(seq_path)
    t.restore(version, commit_properties=CommitProperties(custom_metadata={k: str(v) for k, v in meta.items()}))
    return delta.version_of(seq_path)


def _drop_ingested(events_path, day) -> bool:
    """True if events holds drop D, or an ingest of D committed it empty (a day without events)."""
    parts = {str(a["partition.dt"]) for a in delta.add_actions(events_path)}
    if str(day) in parts:
        return True
    return any(h.get("step") == "ingest" and h.get("dt") == str(day) for h in delta.lineage(events_path))


def _relative(table_path, uris: list[str]) -> list[str]:
    """Spark's file URIs -> paths relative to the table root, as the Delta log holds them."""
    import urllib.parse
    from pathlib import Path

    by_plain = {urllib.parse.unquote(r): r for r in delta.active_files(table_path)}
    root = Path(table_path).resolve()
    out = []
    for u in uris:
        rel = Path(urllib.parse.unquote(urllib.parse.urlparse(u).path)).resolve().relative_to(root).as_posix()
        if rel not in by_plain:
            raise RuntimeError(f"file {u} is not an active file of {table_path}")
        out.append(by_plain[rel])
    return out


def rebuild(cfg: Config, upto: dt.date | None = None) -> dict:
    """Recompute user_sequences from all of `events` (up to drop `upto`) and replace the table in one commit."""
    from pyspark.sql import functions as F

    from userformer.jobs.spark import spark_session

    events_path = cfg.table_path("events")
    if not delta.exists(events_path):
        raise UserError(f"no events table at {events_path}")
    spark = spark_session(cfg)
    events = delta.read_spark(spark, events_path, S.EVENTS)
    if upto is not None:
        events = events.where(F.col("dt") <= F.lit(upto))
    per_user = _per_user(events).localCheckpoint()
    try:
        n = per_user.count()
        last = per_user.agg(F.max("last_dt")).first()[0]
        if last is None:
            raise UserError("events holds no rows to rebuild from")
        # `upto` records the last drop included, so a following `--dt` update knows where the state stands.
        meta = {"step": "sequences-rebuild", "upto": str(upto or last), "events_version": delta.version_of(events_path)}
        version = _write(_finish(per_user, cfg.sequences.max_len), cfg, n, overwrite=True, meta=meta)
    finally:
        per_user.unpersist()
    return {"users": n, "version": version, "upto": meta["upto"]}


# -------------------------------------------------------------------- CLI
def register(sub) -> None:
    p = sub.add_parser("sequences", help="events -> user_sequences (incremental for one drop, or --rebuild)",
                       description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--dt", type=date_arg, help="drop date YYYY-MM-DD: update only the users with events in it")
    g.add_argument("--rebuild", action="store_true", help="recompute the whole table from events")
    p.add_argument("--upto", type=date_arg, help="with --rebuild: use drops up to this date only")
    p.set_defaults(func=run)


def run(args, cfg: Config) -> int:
    import json

    res = rebuild(cfg, args.upto) if args.rebuild else update(cfg, args.dt)
    print(json.dumps(res, indent=2, default=str))
    return 0
