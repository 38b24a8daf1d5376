"""`userformer maintain`: keep the warehouse small and fast without losing the history repairs need.

The Spark-written tables (`events`, `events_rejected`, `user_sequences`) are
kept up through delta-spark: OPTIMIZE compacts the small files every day adds
(a `sequences` MERGE writes one small file of the active users' rows and
deletion vectors for their old rows) and rewrites files with many deleted
rows; REORG ... APPLY (PURGE) rewrites the files that still carry deletion
vectors, so readers stop filtering deleted rows; VACUUM then deletes files
(data and deletion vectors) that no version younger than the retention window
references, plus orphans of failed runs. delta-spark checkpoints their logs
itself. The other tables are written by delta-rs: delta-rs vacuums them in
its full mode (which lists the folder, so files a killed writer left behind
without a commit go too) and checkpoints them. delta-rs never vacuums a table
with deletion vectors (it does not know their files). The staging folders of
crashed runs are cleared: a writer's at once (maintain holds the lease, so
none is running), infer's staged outputs after a day untouched.

**The window** is ``storage.retention_days`` (``--retention-days`` for one
run), never under ``storage.min_retention_days`` (refused: reruns and
repairs of recent days need their versions). Every table's
``delta.logRetentionDuration`` and ``delta.deletedFileRetentionDuration``
are set to it (one SET TBLPROPERTIES commit when they differ), so the log
keeps the same history the files do. The versions the published snapshot
names (jobs/core/snapshot.py) are kept whatever their age: readers read them
until the next release.

Time travel (and so `repair`, reruns of a day) works back to the retention
window and no further: size it to the longest repair you may need.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time

from userformer.jobs.core import lease, snapshot
from userformer.jobs.core.config import Config
from userformer.jobs.core.errors import UserError
from userformer.jobs.core.spark import spark_session
from userformer.jobs.core.storage import delta, files
from userformer.schemas.tables import SPARK_TABLES, TABLES

log = logging.getLogger(__name__)

# Table properties that keep a table's history: the log entries and the removed files of the last N hours.
RETENTION_PROPERTIES = ("delta.logRetentionDuration", "delta.deletedFileRetentionDuration")


def maintain(cfg: Config, *, dry_run: bool = False, retention_days: float | None = None) -> dict:
    """Compact and purge the Spark tables, vacuum every table beyond the retention window, clear stale staging."""
    if dry_run:  # reads only: no need to wait for a writer
        return _maintain(cfg, dry_run, retention_days)
    with lease.hold(cfg, "maintain"):
        return _maintain(cfg, dry_run, retention_days)


def _maintain(cfg: Config, dry_run: bool, retention_days: float | None) -> dict:
    days = cfg.storage.retention_days if retention_days is None else retention_days
    if days < cfg.storage.min_retention_days:
        raise UserError(
            f"a retention of {days} days is under storage.min_retention_days ({cfg.storage.min_retention_days}): "
            "reruns and repairs of the last days, and readers of the published snapshot, need those versions "
            "(lower storage.min_retention_days only if you accept losing them)"
        )
    hours = int(days * 24)
    out = {"retention_days": days, "dry_run": dry_run, "tables": {}}
    released = (snapshot.current(cfg) or {}).get("tables") or {}
    spark = None
    for name in TABLES:
        path = cfg.table_path(name)
        if not delta.exists(path):
            continue
        keep = released.get(name)
        if not dry_run:
            _align_retention(cfg, name, path, hours)
        t = delta.open_table(path)
        if name in SPARK_TABLES or delta.has_deletion_vectors(t):
            if spark is None:
                spark = spark_session(cfg)
            out["tables"][name] = _spark_maintain(spark, path, max(hours, _hours_since(path, keep)), dry_run)
            continue
        vacuumed = t.vacuum(
            retention_hours=hours,
            dry_run=dry_run,
            enforce_retention_duration=False,
            full=True,  # also the files of commits that never landed (a killed writer's)
            keep_versions=[int(keep)] if keep is not None else None,
        )
        if not dry_run:
            t.create_checkpoint()
            t.cleanup_metadata()  # log entries older than the table's logRetentionDuration
        out["tables"][name] = {
            "files_deleted" if not dry_run else "files_to_delete": len(vacuumed),
            "version": t.version(),
        }
    # Staging folders of runs that died without their cleanup (a killed JVM, a lost machine). The writers' (every
    # step but infer) are dead for sure while maintain holds the lease; infer's outputs wait there for publish, so
    # only those untouched for a day go.
    stale = []
    cutoff = time.time() - 24 * 3600
    staging = cfg.warehouse_root / "_staging"
    for d in staging.glob("*/*") if staging.is_dir() else []:
        if not d.is_dir():
            continue
        newest = files.newest_mtime(d)
        if (d.parent.name != "infer" and not dry_run) or newest is None or newest < cutoff:
            stale.append(str(d))
            if not dry_run:
                files.remove_tree(d)
    out["stale_staging"] = stale
    log.info("maintain: %s", out)
    return out


def _align_retention(cfg: Config, name: str, path, hours: int) -> None:
    """The table's log and deleted-file retention = the window (one commit, only when they differ)."""
    want = {k: f"interval {hours} hours" for k in RETENTION_PROPERTIES}
    have = delta.open_table(path).metadata().configuration
    if all(have.get(k) == v for k, v in want.items()):
        return
    if name in SPARK_TABLES:
        spark = spark_session(cfg)
        props = ", ".join(f"'{k}' = '{v}'" for k, v in want.items())
        with delta.spark_commit(spark, path, {"step": "maintain", "action": "retention"}):
            spark.sql(f"ALTER TABLE delta.`{delta.spark_uri(path)}` SET TBLPROPERTIES ({props})").collect()
    else:
        with delta.conflicts(path):
            delta.open_table(path).alter.set_table_properties(
                want, commit_properties=delta.strict_commit({"step": "maintain", "action": "retention"})
            )


