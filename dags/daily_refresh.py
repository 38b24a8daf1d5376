"""### daily_refresh: one drop date D, end to end

One run per logical date; the run for D processes **drop D** (the raw folder ``raw/events/dt=D``), never "the
latest data": ``@daily`` as a data-interval timetable, so the run for D starts at 00:00 UTC of D+1 and its logical
date (``{{ ds }}``) is D (dags/common.py `drop_date`). Each task calls one step of `jobs/flows/pipeline.py`, the same
function `userformer run-day --dt D` calls, so a day runs identically without Airflow.

wait for raw[D] -> wait for the previous day -> ingest (gate: events) -> sequences (gate: user_sequences)
-> fine-tune -> gate -> infer (one task per shard, pool `gpu`) -> check outputs -> publish -> index -> check index
-> candidates -> release -> report

Readers see nothing of D until ``release``: it flips the published snapshot to D (every output, the index and the
model of D at once) and updates the assets ``userformer://user_embeddings`` ... (`common.RELEASED`).

* **Idempotent**: every step replaces D's outputs; a rerun (clear) of a run or a task duplicates nothing.
* **In date order**: vocabulary ids, sequences and the model carry state from day to day, so the run for D starts
  its first step only once the run of the previous logical date succeeded, whatever started either of them (the
  schedule, a backfill, a manual trigger): ``wait_for_previous_day``. Airflow's ``max_active_runs`` does not cover
  this, as a backfill's runs are counted apart from the scheduled ones. Backfills are explicit (no catchup): from
  the UI's Backfill dialog or ``POST /api/v2/backfills`` (reprocess behaviour "failed" or "completed").
* **Write, audit, publish**: ingest and sequences run their data-quality gate on the rows they are about to commit
  and commit nothing when it fails; readers see D only after ``release``.
* **Retries**: transient errors retry with exponential backoff (``pipeline.retries``, ``pipeline.retry_delay_s``);
  a failed data-quality gate or bad input fails at once (no retry), and nothing downstream is published.
* **Params**: ``skip_finetune`` keeps the published model; ``full_reembed`` re-embeds every user (booleans,
  validated at trigger time).
"""

from __future__ import annotations

import datetime as dt
import logging

from airflow.sdk import CronDataIntervalTimetable, Param, dag, get_current_context, task
from common import (
    QUALITY_TASK_RETRIES,
    RELEASED,
    TAG,
    announce,
    config,
    default_args,
    no_retry_on_bad_data,
    plain,
    run_context,
    step,
    writes,
)

from userformer.jobs.core import ledger

# The tasks import the pipeline (jobs/flows/pipeline.py) inside their bodies: Airflow parses this file often (the DAG
# processor, and each task's process once more), and importing it here would add delta-rs, Arrow and numpy to every
# parse (about ten times this file's own import time); each task then loads only what its step needs.

log = logging.getLogger("userformer.dags.daily_refresh")
CFG = config()
SHARDS = list(range(CFG.infer.shards))


@task.sensor(
    mode="reschedule", poke_interval=CFG.pipeline.sensor_poke_s, timeout=CFG.pipeline.sensor_timeout_s, retries=0
)
@no_retry_on_bad_data
def wait_for_raw() -> bool:
    """Wait for drop D: its folder ``raw/events/dt=D`` holds the producer's ready marker (``pipeline.ready_marker``).

    Reschedule mode (no worker slot is held between pokes, every ``pipeline.sensor_poke_s``); fails after
    ``pipeline.sensor_timeout_s``."""
    from userformer.jobs.flows import pipeline

    cfg, day, _ = run_context()
    ready = pipeline.raw_ready(cfg, day)
    log.info("raw drop %s at %s: %s", day, cfg.raw_events_dir(day), "ready" if ready else "not ready yet")
    return ready


@task.sensor(
    mode="reschedule", poke_interval=CFG.pipeline.sensor_poke_s, timeout=CFG.pipeline.sensor_timeout_s, retries=0
)
def wait_for_previous_day() -> bool:
    """Wait until the run of the previous logical date has succeeded (any run type), or there is none: days are
    processed in date order. A failed previous run keeps this one waiting until it is cleared and succeeds (or
    this sensor times out after ``pipeline.sensor_timeout_s``)."""
    prev = get_current_context()["ti"].get_previous_dagrun()
    if prev is None:
        log.info("no run before this one: nothing to wait for")
        return True
    log.info("previous run %s (%s, %s): %s", prev.run_id, prev.logical_date, prev.run_type, prev.state)
    return getattr(prev.state, "value", prev.state) == "success"


@writes
def ingest() -> dict:
    """Raw drop D -> ``events[dt=D]`` + ``events_rejected[dt=D]``, ``items``, ``vocab`` (Spark; one commit per
    table), once the events gate (Great Expectations; HTML report under ``reports/checks/events``) passed on the
    staged rows. A failed gate commits nothing and fails the task without retry."""
    from userformer.jobs.flows import pipeline

    cfg, day, _ = run_context()
    return plain(pipeline.ingest(cfg, day))


@writes
def sequences(ingested: dict) -> dict:
    """``events[dt=D]`` -> ``user_sequences``: the rows of the users active on D (one commit), once the
    user_sequences gate passed on them. A failed gate commits nothing and fails the task without retry."""
    from userformer.jobs.flows import pipeline

    cfg, day, _ = run_context()
    return plain(pipeline.sequences(cfg, day))


