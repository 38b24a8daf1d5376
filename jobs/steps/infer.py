"""`userformer infer --dt D [--shard i --shards n] [--all-users]`: batch inference of the PUBLISHED model.

**Which users.** Those whose ``user_sequences`` row changed on drop D
(``updated_dt == D``, read at the version that applied D: Delta time travel),
and EVERY user when the published model version differs from the model
version of the last publish of an earlier drop (read from the publish commits
of the three output tables: if any of them was last published with another
version, or never, everyone is re-embedded: user vectors of another version
are not comparable with this version's item vectors, jobs/core/registry.py), or
with ``--all-users``. A user is embedded at their newest event (the same
vector whichever day computes it), from their newest ``model.max_len`` events.

**Shards.** ``--shard i --shards n`` embeds the users with
``blake2b(user_id) % n == i`` (stable on every machine; not Python's salted
``hash``). Every catalogue item (``items`` rows first seen by D, the model
grown to D's vocabulary) is embedded by shard 0 only, so shards can run on
separate workers and the item tower runs once.

**Bounded memory.** ``user_sequences`` is streamed ``infer.chunk_users`` rows
at a time (only the model's columns; the ``updated_dt`` filter is pushed into
the Parquet scan), embedded ``infer.batch_size`` users per forward pass, and
written one row group per chunk. CUDA with bf16 autocast when present
(``infer.device``/``infer.bf16``), CPU otherwise; vectors and probabilities are
finished in float32 (re-normalised), so both pass the same output checks.

**Where.** ``infer.engine = local`` embeds in this process, as above. ``spark`` embeds on the executors of
``spark.master`` (``_embed_on_spark``): mapInArrow over the same rows, the model loaded once per Python worker, on
the GPU Spark gave the task when the cluster schedules GPUs, one Parquet file per table and partition, named by
partition and attempt; the manifest lists the files of the successful attempts (``parts``). Same rows either way.

**Staged output.** One folder per (D, model version, shard)::

    warehouse/_staging/infer/dt=D/model=V/shard=i-of-n/
        _SUCCESS.json                    rows, model version, input Delta versions, full/incremental, seconds,
                                         and the run folder below that holds the files
        run=<run id>/user_embeddings.parquet   schemas.tables.USER_EMBEDDINGS rows of the shard's users
                                               (Spark: run=<run id>/user_embeddings/part-<partition>-<attempt>.parquet)
        run=<run id>/user_preference_scores.parquet   one row per user and head, top-K labels
        run=<run id>/item_embeddings.parquet   schemas.tables.ITEM_EMBEDDINGS (shard 0 only)

Each run writes its files into a run folder of its own and ``_SUCCESS.json``
last (one atomic write, also in an object store, where nothing can be
renamed): a reader follows the manifest to a complete run, and a run killed
before it leaves only an orphan folder. A rerun of the shard replaces the
manifest, then deletes the runs it no longer names. An empty day writes empty
files and succeeds.
`userformer publish --dt D` (jobs/steps/publish.py) checks and publishes them.
`userformer maintain` deletes staged days older than 24 h.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import sys
import time
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from userformer.jobs.core import drops, hooks, registry
from userformer.jobs.core.config import Config
from userformer.jobs.core.dates import date_arg
from userformer.jobs.core.errors import UserError
from userformer.jobs.core.storage import delta, files
from userformer.jobs.core.storage.files import Location
from userformer.schemas import tables

# The model's modules (models/, jobs/core/stream.py) load torch: the functions that run the model import them, so
# that the output checks and the report, which import this module for its staging and publish helpers, do not pay
# torch's import (seconds) in their task processes.

# The published tables, in the order `publish` commits them (jobs/steps/publish.py).
OUTPUTS = ("user_embeddings", "user_preference_scores", "item_embeddings")
MANIFEST = "_SUCCESS.json"
SELECTION = "selection.parquet"  # the users an explicit selection (repair) asked for, in every shard's folder
ITEM_CHUNK = 65536


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ shards
def shard_of(user_ids, shards: int) -> np.ndarray:
    """The shard of every user id: blake2b-64 of its UTF-8 bytes, modulo `shards` (the same on every machine)."""
    out = np.empty(len(user_ids), np.int64)
    for i, u in enumerate(user_ids):
        out[i] = int.from_bytes(hashlib.blake2b(str(u).encode(), digest_size=8).digest(), "big") % shards
    return out


def staging_root(cfg: Config) -> Location:
    return cfg.warehouse_root / "_staging" / "infer"


def day_dir(cfg: Config, day: dt.date, version: str) -> Location:
    return staging_root(cfg) / f"dt={day}" / f"model={version}"


def shard_name(shard: int, shards: int) -> str:
    return f"shard={shard}-of-{shards}"


def shard_dir(cfg: Config, day: dt.date, version: str, shard: int, shards: int) -> Location:
    return day_dir(cfg, day, version) / shard_name(shard, shards)


def read_manifest(folder: Location) -> dict | None:
    """The shard's manifest, with "path": the folder of its files; None when the shard is missing or was never
    completed."""
    p = folder / MANIFEST
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text())
    except ValueError:
        return None
    # Shards staged before run folders existed hold their files beside the manifest.
    return {**m, "path": str(folder / m["files"] if m.get("files") else folder)}


def staged_parts(manifest: dict, table: str) -> list[Location]:
    """The files of a staged shard's `table` as its manifest names them: one file in-process, one per Spark
    partition from the executors (only the attempts Spark reported as successful)."""
    folder = files.location(manifest["path"])
    names = (manifest.get("parts") or {}).get(table, [f"{table}.parquet"])
    return [folder / n for n in names]


def _drop_other_runs(folder: Location, keep: str) -> None:
    """Delete the run folders of `folder` other than `keep` (replaced runs, and runs killed before their
    manifest), and the files of a shard staged before run folders existed."""
    for p in folder.iterdir():
        if p.name != keep and p.name != MANIFEST:
            if p.name.startswith("run=") or p.name.startswith("."):
                files.remove_tree(p)
            elif p.name.endswith(".parquet"):
                p.unlink()


# ------------------------------------------------------------ publish state
def publish_commits(cfg: Config, table: str) -> list[dict]:
    """The `publish` commits of an output table, oldest first (from its Delta history)."""
    path = cfg.table_path(table)
    if not delta.exists(path):
        return []
    # The lineage: publishes a repair undid (a RESTORE to before them) no longer count.
    return [h for h in delta.lineage(path) if h.get("step") == "publish"]


def last_publish(cfg: Config, before: dt.date | None = None) -> dict[str, dict | None]:
    """Per output table: {"dt", "model_version", "version"} of its last publish (of a drop before `before`), or
    None when it has none. A table whose log no longer holds a publish commit (log cleanup after
    storage.retention_days) is judged by its rows: the model_version they all carry."""
    out: dict[str, dict | None] = {}
    for table in OUTPUTS:
        commits = publish_commits(cfg, table)
        if before is not None:
            commits = [h for h in commits if h.get("dt") and dt.date.fromisoformat(h["dt"]) < before]
        if commits:
            h = commits[-1]
            out[table] = {"dt": h.get("dt"), "model_version": h.get("model_version"), "version": h["version"]}
            continue
        out[table] = None
        path = cfg.table_path(table)
        if not publish_commits(cfg, table) and delta.exists(path):
            import pyarrow.compute as pc

            versions = pc.unique(delta.read_arrow(path, columns=["model_version"])["model_version"]).to_pylist()
            if versions:
                out[table] = {
                    "dt": None,
                    "model_version": versions[0] if len(versions) == 1 else "<mixed>",
                    "version": delta.version_of(path),
                }
    return out


def full_reason(cfg: Config, day: dt.date, version: str) -> str | None:
    """Why every user must be (re-)embedded for drop `day` with model `version`; None when only the day's users."""
    prev = last_publish(cfg, before=day)
    never = [t for t, p in prev.items() if p is None]
    if len(never) == len(prev):
        return f"no publish before {day}: every user is embedded"
    if never:
        return f"{', '.join(never)} never published before {day} (an interrupted first publish): every user is embedded"
    other = {t: p for t, p in prev.items() if p["model_version"] != version}
    if other:
        t, p = next(iter(other.items()))
        return (
            f"published model {version} differs from {p['model_version']} of the last publish "
            f"({t}, dt={p['dt']}): every user is re-embedded"
        )
    return None


