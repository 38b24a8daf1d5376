"""Inference pieces without a warehouse: the batched forward pass, the shard hash, the output-check statistics."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import torch

from tests.unit.test_model import model_of, tiny_cfg, tiny_data
from userformer.jobs.steps import infer
from userformer.jobs.steps.quality.outputs import score_stats, vector_stats
from userformer.models.data import pad_batch

torch.set_num_threads(1)


def test_embed_sequences_equals_the_model_user_by_user():
    seqs, cat = tiny_data(n_users=23)
    model = model_of(tiny_cfg(), cat).eval()
    seqs = seqs.take_events(seqs.position_in_user() < np.repeat(np.arange(len(seqs)) % 12 + 1, seqs.lengths))
    emb, prefs = infer.embed_sequences(model, seqs, torch.device("cpu"), batch_size=5, top_k=3)
    with torch.no_grad():
        b = pad_batch(seqs, np.arange(len(seqs)), model.cfg.max_len, trim=False)
        want = model.user_embedding(b)
        p = model.preferences(b)
    np.testing.assert_allclose(emb, want.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    assert set(prefs) == {"category_l1", "brand", "event_type"}
    for task, (idx, sc) in prefs.items():
        top = p[task].topk(idx.shape[1], dim=-1)
        assert idx.shape == (len(seqs), min(3, p[task].shape[1] - 1)) and (idx > 0).all()
        np.testing.assert_allclose(sc, top.values.numpy(), atol=1e-5)
        assert (np.diff(sc, axis=1) <= 1e-7).all() and (sc.sum(1) <= 1 + 1e-6).all()


def test_shards_are_a_stable_hash_of_the_id():
    ids = [f"u{i}" for i in range(1000)]
    s = infer.shard_of(ids, 4)
    assert s.tolist() == infer.shard_of(ids, 4).tolist() and set(s) == {0, 1, 2, 3}
    assert all(200 < (s == k).sum() < 300 for k in range(4))
    # blake2b-64 of the UTF-8 bytes, big-endian, modulo n: the same number on any machine or process.
    assert (
        infer.shard_of(["user-42"], 1_000_003)[0]
        == int.from_bytes(__import__("hashlib").blake2b(b"user-42", digest_size=8).digest(), "big") % 1_000_003
    )
    assert infer.shard_of([], 3).tolist() == []


def test_user_tables_follow_the_published_schemas():
    from userformer.schemas import tables

    emb = np.eye(2, 4, dtype=np.float32)
    prefs = {"brand": (np.array([[2, 1], [1, 3]]), np.array([[0.6, 0.3], [0.5, 0.2]], np.float32))}
    keys = {"brand": np.array([None, "acme", "bolt"], object)}
    ue, ps = infer.user_tables(
        np.array(["a", "b"], object),
        emb,
        prefs,
        keys,
        "v0001-20261101-train",
        dt.date(2026, 11, 1),
        dt.datetime(2026, 11, 2, tzinfo=dt.UTC),
    )
    assert ue.schema == tables.USER_EMBEDDINGS and ps.schema == tables.USER_PREFERENCE_SCORES
    assert ue["embedding"].to_pylist()[1] == [0.0, 1.0, 0.0, 0.0]
    assert ps.to_pylist()[1]["labels"] == ["acme", None] and ps.to_pylist()[0]["label_idx"] == [2, 1]


def test_vector_and_score_statistics():
    v = pa.array([[0.6, 0.8], [1.0, float("nan")], [3.0, 4.0, 0.0], None], pa.list_(pa.float32()))
    st = vector_stats(v)
    assert st["dim"].tolist() == [2, 2, 3, 0] and st["finite"].tolist() == [True, False, True, False]
    np.testing.assert_allclose(st["norm"][[0, 2]], [1.0, 5.0], rtol=1e-6)
    scores = pa.array([[0.5, 0.3], [0.2, 0.7], [0.9, 0.2], [float("inf")]], pa.list_(pa.float32()))
    idx = pa.array([[1, 2], [1, 2], [1, 2], [1]], pa.list_(pa.int64()))
    labels = pa.array([["a", "b"], ["a", "b"], ["a"], ["a"]], pa.list_(pa.string()))
    s = score_stats(scores, idx, labels)
    assert s["descending"].tolist() == [True, False, True, True]
    assert s["parallel"].tolist() == [True, True, False, True] and s["finite"].tolist() == [True, True, True, False]
    np.testing.assert_allclose(s["sum"][:3], [0.8, 0.9, 1.1], rtol=1e-6)
    np.testing.assert_allclose(s["top1"][:3], [0.5, 0.2, 0.9], rtol=1e-6)
    assert s["min"][1] == np.float32(0.2) and s["max"][2] == np.float32(0.9)


def test_users_are_embedded_as_of_the_end_of_the_day_that_changed_them():
    """Inference reads the time-to-reference feature at the end of the user's `updated_dt` (when the vector starts
    being served), as the gate reads it at its split time; not at the newest event (a gap of 0 no training
    position ever has). The day computing it does not matter: a full re-embed later gives the same vector."""
    seqs, cat = tiny_data(n_users=6)
    model = model_of(tiny_cfg(), cat).eval()
    newest = seqs.ts[seqs.offsets[1:] - 1]
    days = (newest // 86400).astype(np.int32) + np.arange(6) % 3  # changed on the newest event's day or later
    t = pa.table(
        {
            "user_id": pa.array(list(seqs.user_ids), pa.string()),
            "item_idx": pa.ListArray.from_arrays(pa.array(seqs.offsets.astype(np.int32)), pa.array(seqs.ints["item"])),
            **{
                c: pa.ListArray.from_arrays(pa.array(seqs.offsets.astype(np.int32)), pa.array(seqs.ints[k]))
                for k, c in (
                    ("event_type", "event_type_idx"),
                    ("category_l1", "category_l1_idx"),
                    ("category_l2", "category_l2_idx"),
                    ("category_l3", "category_l3_idx"),
                    ("brand", "brand_idx"),
                    ("surface", "surface_idx"),
                )
            },
            "ts": pa.ListArray.from_arrays(
                pa.array(seqs.offsets.astype(np.int32)),
                pa.array((seqs.ts * 1e6).astype(np.int64), pa.timestamp("us", tz="UTC")),
            ),
            "duration_s": pa.ListArray.from_arrays(pa.array(seqs.offsets.astype(np.int32)), pa.array(seqs.duration)),
            "updated_dt": pa.array(days, pa.int32()).cast(pa.date32()),
        }
    )
    keys = {task: np.array([None] + [f"l{i}" for i in range(1, 40)], object) for task in model.heads.readouts}
    job = infer.Job("v1", dt.date(2026, 11, 1), dt.datetime(2026, 11, 2, tzinfo=dt.UTC), 0, 1, 4, 3, False, "cpu", {})
    ue, _ = infer._embed_table(model, t, keys, torch.device("cpu"), job)
    as_of = (days + 1.0) * 86400.0
    np.testing.assert_allclose(infer.embedded_at(t["updated_dt"]), as_of)
    with torch.no_grad():
        want = model.user_embedding(pad_batch(seqs, np.arange(6), model.cfg.max_len, ref_ts=as_of, trim=False))
        at_newest = model.user_embedding(pad_batch(seqs, np.arange(6), model.cfg.max_len, trim=False))
    got = np.array(ue["embedding"].to_pylist(), np.float32)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    assert not np.allclose(got, at_newest.numpy(), atol=1e-3)  # the reference time is read, not ignored
