"""`userformer repair --from D1 --to D2 --mode restore|recompute`: undo bad drops, then redo them from clean data.

What on-call runs after data corruption (the `repair` DAG runs the same functions). Two modes:

**restore** (the drops D1..D2 were bad; their raw files are fixed now). Everything goes back to its state before
D1, then the drops are processed again, in order, as the daily pipeline does (`pipeline.run_day`), so the result
equals a run that never saw the bad data:

1. every Delta table (schemas.tables.TABLES) is restored (one Delta RESTORE commit each; delta-spark's for
   the tables Spark writes, schemas.tables.SPARK_TABLES, as delta-rs's would drop their deletion vectors) to the
   last version of its *lineage* (jobs/core/storage/delta.py `lineage`: its commits minus those earlier restores
   undid) before the first commit whose custom metadata names a drop >= D1 (``dt``, or ``upto`` of a rebuild).
   A table with no commit of a drop before D1 (it was created on or after D1, e.g. user_embeddings by the first
   publish) is **moved aside** to ``warehouse/_repair/<id>/<table>`` (kept for inspection): before D1 it did
   not exist, and the re-run creates it as a clean run would. A table without commits of D1 or later is left
   alone;
2. the model registry's PUBLISHED pointer goes back to the version that was published before D1 (from
   publish_log.jsonl: the last version trained as of a drop before D1, or the state a previous repair set), or
   is removed when there was none. No version is deleted; the change is a line in publish_log.jsonl;
3. the index CURRENT pointer goes back to the newest accepted index of that model built before D1 (rebuilt from
   the restored item_embeddings when none is kept), or is removed with the model; logged in switch_log.jsonl;
4. the publish record ``warehouse/_published/outputs.json`` goes back to the last publish before D1 and the
   published snapshot (jobs/core/snapshot.py: what readers read) to the last one released before D1; the day
   ledgers ``reports_root/runs/dt=D`` for D >= D1 are moved to ``reports_root/repairs/<id>/runs/``; the
   staged inference of those days is deleted;
5. drops D1..D2 are run again with `pipeline.run_day`, in order.

Refused, before anything changes: D2 < D1; D2 before the latest drop the warehouse processed (restoring to
before D1 and re-running only to D2 would leave the later drops out of the tables while the daily run goes on
after them: pass D2 >= the latest drop, the plan says which); nothing processed on or after D1; a raw drop of
D1..D2 not ready; and D1 beyond the **retention window**: a version to restore whose files were vacuumed or
whose log entries were cleaned up (`userformer maintain`, storage.retention_days): time travel cannot reach it,
use recompute.

**recompute** (the events are clean now, e.g. a bad partition was re-ingested, but user_sequences was built from
bad ones, or was damaged itself): the rows of the affected users (``--users``, or every user with events in
D1..D2 or a sequence row updated on D1..D2) are rebuilt from all their events up to the latest applied drop L,
in ONE user_sequences commit (metadata step=sequences-rebuild, upto=L; selected users without events lose
their row); then exactly those users are re-inferred with the published model (every shard), published as of
L (user_embeddings / user_preference_scores replace just their rows; rows of removed users are deleted), and
the index and their candidates rebuilt. Refused unless the outputs are published up to L with the published
model (finish or rerun drop L first). After a recompute, a rerun of drop L needs `userformer sequences
--rebuild` (its sequences are a rebuild now) or a restore repair.

An interrupted repair (killed, or a re-run day failed) is continued by running the same repair again: the newest
report under ``reports_root/repairs/`` names its plan, and its stages re-derive what is left from the warehouse.
Both modes are idempotent: the same repair again gives the same tables (restore re-runs from the same restored
state; recompute rebuilds the same rows; run-specific columns such as user_embeddings.updated_at and the ids
of newly trained model and index versions are new). Every table changes by whole commits; a failure part way
leaves each table at one of its versions, and running the same repair again completes it. In restore mode the
published tables are the restored (before D1) snapshot until the re-run publishes D1; a failed re-run day
leaves the warehouse as a pipeline stopped at that day. `--dry-run` prints the plan (every table's version now
and the version it goes back to) and changes nothing. Every repair writes its plan and result to
``reports_root/repairs/<id>.json`` and prints it.

A repair holds the warehouse lease (jobs/core/lease.py) from its plan to its last stage: a daily run's writers
wait for it, and it waits for a writer that holds the lease when it starts.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid
from pathlib import Path

from userformer.jobs.core import hooks, lease, registry, snapshot
from userformer.jobs.core.config import Config
from userformer.jobs.core.dates import date_arg, date_range
from userformer.jobs.core.drops import last_drop
from userformer.jobs.core.errors import GateFailed, UserError
from userformer.jobs.core.spark import spark_session
from userformer.jobs.core.storage import delta, files
from userformer.jobs.flows import pipeline
from userformer.jobs.steps import index as index_step
from userformer.jobs.steps import infer as infer_step
from userformer.jobs.steps import publish as publish_step
from userformer.jobs.steps import sequences as sequences_step
from userformer.schemas import tables as schema

log = logging.getLogger(__name__)

MODES = ("restore", "recompute")
# Output tables keyed by user (rows of a user removed by recompute are deleted from these).
USER_OUTPUTS = ("user_embeddings", "user_preference_scores", "user_candidates")


# ------------------------------------------------------------------ helpers
def new_id() -> str:
    return f"r{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


def repairs_root(cfg: Config) -> Path:
    return cfg.reports_root / "repairs"


def _commit_day(h: dict) -> dt.date | None:
    d = h.get("dt") or h.get("upto")
    try:
        return dt.date.fromisoformat(d) if d else None
    except ValueError:
        return None


def _brief(h: dict) -> str:
    """A commit in one line: "v3 publish dt=2026-11-02" (step, else operation)."""
    d = h.get("dt") or h.get("upto")
    return f"v{h['version']} {h.get('step') or h.get('operation')}" + (f" dt={d}" if d else "")


def _ts(h: dict) -> str | None:
    ms = h.get("timestamp")
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="seconds") if ms else None


def parse_users(users=None, users_file: str | Path | None = None) -> list[str] | None:
    """The user selection: a list, comma-separated text, and/or a file (one id a line, or a Parquet file with a
    user_id column). None when neither is given; a UserError for an empty selection."""
    if users is None and users_file is None:
        return None
    out: list[str] = []
    if isinstance(users, str):
        users = users.split(",")
    out += [str(u).strip() for u in users or []]
    if users_file is not None:
        p = Path(users_file)
        if not p.is_file():
            raise UserError(f"--users-file {p}: no such file")
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            t = pq.read_table(p)
            if "user_id" not in t.column_names:
                raise UserError(f"--users-file {p}: a Parquet file needs a user_id column")
            out += [str(u) for u in t["user_id"].to_pylist() if u is not None]
        else:
            out += [ln.strip() for ln in p.read_text().splitlines()]
    out = sorted({u for u in out if u})
    if not out:
        raise UserError("the user selection is empty (--users / --users-file)")
    return out


def _validate_range(from_dt: dt.date, to_dt: dt.date, mode: str) -> None:
    if mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if to_dt < from_dt:
        raise UserError(f"--to {to_dt} is before --from {from_dt}")


def ledger_days(cfg: Config) -> list[dt.date]:
    root = cfg.reports_root / "runs"
    out = []
    for p in root.glob("dt=*") if root.is_dir() else []:
        try:
            out.append(dt.date.fromisoformat(p.name[3:]))
        except ValueError:
            continue
    return sorted(out)


def latest_processed(cfg: Config) -> dt.date | None:
    """The latest drop the warehouse holds anything of: a table commit (lineage) naming it, or a day ledger."""
    days = list(ledger_days(cfg))
    for name in schema.TABLES:
        path = cfg.table_path(name)
        if delta.exists(path):
            days += [d for h in delta.lineage(path) if (d := _commit_day(h))]
    return max(days, default=None)


# ------------------------------------------------------------ restore plan
def table_target(cfg: Config, name: str, from_dt: dt.date) -> dict:
    """What restore does to table `name`: unchanged / restore (to_version) / move_aside / absent; with the
    commits it undoes. A UserError when the state before from_dt is beyond the retention window."""
    path = cfg.table_path(name)
    if not delta.exists(path):
        return {"table": name, "action": "absent"}
    lin = delta.lineage(path)
    cur = lin[-1]["version"]
    first_bad = next((i for i, h in enumerate(lin) if (d := _commit_day(h)) and d >= from_dt), None)
    if first_bad is None:
        return {"table": name, "action": "unchanged", "version": cur}
    before, undone = lin[:first_bad], lin[first_bad:]
    out = {"table": name, "version": cur, "undone": [_brief(h) for h in undone]}
    earlier = [h for h in undone if (d := _commit_day(h)) and d < from_dt]
    if earlier:
        out["warning"] = (
            f"{len(earlier)} commit(s) of drops before {from_dt} made after the first commit of "
            f"{from_dt} or later are undone too (versions {[h['version'] for h in earlier]}); the "
            "re-run redoes only drops from " + str(from_dt)
        )
    if not any(_commit_day(h) for h in before):
        if lin[0]["version"] != 0:
            raise UserError(
                f"cannot restore {name} to before {from_dt}: its log starts at version {lin[0]['version']} (older "
                f"entries were cleaned up by `userformer maintain`, storage.retention_days="
                f"{cfg.storage.retention_days}): {from_dt} is beyond the retention window; use --mode recompute"
            )
        return {
            **out,
            "action": "move_aside",
            "first_dt": str(_commit_day(undone[0]) or from_dt),
            "note": f"created by drop {_commit_day(undone[0])}: it did not exist before {from_dt}",
        }
    target = before[-1]["version"]
    try:
        missing = delta.missing_files(path, target)
    except Exception as exc:  # the log entries of that version are gone
        raise UserError(
            f"cannot restore {name} to version {target} (before {from_dt}): {exc}; {from_dt} is beyond "
            f"the retention window (storage.retention_days={cfg.storage.retention_days}); use --mode "
            "recompute"
        ) from None
    if missing:
        raise UserError(
            f"cannot restore {name} to version {target} (its state before {from_dt}): {len(missing)} of its files "
            f"were vacuumed (e.g. {missing[0]}); {from_dt} is beyond the retention window (storage.retention_days="
            f"{cfg.storage.retention_days}, `userformer maintain`). Use --mode recompute"
        )
    last_good = max(d for h in before if (d := _commit_day(h)))
    return {
        **out,
        "action": "restore",
        "to_version": target,
        "to_dt": str(last_good),
        "to_committed_at": _ts(before[-1]),
    }


def registry_target(cfg: Config, from_dt: dt.date) -> dict:
    """The PUBLISHED pointer before from_dt, replayed from publish_log.jsonl (module doc)."""

    models = registry.store(cfg)
    cur = models.pointer()
    target, warnings = None, []
    for e in models.log():
        rep = e.get("repair")
        if rep and rep.get("from_dt"):
            if dt.date.fromisoformat(rep["from_dt"]) <= from_dt:
                target = e.get("version")
            continue
        v = e.get("version")
        if not v:
            continue
        try:
            vdt = models.read_manifest(v).get("dt")
        except UserError as exc:
            warnings.append(f"publish_log names {v}, which cannot be read ({exc}): skipped")
            continue
        if vdt is None:
            warnings.append(f"{v} has no drop date (trained without --dt): not taken as a model of before {from_dt}")
        elif dt.date.fromisoformat(vdt) < from_dt:
            target = v
    current = cur["version"] if cur else None
    withdrawn = []
    for man in models.manifests():
        if man.get("dt") and dt.date.fromisoformat(man["dt"]) >= from_dt:
            withdrawn.append({"version": man["version"], "status": man.get("status")})
    return {
        "current": current,
        "target": target,
        "action": "unchanged" if current == target else ("unpublish" if target is None else "publish"),
        "versions_of_repaired_drops": withdrawn,
        "warnings": warnings,
    }


def index_target(cfg: Config, from_dt: dt.date, model: str | None) -> dict:
    """The index CURRENT for the restored model: the newest accepted index of it built before from_dt."""

    indexes = index_step.store(cfg)
    ptr = indexes.pointer()
    cur = ptr["version"] if ptr else None
    if model is None:
        return {"current": cur, "target": None, "action": "unset" if cur else "unchanged"}
    best = None
    for v in indexes.versions():
        try:
            m = indexes.read_manifest(v)
        except UserError:
            continue
        if (
            m.get("status") == "current"
            and m.get("model_version") == model
            and m.get("as_of")
            and dt.date.fromisoformat(m["as_of"]) < from_dt
            and (indexes.path(v) / index_step.INDEX_FILE).is_file()
        ):
            best = v
    if best is None:
        return {
            "current": cur,
            "target": None,
            "action": "rebuild",
            "note": f"no kept index of {model} built before {from_dt}: rebuilt from the restored item_embeddings",
        }
    return {"current": cur, "target": best, "action": "unchanged" if best == cur else "switch"}


def marker_target(cfg: Config, from_dt: dt.date) -> dict:
    """The publish marker before from_dt: the last record of _published/log.jsonl of a drop before it."""

    cur = publish_step.published_outputs(cfg)
    logf = publish_step.marker_path(cfg).with_name("log.jsonl")
    target = None
    for line in logf.read_text().splitlines() if logf.is_file() else []:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("dt") and dt.date.fromisoformat(rec["dt"]) < from_dt:
            target = rec
    cur_dt = cur.get("dt") if cur else None
    if cur_dt is None or dt.date.fromisoformat(cur_dt) < from_dt:
        return {"current_dt": cur_dt, "action": "unchanged"}
    return {
        "current_dt": cur_dt,
        "target_dt": target["dt"] if target else None,
        "action": "rewrite" if target else "remove",
        "_record": target,
    }


def snapshot_target(cfg: Config, from_dt: dt.date) -> dict:
    """The published snapshot before from_dt: the last record of snapshot_log.jsonl of a drop before it."""
    cur = snapshot.current(cfg)
    cur_dt = cur.get("dt") if cur else None
    if cur_dt is None or dt.date.fromisoformat(cur_dt) < from_dt:
        return {"current_dt": cur_dt, "action": "unchanged"}
    target = None
    for rec in snapshot.history(cfg):
        if rec.get("dt") and dt.date.fromisoformat(rec["dt"]) < from_dt:
            target = rec
    return {
        "current_dt": cur_dt,
        "target_dt": target["dt"] if target else None,
        "action": "rewrite" if target else "remove",
        "_record": target,
    }


def plan_restore(cfg: Config, from_dt: dt.date, to_dt: dt.date) -> dict:
    """Everything restore will do, validated; changes nothing (the dry run prints it)."""
    _validate_range(from_dt, to_dt, "restore")
    latest = latest_processed(cfg)
    if latest is None or latest < from_dt:
        raise UserError(
            f"nothing was processed on or after {from_dt} (latest drop: {latest}): there is nothing to "
            f"restore; run the days with `userformer run-day --dt {from_dt} --to {to_dt}`"
        )
    if to_dt < latest:
        raise UserError(
            f"--to {to_dt} is before {latest}, the latest drop the warehouse processed: restoring to before "
            f"{from_dt} and re-running only up to {to_dt} would leave drops {to_dt + dt.timedelta(days=1)}.."
            f"{latest} out of the tables while the daily run carries on after them. Pass --to {latest} (or later)"
        )

    days = date_range(from_dt, (to_dt - from_dt).days + 1)
    not_ready = [str(d) for d in days if not pipeline.raw_ready(cfg, d)]
    if not_ready:
        raise UserError(
            f"raw drop(s) {', '.join(not_ready)} are not ready ({cfg.raw_events_dir(not_ready[0])}"
            + (f" has no {cfg.pipeline.ready_marker} marker" if cfg.pipeline.ready_marker else "")
            + "): fix the raw data first; nothing was changed"
        )
    tables = {name: table_target(cfg, name, from_dt) for name in schema.TABLES}
    reg = registry_target(cfg, from_dt)
    idx = index_target(cfg, from_dt, reg["target"])
    return {
        "mode": "restore",
        "from_dt": str(from_dt),
        "to_dt": str(to_dt),
        "latest_processed": str(latest),
        "tables": tables,
        "model": reg,
        "index": idx,
        "marker": marker_target(cfg, from_dt),
        "snapshot": {k: v for k, v in snapshot_target(cfg, from_dt).items() if k != "_record"},
        "ledgers": [str(d) for d in ledger_days(cfg) if d >= from_dt],
        "staged_infer": [p.name for p in _staged_days(cfg) if _day_of(p) and _day_of(p) >= from_dt],
        "rerun": [str(d) for d in days],
    }


def _staged_days(cfg: Config) -> list[files.Location]:

    root = infer_step.staging_root(cfg)
    return sorted(root.glob("dt=*")) if root.is_dir() else []


def _day_of(p: files.Location) -> dt.date | None:
    try:
        return dt.date.fromisoformat(p.name[3:])
    except ValueError:
        return None


# ---------------------------------------------------------- restore apply
def apply_restore(cfg: Config, from_dt: dt.date, repair_id: str) -> dict:
    """Steps 1-4 of restore (module doc). Re-derives the plan from the warehouse as it is, so a retry after a
    failure part way does exactly what is left."""
    from deltalake import CommitProperties

    extra = {"repair": {"id": repair_id, "mode": "restore", "from_dt": str(from_dt)}}
    meta = {"step": "repair", "repair_id": repair_id, "repair_mode": "restore", "repair_from_dt": str(from_dt)}
    aside = cfg.warehouse_root / "_repair" / repair_id
    done: dict[str, dict] = {}
    # Every target first: nothing changes unless every table can be restored.
    targets = {name: table_target(cfg, name, from_dt) for name in schema.TABLES}
    for name, t in targets.items():
        path = cfg.table_path(name)
        if t["action"] == "restore":
            rmeta = {**meta, "restored_version": str(t["to_version"])}
            if name in schema.SPARK_TABLES:
                # Spark's tables through delta-spark: delta-rs's RESTORE would re-add the files without their
                # deletion vectors (user_sequences), bringing deleted rows back.
                spark = spark_session(cfg)
                with delta.spark_commit(spark, path, rmeta) as c:
                    delta.spark_restore(spark, path, t["to_version"])
                version = c["version"]
            else:
                delta.open_table(path).restore(
                    t["to_version"], commit_properties=CommitProperties(custom_metadata=rmeta)
                )
                version = delta.version_of(path)
            done[name] = {
                "action": "restore",
                "from_version": t["version"],
                "to_version": t["to_version"],
                "version": version,
            }
        elif t["action"] == "move_aside":
            dest = aside / name
            files.move(path, dest)
            done[name] = {"action": "move_aside", "from_version": t["version"], "moved_to": str(dest)}
        else:
            done[name] = {"action": t["action"], "version": t.get("version")}
        log.info("repair %s: %s %s", repair_id, name, done[name])

    reg = registry_target(cfg, from_dt)
    reason = f"repair {repair_id}: restore to before {from_dt}"
    if reg["action"] == "publish":
        registry.publish(cfg, reg["target"], reason, extra=extra)
    elif reg["action"] == "unpublish":
        registry.unpublish(cfg, reason, extra=extra)
    model = {k: reg[k] for k in ("action", "current", "target")}

    idx = index_target(cfg, from_dt, reg["target"])
    if idx["action"] == "switch":
        index_step.switch(cfg, idx["target"], extra=extra)
    elif idx["action"] == "unset":
        index_step.unset_current(cfg, extra=extra)
    elif idx["action"] == "rebuild":
        if delta.exists(cfg.table_path("item_embeddings")):
            res = index_step.build_index(cfg, from_dt - dt.timedelta(days=1))
            idx = {**idx, "built": res.version, "status": res.status}
        else:
            index_step.unset_current(cfg, extra=extra)
            idx = {**idx, "action": "unset"}

    mk = marker_target(cfg, from_dt)
    if mk["action"] == "rewrite":
        rec = dict(mk.pop("_record"))
        rec["tables"] = {t: delta.version_of(cfg.table_path(t)) for t in rec.get("tables", {})}
        rec.update(extra, restored_at=registry.now_iso())
        publish_step.write_marker(cfg, rec)
    elif mk["action"] == "remove":
        mk.pop("_record", None)
        files.move(publish_step.marker_path(cfg), aside / "outputs.json")
    else:
        mk.pop("_record", None)

    # Readers go back to the last snapshot released before D1, on the restored versions (the same rows) and
    # the index step 3 made current; the re-run days release theirs.
    snap = snapshot_target(cfg, from_dt)
    if snap["action"] == "rewrite":
        rec = dict(snap.pop("_record"))
        rec["tables"] = {t: delta.version_of(cfg.table_path(t)) for t in rec.get("tables", {})}
        ptr = index_step.current(cfg)
        if ptr is not None:
            man = index_step.read_manifest(cfg, ptr["version"])
            rec["index"] = {k: man.get(k) for k in ("version", "model_version", "kind", "items", "recall_at_10")}
        rec.update(extra, released_at=registry.now_iso())
        snapshot.flip(cfg, rec)
    elif snap["action"] == "remove":
        snap.pop("_record", None)
        snapshot.remove(cfg, aside)
    else:
        snap.pop("_record", None)

    moved = []
    runs_aside = repairs_root(cfg) / repair_id / "runs"
    for d in ledger_days(cfg):
        if d >= from_dt:
            runs_aside.mkdir(parents=True, exist_ok=True)
            src = cfg.reports_root / "runs" / f"dt={d}"
            src.rename(runs_aside / src.name)
            moved.append(str(d))
    staged = []
    for p in _staged_days(cfg):
        if (d := _day_of(p)) and d >= from_dt:
            files.remove_tree(p)
            staged.append(str(d))
    return {
        "tables": done,
        "model": model,
        "index": {k: v for k, v in idx.items() if k != "note"},
        "marker": mk,
        "snapshot": snap,
        "ledgers_moved": moved,
        "ledgers_moved_to": str(runs_aside) if moved else None,
        "staged_infer_deleted": staged,
    }


def rerun_days(cfg: Config, days: list[dt.date]) -> list[dict]:
    """Run the drops again, in order, as the daily pipeline does. Stops at the first failure (raised)."""

    out = []
    for d in days:
        t0 = time.perf_counter()
        r = pipeline.run_day(cfg, d)
        out.append(
            {
                "dt": str(d),
                "seconds": round(time.perf_counter() - t0, 1),
                "accepted": r["ingest"].get("accepted"),
                "users_refreshed": r["sequences"].get("active_users"),
                "model": _model_of(r),
                "published": _published_of(r.get("publish") or {}),
                "index": (r.get("index") or {}).get("version"),
            }
        )
    return out


def _model_of(r: dict) -> str | None:
    g = r.get("gate") or {}
    return g.get("published") or (r.get("finetune") or {}).get("version")


def _published_of(p: dict) -> dict | None:
    if p.get("skipped"):
        return None
    return {"users": p.get("users"), "full": p.get("full"), "tables": p.get("tables")}


# --------------------------------------------------------------- recompute
def plan_recompute(cfg: Config, from_dt: dt.date, to_dt: dt.date, users: list[str] | None) -> dict:
    """What recompute will do, validated (the affected users are counted by `select_users`)."""

    _validate_range(from_dt, to_dt, "recompute")
    seq, events = cfg.table_path("user_sequences"), cfg.table_path("events")
    if not delta.exists(seq) or not delta.exists(events):
        raise UserError(f"recompute needs the events and user_sequences tables under {cfg.warehouse_root}")
    latest, _ = last_drop(seq)
    if latest is None:  # the last commit has no drop (an edit by hand): the last drop of its lineage
        latest = max((d for h in delta.lineage(seq) if (d := _commit_day(h))), default=None)
    if latest is None:
        raise UserError(
            "user_sequences names no drop in its commit metadata: rebuild it (`userformer sequences "
            "--rebuild`) or restore it (--mode restore)"
        )
    if from_dt > latest or to_dt > latest:
        raise UserError(
            f"user_sequences includes drops up to {latest}: recompute repairs processed drops only "
            f"(--from/--to <= {latest}); run the later days with `userformer run-day`"
        )
    ptr = registry.published(cfg)
    outputs = None
    if ptr is not None and delta.exists(cfg.table_path("user_embeddings")):
        marker = publish_step.published_outputs(cfg)
        last = infer_step.last_publish(cfg)
        if not marker or marker.get("dt") != str(latest):
            raise UserError(
                f"the outputs are published up to {marker and marker.get('dt')}, user_sequences up to "
                f"{latest}: finish drop {latest} first (`userformer run-day --dt {latest}`), then repair"
            )
        stale = [t for t, p in last.items() if not p or p.get("model_version") != ptr["version"]]
        if stale:
            raise UserError(
                f"the published model is {ptr['version']} but {', '.join(stale)} were last published "
                f"with another model: finish drop {latest} first (`userformer run-day --dt {latest}`)"
            )
        outputs = {"model": ptr["version"], "as_of": str(latest), "shards": cfg.infer.shards}
    return {
        "mode": "recompute",
        "from_dt": str(from_dt),
        "to_dt": str(to_dt),
        "upto": str(latest),
        "users_given": len(users) if users is not None else None,
        "user_sequences_version": delta.version_of(seq),
        "events_version": delta.version_of(events),
        "outputs": outputs or {"skipped": "no published model or outputs yet: only user_sequences is rebuilt"},
    }


def select_users(cfg: Config, from_dt: dt.date, to_dt: dt.date) -> list[str]:
    """Every user with events in drops from_dt..to_dt (events as they are now), or whose user_sequences row was
    last updated by one of them (a row built from bad events whose user has no clean ones)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    lo, hi = pa.scalar(from_dt, pa.date32()), pa.scalar(to_dt, pa.date32())
    ev = delta.read_arrow(
        cfg.table_path("events"), columns=["user_id"], filter=(pc.field("dt") >= lo) & (pc.field("dt") <= hi)
    )
    sq = delta.read_arrow(
        cfg.table_path("user_sequences"),
        columns=["user_id"],
        filter=(pc.field("updated_dt") >= lo) & (pc.field("updated_dt") <= hi),
    )
    ids = pc.unique(
        pa.concat_arrays(
            [ev["user_id"].combine_chunks().cast(pa.string()), sq["user_id"].combine_chunks().cast(pa.string())]
        )
    )
    return sorted(ids.to_pylist())


