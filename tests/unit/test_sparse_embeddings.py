"""train.sparse_embeddings: the item-id tables get sparse gradients and a lazy (SparseAdam) update; rows a step does
not use stay as they were, values and optimizer moments; resume is exact; a grown model trains on."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from userformer.jobs.core.config import TrainConfig
from userformer.models import data as model_data
from userformer.models import losses
from userformer.models.grow import grow
from userformer.models.model import UserFormer
from userformer.models.train import (
    Optimizer,
    batch_loss,
    clip_gradients,
    fit,
    sparse_tables,
)

from .test_model import tiny_cfg, tiny_data

# 60 items, 8 negatives and batches of 4 short sequences: a step uses a minority of the item rows.
N_ITEMS = 60
TRAIN = TrainConfig(
    epochs=3,
    batch_size=4,
    lr=1e-2,
    uniform_negatives=8,
    num_threads=1,
    patience=100,
    sparse_embeddings=True,
    weight_decay=0.01,
)


@pytest.fixture(scope="module")
def split():
    seqs, catalog = tiny_data(n_users=24, n_items=N_ITEMS, length=6)
    train, valid, _ = model_data.leave_one_out(seqs)
    return train, valid, catalog


def _model(catalog, seed: int = 0, **kw) -> UserFormer:
    torch.manual_seed(seed)
    return UserFormer(tiny_cfg(**kw), catalog)


def _batch(train, rows, max_len: int) -> dict:
    return model_data.pad_batch(train, np.asarray(rows), max_len + 1)


def _step(model, opt, params, batch, tcfg, sampler, gen) -> None:
    """One optimizer step as fit takes it."""
    loss, _ = batch_loss(model, batch, tcfg, sampler, gen, True)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    clip_gradients(params, tcfg.grad_clip)
    opt.step()


@pytest.mark.parametrize("tie", [True, False])
def test_the_option_makes_the_item_id_gradients_sparse(split, tie):
    train, _, catalog = split
    model = _model(catalog, tie_embeddings=tie)
    tables = sparse_tables(model, TRAIN)
    ids = [model.item_tower.embs["item_id"]] + ([] if tie else [model.encoder.features.embs["item_id"]])
    assert {id(t) for t in tables} == {id(t) for t in ids}  # a tied table once; the small attribute tables dense
    sampler = losses.NegativeSampler(model_data.item_counts(train, catalog.n_items), 8, 0, seed=0)
    loss, _ = batch_loss(model, _batch(train, [0, 1], 10), TRAIN, sampler, torch.Generator().manual_seed(0), True)
    loss.backward()
    for t in ids:
        assert t.weight.grad.is_sparse
    assert not model.item_tower.embs["brand"].weight.grad.is_sparse
    # The threshold takes the other id tables in too; the option off makes every table dense again.
    assert len(sparse_tables(model, dataclasses.replace(TRAIN, sparse_min_rows=1))) > len(ids)
    assert sparse_tables(model, dataclasses.replace(TRAIN, sparse_embeddings=False)) == []
    assert not any(e.sparse for e in model.item_tower.embs.values())


def test_rows_a_step_does_not_use_keep_their_values_and_moments(split):
    train, _, catalog = split
    model = _model(catalog)
    tables = sparse_tables(model, TRAIN)
    opt = Optimizer(model, TRAIN, tables)
    params = [p for p in model.parameters() if p.requires_grad]
    sampler = losses.NegativeSampler(model_data.item_counts(train, catalog.n_items), 8, 0, seed=0)
    gen = torch.Generator().manual_seed(0)
    table = model.item_tower.embs["item_id"].weight
    _step(model, opt, params, _batch(train, [0, 1, 2, 3], 10), TRAIN, sampler, gen)
    before = table.detach().clone()
    state = {k: v.clone() for k, v in opt.sparse.state[table].items() if k != "step"}
    assert set(state) == {"exp_avg", "exp_avg_sq"}

    _step(model, opt, params, _batch(train, [4, 5], 10), TRAIN, sampler, gen)
    used = torch.zeros(table.shape[0], dtype=torch.bool)
    used[table.grad.coalesce().indices()[0]] = True
    assert 0 < used.sum() < table.shape[0] // 2, int(used.sum())
    after = table.detach()
    assert torch.equal(after[~used], before[~used])  # no decay, no momentum drift of unused rows
    assert not torch.equal(after[used], before[used])
    for k, v in state.items():
        now = opt.sparse.state[table][k]
        assert torch.equal(now[~used], v[~used]), k
        assert not torch.equal(now[used], v[used]), k
    # Dense AdamW, for contrast: its momentum moves every row that ever had a gradient, at every step.
    dense = _model(catalog)
    off = dataclasses.replace(TRAIN, sparse_embeddings=False)
    dopt = Optimizer(dense, off, sparse_tables(dense, off))
    dparams = [p for p in dense.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    _step(dense, dopt, dparams, _batch(train, [0, 1, 2, 3], 10), off, sampler, gen)
    w = dense.item_tower.embs["item_id"].weight
    before = w.detach().clone()
    _step(dense, dopt, dparams, _batch(train, [4, 5], 10), off, sampler, gen)
    assert not torch.equal(w.detach()[~used][1:], before[~used][1:])


def test_clipping_a_sparse_gradient_equals_clipping_it_dense(split):
    """The norm of a sparse gradient is the norm of its summed rows (one row can hold several entries)."""
    train, _, catalog = split
    sampler = losses.NegativeSampler(model_data.item_counts(train, catalog.n_items), 8, 0, seed=0)
    grads = []
    for on in (True, False):
        model = _model(catalog)
        sparse_tables(model, dataclasses.replace(TRAIN, sparse_embeddings=on))
        b = _batch(train, [0, 1, 2], 10)
        loss, _ = batch_loss(model, b, TRAIN, sampler, torch.Generator().manual_seed(0), True)
        loss.backward()
        params = [p for p in model.parameters() if p.requires_grad]
        if on:
            assert not model.item_tower.embs["item_id"].weight.grad.is_coalesced()
            clip_gradients(params, 0.1)
        else:
            torch.nn.utils.clip_grad_norm_(params, 0.1)
        grads.append([p.grad.to_dense() for p in params])
        sampler.gen.manual_seed(0)
    for s, d in zip(*grads, strict=True):
        assert torch.allclose(s, d, atol=1e-7)


@pytest.mark.parametrize("bf16", [False, True])
def test_resume_continues_exactly_and_the_optimizer_state_round_trips(split, tmp_path, bf16):
    train, valid, catalog = split
    tcfg = dataclasses.replace(TRAIN, cpu_bf16=bf16)
    quiet = lambda s: None  # noqa: E731
    whole, hw = fit(tiny_cfg(), tcfg, train, valid, catalog, progress=False, log=quiet, state_path=tmp_path / "a.pt")

    class Killed(Exception):
        pass

    def die(epoch):
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        fit(
            tiny_cfg(),
            tcfg,
            train,
            valid,
            catalog,
            progress=False,
            log=quiet,
            state_path=tmp_path / "b.pt",
            after_epoch=die,
        )
    state = torch.load(tmp_path / "b.pt", weights_only=True)
    assert state["epoch"] == 1 and set(state["optimizer"]) == {"dense", "sparse"}
    (sparse_state,) = state["optimizer"]["sparse"]["state"].values()
    assert sparse_state["exp_avg"].shape == (catalog.sizes["item"], 16)
    again, ha = fit(
        tiny_cfg(), tcfg, train, valid, catalog, progress=False, log=quiet, state_path=tmp_path / "b.pt", resume=state
    )
    for (k, x), y in zip(whole.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(x, y), k
    assert [h["loss"] for h in hw["history"]] == [h["loss"] for h in ha["history"]]
    # The optimizer state at the end is the same too.
    a, b = (torch.load(tmp_path / f, weights_only=True)["optimizer"] for f in ("a.pt", "b.pt"))
    for part in ("dense", "sparse"):
        for i, s in a[part]["state"].items():
            for k, v in s.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(b[part]["state"][i][k])), (part, i, k)
    # A dense run's state does not load into a sparse run (nor the other way): a clear error.
    with pytest.raises(ValueError, match="sparse_embeddings"):
        fit(
            tiny_cfg(),
            dataclasses.replace(tcfg, sparse_embeddings=False),
            train,
            valid,
            catalog,
            progress=False,
            log=quiet,
            resume=state,
        )


def test_a_grown_model_trains_on_with_sparse_tables(split):
    train, valid, catalog = split
    quiet = lambda s: None  # noqa: E731
    tcfg = dataclasses.replace(TRAIN, epochs=1)
    model, _ = fit(tiny_cfg(), tcfg, train, valid, catalog, progress=False, log=quiet)
    n_old = catalog.sizes["item"]
    bigger = model_data.ItemCatalog(  # 15 new items, with the attributes of items 1..15
        {a: np.concatenate([v, v[1:16]]) for a, v in catalog.attrs.items()},
        {**catalog.sizes, "item": n_old + 15},
    )
    grown = grow(model, bigger)
    ids = model.item_tower.embs["item_id"]
    assert grown["item"] == [n_old, n_old + 15] and ids.sparse
    assert model.encoder.features.embs["item_id"] is ids
    old = ids.weight.detach().clone()
    tuned, hist = fit(model.cfg, tcfg, train, None, bigger, progress=False, log=quiet, model=model)
    w = tuned.item_tower.embs["item_id"].weight.detach()
    assert w.shape[0] == n_old + 15 and np.isfinite(hist["history"][-1]["loss"])
    assert not torch.equal(w[:n_old], old[:n_old])
    # No training sequence has a new item: only negatives reach their rows, and rows no step drew keep their start.
    drawn = (w[n_old:] != old[n_old:]).any(1)
    assert torch.equal(w[n_old:][~drawn], old[n_old:][~drawn])
