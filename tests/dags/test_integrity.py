"""DAG integrity: the dags folder imports without errors, the DAGs are what the README says, policies as intended.

No scheduler and no database: the DagBag parses the files as Airflow's DAG processor does.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from userformer.jobs.core import ledger

DAGS = REPO / "dags"
QUALITY_TASKS = {
    "daily_refresh": {"check_outputs", "check_index"},
    "retrain": {"check_outputs", "check_index"},
}
# Date order is one sensor on the previous run (any run type), not depends_on_past, which the first run of a
# backfill skips.
SENSORS = {"wait_for_previous_day", "wait_for_raw"}
# The tasks that change the warehouse, the registry or the index: one at a time, in the writers' pool.
WRITERS = {
    "daily_refresh": {"ingest", "sequences", "finetune", "gate", "publish", "index", "candidates", "release"},
    "retrain": {"judge", "publish", "index", "candidates", "release"},
    "repair": {"repair"},
    "maintenance": {"maintain"},
}


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    """The DAGs of dags/, parsed with the pipeline configuration of a fresh home and non-default retry settings."""
    from airflow.dag_processing.dagbag import BundleDagBag

    env = {
        "USERFORMER_HOME": str(tmp_path_factory.mktemp("home")),
        "USERFORMER__PIPELINE__RETRIES": "3",
        "USERFORMER__PIPELINE__RETRY_DELAY_S": "7",
        "USERFORMER__PIPELINE__GPU_POOL": "gpu_test",
        "USERFORMER__PIPELINE__WRITERS_POOL": "writers_test",
        "USERFORMER__INFER__SHARDS": "2",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        b = BundleDagBag(str(DAGS), bundle_path=DAGS)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return b


def test_dags_import_without_errors(bag):
    assert bag.import_errors == {}
    assert set(bag.dag_ids) >= {"daily_refresh", "retrain"}
    for dag_id in ("daily_refresh", "retrain"):
        d = bag.dags[dag_id]
        assert d.max_active_runs == 1 and not d.catchup and "userformer" in d.tags
        assert d.doc_md and "###" in d.doc_md
        d.validate()


def test_no_cycles_and_the_documented_order(bag):
    from airflow.sdk.definitions._internal.abstractoperator import AbstractOperator  # noqa: F401

    d = bag.dags["daily_refresh"]
    d.check_cycle() if hasattr(d, "check_cycle") else None
    order = [t.task_id for t in d.topological_sort()]
    expected = ["wait_for_raw", "wait_for_previous_day", *ledger.STEPS]  # the day's step list, declared once
    assert order == expected
    for a, b in zip(expected, expected[1:]):  # a chain: each task is directly upstream of the next
        assert b in d.get_task(a).downstream_task_ids, (a, b)
    r = bag.dags["retrain"]
    assert [t.task_id for t in r.topological_sort()] == [
        "train",
        "judge",
        "promoted",
        "infer",
        "check_outputs",
        "publish",
        "index",
        "check_index",
        "candidates",
        "release",
    ]


def test_releases_are_asset_events(bag):
    """The tasks that flip the published snapshot, and only they, update the outputs' assets."""
    want = {f"userformer://{n}/" for n in ("user_embeddings", "user_preference_scores", "item_embeddings")}
    want |= {"userformer://user_candidates/", "userformer://item_index/"}
    for dag_id in ("daily_refresh", "retrain", "repair", "maintenance"):
        for t in bag.dags[dag_id].tasks:
            uris = {a.uri for a in t.outlets}
            assert uris == (want if t.task_id in ("release", "repair") else set()), (dag_id, t.task_id, uris)


def test_daily_refresh_schedule_is_a_daily_data_interval(bag):
    from airflow.serialization.encoders import coerce_to_core_timetable
    from airflow.timetables.interval import CronDataIntervalTimetable

    d = bag.dags["daily_refresh"]
    tt = coerce_to_core_timetable(d.timetable)
    assert isinstance(tt, CronDataIntervalTimetable)
    # The run for D starts once D is over and its logical date is D: what dags/common.py drop_date() relies on.
    info = tt.next_dagrun_info(
        last_automated_data_interval=None, restriction=_restriction(dt.datetime(2026, 11, 1, tzinfo=dt.UTC))
    )
    assert info.logical_date == dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    assert info.run_after == dt.datetime(2026, 11, 2, tzinfo=dt.UTC)
    assert coerce_to_core_timetable(bag.dags["retrain"].timetable).periodic is False  # manual only


def _restriction(earliest):
    from airflow.timetables.base import TimeRestriction

    return TimeRestriction(earliest=earliest, latest=None, catchup=True)


