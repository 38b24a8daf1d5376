"""Training loop: deterministic by seed, CPU or CUDA (bf16 autocast) with the same code, AdamW (and SparseAdam for
the item-id tables with ``train.sparse_embeddings``: see `Optimizer`), tqdm progress (loss, sequences/s), early
stopping on validation NDCG@10, best checkpoint kept.

`fit` works on in-memory `Sequences` (data.py) or on a chunked source
(models/stream.py: DeltaSequences streams user_sequences) through the same `train_epoch`.

Data-parallel: when torch.distributed is initialised (torchrun, or any launcher
that sets up a process group; gloo on CPUs, nccl on GPUs), every rank runs `fit`
on the same data with the same seed, so all ranks draw the same chunks and
batches, and each trains on its share of them (batch i goes to rank i mod world)
through DistributedDataParallel, which averages the gradients. Negatives and
dropout are drawn per rank. Rank 0 validates, keeps the best checkpoint and
writes the files (the resumable state holds every rank's random streams); at
the end every rank holds rank 0's result.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from userformer.models import losses
from userformer.models.config import ModelConfig, TrainConfig
from userformer.models.data import (
    INT_FIELDS,
    ITEM_ATTRS,
    EvalSet,
    ItemCatalog,
    Sequences,
    as_source,
    batches,
    item_counts,
    pad_batch,
)
from userformer.models.metrics import HeadAccuracy, RankingAccumulator
from userformer.models.model import UserFormer

# Seed offset of rank r's negatives and dropout (rank 0 draws exactly what a single process draws).
RANK_SEED = 7919


def process_group() -> tuple[int, int]:
    """(rank, world size) of the data-parallel group `fit` runs in: (0, 1) without torch.distributed."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def _share(batches, rank: int, world: int):
    """Rank `rank`'s batches: every world-th, the same number on every rank (the remainder is left out), because
    each step is a collective that every rank must join."""
    if world == 1:
        yield from batches
        return
    all_ = list(batches)
    yield from all_[rank::world][: len(all_) // world]


# ------------------------------------------------------ sparse embeddings
def sparse_tables(model: UserFormer, tcfg: TrainConfig) -> list[nn.Embedding]:
    """Set which embedding tables give sparse gradients under `tcfg` (``sparse_embeddings``, ``sparse_min_rows``) and
    return them (each once: a table tied between the towers is one). Sets the flag both ways, so a model trained
    before with another setting follows this one. Call it before DistributedDataParallel wraps the model: DDP reads
    the flags when it is built."""
    out: dict[int, nn.Embedding] = {}
    for embs in (model.item_tower.embs, model.encoder.features.embs):
        for name, emb in embs.items():
            big = name == "item_id" or emb.num_embeddings >= tcfg.sparse_min_rows
            emb.sparse = bool(tcfg.sparse_embeddings and big)
            if emb.sparse and emb.weight.requires_grad:
                out[id(emb)] = emb
    return list(out.values())


class Optimizer:
    """AdamW over the dense parameters and, with sparse tables, SparseAdam over those, stepped as one.

    SparseAdam is lazy Adam: a step moves only the rows in its gradient (the items, categories, brands the batch
    used: positives, negatives, history) and updates only their moments, so the cost of a step follows the batch,
    not the catalogue; rows a step does not use keep their values and their moments. It has no weight decay: the
    sparse tables are not decayed (``weight_decay`` applies to the dense parameters), as is usual for id embeddings;
    AdamW's decay of every row at every step would make every step dense again. Without sparse tables this is plain
    AdamW and its state_dict is AdamW's (the format earlier checkpoints have)."""

    def __init__(self, model: nn.Module, tcfg: TrainConfig, sparse: list[nn.Embedding]):
        ids = {id(e.weight) for e in sparse}
        dense = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        self.dense = torch.optim.AdamW(dense, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
        self.sparse = torch.optim.SparseAdam([e.weight for e in sparse], lr=tcfg.lr) if sparse else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none=set_to_none)
        if self.sparse is not None:
            self.sparse.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.dense.step()
        if self.sparse is not None:
            self.sparse.step()

    def state_dict(self) -> dict:
        if self.sparse is None:
            return self.dense.state_dict()
        return {"dense": self.dense.state_dict(), "sparse": self.sparse.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if ("sparse" in state) != (self.sparse is not None):
            raise ValueError(
                "optimizer state of a run with train.sparse_embeddings="
                f"{'sparse' in state}, but this run has {self.sparse is not None}: resume with the run's own setting"
            )
        if self.sparse is None:
            self.dense.load_state_dict(state)
        else:
            self.dense.load_state_dict(state["dense"])
            self.sparse.load_state_dict(state["sparse"])


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> None:
    """clip_grad_norm_ over dense and sparse gradients (torch's has no norm of a sparse tensor). A sparse gradient is
    coalesced first: a row used twice in a step (a table read by both towers, an item in two sequences) holds
    two entries until then, and the norm is that of the summed row."""
    grads = []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            grads.append(p.grad._values())
        else:
            grads.append(p.grad)
    if not grads:
        return
    total = torch.nn.utils.get_total_norm(grads)
    # The same coefficient as clip_grad_norm_ (clamped, so never scaled up).
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, coef)


class _BatchLoss(torch.nn.Module):
    """`batch_loss` as a module's forward, so that DistributedDataParallel can average the gradients."""

    def __init__(self, model: UserFormer, tcfg: TrainConfig, sampler, gen: torch.Generator):
        super().__init__()
        self.model, self.tcfg, self.sampler, self.gen = model, tcfg, sampler, gen

    def forward(self, batch: dict, real_time: bool) -> torch.Tensor:
        return batch_loss(self.model, batch, self.tcfg, self.sampler, self.gen, real_time)[0]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, tcfg: TrainConfig):
    """bf16 autocast on CUDA (and on CPU when cpu_bf16); a no-op otherwise."""
    if tcfg.bf16 and (device.type == "cuda" or tcfg.cpu_bf16):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ------------------------------------------------------------------- loss
