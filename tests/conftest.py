"""Shared fixtures: an isolated USERFORMER_HOME per test, one real local Spark session per run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from userformer.jobs.core.config import load_config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh USERFORMER_HOME (raw/, warehouse/, ... beneath it) for one test."""
    h = tmp_path / "home"
    monkeypatch.setenv("USERFORMER_HOME", str(h))
    for k in list(os.environ):
        if k.startswith("USERFORMER__") or k == "USERFORMER_CONFIG":
            monkeypatch.delenv(k)
    return h


@pytest.fixture
def cfg(home):
    """The configuration as a user gets it, pointed at the test's home."""
    return load_config()


@pytest.fixture(scope="session")
def spark():
    """One real local[2] Spark session for the whole test run (starting one costs ~6 s)."""
    from userformer.jobs.core.spark import spark_session, stop_spark

    s = spark_session(load_config(env={"USERFORMER_HOME": "/tmp/userformer-unused"}))
    yield s
    stop_spark()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        # CI sets USERFORMER_REQUIRE_SHARED=1 so that a missing folder fails instead of skipping.
        if os.environ.get("USERFORMER_REQUIRE_SHARED") == "1":
            pytest.fail(f"shared data not found at {SHARED_DATA}")
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