@writes
def finetune(updated: dict) -> dict:
    """Fine-tune the published model on D's users (+ replay) into a candidate; with nothing published, train the
    first model. Skipped with the param ``skip_finetune``."""
    from userformer.jobs.flows import pipeline

    cfg, day, params = run_context()
    res = pipeline.finetune(cfg, day, skip=bool(params.get("skip_finetune")))
    return plain({k: res.get(k) for k in ("action", "candidate", "version", "status", "reason", "skipped")})


@writes
def gate(tuned: dict) -> dict:
    """Promote the day's candidate iff it holds up against the published model on held-out users of D
    (``finetune.gate_metrics``, ``finetune.max_quality_drop``). A rejected candidate is not an error."""
    from userformer.jobs.flows import pipeline

    cfg, day, _ = run_context()
    res = pipeline.gate(cfg, day, tuned.get("candidate"))
    return plain({k: res.get(k) for k in ("version", "status", "promoted", "published", "reason", "skipped")})


@step
def infer(shard: int, gated: dict) -> dict:
    """Embeddings + preference scores of one shard of D's changed users (every user after a model change, or
    with the param ``full_reembed``), staged for publishing. Runs in the ``gpu`` pool (``pipeline.gpu_pool``)."""
    from userformer.jobs.flows import pipeline

    cfg, day, params = run_context()
    res = pipeline.infer(cfg, day, shard, len(SHARDS), full=bool(params.get("full_reembed")))
    return plain({k: res.get(k) for k in ("shard", "shards", "users", "model_version", "reason", "skipped")})


@step(retries=QUALITY_TASK_RETRIES)
def check_outputs(inferred: list) -> dict:
    """Output checks of D's staged inference: every shard staged, unit norms, sane preference scores. Fails
    without retry; nothing is published then."""
    from userformer.jobs.flows import pipeline

    cfg, day, _ = run_context()
    return plain(pipeline.check_outputs(cfg, day, len(SHARDS)))


@writes
def publish(checked: dict) -> dict:
    """One Delta commit per output table: ``user_embeddings``, ``user_preference_scores``, ``item_embeddings``
    (checks again first; a rerun completes a crashed publish)."""
    from userformer.jobs.flows import pipeline

    cfg, day, _ = run_context()
    return plain(pipeline.publish(cfg, day, len(SHARDS)))


@writes
def index(published: dict) -> dict:
    """FAISS index of ``item_embeddings``, switched to (``index/CURRENT``) only if its recall check passes."""
    from userformer.jobs.flows import pipeline

    cfg, day, _ = run_context()
    return plain(pipeline.index(cfg, day))


@step(retries=QUALITY_TASK_RETRIES)
def check_index(built: dict) -> dict:
    """What downstream readers get: the CURRENT index is of the published item vectors, complete, recall@10
    above ``index.min_recall_at_10``. Fails without retry."""
    from userformer.jobs.flows import pipeline

    cfg, day, _ = run_context()
    return plain(pipeline.check_index(cfg, day))


@writes
def candidates(checked: dict) -> dict:
    """``user_candidates``: top-N items from the current index for every user refreshed on D."""
    from userformer.jobs.flows import pipeline

    cfg, day, _ = run_context()
    return plain(pipeline.candidates(cfg, day))


@writes(outlets=RELEASED)
def release(done: dict) -> dict:
    """Flip the published snapshot to D: readers (the Python API, the CLI, ``read_snapshot``) see D's outputs, index
    and model from here on, all at once. Refused (no retry) unless publish, the checked index and the candidates of D
    agree. Each success is an event of the assets ``userformer://user_embeddings`` ... (extra: dt, changed)."""
    from userformer.jobs.flows import pipeline

    cfg, day, _ = run_context()
    return announce(plain(pipeline.release(cfg, day)))


@step
def report(done: dict) -> dict:
    """The day's HTML report (metrics over days, users refreshed, checks); its file:// URL is in this log."""
    from userformer.jobs.flows import pipeline

    cfg, day, _ = run_context()
    res = plain(pipeline.report(cfg, day))
    path = res.get("html") or res.get("path")
    if path:
        log.info("report of %s: file://%s", day, path)
    log.info("ledger of %s: file://%s", day, ledger.ledger_dir(cfg, day))
    return res


@dag(
    dag_id="daily_refresh",
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    start_date=dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(CFG),
    params={
        "skip_finetune": Param(
            False,
            type="boolean",
            title="Skip fine-tuning",
            description="keep the published model: no fine-tuning, no gate",
        ),
        "full_reembed": Param(
            False,
            type="boolean",
            title="Full re-embed",
            description="re-embed every user, not only those with new events on D",
        ),
    },
    tags=[TAG],
    doc_md=__doc__,
)
def daily_refresh():
    ing = ingest()
    # The previous day is asked for last, right before the first write: a run of an earlier date created while
    # this one waited for its drop (a backfill) is then seen and waited for.
    wait_for_raw() >> wait_for_previous_day() >> ing
    shards = (
        infer.override(pool=CFG.pipeline.gpu_pool, doc_md=infer.function.__doc__)
        .partial(gated=gate(finetune(sequences(ing))))
        .expand(shard=SHARDS)
    )
    report(release(candidates(check_index(index(publish(check_outputs(shards)))))))


daily_refresh()
