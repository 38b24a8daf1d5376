"""The customer model at tiny sizes: shapes, masks, norms, readout and logQ math, metrics, determinism."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from userformer.jobs.core.config import ModelConfig, TrainConfig
from userformer.models import data as model_data
from userformer.models import heads, losses
from userformer.models.heads import TaskReadout
from userformer.models.metrics import RankingAccumulator, entropies, top_items
from userformer.models.model import UserFormer
from userformer.models.train import batch_loss, evaluate, fit

torch.set_num_threads(1)
ALL_FEATURES = ModelConfig().event_features


def tiny_data(n_users=40, n_items=30, length=12, seed=0, real_time=True):
    """Users walk through items in order (item i -> i+1, wrapping): a learnable next-item task."""
    rng = np.random.default_rng(seed)
    users, items, ts, etypes, surf, dur = [], [], [], [], [], []
    for u in range(n_users):
        start = rng.integers(n_items)
        for k in range(length):
            users.append(f"u{u}")
            items.append(f"i{(start + k) % n_items}")
            ts.append(1_600_000_000 + u * 10 + k * 3600 * (1 + rng.integers(3)) if real_time else 1_600_000_000 + k)
            etypes.append(["view", "purchase"][rng.integers(2)])
            surf.append(["home", "search"][rng.integers(2)])
            dur.append(float(rng.integers(1, 100)) if k % 3 else None)
    ts = np.cumsum(np.asarray(ts) * 0 + 1) + np.asarray(ts)  # strictly increasing per user
    events = pa.table(
        {
            "user_id": users,
            "ts": pa.array(ts * 1_000_000, pa.timestamp("us", tz="UTC")),
            "event_type": etypes,
            "item_id": items,
            "surface": surf,
            "duration_s": pa.array(dur, pa.float64()),
        }
    )
    cat = {
        f"i{i}": (f"c{i % 3}", f"s{i % 6}", f"t{i % 9}", None if i % 5 == 0 else f"b{i % 4}") for i in range(n_items)
    }
    catalog = pa.table(
        {
            "item_id": list(cat),
            "category_l1": [v[0] for v in cat.values()],
            "category_l2": [v[1] for v in cat.values()],
            "category_l3": [v[2] for v in cat.values()],
            "brand": [v[3] for v in cat.values()],
        }
    )
    return model_data.from_raw(events, catalog, real_time=real_time)


def tiny_cfg(**kw) -> ModelConfig:
    base = {
        "d_model": 16,
        "n_layers": 2,
        "n_heads": 2,
        "dropout": 0.0,
        "max_len": 10,
        "time_buckets": 8,
        "heads": ["category_l1", "brand", "event_type"],
    }
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def data():
    return tiny_data()


def model_of(cfg, catalog, seed=0):
    torch.manual_seed(seed)
    return UserFormer(cfg, catalog).eval()


# --------------------------------------------------------------- data
def test_from_raw_and_leave_one_out(data):
    seqs, catalog = data
    assert len(seqs) == 40 and catalog.n_items == 30 and seqs.lengths.tolist() == [12] * 40
    assert all(np.all(np.diff(seqs.ts[a:b]) > 0) for a, b in zip(seqs.offsets[:-1], seqs.offsets[1:]))
    # item attributes follow the item, brand unknown (0) for every 5th item
    assert catalog.attrs["brand"][seqs.ints["item"]].tolist() == seqs.ints["brand"].tolist()
    train, valid, test = model_data.leave_one_out(seqs)
    assert train.lengths.tolist() == [10] * 40
    assert test.history.lengths.tolist() == [11] * 40 and valid.history.lengths.tolist() == [10] * 40
    assert test.targets.tolist() == seqs.ints["item"][seqs.offsets[1:] - 1].tolist()
    assert valid.targets.tolist() == seqs.ints["item"][seqs.offsets[1:] - 2].tolist()


def test_time_split_and_from_sequences_table(data):
    seqs, _ = data
    t = float(np.median(seqs.ts))
    train, ev = model_data.time_split(seqs, t, 86400 * 365)
    assert np.all(train.ts < t) and len(ev.targets) == len(ev.target_sets) > 0
    assert all(ev.targets[i] in ev.target_sets[i] for i in range(len(ev.targets)))
    tab = pa.table(
        {
            "user_id": ["a"],
            "item_idx": [[3, 4]],
            "event_type_idx": [[1, 1]],
            "ts": pa.array([[10, 20]], pa.list_(pa.timestamp("us", tz="UTC"))),
            "category_l1_idx": [[1, 2]],
            "category_l2_idx": [[0, 0]],
            "category_l3_idx": [[0, 0]],
            "brand_idx": [[5, None]],
            "surface_idx": [[0, 0]],
            "duration_s": [[None, 2.0]],
        }
    )
    s = model_data.from_sequences_table(tab)
    assert s.ints["item"].tolist() == [3, 4] and s.ints["brand"].tolist() == [5, 0]
    assert s.ts.tolist() == [1e-5, 2e-5] and np.isnan(s.duration[0])


def test_pad_batch_is_left_padded_and_trimmed(data):
    seqs, _ = data
    short = seqs.take_events(seqs.position_in_user() < np.repeat(np.arange(len(seqs)) % 5 + 1, seqs.lengths))
    b = model_data.pad_batch(short, np.array([0, 3]), 10)
    assert b["mask"].tolist() == [[False, False, False, True], [True, True, True, True]]
    assert b["item"][0, -1] == short.ints["item"][short.offsets[1] - 1] and b["item"][0, 0] == 0


# ------------------------------------------------------------ encoder
@pytest.mark.parametrize("pooling", ["mean", "concat"])
def test_shapes_norms_and_causality(data, pooling):
    seqs, catalog = data
    model = model_of(tiny_cfg(pooling=pooling, event_features=ALL_FEATURES), catalog)
    b = model_data.pad_batch(seqs, np.arange(4), 10)
    h, u = model.encoder(b)
    assert h.shape == (4, 10, 16) and u.shape == (4, 10, 16)
    assert torch.allclose(u.norm(dim=-1), torch.ones(4, 10), atol=1e-5)
    ue = model.user_embedding(b)
    assert ue.shape == (4, 16) and torch.allclose(ue.norm(dim=-1), torch.ones(4), atol=1e-5)
    # change the last 3 events (ids, attributes, times): states before them stay the same
    b2 = {k: v.clone() for k, v in b.items()}
    for k in ("item", "brand", "category_l1", "event_type", "surface"):
        b2[k][:, -3:] = (b2[k][:, -3:] + 1) % 3
    b2["ts"][:, -3:] += 1e5
    h2, _ = model.encoder(b2)
    assert torch.allclose(h[:, :-3], h2[:, :-3], atol=1e-5)
    assert not torch.allclose(h[:, -1], h2[:, -1], atol=1e-5)


def test_padding_does_not_change_outputs(data):
    seqs, catalog = data
    model = model_of(tiny_cfg(event_features=ALL_FEATURES), catalog)
    b = model_data.pad_batch(seqs, np.arange(3), 6)
    wide = model_data.pad_batch(seqs, np.arange(3), 6, trim=False)
    # pad 4 more columns on the left, with garbage in the padded slots
    pad = {k: torch.cat([torch.full((3, 4), 7, dtype=v.dtype), v], 1) if v.dim() == 2 else v for k, v in wide.items()}
    pad["mask"] = torch.cat([torch.zeros(3, 4, dtype=torch.bool), wide["mask"]], 1)
    h1, u1 = model.encoder(b)
    h2, u2 = model.encoder(pad)
    assert torch.allclose(h1, h2[:, 4:], atol=1e-5) and torch.allclose(u1, u2[:, 4:], atol=1e-5)
    assert torch.allclose(model.user_embedding(b), model.user_embedding(pad), atol=1e-5)


def test_id_only_has_no_content_parameters(data):
    _, catalog = data
    m = model_of(tiny_cfg(event_features=["item_id", "position"], item_features=["item_id"], heads=[]), catalog)
    names = {n for n, _ in m.named_parameters()}
    assert not any("brand" in n or "category" in n or "time" in n for n in names)


# --------------------------------------------------------- item tower
def test_unseen_item_gets_a_vector_from_content(data):
    _, catalog = data
    model = model_of(tiny_cfg(), catalog)
    unseen = torch.tensor([10_000, 0])  # an id past the table, and "unknown"
    attrs = {
        "category_l1": torch.tensor([1, 1]),
        "category_l2": torch.tensor([2, 2]),
        "category_l3": torch.tensor([0, 3]),
        "brand": torch.tensor([1, 2]),
    }
    v = model.item_tower(unseen, attrs)
    assert torch.isfinite(v).all() and torch.allclose(v.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(v[0], v[1])
    allv = model.item_tower.all_items()
    assert allv.shape == (31, 16) and torch.isfinite(allv).all()


# -------------------------------------------------------------- heads
def test_readout_matches_hand_computation():
    r = TaskReadout(3, 2)
    with torch.no_grad():
        r.labels.weight.copy_(torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.0, 2.0]]))
    h = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    mask = torch.tensor([[True, True, False]])
    s = r(h, mask)[0]
    # label 1: e=(1,0): logits (1, 0) -> a = (e/(1+e), 1/(1+e)); r = a1*(1,0)+a2*(0,1); s = r.e = a1
    a1 = math.e / (1 + math.e)
    # label 2: e=(0,2): logits (0, 2) -> a = (1/(1+e^2), e^2/(1+e^2)); s = 2 * a2
    a2 = math.exp(2) / (1 + math.exp(2))
    assert s[0] == float("-inf")
    assert s[1].item() == pytest.approx(a1, rel=1e-5) and s[2].item() == pytest.approx(2 * a2, rel=1e-5)


def test_a_readout_in_chunks_of_labels_equals_the_whole(monkeypatch):
    # Many labels are read out a chunk at a time, each recomputed in the backward pass: the same scores and the
    # same gradients as one (batch, labels, length) tensor. A user with no events reads only the prior.
    torch.manual_seed(0)
    r = TaskReadout(50, 8)
    with torch.no_grad():
        r.bias.normal_()
    h = torch.randn(4, 6, 8, requires_grad=True)
    mask = torch.rand(4, 6) > 0.3
    mask[0] = False

    def scores_and_grads():
        s = r(h, mask)
        return s.detach(), torch.autograd.grad((s[:, 1:] * torch.arange(49.0)).sum(), [h, r.labels.weight, r.bias])

    whole, whole_grads = scores_and_grads()
    monkeypatch.setattr(heads, "READOUT_BLOCK", 4 * 6 * 7)  # 7 labels a chunk: 8 chunks, the last one short
    parts, part_grads = scores_and_grads()
    assert torch.all(parts[:, 0] == float("-inf"))
    assert torch.allclose(parts[:, 1:], whole[:, 1:], atol=1e-6)
    assert torch.allclose(parts[0, 1:], r.bias[1:].detach())
    for a, b in zip(part_grads, whole_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    with torch.no_grad():  # inference: plain chunks, no checkpointing
        assert torch.allclose(r(h, mask)[:, 1:], whole[:, 1:], atol=1e-6)


# --------------------------------------------------------------- loss
def test_logq_correction_math():
    counts = np.array([0, 6, 3, 1], float)  # p = (.6, .3, .1)
    s = losses.NegativeSampler(counts, n_uniform=2, n_inbatch=4)
    expect = np.log(4 * np.array([0.6, 0.3, 0.1]) + 2 / 3)
    assert np.allclose(s.log_q[1:].numpy(), expect, atol=1e-6)
    user = torch.tensor([[1.0, 0.0]])
    vec = {1: [1.0, 0.0], 2: [0.0, 1.0], 3: [-1.0, 0.0]}
    neg_ids = torch.tensor([2, 3, 1])  # 1 is the positive: an accidental hit, masked
    loss = losses.sampled_softmax(
        user,
        torch.tensor([vec[1]]),
        torch.tensor([1]),
        torch.tensor([vec[i] for i in [2, 3, 1]]),
        neg_ids,
        s.log_q,
        torch.tensor(0.5),
    )
    lp = 1 / 0.5 - expect[0]
    ln = [0 / 0.5 - expect[1], -1 / 0.5 - expect[2]]
    hand = -(lp - math.log(math.exp(lp) + sum(math.exp(x) for x in ln)))
    assert loss.item() == pytest.approx(hand, rel=1e-5)
    nolq = losses.sampled_softmax(
        user,
        torch.tensor([vec[1]]),
        torch.tensor([1]),
        torch.tensor([vec[2]]),
        torch.tensor([2]),
        None,
        torch.tensor(1.0),
    )
    assert nolq.item() == pytest.approx(-(1 - math.log(math.e + 1)), rel=1e-5)


def test_per_row_negatives_equal_the_shared_loss_row_by_row():
    torch.manual_seed(0)
    user, pos_vec = torch.randn(3, 4), torch.randn(3, 4)
    pos_ids = torch.tensor([1, 2, 3])
    neg_ids = torch.tensor([[4, 5, 1], [1, 6, 7], [8, 3, 9]])  # an accidental hit in rows 0 and 2
    table = torch.randn(10, 4)
    per_row = losses.sampled_softmax(user, pos_vec, pos_ids, table[neg_ids], neg_ids, None, torch.tensor(0.1))
    rows = [
        losses.sampled_softmax(
            user[i : i + 1],
            pos_vec[i : i + 1],
            pos_ids[i : i + 1],
            table[neg_ids[i]],
            neg_ids[i],
            None,
            torch.tensor(0.1),
        )
        for i in range(3)
    ]
    assert per_row.item() == pytest.approx(torch.stack(rows).mean().item(), rel=1e-5)
    s = losses.NegativeSampler(np.array([0, 5, 1, 1]), n_uniform=6, n_inbatch=2, per_row=True)
    neg = s.sample(torch.tensor([1, 2, 0, 3, 1]))
    assert neg.shape == (5, 8) and int(neg.min()) >= 1 and int(neg.max()) <= 3
    # Uniform negatives alone: log Q is the same for every item, so no correction is applied.
    assert losses.NegativeSampler(np.array([0, 5, 1, 1]), n_uniform=6, n_inbatch=0).log_q is None


def test_item_vectors_compute_each_distinct_id_once(data):
    _, catalog = data
    tower = UserFormer(tiny_cfg(), catalog).item_tower.eval()
    ids = torch.tensor([[3, 1, 3], [0, 1, 7]])
    assert torch.allclose(losses.item_vectors(tower, ids), tower(ids), atol=1e-6)


def test_dense_all_action_targets_are_in_the_future_window(data):
    seqs, _ = data
    b = model_data.pad_batch(seqs, np.arange(8), 11)
    gen = torch.Generator().manual_seed(0)
    _, pos, tgt, ok = losses.dense_all_action_targets(b, 4, 3, False, gen)
    assert ok.all()
    items = b["item"]
    for r in range(8):
        for p, t in zip(pos[r].tolist(), tgt[r].tolist()):
            assert t in items[r, p + 1 : p + 4].tolist()


def test_dense_all_action_targets_follow_the_batch_device(data):
    """Every tensor the dense objective makes lives on the batch's device (a CPU generator's draws are moved):
    checked on PyTorch's shape-only "meta" device, so no GPU is needed to catch a CPU tensor mixed in."""
    seqs, _ = data
    b = {k: v.to("meta") for k, v in model_data.pad_batch(seqs, np.arange(8), 11).items()}
    _, pos, tgt, ok = losses.dense_all_action_targets(b, 4, 3, False, torch.Generator().manual_seed(0))
    _, *by_time = losses.dense_all_action_targets(b, 4, 86400.0, True, torch.Generator().manual_seed(0))
    assert {t.device.type for t in (pos, tgt, ok, *by_time)} == {"meta"}


