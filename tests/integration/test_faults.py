"""Kill -9 at named points of a day, then the day again: the same tables as a clean run, readers never see a mixed
snapshot, maintain leaves no orphan (tests/integration/faults.py). A few points here, one of each kind: a kill
during Spark's write, between publish's commits, between the last commit and the snapshot flip. Every point:
``python -m tests.benchmarks.fault_matrix`` (docs/reliability.md)."""

from __future__ import annotations

import pytest

from tests.integration import faults

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
