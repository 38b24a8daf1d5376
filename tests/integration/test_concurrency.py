"""Two real `userformer ingest` processes on one warehouse at the same time.

With one lease (one host, or hosts sharing the lease folder): the second waits for the first, says whom it waits
for, and both land as if run one after the other.

Without a shared lease (two hosts writing one bucket, each with its own lock): both are held after they read every
table (vocab, items, events) until both have, then released together, so they really race for their commits.
Whatever the interleaving: each exits 0 or 75 with the ConcurrentWrite message (never another error, never a
silent overwrite), vocab never hands one id out twice, what the winner committed equals a clean one-process
ingest, and the loser's rerun lands as if the two had run one after the other.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from userformer.jobs.steps import ingest as ingest_mod

from . import procs
from .rawdata import D1, D2, open_gate, three_days
from .test_ingest import clean_ingest, read, tables_of

pytestmark = [pytest.mark.spark, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _open_gate(home, monkeypatch):
    """Every test here runs on hand-made drops: the events gate is opened for them (rawdata.OPEN_GATE)."""
    open_gate(monkeypatch)


POINT = "ingest.before_commit"
CASES = {"two drops": (D1, D2), "one drop twice": (D1, D1)}


def assert_vocab_unique(cfg) -> None:
    v = read(cfg, "vocab")
    for cols in (("kind", "key"), ("kind", "idx")):
        n = v.group_by(list(cols)).aggregate([]).num_rows
        assert n == v.num_rows, f"vocab has {v.num_rows - n} duplicate {cols}"
    for kind in set(v["kind"].to_pylist()):
        ids = sorted(v.filter(pa.compute.equal(v["kind"], kind))["idx"].to_pylist())
        assert ids == list(range(1, len(ids) + 1)), kind


def test_two_ingests_queue_on_the_lease(cfg, spark, tmp_path):
    three_days(cfg.raw_root)
    pause = tmp_path / "pause"
    first = procs.start(
        cfg.paths.home, tmp_path / "logs", "ingest", "--dt", str(D2), pause_at=POINT, pause_dir=pause, name="first"
    )
    second = None
    try:
        procs.wait_paused(pause, POINT, [first])  # holding the lease, about to commit
        second = procs.start(cfg.paths.home, tmp_path / "logs", "ingest", "--dt", str(D1), name="second")
        procs.wait_said(second, "waiting up to", timeout=120)
        assert f"held by step ingest (pid {first.pid} on " in second.stderr
        procs.release(pause, POINT)
        codes = [first.wait(), second.wait()]
    finally:
        procs.stop_all([first] + ([second] if second else []))
    assert codes == [0, 0], (first.stderr[-3000:], second.stderr[-3000:])
    assert_vocab_unique(cfg)
    got, want = tables_of(cfg), clean_ingest(tmp_path, D2, D1)
    for name in want:
        assert got[name].equals(want[name]), name


@pytest.mark.parametrize("days", CASES.values(), ids=list(CASES))
def test_two_ingests_at_once_without_a_shared_lease(cfg, spark, tmp_path, days):
    three_days(cfg.raw_root)
    pause = tmp_path / "pause"
    steps = [
        procs.start(
            cfg.paths.home,
            tmp_path / "logs",
            "ingest",
            "--dt",
            str(d),
            pause_at=POINT,
            pause_dir=pause,
            name=f"ingest-{i}-{d}",
            env={"USERFORMER__STORAGE__LEASE_DIR": str(tmp_path / f"lease-{i}")},  # two hosts, two locks
        )
        for i, d in enumerate(days)
    ]
    try:
        procs.wait_paused(pause, POINT, steps)
        procs.release(pause, POINT)
        codes = [s.wait() for s in steps]
    finally:
        procs.stop_all(steps)

    for s, code in zip(steps, codes):
        assert code in (0, 75), f"exit {code}:\n{s.stderr[-4000:]}"
        if code == 75:
            assert "userformer ingest: error: another writer committed to" in s.stderr
            assert "Traceback" not in s.stderr
    # Both read the same (empty) vocab and both bring new keys: exactly one commits them, the other must lose.
    assert sorted(codes) == [0, 75]
    winner, loser = days[codes.index(0)], days[codes.index(75)]
    assert_vocab_unique(cfg)
    got, want = tables_of(cfg), clean_ingest(tmp_path, winner)
    for name in want:
        assert got[name].equals(want[name]), name

    ingest_mod.ingest(cfg, loser)  # the retry Airflow (or an operator) makes
    assert_vocab_unique(cfg)
    got, want = tables_of(cfg), clean_ingest(tmp_path, winner, loser)
    for name in want:
        assert got[name].equals(want[name]), name