def batch_loss(
    model: UserFormer,
    batch: dict,
    tcfg: TrainConfig,
    sampler: losses.NegativeSampler | None,
    gen: torch.Generator,
    real_time: bool,
) -> tuple[torch.Tensor, dict]:
    """Loss of one batch padded to max_len + 1 (the extra column supplies the last target)."""
    inp, tgt, ok, query_ts = losses.next_action_targets(batch)
    h = model.encoder.hidden(inp)
    if tcfg.objective == "next_action":
        # Only positions with a target go through the output MLP.
        u = model.encoder.embed(h[ok], query_ts[ok] - inp["ts"][ok])
        pos = tgt[ok]
    else:
        horizon = tcfg.dense_horizon_days * 86400.0 if real_time else float(tcfg.dense_horizon_events)
        _, p, dtgt, dok = losses.dense_all_action_targets(batch, tcfg.dense_positions, horizon, real_time, gen)
        p, dtgt, dok = p.to(h.device), dtgt.to(h.device), dok.to(h.device)
        hp = h.gather(1, p[..., None].expand(-1, -1, h.shape[-1]))[dok]
        gap = (query_ts.gather(1, p) - inp["ts"].gather(1, p))[dok]
        u = model.encoder.embed(hp, gap)
        pos = dtgt[dok]
    # Cold start: the user's first event, predicted from no events at all, trains the cold embedding.
    first = inp["mask"].float().argmax(1)
    first_item = batch["item"].gather(1, first[:, None])[:, 0]
    cold = batch["from_start"].to(first_item.device) & (first_item > 0)
    if cold.any():
        u = torch.cat([u, model.cold_embedding().to(u.dtype).expand(int(cold.sum()), -1)])
        pos = torch.cat([pos, first_item[cold]])
    tau = model.temperature
    if tcfg.loss == "full":
        retrieval = losses.full_softmax(u, model.item_tower.all_items(), pos, tau)
    else:
        neg = sampler.sample(pos).to(u.device)
        vecs = losses.item_vectors(model.item_tower, torch.cat([pos, neg.reshape(-1)]))
        log_q = sampler.log_q.to(u.device) if sampler.log_q is not None else None
        retrieval = losses.sampled_softmax(
            u, vecs[: len(pos)], pos, vecs[len(pos) :].reshape(*neg.shape, -1), neg, log_q, tau
        )
    heads = {}
    if model.heads.tasks:
        # MCM random prefix: one cut per sequence; the heads read events <= t and predict event t+1.
        r = torch.rand(ok.shape, generator=gen).to(ok.device).masked_fill(~ok, -1.0)
        t = r.argmax(1)
        has = ok.any(1)
        cols = torch.arange(ok.shape[1], device=ok.device)[None, :]
        read = inp["mask"] & (cols <= t[:, None])
        scores = model.heads(h, read)
        nxt = tgt.gather(1, t[:, None])[:, 0]
        for task, s in scores.items():
            if task == "event_type":
                label = batch["event_type"][:, 1:].gather(1, t[:, None])[:, 0]
            else:
                label = model.item_tower.attrs[nxt, ITEM_ATTRS.index(task)]
            label = torch.where(has, label, torch.zeros_like(label))
            if (label > 0).any():
                heads[task] = F.cross_entropy(s.float(), label, ignore_index=0)
    loss = losses.multitask_loss(retrieval, heads, tcfg.head_weight)
    return loss, {"retrieval": float(retrieval.detach()), **{k: float(v.detach()) for k, v in heads.items()}}