# ----------------------------------------------------------- training
def test_loss_decreases_and_is_deterministic(data):
    seqs, catalog = data
    train, valid, _ = model_data.leave_one_out(seqs)
    tc = TrainConfig(
        epochs=6, batch_size=8, lr=5e-3, uniform_negatives=16, inbatch_negatives=8, patience=100, num_threads=1
    )
    cfg = tiny_cfg(event_features=ALL_FEATURES)
    _, h1 = fit(cfg, tc, train, valid, catalog, progress=False, log=lambda s: None)
    _, h2 = fit(cfg, tc, train, valid, catalog, progress=False, log=lambda s: None)
    losses = [r["loss"] for r in h1["history"]]
    assert losses[-1] < 0.8 * losses[0]
    assert losses == [r["loss"] for r in h2["history"]]


@pytest.mark.parametrize("objective, loss", [("dense_all_action", "sampled"), ("next_action", "full")])
def test_objectives_and_full_softmax_train(data, objective, loss):
    seqs, catalog = data
    train, valid, test = model_data.leave_one_out(seqs)
    tc = TrainConfig(
        epochs=20,
        batch_size=8,
        lr=1e-2,
        objective=objective,
        loss=loss,
        uniform_negatives=16,
        dense_horizon_events=2,
        num_threads=1,
    )
    content = ["item_id", "category_l1", "category_l2", "category_l3", "brand", "position"]
    model, h = fit(
        tiny_cfg(heads=[], event_features=content, pooling="id_plus_mean"),
        tc,
        train,
        valid,
        catalog,
        progress=False,
        log=lambda s: None,
    )
    assert h["history"][-1]["loss"] < h["history"][0]["loss"]
    m = evaluate(model, test, catalog, torch.device("cpu"), tc)
    assert m["users"] == 40 and 0 <= m["ndcg@10"] <= m["hr@10"] <= 1
    assert m["hr@10"] > 0.6  # random: 10 / 30; a deterministic walk is learnable


