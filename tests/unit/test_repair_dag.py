"""The `repair` DAG (dags/repair.py) parses, is manual, and validates its params at trigger time."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[2] / "dags"


@pytest.fixture
def dag(home, monkeypatch, tmp_path):
    if not (DAGS / "common.py").is_file():
        pytest.skip("dags/common.py is not there yet")
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    monkeypatch.syspath_prepend(str(DAGS))  # as Airflow does for the dags folder
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(DAGS / "repair.py"))
    assert not bag.import_errors, bag.import_errors
    yield bag.dags["repair"]
    for m in ("common", "repair"):
        sys.modules.pop(m, None)


GOOD = {"from_dt": "2026-11-02", "to_dt": "2026-11-03", "mode": "restore"}


def validated(dag, **values):
    p = copy.deepcopy(dag.params)
    for k, v in values.items():
        p[k] = v
    return p.validate()


def test_repair_dag_is_manual_and_thin(dag):
    assert dag.schedule is None and dag.max_active_runs == 1
    assert [t.task_id for t in dag.tasks] == ["plan", "repair", "report"]
    assert validated(dag, **GOOD)["users"] is None
    assert validated(dag, **{**GOOD, "mode": "recompute", "users": ["u1", "u2"]})["users"] == ["u1", "u2"]


@pytest.mark.parametrize(
    "bad", [{"from_dt": "2026-13-01"}, {"to_dt": "yesterday"}, {"mode": "fix"}, {"users": ["u1", 7]}, {"users": "u1"}]
)
def test_repair_dag_refuses_bad_params(dag, bad):
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError):
        validated(dag, **{**GOOD, **bad})


def test_repair_dag_requires_the_dates(dag):
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError):
        validated(dag, mode="restore")
