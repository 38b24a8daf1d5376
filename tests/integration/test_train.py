"""`userformer train / finetune / evaluate` on a real warehouse (generate -> ingest -> sequences with Spark).

One small warehouse (300 users, 400 items, 4 days + an empty 5th drop) is built
once for the module and only read; every test has its own models/ and reports/.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from userformer.jobs.core import drops, registry, stream
from userformer.jobs.core.config import load_config
from userformer.jobs.core.errors import UserError
from userformer.jobs.core.storage import delta
from userformer.jobs.steps import ingest, sequences, train
from userformer.jobs.tools import generate
from userformer.schemas.tables import RAW_EVENTS

from . import procs

pytestmark = pytest.mark.spark

START = dt.date(2026, 11, 1)
D3, D4, D5, D6 = (START + dt.timedelta(days=i) for i in (2, 3, 4, 5))
EXE = str(Path(sys.executable).parent / "userformer")
TINY = {
    "MODEL__D_MODEL": "16",
    "MODEL__MAX_LEN": "20",
    "MODEL__TIME_BUCKETS": "8",
    "TRAIN__EPOCHS": "2",
    "TRAIN__BATCH_SIZE": "64",
    "TRAIN__UNIFORM_NEGATIVES": "64",
    "TRAIN__STREAM_CHUNK_USERS": "64",
    "TRAIN__NUM_THREADS": "2",
}


def quiet(line):
    pass


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory, spark):
    root = tmp_path_factory.mktemp("warehouse")
    # D5 is a quiet day (a drop without events): the events gate's row-count band must start at 0 to let it in.
    cfg = load_config(env={"USERFORMER_HOME": str(root), "USERFORMER__QUALITY__ROW_COUNT_BAND": "[0.0, 5.0]"})
    generate.generate(cfg, users=300, items=400, days=4, start=START, seed=3)
    for i in range(4):
        ingest.ingest(cfg, START + dt.timedelta(days=i))
        sequences.update(cfg, START + dt.timedelta(days=i))
    d = cfg.raw_events_dir(D5)  # a day with a drop but no events
    d.mkdir(parents=True)
    pq.write_table(RAW_EVENTS.empty_table(), d / "part-0.parquet")
    ingest.ingest(cfg, D5, allow_empty=True)
    assert sequences.update(cfg, D5)["active_users"] == 0
    return root


def env_of(warehouse: Path, home: Path, **settings) -> dict:
    env = {
        "USERFORMER_HOME": str(home),
        "USERFORMER__PATHS__WAREHOUSE_ROOT": str(warehouse / "warehouse"),
        "USERFORMER__PATHS__RAW_ROOT": str(warehouse / "raw"),
    }
    env.update({f"USERFORMER__{k}": v for k, v in {**TINY, **settings}.items()})
    return env


def config(warehouse: Path, home: Path, **settings):
    return load_config(env=env_of(warehouse, home, **settings))


@pytest.fixture(scope="module")
def trained(warehouse, tmp_path_factory):
    """A registry holding one model trained as of D3 (published, being the first)."""
    home = tmp_path_factory.mktemp("trained")
    cfg = config(warehouse, home)
    s = train.train(cfg, day=D3, progress=False, log=quiet)
    return cfg.models_root, s


def with_registry(cfg, trained) -> str:
    shutil.copytree(trained[0], cfg.models_root)
    return trained[1]["version"]


def weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ train
def test_train_registers_publishes_and_records_its_data(warehouse, trained, tmp_path):
    cfg = config(warehouse, tmp_path, TRAIN__EPOCHS="1")
    v1 = with_registry(cfg, trained)
    s = trained[1]
    assert v1 == "v0001-20261103-train" and s["published"] and s["train_sequences"] > 100 and s["valid_users"] > 10
    # As of D3: the user_sequences version that applied D3 (time travel; the table is at D4 now) and the
    # vocabulary of ids first seen by D3.
    seq_path = cfg.table_path("user_sequences")
    v_d3, _ = drops.sequences_version(cfg, D3)
    assert s["data"]["user_sequences"] == {"path": str(seq_path), "version": v_d3} and v_d3 < delta.version_of(seq_path)
    assert s["data"]["vocab"]["version"] == delta.version_of(cfg.table_path("vocab"))
    vocab = delta.read_arrow(cfg.table_path("vocab")).to_pylist()
    n_items_d3 = max(r["idx"] for r in vocab if r["kind"] == "item" and r["first_dt"] <= D3) + 1
    model, ck = registry.load(cfg)
    assert ck["version"] == v1 and ck["data"] == s["data"] and ck["parent"] is None
    assert (
        ck["vocab_sizes"]["item"] == n_items_d3 < 401 and model.item_tower.embs["item_id"].num_embeddings == n_items_d3
    )
    assert ck["protocol"]["split_time"] == "2026-11-03T00:00:00+00:00" and ck["model_config"]["d_model"] == 16
    assert {"hr@10", "recall@10", "ndcg@10", "coverage@10", "entropy@50"} <= set(ck["metrics"]["valid"])
    man = json.loads((registry.version_dir(cfg, v1) / "manifest.json").read_text())
    assert man["data"] == s["data"] and man["metrics"]["valid_most_popular"]["users"] == s["valid_users"]
    assert "state_dict" not in man and man["files"]["model.pt"]["sha256"] == registry.sha256(
        registry.version_dir(cfg, v1) / "model.pt"
    )
    run = json.loads((cfg.models_root / "runs" / s["run_id"] / "run.json").read_text())
    assert run["status"] == "finished" and not (cfg.models_root / "runs" / s["run_id"] / "last.pt").exists()

    # Later models are registered; only --publish moves the pointer.
    s2 = train.train(cfg, progress=False, log=quiet)  # as of the latest drop (D4)
    assert s2["version"] == "v0002-20261104-train" and not s2["published"] and registry.published(cfg)["version"] == v1
    assert registry.load(cfg, s2["version"])[1]["vocab_sizes"]["item"] == 401
    s3 = train.train(cfg, day=D3, publish=True, max_users=100, progress=False, log=quiet)
    assert s3["published"] and registry.published(cfg) | {"published_at": None} == {
        "version": s3["version"],
        "published_at": None,
        "reason": "userformer train --publish",
        "previous": v1,
    }
    assert s3["train_sequences"] < s["train_sequences"]


def test_resume_ends_like_an_uninterrupted_run(warehouse, tmp_path):
    a = config(warehouse, tmp_path / "a")
    b = config(warehouse, tmp_path / "b")
    sa = train.train(a, day=D3, progress=False, log=quiet)

    class Crash(Exception):
        pass

    def crash_after_epoch_1(line):
        if line.startswith("epoch=1 "):
            raise Crash  # the process dies after epoch 1 was checkpointed

    with pytest.raises(Crash):
        train.train(b, day=D3, progress=False, log=crash_after_epoch_1)
    (run_dir,) = (b.models_root / "runs").iterdir()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1
    assert registry.published(b) is None
    sb = train.train(b, resume="latest", progress=False, log=quiet)
    assert sb["run_id"] == run_dir.name and sb["epochs"] == sa["epochs"] == 2
    ma, cka = registry.load(a, sa["version"])
    mb, ckb = registry.load(b, sb["version"])
    for (k, x), y in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(x, y), k
    assert cka["metrics"]["valid"] == ckb["metrics"]["valid"] and cka["epoch"] == ckb["epoch"]
    assert [h["loss"] for h in cka["history"]] == [h["loss"] for h in ckb["history"]]
    assert registry.published(b)["version"] == sb["version"]
    assert train.train(b, resume=run_dir.name, log=quiet) == sb  # a finished run: nothing to do
    with pytest.raises(UserError, match="no unfinished training run"):
        train.train(b, resume="latest", log=quiet)


def test_train_in_two_processes(warehouse, trained, tmp_path):
    """train.processes = 2: two worker processes (torch.distributed's elastic launcher, gloo on 127.0.0.1) train one
    model by DDP, each on half of every epoch's batches; it is registered like a one-process model, on the same data."""
    cfg = config(warehouse, tmp_path, TRAIN__PROCESSES="2", TRAIN__NUM_THREADS="1", TRAIN__BATCH_SIZE="32")
    s = train.train(cfg, day=D3, progress=False, log=quiet)
    one = trained[1]
    assert s["published"] and s["epochs"] == one["epochs"] == 2
    assert (s["train_sequences"], s["valid_users"], s["data"]) == (
        one["train_sequences"],
        one["valid_users"],
        one["data"],
    )
    model, ck = registry.load(cfg, s["version"])
    assert ck["train_config"]["processes"] == 2 and len(ck["history"]) == 2
    run_dir = cfg.models_root / "runs" / s["run_id"]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished" and not (run_dir / "last.pt").exists()
    print("valid recall@10: one process", one["valid"], "two", s["valid"])
    assert s["valid"]["recall@10"] > 0


@pytest.mark.slow
def test_two_process_run_killed_after_an_epoch_resumes_like_an_uninterrupted_one(warehouse, tmp_path):
    """`userformer train` with train.processes = 2, SIGKILLed (the command, the launcher in it and both ranks) while
    the ranks wait at `train.after_epoch` after epoch 1, then `--resume latest`: the same model as an uninterrupted
    two-process run, bit for bit (every rank continues its own random streams)."""
    two = {"TRAIN__PROCESSES": "2", "TRAIN__NUM_THREADS": "1", "TRAIN__BATCH_SIZE": "32"}
    a = config(warehouse, tmp_path / "a", **two)
    b = config(warehouse, tmp_path / "b", **two)
    pauses = tmp_path / "pauses"
    step = procs.start(
        tmp_path / "b",
        tmp_path / "logs",
        "train",
        "--dt",
        str(D3),
        "--no-progress",
        pause_at="train.after_epoch",
        pause_dir=pauses,
        env={k: v for k, v in env_of(warehouse, tmp_path / "b", **two).items() if k != "USERFORMER_HOME"},
    )
    try:
        deadline = time.monotonic() + 300
        while len(list(pauses.glob("train.after_epoch.*"))) < 2:  # both ranks, rank 0 after writing last.pt
            assert step.proc.poll() is None, step.stderr[-4000:]
            assert time.monotonic() < deadline, "the ranks never reached train.after_epoch"
            time.sleep(0.2)
        ranks = [int(p.suffix[1:]) for p in pauses.glob("train.after_epoch.*")]
        assert step.pid not in ranks
        step.kill()  # its process group: the command, the elastic agent in it, both ranks
    finally:
        procs.stop_all([step])
    (run_dir,) = (b.models_root / "runs").iterdir()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
    state = torch.load(run_dir / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and len(state["rng_ranks"]) == 2
    assert registry.published(b) is None

    sb = train.train(b, resume="latest", progress=False, log=quiet)
    sa = train.train(a, day=D3, progress=False, log=quiet)
    assert sb["run_id"] == run_dir.name and sb["epochs"] == sa["epochs"] == 2
    ma, cka = registry.load(a, sa["version"])
    mb, ckb = registry.load(b, sb["version"])
    for (k, x), y in zip(ma.state_dict().items(), mb.state_dict().values(), strict=True):
        assert torch.equal(x, y), k
    assert cka["metrics"]["valid"] == ckb["metrics"]["valid"] and cka["epoch"] == ckb["epoch"]
    assert [h["loss"] for h in cka["history"]] == [h["loss"] for h in ckb["history"]]


# --------------------------------------------------------------- finetune
def test_finetune_grows_the_published_model_and_promotes_it(warehouse, trained, tmp_path):
    cfg = config(warehouse, tmp_path, FINETUNE__MAX_QUALITY_DROP="1.0", FINETUNE__MIN_HOLDOUT_USERS="1")
    v1 = with_registry(cfg, trained)
    old, _ = registry.load(cfg, v1)
    before = weights(old)
    r = train.finetune(cfg, D4, progress=False, log=quiet)
    assert r["trained"] and r["promoted"] and r["status"] == "promoted" and r["parent"] == v1
    assert registry.published(cfg)["version"] == r["version"] == "v0002-20261104-finetune"
    assert 0 < r["gate_users"] <= r["holdout_users"] < r["active_users"] and r["train_sequences"] > 0
    man = registry.read_manifest(cfg, r["version"])
    n_items = stream.warehouse_catalog(cfg, D4).catalog.sizes["item"]
    assert (
        man["parent"] == v1
        and man["dt"] == str(D4)
        and man["grown"]["item"] == [before["item_tower.attrs"].shape[0], n_items]
    )
    assert man["gate"]["promote"] and set(man["metrics"]["gate"]) == {"candidate", "published", "most_popular"}
    stale = man["stale_embeddings"]
    assert {"recall@10", "ndcg@10"} <= set(stale["stale_user_embeddings"]) and "re-embedded" in stale["rule"]
    assert stale["fresh_user_embeddings"]["recall@10"] == man["metrics"]["gate"]["candidate"]["recall@10"]
    new, ck = registry.load(cfg)
    assert new.item_tower.embs["item_id"].num_embeddings == n_items and ck["protocol"]["trained_until"].startswith(
        "2026-11-05"
    )

    # Growing keeps every old row exactly (the published model, grown to D4's vocabulary, before training).
    grown = registry.fit_to_catalog(old, stream.warehouse_catalog(cfg, D4).catalog, "v1")
    assert grown == man["grown"]
    for k, v in old.state_dict().items():
        o = before[k]
        assert torch.equal(v[: o.shape[0]] if o.dim() else v, o) or k == "item_tower.attrs", k

    again = train.finetune(cfg, D4, progress=False, log=quiet)  # a rerun: D4 is in the published model already
    assert (
        not again["trained"]
        and "already trained" in again["reason"]
        and registry.published(cfg)["version"] == r["version"]
    )


def test_finetune_below_the_gate_is_registered_as_rejected(warehouse, trained, tmp_path):
    # Demand 11x the published model's quality: a candidate cannot pass.
    cfg = config(
        warehouse,
        tmp_path,
        FINETUNE__MAX_QUALITY_DROP="-10",
        FINETUNE__MIN_HOLDOUT_USERS="1",
        FINETUNE__GATE_METRICS='["hr@10", "ndcg@10", "recall@10"]',
    )
    v1 = with_registry(cfg, trained)
    r = train.finetune(cfg, D4, progress=False, log=quiet)
    checks = r["gate"]["checks"]
    assert any(c["published"] > 0 for c in checks.values())
    assert r["trained"] and not r["promoted"] and r["status"] == "rejected" and "below the published" in r["reason"]
    assert registry.published(cfg)["version"] == v1 and r["published"] == v1
    assert [m["status"] for m in registry.list_versions(cfg)] == ["registered", "rejected"]


def test_candidate_then_gate_as_the_daily_dag_runs_them(warehouse, trained, tmp_path):
    """finetune(promote=False) registers a candidate; promote_candidate applies the rule of the config it runs with."""
    cfg = config(warehouse, tmp_path, FINETUNE__MAX_QUALITY_DROP="1.0", FINETUNE__MIN_HOLDOUT_USERS="1")
    v1 = with_registry(cfg, trained)
    r = train.finetune(cfg, D4, promote=False, progress=False, log=quiet)
    assert r["trained"] and r["status"] == "candidate" and not r["promoted"]
    assert (
        registry.published(cfg)["version"] == v1 and registry.read_manifest(cfg, r["version"])["status"] == "candidate"
    )
    # A rerun of the day finds the candidate instead of training another.
    again = train.finetune(cfg, D4, promote=False, progress=False, log=quiet)
    assert not again["trained"] and again["version"] == r["version"] and len(registry.list_versions(cfg)) == 2

    # The gate, under a stricter config than the candidate was trained with: rejected, pointer unchanged.
    strict = config(warehouse, tmp_path, FINETUNE__MAX_QUALITY_DROP="-10", FINETUNE__MIN_HOLDOUT_USERS="1")
    g = train.promote_candidate(strict, D4, r["version"])
    assert not g["promoted"] and g["status"] == "rejected" and "below the published" in g["reason"]
    assert registry.published(cfg)["version"] == v1
    man = registry.read_manifest(cfg, r["version"])
    assert man["status"] == "rejected" and man["status_history"][-1]["status"] == "rejected"
    # Judged once: a later, laxer gate does not overturn it.
    assert train.promote_candidate(cfg, D4, r["version"])["reason"] == "already judged: rejected"
    with pytest.raises(UserError, match="not a fine-tuned candidate of drop 2026-11-05"):
        train.promote_candidate(cfg, D5, r["version"])


def test_gate_promotes_a_passing_candidate_and_again_after_a_restore(warehouse, trained, tmp_path):
    cfg = config(warehouse, tmp_path, FINETUNE__MAX_QUALITY_DROP="1.0", FINETUNE__MIN_HOLDOUT_USERS="1")
    v1 = with_registry(cfg, trained)
    c4 = train.finetune(cfg, D4, promote=False, progress=False, log=quiet)["version"]
    g = train.promote_candidate(cfg, D4, c4)
    assert g["promoted"] and g["status"] == "promoted" and registry.published(cfg)["version"] == c4
    assert registry.published(cfg)["previous"] == v1
    # After the published model went back to the parent (a repair's restore), the rerun reuses the candidate
    # and the gate publishes it again instead of training another.
    registry.publish(cfg, v1, "test: back to v1")
    again = train.finetune(cfg, D4, promote=False, progress=False, log=quiet)
    assert again["version"] == c4 and not again["trained"] and again["status"] == "promoted"
    g = train.promote_candidate(cfg, D4, c4)
    assert g["promoted"] and registry.published(cfg)["version"] == c4 and len(registry.list_versions(cfg)) == 2
    assert train.promote_candidate(cfg, D4, c4)["reason"] == "already judged: promoted"


def test_gate_refuses_a_candidate_of_another_parent(warehouse, trained, tmp_path):
    cfg = config(warehouse, tmp_path, FINETUNE__MAX_QUALITY_DROP="1.0", FINETUNE__MIN_HOLDOUT_USERS="1")
    with_registry(cfg, trained)
    c4 = train.finetune(cfg, D4, promote=False, progress=False, log=quiet)["version"]
    registry.publish(cfg, c4, "test: another model published meanwhile")  # no longer the candidate's parent
    g = train.promote_candidate(cfg, D4, c4)
    assert not g["promoted"] and "not the candidate's parent" in g["reason"]
    assert registry.read_manifest(cfg, c4)["status"] == "rejected"


def test_finetune_without_a_model_or_a_day_and_an_empty_day(warehouse, trained, tmp_path):
    cfg = config(warehouse, tmp_path)
    with pytest.raises(UserError, match="no published model"):
        train.finetune(cfg, D4, log=quiet)
    v1 = with_registry(cfg, trained)
    r = train.finetune(cfg, D5, log=quiet)  # ingested, but no events
    assert not r["trained"] and not r["promoted"] and "no events" in r["reason"]
    assert registry.published(cfg)["version"] == v1 and len(registry.list_versions(cfg)) == 1
    with pytest.raises(UserError, match="no sequences for 2026-11-06"):
        train.finetune(cfg, D6, log=quiet)
    # As of the empty day, the data is the table as it stands (sequences made no commit for D5).
    seq = cfg.table_path("user_sequences")
    assert drops.sequences_version(cfg, D5) == (delta.version_of(seq), D5)
    with pytest.raises(UserError, match="includes drops up to 2026-11-05 only|up to 2026-11-04 only"):
        drops.sequences_version(cfg, D6)


# --------------------------------------------------------------- evaluate
def test_evaluate_writes_its_report_and_prints_a_table(warehouse, trained, tmp_path):
    cfg = config(warehouse, tmp_path)
    v1 = with_registry(cfg, trained)
    printed = []
    rep = train.evaluate(cfg, day=D3, out=printed.append)
    path = cfg.reports_root / "models" / v1 / "evaluate-dt=2026-11-03.json"
    assert rep["path"] == str(path) and json.loads(path.read_text())["models"] == rep["models"]
    assert set(rep["models"]) == {v1, "most_popular"} and rep["users"] > 10
    for m in rep["models"].values():
        assert {"users", "hr@10", "recall@10", "ndcg@10", "coverage@10", "entropy@50"} <= set(m)
        assert m["users"] == rep["users"]
    assert not rep["protocol"]["window_overlaps_training"] and rep["grown_since_model"] == {}
    assert "| most_popular |" in printed[0] and f"| {v1} |" in printed[0]
    # The next day: new items since the model (grown, content-initialised), still no overlap with training.
    rep4 = train.evaluate(cfg, version=v1, day=D4, out=quiet)
    assert rep4["grown_since_model"]["item"][1] == 401 and not rep4["protocol"]["window_overlaps_training"]


def test_cli(warehouse, trained, tmp_path):
    env = {**os.environ, **env_of(warehouse, tmp_path)}
    r = subprocess.run([EXE, "finetune", "--dt", str(D4)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "userformer finetune: error: no published model" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    with_registry(load_config(env=env_of(warehouse, tmp_path)), trained)
    r = subprocess.run([EXE, "evaluate", "--dt", str(D3)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| most_popular |" in r.stdout and "evaluate-dt=2026-11-03.json" in r.stdout
