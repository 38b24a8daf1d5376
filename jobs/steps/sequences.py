"""Per-user sequences: events -> user_sequences, incrementally (one drop) or rebuilt (all drops).

`update(cfg, D)` computes the rows D gives its active users: a stored
user's last-max_len events and D's events (late ones included) are merged in
time order and cut to the last max_len, lifetime counts add up; a new user's
row comes from D alone. The user_sequences gate judges those staged rows in
place of the users' stored ones before anything is committed (a failed gate
leaves the table as it was); then one Delta MERGE by user_id writes exactly
them. The table carries deletion vectors, so the MERGE writes only the active
users' new rows and marks their old rows deleted instead of rewriting the
files that hold them.

`rebuild(cfg)` computes the same table from `events` alone, staged in Parquet
and judged by the same gate before it replaces the table. The two agree
exactly because both sort events by the same total order (the full event
struct, time first) and keep the top max_len of it: the newest max_len of
(newest max_len of the old events + the new events) are the newest max_len
of all events.
"""

from __future__ import annotations

import datetime as dt
import logging

from userformer.jobs.core import drops, hooks, lease
from userformer.jobs.core.config import Config
from userformer.jobs.core.dates import date_arg
from userformer.jobs.core.errors import UserError
from userformer.jobs.core.spark import spark_session
from userformer.jobs.core.storage import delta
from userformer.schemas import tables

log = logging.getLogger(__name__)

# Field order is the sort order of a user's events (ts first; the rest breaks ties deterministically).
_EVENT_FIELDS = [
    "ts",
    "item_idx",
    "event_type_idx",
    "category_l1_idx",
    "category_l2_idx",
    "category_l3_idx",
    "brand_idx",
    "surface_idx",
    "duration_s",
]


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
    counts = F.map_from_entries(
        F.transform(
            F.array_distinct("_types"),
            lambda t: F.struct(t.alias("k"), F.size(F.filter("_types", lambda x: x == t)).cast("long").alias("v")),
        )
    )
    return agg.withColumn("counts", counts).drop("_types")


def _columns(events, n_events, counts, first_ts, last_ts, last_dt, max_len: int) -> dict:
    """The user_sequences columns (but user_id) from per-user Column expressions: events is an array of
    event structs in any order, counts a map event_type -> count.

    One definition for the rebuild, the MERGE's update and its insert, so they agree by construction."""
    from pyspark.sql import functions as F

    # The newest max_len events, kept oldest first.
    ordered = F.sort_array(events)
    kept = F.slice(ordered, F.greatest(F.size(ordered) - max_len, F.lit(0)) + 1, max_len)
    out = {name: kept.getField(name) for name in tables.SEQUENCE_ARRAYS}
    out.update(
        {
            "seq_len": F.size(kept).cast("int"),
            "lifetime_events": n_events.cast("long"),
            # Sorted entries: the same counts always give the same map, whatever the merge order.
            "lifetime_counts": F.map_from_entries(F.array_sort(F.map_entries(counts))),
            "first_event_ts": first_ts,
            "last_event_ts": last_ts,
            "updated_dt": last_dt,
        }
    )
    return out


def _finish(df, max_len: int):
    """From (user_id, events[], n_events, counts, first_ts, last_ts, last_dt) to the user_sequences schema."""
    from pyspark.sql import functions as F

    cols = _columns(
        F.col("events"),
        F.col("n_events"),
        F.col("counts"),
        F.col("first_ts"),
        F.col("last_ts"),
        F.col("last_dt"),
        max_len,
    )
    return df.select(F.col("user_id"), *[c.alias(k) for k, c in cols.items()])


def _stored_events(prefix: str):
    """A row's stored arrays back to an array of event structs (the inverse of _columns)."""
    from pyspark.sql import functions as F

    return F.arrays_zip(*[F.col(f"{prefix}.{c}").alias(c) for c in _EVENT_FIELDS])