def _hours_since(path, version) -> int:
    """Hours since `version` of a table was committed (+1): a VACUUM window that keeps its files."""
    if version is None:
        return 0
    ts = next((h.get("timestamp") for h in delta.history(path) if int(h["version"]) == int(version)), None)
    if ts is None:
        return 0
    return int((time.time() * 1000 - int(ts)) // 3_600_000) + 1


def _spark_maintain(spark, path, hours: int, dry_run: bool) -> dict:
    """OPTIMIZE, purge of deletion vectors, VACUUM of one table through delta-spark; what each did."""
    target = f"delta.`{delta.spark_uri(path)}`"
    # Delta refuses a window under the table's deletedFileRetentionDuration (7 days) unless told to: the
    # window is storage.retention_days, chosen by whoever runs maintain.
    key = "spark.databricks.delta.retentionDurationCheck.enabled"
    # VACUUM lists the table's files in this many tasks (default 10 000: most of a small table's maintenance).
    listing = "spark.sql.sources.parallelPartitionDiscovery.parallelism"
    tasks = spark.conf.get("spark.sql.shuffle.partitions")
    if dry_run:
        with _conf(spark, key, "false"), _conf(spark, listing, tasks):
            n = spark.sql(f"VACUUM {target} RETAIN {hours} HOURS DRY RUN").count()
        return {"files_to_delete": n, "version": delta.version_of(path)}
    res = {}
    meta = {"step": "maintain"}
    with delta.spark_commit(spark, path, {**meta, "action": "optimize"}) as c:
        spark.sql(f"OPTIMIZE {target}").collect()
    res["optimize"] = _metrics(path, c["version"])
    c = {"version": None}
    if any(f.keep is not None for f in delta.data_files(path)):  # REORG plans a Spark job even with none left
        with delta.spark_commit(spark, path, {**meta, "action": "purge"}) as c:
            spark.sql(f"REORG TABLE {target} APPLY (PURGE)").collect()
    res["purge"] = _metrics(path, c["version"])
    before = delta.version_of(path)
    with _conf(spark, key, "false"), _conf(spark, listing, tasks), delta.conflicts(path):
        spark.sql(f"VACUUM {target} RETAIN {hours} HOURS").collect()
    ends = [h for h in delta.history(path, 10) if h["version"] > before and h.get("operation") == "VACUUM END"]
    res["files_deleted"] = sum(int((h.get("operationMetrics") or {}).get("numDeletedFiles", 0)) for h in ends)
    res["version"] = delta.version_of(path)
    return res


def _metrics(path, version: int | None) -> dict | None:
    """A commit's counts from its operationMetrics (None: the operation had nothing to do and committed nothing)."""
    if version is None:
        return None
    h = next(h for h in delta.history(path, 20) if h["version"] == version)
    m = h.get("operationMetrics") or {}
    return {"version": version, **{k: int(v) for k, v in m.items() if str(v).isdigit()}}


@contextlib.contextmanager
def _conf(spark, key: str, value: str):
    """A Spark SQL setting for the duration of a block, then back to what it was."""
    old = spark.conf.get(key, None)
    spark.conf.set(key, value)
    try:
        yield
    finally:
        if old is None:
            spark.conf.unset(key)
        else:
            spark.conf.set(key, old)


def register(sub) -> None:
    p = sub.add_parser(
        "maintain",
        help="compact and purge the Spark tables, vacuum old files beyond the retention "
        "window, checkpoint logs, clear stale staging",
    )
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted, change nothing")
    p.add_argument("--retention-days", type=float, help="override storage.retention_days for this run")
    p.set_defaults(func=run)


def run(args, cfg: Config) -> int:
    print(json.dumps(maintain(cfg, dry_run=args.dry_run, retention_days=args.retention_days), indent=2, default=str))
    return 0
