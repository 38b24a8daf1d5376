"""`userformer candidates --dt D`: the ``user_candidates`` table, top-N items of the current item index per user.

For every user whose ``user_embeddings`` row has ``as_of == D``, the top
``candidates_n`` items of the current index (jobs/steps/index.py; optionally
without the items the user purchased in events up to D:
``candidates_exclude_purchased`` / ``--exclude-purchased``), in one commit:
those users' rows replaced, every other user's row kept as it was (rows of
users without a user_embeddings row any more are dropped). It refuses when
those embeddings are of another model version than the index. A day without
refreshed users writes nothing and succeeds.

**Cost.** The day's users are read from the files publish's MERGE wrote for
them (pruned by ``as_of``), searched in batches of
``index.candidates_batch_users`` and staged in Parquet; the commit is a Spark
MERGE with deletion vectors that writes those rows and marks the replaced
ones, so a day costs its refreshed users, not the table (plus a scan of the
two tables' user ids, to drop the rows of users who lost their embedding).
With purchase exclusion, events are scanned once per run (the purchases of
the day's users), not once per batch.
"""

from __future__ import annotations

import datetime
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from userformer.jobs.core import hooks, lease
from userformer.jobs.core.config import Config
from userformer.jobs.core.dates import date_arg
from userformer.jobs.core.errors import UserError
from userformer.jobs.core.spark import spark_session
from userformer.jobs.core.storage import delta, files
from userformer.jobs.steps.index import ItemIndex, open_current, str_field, vectors_of
from userformer.schemas import tables

log = logging.getLogger(__name__)

PURCHASE = "purchase"


def events_dataset(cfg: Config):
    """The current version of events, opened once for many filtered reads (`to_table`), None when there is none.

    A `delta.Snapshot`, not delta-rs's dataset: events is Spark's table, and a deletion vector there
    would make delta-rs refuse it (or, reading its files, count deleted rows)."""
    path = cfg.table_path("events")
    return delta.Snapshot(path) if delta.exists(path) else None


def purchased_items(
    cfg: Config, users: list[str] | None, upto: datetime.date | None = None, events=None
) -> dict[str, set[int]]:
    """item_idx of the purchases (events, event_type purchase, dt <= upto) of `users` (None: every user).

    `events`: from events_dataset() (opened once, outside delta-rs' own threads)."""
    events = events_dataset(cfg) if events is None else events
    if events is None:
        return {}
    flt = str_field("event_type") == PURCHASE
    if upto is not None:
        flt &= pc.field("dt") <= pa.scalar(upto, pa.date32())
    if users is not None and not users:
        return {}
    wanted = None if users is None else pa.array(sorted(set(users)), pa.string())
    out: dict[str, set[int]] = {}
    # One streamed pass; only the purchases of `users` are kept (a filter on a long id list would be
    # evaluated per file and row group anyway).
    for t in events.scan(columns=["user_id", "item_idx"], filter=flt):
        if wanted is not None:
            t = t.filter(pc.is_in(t["user_id"].cast(pa.string()), value_set=wanted))
        for u, i in zip(t["user_id"].to_pylist(), t["item_idx"].to_pylist()):
            if i:
                out.setdefault(u, set()).add(i)
    return out


def topn(index: ItemIndex, queries: np.ndarray, n: int, exclude: list[set[int]] | None = None):
    """Per query: (item_idx, scores) of the best n, leaving out each query's `exclude` ids."""
    extra = max((len(e) for e in exclude), default=0) if exclude else 0
    scores, labels = index.search(queries, n + extra)
    out = []
    for row in range(len(labels)):
        lab, sc = labels[row], scores[row]
        keep = lab >= 0
        if exclude and exclude[row]:
            keep &= ~np.isin(lab, np.fromiter(exclude[row], dtype=np.int64))
        out.append((lab[keep][:n], sc[keep][:n]))
    return out


DROP = "_drop_user"  # in the MERGE's source: a key row of a user whose row goes (no user_embeddings row any more)


