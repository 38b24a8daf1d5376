"""The daily pipeline for one drop date D, as steps: what `userformer run-day` and the Airflow DAGs run.

    wait for raw[D] -> ingest (its gate: events) -> sequences (its gate: user_sequences)
      -> fine-tune (or bootstrap the first model) -> gate -> infer (per shard)
      -> check outputs -> publish (runs the output checks again) -> index -> check index -> candidates
      -> release (readers see D from here on) -> report

Each step is a plain function ``(cfg, day, ...) -> dict`` that reads only D's
inputs and writes only D's outputs, so a rerun replaces, never duplicates. A
failed data-quality gate raises `GateFailed` (exit 1, never retried by
Airflow); bad input raises `UserError`; anything else is treated as transient.
A step with nothing to do (no model yet, an empty day) returns
``{"skipped": reason}`` and the day still succeeds.

Every step's result is kept in the day's ledger,
``reports_root/runs/dt=D/<step>.json`` (the latest run of each step), which
the daily report (jobs/steps/report.py) and the demo's summary read.
"""

from __future__ import annotations

import datetime as dt
import logging
import time

from userformer.jobs.core import lease, registry
from userformer.jobs.core.config import Config
from userformer.jobs.core.errors import GateFailed, UserError
from userformer.jobs.core.ledger import STEPS, record
from userformer.jobs.core.storage import delta
from userformer.jobs.steps import candidates as candidates_step
from userformer.jobs.steps import check as check_step
from userformer.jobs.steps import index as index_step
from userformer.jobs.steps import infer as infer_step
from userformer.jobs.steps import ingest as ingest_step
from userformer.jobs.steps import publish as publish_step
from userformer.jobs.steps import release as release_step
from userformer.jobs.steps import report as report_step
from userformer.jobs.steps import sequences as sequences_step
from userformer.jobs.steps import train as train_step

# The step modules are named `<step>_step`: the functions here have the steps' names. Importing them loads no
# heavy library (each imports torch, Spark, FAISS or GE in the functions that use it), so an Airflow task's
# process pays only for its own step.

log = logging.getLogger(__name__)


def _step(name: str):
    """Time a step and keep its result in the ledger (also when it is skipped; failures are not recorded)."""

    def wrap(fn):
        def run(cfg: Config, day: dt.date, *args, **kwargs):
            t0 = time.perf_counter()
            res = fn(cfg, day, *args, **kwargs)
            step = name
            if name == "infer":
                step = f"infer-{res.get('shard', 0)}-of-{res.get('shards', 1)}"
            return record(cfg, day, step, res, time.perf_counter() - t0)

        run.__name__, run.__doc__, run.__wrapped__ = fn.__name__, fn.__doc__, fn
        return run

    return wrap


# ------------------------------------------------------------------- steps
def raw_ready(cfg: Config, day: dt.date) -> bool:
    """Has the producer finished drop `day`? Its folder holds the ready marker (pipeline.ready_marker), or,
    with no marker configured, at least one Parquet file."""
    d = cfg.raw_events_dir(day)
    if not d.is_dir():
        return False
    marker = cfg.pipeline.ready_marker
    return (d / marker).is_file() if marker else any(d.glob("*.parquet"))


@_step("ingest")
def ingest(cfg: Config, day: dt.date) -> dict:
    """Raw drop D -> events[dt=D] + events_rejected[dt=D], items, vocab (Spark; one commit per table), after the
    events gate passed on the staged rows."""

    marker = cfg.pipeline.ready_marker
    # A drop the producer marked complete may be empty (a quiet day); without a marker an empty folder is an error.
    allow_empty = bool(marker) and (cfg.raw_events_dir(day) / marker).is_file()
    return _gated(cfg, day, "events", lambda: ingest_step.ingest(cfg, day, allow_empty=allow_empty))


def _gated(cfg: Config, day: dt.date, table: str, write):
    """Run a writer whose gate judges its staged rows before it commits (ingest: events, sequences:
    user_sequences), and keep the gate's result in the ledger as ``check_<table>``, passed or failed."""
    try:
        res = write()
    except GateFailed as exc:
        if exc.check is not None:
            record(cfg, day, f"check_{table}", exc.check, exc.check.get("seconds", 0.0))
        raise
    if res.get("check"):
        record(cfg, day, f"check_{table}", res["check"], res["check"].get("seconds", 0.0))
    return res


