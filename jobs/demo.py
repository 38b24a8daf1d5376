"""`userformer demo`: generate a week of synthetic logs and run the pipeline over it, day by day.

This is what `make demo` runs. It runs every step that exists, in order, for
each day: ingest -> check events -> sequences -> check user_sequences, and
prints a summary. (The model, inference and Airflow steps join as they land.)
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import time

from userformer.jobs.common import UserError, date_arg, date_range
from userformer.jobs import pipeline
from userformer.jobs.config import Config


def register(sub) -> None:
    p = sub.add_parser("demo", help="generate synthetic logs and run the pipeline over them (what `make demo` runs)")
    p.add_argument("--days", type=int, default=7, help="days of logs (default 7)")
    p.add_argument("--users", type=int, default=2000, help="users (default 2000)")
    p.add_argument("--items", type=int, default=3000, help="items (default 3000)")
    p.add_argument("--start", type=date_arg, default=dt.date(2026, 11, 1), help="first day (default 2026-11-01)")
    p.add_argument("--seed", type=int, default=7, help="generator seed (default 7)")
    p.set_defaults(func=run)
    p = sub.add_parser("run-day", help="run the whole pipeline for one drop date (or a range, in order), without Airflow")
    p.add_argument("--dt", type=date_arg, required=True, help="drop date YYYY-MM-DD")
    p.add_argument("--to", type=date_arg, help="last drop date of a range run day by day in order (default: --dt only)")
    p.add_argument("--skip-finetune", action="store_true", help="keep the published model (no fine-tuning, no gate)")
    p.add_argument("--full-reembed", action="store_true", help="re-embed every user, not only the day's")
    p.set_defaults(func=run_days)


def run_days(args, cfg: Config) -> int:
    last = args.to or args.dt
    if last < args.dt:
        raise UserError(f"--to {last} is before --dt {args.dt}")
    for day in date_range(args.dt, (last - args.dt).days + 1):
        res = pipeline.run_day(cfg, day, skip_finetune=args.skip_finetune, full_reembed=args.full_reembed)
        print(json.dumps(res, indent=2, default=str), flush=True)
    return 0


DEMO_MARKER = ".userformer-demo"


def _fresh_demo_home(cfg: Config) -> None:
    """The demo starts from nothing each time; it only ever wipes a home that an earlier demo made."""
    import shutil

    marker = cfg.home / DEMO_MARKER
    dirs = [cfg.raw_root, cfg.warehouse_root, cfg.reports_root, cfg.models_root, cfg.index_root]
    if any(d.exists() and any(d.iterdir()) for d in dirs) and not marker.exists():
        raise UserError(f"{cfg.home} already holds pipeline data that no demo made; "
                        "point USERFORMER_HOME at an empty folder for the demo")
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    cfg.home.mkdir(parents=True, exist_ok=True)
    marker.write_text("made by `userformer demo`; the next demo may wipe this folder's pipeline data\n")


def run(args, cfg: Config) -> int:
    from userformer.jobs import generate, info

    if not args.verbose:  # the per-day lines below are the demo's output; step logs only with -v
        logging.getLogger("userformer").setLevel(logging.WARNING)
    _fresh_demo_home(cfg)
    print(f"USERFORMER_HOME={cfg.home}")
    t0 = time.perf_counter()
    s = generate.generate(cfg, users=args.users, items=args.items, days=args.days, start=args.start, seed=args.seed)
    print(f"generated {s['days']} days of raw logs under {cfg.raw_root}: {s['events_total']} rows "
          f"({s['late']} late, {s['duplicates']} duplicates, {s['malformed']} malformed), "
          f"{s['users']} users, {s['items']} items")
    days = []
    for day in date_range(args.start, args.days):
        r = pipeline.run_day(cfg, day)
        ing, seq = r["ingest"], r["sequences"]
        print(f"{day}: raw {ing['raw_rows']:>7}  accepted {ing['accepted']:>7}  rejected {sum(ing['rejected'].values()):>5}"
              f"  users refreshed {seq['active_users']:>6} (new {seq['new_users']})  checks ok  {r['seconds']}s")
        days.append(r)
    print()
    info.print_tables(cfg)
    print(f"\nchecks' HTML reports: {cfg.reports_root / 'checks'}")
    print("query a table, e.g. with Polars (or DuckDB/pandas/Spark: see the README):")
    print(f"  {sys.executable} -c \"import polars as pl; print(pl.read_delta('{cfg.table_path('user_sequences')}')"
          ".sort('lifetime_events', descending=True).select('user_id', 'seq_len', 'lifetime_events').head())\"")
    print(f"demo finished in {time.perf_counter() - t0:.0f}s")
    return 0
