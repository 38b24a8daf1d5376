"""`userformer benchmark quality`: full model vs id-only SASRec vs most-popular, same data, split and harness.

    userformer benchmark quality --format s3rec \\
        --sequences ../shared/data/s3rec_beauty/Beauty.txt \\
        --attributes ../shared/data/s3rec_beauty/Beauty_item2attributes.json --out results.json

    userformer benchmark quality --format movielens --sequences ../shared/data/ml-100k/ml-100k.inter --out ml.json

(also ``python -m userformer.jobs.tools.benchmark ...``). The harness is
jobs/tools/quality_benchmark.py; this module holds the options only.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from userformer.jobs.core.config import Config
from userformer.jobs.tools.loaders import LOADERS


def add_quality_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of `benchmark quality` (also `python -m userformer.jobs.tools.benchmark`)."""
    ap.add_argument("--format", required=True, choices=sorted(LOADERS))
    ap.add_argument("--sequences", required=True, type=Path, help="the dataset's event file")
    ap.add_argument("--attributes", type=Path, help="item attribute file (default: the loader's sibling file)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--model", default="all", choices=["full", "id_only", "popular", "all"])
    ap.add_argument("--epochs", type=int, help="max epochs (default: train.epochs of the config)")
    ap.add_argument("--patience", type=int, help="early-stopping patience (default: train.patience)")
    ap.add_argument(
        "--valid-quantile",
        type=float,
        default=0.8,
        help="time split: validation starts at this quantile of event times (default 0.8)",
    )
    ap.add_argument(
        "--test-quantile",
        type=float,
        default=0.9,
        help="time split: test starts at this quantile of event times (default 0.9)",
    )
    ap.add_argument(
        "--horizon-days",
        type=float,
        default=28.0,
        help="time split: positives are the items of the next N days after the test time (default 28)",
    )
    ap.add_argument(
        "--history",
        choices=["exclude", "keep"],
        default="exclude",
        help="exclude the user's history items from the ranking (default; the protocol of the published "
        "Beauty numbers) or keep them; the test metrics of the other choice are reported too",
    )
    ap.add_argument(
        "--seeds",
        type=lambda v: [int(x) for x in v.split(",")],
        metavar="S1,S2,...",
        help="train every model once per seed and report the mean (std and each run beside it); default: train.seed",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a model/train setting, e.g. --set model.d_model=128 (repeatable)",
    )
    ap.add_argument("--checkpoint-dir", type=Path, help="keep the best checkpoint of each model here")
    ap.add_argument(
        "--reuse-checkpoints",
        action="store_true",
        help="evaluate <checkpoint-dir>/<model>.pt where it exists instead of training that model",
    )
    ap.add_argument("--no-progress", action="store_true")


def register(sub) -> None:
    p = sub.add_parser("benchmark", help="reproducible benchmarks: `benchmark quality` (full vs id-only vs popular)")
    kinds = p.add_subparsers(dest="benchmark", metavar="KIND", required=True)
    q = kinds.add_parser(
        "quality",
        help="train + evaluate full, id-only and most-popular on a dataset file; "
        "write JSON (metrics, config, commit) and print a table",
    )
    add_quality_arguments(q)
    q.set_defaults(func=run_cli)


def run_cli(args, cfg: Config) -> int:
    return _run(args, args.config)


def _run(args, config_path) -> int:
    # Imported when a benchmark runs: the harness loads torch, which `userformer --help` does not need.
    from userformer.jobs.tools.quality_benchmark import run

    return run(args, config_path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, help="TOML config (model and train sections are used)")
    add_quality_arguments(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return _run(args, args.config)


if __name__ == "__main__":
    sys.exit(main())