def check(cfg: Config, table: str, day: dt.date, options: dict | None = None) -> dict:
    """The data-quality gate of `table` for D (Great Expectations); raises GateFailed when it fails."""
    t0 = time.perf_counter()
    res = check_step.check(cfg, table, day, options)
    out = check_step.ledger_entry(res)
    record(cfg, day, f"check_{table}", out, time.perf_counter() - t0)
    if not res.success:
        raise check_step.gate_failed(res)
    return out


@_step("sequences")
def sequences(cfg: Config, day: dt.date) -> dict:
    """events[dt=D] -> user_sequences: the rows of the users active on D (one MERGE), after the user_sequences gate
    passed on the staged rows."""

    return _gated(cfg, day, "user_sequences", lambda: sequences_step.update(cfg, day))


@_step("finetune")
def finetune(cfg: Config, day: dt.date, *, skip: bool = False) -> dict:
    """Fine-tune the published model on D's users (a candidate for the gate), or train the first model.

    Nothing published yet: train from scratch as of D (at most pipeline.bootstrap_epochs epochs) and publish it;
    while the warehouse has no events before the validation window this is skipped (the model steps wait).
    """

    if skip:
        return {"skipped": "fine-tuning skipped by the run's parameters (skip_finetune)", "candidate": None}
    if registry.published(cfg) is None:
        try:
            res = train_step.train(
                cfg, day=day, epochs=cfg.pipeline.bootstrap_epochs or None, progress=False, log=log.info
            )
        except train_step.NotEnoughHistory as exc:
            return {"skipped": f"no published model yet and too little history to train one: {exc}", "candidate": None}
        return {"action": "bootstrap", "candidate": None, **res}
    res = train_step.finetune(cfg, day, promote=False, progress=False, log=log.info)
    # A rerun after a repair's restore finds the day's candidate promoted before: the gate publishes it again.
    cand = res.get("version") if res.get("status") in ("candidate", "promoted") else None
    return {"action": "finetune", "candidate": cand, **res}


@_step("gate")
def gate(cfg: Config, day: dt.date, candidate: str | None) -> dict:
    """Promote the day's candidate iff it is not worse than the published model on held-out users of D."""

    if not candidate:
        ptr = registry.published(cfg)
        return {"skipped": "no candidate to judge", "published": ptr["version"] if ptr else None}
    return train_step.promote_candidate(cfg, day, candidate)


@_step("infer")
def infer(cfg: Config, day: dt.date, shard: int = 0, shards: int | None = None, *, full: bool = False) -> dict:
    """Embeddings and preference scores of D's changed users (everyone after a model change), one shard."""

    shards = shards or cfg.infer.shards
    if registry.published(cfg) is None:
        return {"skipped": "no published model yet", "shard": shard, "shards": shards}
    res = infer_step.infer(cfg, day, shard=shard, shards=shards, all_users=full, log=log.info)
    return {**res, "shard": shard, "shards": shards}


def check_outputs(cfg: Config, day: dt.date, shards: int | None = None) -> dict:
    """The output checks of D's staged inference (`check outputs`: every shard staged, norms, scores); raises
    GateFailed when they fail. `publish` runs them again before its commits."""
    if registry.published(cfg) is None:
        out = {"skipped": "no published model yet"}
        record(cfg, day, "check_outputs", out, 0.0)
        return out
    return check(cfg, "outputs", day, {"shards": shards or cfg.infer.shards})


@_step("publish")
def publish(cfg: Config, day: dt.date, shards: int | None = None) -> dict:
    """Output checks, then one Delta commit per output table (jobs/steps/publish.py); a failed check publishes
    nothing."""

    if registry.published(cfg) is None:
        return {"skipped": "no published model yet"}
    try:
        return publish_step.publish(cfg, day, shards=shards, log=log.info)
    except UserError as exc:
        if exc.code == 1:  # the output checks failed
            raise GateFailed(str(exc)) from None
        raise


