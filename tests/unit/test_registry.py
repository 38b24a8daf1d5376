"""Model registry, growing a model to a larger vocabulary, the promotion gate, resumable training (no Spark)."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from userformer.jobs.core import registry
from userformer.jobs.core.config import ModelConfig, TrainConfig, load_config
from userformer.jobs.core.errors import UserError
from userformer.jobs.steps.train import gate
from userformer.models import data
from userformer.models.grow import grow
from userformer.models.model import UserFormer
from userformer.models.train import checkpoint, fit

torch.set_num_threads(1)
DAY = dt.date(2026, 11, 3)


def catalog(n_items=30, n_cat=4, n_brand=5, n_types=3, seed=0) -> data.ItemCatalog:
    rng = np.random.default_rng(seed)
    attrs = {
        a: np.concatenate([[0], rng.integers(1, n, n_items)])
        for a, n in (("category_l1", n_cat), ("category_l2", n_cat + 2), ("category_l3", n_cat + 4), ("brand", n_brand))
    }
    attrs["brand"][5] = 0  # an item without a brand
    sizes = {
        "item": n_items + 1,
        "category_l1": n_cat,
        "category_l2": n_cat + 2,
        "category_l3": n_cat + 4,
        "brand": n_brand,
        "event_type": n_types,
        "surface": 3,
    }
    return data.ItemCatalog(attrs, sizes)


def bigger(cat: data.ItemCatalog, more_items=7, seed=1) -> data.ItemCatalog:
    """The same catalogue a few days later: new items (some with a new brand / category), a new event type."""
    rng = np.random.default_rng(seed)
    sizes = {
        **cat.sizes,
        "item": cat.sizes["item"] + more_items,
        "brand": cat.sizes["brand"] + 1,
        "category_l3": cat.sizes["category_l3"] + 2,
        "event_type": cat.sizes["event_type"] + 1,
    }
    attrs = {a: np.concatenate([v, rng.integers(1, sizes[a], more_items)]) for a, v in cat.attrs.items()}
    attrs["brand"][-1] = sizes["brand"] - 1  # the newest item has the new brand
    return data.ItemCatalog(attrs, sizes)


def tiny(cat, **kw) -> UserFormer:
    torch.manual_seed(0)
    base = {"d_model": 16, "n_layers": 1, "n_heads": 2, "max_len": 8, "time_buckets": 8, "dropout": 0.0}
    return UserFormer(ModelConfig(**{**base, **kw}), cat).eval()


@pytest.fixture
def cfg(tmp_path):
    return load_config(env={"USERFORMER_HOME": str(tmp_path)})


def register(cfg, model, day=DAY, kind="train", **extra):
    ck = checkpoint(
        model,
        TrainConfig(),
        1,
        {"valid": {"ndcg@10": 0.1}},
        {
            "data": {"user_sequences": {"version": 3}, "items": {"version": 2}, "vocab": {"version": 2}},
            "parent": None,
            **extra,
        },
    )
    return registry.register(cfg, ck, kind=kind, day=day)


# ----------------------------------------------------------- registry
def test_register_publish_load(cfg):
    m = tiny(catalog())
    assert registry.published(cfg) is None
    v1 = register(cfg, m)
    v2 = register(cfg, m, day=DAY + dt.timedelta(days=1), kind="finetune", parent=v1)
    assert v1 == "v0001-20261103-train" and v2 == "v0002-20261104-finetune" and sorted([v2, v1]) == [v1, v2]
    man = registry.read_manifest(cfg, v2)
    assert man["parent"] == v1 and man["data"]["user_sequences"]["version"] == 3 and man["vocab_sizes"]["item"] == 31
    assert len(man["files"]["model.pt"]["sha256"]) == 64 and "re-embedded" in man["reembedding_rule"]
    with pytest.raises(UserError, match="no published model"):
        registry.load(cfg)
    ptr = registry.publish(cfg, v1, "first")
    assert set(ptr) == {"version", "published_at", "reason", "previous"} and ptr["previous"] is None
    registry.publish(cfg, v2, "gate passed")
    assert (
        json.loads(registry.pointer_path(cfg).read_text())["version"] == v2
        and registry.published(cfg)["previous"] == v1
    )
    assert [json.loads(x)["version"] for x in (cfg.models_root / "publish_log.jsonl").read_text().splitlines()] == [
        v1,
        v2,
    ]
    again, ck = registry.load(cfg)
    assert ck["version"] == v2 and ck["data"]["items"]["version"] == 2
    for (k, a), b in zip(m.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    assert [x["version"] for x in registry.list_versions(cfg)] == [v1, v2]
    assert not list(cfg.models_root.rglob("*.tmp"))  # atomic writes leave nothing behind


def test_version_ids_are_never_reused(cfg):
    m = tiny(catalog())
    v1 = register(cfg, m)
    import shutil

    shutil.rmtree(registry.version_dir(cfg, v1))
    v2 = register(cfg, m)
    assert v2.startswith("v0002-")
    registry.version_dir(cfg, "v0003-20261103-train").mkdir()  # a registration that crashed half-way
    assert register(cfg, m).startswith("v0004-")
    with pytest.raises(UserError, match="incomplete"):
        registry.load(cfg, "v0003-20261103-train")


def test_missing_truncated_and_foreign_checkpoints_are_clear_errors(cfg):
    v = register(cfg, tiny(catalog()))
    path = registry.version_dir(cfg, v) / "model.pt"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match=f"{path}: checksum does not match"):
        registry.load(cfg, v)
    with pytest.raises(UserError, match=f"{path}: unreadable model checkpoint"):
        registry.read_checkpoint(path)  # no manifest to compare with: torch itself fails
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(UserError, match=f"{path}: not a model checkpoint, missing state_dict, model_config"):
        registry.read_checkpoint(path)
    path.unlink()
    with pytest.raises(UserError, match=f"model checkpoint not found: {path}"):
        registry.load(cfg, v)
    with pytest.raises(UserError, match="no model version v0009"):
        registry.load(cfg, "v0009-20261103-train")
    registry.pointer_path(cfg).write_text("{not json")
    with pytest.raises(UserError, match=f"{registry.pointer_path(cfg)}: corrupt published pointer"):
        registry.published(cfg)


def test_size_mismatch_is_a_clear_error(cfg):
    cat = catalog()
    m = tiny(cat)
    v = register(cfg, m)
    path = registry.version_dir(cfg, v) / "model.pt"
    ck = torch.load(path, weights_only=True)
    # The item tower has 31 rows, the recorded vocabulary says 41.
    ck["vocab_sizes"]["item"] = 41
    torch.save(ck, path)
    with pytest.raises(UserError, match=f"{path}: model/vocabulary size mismatch: the item tower has 31 item rows"):
        registry.model_from_checkpoint(registry.read_checkpoint(path), path)
    # Weights of another shape than the vocabulary sizes say.
    ck = torch.load(path, weights_only=True)
    ck["vocab_sizes"]["item"] = 31
    ck["vocab_sizes"]["brand"] = 9
    torch.save(ck, path)
    with pytest.raises(
        UserError, match=f"{path}: model/vocabulary size mismatch: .*size mismatch for item_tower.embs.brand"
    ):
        registry.model_from_checkpoint(registry.read_checkpoint(path), path)
    # Weights of another version of the model code.
    ck["vocab_sizes"]["brand"] = 5
    ck["state_dict"]["extra.weight"] = torch.zeros(2)
    torch.save(ck, path)
    with pytest.raises(UserError, match=f"{path}: its weights do not fit this version of the model code"):
        registry.model_from_checkpoint(registry.read_checkpoint(path), path)
    # A catalogue smaller than the model: older than the model, or another warehouse.
    small = catalog(n_items=20)
    with pytest.raises(UserError, match="model.pt: model/vocabulary size mismatch: catalogue has 21 item ids"):
        registry.fit_to_catalog(m, small, str(path))


# --------------------------------------------------------------- grow
@pytest.mark.parametrize("tie", [True, False])
def test_grow_adds_rows_and_keeps_old_ones_exactly(tie):
    cat = catalog()
    m = tiny(cat, tie_embeddings=tie)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    old_vecs = m.item_tower.all_items()
    new_cat = bigger(cat)
    grown = grow(m, new_cat)
    assert grown == {"item": [31, 38], "brand": [5, 6], "category_l3": [8, 10], "event_type": [3, 4]}
    after = m.state_dict()
    assert set(after) == set(before)
    for k, old in before.items():
        new = after[k]
        if k == "item_tower.attrs":
            assert new.shape == (38, 4) and torch.equal(new[:31], old)
        elif old.dim() and new.shape != old.shape:
            assert torch.equal(new[: old.shape[0]], old), k  # every old row exactly as it was
        else:
            assert torch.equal(new, old), k
    assert m.sizes == new_cat.sizes and m.item_tower.n_items == 37
    assert m.heads.readouts["brand"].labels.num_embeddings == 6
    assert torch.equal(m.heads.readouts["brand"].labels.weight[5], torch.zeros(16))
    bias = getattr(m.heads.readouts["brand"], "bias", None)  # heads with a per-label prior
    if bias is not None:
        assert bias.shape == (6,) and bias[5] == before["heads.readouts.brand.bias"][1:].min()
    if tie:  # still one table in and out
        assert m.encoder.features.embs["item_id"] is m.item_tower.embs["item_id"]
    # Old items score as before; a new item's id row is its content vector.
    assert torch.allclose(m.item_tower.all_items()[:31], old_vecs, atol=1e-6)
    t = m.item_tower
    content = torch.stack([t.embs[f].weight[t.attrs[35, i]] for i, f in enumerate(data.ITEM_ATTRS)]).mean(0)
    if m.cfg.pooling == "id_plus_mean":  # id + mean(content): a zero id row leaves exactly the content
        assert torch.equal(t.embs["item_id"].weight[35], torch.zeros(16))
    else:  # mean over id and content: an id row equal to the content mean keeps it
        assert torch.allclose(t.embs["item_id"].weight[35], content, atol=1e-6)
    assert torch.allclose(
        t(torch.tensor([35])),
        t.forward(torch.tensor([0]), attrs={f: t.attrs[35:36, i] for i, f in enumerate(data.ITEM_ATTRS)}),
        atol=1e-6,
    )  # = an unknown id with its content
    b = data.pad_batch(
        data.Sequences(
            np.array(["u"], object),
            np.array([0, 3]),
            {k: np.array([1, 36, 37]) % new_cat.sizes[k] for k in data.INT_FIELDS},
            np.array([1.0, 2.0, 3.0]),
            np.full(3, np.nan, np.float32),
        ),
        np.array([0]),
        8,
    )
    assert torch.isfinite(m.user_embedding(b)).all()
    assert grow(m, new_cat) == {}  # idempotent


@pytest.mark.parametrize("pooling", ["id_plus_mean", "mean"])
def test_a_new_item_without_learned_content_gets_a_unit_vector(pooling):
    """New items with no metadata, or only attribute values newer than the model, have no content the model
    knows: after growth they start as a typical item (the mean trained id row), a unit vector, never zero."""
    cat = catalog()
    m = tiny(cat, pooling=pooling, item_mlp=False)
    new_cat = bigger(cat, more_items=3)
    for a in data.ITEM_ATTRS:
        new_cat.attrs[a][-2] = 0  # no metadata at all
    new_cat.attrs["brand"][-1] = new_cat.sizes["brand"] - 1  # only values the model has not learned
    new_cat.attrs["category_l3"][-1] = new_cat.sizes["category_l3"] - 1
    for a in ("category_l1", "category_l2"):
        new_cat.attrs[a][-1] = 0
    grow(m, new_cat)
    vecs = m.item_tower.all_items()
    ids = m.item_tower.embs["item_id"].weight
    typical = ids[1:31].mean(0)
    for i in (32, 33):
        assert torch.allclose(ids[i], typical, atol=1e-6)
        assert vecs[i].norm().item() == pytest.approx(1.0, abs=1e-5)
    # An item with learned content is not touched by the fallback.
    assert not torch.allclose(ids[31], typical)


# --------------------------------------------------------------- gate
def test_gate_threshold():
    pub = {"ndcg@10": 0.10, "recall@10": 0.20}
    ok = gate({"ndcg@10": 0.099, "recall@10": 0.20}, pub, ["ndcg@10", "recall@10"], 0.02, users=50, min_users=10)
    assert ok["promote"] and ok["checks"]["ndcg@10"]["threshold"] == pytest.approx(0.098)
    bad = gate({"ndcg@10": 0.097, "recall@10": 0.30}, pub, ["ndcg@10", "recall@10"], 0.02, users=50, min_users=10)
    assert not bad["promote"] and "ndcg@10 0.0970 < 0.0980" in bad["reason"]
    assert gate(pub, pub, ["ndcg@10"], 0.0, 50, 10)["promote"]  # equal passes a zero tolerance
    assert not gate(pub, pub, ["ndcg@10"], -0.1, 50, 10)["promote"]  # a negative tolerance demands a gain
    few = gate({"ndcg@10": 1.0}, pub, ["ndcg@10"], 0.02, users=3, min_users=10)
    assert not few["promote"] and "only 3 held-out users" in few["reason"]


# ------------------------------------------------------------ resume
def test_resumed_fit_ends_like_an_uninterrupted_one(tmp_path):
    rng = np.random.default_rng(0)
    n_users, n_items = 30, 20
    users = np.repeat([f"u{i}" for i in range(n_users)], 8)
    items = [f"i{(s + k) % n_items}" for s in rng.integers(0, n_items, n_users) for k in range(8)]
    ts = 1.7e15 + np.arange(len(users)) * 3.6e9
    events = pa.table(
        {
            "user_id": users,
            "ts": pa.array(ts.astype(np.int64), pa.timestamp("us", tz="UTC")),
            "event_type": ["view"] * len(users),
            "item_id": items,
            "surface": ["home"] * len(users),
            "duration_s": pa.array([1.0] * len(users)),
        }
    )
    items_t = pa.table(
        {
            "item_id": [f"i{i}" for i in range(n_items)],
            "category_l1": [f"c{i % 3}" for i in range(n_items)],
            "category_l2": [None] * n_items,
            "category_l3": [None] * n_items,
            "brand": [f"b{i % 4}" for i in range(n_items)],
        }
    )
    seqs, cat = data.from_raw(events, items_t)
    train, valid, _ = data.leave_one_out(seqs)
    mc = ModelConfig(d_model=16, max_len=8, time_buckets=8, dropout=0.2, heads=["category_l1", "brand"])
    tc = TrainConfig(epochs=3, batch_size=8, uniform_negatives=16, inbatch_negatives=4, num_threads=1)
    a, ha = fit(mc, tc, train, valid, cat, progress=False, log=lambda s: None)

    class Crash(Exception):
        pass

    def crash_after_epoch_1(line):
        if line.startswith("epoch=1 "):
            raise Crash

    state = tmp_path / "last.pt"
    with pytest.raises(Crash):
        fit(mc, tc, train, valid, cat, progress=False, log=crash_after_epoch_1, state_path=state)
    st = torch.load(state, weights_only=True)
    assert st["epoch"] == 1
    b, hb = fit(mc, tc, train, valid, cat, progress=False, log=lambda s: None, resume=st, state_path=state)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    assert [r["loss"] for r in ha["history"]] == [r["loss"] for r in hb["history"]]
    assert ha["best_epoch"] == hb["best_epoch"] and ha["best_valid"] == hb["best_valid"]