# --------------------------------------------------------------- the model
def _autocast(device, bf16: bool):
    from userformer.models.train import autocast

    return autocast(device, SimpleNamespace(bf16=bf16, cpu_bf16=False))


def embedded_at(updated_dt) -> np.ndarray:
    """When each user is embedded, in seconds since the epoch: the end of the drop date that last changed the
    user's sequence (`user_sequences.updated_dt`), from when the vector is served. Training reads each position
    at the time of the action it predicts, and the gate and evaluation embed at their split time, so all of
    them condition on "time from the newest event to when the vector is used". A full re-embed on a later day
    gives a user the vector the day that changed the user gave (the time does not depend on the day computing
    it)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    days = pc.cast(updated_dt, pa.int32()).to_numpy(zero_copy_only=False).astype(np.float64)  # days since epoch
    return (days + 1.0) * 86400.0


def embed_sequences(
    model, seqs, device, *, batch_size: int, top_k: int, bf16: bool = True, as_of: np.ndarray | None = None
):
    """(embeddings (U, d) float32, {task: (label ids (U, k) int64, probabilities (U, k) float32)}) of `seqs`,
    in its user order. One encoder pass per batch feeds both the user vector (as model.user_embedding, at the
    time `as_of` (U,) seconds or the newest event when later; the cold embedding for a user without events) and
    the heads (softmax over each task's labels, top k = min(top_k, labels - 1): label 0 "unknown" is never
    predicted)."""
    import torch
    import torch.nn.functional as F

    from userformer.models.data import pad_batch
    from userformer.models.train import to_device

    model.eval()
    n = len(seqs)
    d = model.cfg.d_model
    emb = np.zeros((n, d), np.float32)
    ks = {t: min(top_k, r.labels.num_embeddings - 1) for t, r in model.heads.readouts.items()}
    prefs = {t: (np.zeros((n, k), np.int64), np.zeros((n, k), np.float32)) for t, k in ks.items()}
    order = np.argsort(seqs.lengths, kind="stable")  # similar lengths per batch: trimmed batches stay narrow
    with torch.no_grad():
        for i in range(0, n, batch_size):
            rows = order[i : i + batch_size]
            b = to_device(pad_batch(seqs, rows, model.cfg.max_len, None if as_of is None else as_of[rows]), device)
            with _autocast(device, bf16):
                h = model.encoder.hidden(b)
                u = model.encoder.embed(h[:, -1], b["ref_ts"] - b["ts"][:, -1])
                u = torch.where(b["mask"].any(1, keepdim=True), u, model.cold_embedding().to(u.dtype))
                scores = model.heads(h, b["mask"])
            emb[rows] = F.normalize(u.float(), dim=-1).cpu().numpy()
            for task, s in scores.items():
                p = torch.softmax(s.float(), -1)
                top = p.topk(ks[task], dim=-1)
                prefs[task][0][rows] = top.indices.cpu().numpy()
                prefs[task][1][rows] = top.values.cpu().numpy()
    return emb, prefs


def item_vectors(model, item_idx: np.ndarray, device, bf16: bool = True) -> np.ndarray:
    """(N, d) float32 unit vectors of the item tower for these item ids, in chunks."""
    import torch
    import torch.nn.functional as F

    out = np.zeros((len(item_idx), model.cfg.d_model), np.float32)
    with torch.no_grad():
        for i in range(0, len(item_idx), ITEM_CHUNK):
            ids = torch.from_numpy(np.array(item_idx[i : i + ITEM_CHUNK], np.int64)).to(device)
            with _autocast(device, bf16):
                v = model.item_tower(ids)
            out[i : i + ITEM_CHUNK] = F.normalize(v.float(), dim=-1).cpu().numpy()
    return out


def label_keys(cfg: Config, vocab_version: int, tasks) -> dict[str, np.ndarray]:
    """Per head task, vocabulary id -> key (object array; None where the vocabulary has no such id)."""
    import pyarrow.compute as pc

    from userformer.models.item_tower import FIELD

    kinds = {t: FIELD[t] for t in tasks}
    vocab = delta.read_arrow(
        cfg.table_path("vocab"),
        vocab_version,
        columns=["kind", "key", "idx"],
        filter=pc.field("kind").isin(sorted(set(kinds.values()))),
    )
    out = {}
    for task, kind in kinds.items():
        v = vocab.filter(pc.equal(vocab["kind"], kind))
        idx = v["idx"].to_numpy()
        arr = np.full(int(idx.max(initial=0)) + 1, None, object)
        arr[idx] = np.asarray(v["key"].to_pylist(), object)
        out[task] = arr
    return out


# ------------------------------------------------------------------ arrow
def _lists(values: np.ndarray, typ):
    import pyarrow as pa

    n, k = values.shape
    return pa.ListArray.from_arrays(
        pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)), pa.array(values.reshape(-1), typ)
    )


def user_tables(user_ids, emb, prefs, keys, version: str, day: dt.date, updated_at: dt.datetime):
    """The staged rows of one chunk: (user_embeddings, user_preference_scores) as Arrow tables."""
    import pyarrow as pa

    n = len(user_ids)
    ue = pa.table(
        {
            "user_id": pa.array(list(user_ids), pa.string()),
            "embedding": _lists(emb, pa.float32()),
            "model_version": pa.array([version] * n, pa.string()),
            "as_of": pa.array([day] * n, pa.date32()),
            "updated_at": pa.array([updated_at] * n, tables.TS),
        },
        schema=tables.USER_EMBEDDINGS,
    )
    parts = []
    for task, (idx, p) in prefs.items():
        names = keys[task]
        lab = np.where(idx < len(names), names[np.minimum(idx, len(names) - 1)], None)
        k = idx.shape[1]
        parts.append(
            pa.table(
                {
                    "user_id": pa.array(list(user_ids), pa.string()),
                    "task": pa.array([task] * n, pa.string()),
                    "label_idx": _lists(idx, pa.int64()),
                    "labels": pa.ListArray.from_arrays(
                        pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)),
                        pa.array(lab.reshape(-1).tolist(), pa.string()),
                    ),
                    "scores": _lists(p, pa.float32()),
                    "model_version": pa.array([version] * n, pa.string()),
                    "as_of": pa.array([day] * n, pa.date32()),
                },
                schema=tables.USER_PREFERENCE_SCORES,
            )
        )
    ps = pa.concat_tables(parts) if parts else tables.USER_PREFERENCE_SCORES.empty_table()
    return ue, ps


# ----------------------------------------------------------------- batches
@dataclass(frozen=True)
class Job:
    """What every batch of one infer run needs besides the model (picklable: Spark ships it to executors)."""

    version: str
    day: dt.date
    updated_at: dt.datetime
    shard: int
    shards: int
    batch_size: int
    top_k: int
    bf16: bool
    device: str  # infer.device: auto, cpu or cuda
    catalog_versions: dict  # {"items": v, "vocab": v}: the catalogue the model is grown to
    pause: dict = field(default_factory=dict)  # test pause points, forwarded to executors


def _embed_table(model, t, keys, device, job: Job):
    """The staged rows (user_embeddings, user_preference_scores) of one batch of user_sequences rows, or None when
    none of them is in the job's shard."""
    import pyarrow as pa

    from userformer.models.data import from_sequences_table

    if job.shards > 1:
        t = t.filter(pa.array(shard_of(t["user_id"].to_pylist(), job.shards) == job.shard))
    if not t.num_rows:
        return None
    seqs = from_sequences_table(t)
    emb, prefs = embed_sequences(
        model,
        seqs,
        device,
        batch_size=job.batch_size,
        top_k=job.top_k,
        bf16=job.bf16,
        as_of=embedded_at(t["updated_dt"]),
    )
    return user_tables(seqs.user_ids, emb, prefs, keys, job.version, job.day, job.updated_at)


