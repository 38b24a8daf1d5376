"""The quality benchmark's harness: full model vs id-only SASRec vs most-popular, same data, split and metrics.

Run it as `userformer benchmark quality ...` (jobs/tools/benchmark.py has the options and examples).

Order-only files (s3rec) use leave-one-out: last item = test, the one before =
validation (early stopping only; never reported). Time-stamped files use a
global time split (`split`): train before the validation time, validate on the
window up to the test time, test on the next `--horizon-days`. Ranking is
against the full catalogue (metrics.py). Writes JSON {dataset, protocol,
commit, config, models} and prints a Markdown table of the TEST metrics.
The speed and pipeline benchmarks live in tests/benchmarks/ (`make bench`).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from userformer.jobs.core.config import ModelConfig, load_config
from userformer.jobs.tools.loaders import LOADERS
from userformer.models import data
from userformer.models.item_tower import FIELD
from userformer.models.train import (
    evaluate,
    evaluate_popular,
    fit,
    load_checkpoint,
    pick_device,
)

# Order-only formats: their times only keep the order -> leave-one-out; the others -> time split.
ORDER_ONLY = {"s3rec"}
# Where the test metrics of the other history protocol go in each model's results.
OTHER = {"exclude": "history_kept", "keep": "history_excluded"}


def informative(m: ModelConfig, seqs: data.Sequences, catalog: data.ItemCatalog) -> ModelConfig:
    """Drop the inputs and heads this data cannot inform: a categorical field with one value or none (an
    event type that is always "purchase", a brand nobody has), durations that are all unknown, time features
    of order-only data. A constant input only dilutes mean pooling; a constant head learns nothing."""
    m = copy.deepcopy(m)

    def varies(field: str) -> bool:
        v = seqs.ints[field] if field in seqs.ints else catalog.attrs[field]
        return len(np.unique(v[v > 0])) > 1

    keep_event = {
        "item_id": True,
        "position": True,
        "duration": bool(np.isfinite(seqs.duration).any()),
        "time_gap": seqs.real_time,
        "time_ref": seqs.real_time,
    }
    m.event_features = [f for f in m.event_features if keep_event.get(f, f in FIELD and varies(FIELD[f]))]
    m.item_features = [f for f in m.item_features if f == "item_id" or varies(FIELD[f])]
    m.heads = [h for h in m.heads if varies(FIELD[h])]
    return m


def variant(name: str, base: ModelConfig, seqs: data.Sequences, catalog: data.ItemCatalog) -> ModelConfig:
    """`full`: every input the data informs; `id_only`: SASRec (item id + position in, item id out, no
    heads), the same code otherwise."""
    m = copy.deepcopy(base)
    if name == "id_only":
        m.event_features, m.item_features, m.heads = ["item_id", "position"], ["item_id"], []
        return m
    return informative(m, seqs, catalog)


def split(seqs: data.Sequences, order_only: bool, args) -> tuple[data.Sequences, data.EvalSet, data.EvalSet, str]:
    """The benchmark protocol: leave-one-out for order-only files, a global time split otherwise."""
    excl = args.history == "exclude"
    ranking = (
        "full-catalogue ranking, "
        + (
            "the user's history items excluded (as S3-Rec's code and the eSASRec benchmark do)"
            if excl
            else "history items not excluded"
        )
        + f"; also under '{OTHER[args.history]}': the test metrics with history items "
        + ("kept" if excl else "excluded")
    )
    if order_only:
        train, valid, test = data.leave_one_out(seqs)
        valid.exclude_history = test.exclude_history = excl
        return (
            train,
            valid,
            test,
            (
                "leave-one-out (last item test, second-to-last validation for early stopping "
                f"only); {ranking}; TEST metrics"
            ),
        )
    t_valid, t_test = np.quantile(seqs.ts, [args.valid_quantile, args.test_quantile])
    train, valid, test = data.time_protocol(seqs, float(t_valid), float(t_test), args.horizon_days * 86400.0)
    valid.exclude_history = test.exclude_history = excl
    return (
        train,
        valid,
        test,
        (
            f"time split: train on events before the {args.valid_quantile:.2f} quantile of event times "
            f"({_iso(t_valid)}); validation (early stopping only) = items of [{_iso(t_valid)}, {_iso(t_test)}); "
            f"test = users with items in [{_iso(t_test)}, +{args.horizon_days:g} days), embedded at {_iso(t_test)} "
            "from all their history before it (users without history kept); every item of the window is a positive; "
            f"{ranking}; TEST metrics (hr@10 on the first positive, recall@10 over all)"
        ),
    )


def test_metrics(model, test: data.EvalSet, catalog: data.ItemCatalog, device, tcfg, history: str) -> dict:
    """The test metrics under the chosen history protocol, plus the ranking metrics under the other one."""
    res = evaluate(model, test, catalog, device, tcfg)
    other = dataclasses.replace(test, exclude_history=not test.exclude_history)
    res[OTHER[history]] = _ranking(evaluate(model, other, catalog, device, tcfg, heads=False))
    return res


def _ranking(m: dict) -> dict:
    return {k: v for k, v in m.items() if k.split("@")[0] in ("hr", "ndcg", "recall")}


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(float(t), dt.UTC).strftime("%Y-%m-%d %H:%M")


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], capture_output=True, text=True, cwd=Path(__file__).resolve().parent, check=True
    ).stdout.strip()


def git_commit() -> str:
    """HEAD, with '-dirty' when models/ has uncommitted changes (the numbers then come from the work tree)."""
    try:
        head = _git("rev-parse", "HEAD")
        return head + ("-dirty" if _git("status", "--porcelain", "--", ".") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(models: dict) -> str:
    """The TEST metrics as a Markdown table (recall@10 for time splits; head accuracies last)."""
    cols = ["hr@10", "ndcg@10", "recall@10", "coverage@10", "entropy@50"]
    cols = [c for c in cols if any(c in m for m in models.values())]
    heads = sorted({t for m in models.values() for t in (m.get("heads") or {})})
    alt = next((k for k in OTHER.values() if any(k in m for m in models.values())), None)
    alt_cols = [c for c in ("hr@10", "ndcg@10") if alt]
    head = (
        cols
        + [f"{c} ({alt.replace('_', ' ')})" for c in alt_cols]
        + [f"{t} acc@1" for t in heads]
        + ["epochs", "train s"]
    )
    lines = ["| model | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name, m in models.items():
        sd = m.get("std", {})
        cells = [(f"{m[c]:.4f} ± {sd[c]:.4f}" if c in sd else f"{m[c]:.4f}") if c in m else "" for c in cols]
        cells += [f"{m[alt][c]:.4f}" if c in m.get(alt, {}) else "" for c in alt_cols]
        cells += [f"{m['heads'][t]['acc@1']:.3f}" if t in (m.get("heads") or {}) else "" for t in heads]
        cells += [str(m.get("epochs", "")), f"{m.get('train_seconds', 0.0):.0f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def train_and_test(name, m: ModelConfig, tcfg, ck, train, valid, test, catalog, device, args) -> dict:
    """Train one variant with one seed (or evaluate its saved checkpoint) and return its test results."""
    if ck:
        ck.parent.mkdir(parents=True, exist_ok=True)
    if args.reuse_checkpoints and ck and ck.is_file():
        # A model trained earlier (e.g. by a parallel `--model NAME` run): evaluate its best checkpoint.
        model, meta = load_checkpoint(ck, catalog)
        model.to(device)
        res = test_metrics(model, test, catalog, device, tcfg, args.history)
        print(f"{name} seed {tcfg.seed} TEST (checkpoint {ck}): {json.dumps(res)}", file=sys.stderr, flush=True)
        return {
            **res,
            "seed": meta["train_config"]["seed"],
            "epochs": meta["epoch"],
            "best_epoch": meta["epoch"],
            "best_valid": meta["metrics"]["valid"],
            "train_seconds": meta["metrics"]["train_seconds"],
            "seconds_per_epoch": meta["metrics"]["train_seconds"] / max(meta["epoch"], 1),
            "parameters": model.n_parameters(),
            "checkpoint": str(ck),
            "train_config": meta["train_config"],
            "history": meta.get("history"),
            "checkpoint_model_config": meta["model_config"],
        }
    print(f"--- {name} seed {tcfg.seed}: {m.event_features} -> {m.item_features}, heads {m.heads}", file=sys.stderr)
    model, hist = fit(
        m,
        tcfg,
        train,
        valid,
        catalog,
        ckpt_path=ck,
        progress=not args.no_progress,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    res = test_metrics(model, test, catalog, device, tcfg, args.history)
    print(f"{name} seed {tcfg.seed} TEST: {json.dumps(res)}", file=sys.stderr, flush=True)
    return {
        **res,
        "seed": tcfg.seed,
        "epochs": hist["epochs"],
        "best_epoch": hist["best_epoch"],
        "best_valid": hist["best_valid"],
        "train_seconds": hist["train_seconds"],
        "seconds_per_epoch": hist["train_seconds"] / max(hist["epochs"], 1),
        "parameters": model.n_parameters(),
        "history": hist["history"],
    }


def over_seeds(runs: list[dict], seeds: list[int]) -> dict:
    """Mean of every metric over the seeds' runs (std beside it, each run kept under `per_seed`)."""
    out = {"seeds": seeds, "per_seed": runs}

    def numeric(d):
        return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seed"}

    for k in numeric(runs[0]):
        vals = np.array([r[k] for r in runs], float)
        out[k] = float(vals.mean())
        out.setdefault("std", {})[k] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    for sub in ("heads", *OTHER.values()):
        if sub in runs[0]:
            out[sub] = _mean_tree([r[sub] for r in runs])
    out["epochs"] = int(round(out["epochs"]))
    return out


