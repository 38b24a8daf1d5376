"""Model speed: matmul ceiling, training and inference throughput of the customer model, FLOPs.

    python -m tests.benchmarks.model_speed [--device cpu|cuda|auto] [--repeats K] [--out DIR]

Measures in one run (see README.md beside this file, section "model"):

1. the machine's matmul rate: torch.matmul n x n (n = 1024, 2048) and the model's own projection shapes,
   fp32 and bf16, GFLOP/s = 2 n^3 / s;
2. training throughput of `UserFormer` with `train.batch_loss` (one optimizer step = forward + backward
   + grad clip + AdamW, exactly as `train.fit` does it) in sequences/s;
3. inference throughput: `train.embed_users` users/s and `item_tower.all_items` items/s;
4. FLOPs of every measured batch from the model's shape (`forward_flops` / `step_flops` below), checked
   against `torch.utils.flop_counter.FlopCounterMode` on (a slice of) one batch of each kind, and the
   achieved GFLOP/s as a fraction of the measured matmul rate of the same precision;
5. where the time goes: forward / backward / optimizer split of every step, one torch.profiler call per
   config (self time of aten ops by kind), user vs kernel CPU time, and (CPU) the same at 1 thread.

Two model configurations (`default` = ModelConfig() as it ships, the Beauty-tuned d=64 x 1 layer,
max_len 50; `production` = d=128, 2 layers, 4 heads, FFN 4d, max_len 256, every event feature, the
three preference heads) x two length mixes (`full`: every sequence longer than max_len; `skewed`: a
log-normal mix, median 12 events) x precisions (fp32; bf16 autocast on CPU and CUDA). All data are
synthetic and in memory (`data.Sequences` / `data.ItemCatalog`, random ids). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop

from tests.benchmarks.pipeline import git_info, load, log, machine_info, mem_available_gib, now
from tests.benchmarks.render import write_summary
from userformer.jobs.core.config import ModelConfig, TrainConfig
from userformer.models import losses
from userformer.models.data import INT_FIELDS, ITEM_ATTRS, ItemCatalog, Sequences, batches, item_counts, pad_batch
from userformer.models.item_tower import FIELD
from userformer.models.model import UserFormer
from userformer.models.train import autocast, batch_loss, embed_users, seed_everything, to_device

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 7

# ------------------------------------------------------------------ configs
# Vocabulary sizes (max id + 1) of the synthetic catalogues. `beauty`: the item/category/brand counts of
# the S3-Rec Amazon Beauty file as the s3rec loader reads it (12,101 items, 438 brands); event types and
# surfaces as the raw contract has them. `production`: 100K items shaped like jobs/tools/generate.py's world
# (8 lines x 6 categories x 5 subcategories, one brand per 20 items).
CATALOGS = {
    "beauty": {
        "item": 12_102,
        "category_l1": 7,
        "category_l2": 37,
        "category_l3": 174,
        "brand": 438,
        "event_type": 12,
        "surface": 8,
    },
    "production": {
        "item": 100_001,
        "category_l1": 9,
        "category_l2": 49,
        "category_l3": 241,
        "brand": 5_001,
        "event_type": 12,
        "surface": 8,
    },
}


def model_configs() -> dict[str, tuple[ModelConfig, str]]:
    """name -> (ModelConfig, catalogue name)."""
    prod = dataclasses.replace(
        ModelConfig(),
        d_model=128,
        n_layers=2,
        n_heads=4,
        ffn_mult=4,
        max_len=256,
        heads=["category_l1", "brand", "event_type"],
    )
    return {"default": (ModelConfig(), "beauty"), "production": (prod, "production")}


MIXES = {
    "full": "every sequence longer than max_len + 1 (all batches full width)",
    "skewed": "log-normal lengths, median 12, sigma 1.2, 2..1000 events (p90 ~56, p99 ~200)",
}


# ------------------------------------------------------------------- data
def synth_catalog(sizes: dict[str, int], rng: np.random.Generator) -> ItemCatalog:
    """Random attributes per item (row 0 = padding); ~10% of items have no brand, ~5% no category_l3."""
    n = sizes["item"]
    attrs = {}
    for a in ITEM_ATTRS:
        v = rng.integers(1, sizes[a], n)
        miss = {"brand": 0.10, "category_l3": 0.05}.get(a, 0.0)
        v[rng.random(n) < miss] = 0
        v[0] = 0
        attrs[a] = v.astype(np.int64)
    return ItemCatalog(attrs, dict(sizes))


def mix_lengths(mix: str, n_users: int, max_len: int, rng: np.random.Generator) -> np.ndarray:
    if mix == "full":
        return (max_len + 1 + rng.integers(0, 20, n_users)).astype(np.int64)
    if mix == "skewed":
        return np.clip(np.round(np.exp(rng.normal(math.log(12.0), 1.2, n_users))), 2, 1000).astype(np.int64)
    raise ValueError(mix)


def synth_sequences(catalog: ItemCatalog, lengths: np.ndarray, rng: np.random.Generator) -> Sequences:
    """Users with the given lengths; items by a power-law popularity (ids shuffled), their attributes from
    the catalogue, random event types/surfaces, increasing times (log-normal gaps), durations (30% unknown)."""
    n_ev = int(lengths.sum())
    n_items = catalog.n_items
    pop = np.arange(1, n_items + 1, dtype=np.float64) ** -0.8
    perm = rng.permutation(n_items) + 1
    item = perm[rng.choice(n_items, n_ev, p=pop / pop.sum())].astype(np.int64)
    ints = {"item": item}
    for a in ITEM_ATTRS:
        ints[a] = catalog.attrs[a][item]
    ints["event_type"] = rng.integers(1, catalog.sizes["event_type"], n_ev)
    ints["surface"] = rng.integers(1, catalog.sizes["surface"], n_ev)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    gaps = np.exp(rng.normal(math.log(600.0), 2.0, n_ev))
    gaps[offsets[:-1]] = 0.0
    start = np.repeat(1.7e9 + rng.uniform(0, 3e7, len(lengths)), lengths)
    cum = np.cumsum(gaps)
    ts = start + cum - np.repeat(cum[offsets[:-1]], lengths)
    dur = np.exp(rng.normal(math.log(20.0), 1.0, n_ev)).astype(np.float32)
    dur[rng.random(n_ev) < 0.3] = np.nan
    assert set(ints) == set(INT_FIELDS)
    return Sequences(np.array([f"u{i}" for i in range(len(lengths))], dtype=object), offsets, ints, ts, dur)


# ------------------------------------------------------------------ FLOPs
def _periods(cfg: ModelConfig) -> int:
    return len(cfg.time_periods_s) or 1  # TimeFeatures falls back to one period (a day)


def forward_flops(
    cfg: ModelConfig,
    sizes: dict[str, int],
    B: int,
    L: int,
    n_query: int,
    *,
    heads: bool,
    n_items: float = 0,
    n_neg: int = 0,
    n_scored: int | None = None,
) -> dict[str, int]:
    """Matmul FLOPs (2 per multiply-add) of one forward pass of the model, by part.

    B x L: the padded batch the encoder runs on (padding positions cost like real ones);
    n_query: rows through the output stage (time-to-reference + output MLP): every target position in
    training (next_action), one per user in inference;
    n_scored: rows of the retrieval logits (default n_query): training adds one cold-start row per sequence
    that starts in the batch (its first event, scored against the cold embedding: no encoder work);
    heads: the MCM readouts run (training: over all B x L states; per task one (B L x d) @ (d x W) product,
    the scores s(w) = sum_i a_wi att_wi are elementwise);
    n_items: rows through the item tower MLP (training: the distinct ids among positives and negatives,
    `losses.item_vectors`; all_items: the catalogue + row 0);
    n_neg: negatives each query is scored against (shared (N, M) product or per-row (N, M, d) bmm: the same
    2 N M d).
    Per block: qkv + out projections 8 T d^2 (T = B L), attention QK^T and AV 4 B L^2 d (all heads; the
    causal/padding mask is applied to a full L x L product), FFN 4 f T d^2.
    Embedding look-ups, LayerNorm, softmax, GELU, masks, losses and the optimizer have no matmuls and are
    not counted (FlopCounterMode does not count them either). Parts named `*_data` multiply raw inputs
    (durations, sin/cos of time gaps): no gradient flows into those inputs, see step_flops.
    """
    d, T, P = cfg.d_model, B * L, _periods(cfg)
    f = cfg.event_features
    out = {}
    # EventFeaturizer: duration Linear(2, d), time-gap TimeFeatures' periodic Linear(2P, d), concat projection.
    out["featurizer_data"] = T * (2 * 2 * d * ("duration" in f) + 2 * 2 * P * d * ("time_gap" in f))
    if cfg.pooling == "concat":
        n_parts = sum(
            x in f
            for x in (
                "item_id",
                "category_l1",
                "category_l2",
                "category_l3",
                "brand",
                "event_type",
                "surface",
                "duration",
                "time_gap",
            )
        )
        out["featurizer_concat"] = T * 2 * n_parts * d * d
    nl = cfg.n_layers
    out["attn_qkv_out"] = nl * T * 2 * d * 4 * d  # qkv Linear(d, 3d) + out Linear(d, d)
    out["attn_scores"] = nl * 4 * B * L * L * d  # QK^T and AV over all heads: 2 x 2 L^2 d per sequence
    out["ffn"] = nl * T * 2 * 2 * d * cfg.ffn_mult * d
    # UserEncoder.embed on n_query rows: time_ref periodic Linear(2P, d), output ResidualMLP (2 x d x d).
    out["output_data"] = n_query * 2 * 2 * P * d * ("time_ref" in f)
    out["output_mlp"] = n_query * 2 * 2 * d * d * bool(cfg.output_mlp)
    out["item_tower"] = n_items * 2 * 2 * d * d * bool(cfg.item_mlp)
    out["retrieval_logits"] = 2 * (n_query if n_scored is None else n_scored) * n_neg * d
    out["heads"] = 2 * B * L * d * sum(max(sizes[FIELD[t]], 2) for t in cfg.heads) if heads else 0
    return {k: int(round(v)) for k, v in out.items() if v}


def step_flops(fwd: dict[str, int]) -> dict[str, int]:
    """Training step = forward + backward. Backward ~ 2 x forward (grad of the input and of the weight,
    one matmul each), except where the input is raw data (`*_data`): the weight gradient only (1x)."""
    f = sum(fwd.values())
    b = sum(v if k.endswith("_data") else 2 * v for k, v in fwd.items())
    return {"forward": f, "backward": b, "total": f + b}


def expected_distinct(n_items: int, positives: int, draws: int) -> float:
    """Expected distinct ids among `positives` distinct positive ids plus `draws` uniform draws from 1..n_items."""
    if n_items <= 1:
        return float(max(positives, 1 if draws else 0))
    return positives + (n_items - positives) * -math.expm1(draws * math.log1p(-1.0 / n_items))


def train_batch_flops(cfg: ModelConfig, sizes: dict, batch: dict, tcfg: TrainConfig) -> dict:
    """FLOPs of one training step (batch_loss, next_action, sampled softmax) on a batch padded to
    max_len + 1. The item tower runs once per distinct id (losses.item_vectors): its row count is the
    expectation for this batch's positives and the sampler's uniform draws (in-batch negatives are
    positives, so they add no ids)."""
    B, L1 = batch["mask"].shape
    inp, tgt, ok, _ = losses.next_action_targets(batch)
    n_query = int(ok.sum())
    pos = tgt[ok]
    if "from_start" in batch:  # cold-start rows (batch_loss): sequences whose first event is in the batch
        first_item = batch["item"].gather(1, inp["mask"].float().argmax(1)[:, None])[:, 0]
        cold = batch["from_start"] & (first_item > 0)
        pos = torch.cat([pos, first_item[cold]])
    n_scored = len(pos)
    n_pos = int(torch.unique(pos).numel())
    m = tcfg.uniform_negatives + tcfg.inbatch_negatives
    draws = tcfg.uniform_negatives * (n_scored if tcfg.negatives_per_row else 1)
    rows = expected_distinct(sizes["item"] - 1, n_pos, draws)
    fwd = forward_flops(cfg, sizes, B, L1 - 1, n_query, heads=bool(cfg.heads), n_items=rows, n_neg=m, n_scored=n_scored)
    return {
        "B": B,
        "L": L1 - 1,
        "n_query": n_query,
        "n_scored": n_scored,
        "item_tower_rows": round(rows),
        "real_events": int(batch["mask"][:, :-1].sum()),
        "forward_parts": fwd,
        **step_flops(fwd),
    }


def infer_batch_flops(cfg: ModelConfig, sizes: dict, B: int, L: int) -> int:
    return sum(forward_flops(cfg, sizes, B, L, B, heads=False).values())


def items_flops(cfg: ModelConfig, n_rows: int) -> int:
    return sum(forward_flops(cfg, {}, 0, 0, 0, heads=False, n_items=n_rows).values())


# FlopCounterMode has formulas for the CUDA attention kernels but not for the CPU flash kernel that
# scaled_dot_product_attention uses without dropout (inference); the same formulas apply.
_CPU_SDPA = {}
for _name, _fn in (
    ("_scaled_dot_product_flash_attention_for_cpu", sdpa_flop),
    ("_scaled_dot_product_flash_attention_for_cpu_backward", sdpa_backward_flop),
):
    _op = getattr(torch.ops.aten, _name, None)
    if _op is not None:
        _CPU_SDPA[_op] = getattr(_fn, "__wrapped__", _fn)  # FlopCounterMode wraps custom formulas itself


def counted(fn) -> tuple[int, dict]:
    """Run fn under FlopCounterMode: (total FLOPs, FLOPs per aten op)."""
    fc = FlopCounterMode(display=False, custom_mapping=_CPU_SDPA)
    with fc:
        fn()
    per_op = {str(k).replace("aten.", ""): int(v) for k, v in fc.get_flop_counts().get("Global", {}).items()}
    return int(fc.get_total_flops()), per_op


# ----------------------------------------------------------------- timing
class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self) -> float:
        self.sync()
        return time.perf_counter()


def med(xs):
    return statistics.median(xs) if xs else None


def stats(values: list[float]) -> dict:
    return {
        "median": round(med(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "samples": [round(v, 3) for v in values],
    }


def tcfg_for(precision: str, device: torch.device, threads: int, batch_size: int) -> TrainConfig:
    return dataclasses.replace(
        TrainConfig(),
        bf16=precision == "bf16",
        cpu_bf16=precision == "bf16",
        device=device.type,
        num_threads=threads,
        batch_size=batch_size,
    )


def repeat_for(fn, iters: int, end: float, clock: Clock) -> int:
    """Call fn `iters` times (CUDA: no synchronisation per call), or on CPU until perf_counter() >= end (at
    least once): on a shared CPU, calls can get far slower than the calibration said. Returns the count."""
    if clock.cuda:
        for _ in range(iters):
            fn()
        return iters
    done = 0
    while True:
        fn()
        done += 1
        if time.perf_counter() >= end:
            return done


# ----------------------------------------------------------------- matmul
def bench_matmul(
    device: torch.device, shapes: list[tuple[str, int, int, int]], dtypes: list[str], repeats: int, sample_s: float
) -> list[dict]:
    clock = Clock(device)
    out = []
    for label, m, k, n in shapes:
        for name in dtypes:
            dt = torch.float32 if name == "fp32" else torch.bfloat16
            g = torch.Generator(device="cpu").manual_seed(0)
            a = torch.randn(m, k, generator=g).to(device, dt)
            b = torch.randn(k, n, generator=g).to(device, dt)
            for _ in range(2):
                a @ b
            t0 = clock()
            a @ b
            one = clock() - t0
            iters = max(1, math.ceil(sample_s / 2 / max(one, 1e-6)))
            rates, runs = [], []
            for _ in range(repeats):
                la, (u0, s0) = load(), cpu_times()
                t0 = clock()
                done = repeat_for(lambda: a @ b, iters, t0 + sample_s / 2, clock)
                s = clock() - t0
                u1, s1 = cpu_times()
                rates.append(2.0 * m * k * n * done / s / 1e9)
                runs.append(
                    {
                        "seconds": round(s, 4),
                        "cpu_user_s": round(u1 - u0, 3),
                        "cpu_sys_s": round(s1 - s0, 3),
                        "iters": done,
                        "load_before": la,
                    }
                )
            out.append(
                {
                    "shape": label,
                    "m": m,
                    "k": k,
                    "n": n,
                    "dtype": name,
                    "gflops": stats(rates),
                    "cpu_utilisation": _util(runs),
                    "runs": runs,
                }
            )
            log(
                f"  matmul {label} {m}x{k}x{n} {name}: {med(rates):.0f} GFLOP/s (samples {', '.join(f'{r:.0f}' for r in rates)})"
            )
            del a, b
    return out


# ---------------------------------------------------------------- training
def train_step(model, opt, batch, tcfg, sampler, gen, device, times: dict | None = None):
    """One step exactly as train.fit takes it (the batch is already on the device)."""
    t0 = time.perf_counter() if times is not None else 0.0
    with autocast(device, tcfg):
        loss, _ = batch_loss(model, batch, tcfg, sampler, gen, True)
    t1 = time.perf_counter() if times is not None else 0.0
    opt.zero_grad(set_to_none=True)
    loss.backward()
    t2 = time.perf_counter() if times is not None else 0.0
    if tcfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
    opt.step()
    if times is not None:
        t3 = time.perf_counter()
        times["forward"] += t1 - t0
        times["backward"] += t2 - t1
        times["clip_optimizer"] += t3 - t2
    return loss


def make_model(cfg: ModelConfig, catalog: ItemCatalog, device: torch.device, tcfg: TrainConfig):
    seed_everything(SEED)
    model = UserFormer(cfg, catalog).to(device)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=tcfg.lr, weight_decay=tcfg.weight_decay
    )
    return model, opt


def pick_batches(seqs: Sequences, cfg: ModelConfig, batch_size: int, n: int, rng) -> list[np.ndarray]:
    """`n` training batches as train.fit forms them (length-bucketed, `data.batches`), chosen at evenly spaced
    quantiles of their width, so that any n represents the mix's spread of batch widths."""
    rows_all = np.flatnonzero(seqs.lengths >= 2)
    all_b = list(batches(len(rows_all), batch_size, rng, lengths=seqs.lengths[rows_all]))
    all_b = [rows_all[b] for b in all_b if len(b) == batch_size] or [rows_all[b] for b in all_b]
    width = np.array([min(seqs.lengths[b].max(), cfg.max_len + 1) for b in all_b])
    order = np.argsort(width, kind="stable")
    pick = order[np.minimum(((np.arange(n) + 0.5) / n * len(order)).astype(int), len(order) - 1)]
    return [all_b[i] for i in pick]