# ------------------------------------------------------- on Spark executors
# A Python worker serves many tasks one after the other (spark.python.worker.reuse): the model is loaded into it
# once per (model, catalogue, device), not once per task.
_WORKER_MODEL: dict = {}


def _task_device(choice: str):
    """The GPU Spark assigned to this task (spark.task.resource.gpu.amount), else infer.device as in-process."""
    import torch
    from pyspark import TaskContext

    from userformer.models import train

    gpus = (TaskContext.get().resources() or {}).get("gpu")
    if gpus is not None and gpus.addresses and choice != "cpu":
        return torch.device(f"cuda:{gpus.addresses[0]}")
    device = train.pick_device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("infer.device = cuda but this executor has no CUDA device (use auto or cpu)")
    return device


def _worker_model(cfg: Config, job: Job):
    """(model, label keys, device) for this Python worker: the published model grown to the job's catalogue,
    exactly what the driver grows (models/grow.py is deterministic)."""
    from userformer.jobs.core import stream

    device = _task_device(job.device)
    key = (str(cfg.models_root), job.version, str(job.day), tuple(sorted(job.catalog_versions.items())), str(device))
    if key not in _WORKER_MODEL:
        _WORKER_MODEL.clear()  # one model per worker: a new day's model replaces the last one
        model, _ = registry.load(cfg, job.version)
        cat = stream.warehouse_catalog(cfg, job.day, versions=job.catalog_versions)
        registry.fit_to_catalog(model, cat.catalog, f"model {job.version}")
        model.to(device).eval()
        keys = label_keys(cfg, job.catalog_versions["vocab"], list(model.heads.readouts))
        _WORKER_MODEL[key] = (model, keys, device)
    return _WORKER_MODEL[key]