def _search(cfg: Config, idx: ItemIndex, ue: delta.Snapshot, day: datetime.date, exclude: bool, stats: dict):
    """The candidate rows of the users refreshed on `day`, batch by batch (schemas.tables.USER_CANDIDATES)."""
    n = cfg.index.candidates_n
    flt = pc.field("as_of") == pa.scalar(day, pa.date32())
    bought: dict[str, set[int]] = {}
    if exclude:
        users = [u for t in ue.scan(columns=["user_id"], filter=flt) for u in t["user_id"].to_pylist()]
        bought = purchased_items(cfg, users, day)
    for b in ue.scan(columns=["user_id", "embedding"], filter=flt, batch_size=cfg.index.candidates_batch_users):
        users = b.column("user_id").to_pylist()
        ex = [bought.get(u, set()) for u in users] if exclude else None
        res = topn(idx, vectors_of(b.column("embedding")), n, ex)
        if exclude:
            stats["excluded"] += sum(len(e) for e in ex)
        stats["rows"] += len(users)
        labels = [r[0] for r in res]
        lens = np.array([len(x) for x in labels], dtype=np.int32)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
        flat_idx = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)
        flat_sc = np.concatenate([r[1] for r in res]).astype(np.float32) if res else np.zeros(0, np.float32)
        cols = {
            "user_id": pa.array(users, pa.string()),
            "item_idx": pa.ListArray.from_arrays(offsets, pa.array(flat_idx, pa.int64())),
            "item_id": pa.ListArray.from_arrays(offsets, pa.array(idx.ids_of(flat_idx).tolist(), pa.string())),
            "scores": pa.ListArray.from_arrays(offsets, pa.array(flat_sc, pa.float32())),
            "model_version": pa.array([idx.model_version] * len(users), pa.string()),
            "index_version": pa.array([idx.version] * len(users), pa.string()),
            "as_of": pa.array([day] * len(users), pa.date32()),
        }
        yield pa.RecordBatch.from_arrays(
            [cols[f.name].cast(f.type) for f in tables.USER_CANDIDATES], schema=tables.USER_CANDIDATES
        )


def _commit(cfg: Config, staged: str, ue_version: int, meta: dict) -> dict:
    """One Spark commit of the staged rows: a MERGE that replaces the refreshed users' rows, inserts the new
    users' and deletes the rows of users without a user_embeddings row (of `ue_version`); the table is created
    when there is none. Lands on the version it read, or raises ConcurrentWrite. Returns the rows it kept,
    dropped and the version."""
    from pyspark.sql import functions as F

    spark = spark_session(cfg)
    path = cfg.table_path("user_candidates")
    delta.ensure_merge_table(spark, path, tables.USER_CANDIDATES, "candidates")
    read_v = delta.version_of(path)
    rows = delta.spark_parquet(spark, [staged], tables.spark_ddl(tables.USER_CANDIDATES))
    before = delta.logical_rows(path, read_v)
    hooks.pause("candidates.before_commit")  # tests: the day's candidates staged, not committed
    if not before:  # a new (empty) table: the rows are the table
        delta.expect_version(path, read_v)
        v = delta.spark_write(rows, path, mode="overwrite", metadata=meta)
        return {"kept": 0, "dropped": 0, "version": v}
    # Rows of users who no longer have an embedding (deleted from user_embeddings): their ids only.
    gone = (
        delta.spark_read(spark, path, read_v)
        .select("user_id")
        .join(
            delta.spark_read(spark, cfg.table_path("user_embeddings"), ue_version).select("user_id"),
            "user_id",
            "left_anti",
        )
    )
    source = rows.withColumn(DROP, F.lit(False)).unionByName(
        gone.withColumn(DROP, F.lit(True)), allowMissingColumns=True
    )
    cols = tables.USER_CANDIDATES.names
    values = ", ".join("s." + c for c in cols)
    clauses = (
        f"WHEN MATCHED AND s.{DROP} THEN DELETE "
        f"WHEN MATCHED THEN UPDATE SET {', '.join(f'{c} = s.{c}' for c in cols)} "
        f"WHEN NOT MATCHED AND NOT s.{DROP} THEN INSERT ({', '.join(cols)}) VALUES ({values})"
    )
    delta.expect_version(path, read_v)
    with delta.spark_commit(spark, path, meta) as c:
        delta.spark_merge(spark, path, source, on="t.user_id = s.user_id", clauses=clauses)
    m = c.get("metrics", {})
    dropped = m.get("numTargetRowsDeleted", 0)
    return {"kept": before - m.get("numTargetRowsUpdated", 0) - dropped, "dropped": dropped, "version": c["version"]}


