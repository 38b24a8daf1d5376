"""### maintenance: compact, purge and vacuum the warehouse once a week

Weekly (Sunday 03:00 UTC, no catchup, one run at a time); also triggerable by hand. One task runs
`userformer maintain` (`jobs/tools/maintain.py`):

* the Spark-written tables (`events`, `events_rejected`, `user_sequences`) through delta-spark: OPTIMIZE compacts
  the small file each day's `user_sequences` MERGE adds, REORG ... APPLY (PURGE) rewrites the files that still
  carry deletion vectors, VACUUM deletes what no version inside ``storage.retention_days`` references;
* the delta-rs tables (vocab, items, the published outputs): vacuum and a log checkpoint;
* staged output of crashed runs older than the window.

None of it changes a row: readers see the same data before and after. A daily run that commits while maintenance
does gets Delta's conflict on one side; that task fails with "another writer committed ..." and its retry
(exponential backoff) reads the table afresh. Time travel, reruns of a day and `repair` reach back
``storage.retention_days`` and no further.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import dag
from common import TAG, config, default_args, plain, writes

# The tasks import the maintenance tool (jobs/tools/maintain.py) inside their bodies: Airflow parses this file often
# (the DAG processor, and each task's process once more), and importing it here would add delta-rs, Arrow and numpy to
# every parse (about ten times this file's own import time).

CFG = config()


@writes
def maintain() -> dict:
    """Compact and purge the Spark tables, vacuum every table beyond ``storage.retention_days``, clear old staging."""
    from userformer.jobs.tools import maintain as maintain_tool

    return plain(maintain_tool.maintain(config()))


@dag(
    dag_id="maintenance",
    schedule="0 3 * * 0",
    start_date=dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(CFG),
    tags=[TAG, "maintenance"],
    doc_md=__doc__,
)
def maintenance():
    maintain()


maintenance()