# What each partition reports back to the driver: column -> Spark type ("long" or "string").
PART_REPORT = {
    "part": "long",
    "attempt": "long",
    "file": "string",
    "users": "long",
    "preferences": "long",
    "device": "string",
}


def _partition_embedder(cfg: Config, job: Job, run_dir: str):
    """The mapInArrow function: embeds a partition's rows batch by batch and writes them as one Parquet file per
    table, named by partition AND attempt (a retried or speculative attempt never writes into another's file);
    yields one row saying which file holds the partition's rows. The driver keeps only what successful
    attempts reported."""

    def run(batches):
        import pyarrow as pa
        import pyarrow.parquet as pq
        import torch
        from pyspark import TaskContext

        ctx = TaskContext.get()
        part, attempt = ctx.partitionId(), ctx.attemptNumber()
        torch.set_num_threads(max(1, int(ctx.cpus())))
        model, keys, device = _worker_model(cfg, job)
        name = f"part-{part:05d}-{attempt}.parquet"
        writers, n_u, n_p = {}, 0, 0
        try:
            for b in batches:
                hooks.pause("infer.on_executor", job.pause)  # tests: kill this executor mid-partition
                out = _embed_table(model, pa.Table.from_batches([b]), keys, device, job)
                if out is None:
                    continue
                for table, rows in zip(("user_embeddings", "user_preference_scores"), out):
                    if table not in writers:
                        fs, where = files.arrow(files.location(run_dir) / table / name)
                        writers[table] = pq.ParquetWriter(where, rows.schema, filesystem=fs)
                    writers[table].write_table(rows)
                n_u += out[0].num_rows
                n_p += out[1].num_rows
        finally:
            for w in writers.values():
                w.close()
        report = {
            "part": part,
            "attempt": attempt,
            "file": name if writers else None,
            "users": n_u,
            "preferences": n_p,
            "device": str(device),
        }
        types = {"long": pa.int64(), "string": pa.string()}
        yield pa.RecordBatch.from_pydict(
            {k: [v] for k, v in report.items()}, schema=pa.schema([(k, types[t]) for k, t in PART_REPORT.items()])
        )

    return run