def recompute_sequences(cfg: Config, users: list[str], upto: dt.date, repair_id: str) -> dict:
    """Rebuild the user_sequences rows of `users` from their events up to `upto`, in one commit (module doc).

    One MERGE by user_id: a chosen user with events gets their rebuilt row (updated or inserted), one without
    events loses their row; every other row is untouched (deletion vectors mark the replaced rows). The rows are
    judged by the user_sequences gate before the MERGE (GateFailed: nothing committed)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from pyspark.sql import functions as F

    events_path, seq_path = cfg.table_path("events"), cfg.table_path("user_sequences")
    spark = spark_session(cfg)
    # Unique ids: a MERGE refuses two source rows for one target row.
    chosen = pa.array(list(dict.fromkeys(users)), pa.string())
    sel = spark.createDataFrame(pa.table({"user_id": chosen}).to_pandas())
    sel = F.broadcast(sel) if len(users) <= 1_000_000 else sel
    events = delta.spark_read(spark, events_path).where(F.col("dt") <= F.lit(upto))
    per_user = sequences_step._per_user(events.join(sel, "user_id", "left_semi")).localCheckpoint()
    try:
        rebuilt = per_user.count()
        # Chosen users with a row but no events (any more): the MERGE deletes their row.
        had = delta.spark_read(spark, seq_path).select("user_id").join(sel, "user_id", "left_semi")
        removed = sorted(r["user_id"] for r in had.join(per_user.select("user_id"), "user_id", "left_anti").collect())
        if not rebuilt and not removed:
            return {
                "users": len(users),
                "rebuilt": 0,
                "removed": [],
                "committed": False,
                "version": delta.version_of(seq_path),
                "reason": "none of the users has events or a row",
            }
        names = [f"`{c}`" for c in schema.USER_SEQUENCES.names]  # the table's columns, not the helper _rebuilt
        assign = ", ".join(f"t.{c} = s.{c}" for c in names)
        columns, sources = ", ".join(names), ", ".join(f"s.{c}" for c in names)
        meta = {
            "step": "sequences-rebuild",
            "upto": str(upto),
            "events_version": delta.version_of(events_path),
            "repair_id": repair_id,
            "repair_mode": "recompute",
            "users": len(users),
        }
        sequences_step.ensure_deletion_vectors(spark, seq_path)
        read = delta.version_of(seq_path)
        finished = sequences_step._finish(per_user, cfg.sequences.max_len)
        # Write, audit, publish: the table as the MERGE will leave it (the chosen users' rows replaced by their
        # rebuilt rows) passes the user_sequences gate as of drop `upto` before anything is committed.
        with delta.spark_staged(finished, cfg.warehouse_root / "_staging" / "repair") as (staged, judged):
            check = sequences_step.gate_change(cfg, upto, judged, pc.field("user_id").isin(chosen), read)
            src = sel.join(staged.withColumn("_rebuilt", F.lit(True)), "user_id", "left")
            with delta.spark_commit(spark, seq_path, meta) as c:
                delta.spark_merge(
                    spark,
                    seq_path,
                    src,
                    "t.user_id = s.user_id",
                    f"WHEN MATCHED AND s._rebuilt IS NULL THEN DELETE WHEN MATCHED THEN UPDATE SET {assign} "
                    f"WHEN NOT MATCHED AND s._rebuilt THEN INSERT ({columns}) VALUES ({sources})",
                )
    finally:
        per_user.unpersist()
    if c["version"] is None:
        raise delta.StorageError(f"the MERGE into {seq_path} left no commit")
    m = sequences_step.merge_metrics(c["metrics"])
    res = {
        "users": len(users),
        "rebuilt": rebuilt,
        "removed": removed,
        "committed": True,
        "files_rewritten": m["files_rewritten"],
        "files_added": m["files_added"],
        "rows_written": m["rows_written"],
        "version": c["version"],
        "check": check,
    }
    log.info("repair %s: user_sequences %s", repair_id, {k: v for k, v in res.items() if k != "removed"})
    return res


def reinfer_and_publish(cfg: Config, users: list[str], day: dt.date, removed: list[str], repair_id: str) -> dict:
    """Re-infer exactly `users` with the published model (every shard), publish them as of `day`, delete the
    output rows of `removed` users. The output checks run first: when they fail nothing is published."""

    shards = cfg.infer.shards
    staged = [infer_step.infer(cfg, day, shard=i, shards=shards, users=users, log=log.info) for i in range(shards)]
    try:
        pub = publish_step.publish(cfg, day, shards=shards, log=log.info)
    except UserError as exc:
        if exc.code == 1:
            raise GateFailed(str(exc)) from None
        raise
    deleted = {}
    if removed:
        meta = {
            "step": "repair",
            "repair_id": repair_id,
            "repair_mode": "recompute",
            "removed_users": str(len(removed)),
        }
        quoted = ", ".join("'" + u.replace("'", "''") + "'" for u in removed)
        for t in USER_OUTPUTS:
            path = cfg.table_path(t)
            # On the version this repair's publish left: a writer that committed since makes it fail, not vanish.
            read_v = pub["tables"].get(t, delta.version_of(path))
            if read_v is not None:
                # Spark's DELETE: these tables carry deletion vectors (publish and candidates MERGE them).
                spark = spark_session(cfg)
                delta.expect_version(path, read_v)
                with delta.spark_commit(spark, path, meta) as c:
                    delta.spark_delete(spark, path, f"user_id IN ({quoted})")
                deleted[t] = c.get("metrics", {}).get("numDeletedRows", 0)
        # The publish record names the versions without the removed users: the release reads them.
        rec = publish_step.published_outputs(cfg)
        rec["tables"].update({t: delta.version_of(cfg.table_path(t)) for t in deleted})
        publish_step.write_marker(cfg, rec)
        pub["tables"] = rec["tables"]
    return {
        "inferred": sum(m["users"] for m in staged),
        "shards": shards,
        "published": {
            "dt": pub["dt"],
            "model_version": pub["model_version"],
            "users": pub["users"],
            "tables": pub["tables"],
        },
        "deleted_rows": deleted,
    }


def reindex(cfg: Config, day: dt.date) -> dict:
    """The index (a new version only if item_embeddings changed), the candidates of the users as of `day`, and
    the release that shows readers the repaired rows."""

    idx = pipeline.index.__wrapped__(cfg, day)
    chk = pipeline.check_index.__wrapped__(cfg, day)
    cand = pipeline.candidates.__wrapped__(cfg, day)
    rel = pipeline.release.__wrapped__(cfg, day)
    return {
        "index": {k: idx.get(k) for k in ("status", "version", "skipped")},
        "check_index": {k: chk.get(k) for k in ("version", "failed", "skipped")},
        "candidates": {k: cand.get(k) for k in ("users", "written", "table_version", "skipped")},
        "release": {k: rel.get(k) for k in ("dt", "changed", "skipped")},
    }


# -------------------------------------------------------------------- run
def write_report(cfg: Config, summary: dict) -> Path:
    p = repairs_root(cfg) / f"{summary['id']}.json"
    files.write_json(p, summary)
    return p


def plan(cfg: Config, from_dt: dt.date, to_dt: dt.date, mode: str, users: list[str] | None = None) -> dict:
    """The validated plan of a repair (what --dry-run prints); changes nothing."""
    _validate_range(from_dt, to_dt, mode)
    if mode == "restore":
        if users is not None:
            raise UserError(
                f"--users applies to --mode recompute only: restore puts every table back to before {from_dt}"
            )
        p = plan_restore(cfg, from_dt, to_dt)
        p["marker"].pop("_record", None)
        return p
    return plan_recompute(cfg, from_dt, to_dt, users)


# The stages of a repair: `repair()` and `apply()` run them in order under one lease hold. Each takes the summary
# `start` made (JSON-plain, what goes to XCom), returns its part of the result, and can be retried: it re-derives
# what is left to do from the warehouse.
def start(
    cfg: Config,
    from_dt: dt.date,
    to_dt: dt.date,
    mode: str,
    users: list[str] | None = None,
    dry_run: bool = False,
    repair_id: str | None = None,
) -> dict:
    """Validate and plan; unless `dry_run`, fix the user selection (recompute) in the repair's folder and write
    the report (status running). Returns the summary the other stages take."""
    rid = repair_id or new_id()
    users = sorted(set(users)) if users is not None else None
    summary = {
        "id": rid,
        "mode": mode,
        "from_dt": str(from_dt),
        "to_dt": str(to_dt),
        "dry_run": dry_run,
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "plan": plan(cfg, from_dt, to_dt, mode, users),
    }
    if mode == "recompute":
        if users is None:
            users = select_users(cfg, from_dt, to_dt)
        summary["plan"]["users_selected"] = len(users)
        summary["plan"]["users_sample"] = users[:10]
        if not users:
            raise UserError(f"no user has events or a sequence updated in {from_dt}..{to_dt}: nothing to recompute")
    summary["status"] = "planned" if dry_run else "running"
    if not dry_run:
        if users is not None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            f = repairs_root(cfg) / rid / "users.parquet"
            f.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"user_id": pa.array(users, pa.string())}), f)
            summary["users_file"] = str(f)
        write_report(cfg, summary)
    return summary


def _users_of(summary: dict) -> list[str]:
    return parse_users(users_file=summary["users_file"])


@lease.writer("repair")
def stage_state(cfg: Config, summary: dict) -> dict:
    """restore: tables, model, index, marker, ledgers back to before from_dt; recompute: the users' sequences."""
    from_dt = dt.date.fromisoformat(summary["from_dt"])
    if summary["mode"] == "restore":
        return {"restored": apply_restore(cfg, from_dt, summary["id"])}
    seq = recompute_sequences(cfg, _users_of(summary), dt.date.fromisoformat(summary["plan"]["upto"]), summary["id"])
    return {"sequences": {**{k: v for k, v in seq.items() if k != "removed"}, "removed_users": seq["removed"]}}