# ------------------------------------------------------------- evaluation
@torch.no_grad()
def embed_users(
    model: UserFormer,
    seqs: Sequences,
    max_len: int,
    device: torch.device,
    tcfg: TrainConfig,
    batch_size: int = 1024,
    ref_ts: np.ndarray | None = None,
) -> torch.Tensor:
    model.eval()
    out = torch.zeros(len(seqs), model.cfg.d_model, device=device)
    order = np.argsort(seqs.lengths, kind="stable")  # similar lengths per batch: trimmed batches stay narrow
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size]
        b = to_device(pad_batch(seqs, rows, max_len, None if ref_ts is None else ref_ts[rows]), device)
        with autocast(device, tcfg):
            out[torch.from_numpy(rows).to(device)] = model.user_embedding(b).float()
    return out


@torch.no_grad()
def evaluate(
    model: UserFormer,
    ev: EvalSet,
    catalog: ItemCatalog,
    device: torch.device,
    tcfg: TrainConfig,
    ref_ts: np.ndarray | None = None,
    category: str = "category_l2",
    chunk: int = 2048,
    heads: bool = True,
) -> dict:
    """Full-catalogue metrics of `ev` (see metrics.py for the protocol); with `heads`, also the accuracy of
    every preference head (under "heads")."""
    model.eval()
    ref_ts = ev.ref_ts if ref_ts is None else ref_ts
    users = embed_users(model, ev.history, model.cfg.max_len, device, tcfg, ref_ts=ref_ts)
    items = model.item_tower.all_items().float()
    acc = RankingAccumulator(catalog.n_items, catalog.attrs.get(category))
    targets = torch.as_tensor(ev.targets, dtype=torch.long)
    for i in range(0, len(users), chunk):
        sets = ev.target_sets[i : i + chunk] if ev.target_sets is not None else None
        acc.add_embeddings(users[i : i + chunk], items, targets[i : i + chunk], sets, history_pairs(ev, i, chunk))
    out = acc.result()
    if heads and model.heads.tasks:
        out["heads"] = evaluate_heads(model, ev, device, tcfg, ref_ts)
    return out


@torch.no_grad()
def evaluate_heads(
    model: UserFormer,
    ev: EvalSet,
    device: torch.device,
    tcfg: TrainConfig,
    ref_ts: np.ndarray | None = None,
    batch_size: int = 1024,
) -> dict:
    """Accuracy of every preference head on the label of each user's target (metrics.HeadAccuracy)."""
    model.eval()
    acc = HeadAccuracy()
    attrs = model.item_tower.attrs
    targets = torch.as_tensor(ev.targets, dtype=torch.long, device=device).clamp(0, attrs.shape[0] - 1)
    order = np.argsort(ev.history.lengths, kind="stable")
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size]
        b = to_device(pad_batch(ev.history, rows, model.cfg.max_len, None if ref_ts is None else ref_ts[rows]), device)
        with autocast(device, tcfg):
            scores = model.heads(model.encoder.hidden(b), b["mask"])
        r = torch.from_numpy(rows).to(device)
        for task, s in scores.items():
            if task == "event_type":
                if ev.target_event_type is None:
                    continue
                label = torch.as_tensor(ev.target_event_type[rows], dtype=torch.long, device=device)
            else:
                label = attrs[targets[r], ITEM_ATTRS.index(task)]
            acc.add(task, s.float(), label)
    return acc.result()