def _merged(max_len: int) -> dict:
    """SET expressions of the MERGE for a user in both the table (t) and the day (s)."""
    from pyspark.sql import functions as F

    t, s = (lambda c: F.col(f"t.{c}")), (lambda c: F.col(f"s.{c}"))
    counts = F.when(t("lifetime_counts").isNull(), s("counts")).otherwise(
        F.map_zip_with(
            t("lifetime_counts"), s("counts"), lambda k, a, b: F.coalesce(a, F.lit(0)) + F.coalesce(b, F.lit(0))
        )
    )
    return _columns(
        F.concat(_stored_events("t"), s("events")),
        t("lifetime_events") + s("n_events"),
        counts,
        F.least(t("first_event_ts"), s("first_ts")),
        F.greatest(t("last_event_ts"), s("last_ts")),
        F.greatest(t("updated_dt"), s("last_dt")),
        max_len,
    )


def _inserted(max_len: int) -> dict:
    """INSERT values of the MERGE for a user new on the day."""
    from pyspark.sql import functions as F

    s = lambda c: F.col(f"s.{c}")  # noqa: E731
    return {
        "user_id": s("user_id"),
        **_columns(s("events"), s("n_events"), s("counts"), s("first_ts"), s("last_ts"), s("last_dt"), max_len),
    }