def _mean_tree(dicts: list[dict]) -> dict:
    return {
        k: (_mean_tree([d[k] for d in dicts]) if isinstance(v, dict) else float(np.mean([d[k] for d in dicts])))
        for k, v in dicts[0].items()
    }


def run(args, config_path=None) -> int:
    """Train and evaluate every model asked for; write the JSON and print the Markdown table."""
    env = {f"USERFORMER__{k.split('=', 1)[0].replace('.', '__').upper()}": k.split("=", 1)[1] for k in args.set}
    cfg = load_config(config_path, env=env)
    mcfg, tcfg = cfg.model, cfg.train
    if args.epochs:
        tcfg.epochs = args.epochs
    if args.patience:
        tcfg.patience = args.patience

    t0 = time.perf_counter()
    events, items, _ = LOADERS[args.format](args.sequences, args.attributes)
    order_only = args.format in ORDER_ONLY
    seqs, catalog = data.from_raw(events, items, real_time=not order_only)
    train, valid, test, protocol = split(seqs, order_only, args)
    print(
        f"{args.format}: {len(seqs):,} users, {catalog.n_items:,} items, {len(events):,} events; "
        f"validation users {len(valid.targets):,}, test users {len(test.targets):,}; "
        f"loaded in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )

    names = ["full", "id_only", "popular"] if args.model == "all" else [args.model]
    seeds = args.seeds or [tcfg.seed]
    results, configs = {}, {}
    device = pick_device(tcfg.device)
    for name in names:
        if name == "popular":  # deterministic: one evaluation
            other = dataclasses.replace(test, exclude_history=not test.exclude_history)
            results[name] = {
                **evaluate_popular(train, test, catalog),
                OTHER[args.history]: _ranking(evaluate_popular(train, other, catalog)),
                "epochs": 0,
                "train_seconds": 0.0,
            }
            continue
        m = variant(name, mcfg, seqs, catalog)
        configs[name] = dataclasses.asdict(m)
        runs = []
        for seed in seeds:
            t = dataclasses.replace(tcfg, seed=seed)
            ck = (
                args.checkpoint_dir / (f"{name}.pt" if len(seeds) == 1 else f"{name}-seed{seed}.pt")
                if args.checkpoint_dir
                else None
            )
            runs.append(train_and_test(name, m, t, ck, train, valid, test, catalog, device, args))
            if "checkpoint_model_config" in runs[-1]:
                configs[name] = runs[-1].pop("checkpoint_model_config")
        results[name] = runs[0] if len(runs) == 1 else over_seeds(runs, seeds)
    out = {
        "dataset": f"{args.format}:{args.sequences.name}",
        "protocol": protocol,
        "commit": git_commit(),
        "command": " ".join(sys.argv),
        "config": {
            "model": dataclasses.asdict(mcfg),
            "train": dataclasses.asdict(tcfg),
            "variants": configs,
            "seeds": seeds,
        },
        "data": {
            "users": len(seqs),
            "items": catalog.n_items,
            "events": len(events),
            "valid_users": len(valid.targets),
            "test_users": len(test.targets),
        },
        "models": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(markdown(results))
    return 0