@lease.writer("candidates")
def candidates(cfg: Config, day: datetime.date, *, exclude_purchased: bool | None = None) -> dict:
    """Write user_candidates for the users refreshed on `dt` (one MERGE commit). See the module doc."""
    t0 = time.perf_counter()
    exclude = cfg.index.candidates_exclude_purchased if exclude_purchased is None else exclude_purchased
    ue_path = cfg.table_path("user_embeddings")
    if not delta.exists(ue_path):
        raise UserError(f"no user_embeddings table at {ue_path}: run `userformer publish --dt {day}` first")
    idx = open_current(cfg)
    ue_version = delta.version_of(ue_path)
    ue = delta.Snapshot(ue_path, ue_version)  # publish MERGEs it with deletion vectors: not delta-rs's reader
    flt = pc.field("as_of") == pa.scalar(day, pa.date32())
    versions: dict[str, int] = {}
    for t in ue.scan(columns=["model_version"], filter=flt):
        for r in pc.value_counts(t["model_version"]).to_pylist():
            versions[r["values"]] = versions.get(r["values"], 0) + r["counts"]
    n_users = sum(versions.values())
    out = {
        "dt": str(day),
        "users": n_users,
        "index_version": idx.version,
        "model_version": idx.model_version,
        "user_embeddings_version": ue_version,
        "exclude_purchased": exclude,
        "n": cfg.index.candidates_n,
    }
    if not n_users:
        log.info("no user_embeddings row with as_of = %s: no candidates to write", day)
        return {
            **out,
            "table_version": delta.version_of(cfg.table_path("user_candidates")),
            "written": 0,
            "seconds": round(time.perf_counter() - t0, 3),
        }
    other = {v: c for v, c in versions.items() if v != idx.model_version}
    if other:
        shown = ", ".join(f"{v} ({c} users)" for v, c in other.items())
        raise UserError(
            f"user embeddings of {day} are of model {shown} but the current index {idx.version} is of "
            f"model {idx.model_version}: run `userformer index --dt {day}` first"
        )
    stats = {"excluded": 0, "rows": 0}
    meta = {
        "step": "candidates",
        "dt": str(day),
        "index_version": idx.version,
        "model_version": idx.model_version,
        "user_embeddings_version": ue_version,
        "exclude_purchased": exclude,
    }
    path = cfg.table_path("user_candidates")
    import pyarrow.parquet as pq

    # Searched batch by batch into a staged Parquet file (bounded memory; an error surfaces here, before any
    # commit), then one commit.
    with files.scratch(cfg.warehouse_root / "_staging" / path.name) as stage:
        staged = stage / "candidates.parquet"
        fs, where = files.arrow(staged)
        with pq.ParquetWriter(where, tables.USER_CANDIDATES, filesystem=fs) as w:
            for b in _search(cfg, idx, ue, day, exclude, stats):
                w.write_batch(b)
        done = _commit(cfg, str(staged), ue_version, meta)
    out.update(
        written=stats["rows"],
        kept=done["kept"],
        dropped=done["dropped"],
        excluded_purchases=stats["excluded"],
        table_version=done["version"],
        seconds=round(time.perf_counter() - t0, 3),
    )
    log.info("user_candidates: %d users of %s from index %s (v%s)", stats["rows"], day, idx.version, done["version"])
    return out


# --------------------------------------------------------------------- CLI
def register(sub) -> None:
    p = sub.add_parser(
        "candidates",
        help="user_candidates: top-N items of the current index for the users refreshed on D",
        description="Search the current item index for every user whose user_embeddings row is as of D and "
        "replace those users' user_candidates rows in one commit (other users untouched).",
    )
    p.add_argument("--dt", type=date_arg, required=True, help="drop date YYYY-MM-DD")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--exclude-purchased",
        dest="exclude",
        action="store_true",
        default=None,
        help="leave out items the user purchased (default: index.candidates_exclude_purchased)",
    )
    g.add_argument("--include-purchased", dest="exclude", action="store_false", help="keep purchased items")
    p.set_defaults(func=run_candidates)


def run_candidates(args, cfg: Config) -> int:
    out = candidates(cfg, args.dt, exclude_purchased=args.exclude)
    if not out["users"]:
        print(f"candidates dt={args.dt}: no user_embeddings row is as of {args.dt}; nothing written")
        return 0
    print(
        f"candidates dt={args.dt}: {out['written']:,} users x top {out['n']} from index {out['index_version']} "
        f"(model {out['model_version']}"
        + (f", {out['excluded_purchases']:,} purchased items left out" if out["exclude_purchased"] else "")
        + f") -> user_candidates v{out['table_version']} in {out['seconds']:.1f}s"
    )
    return 0