def n_samples(repeats: int, first_s: float, budget_s: float | None) -> int:
    """Samples to take in all, given the first took first_s: `repeats`, or fewer (but at least 3) when they
    would not fit in budget_s."""
    if budget_s is None or repeats <= 3:
        return repeats
    return max(3, min(repeats, int(budget_s // max(first_s, 1e-9))))


def cpu_times() -> tuple[float, float]:
    t = os.times()
    return t.user, t.system


def slice_batch(batch: dict, n: int) -> dict:
    """The first n rows of a padded batch (same width)."""
    return {k: v[:n] for k, v in batch.items()}


def bench_train(cfg, catalog, seqs, device, precision, args, counter: bool, profile: bool) -> dict:
    tcfg = tcfg_for(precision, device, args.threads, args.batch_size)
    model, opt = make_model(cfg, catalog, device, tcfg)
    model.train()
    # As train.fit builds it.
    sampler = losses.NegativeSampler(
        item_counts(seqs, catalog.n_items),
        tcfg.uniform_negatives,
        tcfg.inbatch_negatives,
        seed=tcfg.seed,
        per_row=tcfg.negatives_per_row,
    )
    gen = torch.Generator().manual_seed(tcfg.seed + 1)
    rng = np.random.default_rng(SEED)
    clock = Clock(device)
    # Padding (pad_batch) is data preparation: timed once apart, not inside the steps.
    pool = pick_batches(seqs, cfg, args.batch_size, 32, rng)
    t0 = time.perf_counter()
    padded = [pad_batch(seqs, rows, cfg.max_len + 1) for rows in pool]
    pad_ms = (time.perf_counter() - t0) / len(pool) * 1e3
    on_dev = [to_device(b, device) for b in padded]
    info = [train_batch_flops(cfg, catalog.sizes, b, tcfg) for b in padded]
    mid = len(pool) // 2
    # Warm-up (allocator, oneDNN primitives: the first step is slower), then one timed step on the
    # median-width batch to size a sample. A step much longer than a sample sizes it by itself (one step
    # per sample either way), which saves a step of the heavy shapes.
    t0 = clock()
    train_step(model, opt, on_dev[mid], tcfg, sampler, gen, device)
    one = clock() - t0
    if one < 4 * args.sample_s:
        t0 = clock()
        train_step(model, opt, on_dev[mid], tcfg, sampler, gen, device)
        one = clock() - t0
    # A mix of widths needs several of its batches in every sample to be represented (whatever a busy
    # machine made the calibration step look like): at least 8 quantiles of the 32 when widths differ.
    min_steps = 1 if len({info[i]["L"] for i in range(len(pool))}) == 1 else min(8, len(pool))
    steps = int(min(len(pool), max(min_steps, math.ceil(args.sample_s / max(one, 1e-6)))))
    idx = np.minimum(((np.arange(steps) + 0.5) / steps * len(pool)).astype(int), len(pool) - 1)
    seq_s, gflops, runs = [], [], []
    n_seq = sum(info[i]["B"] for i in idx)
    flops = sum(info[i]["total"] for i in idx)
    k = args.repeats
    while len(runs) < k:
        times = {"forward": 0.0, "backward": 0.0, "clip_optimizer": 0.0} if device.type == "cpu" else None
        la, (u0, s0) = load(), cpu_times()
        t0 = clock()
        for i in idx:
            train_step(model, opt, on_dev[i], tcfg, sampler, gen, device, times)
        s = clock() - t0
        u1, s1 = cpu_times()
        seq_s.append(n_seq / s)
        gflops.append(flops / s / 1e9)
        runs.append(
            {
                "seconds": round(s, 4),
                "cpu_user_s": round(u1 - u0, 3),
                "cpu_sys_s": round(s1 - s0, 3),
                "load_before": la,
                "phases_s": {k_: round(v, 4) for k_, v in times.items()} if times else None,
            }
        )
        if len(runs) == 1:
            k = n_samples(args.repeats, s, args.budget_s)
    res = {
        "precision": precision,
        "steps_per_sample": steps,
        "sequences_per_sample": n_seq,
        "samples": len(runs),
        "reduced": len(runs) < args.repeats,
        "calibration_step_s": round(one, 4),
        "pad_batch_ms_per_batch": round(pad_ms, 2),
        "batch_widths": [info[i]["L"] + 1 for i in idx],
        "padding_share": round(
            1 - sum(info[i]["real_events"] for i in idx) / sum(info[i]["B"] * info[i]["L"] for i in idx), 4
        ),
        "negatives": {
            "uniform": tcfg.uniform_negatives,
            "inbatch": tcfg.inbatch_negatives,
            "per_row": tcfg.negatives_per_row,
        },
        "item_tower_rows_per_step": round(statistics.mean(info[i]["item_tower_rows"] for i in idx)),
        "flops_per_sample_formula": flops,
        "flops_per_sequence_formula": round(flops / n_seq),
        "forward_parts_per_sequence": {
            p_: round(sum(info[i]["forward_parts"].get(p_, 0) for i in idx) / n_seq)
            for p_ in PARTS
            if any(p_ in info[i]["forward_parts"] for i in idx)
        },
        "sequences_per_s": stats(seq_s),
        "gflops_formula": stats(gflops),
        "cpu_utilisation": _util(runs),
        "runs": runs,
    }
    if counter:
        # On a slice of the median batch (same width; the count is linear in the rows): a check of the
        # formula, cheap enough for the production shape.
        b = slice_batch(on_dev[mid], min(args.check_rows, on_dev[mid]["mask"].shape[0]))
        f = train_batch_flops(cfg, catalog.sizes, {k_: v.cpu() for k_, v in b.items()}, tcfg)
        fc_total, per_op = counted(lambda: train_step(model, opt, b, tcfg, sampler, gen, device))
        res["flop_check"] = {
            "batch": {k_: f[k_] for k_ in ("B", "L", "n_query", "n_scored", "item_tower_rows")},
            "formula": f["total"],
            "formula_forward": f["forward"],
            "formula_parts_forward": f["forward_parts"],
            "flop_counter": fc_total,
            "ratio_counter_to_formula": round(fc_total / f["total"], 4),
            "flop_counter_per_op": per_op,
        }
    if profile:
        # One sample's worth of steps (the same batches), so that one stalled call does not dominate.
        res["profile"] = profile_fn(
            lambda: [train_step(model, opt, on_dev[i], tcfg, sampler, gen, device) for i in idx], device
        )
        res["profile"]["steps"] = len(idx)
    res["peak"] = peak_memory(device)
    del model, opt, on_dev
    return res


def _util(runs: list[dict]) -> float | None:
    """Median over samples of CPU seconds (user + sys, all threads) per wall second: 2.0 = both cores busy."""
    u = [(r["cpu_user_s"] + r["cpu_sys_s"]) / r["seconds"] for r in runs if r.get("cpu_user_s") is not None]
    return round(med(u), 2) if u else None


# --------------------------------------------------------------- inference
def infer_chunks(seqs: Sequences, batch_size: int) -> list[np.ndarray]:
    """The batches embed_users forms over `seqs` (rows sorted by length, `batch_size` at a time), full ones only."""
    order = np.argsort(seqs.lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def bench_infer(cfg, catalog, seqs, device, precision, args, counter: bool, profile: bool) -> dict:
    """embed_users users/s on a sample of the batches it forms over the population `seqs` (chosen at evenly
    spaced quantiles of their width, as for training), then item_tower.all_items items/s."""
    tcfg = tcfg_for(precision, device, args.threads, args.batch_size)
    model, _ = make_model(cfg, catalog, device, tcfg)
    model.eval()
    clock = Clock(device)
    bs = args.infer_batch_size
    chunks = infer_chunks(seqs, bs)
    mid = seqs.take_users(chunks[len(chunks) // 2])
    embed_users(
        model, mid.take_users(np.arange(min(64, len(mid)))), cfg.max_len, device, tcfg, batch_size=bs
    )  # warm-up
    t0 = clock()
    embed_users(model, mid, cfg.max_len, device, tcfg, batch_size=bs)
    one = clock() - t0
    widths = {int(min(seqs.lengths[c].max(), cfg.max_len)) for c in chunks}
    k = int(min(len(chunks), max(1 if len(widths) == 1 else 4, math.ceil(args.sample_s / max(one, 1e-6)))))
    pick = np.minimum(((np.arange(k) + 0.5) / k * len(chunks)).astype(int), len(chunks) - 1)
    sub = seqs.take_users(np.concatenate([chunks[i] for i in pick]))
    n = len(sub)
    # FLOPs of exactly the batches embed_users forms (sorted by length, batch_size rows, trimmed width).
    order = np.argsort(sub.lengths, kind="stable")
    flops, tokens, real = 0, 0, 0
    for i in range(0, n, bs):
        lens = np.minimum(sub.lengths[order[i : i + bs]], cfg.max_len)
        B, L = len(lens), max(int(lens.max()), 1)
        flops += infer_batch_flops(cfg, catalog.sizes, B, L)
        tokens += B * L
        real += int(lens.sum())
    users_s, gflops, runs = [], [], []
    reps = args.repeats
    while len(runs) < reps:
        la, (u0, s0) = load(), cpu_times()
        t0 = clock()
        embed_users(model, sub, cfg.max_len, device, tcfg, batch_size=bs)
        s = clock() - t0
        u1, s1 = cpu_times()
        users_s.append(n / s)
        gflops.append(flops / s / 1e9)
        runs.append(
            {"seconds": round(s, 4), "cpu_user_s": round(u1 - u0, 3), "cpu_sys_s": round(s1 - s0, 3), "load_before": la}
        )
        if len(runs) == 1:
            reps = n_samples(args.repeats, s, args.budget_s)
    res = {
        "precision": precision,
        "population_users": len(seqs),
        "users_per_sample": n,
        "batch_size": bs,
        "batches_per_sample": k,
        "batch_widths": [int(min(seqs.lengths[chunks[i]].max(), cfg.max_len)) for i in pick],
        "calibration_batch_s": round(one, 4),
        "padding_share": round(1 - real / tokens, 4),
        "flops_per_sample_formula": flops,
        "flops_per_user_formula": round(flops / n),
        "samples": len(runs),
        "reduced": len(runs) < args.repeats,
        "users_per_s": stats(users_s),
        "gflops_formula": stats(gflops),
        "cpu_utilisation": _util(runs),
        "runs": runs,
    }
    # Check on part of the median batch (same width); profile on as much of it as takes ~2 s.
    med_rows = chunks[pick[len(pick) // 2]]
    first = to_device(pad_batch(seqs, med_rows[: args.check_rows * 4], cfg.max_len), device)
    prof_rows = med_rows[: max(args.check_rows * 4, int(len(med_rows) * min(1.0, 2.0 / max(one, 1e-6))))]
    if counter:
        with torch.no_grad():
            fc_total, per_op = counted(lambda: _embed(model, first, device, tcfg))
        B, L = first["mask"].shape
        f = infer_batch_flops(cfg, catalog.sizes, B, L)
        res["flop_check"] = {
            "batch": {"B": B, "L": L},
            "formula": f,
            "flop_counter": fc_total,
            "ratio_counter_to_formula": round(fc_total / f, 4),
            "flop_counter_per_op": per_op,
        }
    if profile:
        pb = to_device(pad_batch(seqs, prof_rows, cfg.max_len), device)
        with torch.no_grad():
            res["profile"] = profile_fn(lambda: _embed(model, pb, device, tcfg), device, warm=True)
        res["profile"]["rows"] = len(prof_rows)
    # Item tower: every catalogue item (+ row 0), as evaluate() computes it.
    with torch.no_grad():
        with autocast(device, tcfg):
            model.item_tower.all_items()
            t0 = clock()
            model.item_tower.all_items()
            one_i = clock() - t0
        iters = max(1, math.ceil(args.sample_s / 2 / max(one_i, 1e-6)))
        rows = catalog.n_items + 1
        fi = items_flops(cfg, rows)
        items_s, gfl_i, runs_i = [], [], []
        for _ in range(args.repeats):
            la, (u0, s0) = load(), cpu_times()
            with autocast(device, tcfg):
                t0 = clock()
                done = repeat_for(model.item_tower.all_items, iters, t0 + args.sample_s / 2, clock)
                s = clock() - t0
            u1, s1 = cpu_times()
            items_s.append(rows * done / s)
            gfl_i.append(fi * done / s / 1e9)
            runs_i.append(
                {
                    "seconds": round(s, 4),
                    "cpu_user_s": round(u1 - u0, 3),
                    "cpu_sys_s": round(s1 - s0, 3),
                    "iters": done,
                    "load_before": la,
                }
            )
        res["items"] = {
            "rows": rows,
            "iters_calibrated": iters,
            "flops_per_call_formula": fi,
            "items_per_s": stats(items_s),
            "gflops_formula": stats(gfl_i),
            "runs": runs_i,
        }
        if counter:
            with autocast(device, tcfg):
                fc_i, _ = counted(lambda: model.item_tower.all_items())
            res["items"]["flop_check"] = {
                "formula": fi,
                "flop_counter": fc_i,
                "ratio_counter_to_formula": round(fc_i / fi, 4) if fi else None,
            }
    res["peak"] = peak_memory(device)
    del model
    return res


def _embed(model, batch, device, tcfg):
    with autocast(device, tcfg):
        return model.user_embedding(batch)


# ----------------------------------------------------------------- profile
CATEGORIES = [
    ("matmul", ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "mkldnn", "einsum")),
    ("attention kernel", ("scaled_dot_product", "flash_attention")),
    ("embedding / gather / index", ("embedding", "index", "gather", "scatter", "take", "masked_select", "nonzero")),
    ("optimizer", ("_foreach", "adamw", "lerp", "addcdiv", "addcmul")),
    ("softmax / norm", ("softmax", "layer_norm", "native_layer_norm", "norm", "logsumexp", "cross_entropy", "nll")),
    (
        "copy / cast / mask",
        (
            "copy_",
            "to",
            "_to_copy",
            "clone",
            "contiguous",
            "masked_fill",
            "where",
            "cat",
            "stack",
            "fill_",
            "zero_",
            "empty",
            "ones",
            "zeros",
            "nan_to_num",
            "tril",
            "eye",
            "arange",
        ),
    ),
]


def _category(name: str) -> str:
    n = name.replace("aten::", "").lower()
    for cat, keys in CATEGORIES:
        if any(n == k or n.startswith(k) or (len(k) > 4 and k in n) for k in keys):
            return cat
    return "elementwise / other"


def profile_fn(fn, device: torch.device, top: int = 12, warm: bool = False) -> dict:
    """Self time of aten ops during one call (with `warm`, the call is made once before, unprofiled): top
    ops and a breakdown by kind. Only ops (aten::*) are counted, so the shares add up to the time in torch ops."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if warm:
        fn()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(getattr(e, key) for e in ops) or 1.0
    by = {}
    for e in ops:
        c = _category(e.key)
        by[c] = by.get(c, 0.0) + getattr(e, key)
    tops = sorted(ops, key=lambda e: -getattr(e, key))[:top]
    return {
        "wall_s_profiled": round(wall, 4),
        "ops_self_s": round(total / 1e6, 4),
        "time_key": key,
        "by_kind": {k: round(v / total, 4) for k, v in sorted(by.items(), key=lambda kv: -kv[1])},
        "top_ops": [
            {
                "op": e.key,
                "self_ms": round(getattr(e, key) / 1e3, 2),
                "share": round(getattr(e, key) / total, 4),
                "calls": e.count,
            }
            for e in tops
        ],
    }


def peak_memory(device: torch.device) -> dict:
    out = {"max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if device.type == "cuda":
        out["cuda_max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


# --------------------------------------------------------------- context
def torch_info(device: torch.device) -> dict:
    info = {
        "torch": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cpu_flags": _cpu_flags(),
        "device": str(device),
        "cuda_available": torch.cuda.is_available(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(
            {
                "cuda_device": p.name,
                "cuda_memory_gib": round(p.total_memory / 2**30, 1),
                "cuda_version": torch.version.cuda,
                "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            }
        )
    return info


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(
                    f for f in line.split(":", 1)[1].split() if f.startswith(("avx512", "amx", "avx2", "fma"))
                )
    except OSError:
        pass
    return []


def lengths_summary(lengths: np.ndarray, max_len: int) -> dict:
    p = np.percentile(lengths, [10, 50, 90, 99])
    return {
        "users": int(len(lengths)),
        "events": int(lengths.sum()),
        "mean": round(float(lengths.mean()), 1),
        "p10": float(p[0]),
        "p50": float(p[1]),
        "p90": float(p[2]),
        "p99": float(p[3]),
        "max": int(lengths.max()),
        "share_over_max_len": round(float((lengths > max_len).mean()), 4),
    }


PARTS = [
    "featurizer_data",
    "attn_qkv_out",
    "attn_scores",
    "ffn",
    "output_data",
    "output_mlp",
    "item_tower",
    "retrieval_logits",
    "heads",
]


def _cfg_line(cfg: ModelConfig, catalog: str) -> str:
    return (
        f"d={cfg.d_model}, {cfg.n_layers} layer(s), {cfg.n_heads} head(s), FFN {cfg.ffn_mult}d, max_len {cfg.max_len}, "
        f"{len(cfg.event_features)} event features, heads {cfg.heads}, catalogue `{catalog}` "
        f"({', '.join(f'{k} {v - 1:,}' for k, v in CATALOGS[catalog].items())})"
    )


# -------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.model_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    p.add_argument("--repeats", type=int, default=5, help="samples per measurement (default 5)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default tests/benchmarks/results/)")
    p.add_argument("--configs", default="default,production", help="comma list of: " + ", ".join(model_configs()))
    p.add_argument("--mixes", default="full,skewed", help="comma list of: " + ", ".join(MIXES))
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16 (bf16 = autocast)")
    p.add_argument(
        "--threads", type=int, default=TrainConfig().num_threads, help="torch threads (default train.num_threads)"
    )
    p.add_argument(
        "--batch-size", type=int, default=TrainConfig().batch_size, help="training batch (default train.batch_size)"
    )
    p.add_argument(
        "--infer-batch-size", type=int, default=1024, help="embed_users batch size (default 1024, as evaluate)"
    )
    p.add_argument("--sample-s", type=float, default=1.0, help="aim of one sample's duration in seconds (default 1.0)")
    p.add_argument("--users", type=int, default=4096, help="synthetic users per mix (default 4096 = 32 batches of 128)")
    p.add_argument(
        "--infer-users",
        type=int,
        default=16384,
        help="inference population of the skewed mix (default 16384 = 16 batches of 1024)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=30.0,
        help="after a measurement's first sample, take only as many as fit in S seconds, at least 3 "
        "(recorded as reduced); 0 = always --repeats (default 30)",
    )
    p.add_argument(
        "--check-rows",
        type=int,
        default=16,
        help="rows of the batch the FlopCounterMode check runs on (inference: 4x; default 16)",
    )
    p.add_argument(
        "--no-thread-probe",
        action="store_true",
        help="skip the 1-thread comparison (matmul 2048 and the first config's first mix, CPU only)",
    )
    p.add_argument("--no-flop-check", action="store_true", help="skip the FlopCounterMode check")
    p.add_argument("--no-profile", action="store_true", help="skip torch.profiler")
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    a.budget_s = a.budget_s or None
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    device = torch.device(
        "cuda" if a.device == "auto" and torch.cuda.is_available() else "cpu" if a.device == "auto" else a.device
    )
    torch.set_num_threads(a.threads)
    cfgs = model_configs()
    names = [c.strip() for c in a.configs.split(",") if c.strip()]
    mixes = [m.strip() for m in a.mixes.split(",") if m.strip()]
    precs = [x.strip() for x in a.precisions.split(",") if x.strip()]
    if not precs or not set(precs) <= {"fp32", "bf16"}:
        p.error(f"--precisions: a comma list of fp32, bf16 (got {a.precisions!r})")
    for n in names:
        if n not in cfgs:
            p.error(f"--configs: unknown {n!r}")
    for m in mixes:
        if m not in MIXES:
            p.error(f"--mixes: unknown {m!r}")
    t_start = time.perf_counter()
    doc = {
        "benchmark": "model-speed",
        "command": " ".join(
            [
                Path(sys.executable).name,
                "-m",
                "tests.benchmarks.model_speed",
                *(argv if argv is not None else sys.argv[1:]),
            ]
        ),
        "params": {
            "device": str(device),
            "repeats": a.repeats,
            "configs": names,
            "mixes": mixes,
            "precisions": precs,
            "threads": a.threads,
            "batch_size": a.batch_size,
            "infer_batch_size": a.infer_batch_size,
            "sample_s": a.sample_s,
            "budget_s": a.budget_s,
            "check_rows": a.check_rows,
            "users": a.users,
            "infer_users": a.infer_users,
            "negatives": TrainConfig().uniform_negatives + TrainConfig().inbatch_negatives,
            "peak_shape": "2048",
        },
        "machine": machine_info(),
        "torch": torch_info(device),
        "git": git_info(),
        "started": now(),
        "load_at_start": load(),
        "mem_available_gib_at_start": mem_available_gib(),
        "configs": {n: _cfg_line(*cfgs[n]) for n in names},
        "model_config": {n: dataclasses.asdict(cfgs[n][0]) for n in names},
        "catalogs": {n: CATALOGS[cfgs[n][1]] for n in names},
        "train_config": dataclasses.asdict(tcfg_for("fp32", device, a.threads, a.batch_size)),
    }
    log(f"model speed on {device}, {a.threads} threads, torch {torch.__version__}; load {load()}")

    # 1. matmul ceiling: square, then the model's own projection shapes (tokens of a full batch x d -> 3d / f d).
    shapes = [("square", 1024, 1024, 1024), ("square", 2048, 2048, 2048)]
    for n in names:
        c = cfgs[n][0]
        T = a.batch_size * c.max_len
        shapes.append((f"{n} qkv", T, c.d_model, 3 * c.d_model))
        shapes.append((f"{n} ffn-in", T, c.d_model, c.ffn_mult * c.d_model))
    shapes = list(dict.fromkeys(shapes))
    doc["matmul"] = bench_matmul(device, shapes, precs, a.repeats, a.sample_s)
    doc["peak_gflops"] = {
        r["dtype"]: r["gflops"]["median"] for r in doc["matmul"] if r["shape"] == "square" and r["m"] == 2048
    }
    probe = device.type == "cpu" and a.threads != 1 and not a.no_thread_probe
    if probe:
        # How much the second thread buys on a shared machine: the same at 1 thread (see README).
        torch.set_num_threads(1)
        log("matmul at 1 thread")
        doc["matmul_1_thread"] = bench_matmul(device, [("square", 2048, 2048, 2048)], precs, 3, a.sample_s)
        torch.set_num_threads(a.threads)

    # 2-4. per config x mix x precision.
    doc["results"] = []
    for n in names:
        cfg, cat_name = cfgs[n]
        rng = np.random.default_rng(SEED)
        catalog = synth_catalog(CATALOGS[cat_name], rng)
        for mix in mixes:
            lengths = mix_lengths(mix, a.users, cfg.max_len, rng)
            seqs = synth_sequences(catalog, lengths, rng)
            # Inference reads a larger population for the skewed mix, so that its length-sorted batches of
            # infer_batch_size are as narrow as on a real user base (full: every batch is max_len wide anyway).
            n_inf = a.users if mix == "full" else max(a.users, a.infer_users)
            inf_seqs = (
                seqs if n_inf == a.users else synth_sequences(catalog, mix_lengths(mix, n_inf, cfg.max_len, rng), rng)
            )
            entry = {
                "config": n,
                "mix": mix,
                "lengths": lengths_summary(lengths, cfg.max_len),
                "lengths_inference": lengths_summary(inf_seqs.lengths, cfg.max_len),
                "train": [],
                "infer": [],
            }
            seed_everything(SEED)
            entry["n_parameters"] = UserFormer(cfg, catalog).n_parameters()
            for prec in precs:
                first = prec == precs[0]
                log(f"{n} / {mix} / {prec}: training (load {load()})")
                tr = bench_train(
                    cfg,
                    catalog,
                    seqs,
                    device,
                    prec,
                    a,
                    counter=first and not a.no_flop_check,
                    profile=mix == "full" and not a.no_profile,
                )
                entry["train"].append(tr)
                log(
                    f"  train: {tr['sequences_per_s']['median']:,.0f} seq/s, {tr['gflops_formula']['median']:.1f} GFLOP/s "
                    f"({tr['steps_per_sample']} steps/sample; samples {tr['sequences_per_s']['samples']})"
                    + (
                        f"; FlopCounter/formula {tr['flop_check']['ratio_counter_to_formula']}"
                        if "flop_check" in tr
                        else ""
                    )
                )
                log(f"{n} / {mix} / {prec}: inference (load {load()})")
                inf = bench_infer(
                    cfg,
                    catalog,
                    inf_seqs,
                    device,
                    prec,
                    a,
                    counter=first and not a.no_flop_check,
                    profile=mix == "full" and not a.no_profile,
                )
                entry["infer"].append(inf)
                log(
                    f"  embed_users: {inf['users_per_s']['median']:,.0f} users/s, {inf['gflops_formula']['median']:.1f} GFLOP/s"
                    + (
                        f"; FlopCounter/formula {inf['flop_check']['ratio_counter_to_formula']}"
                        if "flop_check" in inf
                        else ""
                    )
                    + f"; all_items {inf['items']['items_per_s']['median']:,.0f} items/s"
                )
            if probe and n == names[0] and mix == mixes[0]:
                p1 = argparse.Namespace(**{**vars(a), "threads": 1, "repeats": 3})
                torch.set_num_threads(1)
                log(f"{n} / {mix} / {precs[0]} at 1 thread (load {load()})")
                tr1 = bench_train(cfg, catalog, seqs, device, precs[0], p1, counter=False, profile=False)
                in1 = bench_infer(cfg, catalog, inf_seqs, device, precs[0], p1, counter=False, profile=False)
                torch.set_num_threads(a.threads)
                entry["thread_probe"] = {"threads": 1, "precision": precs[0], "train": tr1, "infer": in1}
                log(
                    f"  1 thread: train {tr1['sequences_per_s']['median']:,.0f} seq/s, embed_users "
                    f"{in1['users_per_s']['median']:,.0f} users/s"
                )
            doc["results"].append(entry)
            del seqs, inf_seqs
    doc["finished"] = now()
    doc["load_at_end"] = load()
    doc["total_s"] = round(time.perf_counter() - t_start, 1)
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "model-speed.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(write_summary(path, json.loads(path.read_text())), flush=True)
    log(f"wrote {a.out / 'model-speed.json'} and .md in {doc['total_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