@lease.writer("repair")
def stage_outputs(cfg: Config, summary: dict, state: dict | None = None) -> dict:
    """restore: the drops re-run in order (run_day: sequences, model, inference, publish, index, candidates);
    recompute: the users re-inferred and published (their removed users' rows deleted)."""
    if summary["mode"] == "restore":
        out = []
        try:
            for d in summary["plan"]["rerun"]:
                out += rerun_days(cfg, [dt.date.fromisoformat(d)])
        except Exception:
            summary.setdefault("rerun", out)
            raise
        return {"rerun": out}
    if summary["plan"]["outputs"].get("skipped") is not None:
        return {"outputs": {"skipped": summary["plan"]["outputs"]["skipped"]}}
    removed = ((state or {}).get("sequences") or {}).get("removed_users") or []
    upto = dt.date.fromisoformat(summary["plan"]["upto"])
    return {"outputs": reinfer_and_publish(cfg, _users_of(summary), upto, removed, summary["id"])}


@lease.writer("repair")
def stage_index(cfg: Config, summary: dict) -> dict:
    """recompute: the index (unchanged when item_embeddings is) and the candidates of the repaired users;
    restore: nothing left (each re-run day built its index and candidates)."""
    if summary["mode"] == "restore" or summary["plan"]["outputs"].get("skipped") is not None:
        return {}
    return {"index": reindex(cfg, dt.date.fromisoformat(summary["plan"]["upto"]))}


