"""`userformer demo` end to end through the real executable, as `make demo` runs it (smaller, and with
``--no-airflow``: the same steps in one process; the Airflow path is tests/integration/test_airflow.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from userformer.jobs.core.storage import delta

EXE = str(Path(sys.executable).parent / "userformer")

pytestmark = pytest.mark.spark


def demo(home, *args):
    env = {**os.environ, "USERFORMER_HOME": str(home)}
    return subprocess.run(
        [EXE, "demo", "--no-airflow", "--days", "3", "--users", "300", "--items", "500", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )


def test_demo_runs_every_day_and_reruns_cleanly(tmp_path):
    home = tmp_path / "home"
    r = demo(home)
    assert r.returncode == 0, r.stderr[-4000:]
    days = [line for line in r.stdout.splitlines() if line.startswith("2026-11-0")]
    assert len(days) == 3 and all("checks ok" in d for d in days)
    for part in ("model versions", "index recall@10", "users per day", "where things are", "pl.read_delta"):
        assert part in r.stdout
    seq = delta.read_arrow(home / "warehouse" / "user_sequences")
    events = delta.read_arrow(home / "warehouse" / "events")
    assert seq.num_rows > 100 and events.num_rows > 1000
    assert sum(seq["lifetime_events"].to_pylist()) == events.num_rows
    assert (home / "reports" / "checks" / "events" / "dt=2026-11-03.html").is_file()
    # The commands it suggests work when pasted into a new shell (no USERFORMER_* set there), and print the answer,
    # not a library's loader logs.
    lines = r.stdout.splitlines()
    suggested = [lines[i + 1].strip() for i, line in enumerate(lines) if line.startswith(("query a table", "a user's"))]
    assert len(suggested) == 2 and " recommend --user " in suggested[1], r.stdout[-2000:]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("USERFORMER")}
    for cmd in suggested:
        out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=clean, timeout=300, cwd=tmp_path)
        assert out.returncode == 0, (cmd, out.stderr[-2000:])
        assert out.stdout.strip() and "faiss" not in out.stdout + out.stderr, (cmd, out.stdout[:500], out.stderr[:500])
    # A second demo in the same home starts over and ends with the same tables.
    r2 = demo(home)
    assert r2.returncode == 0, r2.stderr[-4000:]
    again = delta.read_arrow(home / "warehouse" / "user_sequences")
    assert again.sort_by("user_id").equals(seq.sort_by("user_id"))


def test_demo_refuses_a_home_with_real_data(tmp_path):
    home = tmp_path / "home"
    (home / "warehouse" / "events").mkdir(parents=True)
    (home / "warehouse" / "events" / "keep.txt").write_text("someone's data")
    r = demo(home)
    assert r.returncode == 2 and "no demo made" in r.stderr
    assert (home / "warehouse" / "events" / "keep.txt").exists()
