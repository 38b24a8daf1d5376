"""`userformer retrain --dt D --window-days N`: a model from scratch on a recent window, promoted only if better.

What the manual ``retrain`` DAG runs (dags/retrain.py), step by step, and the CLI runs in one process:

1. **train** (`train_window`): a new model from scratch on the events of the last N days up to the end of drop D
   (`jobs/steps/train.py` ``train(window_days=N)``: older events are left out of every training sequence; the last
   ``train.eval_horizon_days`` of the window validate and stop early). Registered, not published, unless nothing
   is published yet (then it is the first model and published, as ``userformer train`` does).
2. **judge** (`judge`): the new version and the published one are evaluated on the same held-out users and window
   (``userformer evaluate --dt D``: the ``train.eval_horizon_days`` ending with D, the users validation never
   used, full catalogue). The new version is promoted (published) only if it is **better**: at least as good on
   every ``finetune.gate_metrics`` and strictly better on one. The published model may have been fine-tuned on
   the evaluation window (its report flags ``window_overlaps_training``); that favours it, so a promotion is
   conservative. The verdict goes into the new version's manifest (status promoted / rejected).
3. After a promotion: every user is re-embedded (`pipeline.infer(full=True)` for every shard), the outputs
   checked and published, the index rebuilt and checked, the candidates refreshed, all as of D, and released:
   readers switch to the new model's outputs at once. Without one nothing else changes.

Every step's result is kept in the ledger of D (`ledger.record`): ``retrain_train``, ``retrain_judge`` and the
pipeline steps' own entries.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time

from userformer.jobs.core import drops, lease, ledger, registry
from userformer.jobs.core.config import Config
from userformer.jobs.core.dates import date_arg
from userformer.jobs.core.errors import UserError
from userformer.jobs.flows import pipeline
from userformer.jobs.steps import train

log = logging.getLogger(__name__)


def as_of(cfg: Config, day: dt.date | None) -> dt.date:
    """D: the given drop date, or the latest drop user_sequences includes."""
    if day is not None:
        return day
    last = drops.applied_drop(cfg)
    if last is None:
        raise UserError("user_sequences includes no drop yet: run the daily pipeline first (`userformer run-day`)")
    return last


def train_window(cfg: Config, day: dt.date, window_days: int, *, epochs: int | None = None) -> dict:
    """Step 1: train from scratch on the last `window_days` days up to D; register the version."""
    if window_days < 2:
        raise UserError(f"--window-days must be >= 2, got {window_days}")
    t0 = time.perf_counter()
    before = registry.published(cfg)
    res = train.train(cfg, day=day, epochs=epochs, window_days=window_days, progress=False, log=log.info)
    out = {
        "version": res["version"],
        "published_before": before["version"] if before else None,
        "first_model": before is None,
        "window_days": window_days,
        "epochs": res["epochs"],
        "best_epoch": res["best_epoch"],
        "train_sequences": res["train_sequences"],
        "valid": res["valid"],
        "seconds": res["seconds"],
    }
    return ledger.record(cfg, day, "retrain_train", out, time.perf_counter() - t0)


def better(new: dict, old: dict, metrics: list[str]) -> dict:
    """The promotion rule of a retrain: >= on every metric and > on at least one."""
    checks = {m: {"new": float(new.get(m, 0.0)), "published": float(old.get(m, 0.0))} for m in metrics}
    ok = all(c["new"] >= c["published"] for c in checks.values()) and any(
        c["new"] > c["published"] for c in checks.values()
    )
    words = ", ".join(f"{m} {c['new']:.4f} vs {c['published']:.4f}" for m, c in checks.items())
    return {
        "promote": ok,
        "checks": checks,
        "reason": ("better than the published model: " if ok else "not better than the published model: ") + words,
    }


@lease.writer("retrain")
def judge(cfg: Config, day: dt.date, version: str) -> dict:
    """Step 2: evaluate `version` and the published model on the same window; publish `version` iff better."""
    t0 = time.perf_counter()
    man = registry.read_manifest(cfg, version)
    ptr = registry.published(cfg)
    if ptr is None:
        raise UserError(f"nothing is published under {cfg.models_root}: nothing to judge {version} against")
    if ptr["version"] == version:
        res = {
            "version": version,
            "promoted": True,
            "published": version,
            "reason": "it is the published model (the first model of the registry, or already promoted)",
        }
        return ledger.record(cfg, day, "retrain_judge", res, time.perf_counter() - t0)
    if man["status"] in ("promoted", "rejected"):
        res = {
            "version": version,
            "promoted": False,
            "published": ptr["version"],
            "reason": f"already judged: {man['status']}",
            "gate": man.get("gate"),
        }
        return ledger.record(cfg, day, "retrain_judge", res, time.perf_counter() - t0)
    quiet = log.info
    new = train.evaluate(cfg, version=version, day=day, out=quiet)
    old = train.evaluate(cfg, version=ptr["version"], day=day, out=quiet)
    metrics = list(cfg.finetune.gate_metrics)
    decision = better(new["models"][version], old["models"][ptr["version"]], metrics)
    decision.update(
        users=new["users"],
        window=new["protocol"]["window"],
        against=ptr["version"],
        published_overlaps_window=old["protocol"]["window_overlaps_training"],
        reports={"new": new["path"], "published": old["path"]},
    )
    registry.set_status(cfg, version, "promoted" if decision["promote"] else "rejected", decision)
    if decision["promote"]:
        ptr = registry.publish(
            cfg, version, f"retrain dt={day} ({man.get('protocol', {}).get('window_days')} days): {decision['reason']}"
        )
    res = {
        "version": version,
        "promoted": decision["promote"],
        "published": ptr["version"],
        "reason": decision["reason"],
        "gate": decision,
        "metrics": {
            "new": {m: new["models"][version].get(m) for m in metrics},
            "published": {m: old["models"][decision["against"]].get(m) for m in metrics},
        },
    }
    return ledger.record(cfg, day, "retrain_judge", res, time.perf_counter() - t0)


def refresh_outputs(cfg: Config, day: dt.date, shards: int | None = None) -> dict:
    """Step 3 (after a promotion): re-embed every user, check + publish, rebuild + check the index, candidates,
    release."""
    shards = shards or cfg.infer.shards
    out = {"infer": [pipeline.infer(cfg, day, i, shards, full=True) for i in range(shards)]}
    out["check_outputs"] = pipeline.check_outputs(cfg, day, shards)
    out["publish"] = pipeline.publish(cfg, day, shards)
    out["index"] = pipeline.index(cfg, day)
    out["check_index"] = pipeline.check_index(cfg, day)
    out["candidates"] = pipeline.candidates(cfg, day)
    out["release"] = pipeline.release(cfg, day)
    return out


@lease.writer("retrain")
def retrain(
    cfg: Config, day: dt.date | None, window_days: int, *, epochs: int | None = None, shards: int | None = None
) -> dict:
    """The whole retrain (module doc) in this process: what `userformer retrain` runs."""
    t0 = time.perf_counter()
    day = as_of(cfg, day)
    out = {"dt": str(day), "train": train_window(cfg, day, window_days, epochs=epochs)}
    out["judge"] = judge(cfg, day, out["train"]["version"])
    if out["judge"]["promoted"]:
        out.update(refresh_outputs(cfg, day, shards))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


# -------------------------------------------------------------------- CLI
def register(sub) -> None:
    p = sub.add_parser(
        "retrain",
        help="train from scratch on a recent window, promote only if better than the "
        "published model, then re-embed everyone and rebuild the index",
        description="Train a new model from scratch on the last --window-days days up to drop D, "
        "evaluate it and the published model on the same window, promote it only if "
        "better; after a promotion re-embed every user, publish, rebuild the index, "
        "refresh candidates. What the `retrain` DAG runs. See jobs/flows/retrain.py.",
    )
    p.add_argument("--dt", type=date_arg, help="as-of drop date (default: the latest in user_sequences)")
    p.add_argument("--window-days", type=int, default=7, help="days of events to train on, ending with D (default 7)")
    p.add_argument("--epochs", type=int, help="max epochs (default: train.epochs)")
    p.set_defaults(func=run)


def run(args, cfg: Config) -> int:
    if args.epochs is not None and args.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {args.epochs}")
    res = retrain(cfg, args.dt, args.window_days, epochs=args.epochs)
    print(json.dumps(res, indent=2, default=str))
    return 0
