"""Shared fixtures: an isolated USERFORMER_HOME per test, one real local Spark session per run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from userformer.jobs.core.config import load_config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _project_environment() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith("USERFORMER")}


@pytest.fixture(autouse=True)
def environment_left_as_found():
    """Every test leaves the project's variables (USERFORMER_*) as it found them. The processes a later test starts
    inherit them: a variable one test's code exported (the demo exports USERFORMER_CONFIG) would silently change
    their settings. Restored, and the test fails."""
    before = _project_environment()
    yield
    after = _project_environment()
    if after != before:
        for k in after.keys() - before.keys():
            del os.environ[k]
        os.environ.update(before)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        pytest.fail(f"the test changed the environment and did not restore it: {', '.join(changed)}")


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


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run wherever torch sees a CUDA device and are skipped, saying so, elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