def test_retry_policy_and_pools(bag):
    for dag_id in ("daily_refresh", "retrain"):
        d = bag.dags[dag_id]
        for t in d.tasks:
            quality = t.task_id in QUALITY_TASKS[dag_id]
            if quality or t.task_id in SENSORS:
                assert t.retries == 0, (dag_id, t.task_id)  # a verdict on data: never retried
            elif t.task_id != "promoted":
                assert t.retries == 3, (dag_id, t.task_id)  # pipeline.retries from the environment
                assert t.retry_exponential_backoff and t.retry_delay == dt.timedelta(seconds=7)
                assert t.max_retry_delay == dt.timedelta(seconds=7 * 32)
            assert t.doc_md, f"{dag_id}.{t.task_id} has no doc (its docstring is the UI's task doc)"
    for dag_id, writers in WRITERS.items():
        for t in bag.dags[dag_id].tasks:
            want = "writers_test" if t.task_id in writers else "gpu_test" if t.task_id == "infer" else "default_pool"
            pool = t.partial_kwargs.get("pool", t.pool) if hasattr(t, "partial_kwargs") else t.pool
            assert pool == want, (dag_id, t.task_id, pool)
    d = bag.dags["daily_refresh"]
    assert not [t.task_id for t in d.tasks if t.depends_on_past]
    infer = d.get_task("infer")
    assert infer.op_kwargs_expand_input.value == {"shard": [0, 1]}  # one mapped task per shard (infer.shards=2)
    assert all(d.get_task(s).mode == "reschedule" for s in SENSORS)  # no worker slot held while waiting


def test_quality_failures_are_not_retried_other_errors_are():
    sys.path.insert(0, str(DAGS))
    try:
        from common import no_retry_on_bad_data
    finally:
        sys.path.remove(str(DAGS))
    from airflow.sdk.exceptions import AirflowFailException

    from userformer.jobs.core.errors import GateFailed, UserError

    def raising(exc):
        @no_retry_on_bad_data
        def body():
            raise exc

        return body

    for exc in (GateFailed("events check failed"), UserError("raw drop missing")):
        with pytest.raises(AirflowFailException):
            raising(exc)()
    with pytest.raises(OSError):  # transient: Airflow retries it
        raising(OSError("disk hiccup"))()
    from userformer.jobs.core.storage.delta import ConcurrentWrite

    with pytest.raises(ConcurrentWrite):  # another writer won the commit: the retry reads afresh
        raising(ConcurrentWrite("/w/vocab", "read version 3, now 4"))()
    from userformer.jobs.core.lease import LeaseBusy

    with pytest.raises(LeaseBusy):  # another writer held the warehouse too long: the retry waits again
        raising(LeaseBusy("the warehouse is being written by step ingest ..."))()


def _server_params(bag, dag_id):
    """The params as the API server holds them (the serialized DAG): what a trigger or backfill validates."""
    from airflow.serialization.serialized_objects import DagSerialization

    return DagSerialization.deserialize_dag(DagSerialization.serialize_dag(bag.dags[dag_id])).params


@pytest.mark.parametrize(
    "dag_id,bad",
    [
        ("daily_refresh", {"skip_finetune": "yes"}),
        ("daily_refresh", {"full_reembed": 1}),
        ("retrain", {"window_days": 1}),
        ("retrain", {"window_days": "seven"}),
        ("retrain", {"dt": "2026-13-45"}),
        ("retrain", {"epochs": 0}),
    ],
)
def test_params_reject_bad_values(bag, dag_id, bad):
    params = _server_params(bag, dag_id)
    with pytest.raises(Exception) as err:
        params.deep_merge(bad).validate()
    assert "Invalid input" in str(err.value) or "validat" in str(err.value).lower()


@pytest.mark.parametrize(
    "dag_id,good",
    [
        ("daily_refresh", {}),
        ("daily_refresh", {"skip_finetune": True, "full_reembed": True}),
        ("retrain", {}),
        ("retrain", {"dt": "2026-11-07", "window_days": 5, "epochs": 3}),
    ],
)
def test_params_accept_good_values(bag, dag_id, good):
    resolved = _server_params(bag, dag_id).deep_merge(good).validate()
    for k, v in good.items():
        assert resolved[k] == v


def test_drop_date_is_the_logical_date():
    sys.path.insert(0, str(DAGS))
    try:
        from common import drop_date
    finally:
        sys.path.remove(str(DAGS))
    ld = dt.datetime(2026, 11, 3, tzinfo=dt.UTC)
    # A backfill run: interval [D, D+1); a manual run of D: Airflow infers the interval ending at D.
    assert drop_date({"logical_date": ld, "data_interval_start": ld}) == dt.date(2026, 11, 3)
    assert drop_date({"logical_date": ld, "data_interval_start": ld - dt.timedelta(days=1)}) == dt.date(2026, 11, 3)
    from userformer.jobs.core.errors import UserError

    with pytest.raises(UserError):
        drop_date({"logical_date": None, "data_interval_start": None})


def test_dag_files_only_wire():
    """Every task body calls into userformer.jobs; no Spark, torch or Delta code in the DAG files."""
    for f in ("daily_refresh.py", "retrain.py", "repair.py", "maintenance.py", "common.py"):
        text = (DAGS / f).read_text()
        for heavy in ("pyspark", "import torch", "deltalake", "pyarrow"):
            assert heavy not in text, (f, heavy)
    assert (Path(DAGS) / "README.md").is_file()


def test_maintenance_runs_weekly_one_at_a_time(bag):
    """Compaction, purge and vacuum: one task calling `userformer maintain`'s function, weekly, never two at once."""
    from airflow.serialization.encoders import coerce_to_core_timetable

    d = bag.dags["maintenance"]
    d.validate()
    assert d.max_active_runs == 1 and not d.catchup and "userformer" in d.tags and "###" in d.doc_md
    assert [t.task_id for t in d.tasks] == ["maintain"]
    assert d.tasks[0].retries == 3  # transient failures (a conflicting daily commit) are retried
    assert coerce_to_core_timetable(d.timetable).summary == "0 3 * * 0"
