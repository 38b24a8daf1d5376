"""The warehouse lease (jobs/core/lease.py) between real processes: one writer at a time, a waiter that names the
holder, a killed holder's lease free at once, re-entrant in a process.

The holder is a real process that takes the lease and is held at the pause point ``lease.acquired``; the other
writer is the real CLI (`userformer maintain`, which takes the lease before it touches a table).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from userformer.jobs.core import hooks, lease
from userformer.jobs.core.config import load_config

from . import procs

HOLD = "lease.acquired"
HOLDER = (
    "from userformer.jobs.core import lease\n"
    "from userformer.jobs.core.config import load_config\n"
    "with lease.hold(load_config(), 'holder-test'):\n"
    "    pass\n"
)


def start_holder(home, pause_dir, logs) -> procs.Step:
    """A process that takes the lease and stops at `lease.acquired`, holding it until released or killed."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "USERFORMER_HOME": str(home), hooks.ENV_POINTS: HOLD, hooks.ENV_DIR: str(pause_dir)}
    out, err = logs / "holder.out", logs / "holder.err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER], env=env, stdout=o, stderr=e, start_new_session=True)
    step = procs.Step(proc, out, err)
    procs.wait_paused(pause_dir, HOLD, [step], timeout=60)
    return step


def writer(home, logs, wait_s: float, name: str) -> procs.Step:
    """`userformer maintain`, a writer that may wait `wait_s` for the lease."""
    return procs.start(home, logs, "maintain", name=name, env={"USERFORMER__STORAGE__LEASE_WAIT_S": str(wait_s)})


def test_a_second_writer_waits_then_fails_naming_the_holder(home, tmp_path):
    holder = start_holder(home, tmp_path / "pause", tmp_path / "logs")
    try:
        t0 = time.monotonic()
        other = writer(home, tmp_path / "logs", 2, "maintain-busy")
        code = other.wait(timeout=120)
        waited = time.monotonic() - t0
        err = other.stderr
        assert code == 75, err
        assert "waiting up to 2 s for the warehouse lease held by step holder-test" in err
        assert f"the warehouse is being written by step holder-test (pid {holder.pid} on " in err
        assert "waited 2 s (storage.lease_wait_s)" in err and "Run this step again" in err
        assert waited >= 2
        assert holder.proc.poll() is None  # the holder was not disturbed
    finally:
        procs.stop_all([holder])


def test_the_waiting_writer_goes_on_when_the_holder_is_done(home, tmp_path):
    pause = tmp_path / "pause"
    holder = start_holder(home, pause, tmp_path / "logs")
    try:
        other = writer(home, tmp_path / "logs", 120, "maintain-waits")
        deadline = time.monotonic() + 60
        while "waiting up to 120 s" not in other.stderr:
            assert other.proc.poll() is None, other.stderr
            assert time.monotonic() < deadline, "the second writer never said it waits"
            time.sleep(0.1)
        procs.release(pause, HOLD)
        assert holder.wait(timeout=60) == 0, holder.stderr
        assert other.wait(timeout=120) == 0, other.stderr
        assert "took over" not in other.stderr  # the holder released its lease: nothing to take over
        assert lease.read_holder(load_config()) is None  # and so did the second writer
    finally:
        procs.stop_all([holder])


def test_a_killed_holder_leaves_its_lease_free_and_the_next_writer_says_so(home, tmp_path):
    holder = start_holder(home, tmp_path / "pause", tmp_path / "logs")
    record = lease.read_holder(load_config())
    assert record["pid"] == holder.pid and record["step"] == "holder-test"
    holder.kill()  # SIGKILL: no finally block runs, the record stays behind
    assert lease.read_holder(load_config())["pid"] == holder.pid

    t0 = time.monotonic()
    other = writer(home, tmp_path / "logs", 30, "maintain-after-kill")
    assert other.wait(timeout=120) == 0, other.stderr
    assert time.monotonic() - t0 < 30  # not a timeout: the kernel freed the dead holder's lock at once
    assert f"took over the warehouse lease of step holder-test (pid {holder.pid} on " in other.stderr
    assert "waiting" not in other.stderr
    assert lease.read_holder(load_config()) is None


def test_reentrant_in_a_process_with_a_heartbeat(cfg, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CTX_DAG_ID", "daily_refresh")
    monkeypatch.setenv("AIRFLOW_CTX_DAG_RUN_ID", "scheduled__2026-11-02")
    cfg.storage.lease_heartbeat_s = 0.2
    folder = lease.lease_dir(cfg)
    assert folder == cfg.warehouse_root / "_lease"
    said = []
    with lease.hold(cfg, "run-day", log=said.append) as outer:
        with lease.hold(cfg, "ingest", log=said.append) as inner:  # the day's steps: no second acquire
            assert inner is outer
        first = json.loads((folder / lease.HOLDER_FILE).read_text())
        assert first["step"] == "run-day" and first["pid"] == os.getpid()
        assert first["dag_id"] == "daily_refresh" and first["run_id"] == "scheduled__2026-11-02"
        time.sleep(1.5)
        later = json.loads((folder / lease.HOLDER_FILE).read_text())
        assert later["heartbeat_at"] > first["heartbeat_at"] and later["started_at"] == first["started_at"]
        # Another process cannot take it meanwhile.
        probe = subprocess.run(
            [sys.executable, "-c", f"import filelock; filelock.FileLock({str(folder / lease.LOCK_FILE)!r}).acquire(0)"],
            capture_output=True,
            text=True,
        )
        assert probe.returncode != 0 and "Timeout" in probe.stderr
    assert said == [] and not (folder / lease.HOLDER_FILE).exists()
    with lease.hold(cfg, "again", log=said.append):  # free again, no takeover to report
        pass
    assert said == []


def test_a_bucket_warehouse_keeps_its_lease_on_local_disk(cfg):
    cfg.paths.warehouse_root = "s3://bucket/warehouse"
    assert lease.lease_dir(cfg) == cfg.home / "lease"
    cfg.storage.lease_dir = str(cfg.home / "shared-lock")
    assert lease.lease_dir(cfg) == cfg.home / "shared-lock"


def test_no_wait_fails_at_once(home, tmp_path):
    holder = start_holder(home, tmp_path / "pause", tmp_path / "logs")
    try:
        other = writer(home, tmp_path / "logs", 0, "maintain-nowait")
        assert other.wait(timeout=60) == 75
        assert "the warehouse is being written by step holder-test" in other.stderr
    finally:
        procs.stop_all([holder])