@pytest.mark.gpu
def test_cuda_trains_the_dense_objective_and_embeds_in_bf16_as_in_fp32(data):
    """The CUDA path: a training step of every kind (dense all-action, heads) on the GPU, then the user embedding
    under bf16 autocast close to the CPU's fp32 one for the same weights."""
    seqs, catalog = data
    train, valid, test = model_data.leave_one_out(seqs)
    tc = TrainConfig(
        epochs=3, batch_size=8, lr=1e-2, objective="dense_all_action", dense_horizon_events=2, device="cuda"
    )
    model, h = fit(tiny_cfg(), tc, train, valid, catalog, progress=False, log=lambda s: None)
    assert all(math.isfinite(r["loss"]) for r in h["history"]) and h["history"][-1]["loss"] < h["history"][0]["loss"]
    m = evaluate(model, test, catalog, torch.device("cuda"), tc)
    assert m["users"] == 40 and 0 <= m["ndcg@10"] <= m["hr@10"] <= 1
    b = model_data.pad_batch(seqs, np.arange(16), 10)
    with torch.no_grad():
        cpu = model.cpu().eval().user_embedding(b)
        gpu_model = model.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = gpu_model.user_embedding({k: v.cuda() for k, v in b.items()}).float().cpu()
    assert torch.nn.functional.cosine_similarity(cpu, bf16).min() > 0.98