@_step("index")
def index(cfg: Config, day: dt.date) -> dict:
    """FAISS index of item_embeddings; made current only if its recall check passes (jobs/steps/index.py)."""

    if not delta.exists(cfg.table_path("item_embeddings")):
        return {"skipped": "no item_embeddings published yet"}
    res = index_step.build_index(cfg, day)
    m = res.manifest
    out = {
        "status": res.status,
        "version": res.version,
        "previous": res.previous,
        "kind": m.get("kind"),
        "items": m.get("items"),
        "model_version": m.get("model_version"),
        "recall_at_10": m.get("recall_at_10"),
        "build_seconds": m.get("build_seconds"),
        "removed": res.removed,
    }
    if res.status == "rejected":
        record(cfg, day, "index", out, 0.0)
        raise GateFailed(
            f"index {res.version} failed its check (recall@10 {m.get('recall_at_10')} < "
            f"{cfg.index.min_recall_at_10} or bad vectors): CURRENT stays {res.previous}"
        )
    return out


@_step("check_index")
def check_index(cfg: Config, day: dt.date) -> dict:
    """The index gate (`check index`, jobs/steps/quality/index.py) on what downstream readers get: the CURRENT
    index is complete, of the published item vectors, recall above the threshold; raises GateFailed when it
    fails."""
    if not delta.exists(cfg.table_path("item_embeddings")):
        return {"skipped": "no index yet"}
    res = check_step.check(cfg, "index", day)
    if not res.success:
        record(cfg, day, "check_index", check_step.ledger_entry(res), res.seconds)
        raise check_step.gate_failed(res)
    return check_step.ledger_entry(res)


@_step("candidates")
def candidates(cfg: Config, day: dt.date) -> dict:
    """user_candidates: top-N items from the current index for every user refreshed on D."""
    if not delta.exists(cfg.table_path("user_embeddings")) or index_step.current(cfg) is None:
        return {"skipped": "no user_embeddings or index yet"}
    return candidates_step.candidates(cfg, day)


@_step("release")
def release(cfg: Config, day: dt.date) -> dict:
    """Flip the published snapshot to D: from here on readers see D's outputs, all of them at once
    (jobs/steps/release.py). Before it, they keep the previous day's."""
    return release_step.release(cfg, day)


@_step("report")
def report(cfg: Config, day: dt.date) -> dict:
    """The day's HTML report (jobs/steps/report.py): metrics over days, loss, users refreshed, scores, drift, checks."""

    return report_step.report(cfg, day)


# --------------------------------------------------------------------- day
# How `run_day` calls each step of the day's list (jobs/core/ledger.py STEPS, whose order it follows): the step's
# function with the day's options and the results of the steps before it.
_RUN = {
    "ingest": lambda cfg, day, out, **o: ingest(cfg, day),
    "sequences": lambda cfg, day, out, **o: sequences(cfg, day),
    "finetune": lambda cfg, day, out, **o: finetune(cfg, day, skip=o["skip_finetune"]),
    "gate": lambda cfg, day, out, **o: gate(cfg, day, out["finetune"].get("candidate")),
    "infer": lambda cfg, day, out, **o: [
        infer(cfg, day, i, o["shards"], full=o["full_reembed"]) for i in range(o["shards"])
    ],
    "check_outputs": lambda cfg, day, out, **o: check_outputs(cfg, day, o["shards"]),
    "publish": lambda cfg, day, out, **o: publish(cfg, day, o["shards"]),
    "index": lambda cfg, day, out, **o: index(cfg, day),
    "check_index": lambda cfg, day, out, **o: check_index(cfg, day),
    "candidates": lambda cfg, day, out, **o: candidates(cfg, day),
    "release": lambda cfg, day, out, **o: release(cfg, day),
    "report": lambda cfg, day, out, **o: report(cfg, day),
}


def run_day(
    cfg: Config, day: dt.date, *, skip_finetune: bool = False, full_reembed: bool = False, shards: int | None = None
) -> dict:
    """Every step of drop `day`, in order, in this process (`userformer run-day`). Stops at the first failure."""
    t0 = time.perf_counter()
    shards = shards or cfg.infer.shards
    if not raw_ready(cfg, day):
        marker = cfg.pipeline.ready_marker
        raise UserError(
            f"raw drop {day} is not ready: {cfg.raw_events_dir(day)}"
            + (f" has no {marker} marker" if marker else " has no Parquet file")
        )
    out = {"dt": str(day)}
    with lease.hold(cfg, "run-day"):  # the whole day: no other writer's commit lands between its steps
        for step in STEPS:
            out[step] = _RUN[step](cfg, day, out, skip_finetune=skip_finetune, full_reembed=full_reembed, shards=shards)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out