def _write(df, cfg: Config, n_rows: int, meta: dict) -> int:
    """Replace the whole table in one commit, `sequences.rows_per_file` rows per file, deletion vectors on."""
    path = cfg.table_path("user_sequences")
    n_files = max(1, -(-n_rows // cfg.sequences.rows_per_file))
    out = df.repartition(n_files, "user_id").sortWithinPartitions("user_id")
    if delta.exists(path):  # a write's table properties apply only when it creates the table
        ensure_deletion_vectors(df.sparkSession, path)
    return delta.spark_write(out, path, mode="overwrite", metadata=meta, properties=delta.DELETION_VECTORS)


@lease.writer("sequences")
def update(cfg: Config, day: dt.date) -> dict:
    """Merge drop D's events into user_sequences for the users active on D (idempotent: a rerun of D replaces D)."""
    from pyspark.sql import functions as F

    events_path, seq_path = cfg.table_path("events"), cfg.table_path("user_sequences")
    if not delta.exists(events_path):
        raise UserError(f"no events table at {events_path}: run `userformer ingest --dt {day}` first")
    if not _drop_ingested(events_path, day):
        raise UserError(f"events has no partition dt={day}: run `userformer ingest --dt {day}` first")
    applied, base = drops.last_drop(seq_path)
    rerun = applied == day
    if rerun and base is None:
        raise UserError(
            f"user_sequences was rebuilt up to {day}; to redo {day}, rebuild again (`userformer sequences --rebuild`)"
        )
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
    events = delta.spark_read(spark, events_path).where(F.col("dt") == F.lit(day))
    new = _per_user(events).localCheckpoint()
    try:
        return _merge_day(cfg, spark, day, new, rerun, base, meta)
    finally:
        new.unpersist()  # a long session (run-day over many days) must not keep every day's blocks


def _merge_day(cfg: Config, spark, day: dt.date, new, rerun: bool, base: int | None, meta: dict) -> dict:
    seq_path = cfg.table_path("user_sequences")
    n_active = new.count()
    result = {
        "dt": str(day),
        "active_users": n_active,
        "new_users": 0,
        "rerun": rerun,
        "files_rewritten": 0,
        "files_added": 0,
        "rows_written": 0,
    }
    # The state D is applied to: the current table, or on a rerun the version before D (-1: D creates the table,
    # or a rerun of the day that created it replaces it, with no rows if D is empty now).
    creates = (n_active and not delta.exists(seq_path)) or (rerun and base < 0)
    current = delta.version_of(seq_path) if delta.exists(seq_path) else None
    state = -1 if creates or current is None else (base if rerun else current)
    if not n_active and not creates:
        result["version"] = current
        result["check"] = _gate(cfg, day, None, state)
        log.info("sequences dt=%s: %s", day, result)
        return result
    # Write, audit, publish: the rows D gives its users, computed on that state and written once to staged files,
    # are judged by the user_sequences gate before anything is committed, and are then exactly what it writes.
    rows = _staged_rows(spark, seq_path, new, state, cfg.sequences.max_len)
    with delta.spark_staged(rows, cfg.warehouse_root / "_staging" / "sequences") as (staged, judged):
        result["check"] = _gate(cfg, day, judged, state)
        if rerun and base >= 0:
            state = _restore(spark, seq_path, base, day)  # the same rows as `state` had, one version later
        if creates:
            version = _write(staged, cfg, n_active, meta)
            result.update(_write_metrics(seq_path, version), new_users=n_active, version=version)
        else:
            if ensure_deletion_vectors(spark, seq_path):
                state += 1  # the ALTER changed no row
            hooks.pause("sequences.before_merge")  # tests: a crash here, after a rerun's RESTORE
            result.update(_merge(spark, seq_path, staged, state, meta))
            hooks.pause("sequences.after_merge")
    log.info("sequences dt=%s: %s", day, result)
    return result


def _staged_rows(spark, seq_path, new, state: int, max_len: int):
    """The user_sequences rows of D's users once D is applied to version `state` (-1: to nothing): a stored user's
    row merged with D's events (`_merged`), a new user's row from D's events alone (`_inserted`)."""
    from pyspark.sql import functions as F

    if state < 0:
        return _finish(new, max_len)
    stored = delta.spark_read(spark, seq_path, version=state)
    joined = new.alias("s").join(stored.alias("t"), F.col("s.user_id") == F.col("t.user_id"), "left")
    merged, inserted = _merged(max_len), _inserted(max_len)
    is_new = F.col("t.user_id").isNull()
    return joined.select(
        *[
            F.when(is_new, inserted[f.name]).otherwise(merged.get(f.name, inserted[f.name])).alias(f.name)
            for f in tables.USER_SEQUENCES
        ]
    )


def _gate(cfg: Config, day: dt.date, staged, state: int) -> dict:
    """The user_sequences gate (jobs/steps/quality/suites.py `user_sequences`) on version `state` with the staged
    rows (a pyarrow dataset of staged files, read in batches) in place of their users' rows (None: D changes no
    row); raises GateFailed when it fails. Only the day's user ids are held, to select the rows they replace."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if staged is None:
        return gate_change(cfg, day, tables.USER_SEQUENCES.empty_table(), None, state)
    ids = staged.to_table(columns=["user_id"])["user_id"].combine_chunks().cast(pa.string())
    return gate_change(cfg, day, staged, pc.field("user_id").isin(ids), state)


def gate_change(cfg: Config, day: dt.date, rows, replaces, state: int) -> dict:
    """The user_sequences gate on version `state` (-1: none) with `rows` (a pyarrow table or dataset) in place of
    the rows `replaces` selects, judged as of drop `day`; raises GateFailed when it fails."""
    from userformer.jobs.steps import check
    from userformer.jobs.steps.quality.source import Change, Staged

    return check.gate(cfg, "user_sequences", day, Staged(cfg, {"user_sequences": Change(rows, replaces, state)}))


def _merge(spark, seq_path, staged, read_version: int, meta: dict) -> dict:
    """The day's users' staged rows into the table: one MERGE by user_id, one commit; its counts from the
    commit's operationMetrics. The rows were computed on `read_version`: if another writer committed since, the
    MERGE would replace its rows with stale ones, so it is refused (ConcurrentWrite) instead."""
    now = delta.version_of(seq_path)
    if now != read_version:
        raise delta.ConcurrentWrite(seq_path, f"the day's rows were computed on version {read_version}, now {now}")
    with delta.spark_commit(spark, seq_path, meta) as c:
        delta.spark_merge(
            spark,
            seq_path,
            staged,
            "t.user_id = s.user_id",
            "WHEN MATCHED THEN UPDATE SET * WHEN NOT MATCHED THEN INSERT *",
        )
    if c["version"] is None:
        raise delta.StorageError(f"the MERGE into {seq_path} left no commit")
    m = merge_metrics(c["metrics"])
    return {"version": c["version"], "new_users": m.pop("rows_inserted"), **m}


def _write_metrics(seq_path, version: int) -> dict:
    """Rows and files a write (the first build, a rebuild) committed, from its operationMetrics in the table's
    history; a MERGE's come from its own commit (`merge_metrics`)."""
    h = next(h for h in delta.history(seq_path, 50) if h["version"] == version)
    m = {k: int(v) for k, v in (h.get("operationMetrics") or {}).items() if str(v).lstrip("-").isdigit()}
    return {
        "rows_written": m.get("numOutputRows", 0),
        "files_added": m.get("numFiles", 0),
        "bytes_added": m.get("numOutputBytes", 0),
    }


def merge_metrics(m: dict) -> dict:
    """Rows and files a MERGE into user_sequences wrote, from its operation metrics (`delta.spark_commit`'s)."""
    inserted, updated = m.get("numTargetRowsInserted", 0), m.get("numTargetRowsUpdated", 0)
    return {
        "rows_inserted": inserted,
        "rows_updated": updated,
        "rows_deleted": m.get("numTargetRowsDeleted", 0),
        "rows_written": inserted + updated,
        "files_added": m.get("numTargetFilesAdded", 0),
        # With deletion vectors no file is rewritten: replaced rows are marked in the vectors.
        "files_rewritten": m.get("numTargetFilesRemoved", 0),
        "deletion_vectors_added": m.get("numTargetDeletionVectorsAdded", 0),
        "bytes_added": m.get("numTargetBytesAdded", 0),
        "target_rows_copied": m.get("numTargetRowsCopied", 0),
        "scan_ms": m.get("scanTimeMs"),
        "rewrite_ms": m.get("rewriteTimeMs"),
    }


def ensure_deletion_vectors(spark, seq_path) -> bool:
    """Enable deletion vectors on a user_sequences written before it was MERGEd (one ALTER commit). True when it
    changed the table."""
    changed = delta.ensure_deletion_vectors(spark, seq_path, "sequences")
    if changed:
        log.warning(
            "user_sequences at %s had no deletion vectors: enabled them (delta.enableDeletionVectors, "
            "a protocol upgrade; readers need Delta reader version 3 with deletionVectors)",
            seq_path,
        )
    return changed


def _restore(spark, seq_path, version: int, day: dt.date) -> int:
    """Back to the state before D (a rerun), as one RESTORE commit. Its metadata names no drop, so until
    the MERGE that follows commits, `drops.last_drop` reads the state it restored (the drop before D):
    a crash between the two leaves a table that a rerun of D applies to normally."""
    with delta.spark_commit(
        spark, seq_path, {"step": "sequences-rerun", "rerun_of": str(day), "restored_version": version}
    ) as c:
        delta.spark_restore(spark, seq_path, version)
    return c["version"]


def _drop_ingested(events_path, day) -> bool:
    """True if events holds drop D, or an ingest of D committed it empty (a day without events)."""
    parts = {str(a["partition.dt"]) for a in delta.add_actions(events_path)}
    if str(day) in parts:
        return True
    return any(h.get("step") == "ingest" and h.get("dt") == str(day) for h in delta.lineage(events_path))


@lease.writer("sequences-rebuild")
def rebuild(cfg: Config, upto: dt.date | None = None) -> dict:
    """Recompute user_sequences from all of `events` (up to drop `upto`) and replace the table in one commit."""
    import pyarrow.compute as pc
    from pyspark.sql import functions as F

    events_path, seq_path = cfg.table_path("events"), cfg.table_path("user_sequences")
    if not delta.exists(events_path):
        raise UserError(f"no events table at {events_path}")
    spark = spark_session(cfg)
    events = delta.spark_read(spark, events_path)
    if upto is not None:
        events = events.where(F.col("dt") <= F.lit(upto))
    per_user = _per_user(events).localCheckpoint()
    try:
        n = per_user.count()
        last = per_user.agg(F.max("last_dt")).first()[0]
        if last is None:
            raise UserError("events holds no rows to rebuild from")
        # `upto` records the last drop included, so a following `--dt` update knows where the state stands.
        day = upto or last
        meta = {"step": "sequences-rebuild", "upto": str(day), "events_version": delta.version_of(events_path)}
        state = delta.version_of(seq_path) if delta.exists(seq_path) else -1
        # Write, audit, publish as for a day: the new table is judged as of its last drop (that drop's rows, one
        # row per user over all of it) in place of every row of the current one, and is written only if it passes.
        finished = _finish(per_user, cfg.sequences.max_len)
        with delta.spark_staged(finished, cfg.warehouse_root / "_staging" / "sequences-rebuild") as (rows, judged):
            check = gate_change(cfg, day, judged, pc.scalar(True), state)
            version = _write(rows, cfg, n, meta)
    finally:
        per_user.unpersist()
    return {"users": n, "version": version, "upto": meta["upto"], "check": check, **_write_metrics(seq_path, version)}


# -------------------------------------------------------------------- CLI
def register(sub) -> None:
    p = sub.add_parser(
        "sequences",
        help="events -> user_sequences (incremental for one drop, or --rebuild)",
        description=__doc__.split("\n\n")[0],
    )
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