def evaluate_popular(
    train: Sequences, ev: EvalSet, catalog: ItemCatalog, category: str = "category_l2", chunk: int = 2048
) -> dict:
    """Most-popular baseline in the same harness: every user gets the training counts as scores."""
    counts = torch.from_numpy(item_counts(train, catalog.n_items)).float()
    acc = RankingAccumulator(catalog.n_items, catalog.attrs.get(category))
    targets = torch.as_tensor(ev.targets, dtype=torch.long)
    for i in range(0, len(targets), chunk):
        sets = ev.target_sets[i : i + chunk] if ev.target_sets is not None else None
        acc.add_shared(counts, targets[i : i + chunk], sets, history_pairs(ev, i, chunk))
    return acc.result()


def history_pairs(ev: EvalSet, start: int, chunk: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(row within the chunk, item) of every history event of users start..start+chunk, when the protocol
    excludes history items from the ranking (EvalSet.exclude_history); else None."""
    if not ev.exclude_history:
        return None
    h = ev.history
    stop = min(start + chunk, len(h))
    lo, hi = h.offsets[start], h.offsets[stop]
    rows = np.repeat(np.arange(stop - start), h.lengths[start:stop])
    return rows, h.ints["item"][lo:hi]


# ---------------------------------------------------------------- training
def checkpoint(model: UserFormer, tcfg: TrainConfig, epoch: int, metrics: dict, extra: dict | None = None) -> dict:
    """What a checkpoint holds: weights, both configs, vocabulary sizes, metrics (+ e.g. Delta versions)."""
    return {
        "state_dict": copy.deepcopy(model.state_dict()),
        "model_config": dataclasses.asdict(model.cfg),
        "train_config": dataclasses.asdict(tcfg),
        "vocab_sizes": dict(model.sizes),
        "epoch": epoch,
        "metrics": metrics,
        **(extra or {}),
    }


def catalog_of(ck: dict, path: Path | str = "checkpoint"):
    """The ItemCatalog a checkpoint was built for (attributes from its attrs buffer, sizes from vocab_sizes);
    a ValueError naming `path` when the checkpoint does not fit together."""
    sizes = {k: int(v) for k, v in ck["vocab_sizes"].items()}
    if any(k not in sizes for k in INT_FIELDS):
        raise ValueError(f"{path}: vocab_sizes lacks {[k for k in INT_FIELDS if k not in sizes]}")
    attrs_t = ck["state_dict"].get("item_tower.attrs")
    if attrs_t is None:
        raise ValueError(f"{path}: weights lack item_tower.attrs")
    if attrs_t.shape[0] != sizes["item"]:
        raise ValueError(
            f"{path}: model/vocabulary size mismatch: the item tower has {attrs_t.shape[0]} item rows "
            f"but vocab_sizes says {sizes['item']}"
        )
    a = attrs_t.numpy()
    return ItemCatalog({name: a[:, i].copy() for i, name in enumerate(ITEM_ATTRS)}, sizes)


def load_checkpoint(path, catalog: ItemCatalog | None = None) -> tuple[UserFormer, dict]:
    """A checkpoint file -> (model, checkpoint). Without `catalog`, the one the model was trained with (its
    attribute buffer and vocabulary sizes). Registry versions: jobs/core/registry.py: load (checks and clear errors)."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if catalog is None:
        catalog = catalog_of(ck, path)
    model = UserFormer(ModelConfig(**ck["model_config"]), catalog)
    model.load_state_dict(ck["state_dict"])
    return model, ck


def save_atomic(obj, path: str | Path) -> None:
    """torch.save through a temporary file + rename: a crash leaves the old file or the new one.
    (The model package needs nothing but torch: the jobs side has the general helper, storage.files.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def rng_state(rng: np.random.Generator, gen: torch.Generator, sampler) -> dict:
    """Every random stream training draws from (batch order, negatives, head cuts, dropout)."""
    return {
        "numpy": rng.bit_generator.state,
        "gen": gen.get_state(),
        "sampler": sampler.gen.get_state() if sampler is not None else None,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
    }


def set_rng_state(state: dict, rng: np.random.Generator, gen: torch.Generator, sampler) -> None:
    rng.bit_generator.state = state["numpy"]
    gen.set_state(state["gen"])
    if sampler is not None and state.get("sampler") is not None:
        sampler.gen.set_state(state["sampler"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    v, internal, g = state["python"]
    random.setstate((v, tuple(internal), g))


def fit(
    mcfg: ModelConfig,
    tcfg: TrainConfig,
    train,
    valid: EvalSet | None,
    catalog: ItemCatalog,
    ckpt_path: str | Path | None = None,
    progress: bool = True,
    log=print,
    *,
    model: UserFormer | None = None,
    state_path: str | Path | None = None,
    resume: dict | None = None,
    extra: dict | None = None,
    after_epoch: Callable[[int], None] | None = None,
) -> tuple[UserFormer, dict]:
    """Train; returns the best model (by validation recall@10 / NDCG@10) and a history dict.

    `train`: in-memory Sequences, or a chunked source (`chunks(rng)`, `item_counts(n)`, `n_sequences`,
    `real_time`; jobs/core/stream.py: DeltaSequences streams the Delta table). `valid`: the early-stopping set, or
    None: no validation, the last epoch's model is kept (fine-tuning for a fixed number of epochs).
    `model`: warm start from it (its config wins over `mcfg`) instead of a fresh model.
    `state_path`: after every epoch, the whole training state (weights, optimizer, every RNG, early-stopping
    state, history) is written there atomically; `resume` (that state, loaded) continues after its epoch and
    ends exactly as the uninterrupted run would (data-parallel too: the state holds every rank's random streams).
    `extra` goes into every checkpoint (e.g. data versions). `after_epoch(epoch)` is called on every rank once the
    epoch's state is written (the jobs side names a pause point there, for crash tests).
    """
    torch.set_num_threads(tcfg.num_threads)
    seed_everything(tcfg.seed)
    device = pick_device(tcfg.device)
    source = as_source(train)
    model = (model if model is not None else UserFormer(mcfg, catalog)).to(device)
    max_len = model.cfg.max_len
    sparse = sparse_tables(model, tcfg)
    opt = Optimizer(model, tcfg, sparse)
    params = [p for p in model.parameters() if p.requires_grad]
    rank, world = process_group()
    if sparse and world > 1 and torch.distributed.get_backend() == "nccl":
        # DDP all-reduces each sparse gradient as such, and NCCL has no sparse all-reduce: fail before training.
        raise ValueError(
            "train.sparse_embeddings with several processes needs gloo: NCCL cannot all-reduce sparse tensors"
        )
    own = tcfg.seed + RANK_SEED * rank  # this rank's negatives and dropout; chunks and batches use tcfg.seed
    if rank:
        torch.manual_seed(own)
    counts = source.item_counts(catalog.n_items)
    sampler = losses.NegativeSampler(
        counts, tcfg.uniform_negatives, tcfg.inbatch_negatives, seed=own, per_row=tcfg.negatives_per_row
    )
    gen = torch.Generator().manual_seed(own + 1)
    rng = np.random.default_rng(tcfg.seed)
    best, best_ck, bad, history, t_train, done, stopped = -1.0, None, 0, [], 0.0, 0, False
    if resume is not None:
        model.load_state_dict(resume["state_dict"])
        opt.load_state_dict(resume["optimizer"])
        best, best_ck, bad, history = resume["best"], resume["best_checkpoint"], resume["bad"], list(resume["history"])
        t_train, done, stopped = resume["train_seconds"], resume["epoch"], resume["stopped"]
        # Each rank continues its own streams; a state without them (written by another number of processes)
        # gives every rank rank 0's: the run goes on, but not exactly as it would have.
        ranks = resume.get("rng_ranks") or []
        exact = len(ranks) == world if world > 1 else True
        if not exact and rank == 0:
            log(f"resume: the state has the random streams of {len(ranks) or 1} process(es), not {world}: not exact")
        set_rng_state(ranks[rank] if world > 1 and exact else resume["rng"], rng, gen, sampler)
    step = None
    if world > 1:  # built after any resume: it starts every rank from rank 0's weights
        step = torch.nn.parallel.DistributedDataParallel(
            _BatchLoss(model, tcfg, sampler, gen), find_unused_parameters=True
        )
    for epoch in range(done + 1, tcfg.epochs + 1):
        if stopped:
            break
        model.train()
        t0, n_seq, tot, n_b = time.perf_counter(), 0, 0.0, 0
        bar = tqdm(total=source.n_sequences, desc=f"epoch {epoch}", unit="seq", disable=not progress, leave=False)
        for chunk in source.chunks(rng):
            rows_all = np.flatnonzero(chunk.lengths >= 2)  # a sequence needs one input and one target
            mine = _share(batches(len(rows_all), tcfg.batch_size, rng, lengths=chunk.lengths[rows_all]), rank, world)
            for rows in mine:
                b = to_device(pad_batch(chunk, rows_all[rows], max_len + 1), device)
                with autocast(device, tcfg):
                    if step is not None:
                        loss = step(b, chunk.real_time)
                    else:
                        loss, _ = batch_loss(model, b, tcfg, sampler, gen, chunk.real_time)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if tcfg.grad_clip > 0 and sparse:
                    clip_gradients(params, tcfg.grad_clip)
                elif tcfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
                opt.step()
                n_seq += len(rows)
                tot += float(loss.detach())
                n_b += 1
                bar.update(len(rows))
                bar.set_postfix(loss=f"{tot / n_b:.4f}", seq_s=f"{n_seq / (time.perf_counter() - t0):.0f}")
        bar.close()
        dt = time.perf_counter() - t0
        t_train += dt
        if world > 1:  # the epoch's loss and throughput over every rank
            sums = torch.tensor([tot, float(n_b), float(n_seq)], dtype=torch.float64)
            torch.distributed.all_reduce(sums)
            tot, n_b, n_seq = sums[0].item(), int(sums[1].item()), int(sums[2].item())
        rec = {
            "epoch": epoch,
            "loss": tot / max(n_b, 1),
            "epoch_seconds": dt,
            "seq_per_s": n_seq / max(dt, 1e-9),
            "temperature": float(model.temperature.detach()),
        }
        if not math.isfinite(rec["loss"]):
            raise FloatingPointError(f"loss is {rec['loss']} at epoch {epoch}: {rec}")
        if valid is None:
            best_ck = None  # the last epoch is the result (built after the loop)
        elif rank == 0 and (epoch % tcfg.eval_every == 0 or epoch == tcfg.epochs):
            m = evaluate(model, valid, catalog, device, tcfg, heads=False)
            rec.update({f"valid_{k}": v for k, v in m.items() if k != "users"})
            # Several positives per user (time split): recall@10; one target (leave-one-out): NDCG@10.
            key = "recall@10" if "recall@10" in m else "ndcg@10"
            if m[key] > best:
                best, bad = m[key], 0
                best_ck = checkpoint(
                    model,
                    tcfg,
                    epoch,
                    {"valid": m, "train_seconds": t_train},
                    {"history": [*history, rec], **(extra or {})},
                )
                if ckpt_path:
                    save_atomic(best_ck, ckpt_path)
            else:
                bad += 1
        history.append(rec)
        stopped = bad >= tcfg.patience
        if world > 1:  # rank 0 decides
            flag = torch.tensor([int(stopped)])
            torch.distributed.broadcast(flag, 0)
            stopped = bool(flag.item())
        rngs = None
        if state_path and world > 1:  # every rank's streams (negatives and dropout differ by rank) into rank 0's file
            rngs = [None] * world
            torch.distributed.all_gather_object(rngs, rng_state(rng, gen, sampler))
        if state_path and rank == 0:
            save_atomic(
                {
                    "epoch": epoch,
                    "state_dict": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "rng": rng_state(rng, gen, sampler),
                    "rng_ranks": rngs,
                    "best": best,
                    "best_checkpoint": best_ck,
                    "bad": bad,
                    "history": history,
                    "train_seconds": t_train,
                    "stopped": stopped,
                    "model_config": dataclasses.asdict(model.cfg),
                    "train_config": dataclasses.asdict(tcfg),
                },
                state_path,
            )
        if rank == 0:
            log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
        if after_epoch is not None:
            after_epoch(epoch)
    if valid is None:
        last = history[-1]["epoch"] if history else 0
        best_ck = checkpoint(model, tcfg, last, {"train_seconds": t_train}, {"history": history, **(extra or {})})
        if ckpt_path and rank == 0:
            save_atomic(best_ck, ckpt_path)
    if best_ck is not None:
        model.load_state_dict(best_ck["state_dict"])
    if world > 1:  # every rank returns rank 0's model
        for t in model.state_dict().values():
            torch.distributed.broadcast(t, 0)
    return model, {
        "history": history,
        "best_epoch": best_ck["epoch"] if best_ck else None,
        "best_valid": best,
        "epochs": len(history),
        "train_seconds": t_train,
        "stopped_early": stopped,
    }