def test_head_losses_are_present(data):
    seqs, catalog = data
    model = UserFormer(tiny_cfg(), catalog).train()
    b = model_data.pad_batch(seqs, np.arange(6), 11)
    sampler = losses.NegativeSampler(model_data.item_counts(seqs, catalog.n_items), 8, 4)
    loss, parts = batch_loss(model, b, TrainConfig(), sampler, torch.Generator().manual_seed(0), True)
    assert set(parts) == {"retrieval", "category_l1", "brand", "event_type"} and torch.isfinite(loss)
    loss.backward()
    assert model.heads.readouts["brand"].labels.weight.grad.abs().sum() > 0


# ------------------------------------------------------------ metrics
def ranking(scores, targets, n_items, cat=None, target_sets=None, k=10, k_div=50) -> dict:
    """The metrics of one (U, n_items + 1) score matrix (column 0 = padding)."""
    acc = RankingAccumulator(n_items, cat, k, k_div)
    acc.add(scores, torch.tensor(targets), target_sets)
    return acc.result()


def test_metrics_against_hand_values():
    # 3 users, 5 items (+ padding column 0 that must never count)
    scores = torch.tensor(
        [
            [99.0, 0.9, 0.8, 0.7, 0.6, 0.5],  # target 1 at rank 0
            [99.0, 0.9, 0.8, 0.7, 0.6, 0.5],  # target 3 at rank 2
            [99.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # target 1 at rank 4
        ]
    )
    cat = np.array([0, 1, 1, 2, 2, 0])  # item 5 has an unknown category
    m = ranking(scores, [1, 3, 1], 5, cat, k=3, k_div=4)
    assert m["hr@3"] == pytest.approx(2 / 3)
    assert m["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert m["coverage@3"] == pytest.approx(5 / 5)  # top 3s: {1,2,3} and {5,4,3}
    # top 4: users 1-2 items 1..4 -> cats 1,1,2,2 -> ln 2; user 3 items 5,4,3,2 -> cats 2,2,1 -> H(2/3, 1/3)
    h3 = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert m["entropy@4"] == pytest.approx((2 * math.log(2) + h3) / 3)
    assert entropies(np.array([[0, 0]])).tolist() == [0.0]
    m10 = ranking(scores, [1, 3, 1], 5, cat, target_sets=[np.array([1, 2]), np.array([3]), np.array([1])])
    assert (
        m10["hr@10"] == 1.0
        and m10["recall@10"] == 1.0
        and m10["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(6)) / 3)
    )


def test_checkpoint_round_trip(data, tmp_path):
    from userformer.models.train import load_checkpoint

    seqs, catalog = data
    train, valid, test = model_data.leave_one_out(seqs)
    tc = TrainConfig(epochs=2, batch_size=16, uniform_negatives=8, num_threads=1)
    ck = tmp_path / "m.pt"
    model, hist = fit(tiny_cfg(), tc, train, valid, catalog, ckpt_path=ck, progress=False, log=lambda s: None)
    again, meta = load_checkpoint(ck, catalog)
    assert meta["vocab_sizes"] == catalog.sizes and meta["epoch"] == hist["best_epoch"]
    assert "ndcg@10" in meta["metrics"]["valid"] and meta["history"]
    b = model_data.pad_batch(test.history, np.arange(5), 10)
    assert torch.allclose(model.eval().user_embedding(b), again.eval().user_embedding(b), atol=1e-6)


def test_most_popular_baseline(data):
    from userformer.models.train import evaluate_popular

    seqs, catalog = data
    train, _, test = model_data.leave_one_out(seqs)
    m = evaluate_popular(train, test, catalog)
    assert m["users"] == 40 and 0 <= m["ndcg@10"] <= m["hr@10"] <= 1 and m["coverage@10"] == pytest.approx(10 / 30)


# ------------------------------------------------- protocols, heads, benchmark variants
def test_time_protocol_splits_train_valid_test_by_time(data):
    seqs, _ = data
    t_valid, t_test = np.quantile(seqs.ts, [0.6, 0.8])
    train, valid, test = model_data.time_protocol(seqs, float(t_valid), float(t_test), 86400.0 * 365)
    assert np.all(train.ts < t_valid)
    # validation positives lie in [t_valid, t_test); test history is everything before t_test
    assert np.all(valid.history.ts < t_valid) and np.all(test.history.ts < t_test)
    assert test.history.ts.max() >= t_valid  # it reads events the model was not trained on
    assert np.all(test.ref_ts == t_test) and np.all(valid.ref_ts == t_valid)
    in_valid = (seqs.ts >= t_valid) & (seqs.ts < t_test)
    assert sum(len(s) for s in valid.target_sets) <= in_valid.sum()
    assert len(test.target_event_type) == len(test.targets)
    with pytest.raises(ValueError):
        model_data.time_protocol(seqs, float(t_test), float(t_valid), 86400.0)


def test_head_accuracy_counts_top1_top5_and_skips_unknown_labels():
    from userformer.models.metrics import HeadAccuracy

    acc = HeadAccuracy()
    scores = torch.tensor(
        [
            [-1e9, 5.0, 1.0, 0.0, 0.0, 0.0, 0.0],
            [-1e9, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0],
            [-1e9, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0],
        ]
    )
    acc.add("brand", scores, torch.tensor([1, 6, 0]))  # hit@1; miss@5 (label ranks 6th); unknown -> skipped
    r = acc.result()["brand"]
    assert r == {"users": 2, "acc@1": 0.5, "acc@5": 0.5, "majority@1": 0.5}


def test_evaluate_reports_each_head(data):
    seqs, catalog = data
    _, _, test = model_data.leave_one_out(seqs)
    model = model_of(tiny_cfg(), catalog)
    m = evaluate(model, test, catalog, torch.device("cpu"), TrainConfig(num_threads=1))
    assert set(m["heads"]) == {"category_l1", "brand", "event_type"}
    assert all(0.0 <= h["acc@1"] <= h["acc@5"] <= 1.0 and h["users"] > 0 for h in m["heads"].values())
    assert "heads" not in evaluate(model, test, catalog, torch.device("cpu"), TrainConfig(num_threads=1), heads=False)


def test_benchmark_variants_drop_what_the_data_cannot_inform(data):
    from userformer.jobs.tools.quality_benchmark import variant

    seqs, catalog = data
    base = ModelConfig()
    full = variant("full", base, seqs, catalog)
    assert full.event_features == base.event_features and full.heads == base.heads  # everything varies here
    # One event type, no durations, order-only times: those inputs and the event-type head go.
    flat = model_data.Sequences(
        seqs.user_ids,
        seqs.offsets,
        {**seqs.ints, "event_type": np.ones_like(seqs.ints["event_type"])},
        seqs.ts,
        np.full_like(seqs.duration, np.nan),
        real_time=False,
    )
    m = variant("full", base, flat, catalog)
    assert not {"event_type", "duration", "time_gap", "time_ref"} & set(m.event_features)
    assert "event_type" not in m.heads and "item_id" in m.event_features
    ido = variant("id_only", base, seqs, catalog)
    assert (ido.event_features, ido.item_features, ido.heads) == (["item_id", "position"], ["item_id"], [])


def test_history_exclusion_removes_seen_items_from_the_ranking():
    from dataclasses import replace

    # one user, history items 1 and 2; scores prefer 1 > 2 > 3 > 4; target 3
    hist = model_data.Sequences(
        np.array(["u"], dtype=object),
        np.array([0, 2]),
        {k: np.array([1, 2]) for k in model_data.INT_FIELDS},
        np.array([1.0, 2.0]),
        np.full(2, np.nan, np.float32),
    )
    ev = model_data.EvalSet(hist, np.array([3]))
    from userformer.models.train import history_pairs

    assert history_pairs(ev, 0, 10) is None
    rows, items = history_pairs(replace(ev, exclude_history=True), 0, 10)
    assert rows.tolist() == [0, 0] and items.tolist() == [1, 2]
    scores = torch.tensor([[0.0, 4.0, 3.0, 2.0, 1.0]])
    kept = ranking(scores.clone(), [3], 4, k=1, k_div=1)
    acc = RankingAccumulator(4, None, k=1, k_div=1)
    acc.add(scores.clone(), torch.tensor([3]), exclude=(rows, items))
    assert kept["hr@1"] == 0.0 and acc.result()["hr@1"] == 1.0  # the target moves to the top once 1, 2 are out


def test_chunked_scoring_equals_the_dense_matrix():
    # The catalogue scored in chunks of items (top_items) ranks exactly as one users x items matrix would,
    # exclusions included; chunks as small as the top kept (kk) and a chunk that holds the whole catalogue.
    g = torch.Generator().manual_seed(3)
    users, items = torch.randn(37, 8, generator=g), torch.randn(1001, 8, generator=g)
    targets = torch.randint(1, 1001, (37,), generator=g)
    rows = torch.randint(0, 37, (400,), generator=g).numpy()
    excluded = torch.randint(1, 1001, (400,), generator=g).numpy()
    cat = torch.randint(0, 7, (1001,), generator=g).numpy()
    sets = [np.array([t, t + 1]) for t in targets.tolist()]
    dense = RankingAccumulator(1000, cat, 10, 50)
    dense.add(users @ items.T, targets, sets, exclude=(rows, excluded))
    want = (users @ items.T).index_put_((torch.as_tensor(rows), torch.as_tensor(excluded)), torch.tensor(-1e30))
    want[:, 0] = -1e30
    for block in (37 * 50, 37 * 333, 1 << 25):
        got = top_items(users, items, 50, exclude=(rows, excluded), block=block)
        assert torch.equal(got, want.topk(50, dim=1).indices), block
    acc = RankingAccumulator(1000, cat, 10, 50)
    acc.add_embeddings(users, items, targets, sets, exclude=(rows, excluded))
    assert acc.result() == dense.result() and dense.result()["users"] == 37
    # One score row for every user (most-popular): the same as that row repeated per user.
    row = torch.randn(1001, generator=g)
    repeated, shared = RankingAccumulator(1000, cat, 10, 50), RankingAccumulator(1000, cat, 10, 50)
    repeated.add(row[None, :].repeat(37, 1), targets, sets, exclude=(rows, excluded))
    shared.add_shared(row, targets, sets, exclude=(rows, excluded))
    assert shared.result() == repeated.result()


def test_users_without_events_get_the_trained_cold_embedding(data):
    seqs, catalog = data
    model = model_of(tiny_cfg(), catalog)
    empty = model_data.Sequences(
        np.array(["new"], dtype=object),
        np.array([0, 0]),
        {k: np.zeros(0, np.int64) for k in model_data.INT_FIELDS},
        np.zeros(0),
        np.zeros(0, np.float32),
    )
    b = model_data.pad_batch(empty, np.array([0]), 10)
    with torch.no_grad():
        u = model.user_embedding(b)
        assert torch.allclose(u[0], model.cold_embedding(), atol=1e-6)
        prefs = model.preferences(b)  # no events: the heads' priors (softmax of the biases)
        for task, p in prefs.items():
            assert torch.allclose(p[0, 1:], torch.softmax(model.heads.readouts[task].bias[1:], -1), atol=1e-5)
    # A window that starts at the user's first event trains the cold embedding on that event.
    full = model_data.pad_batch(seqs, np.arange(4), 12)  # 12 events each: the whole history
    assert full["from_start"].all() and not model_data.pad_batch(seqs, np.arange(4), 5)["from_start"].any()
    model.train()
    loss, _ = batch_loss(
        model,
        full,
        TrainConfig(uniform_negatives=8),
        losses.NegativeSampler(model_data.item_counts(seqs, catalog.n_items), 8, 0),
        torch.Generator().manual_seed(0),
        True,
    )
    loss.backward()
    assert model.cold.grad is not None and model.cold.grad.abs().sum() > 0


def test_id_plus_mean_pooling_keeps_identity_and_embeds_unseen_items_by_content(data):
    _, catalog = data
    tower = model_of(tiny_cfg(pooling="id_plus_mean", item_mlp=False), catalog).item_tower
    ids = torch.tensor([1, 2])
    parts = {f: e for f, e in tower.embs.items()}
    attrs = {a: tower.attrs[ids, model_data.ITEM_ATTRS.index(a)] for a in model_data.ITEM_ATTRS}
    content = [parts[a](attrs[a]) for a in model_data.ITEM_ATTRS]
    cnt = torch.stack([(attrs[a] > 0) for a in model_data.ITEM_ATTRS], -1).float().sum(-1, keepdim=True)
    expect = parts["item_id"](ids) + torch.stack(content).sum(0) / cnt
    with torch.no_grad():
        assert torch.allclose(tower(ids), torch.nn.functional.normalize(expect, dim=-1), atol=1e-6)
        # an id the model never saw (outside the table) with known attributes: its content alone
        unseen = tower(torch.tensor([catalog.n_items + 5]), attrs={a: attrs[a][:1] for a in model_data.ITEM_ATTRS})
        only = torch.stack([c[:1] for c in content]).sum(0) / cnt[:1]
        assert torch.allclose(unseen, torch.nn.functional.normalize(only, dim=-1), atol=1e-6)


def test_benchmark_means_over_seeds():
    from userformer.jobs.tools.quality_benchmark import over_seeds

    runs = [
        {"seed": 1, "hr@10": 0.2, "epochs": 10, "heads": {"brand": {"acc@1": 0.5}}, "history_kept": {"hr@10": 0.1}},
        {"seed": 2, "hr@10": 0.4, "epochs": 13, "heads": {"brand": {"acc@1": 0.7}}, "history_kept": {"hr@10": 0.3}},
    ]
    out = over_seeds(runs, [1, 2])
    assert out["hr@10"] == pytest.approx(0.3) and out["std"]["hr@10"] == pytest.approx(0.1414, abs=1e-4)
    assert out["epochs"] == 12 and out["heads"]["brand"]["acc@1"] == pytest.approx(0.6)
    assert out["history_kept"]["hr@10"] == pytest.approx(0.2) and out["per_seed"] == runs and out["seeds"] == [1, 2]
