"""`userformer`: one CLI for every step. Each step module registers its own subcommand.

A step module exposes ``register(subparsers)``, which adds one parser with
``set_defaults(func=run)``; ``run(args, cfg) -> int`` is the exit code. Spark,
FAISS, Great Expectations and torch are imported inside the functions that use
them, so that ``--help`` loads none of them (a test keeps it so).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from userformer.jobs.core.config import ConfigError, load_config
from userformer.jobs.core.errors import TryAgain, UserError

# Order is the order of `userformer --help`: the data's path through the pipeline.
STEP_MODULES = [
    "userformer.jobs.tools.generate",
    "userformer.jobs.tools.loaders",
    "userformer.jobs.steps.ingest",
    "userformer.jobs.steps.sequences",
    "userformer.jobs.steps.check",
    "userformer.jobs.steps.train",
    "userformer.jobs.steps.infer",
    "userformer.jobs.steps.publish",
    "userformer.jobs.steps.index",
    "userformer.jobs.steps.candidates",
    "userformer.jobs.steps.release",
    "userformer.jobs.tools.serve",
    "userformer.jobs.steps.report",
    "userformer.jobs.flows.repair",
    "userformer.jobs.tools.maintain",
    "userformer.jobs.flows.retrain",
    "userformer.jobs.flows.demo",
    "userformer.jobs.tools.orchestrator",
    "userformer.jobs.tools.connect",
    "userformer.jobs.tools.info",
    "userformer.jobs.tools.benchmark",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="userformer",
        description="Daily batch pipeline: raw behaviour logs -> Delta tables -> per-user sequences -> customer model.",
    )
    p.add_argument("--config", help="TOML config file (default: $USERFORMER_CONFIG; see infra/config/userformer.toml)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in STEP_MODULES:
        importlib.import_module(name).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Third-party loaders that log at INFO (faiss announces its CPU features on import): the answer comes first.
    for noisy in ("py4j", "great_expectations", "urllib3", "faiss", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config)
        return int(args.func(args, cfg) or 0)
    except (ConfigError, UserError, TryAgain) as exc:  # TryAgain: exit 75, rerun it later
        print(f"userformer {args.command}: error: {exc}", file=sys.stderr)
        return getattr(exc, "code", 2)


if __name__ == "__main__":
    sys.exit(main())
