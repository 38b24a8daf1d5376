"""`userformer candidates --dt D`: the ``user_candidates`` table, top-N items of the current item index per user.

For every user whose ``user_embeddings`` row has ``as_of == D``, the top
``candidates_n`` items of the current index (jobs/steps/index.py; optionally
without the items the user purchased in events up to D:
``candidates_exclude_purchased`` / ``--exclude-purchased``), in one commit:
those users' rows replaced, every other user's row kept as it was (rows of
users without a user_embeddings row any more are dropped). It refuses when
those embeddings are of another model version than the index. A day without
refreshed users writes nothing and succeeds.
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
from userformer.jobs.core.storage import delta, files
from userformer.jobs.steps.index import ItemIndex, open_current, str_field, str_in, vectors_of
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
    if users is not None:
        if not users:
            return {}
        flt &= str_in("user_id", users)
    t = events.to_table(columns=["user_id", "item_idx"], filter=flt)
    out: dict[str, set[int]] = {}
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


@lease.writer("candidates")
def candidates(cfg: Config, day: datetime.date, *, exclude_purchased: bool | None = None) -> dict:
    """Write user_candidates for the users refreshed on `dt` (one MERGE commit). See the module doc."""
    t0 = time.perf_counter()
    exclude = cfg.index.candidates_exclude_purchased if exclude_purchased is None else exclude_purchased
    ue_path = cfg.table_path("user_embeddings")
    if not delta.exists(ue_path):
        raise UserError(f"no user_embeddings table at {ue_path}: run `userformer publish --dt {day}` first")
    idx = open_current(cfg)
    ue = delta.open_table(ue_path)
    ue_version = ue.version()
    ds = delta.dataset(ue)
    flt = pc.field("as_of") == pa.scalar(day, pa.date32())
    versions = {
        r["values"]: r["counts"]
        for r in pc.value_counts(ds.to_table(columns=["model_version"], filter=flt)["model_version"]).to_pylist()
    }
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
    n = cfg.index.candidates_n
    stats = {"excluded": 0, "rows": 0, "kept": 0, "dropped": 0}
    events = events_dataset(cfg) if exclude else None

    def batches():
        for b in ds.to_batches(
            columns=["user_id", "embedding"], filter=flt, batch_size=cfg.index.candidates_batch_users
        ):
            if not b.num_rows:
                continue
            users = b.column("user_id").to_pylist()
            q = vectors_of(b.column("embedding"))
            bought = purchased_items(cfg, users, day, events) if events is not None else {}
            ex = [bought.get(u, set()) for u in users] if exclude else None
            res = topn(idx, q, n, ex)
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
    from deltalake import write_deltalake
    from deltalake.exceptions import DeltaError

    # Searched batch by batch into a staged Parquet file (bounded memory; an error surfaces here, before any
    # commit). Then ONE commit that rewrites the table: the other users' rows as they are, then the new rows,
    # streamed. Not a delta-rs MERGE: it would rewrite about every file anyway (refreshed users are spread
    # over all of them) and writes strings as string_view, which pyarrow filters cannot compare (see
    # str_field). Rows of users that no longer have a user_embeddings row are dropped.
    with files.scratch(cfg.warehouse_root / "_staging" / path.name) as stage:
        staged = stage / "candidates.parquet"
        refreshed: list[str] = []
        fs, where = files.arrow(staged)
        with pq.ParquetWriter(where, tables.USER_CANDIDATES, filesystem=fs) as w:
            for b in batches():
                refreshed += b.column("user_id").to_pylist()
                w.write_batch(b)
        published_users = ds.to_table(columns=["user_id"])["user_id"].cast(pa.string()).combine_chunks()
        schema = tables.USER_CANDIDATES

        def conform(b):
            return pa.RecordBatch.from_arrays([b.column(f.name).cast(f.type) for f in schema], schema=schema)

        # Opened here: rows() runs inside delta-rs' write, which must not be re-entered. The commit lands on
        # exactly the version whose rows it copies, or fails (ConcurrentWrite): a concurrent writer's rows are
        # never dropped by this overwrite.
        read_v = delta.version_of(path)
        old = delta.dataset(delta.open_table(path, read_v)) if read_v is not None else None

        def rows():
            if old is not None:
                for b in old.to_batches(
                    filter=~str_in("user_id", refreshed), batch_size=65536, batch_readahead=1, fragment_readahead=1
                ):
                    b = conform(b)
                    live = pc.is_in(b.column("user_id"), value_set=published_users)
                    b = b.filter(live)
                    stats["kept"] += b.num_rows
                    stats["dropped"] += len(live) - b.num_rows
                    if b.num_rows:
                        yield b
            for b in pq.ParquetFile(where, filesystem=fs).iter_batches(batch_size=65536):
                yield conform(b)

        if read_v is None:
            target = delta.uri(path)
            path.mkdir(parents=True, exist_ok=True)
        else:
            target = delta.open_table(path, read_v)
        hooks.pause("candidates.before_commit")  # tests: the day's candidates staged, not committed
        created = delta.ConcurrentWrite(path, "the table was created meanwhile")
        if read_v is None and delta.exists(path):
            raise created
        try:
            with delta.conflicts(path):
                # Creating: "error", so that a table another writer created since is refused, not overwritten.
                write_deltalake(
                    target,
                    pa.RecordBatchReader.from_batches(schema, rows()),
                    mode="overwrite" if read_v is not None else "error",
                    commit_properties=delta.strict_commit(meta),
                )
        except DeltaError as exc:
            if read_v is None and delta.exists(path):
                raise created from exc
            raise
    out.update(
        written=stats["rows"],
        kept=stats["kept"],
        dropped=stats["dropped"],
        excluded_purchases=stats["excluded"],
        table_version=delta.version_of(path),
        seconds=round(time.perf_counter() - t0, 3),
    )
    log.info(
        "user_candidates: %d users of %s from index %s (v%s)", stats["rows"], day, idx.version, out["table_version"]
    )
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
