"""Data-parallel training (models/train.py `fit` under torch.distributed): two real processes over gloo, each
training on half of every epoch's batches, end with one model and the validation metric one process reaches; a
two-process run killed (SIGKILL, launcher and ranks) after an epoch and resumed ends exactly as an uninterrupted one."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from userformer.jobs.core import hooks
from userformer.jobs.core.config import TrainConfig
from userformer.models import data as model_data
from userformer.models.train import fit

from .test_model import tiny_cfg, tiny_data

REPO = Path(__file__).resolve().parents[2]

# Per rank: two ranks of 8 make the single process's batch of 16.
TRAIN = TrainConfig(epochs=30, batch_size=16, lr=1e-2, uniform_negatives=16, num_threads=1, patience=100)


def _split():
    seqs, catalog = tiny_data(n_users=96)
    train, valid, _ = model_data.leave_one_out(seqs)
    return train, valid, catalog


def _rank(rank: int, world: int, store: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        train, valid, catalog = _split()
        tc = dataclasses.replace(TRAIN, batch_size=TRAIN.batch_size // world)
        model, hist = fit(tiny_cfg(), tc, train, valid, catalog, progress=False, log=lambda s: None)
        torch.save({"state": model.state_dict(), "history": hist}, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_reach_the_metric_of_one(tmp_path):
    # What "the same metric" can mean on 96 users: the spread of one process over seeds (about +-0.05 here).
    train, valid, catalog = _split()
    ones = [
        fit(tiny_cfg(), dataclasses.replace(TRAIN, seed=s), train, valid, catalog, progress=False, log=lambda s: None)
        for s in (0, 1, 2)
    ]
    ones = np.array([h["best_valid"] for _, h in ones])

    mp.spawn(_rank, args=(2, f"file://{tmp_path}/store", str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    # One model: every rank returns rank 0's best, and both logged the same loss (averaged over the ranks).
    assert all(torch.equal(a, b) for a, b in zip(r0["state"].values(), r1["state"].values(), strict=True))
    assert [h["loss"] for h in r0["history"]["history"]] == [h["loss"] for h in r1["history"]["history"]]
    two = r0["history"]
    losses = [h["loss"] for h in two["history"]]
    assert losses[-1] < 0.5 * losses[0]
    lo, hi = ones.min() - ones.std(), ones.max() + ones.std()
    print(f"valid ndcg@10: one process (seeds 0-2) {np.round(ones, 4).tolist()}, two processes {two['best_valid']:.4f}")
    assert lo <= two["best_valid"] <= hi, (two["best_valid"], ones.tolist())


def _sparse_grad_rank(rank: int, world: int, store: str, out: str) -> None:
    """One DDP step (fit's `_BatchLoss`) on this rank's batch with sparse item-id tables; saves the gradient."""
    from userformer.models import losses
    from userformer.models.model import UserFormer
    from userformer.models.train import _BatchLoss, sparse_tables

    torch.distributed.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        train, _, catalog = _split()
        tc = dataclasses.replace(TRAIN, sparse_embeddings=True)
        torch.manual_seed(0)
        model = UserFormer(tiny_cfg(item_dropout=0.0), catalog)  # no random draws but the seeded ones
        sparse_tables(model, tc)  # before DDP is built: it reads the flags then
        sampler = losses.NegativeSampler(model_data.item_counts(train, catalog.n_items), 16, 0, seed=0)
        step = torch.nn.parallel.DistributedDataParallel(
            _BatchLoss(model, tc, sampler, torch.Generator().manual_seed(0)), find_unused_parameters=True
        )
        batch = model_data.pad_batch(train, np.arange(4) + 4 * rank, 11)
        step(batch, True).backward()
        torch.save(model.item_tower.embs["item_id"].weight.grad.coalesce(), f"{out}/grad{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_averages_sparse_gradients(tmp_path):
    """DistributedDataParallel with sparse item-id tables: every rank ends the backward pass with the mean of the
    ranks' sparse gradients (what one process would get from both batches at half weight)."""
    from userformer.models import losses
    from userformer.models.model import UserFormer
    from userformer.models.train import batch_loss, sparse_tables

    mp.spawn(_sparse_grad_rank, args=(2, f"file://{tmp_path}/store", str(tmp_path)), nprocs=2, join=True)
    g0, g1 = (torch.load(tmp_path / f"grad{r}.pt", weights_only=True) for r in (0, 1))
    assert g0.is_sparse and torch.equal(g0.to_dense(), g1.to_dense())
    train, _, catalog = _split()
    tc = dataclasses.replace(TRAIN, sparse_embeddings=True)
    torch.manual_seed(0)
    model = UserFormer(tiny_cfg(item_dropout=0.0), catalog)  # no random draws but the seeded ones
    sparse_tables(model, tc)
    sampler = losses.NegativeSampler(model_data.item_counts(train, catalog.n_items), 16, 0, seed=0)
    total = 0.0
    for rank in (0, 1):  # each rank's own negatives: the same seed on both ranks here
        sampler.gen.manual_seed(0)
        batch = model_data.pad_batch(train, np.arange(4) + 4 * rank, 11)
        total = total + batch_loss(model, batch, tc, sampler, torch.Generator().manual_seed(0), True)[0] / 2
    total.backward()
    assert torch.allclose(g0.to_dense(), model.item_tower.embs["item_id"].weight.grad.to_dense(), atol=1e-6)


# ------------------------------------------------------------------ resume
# Per rank; three epochs, so that the resumed run has two to go and its second starts from resumed state.
RESUME = TrainConfig(epochs=3, batch_size=8, lr=1e-2, uniform_negatives=16, num_threads=1, patience=100)
PAUSE_POINT = "train.after_epoch"


def _resumable_rank(run_dir: str, sparse: bool, resume: bool) -> None:
    """One rank as `userformer train` runs it (jobs/steps/train.py: `_fit_rank` -> `_fit`: last.pt and best.pt in the
    run folder, the pause point after every epoch), on the tiny in-memory data instead of a warehouse snapshot."""
    from userformer.jobs.steps import train as train_step

    torch.distributed.init_process_group("gloo")
    try:
        train, valid, catalog = _split()
        tc = dataclasses.replace(RESUME, sparse_embeddings=sparse)
        run = Path(run_dir)
        state = torch.load(run / "last.pt", map_location="cpu", weights_only=True) if resume else None
        model, hist = train_step._fit(
            tiny_cfg(), tc, train, valid, catalog, run, state, {}, progress=False, log=lambda s: None
        )
        if torch.distributed.get_rank() == 0:
            torch.save({"state": model.state_dict(), "history": hist}, run / "result.pt")
    finally:
        torch.distributed.destroy_process_group()


def _launch(run_dir: str, sparse: bool, resume: bool) -> None:
    """Two ranks started as `_fit_parallel` starts them (torch.distributed's elastic launcher, spawn, c10d on
    127.0.0.1)."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=2,
        run_id=f"test-{Path(run_dir).name}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    elastic_launch(launch, _resumable_rank)(run_dir, sparse, resume)


def _start(run_dir: Path, sparse: bool, resume: bool, pause_dir: Path | None = None) -> subprocess.Popen:
    """The launcher in a process of its own session, so that one killpg takes it and its ranks."""
    env = {k: v for k, v in os.environ.items() if k not in (hooks.ENV_POINTS, hooks.ENV_DIR)}
    if pause_dir is not None:
        env.update({hooks.ENV_POINTS: PAUSE_POINT, hooks.ENV_DIR: str(pause_dir)})
    code = f"from tests.unit.test_distributed import _launch; _launch({str(run_dir)!r}, {sparse!r}, {resume!r})"
    log = open(run_dir / f"launcher-{'resume' if resume else 'first'}.log", "w")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _finish(proc: subprocess.Popen, run_dir: Path, timeout: float = 300) -> dict:
    rc = proc.wait(timeout=timeout)
    logs = "".join(p.read_text()[-3000:] for p in run_dir.glob("launcher-*.log"))
    assert rc == 0, logs
    return torch.load(run_dir / "result.pt", weights_only=False)


@pytest.mark.slow
def test_two_process_sparse_run_killed_after_an_epoch_resumes_exactly(tmp_path):
    """With sparse item-id tables (SparseAdam's state in last.pt): killed with SIGKILL (launcher and both ranks)
    while every rank waits at `train.after_epoch` after epoch 1, resumed from the run folder's last.pt: the same
    weights and the same per-epoch losses as an uninterrupted run, bit for bit (CPU, gloo, one thread per rank;
    every rank continues its own negatives and dropout). The dense case is the command's own test
    (tests/integration/test_train.py)."""
    sparse = True
    whole, cut, pauses = tmp_path / "whole", tmp_path / "cut", tmp_path / "pauses"
    for d in (whole, cut):
        d.mkdir()
    first = _start(cut, sparse, resume=False, pause_dir=pauses)
    reference = _start(whole, sparse, resume=False)  # meanwhile, the uninterrupted run
    deadline = time.monotonic() + 300
    while len(list(pauses.glob(f"{PAUSE_POINT}.*"))) < 2:  # both ranks there (rank 0 after writing last.pt)
        assert first.poll() is None, (cut / "launcher-first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the ranks never reached the pause point"
        time.sleep(0.1)
    ranks = [int(p.suffix[1:]) for p in pauses.glob(f"{PAUSE_POINT}.*")]
    assert first.pid not in ranks  # the ranks are the launcher's children
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    for pid in ranks:  # gone with it: nothing finishes the epoch's work behind the test's back
        deadline = time.monotonic() + 30
        while _alive(pid):
            assert time.monotonic() < deadline, f"rank pid {pid} survived the kill"
            time.sleep(0.1)
    state = torch.load(cut / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and not (cut / "result.pt").exists()
    assert len(state["rng_ranks"]) == 2 and state["rng_ranks"][0]["gen"].tolist() == state["rng"]["gen"].tolist()
    assert set(state["optimizer"]) == ({"dense", "sparse"} if sparse else {"state", "param_groups"})

    resumed = _finish(_start(cut, sparse, resume=True), cut)
    ref = _finish(reference, whole)
    for (k, x), y in zip(ref["state"].items(), resumed["state"].values(), strict=True):
        assert torch.equal(x, y), k
    losses = [h["loss"] for h in ref["history"]["history"]]
    assert [h["loss"] for h in resumed["history"]["history"]] == losses and len(losses) == 3
    assert resumed["history"]["best_valid"] == ref["history"]["best_valid"]
    assert resumed["history"]["best_epoch"] == ref["history"]["best_epoch"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0; it has done all it will do.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
