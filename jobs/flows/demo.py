"""`userformer demo`: generate a week of synthetic logs and run `daily_refresh` over it through Airflow.

This is what `make demo` runs: a fresh demo home (its own, ``~/.local/share/userformer-demo`` unless
USERFORMER_HOME names one; it only ever clears a home an earlier demo made, and only inside it), 7 days of
synthetic raw drops, then a Spark Connect server (jobs/tools/connect.py: one Spark driver that every Spark task
of the DAG uses, instead of a JVM of its own each) and Airflow standalone on 127.0.0.1 (jobs/tools/orchestrator.py),
both stopped by PID at the end, and one backfill of the
`daily_refresh` DAG over those dates (``POST /api/v2/backfills``; the runs go in date order), and a summary: rows
per table, users refreshed per day, model versions, evaluation metrics, index recall, where everything is and a
query to try. ``--no-airflow`` runs the same steps in this process instead (`pipeline.run_day`, as
`userformer run-day`). Without ``--config`` / ``$USERFORMER_CONFIG`` the demo's sizes come from
``infra/config/demo.toml`` (short training), which Airflow's tasks get through ``USERFORMER_CONFIG`` as well.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from userformer.jobs.core import ledger, registry
from userformer.jobs.core.config import DEFAULT_HOME, Config, load_config
from userformer.jobs.core.dates import date_arg, date_range
from userformer.jobs.core.errors import UserError
from userformer.jobs.core.storage import delta, files
from userformer.jobs.flows import pipeline
from userformer.jobs.tools import connect, generate, info, orchestrator

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "infra" / "config" / "demo.toml"


def register(sub) -> None:
    p = sub.add_parser("demo", help="generate synthetic logs and run the pipeline over them (what `make demo` runs)")
    p.add_argument("--days", type=int, default=7, help="days of logs (default 7)")
    p.add_argument("--users", type=int, default=2000, help="users (default 2000)")
    p.add_argument("--items", type=int, default=3000, help="items (default 3000)")
    p.add_argument("--start", type=date_arg, default=dt.date(2026, 11, 1), help="first day (default 2026-11-01)")
    p.add_argument("--seed", type=int, default=7, help="generator seed (default 7)")
    p.add_argument(
        "--no-airflow", action="store_true", help="run the days in this process (`run-day`) instead of through Airflow"
    )
    p.add_argument("--port", type=int, help="Airflow's API/UI port on 127.0.0.1 (default: a free one)")
    p.add_argument(
        "--keep-airflow",
        action="store_true",
        help="leave Airflow running after the summary (Ctrl-C stops it), to look at the runs in the UI",
    )
    p.set_defaults(func=run)
    p = sub.add_parser(
        "run-day", help="run the whole pipeline for one drop date (or a range, in order), without Airflow"
    )
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
# Without USERFORMER_HOME or paths.home the demo has its own home, never the production default (config.DEFAULT_HOME).
DEMO_HOME = "~/.local/share/userformer-demo"


def _demo_dirs(cfg: Config) -> dict[str, Path]:
    return {
        "raw": cfg.raw_root,
        "warehouse": cfg.warehouse_root,
        "reports": cfg.reports_root,
        "models": cfg.models_root,
        "index": cfg.index_root,
        "airflow": orchestrator.airflow_home(cfg),
    }


def _fresh_demo_home(cfg: Config) -> None:
    """The demo starts from nothing each time, and only ever deletes inside a home it made.

    Its marker (``<home>/.userformer-demo``, JSON) records the absolute home it was made for; a marker of another
    folder (a copied or moved home) or of an older format is not trusted. Every folder it would clear must lie inside
    the home (a ``paths.*`` pointing elsewhere, or at object storage, is refused), and a home holding pipeline data
    without a marker is refused."""
    home = cfg.home.resolve()
    dirs = _demo_dirs(cfg)
    outside = {
        k: str(d)
        for k, d in dirs.items()
        if files.is_remote(d) or not Path(d).resolve().is_relative_to(home) or Path(d).resolve() == home
    }
    if outside:
        raise UserError(
            f"the demo only clears folders inside its home {home}: "
            + ", ".join(f"{k} is {v}" for k, v in outside.items())
            + "; unset those paths.* settings for the demo, or give it a home of its own (USERFORMER_HOME)"
        )
    marker = home / DEMO_MARKER
    holds_data = any(Path(d).exists() and any(Path(d).iterdir()) for d in dirs.values())
    if marker.exists():
        try:
            made_for = json.loads(marker.read_text()).get("home")
        except (ValueError, AttributeError):
            made_for = None
        if made_for != str(home):
            raise UserError(
                f"{marker} was not made by a demo for this folder (it names {made_for or 'no home'}); the demo "
                f"clears only a home it made: remove {home} yourself or point USERFORMER_HOME at an empty folder"
            )
    elif holds_data:
        raise UserError(
            f"{home} already holds pipeline data that no demo made; point USERFORMER_HOME at an empty folder "
            "for the demo"
        )
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)
    home.mkdir(parents=True, exist_ok=True)
    files.write_json(
        marker,
        {
            "home": str(home),
            "made_by": "userformer demo: the next demo may clear this home's pipeline folders",
            "folders": {k: str(Path(d).resolve()) for k, d in dirs.items()},
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
    )


def demo_config(args, cfg: Config) -> Config:
    """The demo's configuration: --config / $USERFORMER_CONFIG when given, else infra/config/demo.toml; exported as
    USERFORMER_CONFIG so that Airflow's tasks read the same file. Without a home of its own (USERFORMER_HOME or
    paths.home) the demo runs in DEMO_HOME, exported as USERFORMER_HOME."""
    if args.config or os.environ.get("USERFORMER_CONFIG"):
        path = Path(args.config or os.environ["USERFORMER_CONFIG"]).resolve()
        os.environ["USERFORMER_CONFIG"] = str(path)
    elif DEMO_CONFIG.is_file():
        os.environ["USERFORMER_CONFIG"] = str(DEMO_CONFIG)
        cfg = load_config(DEMO_CONFIG)
    if not os.environ.get("USERFORMER_HOME") and cfg.paths.home == DEFAULT_HOME:
        os.environ["USERFORMER_HOME"] = str(Path(DEMO_HOME).expanduser())
        cfg = load_config()
    return cfg


def day_line(cfg: Config, day: dt.date, seconds: float | None = None) -> str:
    """One line per finished day, from its ledger."""
    led = ledger.read_ledger(cfg, day)

    def res(step):
        return (led.get(step) or {}).get("result") or {}

    ing, seq, ft, gt = res("ingest"), res("sequences"), res("finetune"), res("gate")
    embedded = sum(res(k).get("users") or 0 for k in led if k.startswith("infer-"))
    checks = [k for k in led if k.startswith("check_")]
    ok = all(res(k).get("success", True) and not res(k).get("problems") for k in checks)
    if ft.get("action") == "bootstrap":
        model = f"first model {ft.get('version')}"
    elif ft.get("candidate"):
        model = f"{ft['candidate']} {gt.get('status', '?')}"
    else:
        model = "no model yet" if not gt.get("published") else f"kept {gt.get('published')}"
    took = f"  {seconds:.0f}s" if seconds is not None else ""
    return (
        f"{day}: raw {ing.get('raw_rows', 0):>7}  accepted {ing.get('accepted', 0):>7}  "
        f"rejected {sum((ing.get('rejected') or {}).values()):>5}  users refreshed {seq.get('active_users', 0):>6} "
        f"(new {seq.get('new_users', 0)})  embedded {embedded:>6}  checks {'ok' if ok else 'FAILED'}  "
        f"model: {model}{took}"
    )


def _metrics(m: dict, keys=("ndcg@10", "recall@10")) -> str:
    return ", ".join(f"{k} {m[k]:.4f}" for k in keys if isinstance(m.get(k), (int, float)))


def print_summary(cfg: Config, days: list[dt.date]) -> None:
    """Rows per table, users refreshed per day, model versions, evaluation metrics, index recall, where things are."""
    print(
        "\nusers per day (refreshed = with new events; embedded = user embeddings written, everyone after a "
        "model change):"
    )
    print(
        f"  {'dt':<12}{'refreshed':>10}{'new':>7}{'embedded':>10}  {'model published after the day':<31}"
        f"{'index recall@10':>16}"
    )
    for day in days:
        led = ledger.read_ledger(cfg, day)

        def res(step, led=led):
            return (led.get(step) or {}).get("result") or {}

        seq, gt, ci = res("sequences"), res("gate"), res("check_index")
        embedded = sum(res(k).get("users") or 0 for k in led if k.startswith("infer-"))
        rc = ci.get("recall_at_10")
        print(
            f"  {str(day):<12}{seq.get('active_users', 0):>10}{seq.get('new_users', 0):>7}{embedded:>10}  "
            f"{str(gt.get('published') or '-'):<31}{(f'{rc:.3f}' if isinstance(rc, float) else '-'):>16}"
        )

    print(
        "\nmodel versions (jobs/core/registry.py; the gate compares a candidate with the published model on "
        "held-out users of its day):"
    )
    ptr = registry.published(cfg)
    for man in registry.list_versions(cfg):
        m = man.get("metrics") or {}
        if man.get("kind") == "finetune":
            g = m.get("gate") or {}
            what = f"candidate {_metrics(g.get('candidate') or {})} vs published {_metrics(g.get('published') or {})}"
        else:
            popular = _metrics(m.get("valid_most_popular") or {})
            what = f"validation {_metrics(m.get('valid') or {})}; most popular {popular}"
        star = " (published)" if ptr and ptr["version"] == man["version"] else ""
        print(f"  {man['version']:<26}{man.get('status', ''):<10} {what}{star}")

    print()
    info.print_tables(cfg)
    last = days[-1]
    rep = (ledger.read_ledger(cfg, last).get("report") or {}).get("result") or {}
    print(f"\nwhere things are (USERFORMER_HOME={cfg.home}):")
    print(f"  Delta tables        {cfg.warehouse_root}/<table>")
    print(f"  item index          {cfg.index_root} (CURRENT points at the live version)")
    print(f"  models              {cfg.models_root} (PUBLISHED points at the served version)")
    print(f"  published snapshot  {cfg.warehouse_root / '_published' / 'snapshot.json'} (what readers read)")
    print(f"  checks' reports     {cfg.reports_root / 'checks'}")
    print(f"  day ledgers         {cfg.reports_root / 'runs'}")
    if rep.get("html"):
        print(f"  daily report        file://{rep['html']}")
    # Commands a newcomer pastes into a new shell: they name the demo's home and configuration themselves.
    env = f"USERFORMER_HOME={shlex.quote(str(cfg.home))}"
    if os.environ.get("USERFORMER_CONFIG"):
        env += f" USERFORMER_CONFIG={shlex.quote(os.environ['USERFORMER_CONFIG'])}"
    print("query a table, e.g. with Polars (or DuckDB/pandas/Spark: see docs/tables.md):")
    print(
        f"  {sys.executable} -c \"import polars as pl; print(pl.read_delta('{cfg.table_path('user_sequences')}')"
        ".sort('lifetime_events', descending=True).select('user_id', 'seq_len', 'lifetime_events').head())\""
    )
    user = _some_user(cfg)
    if user:
        print("a user's recommendations from the published snapshot's index:")
        print(f"  {env} {Path(sys.executable).parent / 'userformer'} recommend --user {user} -k 10")


def _some_user(cfg: Config) -> str | None:
    """The published user with the longest history (for the example command)."""
    path = cfg.table_path("user_sequences")
    if not delta.exists(path) or not delta.exists(cfg.table_path("user_embeddings")):
        return None
    t = delta.read_arrow(path, columns=["user_id", "lifetime_events"])
    if not t.num_rows:
        return None
    counts = t["lifetime_events"].to_pylist()
    return str(t["user_id"][counts.index(max(counts))].as_py())


def _run_in_process(cfg: Config, days: list[dt.date]) -> None:
    for day in days:
        r = pipeline.run_day(cfg, day)
        print(day_line(cfg, day, r["seconds"]), flush=True)


def _run_through_airflow(args, cfg: Config, days: list[dt.date]) -> None:
    t0 = time.perf_counter()
    # One Spark driver for every task (a Spark Connect server), instead of a JVM started by each Spark task.
    with connect.serving(cfg, log=lambda line: print(line, flush=True)) as task_env:
        _airflow_backfill(args, cfg, days, task_env, t0)


def _airflow_backfill(args, cfg: Config, days: list[dt.date], task_env: dict, t0: float) -> None:
    af = orchestrator.start(cfg, args.port or orchestrator.free_port(), scheduled_runs=False, env=task_env)
    login = f"login {af.username}, password in {af.home / orchestrator.PASSWORDS_FILE}"
    print(
        f"Airflow {af.url} ({login}; pid {af.pid}) ready in "
        f"{time.perf_counter() - t0:.0f}s; backfill of daily_refresh {days[0]} .. {days[-1]}",
        flush=True,
    )
    started: dict[str, float] = {}
    try:

        def progress(run):
            day = dt.date.fromisoformat(run["logical_date"][:10])
            if run["state"] == "running":
                started[str(day)] = time.perf_counter()
            elif run["state"] == "success":
                took = time.perf_counter() - started.get(str(day), time.perf_counter())
                print(day_line(cfg, day, took), flush=True)
            elif run["state"] == "failed":
                bad = af.failed_tasks("daily_refresh", run["dag_run_id"])
                print(
                    f"{day}: run {run['dag_run_id']} FAILED at "
                    + ", ".join(f"{t['task_id']} ({t['state']})" for t in bad),
                    flush=True,
                )
                for t in bad:
                    for p in af.task_log_path("daily_refresh", run["dag_run_id"], t["task_id"]):
                        print(f"  log: {p}", flush=True)

        states = orchestrator.run_backfill(
            af, "daily_refresh", days[0], days[-1], reprocess="completed", progress=progress
        )
        failed = [d for d, s in states.items() if s != "success"]
        if failed:
            raise UserError(f"daily_refresh failed for {', '.join(failed)}: see the logs above or {af.url}", code=1)
        if args.keep_airflow:
            print(
                f"\nAirflow keeps running at {af.url} ({login}); Ctrl-C stops it.",
                flush=True,
            )
            print_summary(cfg, days)
            try:
                while af.alive():
                    time.sleep(1.0)
            except KeyboardInterrupt:
                pass
    finally:
        af.stop()


def run(args, cfg: Config) -> int:
    if not args.verbose:  # the per-day lines below are the demo's output; step logs only with -v
        logging.getLogger("userformer").setLevel(logging.WARNING)
    cfg = demo_config(args, cfg)
    _fresh_demo_home(cfg)
    print(f"USERFORMER_HOME={cfg.home}  config {os.environ.get('USERFORMER_CONFIG', '(defaults)')}")
    t0 = time.perf_counter()
    s = generate.generate(cfg, users=args.users, items=args.items, days=args.days, start=args.start, seed=args.seed)
    print(
        f"generated {s['days']} days of raw logs under {cfg.raw_root}: {s['events_total']} rows "
        f"({s['late']} late, {s['duplicates']} duplicates, {s['malformed']} malformed), "
        f"{s['users']} users, {s['items']} items",
        flush=True,
    )
    days = date_range(args.start, args.days)
    if args.no_airflow:
        _run_in_process(cfg, days)
    else:
        _run_through_airflow(args, cfg, days)
    if not (args.keep_airflow and not args.no_airflow):
        print_summary(cfg, days)
    print(f"demo finished in {time.perf_counter() - t0:.0f}s")
    return 0
