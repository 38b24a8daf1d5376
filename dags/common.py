"""What every DAG of this folder shares: configuration, retry policy, the drop date, failures that must not retry.

The DAG files only wire: every task calls one step of `userformer.jobs` (jobs/flows/pipeline.py) that also runs from the
CLI. This module is the glue they share; `daily_refresh.py`, `retrain.py` and `repair.py` import it as
``from common import ...`` (Airflow puts the dags folder on ``sys.path``).

Configuration reaches a task process through its environment, the same way as the CLI's (jobs/core/config.py
`load_config`): ``USERFORMER_HOME``, ``USERFORMER_CONFIG`` and ``USERFORMER__SECTION__KEY``. The Airflow started by
``userformer airflow start`` / ``make airflow`` (jobs/tools/orchestrator.py) passes the environment it was started with
to the scheduler, hence to every task.

Helpers:

- `config()`: the pipeline configuration from the environment.
- `default_args(cfg)`: ``retries = pipeline.retries`` with exponential backoff from ``pipeline.retry_delay_s``
  (capped at 32x) for transient errors.
- `no_retry_on_bad_data(fn)` / `step(...)`: a task body that raises `UserError` (bad input) or `GateFailed` (a
  data-quality gate) fails at once with `AirflowFailException` (no retries: rerunning cannot fix the data); any
  other exception is transient and retried (`ConcurrentWrite` too: another writer committed first, and the retry
  reads the tables afresh). `step(...)` = ``@task(...)`` + that translation; the function's
  docstring becomes the task's doc (``doc_md``, shown in the UI's task details).
- `writes(...)`: a `step` in the writers' pool of one slot (every task that changes the warehouse).
- `RELEASED`: the assets a release updates (``userformer://user_embeddings``, ...): a downstream DAG scheduled on
  them runs once readers see a new day.
- `drop_date(context)` / `drop_date_of(ds)`: the drop date D a run processes (see `drop_date`).
- `run_context()`: inside a task, ``(cfg, D, params)`` of the running task.
- `plain(obj)`: a step result as plain JSON (what goes to XCom: small dicts, no numpy or paths).
- `QUALITY_TASK_RETRIES`: retries of tasks that only judge data (0).
"""

from __future__ import annotations

import datetime as dt
import functools
import json

from airflow.sdk import Asset, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from userformer.jobs.core.config import Config, load_config
from userformer.jobs.core.errors import GateFailed, UserError

# Tasks that only judge data (the checks) are not retried at all: their failure is a verdict on committed tables.
QUALITY_TASK_RETRIES = 0
# Exponential backoff (Airflow 3.3: a multiplier): retry_delay_s, then x2, x4, ... at most 32 x retry_delay_s.
BACKOFF_MULTIPLIER = 2.0
MAX_BACKOFF_FACTOR = 32
# Every DAG of the project carries this tag (the UI's filter).
TAG = "userformer"
# What a release (jobs/steps/release.py) makes visible: one asset per published output and the item index. The task
# that runs it lists them as outlets, so each successful release is an asset event for downstream DAGs.
RELEASED = [
    Asset(uri=f"userformer://{name}", name=name)
    for name in ("user_embeddings", "user_preference_scores", "item_embeddings", "user_candidates", "item_index")
]


def config() -> Config:
    """The configuration from this process's environment (as the CLI resolves it; read on every call)."""
    return load_config()


def default_args(cfg: Config) -> dict:
    """Retries with exponential backoff on transient errors; owner; no e-mails."""
    delay = dt.timedelta(seconds=cfg.pipeline.retry_delay_s)
    return {
        "owner": "userformer",
        "retries": cfg.pipeline.retries,
        "retry_delay": delay,
        "retry_exponential_backoff": BACKOFF_MULTIPLIER,
        "max_retry_delay": delay * MAX_BACKOFF_FACTOR,
        "email_on_failure": False,
        "email_on_retry": False,
    }


def no_retry_on_bad_data(fn):
    """Wrap a task body: `UserError` / `GateFailed` -> `AirflowFailException` (fail now, no retry)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GateFailed as exc:
            raise AirflowFailException(f"data-quality gate failed (not retried): {exc}") from exc
        except UserError as exc:
            raise AirflowFailException(f"bad input (not retried): {exc}") from exc
        # TryAgain (another writer was in the way: the lease, or a commit refused) is not caught: retried.

    return run


def step(fn=None, **task_kwargs):
    """``@step`` / ``@step(retries=0, pool=...)``: a TaskFlow task whose bad-data failures are not retried.

    Any keyword goes to ``@task`` (task_id, retries, pool, depends_on_past, ...). The docstring is the task's doc.
    """

    def wrap(f):
        return task(**task_kwargs)(no_retry_on_bad_data(f))

    return wrap(fn) if fn is not None else wrap


def writes(fn=None, **task_kwargs):
    """``@writes`` / ``@writes(depends_on_past=True)``: a `step` that writes the warehouse. It runs in the writers'
    pool of one slot (``pipeline.writers_pool``), shared by every DAG: the writing tasks of overlapping runs (a
    backfill beside the schedule, a repair) queue there instead of waiting on the warehouse lease."""
    return step(fn, pool=config().pipeline.writers_pool, **task_kwargs)


def announce(result: dict) -> dict:
    """Inside a release task: put the release's drop date and whether it changed the snapshot on the asset events
    the task emits (what a downstream DAG reads from ``triggering_asset_events``). Returns `result`."""
    events = get_current_context().get("outlet_events")
    if events is not None:
        extra = {"dt": result.get("dt"), "changed": bool(result.get("changed")), "skipped": result.get("skipped")}
        for asset in RELEASED:
            events[asset].extra = extra
    return result


def drop_date_of(ds: str | None) -> dt.date:
    if not ds:
        raise UserError("this run has no logical date: trigger it with one (the drop date D it processes)")
    return dt.date.fromisoformat(str(ds)[:10])


def drop_date(context) -> dt.date:
    """The drop date D of a run: its logical date (UTC), i.e. ``{{ ds }}``.

    The DAGs use `CronDataIntervalTimetable("@daily")`: the run for D covers the interval [D, D+1) and starts at
    00:00 UTC of D+1, once D's drop is complete; its logical date is the interval start, D. (Airflow 3's default
    for a cron string is `CronTriggerTimetable`, whose logical date is the moment the run is scheduled; with it a
    run for D would start at 00:00 of D, before D's drop exists.) A backfill from A to B creates one run per
    logical date A..B inclusive, so it processes drops A..B. A manual trigger processes the drop of the logical date
    it is given (Airflow then infers the interval that ends at it, so the interval start is not D; the logical
    date is what every kind of run agrees on).
    """
    ld = context.get("logical_date") or context.get("data_interval_start")
    if ld is None:
        return drop_date_of(None)
    return (
        dt.date(ld.year, ld.month, ld.day)
        if ld.tzinfo is None
        else dt.datetime.fromtimestamp(ld.timestamp(), dt.UTC).date()
    )


def run_context() -> tuple[Config, dt.date, dict]:
    """Inside a running task: the configuration, the run's drop date D and the run's (validated) params."""
    ctx = get_current_context()
    return config(), drop_date(ctx), dict(ctx.get("params") or {})


def plain(obj):
    """A JSON-plain copy of a step's result (XCom stays small and portable)."""
    return json.loads(json.dumps(obj, default=str))
