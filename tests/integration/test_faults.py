"""Kill -9 at named points of a day, then the day again: the same tables as a clean run, readers never see a mixed
snapshot, maintain leaves no orphan (tests/integration/faults.py). A few points here, one of each kind: a kill
during Spark's write, between publish's commits, between the last commit and the snapshot flip. Every point:
``python -m tests.benchmarks.fault_matrix`` (docs/reliability.md)."""

from __future__ import annotations

import pytest

from tests.integration import faults, procs

pytestmark = [pytest.mark.spark, pytest.mark.slow]


@pytest.fixture(scope="module")
def homes(tmp_path_factory, spark):
    base = faults.base(tmp_path_factory.mktemp("base") / "home")
    ref = faults.reference(base, tmp_path_factory.mktemp("reference") / "home")
    assert faults.snapshot.current(ref)["dt"] == str(faults.D3)
    return base, ref


@pytest.mark.parametrize("point", [faults.SPARK_WRITE, "publish.after_user_embeddings", "release.before_flip"])
def test_killed_then_rerun_equals_a_clean_run(homes, tmp_path, point):
    base, ref = homes
    row = faults.trial(base, ref, point, tmp_path)
    assert row["reached"], f"the day never reached {point}"
    assert row["rerun_error"] is None and row["equal"], (row["rerun_error"], row["difference"])
    assert row["snapshot_reads"] > 0 and not row["mixed"], row["mixed"]
    assert str(faults.D3) in row["snapshots_seen"]  # the rerun released D3
    assert row["orphans"] == {}, row["orphans"]


def test_a_repair_started_during_a_day_waits_for_it_then_redoes_the_days(homes, tmp_path):
    """`run-day D3` holds the lease (between publish's commits) when on-call starts `repair --from D2 --mode restore`:
    the repair says it waits for the day, runs after it, and ends equal to a clean run."""
    base, ref = homes
    cfg = faults.copy(base, tmp_path / "home")
    pause, logs = tmp_path / "pause", tmp_path / "logs"
    env = faults.env(cfg)
    point = "publish.after_user_embeddings"
    day = procs.start(cfg.home, logs, "run-day", "--dt", str(faults.D3), pause_at=point, pause_dir=pause, env=env)
    fix = None
    try:
        procs.wait_paused(pause, point, [day], timeout=600)
        args = ("repair", "--from", str(faults.D2), "--to", str(faults.D3), "--mode", "restore")
        fix = procs.start(cfg.home, logs, *args, env=env)
        procs.wait_said(fix, "waiting up to", timeout=300)
        assert f"held by step run-day (pid {day.pid} on " in fix.stderr
        procs.release(pause, point)
        codes = [day.wait(timeout=900), fix.wait(timeout=1800)]
    finally:
        procs.stop_all([day] + ([fix] if fix else []))
    assert codes == [0, 0], (day.stderr[-3000:], fix.stderr[-3000:])
    assert faults.same_as(ref, cfg) is None
