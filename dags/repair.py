"""### repair: undo bad drops FROM..TO, then redo them from clean data

Manual only (no schedule). Trigger it with the params below after fixing the raw data (restore) or re-ingesting
the bad partitions (recompute). Each task calls one function of `jobs/flows/repair.py`, the same ones `userformer
repair --from FROM --to TO --mode MODE` runs, so a repair runs identically without Airflow.

plan -> repair -> report

* **plan**: validates the params against the warehouse and writes the plan (every table's version now and the
  version it goes back to) to ``reports_root/repairs/<id>.json``; refuses (no retry, nothing changed) when TO <
  FROM, when restore's TO is before the latest processed drop, when a raw drop is not ready, or when FROM is
  beyond the retention window (``storage.retention_days``: its versions were vacuumed). ``dry_run`` stops here.
* **repair** (one writing task, holding the warehouse lease throughout, so no other run's writer commits between
  its stages) - restore: every Delta table, the published model, the index, the publish record and the published
  snapshot back to before FROM, the day ledgers moved aside, then drops FROM..TO re-run in order (the daily
  pipeline's steps, each day released); recompute: user_sequences of the affected users rebuilt from the events,
  the users re-inferred with the published model and published, index and candidates rebuilt, released. Refused
  when the warehouse processed another drop since the plan (trigger the repair again).
* **report**: the JSON summary (also in the run's XCom).

A scheduled ``daily_refresh`` run may stay active: its writing tasks queue behind the repair in the writers' pool
and on the lease, and a drop it processes after the repair continues from the repaired tables.

Every task can be retried (transient errors, exponential backoff); bad input and failed data-quality gates fail
at once. A run is idempotent: triggering the same repair again gives the same tables.
"""

from __future__ import annotations

import datetime as dt
import logging

from airflow.sdk import Param, dag, get_current_context
from common import RELEASED, TAG, announce, config, default_args, plain, step, writes

# The tasks import the repair flow (jobs/flows/repair.py) inside their bodies: Airflow parses this file often (the DAG
# processor, and each task's process once more), and importing it here would add delta-rs, Arrow and numpy to every
# parse (about ten times this file's own import time).

log = logging.getLogger("userformer.dags.repair")
CFG = config()


def _params() -> dict:
    return dict(get_current_context().get("params") or {})


@step(retries=0)
def plan() -> dict:
    """Validate the params and plan the repair (jobs/flows/repair.py `start`); the plan goes to the log and the
    report."""
    from userformer.jobs.flows import repair as repair_flow

    p = _params()
    users = repair_flow.parse_users(p.get("users")) if p.get("users") else None
    summary = repair_flow.start(
        CFG,
        dt.date.fromisoformat(p["from_dt"]),
        dt.date.fromisoformat(p["to_dt"]),
        p["mode"],
        users=users,
        dry_run=bool(p.get("dry_run")),
    )
    log.info("repair plan: %s", summary["plan"])
    return plain(summary)


@writes(task_id="repair", outlets=RELEASED)
def run_repair(summary: dict) -> dict:
    """restore: tables, model, index, snapshot back to before FROM, then FROM..TO re-run in order; recompute: the
    users' sequences rebuilt, re-inferred, published, index and candidates rebuilt, released. One task, so it holds
    the warehouse lease from the first change to the last: no other DAG's writer runs in between."""
    from userformer.jobs.flows import repair as repair_flow

    if summary["dry_run"]:
        return summary
    return announce(plain(repair_flow.apply(CFG, summary)))


@step(retries=0)
def report(result: dict) -> dict:
    """The summary of the repair, kept in reports_root/repairs/<id>.json."""
    if not result.get("dry_run"):
        log.info("repair %s %s: file://%s", result["id"], result.get("status"), result.get("report"))
    return result


@dag(
    dag_id="repair",
    schedule=None,
    start_date=dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(CFG),
    params={
        "from_dt": Param(
            type="string",
            format="date",
            title="From (first bad drop)",
            description="YYYY-MM-DD: the first drop to repair",
        ),
        "to_dt": Param(
            type="string",
            format="date",
            title="To (last drop)",
            description="YYYY-MM-DD: the last drop to repair; restore needs at least the latest processed drop",
        ),
        "mode": Param(
            "restore",
            type="string",
            enum=["restore", "recompute"],
            title="Mode",
            description="restore: tables back to before FROM, then re-run FROM..TO; recompute: rebuild "
            "the affected users' sequences from the (clean) events, re-infer, republish",
        ),
        "users": Param(
            None,
            type=["null", "array"],
            items={"type": "string"},
            title="Users (recompute)",
            description="recompute only: these user ids (default: every user with events in FROM..TO)",
        ),
        "dry_run": Param(False, type="boolean", title="Dry run", description="plan only; change nothing"),
    },
    tags=[TAG, "repair"],
    doc_md=__doc__,
)
def repair():
    report(run_repair(plan()))


repair()