def _embed_on_spark(cfg: Config, job: Job, run_dir: Location, seq_v: int, full: bool, selection) -> tuple:
    """Embed the run's users on the executors of cfg.spark.master. Returns ({table: [file names relative to the
    run folder]}, users, preference rows, {"partitions", "retried" (partitions whose first attempt failed),
    "devices"})."""
    from pyspark.sql import functions as F

    from userformer.jobs.core import stream
    from userformer.jobs.core.spark import spark_session

    spark = spark_session(cfg)
    df = spark.read.format("delta").option("versionAsOf", seq_v).load(delta.spark_uri(cfg.table_path("user_sequences")))
    if selection is not None:
        df = df.join(spark.createDataFrame([(u,) for u in selection], "user_id string"), "user_id", "left_semi")
    elif not full:
        df = df.where(F.col("updated_dt") == F.lit(job.day))  # pruned to the day's files by their statistics
    df = df.select(*stream.COLUMNS)
    # A day's rows sit in the few files its MERGE wrote: spread them over spark.shuffle_partitions tasks.
    df = df.repartition(cfg.spark.shuffle_partitions, "user_id")
    for table in ("user_embeddings", "user_preference_scores"):
        (run_dir / table).mkdir(parents=True, exist_ok=True)
    # Arrow batches of infer.chunk_users rows reach the Python workers (bounded memory per task).
    key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    before = spark.conf.get(key, None)
    spark.conf.set(key, str(cfg.infer.chunk_users))
    try:
        schema = ", ".join(f"{k} {t}" for k, t in PART_REPORT.items())
        done = df.mapInArrow(_partition_embedder(cfg, job, str(run_dir)), schema).collect()
    finally:
        spark.conf.unset(key) if before is None else spark.conf.set(key, before)
    names = sorted(r["file"] for r in done if r["file"])
    parts = {t: [f"{t}/{n}" for n in names] for t in ("user_embeddings", "user_preference_scores")}
    for table in parts:  # files of failed attempts: nothing names them; delete them now
        for p in (run_dir / table).iterdir():
            if p.name not in names:
                p.unlink()
    spark_run = {
        "partitions": len(done),
        "retried": sorted(r["part"] for r in done if r["attempt"] > 0),  # partitions a failed attempt preceded
        "devices": sorted({r["device"] for r in done}),
    }
    return parts, sum(r["users"] for r in done), sum(r["preferences"] for r in done), spark_run


