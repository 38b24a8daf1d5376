"""`userformer publish --dt D [--shards n]`: the staged inference of drop D -> the published tables.

**Refuses** (a clear error, exit non-zero, no table touched) unless every
shard 0..n-1 of (D, the PUBLISHED model version) has its ``_SUCCESS.json``
(jobs/steps/infer.py), the shards agree on their inputs, those inputs are still
what the warehouse holds for D, and the output checks pass
(``userformer check outputs --dt D``: jobs/steps/quality/outputs.py). A drop
older than the last published one is refused too: it would turn refreshed
rows back in time.

**Then one Delta commit per table**, in this order:

1. ``user_embeddings``: MERGE on user_id (update matched, insert new); rows of
   users without new events are not touched;
2. ``user_preference_scores``: the refreshed users' rows are deleted and
   their new rows inserted in ONE merge (a key row per refreshed user matches
   and deletes its old rows; the new rows carry no key and are inserted);
3. ``item_embeddings``: overwritten with the catalogue's vectors (skipped when
   the last publish already wrote this model on the same catalogue).

The two user tables are written by Spark (delta-spark) with deletion vectors:
a MERGE writes the refreshed users' rows into new files and marks their old
rows deleted, so a day costs its refreshed users, not the table
(`userformer maintain` compacts the files and purges the marks). After a full
re-embed (a new model version) or on the first publish, both are overwritten
with the staged rows instead: every row is new, and users no longer in
user_sequences go, so every row is of the new version. ``item_embeddings`` is
replaced whole every time and stays delta-rs's.
Each commit carries ``step=publish``, ``dt``, ``model_version``, ``shards``,
``full``, ``users``, the input Delta versions and ``outputs_id`` (which staged
shards it published). A rerun skips a table whose last publish commit has the
same ``outputs_id`` and redoes the rest, so a crash between commits is
completed by rerunning, and publishing the same staged output twice leaves
the tables as they are. An empty day (no user to refresh, same model,
same catalogue) commits nothing. Each commit lands on the version whose
history publish read: when another writer committed to that table since,
the commit is refused (`ConcurrentWrite`, exit 75) and nothing of it is
written; rerunning publish then reads afresh and completes.

**What a reader sees.** Each table is whole at every version. Between the
commits of one publish (or after a crash between them, until the rerun) the
latest versions can mix days: D's user rows with D-1's preference rows or item
vectors. After a model change that means user vectors of the new version next
to item vectors of the old one; every row carries ``model_version``, so a
reader combining tables checks it agrees, or reads the versions named by
``warehouse/_published/outputs.json`` (`published_outputs`), written after
the last commit of every complete publish: one consistent snapshot (Delta time
travel). History: every version stays readable until `userformer maintain`
vacuums it (``storage.retention_days``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import sys
import time

from userformer.jobs.core import drops, hooks, lease, registry
from userformer.jobs.core.config import Config
from userformer.jobs.core.dates import date_arg
from userformer.jobs.core.errors import UserError
from userformer.jobs.core.spark import spark_session
from userformer.jobs.core.storage import delta
from userformer.jobs.core.storage.files import Location, append_line, parquet_dataset, write_json
from userformer.jobs.steps import check, infer
from userformer.schemas import tables

KEY = "_replace_user"  # merge key of user_preference_scores' delete+insert


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def marker_path(cfg: Config) -> Location:
    return cfg.warehouse_root / "_published" / "outputs.json"


def published_outputs(cfg: Config) -> dict | None:
    """The last complete publish: {"dt", "model_version", "tables": {name: Delta version}, ...}, or None.
    Read the tables at these versions for a snapshot in which all three agree."""
    p = marker_path(cfg)
    return json.loads(p.read_text()) if p.is_file() else None


def write_marker(cfg: Config, record: dict) -> None:
    write_json(marker_path(cfg), record)
    append_line(marker_path(cfg).with_name("log.jsonl"), json.dumps(record, default=str))


# ------------------------------------------------------------- the shards
def staged_shards(cfg: Config, day: dt.date, version: str, shards: int) -> list[dict]:
    """The manifests of shards 0..shards-1 of (day, version); a UserError naming every missing shard."""
    out, missing = [], []
    for i in range(shards):
        d = infer.shard_dir(cfg, day, version, i, shards)
        m = infer.read_manifest(d)
        if m is None:
            missing.append(i)
        else:
            out.append(m)
    if missing:
        have = (
            sorted(p.name for p in infer.day_dir(cfg, day, version).glob("shard=*"))
            if infer.day_dir(cfg, day, version).is_dir()
            else []
        )
        cmds = "; ".join(f"userformer infer --dt {day} --shard {i} --shards {shards}" for i in missing[:3])
        raise UserError(
            f"publish dt={day}: {len(missing)} of {shards} shards of model {version} have no staged "
            f"output (missing: {', '.join(infer.shard_name(i, shards) for i in missing)}; staged: "
            f"{', '.join(have) or 'none'}); run {cmds}{' ...' if len(missing) > 3 else ''}"
        )
    return out


def consistent(manifests: list[dict]) -> dict:
    """What every shard must share (inputs, full or not, model); a UserError when they differ."""
    keys = ("dt", "model_version", "full", "inputs", "tasks", "top_k_labels", "d_model", "selection")
    first = {k: manifests[0].get(k) for k in keys}
    for m in manifests[1:]:
        diff = [k for k in keys if m.get(k) != first[k]]
        if diff:
            raise UserError(
                f"publish dt={first['dt']}: shard {m['shard']} of {m['shards']} differs from shard "
                f"{manifests[0]['shard']} in {', '.join(diff)} (inferred from different inputs); rerun "
                f"`userformer infer` for every shard"
            )
    return first


def outputs_id(manifests: list[dict]) -> str:
    return hashlib.sha256("|".join(sorted(m["run_id"] for m in manifests)).encode()).hexdigest()[:16]


def _files(manifests: list[dict], table: str) -> list[str]:
    return [str(f) for m in manifests for f in infer.staged_parts(m, table) if f.is_file()]


# ----------------------------------------------------------------- commits
def _reader(files: list[str], schema):
    """The staged rows of `files` as one stream (bounded memory)."""
    import pyarrow as pa

    ds = parquet_dataset(files, schema=schema)
    return pa.RecordBatchReader.from_batches(schema, ds.to_batches(batch_readahead=1, fragment_readahead=1))


def _as_read(path, schema, read_v: int | None):
    """The table at the version publish read (created empty when it found none), to commit on exactly that
    version: a writer that committed since makes the commit fail (ConcurrentWrite) instead of being merged
    over or overwritten unseen."""
    if read_v is None:
        delta.ensure_table(path, schema)
        read_v = 0  # the empty table ensure_table creates; a table created meanwhile has later versions
    return delta.open_table(path, read_v)


def _commit_users(cfg: Config, table: str, source, full: bool, meta: dict, read_v: int | None, clauses: str) -> int:
    """One commit of a user-keyed output by Spark (delta-spark), on the version publish read.

    A day's refresh is a MERGE on user_id with deletion vectors: it writes the refreshed users' rows and marks
    their old ones deleted, so it costs the day's users, not the table. A full re-embed (or the first publish)
    overwrites: every row is new, and the table becomes exactly the staged rows (users no longer in
    user_sequences go)."""
    path = cfg.table_path(table)
    spark = spark_session(cfg)
    delta.expect_version(path, read_v)
    delta.ensure_merge_table(spark, path, tables.TABLES[table][0], "publish")
    if full or read_v is None:
        return delta.spark_write(source, path, mode="overwrite", metadata=meta, properties=delta.DELETION_VECTORS)
    with delta.spark_commit(spark, path, meta) as c:
        delta.spark_merge(spark, path, source, on=f"t.user_id = s.{_key(table)}", clauses=clauses)
    return c["version"]


def _key(table: str) -> str:
    return "user_id" if table == "user_embeddings" else KEY


def _merge_embeddings(cfg: Config, staged: list[str], full: bool, meta: dict, read_v: int | None) -> int:
    """Update the refreshed users' rows, insert the new users'."""
    source = delta.spark_parquet(spark_session(cfg), staged, tables.spark_ddl(tables.USER_EMBEDDINGS))
    clauses = "WHEN MATCHED THEN UPDATE SET * WHEN NOT MATCHED THEN INSERT *"
    return _commit_users(cfg, "user_embeddings", source, full, meta, read_v, clauses)


def _replace_preferences(
    cfg: Config, user_files: list[str], staged: list[str], full: bool, meta: dict, read_v: int | None
) -> int:
    """Delete every row of the refreshed users and insert their new rows, in one merge commit: one key row per
    refreshed user matches and deletes its old rows (user ids are unique over the shards: checked before
    publishing); the new rows carry no key, never match, and are inserted."""
    from pyspark.sql import functions as F

    spark = spark_session(cfg)
    cols = tables.USER_PREFERENCE_SCORES.names
    rows = delta.spark_parquet(spark, staged, tables.spark_ddl(tables.USER_PREFERENCE_SCORES))
    if full or read_v is None:
        return _commit_users(cfg, "user_preference_scores", rows, True, meta, read_v, "")
    keys = delta.spark_parquet(spark, user_files, "`user_id` string").select(F.col("user_id").alias(KEY))
    source = keys.unionByName(rows.withColumn(KEY, F.lit(None).cast("string")), allowMissingColumns=True)
    insert = f"INSERT ({', '.join(cols)}) VALUES ({', '.join('s.' + c for c in cols)})"
    clauses = f"WHEN MATCHED THEN DELETE WHEN NOT MATCHED AND s.{KEY} IS NULL THEN {insert}"
    return _commit_users(cfg, "user_preference_scores", source, False, meta, read_v, clauses)


def _overwrite_items(cfg: Config, files: list[str], meta: dict, read_v: int | None) -> int:
    from deltalake import write_deltalake

    path = cfg.table_path("item_embeddings")
    t = _as_read(path, tables.ITEM_EMBEDDINGS, read_v)
    with delta.conflicts(path):
        write_deltalake(
            t, _reader(files, tables.ITEM_EMBEDDINGS), mode="overwrite", commit_properties=delta.strict_commit(meta)
        )
    return t.version()


# -------------------------------------------------------------------- step
@lease.writer("publish")
def publish(cfg: Config, day: dt.date, shards: int | None = None, log=_stderr) -> dict:
    """Check and publish the staged inference of drop `day` (module doc). Returns what was committed."""
    t0 = time.perf_counter()
    shards = shards or cfg.infer.shards
    if shards < 1:
        raise UserError(f"--shards must be >= 1, got {shards}")
    ptr = registry.published(cfg)
    if ptr is None:
        raise UserError(f"no published model under {cfg.models_root}: run `userformer train` first")
    version = ptr["version"]

    last = infer.last_publish(cfg)
    marker = published_outputs(cfg)
    days = [dt.date.fromisoformat(p["dt"]) for p in last.values() if p and p.get("dt")]
    if marker and marker.get("dt"):
        days.append(dt.date.fromisoformat(marker["dt"]))
    if days and day < max(days):
        raise UserError(
            f"publish dt={day}: drop {max(days)} is published already; publishing an older drop would "
            f"turn the rows refreshed since back in time (publish drops in order; rerun {max(days)} "
            "to redo the latest)"
        )

    manifests = staged_shards(cfg, day, version, shards)
    common = consistent(manifests)
    seq_v, _ = drops.sequences_version(cfg, day)
    staged_v = common["inputs"]["user_sequences"]["version"]
    if staged_v != seq_v:
        raise UserError(
            f"publish dt={day}: the shards were inferred from user_sequences version {staged_v}, but the "
            f"warehouse now holds version {seq_v} for {day} (sequences rerun?); rerun `userformer infer "
            f"--dt {day}` for every shard"
        )
    need_full = infer.full_reason(cfg, day, version)
    if need_full and common.get("selection") and all(p and p.get("model_version") == version for p in last.values()):
        # A repair's selected users (jobs/flows/repair.py): the published rows are all of this model already (its
        # full re-embed was published), so replacing just these users keeps one model version per snapshot.
        need_full = None
    if need_full and not common["full"]:
        raise UserError(
            f"publish dt={day}: the shards hold only the day's users but {need_full}; rerun "
            f"`userformer infer --dt {day}` for every shard"
        )

    res = check.check(cfg, "outputs", day, {"shards": shards})
    if not res.success:
        raise UserError(
            f"publish dt={day}: the output checks failed, nothing was published\n{check.summary(res)}", code=1
        )

    users = sum(m["users"] for m in manifests)
    oid = outputs_id(manifests)
    inputs = common["inputs"]
    meta = {
        "step": "publish",
        "dt": str(day),
        "model_version": version,
        "shards": shards,
        "full": common["full"],
        "users": users,
        "outputs_id": oid,
        **{f"{t}_version": inputs[t]["version"] for t in ("user_sequences", "items", "vocab") if t in inputs},
    }
    done = {}  # table -> its last publish commit
    read_v = {}  # table -> the version whose history decided what to commit (None: no table); commits land on it
    for t in infer.OUTPUTS:
        read_v[t] = delta.version_of(cfg.table_path(t))
        commits = infer.publish_commits(cfg, t)
        done[t] = commits[-1] if commits else None
    report: dict[str, dict] = {}

    def already(table: str) -> bool:
        h = done[table]
        return h is not None and h.get("outputs_id") == oid

    # 1 + 2: the users' tables.
    user_files = _files(manifests, "user_embeddings")
    for table in ("user_embeddings", "user_preference_scores"):
        if already(table):
            report[table] = {
                "committed": False,
                "version": done[table]["version"],
                "reason": "this staged output is published already",
            }
        elif users == 0:
            report[table] = {
                "committed": False,
                "version": delta.version_of(cfg.table_path(table)),
                "reason": f"no user to refresh on {day}",
            }
        else:
            if table == "user_embeddings":
                v = _merge_embeddings(cfg, user_files, common["full"], meta, read_v[table])
            else:
                v = _replace_preferences(cfg, user_files, _files(manifests, table), common["full"], meta, read_v[table])
            report[table] = {"committed": True, "version": v, "rows": sum(m["rows"][table] for m in manifests)}
            hooks.pause(f"publish.after_{table}")  # tests: a kill between publish's commits
    # 3: the items (the same catalogue under the same model: nothing new).
    items_m = next(m for m in manifests if m["shard"] == 0)
    h = done["item_embeddings"]
    same = (
        h is not None
        and h.get("model_version") == version
        and all(h.get(f"{t}_version") == str(inputs[t]["version"]) for t in ("items", "vocab"))
        and h.get("items") == str(items_m["rows"]["item_embeddings"])
    )
    if already("item_embeddings") or same:
        report["item_embeddings"] = {
            "committed": False,
            "version": h["version"],
            "reason": "the same model's vectors of the same catalogue are published",
        }
    else:
        v = _overwrite_items(
            cfg,
            _files([items_m], "item_embeddings"),
            {**meta, "items": items_m["rows"]["item_embeddings"]},
            read_v["item_embeddings"],
        )
        report["item_embeddings"] = {"committed": True, "version": v, "rows": items_m["rows"]["item_embeddings"]}

    record = {
        "dt": str(day),
        "model_version": version,
        "shards": shards,
        "full": common["full"],
        "users": users,
        "outputs_id": oid,
        "tables": {t: r["version"] for t, r in report.items()},
        "inputs": {t: v["version"] for t, v in inputs.items()},
        "published_at": registry.now_iso(),
    }
    hooks.pause("publish.before_record")  # tests: every table committed, the record not written
    write_marker(cfg, record)
    out = {
        **record,
        "reason": common.get("reason") or manifests[0].get("reason"),
        "commits": report,
        "check": str(res.json_path),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    log(
        f"publish dt={day}: model {version}, {users} users ({'full' if common['full'] else 'incremental'}), "
        + ", ".join(f"{t} {'v' + str(r['version']) if r['committed'] else 'unchanged'}" for t, r in report.items())
    )
    return out


# -------------------------------------------------------------------- CLI
def register(sub) -> None:
    p = sub.add_parser(
        "publish",
        help="check the staged inference of drop D and publish it: user_embeddings "
        "(merge), user_preference_scores, item_embeddings (one commit each)",
        description="Publish the staged output of `userformer infer --dt D` (every shard of the "
        "published model) after the output checks pass; refuses and writes nothing "
        "otherwise. See jobs/steps/publish.py.",
    )
    p.add_argument("--dt", type=date_arg, required=True, help="drop date YYYY-MM-DD")
    p.add_argument("--shards", type=int, help="number of shards to expect (default: infer.shards)")
    p.set_defaults(func=run)


def run(args, cfg: Config) -> int:
    print(json.dumps(publish(cfg, args.dt, shards=args.shards), indent=2, default=str))
    return 0
