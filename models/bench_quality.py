"""Quality benchmark: full model vs id-only SASRec vs most-popular, same data, split and harness.

    python -m userformer.models.bench_quality --format s3rec \\
        --sequences ../shared/data/s3rec_beauty/Beauty.txt \\
        --attributes ../shared/data/s3rec_beauty/Beauty_item2attributes.json --out results.json

Order-only files (s3rec) use leave-one-out: last item = test, the one before =
validation (early stopping only; never reported). Ranking is against the full
catalogue (metrics.py). Writes JSON {dataset, protocol, commit, config, models}
and prints a Markdown table of the TEST metrics.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from userformer.jobs.config import ModelConfig, load_config
from userformer.jobs.loaders import LOADERS
from userformer.models import data as D
from userformer.models.train import (
    evaluate,
    evaluate_popular,
    fit,
    load_checkpoint,
    pick_device,
)

# Order-only formats: their times only keep the order.
ORDER_ONLY = {"s3rec"}
# Event features that carry information per format (constant ones would only dilute mean pooling).
CONTENT_EVENT = ["item_id", "category_l1", "category_l2", "category_l3", "brand", "position"]
CONTENT_ITEM = ["item_id", "category_l1", "category_l2", "category_l3", "brand"]


def variant(name: str, base: ModelConfig, fmt: str) -> ModelConfig:
    m = copy.deepcopy(base)
    if name == "id_only":
        # SASRec: item id + position in, item id out, no heads. Same code otherwise.
        m.event_features, m.item_features, m.heads = ["item_id", "position"], ["item_id"], []
    elif fmt in ORDER_ONLY:
        # No real times, durations, surfaces, and one event type: keep the informative features.
        m.event_features = [f for f in m.event_features if f in CONTENT_EVENT]
        m.heads = [h for h in m.heads if h != "event_type"]
    return m


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent, check=True).stdout.strip()


def git_commit() -> str:
    """HEAD, with '-dirty' when models/ has uncommitted changes (the numbers then come from the work tree)."""
    try:
        head = _git("rev-parse", "HEAD")
        return head + ("-dirty" if _git("status", "--porcelain", "--", ".") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(models: dict) -> str:
    cols = ["hr@10", "ndcg@10", "coverage@10", "entropy@50", "epochs", "train_seconds"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in models.items():
        cells = [f"{m[c]:.4f}" if isinstance(m.get(c), float) and c != "train_seconds"
                 else (f"{m[c]:.0f}" if isinstance(m.get(c), float) else str(m.get(c, "")))
                 for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--format", required=True, choices=sorted(LOADERS))
    ap.add_argument("--sequences", required=True, type=Path, help="the dataset's event file")
    ap.add_argument("--attributes", type=Path, help="item attribute file (default: the loader's sibling file)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--model", default="all", choices=["full", "id_only", "popular", "all"])
    ap.add_argument("--epochs", type=int, help="max epochs (default: train.epochs of the config)")
    ap.add_argument("--patience", type=int, help="early-stopping patience (default: train.patience)")
    ap.add_argument("--config", type=Path, help="TOML config (model and train sections are used)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a model/train setting, e.g. --set model.d_model=128 (repeatable)")
    ap.add_argument("--checkpoint-dir", type=Path, help="keep the best checkpoint of each model here")
    ap.add_argument("--reuse-checkpoints", action="store_true",
                    help="evaluate <checkpoint-dir>/<model>.pt where it exists instead of training that model")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    env = {f"USERFORMER__{k.split('=', 1)[0].replace('.', '__').upper()}": k.split("=", 1)[1] for k in args.set}
    cfg = load_config(args.config, env=env)
    mcfg, tcfg = cfg.model, cfg.train
    if args.epochs:
        tcfg.epochs = args.epochs
    if args.patience:
        tcfg.patience = args.patience

    t0 = time.perf_counter()
    events, items, _ = LOADERS[args.format](args.sequences, args.attributes)
    order_only = args.format in ORDER_ONLY
    seqs, catalog = D.from_raw(events, items, real_time=not order_only)
    if not order_only:
        raise SystemExit("only leave-one-out (order-only formats) is wired here yet; time split: issue #3, next")
    train, valid, test = D.leave_one_out(seqs)
    print(f"{args.format}: {len(seqs):,} users, {catalog.n_items:,} items, {len(events):,} events; "
          f"test users {len(test.targets):,}; loaded in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    names = ["full", "id_only", "popular"] if args.model == "all" else [args.model]
    results, configs = {}, {}
    device = pick_device(tcfg.device)
    for name in names:
        if name == "popular":
            results[name] = {**evaluate_popular(train, test, catalog), "epochs": 0, "train_seconds": 0.0}
            continue
        m = variant(name, mcfg, args.format)
        configs[name] = dataclasses.asdict(m)
        ck = args.checkpoint_dir / f"{name}.pt" if args.checkpoint_dir else None
        if ck:
            ck.parent.mkdir(parents=True, exist_ok=True)
        if args.reuse_checkpoints and ck and ck.is_file():
            # A model trained earlier (e.g. by a parallel `--model NAME` run): evaluate its best checkpoint.
            model, meta = load_checkpoint(ck, catalog)
            configs[name] = meta["model_config"]
            model.to(device)
            res = evaluate(model, test, catalog, device, tcfg)
            results[name] = {**res, "epochs": meta["epoch"], "best_epoch": meta["epoch"],
                             "best_valid_ndcg@10": meta["metrics"]["valid"]["ndcg@10"],
                             "train_seconds": meta["metrics"]["train_seconds"],
                             "seconds_per_epoch": meta["metrics"]["train_seconds"] / max(meta["epoch"], 1),
                             "parameters": model.n_parameters(), "checkpoint": str(ck),
                             "train_config": meta["train_config"], "history": meta.get("history")}
            print(f"{name} TEST (checkpoint {ck}): {json.dumps(res)}", file=sys.stderr, flush=True)
            continue
        print(f"--- {name}: {m.event_features} -> {m.item_features}, heads {m.heads}", file=sys.stderr)
        model, hist = fit(m, tcfg, train, valid, catalog, ckpt_path=ck, progress=not args.no_progress,
                          log=lambda s: print(s, file=sys.stderr, flush=True))
        res = evaluate(model, test, catalog, device, tcfg)
        results[name] = {**res, "epochs": hist["epochs"], "best_epoch": hist["best_epoch"],
                         "best_valid_ndcg@10": hist["best_valid_ndcg@10"], "train_seconds": hist["train_seconds"],
                         "seconds_per_epoch": hist["train_seconds"] / max(hist["epochs"], 1),
                         "parameters": model.n_parameters(), "history": hist["history"]}
        print(f"{name} TEST: {json.dumps(res)}", file=sys.stderr, flush=True)
    out = {
        "dataset": f"{args.format}:{args.sequences.name}",
        "protocol": ("leave-one-out (last item test, second-to-last validation for early stopping only); "
                     "full-catalogue ranking, history items not excluded; metrics on the TEST targets"),
        "commit": git_commit(),
        "config": {"model": dataclasses.asdict(mcfg), "train": dataclasses.asdict(tcfg), "variants": configs},
        "data": {"users": len(seqs), "items": catalog.n_items, "events": len(events), "test_users": len(test.targets)},
        "models": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
