"""### retrain: a model from scratch on a recent window, promoted only if better

Manual (no schedule). Each task calls one step of `jobs/flows/retrain.py` / `jobs/flows/pipeline.py`; the CLI runs
the same
steps in one process: `userformer retrain --dt D --window-days N`.

train (from scratch on the last ``window_days`` days up to drop D) -> judge (the new version and the published one
on the same held-out window; promote iff better on ``finetune.gate_metrics``) -> only after a promotion: infer
every user (one task per shard, pool `gpu`) -> check outputs -> publish -> index -> check index -> candidates
-> release (readers switch to the new model at once).
Without a promotion the run ends after `judge` (the rest is skipped) and nothing published changes.

**Params** (validated at trigger time): ``dt`` the as-of drop date (YYYY-MM-DD; empty = the latest drop in
user_sequences), ``window_days`` the training window (2..365 days), ``epochs`` the maximum epochs (empty =
``train.epochs``). Runs one at a time; transient errors retry with backoff, bad input and failed checks do not.
"""

from __future__ import annotations

import datetime as dt
import logging

from airflow.sdk import Param, dag, get_current_context, task
from common import QUALITY_TASK_RETRIES, RELEASED, TAG, announce, config, default_args, plain, step, writes

# The tasks import the retrain flow and the pipeline (jobs/flows/) inside their bodies: Airflow parses this file often
# (the DAG processor, and each task's process once more), and importing them here would add delta-rs and Arrow
# to every parse (seconds, against milliseconds for this file); each task then loads only what its step needs.

log = logging.getLogger("userformer.dags.retrain")
CFG = config()
SHARDS = list(range(CFG.infer.shards))


def _day(res: dict) -> dt.date:
    return dt.date.fromisoformat(res["dt"])


@step
def train() -> dict:
    """Train a new model from scratch on the last ``window_days`` days up to drop D (the ``dt`` param, or the latest
    drop); register it (the first model of an empty registry is published at once)."""
    from userformer.jobs.flows import retrain as retrain_flow

    params = get_current_context()["params"]
    cfg = config()
    day = retrain_flow.as_of(cfg, dt.date.fromisoformat(params["dt"]) if params.get("dt") else None)
    res = retrain_flow.train_window(cfg, day, int(params["window_days"]), epochs=params.get("epochs") or None)
    return plain({"dt": str(day), **res})


@writes
def judge(trained: dict) -> dict:
    """Evaluate the new version and the published one on the same held-out window ending with D; publish the new
    one only if it is better on every ``finetune.gate_metrics`` (at least as good, and better on one)."""
    from userformer.jobs.flows import retrain as retrain_flow

    res = retrain_flow.judge(config(), _day(trained), trained["version"])
    return plain(
        {"dt": trained["dt"], **{k: res.get(k) for k in ("version", "promoted", "published", "reason", "metrics")}}
    )


@task.short_circuit
def promoted(judged: dict) -> bool:
    """Go on only after a promotion: then every user is re-embedded and the index rebuilt; otherwise nothing
    published changes and the rest of the run is skipped."""
    log.info("retrain %s: %s", judged["version"], judged["reason"])
    return bool(judged["promoted"])


@step
def infer(shard: int, judged: dict) -> dict:
    """Embeddings + preference scores of EVERY user (one shard) with the newly published model. Pool ``gpu``."""
    from userformer.jobs.flows import pipeline

    res = pipeline.infer(config(), _day(judged), shard, len(SHARDS), full=True)
    return plain({"dt": judged["dt"], **{k: res.get(k) for k in ("shard", "shards", "users", "model_version")}})


@step(retries=QUALITY_TASK_RETRIES)
def check_outputs(judged: dict) -> dict:
    """Output checks of the staged re-embedding (every shard, norms, scores). Fails without retry."""
    from userformer.jobs.flows import pipeline

    return plain({"dt": judged["dt"], **pipeline.check_outputs(config(), _day(judged), len(SHARDS))})


@writes
def publish(checked: dict) -> dict:
    """One Delta commit per output table, as the daily refresh does."""
    from userformer.jobs.flows import pipeline

    return plain({"dt": checked["dt"], **pipeline.publish(config(), _day(checked), len(SHARDS))})


@writes
def index(published: dict) -> dict:
    """Rebuild the FAISS index of the new item vectors; switched to only if its recall check passes."""
    from userformer.jobs.flows import pipeline

    return plain({"dt": published["dt"], **pipeline.index(config(), _day(published))})


@step(retries=QUALITY_TASK_RETRIES)
def check_index(built: dict) -> dict:
    """The CURRENT index is of the published item vectors, complete, recall@10 above the threshold."""
    from userformer.jobs.flows import pipeline

    return plain({"dt": built["dt"], **pipeline.check_index(config(), _day(built))})


@writes
def candidates(checked: dict) -> dict:
    """``user_candidates`` of every re-embedded user from the new index."""
    from userformer.jobs.flows import pipeline

    return plain({"dt": checked["dt"], **pipeline.candidates(config(), _day(checked))})


@writes(outlets=RELEASED)
def release(done: dict) -> dict:
    """Flip the published snapshot to the new model's outputs: readers switch to them all at once."""
    from userformer.jobs.flows import pipeline

    return announce(plain({**pipeline.release(config(), _day(done)), "dt": done["dt"]}))


@dag(
    dag_id="retrain",
    schedule=None,
    start_date=dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(CFG),
    params={
        "dt": Param(
            None,
            type=["null", "string"],
            format="date",
            title="As-of drop date",
            description="YYYY-MM-DD; empty = the latest drop user_sequences includes",
        ),
        "window_days": Param(
            7,
            type="integer",
            minimum=2,
            maximum=365,
            title="Training window (days)",
            description="train on the events of this many days ending with the as-of date",
        ),
        "epochs": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            maximum=100_000,
            title="Max epochs",
            description="empty = train.epochs",
        ),
    },
    tags=[TAG],
    doc_md=__doc__,
)
def retrain():
    judged = judge(train())
    go = promoted(judged)
    shards = (
        infer.override(pool=CFG.pipeline.gpu_pool, doc_md=infer.function.__doc__)
        .partial(judged=judged)
        .expand(shard=SHARDS)
    )
    go >> shards
    checked = check_outputs(judged)
    shards >> checked
    release(candidates(check_index(index(publish(checked)))))


retrain()