# ------------------------------------------------------------------- step
def infer(
    cfg: Config,
    day: dt.date,
    shard: int = 0,
    shards: int = 1,
    all_users: bool = False,
    log=_stderr,
    users: list[str] | None = None,
) -> dict:
    """Embed the users of drop `day` (module doc) for one shard and stage the result. Returns the manifest.

    `users`: embed exactly these users (those of them with a user_sequences row, in this shard) instead of D's
    changed users: `repair --mode recompute` after it rebuilt their sequences. The selection is staged with the
    shard (``selection.parquet``) so that the output checks count against it; `publish` accepts such shards only
    while every output table's last publish is of the same model (else everyone must be re-embedded)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import torch

    from userformer.jobs.core import stream
    from userformer.models import train

    if shards < 1 or not 0 <= shard < shards:
        raise UserError(f"--shard must be in 0..{shards - 1} (--shards {shards}), got {shard}")
    t0 = time.perf_counter()
    ic = cfg.infer
    ptr = registry.published(cfg)
    if ptr is None:
        raise UserError(f"no published model under {cfg.models_root}: run `userformer train` first")
    version = ptr["version"]
    state = drops.drop_state(cfg, day)
    if state == "missing":
        raise UserError(f"drop {day} was not ingested: run `userformer run-day --dt {day}` first")
    if state == "ingested":
        raise UserError(f"user_sequences does not include drop {day} yet: run `userformer sequences --dt {day}` first")
    seq_v, _ = drops.sequences_version(cfg, day)
    model_path = registry.version_dir(cfg, version) / "model.pt"
    model, ck = registry.load(cfg, version)  # missing / corrupt / inconsistent checkpoint: UserError naming the file
    cat = stream.warehouse_catalog(cfg, day)
    grown = registry.fit_to_catalog(model, cat.catalog, str(model_path))  # a catalogue older than the model: UserError
    if users is not None and all_users:
        raise UserError("infer: pass either a list of users or all_users, not both")
    selection = sorted(set(users)) if users is not None else None
    if selection is not None:
        reason, full = f"the {len(selection)} users a repair selected", False
    else:
        reason = "--all-users: every user is re-embedded" if all_users else full_reason(cfg, day, version)
        full = reason is not None
        if not full:
            reason = f"users whose sequences changed on {day} (updated_dt = {day})"
    # With the Spark engine the GPUs may be the executors' only: the driver embeds the catalogue on its own CUDA
    # device when it has one, else on its CPU.
    device = train.pick_device("auto" if ic.engine == "spark" and ic.device == "cuda" else ic.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("infer.device = cuda but no CUDA device is available (use auto or cpu)")
    torch.set_num_threads(cfg.train.num_threads)
    model.to(device).eval()
    tasks = list(model.heads.readouts)
    updated_at = dt.datetime.now(dt.UTC).replace(microsecond=0)
    seq_path = cfg.table_path("user_sequences")
    inputs = {
        "user_sequences": {"path": str(seq_path), "version": seq_v},
        **{t: {"path": str(cfg.table_path(t)), "version": v} for t, v in cat.versions.items()},
    }

    final = shard_dir(cfg, day, version, shard, shards)
    final.mkdir(parents=True, exist_ok=True)
    run_id = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    tmp = final / f"run={run_id}"
    tmp.mkdir(parents=True, exist_ok=True)
    rows = {"user_embeddings": 0, "user_preference_scores": 0, "item_embeddings": None}

    def writer(name: str, schema):
        fs, where = files.arrow(tmp / name)
        return pq.ParquetWriter(where, schema, filesystem=fs)

    job = Job(
        version=version,
        day=day,
        updated_at=updated_at,
        shard=shard,
        shards=shards,
        batch_size=ic.batch_size,
        top_k=ic.top_k_labels,
        bf16=ic.bf16,
        device=ic.device,
        catalog_versions=dict(cat.versions),
        pause=hooks.forwarded(),
    )
    try:
        if selection is not None:
            with writer(SELECTION, pa.schema([("user_id", pa.string())])) as w:
                w.write_table(pa.table({"user_id": pa.array(selection, pa.string())}))
        if ic.engine == "spark":
            parts, rows["user_embeddings"], rows["user_preference_scores"], spark_run = _embed_on_spark(
                cfg, job, tmp, seq_v, full, selection
            )
            devices = spark_run["devices"]
        else:
            spark_run, devices = None, [str(device)]
            keys = label_keys(cfg, cat.versions["vocab"], tasks)  # the executors read their own
            parts = {t: [f"{t}.parquet"] for t in ("user_embeddings", "user_preference_scores")}
            if selection is not None:
                filt = pc.field("user_id").isin(pa.array(selection, pa.string()))
            else:
                filt = None if full else pc.field("updated_dt") == pa.scalar(day, pa.date32())
            with (
                writer("user_embeddings.parquet", tables.USER_EMBEDDINGS) as ue_w,
                writer("user_preference_scores.parquet", tables.USER_PREFERENCE_SCORES) as ps_w,
            ):
                # delta.scan, not delta-rs's dataset: user_sequences is MERGEd by Spark with deletion vectors.
                for t in delta.scan(seq_path, seq_v, columns=stream.COLUMNS, filter=filt, batch_size=ic.chunk_users):
                    out = _embed_table(model, t, keys, device, job)
                    if out is not None:
                        ue_w.write_table(out[0])
                        ps_w.write_table(out[1])
                        rows["user_embeddings"] += out[0].num_rows
                        rows["user_preference_scores"] += out[1].num_rows
        if shard == 0:
            items = delta.read_arrow(
                cfg.table_path("items"),
                cat.versions["items"],
                columns=["item_id", "item_idx", "has_metadata", "first_dt"],
                filter=pc.field("first_dt") <= pa.scalar(day, pa.date32()),
            )
            items = items.sort_by("item_idx")
            idx = items["item_idx"].to_numpy()
            vec = item_vectors(model, idx, device, ic.bf16)
            n = items.num_rows
            it = pa.table(
                {
                    "item_id": items["item_id"],
                    "item_idx": items["item_idx"],
                    "embedding": _lists(vec, pa.float32()),
                    "has_metadata": items["has_metadata"],
                    "model_version": pa.array([version] * n, pa.string()),
                    "as_of": pa.array([day] * n, pa.date32()),
                },
                schema=tables.ITEM_EMBEDDINGS,
            )
            with writer("item_embeddings.parquet", tables.ITEM_EMBEDDINGS) as w:
                w.write_table(it)
            rows["item_embeddings"] = n
            parts["item_embeddings"] = ["item_embeddings.parquet"]
        manifest = {
            "dt": str(day),
            "model_version": version,
            "shard": shard,
            "shards": shards,
            "run_id": run_id,
            "files": tmp.name,
            "parts": parts,
            "engine": ic.engine,
            "spark": spark_run,
            "full": full,
            "reason": reason,
            "users": rows["user_embeddings"],
            "rows": rows,
            "selection": None
            if selection is None
            else {
                "users": len(selection),
                "file": SELECTION,
                "sha256": hashlib.sha256("\n".join(selection).encode()).hexdigest(),
            },
            "tasks": tasks,
            "top_k_labels": ic.top_k_labels,
            "d_model": model.cfg.d_model,
            "labels_per_task": {
                t: min(ic.top_k_labels, r.labels.num_embeddings - 1) for t, r in model.heads.readouts.items()
            },
            "inputs": inputs,
            "grown_since_model": grown,
            "device": str(device),  # the catalogue's; the users' on `devices`
            "devices": devices,
            "bf16": bool(ic.bf16 and any(d.startswith("cuda") for d in [*devices, str(device)])),
            "updated_at": updated_at.isoformat(),
            "created_at": registry.now_iso(),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        hooks.pause("infer.before_manifest")  # tests: a kill with the shard's files staged, no manifest
        files.write_json(final / MANIFEST, manifest)  # last: the shard now names this run
    except BaseException:
        files.remove_tree(tmp)
        raise
    _drop_other_runs(final, tmp.name)
    manifest["path"] = str(tmp)
    log(
        f"infer dt={day} {shard_name(shard, shards)}: {rows['user_embeddings']} users ({reason}), "
        f"{rows['item_embeddings'] if rows['item_embeddings'] is not None else 'no'} items, model {version}, "
        f"{device}, {manifest['seconds']:.1f}s -> {final}"
    )
    return manifest


# -------------------------------------------------------------------- CLI
def register(sub) -> None:
    p = sub.add_parser(
        "infer",
        help="embed the users whose sequences changed on drop D (every user after a model "
        "change) with the published model; stage the shard's output for `publish`",
        description="Batch inference of the published model for drop D: user embeddings and "
        "preference scores of the users with updated_dt = D (all users when the "
        "published version differs from the last publish, or --all-users), item "
        "embeddings of the catalogue (shard 0). Output: "
        "warehouse/_staging/infer/dt=D/model=V/shard=i-of-n/. See jobs/steps/infer.py.",
    )
    p.add_argument("--dt", type=date_arg, required=True, help="drop date YYYY-MM-DD")
    p.add_argument("--shard", type=int, default=0, help="this shard's number, 0..n-1 (default 0)")
    p.add_argument("--shards", type=int, help="number of shards (default: infer.shards)")
    p.add_argument("--all-users", action="store_true", help="re-embed every user, not only D's")
    p.set_defaults(func=run)


def run(args, cfg: Config) -> int:
    shards = args.shards if args.shards is not None else cfg.infer.shards
    res = infer(cfg, args.dt, shard=args.shard, shards=shards, all_users=args.all_users)
    print(json.dumps(res, indent=2, default=str))
    return 0
