"""The customer model over the warehouse: `userformer train`, `finetune --dt D`, `evaluate` (jobs/core/registry.py).

**train** [--dt D]: the time protocol (PinnerFormer). T = end of drop D (default:
the latest drop user_sequences includes), read as of D (Delta time travel for
user_sequences; vocabulary and catalogue = ids first seen by D). Training uses
the events before T - ``train.eval_horizon_days``, streamed from the table in
chunks of ``train.stream_chunk_users`` users (jobs/core/stream.py; never the
whole table in memory). Validation = users with item events in the window
[T - horizon, T), a stable-hash share ``train.valid_user_fraction`` of them
(at most ``train.max_eval_users``, kept in memory), embedded at the window
start and ranked against the full catalogue; early stopping on it. Every epoch
writes ``models_root/runs/<run>/last.pt`` (weights, optimizer, every RNG), so
``--resume RUN|latest`` finishes an interrupted run exactly as it would have
ended. The best model is registered; ``--publish`` (and the very first model)
publishes it.

**finetune --dt D**: warm start from the PUBLISHED model, grown to D's
vocabulary (models/grow.py: new ids get rows, old rows stay). Trains
``finetune.epochs`` epochs on the users active on D (user_sequences row with
``updated_dt == D``) plus a replay sample of the others
(``finetune.replay_fraction``), minus a held-out share of D's active users
(``finetune.holdout_fraction``). Gate, on the held-out users: embedded from
their history before D, positives = items they engaged with on D; the published
model (grown) and the candidate are scored in the same harness and the
candidate is promoted (registered + published) only if, on every
``finetune.gate_metrics``, candidate >= published x (1 - max_quality_drop).
Otherwise it is registered as rejected and the pointer stays. Exit 0 either
way; a day without events trains nothing and succeeds.

**Re-embedding rule**: on promotion every user is re-embedded (inference
re-embeds all users when the published version changed). User
embeddings of the old model are not comparable with the new model's item
vectors; finetune measures by how much (held-out users: old user embeddings x
new item vectors vs the candidate's fresh embeddings; manifest
``stale_embeddings``).

**evaluate** [--version V] [--dt D]: the K = ``train.eval_horizon_days`` days
ending with drop D: users embedded at the window start from all their history
before it (users never seen in training included), positives = their items in
the window, full catalogue; the users validation never used (the other hash
share); most-popular (counts before the window) in the same run. Writes
``reports_root/models/<version>/evaluate-dt=D.json`` and prints a table. A
model trained on events inside the window is flagged (``window_overlaps_training``).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import os
import sys
import time
import uuid
from pathlib import Path

from userformer.jobs.core import dates, drops, hooks, lease, registry
from userformer.jobs.core.config import Config, ModelConfig, TrainConfig
from userformer.jobs.core.dates import date_arg
from userformer.jobs.core.errors import UserError
from userformer.jobs.core.storage import files

# The model's modules (models/, jobs/core/stream.py) load torch: the functions that train or evaluate import them, so
# that the daily gate (`promote_candidate`, its own task) does not pay torch's import (seconds) in its process.

DAY_S = 86400.0


class NotEnoughHistory(UserError):
    """The warehouse has no training sequence before the validation window yet (a pipeline's first days)."""


VALID_SALT = "valid"  # which window users validate (the rest are evaluate's)
SAMPLE_SALT = "eval-sample"  # which of them are kept beyond max_eval_users


# ------------------------------------------------------------------- data
@dataclasses.dataclass
class Snapshot:
    """The warehouse as of one drop date: the user_sequences version to stream and the catalogue."""

    day: dt.date
    seq_path: Path
    versions: dict  # user_sequences / items / vocab -> Delta version
    catalog: object  # models.data.ItemCatalog

    def record(self, cfg: Config) -> dict:
        return {
            "dt": str(self.day),
            **{name: {"path": str(cfg.table_path(name)), "version": v} for name, v in self.versions.items()},
        }


def snapshot(cfg: Config, day: dt.date | None, versions: dict | None = None) -> Snapshot:
    from userformer.jobs.core import stream

    if versions:
        seq_v, d = versions["user_sequences"], day
    else:
        seq_v, d = drops.sequences_version(cfg, day)
    cat = stream.warehouse_catalog(cfg, d, versions)
    return Snapshot(d, cfg.table_path("user_sequences"), {"user_sequences": seq_v, **cat.versions}, cat.catalog)


def _bucket(table, salt: str):
    from userformer.jobs.core import stream

    return stream.user_buckets(table["user_id"].to_pylist(), salt)


def _dataclass(cls, values: dict, where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{where}: settings this version of userformer does not know: {unknown}")
    return cls(**values)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _summary_metrics(m: dict) -> dict:
    return {k: v for k, v in m.items() if isinstance(v, (int, float))}


# ------------------------------------------------------------------ train
def _find_run(cfg: Config, ref: str) -> Path:
    runs = cfg.models_root / "runs"
    if ref == "latest":
        todo = (
            [
                p
                for p in sorted(runs.iterdir())
                if (p / "run.json").is_file() and json.loads((p / "run.json").read_text()).get("status") != "finished"
            ]
            if runs.is_dir()
            else []
        )
        if not todo:
            raise UserError(f"no unfinished training run under {runs} to resume")
        return todo[-1]
    d = runs / ref
    if not (d / "run.json").is_file():
        known = sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []
        raise UserError(f"no training run {ref!r} under {runs} (runs: {', '.join(known[-5:]) or 'none'})")
    return d


def _training_data(snap: Snapshot, tcfg: TrainConfig, window_days: float | None, max_users: int | None):
    """What `train` fits on, the same in every process of a data-parallel run: the training source (events before
    the validation window), the validation users, and the split and window start times."""
    from userformer.jobs.core import stream

    T_ref = dates.day_end(snap.day)
    horizon = tcfg.eval_horizon_days * DAY_S
    split = T_ref - horizon
    t_min = None
    if window_days is not None:
        if window_days * DAY_S <= horizon:
            raise UserError(
                f"a training window of {window_days} days leaves nothing to train on before the "
                f"validation window (train.eval_horizon_days={tcfg.eval_horizon_days})"
            )
        t_min = T_ref - window_days * DAY_S
    source = stream.DeltaSequences(
        snap.seq_path, snap.versions["user_sequences"], tcfg.stream_chunk_users, t_max=split, t_min=t_min
    )
    if max_users:
        frac = max_users / max(source.n_rows, 1)
        source.select = lambda t: _bucket(t, "max-users") < frac
    valid = stream.WindowUsers(
        split,
        T_ref,
        tcfg.max_eval_users,
        salt=SAMPLE_SALT,
        keep=lambda t: _bucket(t, VALID_SALT) < tcfg.valid_user_fraction,
    )
    source.summarise(snap.catalog.n_items, (valid,))
    if not source.n_sequences:
        raise NotEnoughHistory(
            f"no user has 2+ events before {dates.iso(split)}"
            + (f" (from {dates.iso(t_min)})" if t_min is not None else "")
            + f" in user_sequences as of {snap.day} "
            f"(train.eval_horizon_days={tcfg.eval_horizon_days}): ingest more days first"
        )
    valid_ev = valid.result()
    return source, valid, valid_ev, split, t_min


def _fit(mcfg, tcfg, source, valid_ev, catalog, run_dir: Path, state, extra: dict, *, progress: bool, log):
    """`fit` as `train` runs it: best.pt and the resumable last.pt in the run folder; no validation users, no early
    stopping (the last epoch is kept)."""
    from userformer.models import train as training

    valid = valid_ev if len(valid_ev.targets) else None
    ckpt, last = run_dir / "best.pt", run_dir / "last.pt"
    return training.fit(
        mcfg,
        tcfg,
        source,
        valid,
        catalog,
        ckpt_path=ckpt,
        progress=progress,
        log=log,
        state_path=last,
        resume=state,
        extra=extra,
        # tests: a kill here, on every rank, with the epoch's last.pt written
        after_epoch=lambda epoch: hooks.pause("train.after_epoch"),
    )


def _fit_parallel(cfg: Config, snap: Snapshot, mcfg, tcfg, data: tuple, run_dir: Path, resume: bool, extra: dict):
    """`fit` in tcfg.processes processes of this machine (torch.distributed's elastic launcher, as torchrun starts them;
    rendezvous on 127.0.0.1), each on the same snapshot; rank 0 writes best.pt and last.pt into the run folder and
    hands back its history and model. The caller keeps the lease: the workers only read the warehouse."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from userformer.models import train as training
    from userformer.models.model import UserFormer

    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=tcfg.processes,
        run_id=f"train-{run_dir.name}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    results = elastic_launch(launch, _fit_rank)(cfg, snap.day, snap.versions, mcfg, tcfg, data, run_dir, resume, extra)
    hist, weights = results[0]
    model = UserFormer(mcfg, snap.catalog)
    model.load_state_dict(weights)
    return model.to(training.pick_device(tcfg.device)), hist


def _fit_rank(cfg: Config, day, versions, mcfg, tcfg, data, run_dir: Path, resume: bool, extra: dict):
    """One process of `_fit_parallel`: joins the group the launcher set up (env://), rebuilds the training data
    from the same snapshot and fits; rank 0 returns (history, weights)."""
    import torch

    from userformer.models import train as training

    device = training.pick_device(tcfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        rank = torch.distributed.get_rank()
        snap = snapshot(cfg, day, versions)
        source, _, valid_ev, _, _ = _training_data(snap, tcfg, *data)
        state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True) if resume else None
        cat = snap.catalog
        model, hist = _fit(mcfg, tcfg, source, valid_ev, cat, run_dir, state, extra, progress=False, log=_stderr)
        return (hist, {k: v.cpu() for k, v in model.state_dict().items()}) if rank == 0 else None
    finally:
        torch.distributed.destroy_process_group()


def train(
    cfg: Config,
    *,
    day: dt.date | None = None,
    epochs: int | None = None,
    publish: bool = False,
    resume: str | None = None,
    max_users: int | None = None,
    progress: bool = True,
    log=_stderr,
    window_days: float | None = None,
) -> dict:
    """Train a model on the warehouse (module doc), register it, publish it when asked or when it is the first.

    `window_days`: train only on the events of the last `window_days` days up to the end of D (older events are
    left out of every sequence); the last ``train.eval_horizon_days`` of the window validate, as always.
    """
    import torch

    from userformer.jobs.core import stream
    from userformer.models import train as training

    t0 = time.perf_counter()
    state = None
    if resume:
        run_dir = _find_run(cfg, resume)
        run = json.loads((run_dir / "run.json").read_text())
        if run.get("status") == "finished":
            log(f"run {run['run_id']} already finished: version {run['summary']['version']}")
            return run["summary"]
        mcfg = _dataclass(ModelConfig, run["model_config"], f"{run_dir}/run.json model_config")
        tcfg = _dataclass(TrainConfig, run["train_config"], f"{run_dir}/run.json train_config")
        snap = snapshot(
            cfg,
            dt.date.fromisoformat(run["data"]["dt"]),
            {k: run["data"][k]["version"] for k in ("user_sequences", "items", "vocab")},
        )
        publish, max_users = publish or run["publish"], run["max_users"]
        window_days = run.get("window_days")
        if (run_dir / "last.pt").is_file():
            state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
            log(f"resuming run {run['run_id']} after epoch {state['epoch']}")
    else:
        snap = snapshot(cfg, day)
        mcfg, tcfg = copy.deepcopy(cfg.model), copy.deepcopy(cfg.train)
        run_id = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        run_dir = cfg.models_root / "runs" / run_id
        run_dir.mkdir(parents=True)
        run = {
            "run_id": run_id,
            "status": "running",
            "created_at": registry.now_iso(),
            "data": snap.record(cfg),
            "publish": publish,
            "max_users": max_users,
            "window_days": window_days,
            "model_config": dataclasses.asdict(mcfg),
        }
    if epochs:
        tcfg.epochs = epochs
    run["train_config"] = dataclasses.asdict(tcfg)
    files.write_json(run_dir / "run.json", run)

    cat = snap.catalog
    source, valid, valid_ev, split, t_min = _training_data(snap, tcfg, window_days, max_users)
    T_ref = dates.day_end(snap.day)
    if not len(valid_ev.targets):
        log(
            f"warning: no validation users with item events in [{dates.iso(split)}, {dates.iso(T_ref)}): "
            "no early stopping, the last epoch is kept"
        )
    log(
        f"train as of {snap.day}: {source.n_sequences} sequences of {source.n_users} users before {dates.iso(split)}, "
        f"{len(valid_ev.targets)} validation users (of {valid.total} in the window), {cat.n_items} items; "
        f"run {run['run_id']}"
    )
    protocol = {
        "reference_time": dates.iso(T_ref),
        "split_time": dates.iso(split),
        "trained_until": dates.iso(split),
        "trained_until_ts": split,
        "eval_horizon_days": tcfg.eval_horizon_days,
        "valid_user_fraction": tcfg.valid_user_fraction,
        "trained_from": dates.iso(t_min) if t_min is not None else None,
        "window_days": window_days,
    }
    extra = {"data": snap.record(cfg), "protocol": protocol, "run_id": run["run_id"], "parent": None}
    if tcfg.processes > 1:
        model, hist = _fit_parallel(cfg, snap, mcfg, tcfg, (window_days, max_users), run_dir, state is not None, extra)
    else:
        model, hist = _fit(mcfg, tcfg, source, valid_ev, cat, run_dir, state, extra, progress=progress, log=log)

    device = training.pick_device(tcfg.device)
    metrics = {
        "best_epoch": hist["best_epoch"],
        "epochs": hist["epochs"],
        "stopped_early": hist["stopped_early"],
        "train_seconds": hist["train_seconds"],
        "train_sequences": source.n_sequences,
        "valid_users": len(valid_ev.targets),
    }
    if len(valid_ev.targets):
        metrics["valid"] = training.evaluate(model, valid_ev, cat, device, tcfg)
        metrics["valid_most_popular"] = stream.evaluate_counts(source.item_counts(cat.n_items), valid_ev, cat)
    ck = training.checkpoint(
        model,
        tcfg,
        hist["best_epoch"] or hist["epochs"],
        metrics,
        {**extra, "history": hist["history"], "parameters": model.n_parameters()},
    )
    version = registry.register(cfg, ck, kind="train", day=snap.day)
    ptr = registry.published(cfg)
    published = publish or ptr is None
    if published:
        registry.publish(cfg, version, "userformer train --publish" if publish else "first model of this registry")
    summary = {
        "version": version,
        "published": published,
        "run_id": run["run_id"],
        "dt": str(snap.day),
        "data": snap.record(cfg),
        "epochs": hist["epochs"],
        "best_epoch": hist["best_epoch"],
        "train_sequences": source.n_sequences,
        "valid_users": len(valid_ev.targets),
        "valid": _summary_metrics(metrics.get("valid", {})),
        "valid_most_popular": _summary_metrics(metrics.get("valid_most_popular", {})),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    run.update(status="finished", finished_at=registry.now_iso(), summary=summary)
    files.write_json(run_dir / "run.json", run)
    for f in ("last.pt", "best.pt"):  # the registry holds the result; the resumable state is no longer needed
        (run_dir / f).unlink(missing_ok=True)
    return summary


# --------------------------------------------------------------- finetune
def gate(
    candidate: dict, published: dict, metrics: list[str], max_quality_drop: float, users: int, min_users: int
) -> dict:
    """The promotion rule: enough held-out users, and candidate >= published x (1 - max_quality_drop) on each metric."""
    checks = {}
    for m in metrics:
        c, p = float(candidate.get(m, 0.0)), float(published.get(m, 0.0))
        need = p * (1.0 - max_quality_drop)
        checks[m] = {"candidate": c, "published": p, "threshold": need, "passed": c >= need}
    failed = [m for m, ch in checks.items() if not ch["passed"]]
    if users < min_users:
        reason = f"only {users} held-out users with positives (finetune.min_holdout_users={min_users}): not judged"
    elif failed:
        reason = "below the published model: " + ", ".join(
            f"{m} {checks[m]['candidate']:.4f} < {checks[m]['threshold']:.4f}" for m in failed
        )
    else:
        reason = "passed: " + ", ".join(
            f"{m} {ch['candidate']:.4f} >= {ch['threshold']:.4f}" for m, ch in checks.items()
        )
    return {
        "promote": users >= min_users and not failed,
        "reason": reason,
        "checks": checks,
        "users": users,
        "min_users": min_users,
        "max_quality_drop": max_quality_drop,
    }


@lease.writer("finetune")
def finetune(
    cfg: Config, day: dt.date, *, epochs: int | None = None, promote: bool = True, progress: bool = True, log=_stderr
) -> dict:
    """Fine-tune the published model on drop `day`, gate it, promote or reject it (module doc).

    With ``promote=False`` the candidate is registered with status "candidate" and its gate measurements, and
    `promote_candidate` decides (the daily DAG's separate gate task). A rerun of a day whose candidate of the same
    parent and data is registered already returns that candidate instead of training another one.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from userformer.jobs.core import stream
    from userformer.models import train as training

    t0 = time.perf_counter()
    ft = cfg.finetune
    ptr = registry.published(cfg)
    if ptr is None:
        raise UserError(
            f"no published model under {cfg.models_root}: run `userformer train` first "
            "(finetune warm-starts from the published version)"
        )
    state = drops.drop_state(cfg, day)
    base = {"dt": str(day), "published": ptr["version"], "trained": False, "promoted": False}
    if state == "ingested":
        raise UserError(f"user_sequences does not include drop {day} yet: run `userformer sequences --dt {day}` first")
    if state == "missing":
        raise UserError(f"no sequences for {day}: drop {day} was not ingested (`userformer run-day --dt {day}`)")
    if state == "empty":
        return {**base, "reason": f"drop {day} has no events: nothing to fine-tune, nothing promoted"}
    pub_path = registry.version_dir(cfg, ptr["version"]) / "model.pt"
    published, pub_ck = registry.load(cfg, ptr["version"])
    start, end = dates.day_start(day), dates.day_end(day)
    until = (pub_ck.get("protocol") or {}).get("trained_until_ts")
    if until is not None and until >= end:
        return {
            **base,
            "reason": f"the published version {ptr['version']} was already trained on events up to "
            f"{dates.iso(until)}: nothing new in drop {day}",
        }
    snap = snapshot(cfg, day)
    prior = _prior_candidate(cfg, day, ptr["version"], snap.record(cfg))
    if prior is not None:
        log(
            f"finetune {day}: candidate {prior['version']} of {ptr['version']} on the same data exists "
            f"({prior['status']}): not training another"
        )
        res = {
            **base,
            "trained": False,
            "version": prior["version"],
            "status": prior["status"],
            "parent": ptr["version"],
            "reason": f"rerun: candidate {prior['version']} ({prior['status']}) exists",
        }
        if promote and prior["status"] in ("candidate", "promoted"):
            res.update(promote_candidate(cfg, day, prior["version"]))
        return res
    cat = snap.catalog
    grow_report = registry.fit_to_catalog(published, cat, str(pub_path))  # in place: `published` is now grown
    grown = published

    tc = _dataclass(TrainConfig, pub_ck["train_config"], f"{pub_path} train_config")
    # The model's objective and loss, this machine's device settings, the fine-tuning schedule.
    tcfg = dataclasses.replace(
        tc,
        epochs=epochs or ft.epochs,
        lr=ft.lr,
        device=cfg.train.device,
        bf16=cfg.train.bf16,
        cpu_bf16=cfg.train.cpu_bf16,
        num_threads=cfg.train.num_threads,
        stream_chunk_users=cfg.train.stream_chunk_users,
    )
    on_day = pa.scalar(day, pa.date32())

    def active(t):
        return pc.equal(t["updated_dt"], on_day).to_numpy(zero_copy_only=False)

    def held(t):
        return _bucket(t, f"holdout|{day}") < ft.holdout_fraction

    def train_rows(t):
        a = active(t)
        return (a & ~held(t)) | (~a & (_bucket(t, f"replay|{day}") < ft.replay_fraction))

    counts = {"active_users": 0, "holdout_users": 0}

    def count(t, seqs):
        a = active(t)
        counts["active_users"] += int(a.sum())
        counts["holdout_users"] += int((a & held(t)).sum())

    gate_users = stream.WindowUsers(
        start, end, cfg.train.max_eval_users, salt=SAMPLE_SALT, keep=lambda t: active(t) & held(t)
    )
    census = stream.DeltaSequences(snap.seq_path, snap.versions["user_sequences"], tcfg.stream_chunk_users)
    census.summarise(cat.n_items, (count, gate_users))
    if counts["active_users"] == 0:
        return {**base, "reason": f"no user was active on {day}: nothing to fine-tune, nothing promoted"}
    source = stream.DeltaSequences(
        snap.seq_path, snap.versions["user_sequences"], tcfg.stream_chunk_users, t_max=end, select=train_rows
    ).summarise(cat.n_items)
    gate_ev = gate_users.result()
    info = {
        **counts,
        "gate_users": len(gate_ev.targets),
        "train_sequences": source.n_sequences,
        "replay_fraction": ft.replay_fraction,
        "holdout_fraction": ft.holdout_fraction,
        "epochs": tcfg.epochs,
        "lr": tcfg.lr,
    }
    log(f"finetune {ptr['version']} on {day}: {info}")
    if not source.n_sequences:
        return {**base, **info, "reason": f"no training sequences on {day} once the held-out users are out"}

    device = training.pick_device(tcfg.device)
    grown.to(device)
    pub_m = training.evaluate(grown, gate_ev, cat, device, tcfg)
    stale_users = training.embed_users(grown, gate_ev.history, grown.cfg.max_len, device, tcfg, ref_ts=gate_ev.ref_ts)
    protocol = {
        "reference_time": dates.iso(end),
        "trained_until": dates.iso(end),
        "trained_until_ts": end,
        "gate_window": [dates.iso(start), dates.iso(end)],
        "parent_trained_until": until,
    }
    extra = {"data": snap.record(cfg), "protocol": protocol, "parent": ptr["version"], "finetune": info}
    candidate, hist = training.fit(
        grown.cfg, tcfg, source, None, cat, progress=progress, log=log, model=copy.deepcopy(grown), extra=extra
    )
    cand_m = training.evaluate(candidate, gate_ev, cat, device, tcfg)
    stale_m = stream.evaluate_embeddings(stale_users, candidate.item_tower.all_items(), gate_ev, cat)
    pop_m = stream.evaluate_counts(source.item_counts(cat.n_items), gate_ev, cat)
    decision = gate(cand_m, pub_m, ft.gate_metrics, ft.max_quality_drop, len(gate_ev.targets), ft.min_holdout_users)
    stale = {
        "users": len(gate_ev.targets),
        "stale_user_embeddings": _summary_metrics(stale_m),
        "fresh_user_embeddings": _summary_metrics(cand_m),
        "fresh_minus_stale": {k: cand_m.get(k, 0.0) - stale_m.get(k, 0.0) for k in ("recall@10", "ndcg@10", "hr@10")},
        "what": "held-out users of the day: the published model's user embeddings (history before the day) "
        "against the candidate's item vectors, vs the candidate's own fresh embeddings of them",
        "rule": registry.REEMBED_RULE,
    }
    metrics = {
        "gate": {"candidate": cand_m, "published": pub_m, "most_popular": pop_m},
        "train_seconds": hist["train_seconds"],
        "epochs": hist["epochs"],
    }
    ck = training.checkpoint(
        candidate,
        tcfg,
        hist["epochs"],
        metrics,
        {
            **extra,
            "history": hist["history"],
            "gate": decision,
            "stale_embeddings": stale,
            "grown": grow_report,
            "parameters": candidate.n_parameters(),
        },
    )
    status = ("promoted" if decision["promote"] else "rejected") if promote else "candidate"
    version = registry.register(cfg, ck, kind="finetune", day=day, status=status)
    if promote and decision["promote"]:
        registry.publish(cfg, version, f"finetune dt={day} over {ptr['version']}: gate {decision['reason']}")
    return {
        **base,
        "trained": True,
        "promoted": promote and decision["promote"],
        "version": version,
        "status": status,
        "published": version if promote and decision["promote"] else ptr["version"],
        "parent": ptr["version"],
        "reason": decision["reason"],
        "gate": decision,
        "stale_embeddings": stale,
        **info,
        "most_popular": _summary_metrics(pop_m),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _prior_candidate(cfg: Config, day: dt.date, parent: str, data: dict) -> dict | None:
    """A fine-tuned version of `parent` on drop `day` from the same Delta versions, if one is registered."""
    for man in reversed(registry.list_versions(cfg)):
        if (
            man.get("kind") == "finetune"
            and man.get("dt") == str(day)
            and man.get("parent") == parent
            and man.get("data") == data
        ):
            return man
    return None


@lease.writer("gate")
def promote_candidate(cfg: Config, day: dt.date, version: str) -> dict:
    """The gate: publish the candidate `version` iff its held-out measurements pass the rule of the current config.

    The measurements were taken by `finetune` (candidate and published model on the same held-out users); the rule
    (``finetune.gate_metrics``, ``max_quality_drop``, ``min_holdout_users``) is applied here, so a tightened config
    applies to candidates not yet judged. The published model must still be the candidate's parent: a candidate of
    an older model is not comparable and is rejected. Idempotent: a judged candidate keeps its verdict (a promoted
    one is published again when the published model is back at its parent, as after a repair's restore).
    """
    man = registry.read_manifest(cfg, version)
    ptr = registry.published(cfg)
    if man.get("kind") != "finetune" or man.get("dt") != str(day):
        raise UserError(
            f"{version} is not a fine-tuned candidate of drop {day} (kind {man.get('kind')}, dt {man.get('dt')})"
        )
    if man["status"] == "promoted" and ptr is not None and ptr["version"] == man.get("parent"):
        # The published model went back to this candidate's parent (a repair restored it): the same candidate
        # of the same data passed this gate before, so it is published again rather than retrained.
        ptr = registry.publish(
            cfg,
            version,
            f"finetune dt={day} over {man['parent']}: promoted before, published again "
            "after the published model went back to its parent",
        )
        return {
            "version": version,
            "status": "promoted",
            "promoted": True,
            "published": ptr["version"],
            "reason": "promoted before on the same data: published again",
            "gate": man.get("gate"),
        }
    if man["status"] != "candidate":
        return {
            "version": version,
            "status": man["status"],
            "promoted": False,
            "published": ptr["version"] if ptr else None,
            "reason": f"already judged: {man['status']}",
            "gate": man.get("gate"),
        }
    ft = cfg.finetune
    g = man["metrics"]["gate"]
    if ptr is None or ptr["version"] != man.get("parent"):
        decision = {
            "promote": False,
            "reason": f"the published model is {ptr and ptr['version']}, not the "
            f"candidate's parent {man.get('parent')}: not comparable",
        }
    else:
        decision = gate(
            g["candidate"],
            g["published"],
            ft.gate_metrics,
            ft.max_quality_drop,
            int(man["finetune"]["gate_users"]),
            ft.min_holdout_users,
        )
    status = "promoted" if decision["promote"] else "rejected"
    registry.set_status(cfg, version, status, decision)
    hooks.pause("gate.before_publish")  # tests: judged, not yet published
    if decision["promote"]:
        ptr = registry.publish(cfg, version, f"finetune dt={day} over {man['parent']}: gate {decision['reason']}")
    return {
        "version": version,
        "status": status,
        "promoted": decision["promote"],
        "published": ptr["version"] if ptr else None,
        "reason": decision["reason"],
        "gate": decision,
    }


# --------------------------------------------------------------- evaluate
def evaluate(cfg: Config, *, version: str | None = None, day: dt.date | None = None, out=print) -> dict:
    """Evaluate a registered model (default: the published one) on the window ending with drop `day` (module doc)."""
    import torch

    from userformer.jobs.core import stream
    from userformer.models import train as training

    t0 = time.perf_counter()
    if version is None:
        ptr = registry.published(cfg)
        if ptr is None:
            raise UserError(f"no published model under {cfg.models_root}: pass --version or run `userformer train`")
        version = ptr["version"]
    model, ck = registry.load(cfg, version)
    snap = snapshot(cfg, day)
    cat = snap.catalog
    grow_report = registry.fit_to_catalog(model, cat, str(registry.version_dir(cfg, version) / "model.pt"))
    tcfg = cfg.train
    torch.set_num_threads(tcfg.num_threads)
    end = dates.day_end(snap.day)
    start = end - tcfg.eval_horizon_days * DAY_S
    window = stream.WindowUsers(
        start,
        end,
        tcfg.max_eval_users,
        salt=SAMPLE_SALT,
        keep=lambda t: _bucket(t, VALID_SALT) >= tcfg.valid_user_fraction,
    )
    history = stream.DeltaSequences(
        snap.seq_path, snap.versions["user_sequences"], tcfg.stream_chunk_users, t_max=start, min_len=1
    ).summarise(cat.n_items, (window,))
    ev = window.result()
    if not len(ev.targets):
        raise UserError(
            f"no users with item events in [{dates.iso(start)}, {dates.iso(end)}) as of {snap.day} "
            f"(train.eval_horizon_days={tcfg.eval_horizon_days}): nothing to evaluate"
        )
    device = training.pick_device(tcfg.device)
    model.to(device)
    m = training.evaluate(model, ev, cat, device, tcfg)
    pop = stream.evaluate_counts(history.item_counts(cat.n_items), ev, cat)
    until = (ck.get("protocol") or {}).get("trained_until_ts")
    report = {
        "version": version,
        "kind": ck.get("kind"),
        "dt": str(snap.day),
        "created_at": registry.now_iso(),
        "protocol": {
            "window": [dates.iso(start), dates.iso(end)],
            "embedded_at": dates.iso(start),
            "horizon_days": tcfg.eval_horizon_days,
            "ranking": "full catalogue",
            "users": f"users with item events in the window, the {1 - tcfg.valid_user_fraction:.0%} "
            "hash share validation never sees; cold users (no history) included",
            "model_trained_until": dates.iso(until) if until is not None else None,
            "window_overlaps_training": bool(until is not None and until > start + 1e-6),
        },
        "users": len(ev.targets),
        "window_users": window.total,
        "cold_users": int((ev.history.lengths == 0).sum()),
        "items": cat.n_items,
        "grown_since_model": grow_report,
        "data": snap.record(cfg),
        "models": {version: m, "most_popular": pop},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    path = cfg.reports_root / "models" / version / f"evaluate-dt={snap.day}.json"
    files.write_json(path, report)
    report["path"] = str(path)
    out(format_report(report))
    return report


def format_report(report: dict) -> str:
    cols = ["users", "hr@10", "recall@10", "ndcg@10", "coverage@10", "entropy@50"]
    p = report["protocol"]
    lines = [
        f"evaluate {report['version']} as of {report['dt']}: window {p['window'][0]} .. {p['window'][1]}, "
        f"{report['users']} users ({report['cold_users']} cold), {report['items']} items (full catalogue)"
    ]
    if p["window_overlaps_training"]:
        lines.append(f"WARNING: the model was trained on events up to {p['model_trained_until']}, inside the window")
    lines += ["", "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in report["models"].items():
        cells = [str(m.get(c, "")) if c == "users" else (f"{m[c]:.4f}" if c in m else "") for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    heads = report["models"][report["version"]].get("heads") or {}
    if heads:
        lines += ["", "| head | users | acc@1 | acc@5 | majority@1 |", "|---|---|---|---|---|"]
        for task, h in heads.items():
            lines.append(
                f"| {task} | {h.get('users', '')} | {h.get('acc@1', 0):.4f} | {h.get('acc@5', 0):.4f} | "
                f"{h.get('majority@1', 0):.4f} |"
            )
    lines += ["", f"report: {report.get('path', '')}"]
    return "\n".join(lines)


# -------------------------------------------------------------------- CLI
def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train the customer model on the warehouse (streams user_sequences), "
        "register it; --publish makes it the served version",
        description="Train on user_sequences as of a drop date (time protocol: the last "
        "train.eval_horizon_days validate), register the best model; the first model "
        "and --publish publish it. See jobs/steps/train.py.",
    )
    p.add_argument("--dt", type=date_arg, help="as of this drop date (default: the latest in user_sequences)")
    p.add_argument(
        "--epochs",
        type=int,
        help="max epochs (default: train.epochs); with --resume of an unfinished run: its new maximum",
    )
    p.add_argument("--publish", action="store_true", help="publish the new version (the first one always is)")
    p.add_argument("--resume", metavar="RUN_ID|latest", help="continue an interrupted run from its last epoch")
    p.add_argument("--max-users", type=int, metavar="N", help="train on about N users (a stable hash sample)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    p = sub.add_parser(
        "finetune",
        help="warm-start the published model on drop D's active users; promote it only "
        "if it passes the quality gate on held-out users",
        description="Fine-tune the published version on drop D (grows embeddings for new ids), gate "
        "it against the published model on held-out users of D, promote or reject. "
        "Exit 0 either way. See jobs/steps/train.py.",
    )
    p.add_argument("--dt", type=date_arg, required=True, help="drop date YYYY-MM-DD")
    p.add_argument("--epochs", type=int, help="epochs (default: finetune.epochs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    p = sub.add_parser(
        "evaluate",
        help="time-based evaluation of a model version on the warehouse, with "
        "most-popular in the same run; JSON report + table",
        description="Evaluate a version (default: the published one) on the train.eval_horizon_days "
        "ending with drop D: recall/HR/NDCG@10, coverage@10, entropy@50, head accuracy, "
        "most-popular. See jobs/steps/train.py.",
    )
    p.add_argument("--version", help="model version (default: the published one)")
    p.add_argument("--dt", type=date_arg, help="last drop date of the window (default: the latest)")
    p.set_defaults(func=run)


def run(args, cfg: Config) -> int:
    if args.command == "train":
        if args.epochs is not None and args.epochs < 1:
            raise UserError(f"--epochs must be >= 1, got {args.epochs}")
        if args.max_users is not None and args.max_users < 1:
            raise UserError(f"--max-users must be >= 1, got {args.max_users}")
        if args.resume and args.dt:
            raise UserError("--resume continues a run on its own data; --dt cannot change it")
        res = train(
            cfg,
            day=args.dt,
            epochs=args.epochs,
            publish=args.publish,
            resume=args.resume,
            max_users=args.max_users,
            progress=not args.no_progress,
        )
    elif args.command == "finetune":
        if args.epochs is not None and args.epochs < 1:
            raise UserError(f"--epochs must be >= 1, got {args.epochs}")
        res = finetune(cfg, args.dt, epochs=args.epochs, progress=not args.no_progress)
    else:
        res = evaluate(cfg, version=args.version, day=args.dt)
        return 0
    print(json.dumps(res, indent=2, default=str))
    return 0