def finish(cfg: Config, summary: dict, *parts: dict, error: BaseException | None = None) -> dict:
    """The final summary, kept in reports_root/repairs/<id>.json."""
    out = dict(summary)
    for p in parts:
        out.update(p or {})
    if error is not None:
        out.update(
            status="failed",
            error=f"{type(error).__name__}: {error}",
            hint="fix the cause and run the same repair again (it is idempotent)",
        )
    else:
        out["status"] = "done"
    out["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    out["report"] = str(repairs_root(cfg) / f"{out['id']}.json")
    write_report(cfg, out)
    log.info("repair %s: %s", out["id"], out["status"])
    return out


def repair(
    cfg: Config,
    from_dt: dt.date,
    to_dt: dt.date,
    mode: str,
    users: list[str] | None = None,
    dry_run: bool = False,
    repair_id: str | None = None,
) -> dict:
    """Repair drops from_dt..to_dt (module doc). Returns the JSON summary (also kept in reports_root/repairs/)."""
    if dry_run:
        return start(cfg, from_dt, to_dt, mode, users, dry_run, repair_id)
    with lease.hold(cfg, "repair"):  # the plan and every stage: no other writer moves the tables in between
        prior = unfinished(cfg)
        if prior is not None and (prior["mode"], prior["from_dt"], prior["to_dt"]) == (mode, str(from_dt), str(to_dt)):
            log.warning("continuing repair %s, interrupted after it began changing the warehouse", prior["id"])
            return _repair(cfg, {**prior, "resumed_at": registry.now_iso()})
        return _repair(cfg, start(cfg, from_dt, to_dt, mode, users, dry_run, repair_id))


# What a report holds once the repair's state stage ran (restore: the tables restored; recompute: the sequences).
STATE_KEYS = ("restored", "sequences")
# The keys of `start`'s summary (what the stages take), as kept in the report.
SUMMARY_KEYS = ("id", "mode", "from_dt", "to_dt", "dry_run", "started_at", "plan", "users_file", "status")


def unfinished(cfg: Config) -> dict | None:
    """The summary of the newest repair when it began changing the warehouse and did not finish (a crash, a kill,
    a failed re-run day): running the same repair again continues it, since its plan cannot be made again once
    the tables went back (the drops it re-runs look unprocessed). None otherwise."""
    root = repairs_root(cfg)
    reports = sorted(root.glob("r*.json")) if root.is_dir() else []
    if not reports:
        return None
    try:
        rep = json.loads(reports[-1].read_text())  # ids begin with their start time: the newest last
    except ValueError:
        return None
    if rep.get("status") == "done" or rep.get("dry_run") or not any(k in rep for k in STATE_KEYS):
        return None
    return {k: rep[k] for k in SUMMARY_KEYS if k in rep}


def apply(cfg: Config, summary: dict) -> dict:
    """Every stage of a planned repair (`start`'s summary) under one hold of the warehouse lease: what the `repair`
    DAG's writing task runs, so that no other DAG's writer commits between the restore and the re-run days. A retry
    continues a repair whose state stage already ran; a first try refuses when the warehouse moved on since the plan
    (another drop processed: the plan's re-run days would leave it out)."""
    with lease.hold(cfg, "repair"):
        _still_as_planned(cfg, summary)
        return _repair(cfg, summary)


def _still_as_planned(cfg: Config, summary: dict) -> None:
    report = repairs_root(cfg) / f"{summary['id']}.json"
    if report.is_file() and any(k in json.loads(report.read_text()) for k in STATE_KEYS):
        return  # the state stage of this repair ran (an earlier try): the warehouse moved because of it
    key, now = (
        ("latest_processed", latest_processed(cfg))
        if summary["mode"] == "restore"
        else ("upto", last_drop(cfg.table_path("user_sequences"))[0])
    )
    then = summary["plan"].get(key)
    if now is not None and then is not None and str(now) != then:
        raise UserError(
            f"repair {summary['id']}: the warehouse processed drop {now} since this repair was planned (then: "
            f"{then}); nothing was changed. Plan it again (for restore: --to {now} or later)"
        )


def _repair(cfg: Config, summary: dict) -> dict:
    t0 = time.perf_counter()
    parts: list[dict] = []
    try:
        parts.append(stage_state(cfg, summary))
        write_report(cfg, {**summary, **parts[0]})
        hooks.pause("repair.after_state")  # tests: a kill here, with the tables back before FROM
        parts.append(stage_outputs(cfg, summary, parts[0]))
        parts.append(stage_index(cfg, summary))
    except Exception as exc:
        finish(cfg, {**summary, "seconds": round(time.perf_counter() - t0, 1)}, *parts, error=exc)
        raise
    return finish(cfg, {**summary, "seconds": round(time.perf_counter() - t0, 1)}, *parts)


# -------------------------------------------------------------------- CLI
def register(sub) -> None:
    p = sub.add_parser(
        "repair",
        help="after data corruption: restore the tables to before a drop and re-run the "
        "drops, or recompute the affected users from clean events",
        description="Repair drops FROM..TO (jobs/flows/repair.py). restore: every table, the published "
        "model, the index and the publish marker back to their state before FROM, "
        "then the drops re-run in order; recompute: user_sequences of the affected "
        "users rebuilt from the events, re-inferred, republished, index rebuilt.",
    )
    p.add_argument("--from", dest="from_dt", type=date_arg, required=True, help="first bad drop YYYY-MM-DD")
    p.add_argument(
        "--to",
        dest="to_dt",
        type=date_arg,
        required=True,
        help="last drop to repair (restore: at least the latest drop processed)",
    )
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument(
        "--users", help="recompute only: comma-separated user ids (default: every user with events in FROM..TO)"
    )
    p.add_argument("--users-file", help="recompute only: a file of user ids, one a line (or Parquet with user_id)")
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan (versions each table goes back to); change nothing"
    )
    p.set_defaults(func=run)


def run(args, cfg: Config) -> int:
    users = parse_users(args.users, args.users_file)
    res = repair(cfg, args.from_dt, args.to_dt, args.mode, users=users, dry_run=args.dry_run)
    print(json.dumps(res, indent=2, default=str))
    return 0
