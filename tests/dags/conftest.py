"""Airflow in tests: a throwaway AIRFLOW_HOME (never ~/airflow), no example DAGs; set before airflow is imported."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="userformer-airflow-test-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
