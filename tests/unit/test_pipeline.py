"""jobs/flows/pipeline.py without Spark: when a raw drop counts as ready, the day ledger, refusals of run_day."""

from __future__ import annotations

import datetime as dt

import pytest

from userformer.jobs.core import ledger
from userformer.jobs.core.config import load_config
from userformer.jobs.core.errors import UserError
from userformer.jobs.flows import pipeline

D = dt.date(2026, 11, 3)


def test_a_drop_is_ready_only_once_its_marker_is_there(cfg):
    d = cfg.raw_events_dir(D)
    assert not pipeline.raw_ready(cfg, D)  # no folder
    d.mkdir(parents=True)
    (d / "part-00000.parquet").write_bytes(b"being written")
    assert not pipeline.raw_ready(cfg, D)  # files, but the producer has not said it is complete
    (d / cfg.pipeline.ready_marker).write_text("")
    assert pipeline.raw_ready(cfg, D)


def test_without_a_marker_any_parquet_file_makes_it_ready(home, monkeypatch):
    monkeypatch.setenv("USERFORMER__PIPELINE__READY_MARKER", "")
    cfg = load_config()
    d = cfg.raw_events_dir(D)
    d.mkdir(parents=True)
    assert not pipeline.raw_ready(cfg, D)
    (d / "part-00000.parquet").write_bytes(b"x")
    assert pipeline.raw_ready(cfg, D)


def test_run_day_refuses_a_drop_that_is_not_ready_and_writes_nothing(cfg):
    with pytest.raises(UserError, match="raw drop 2026-11-03 is not ready.*_SUCCESS"):
        pipeline.run_day(cfg, D)
    assert ledger.read_ledger(cfg, D) == {} and not cfg.warehouse_root.exists()


def test_the_ledger_keeps_the_latest_result_of_each_step(cfg):
    ledger.record(cfg, D, "ingest", {"accepted": 1}, 0.5)
    ledger.record(cfg, D, "ingest", {"accepted": 2}, 0.7)  # a rerun replaces
    ledger.record(cfg, D, "infer-0-of-2", {"users": 3}, 0.1)
    led = ledger.read_ledger(cfg, D)
    assert set(led) == {"ingest", "infer-0-of-2"}
    assert led["ingest"]["result"] == {"accepted": 2} and led["ingest"]["seconds"] == 0.7
    assert led["ingest"]["dt"] == str(D) and ledger.read_ledger(cfg, D + dt.timedelta(days=1)) == {}


def test_run_day_runs_the_declared_step_list():
    # run_day follows ledger.STEPS; each step there has exactly one call in the pipeline, in the same order.
    assert list(pipeline._RUN) == ledger.STEPS
