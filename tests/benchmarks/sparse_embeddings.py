"""One training step at a large catalogue, dense (AdamW over every row) versus ``train.sparse_embeddings`` (sparse
item-id gradients + SparseAdam): time and peak memory.

    python -m tests.benchmarks.sparse_embeddings [--items 1000000,4000000] [--steps 5] [--device cpu|cuda|auto]
                                                  [--out DIR]

Every (catalogue size, mode) runs in a child process of its own (memory comes back between them, and its peak is
its own). The model is ``ModelConfig()`` as it ships (d = 64, every event feature, the three heads) and the step is
``TrainConfig()``'s (batch 128, 2048 uniform negatives shared by the batch, grad clip 1.0), taken as `train.fit`
takes it: `batch_loss` under autocast, zero_grad + backward, clipping, the optimizer step (`train.Optimizer`:
AdamW, or AdamW + SparseAdam). The catalogue is `items` items with production-shaped attributes (8 / 48 / 240
categories, 5,000 brands, as model_speed.py's `production`), so the item-id table is the one large table. Sequences
are synthetic, every one longer than max_len (each batch full width: the most rows a step can touch). One step warms
up (the optimizers build their state there), then `--steps` steps are timed one by one.

Memory (CPU): resident set size after setup (model, optimizer, batches), after the warm-up step (the optimizer's
moments exist now), and the peak during the timed steps (the kernel's high-water mark, reset after the warm-up by
writing 5 to /proc/self/clear_refs): `step_peak_extra_gib` = that peak - the RSS before the timed steps, what a
step allocates on top (gradients, optimizer temporaries). CUDA: torch.cuda's allocated and peak allocated bytes
instead. Nothing is asserted. Results: DIR/sparse-embeddings.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 11


def _status_kib(key: str) -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def _gib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 2**20, 3)


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(items: int, mode: str, steps: int, device_name: str, threads: int, precision: str) -> dict:
    """One (catalogue, mode) measurement in this process."""
    import numpy as np
    import torch

    from tests.benchmarks.model_speed import mix_lengths, pick_batches, synth_catalog, synth_sequences
    from userformer.jobs.core.config import ModelConfig, TrainConfig
    from userformer.models import losses
    from userformer.models.data import item_counts, pad_batch
    from userformer.models.model import UserFormer
    from userformer.models.train import (
        Optimizer,
        autocast,
        batch_loss,
        clip_gradients,
        pick_device,
        seed_everything,
        sparse_tables,
        to_device,
    )

    device = pick_device(device_name)
    torch.set_num_threads(threads)
    cfg = ModelConfig()
    tcfg = dataclasses.replace(
        TrainConfig(),
        device=device.type,
        num_threads=threads,
        bf16=precision == "bf16",
        cpu_bf16=precision == "bf16",
        sparse_embeddings=mode == "sparse",
    )
    rng = np.random.default_rng(SEED)
    sizes = {
        "item": items + 1,
        "category_l1": 9,
        "category_l2": 49,
        "category_l3": 241,
        "brand": 5_001,
        "event_type": 12,
        "surface": 8,
    }
    t0 = time.perf_counter()
    catalog = synth_catalog(sizes, rng)
    seqs = synth_sequences(catalog, mix_lengths("full", tcfg.batch_size * (steps + 1), cfg.max_len, rng), rng)
    rows = pick_batches(seqs, cfg, tcfg.batch_size, steps + 1, rng)
    batches = [to_device(pad_batch(seqs, r, cfg.max_len + 1), device) for r in rows]
    seed_everything(SEED)
    model = UserFormer(cfg, catalog).to(device)
    sparse = sparse_tables(model, tcfg)
    opt = Optimizer(model, tcfg, sparse)
    params = [p for p in model.parameters() if p.requires_grad]
    sampler = losses.NegativeSampler(item_counts(seqs, catalog.n_items), tcfg.uniform_negatives, 0, seed=SEED)
    gen = torch.Generator().manual_seed(SEED)
    setup_s = time.perf_counter() - t0
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step(batch) -> dict:
        sync()
        a = time.perf_counter()
        with autocast(device, tcfg):
            loss, _ = batch_loss(model, batch, tcfg, sampler, gen, True)
        sync()
        b = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync()
        c = time.perf_counter()
        grad = model.item_tower.embs["item_id"].weight.grad
        if sparse:
            clip_gradients(params, tcfg.grad_clip)
            touched = int(grad.coalesce().indices().shape[1])
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            touched = int((grad != 0).any(1).sum())
        opt.step()
        sync()
        d = time.perf_counter()
        return {
            "seconds": d - a,
            "forward_s": b - a,
            "backward_s": c - b,
            "clip_optimizer_s": d - c,
            "item_rows_with_gradient": touched,
        }

    model.train()
    mem = {"rss_after_setup_gib": _gib(_status_kib("VmRSS"))}
    warm = step(batches[0])
    mem["rss_after_warmup_gib"] = _gib(_status_kib("VmRSS"))
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)
    reset = _reset_peak_rss()
    base = _status_kib("VmRSS")
    timed = [step(b) for b in batches[1:]]
    peak = _status_kib("VmHWM") if reset else None
    mem.update(
        {
            "peak_rss_reset": reset,
            "rss_before_steps_gib": _gib(base),
            "peak_rss_during_steps_gib": _gib(peak),
            "step_peak_extra_gib": _gib(peak - base) if peak is not None and base is not None else None,
        }
    )
    if cuda:
        mem.update(
            {
                "cuda_allocated_before_steps_gib": round(base_cuda / 2**30, 3),
                "cuda_peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
                "cuda_step_peak_extra_gib": round((torch.cuda.max_memory_allocated(device) - base_cuda) / 2**30, 3),
            }
        )
    table = model.item_tower.embs["item_id"].weight
    state = opt.sparse.state[table] if sparse else opt.dense.state[table]
    med = {k: round(statistics.median(s[k] for s in timed), 4) for k in timed[0]}
    return {
        "items": items,
        "mode": mode,
        "d_model": cfg.d_model,
        "precision": precision,
        "device": str(device),
        "threads": threads,
        "sparse_tables": [n for n, e in model.item_tower.embs.items() if e.sparse],
        "item_table_gib": round(table.numel() * table.element_size() / 2**30, 3),
        "optimizer_state_gib": round(
            sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v)) / 2**30, 3
        ),
        "setup_s": round(setup_s, 2),
        "warmup_step_s": round(warm["seconds"], 3),
        "median": med,
        "steps": [{k: round(v, 4) for k, v in s.items()} for s in timed],
        "memory": mem,
    }


def main(argv=None) -> int:
    from tests.benchmarks.pipeline import git_info, load, log, machine_info, mem_available_gib, now
    from tests.benchmarks.render import write_summary

    p = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.sparse_embeddings", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--items", default="1000000,4000000", help="catalogue sizes, comma-separated")
    p.add_argument("--modes", default="dense,sparse")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", nargs=2, metavar=("ITEMS", "MODE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(int(a.child[0]), a.child[1], a.steps, a.device, a.threads, a.precision)))
        return 0
    doc = {
        "benchmark": "sparse-embeddings",
        "params": vars(a) | {"out": str(a.out)},
        "machine": machine_info(),
        "git": git_info(),
        "started": now(),
        "load_at_start": load(),
        "mem_available_gib_at_start": mem_available_gib(),
        "command": " ".join(
            ["python -m tests.benchmarks.sparse_embeddings", *(sys.argv[1:] if argv is None else argv)]
        ),
        "results": [],
    }
    for items in [int(x) for x in a.items.split(",")]:
        for mode in a.modes.split(","):
            log(f"{items:,} items, {mode} ...")
            cmd = [sys.executable, "-m", "tests.benchmarks.sparse_embeddings", "--child", str(items), mode]
            cmd += ["--steps", str(a.steps), "--device", a.device, "--threads", str(a.threads)]
            cmd += ["--precision", a.precision]
            before = load()
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
            if r.returncode:
                raise RuntimeError(f"{items} {mode} failed:\n{r.stderr[-4000:]}")
            res = json.loads(r.stdout.strip().splitlines()[-1]) | {"load_before": before}
            doc["results"].append(res)
            log(
                f"  step {res['median']['seconds']:.3f} s (optimizer+clip {res['median']['clip_optimizer_s']:.3f} s), "
                f"step peak +{res['memory']['step_peak_extra_gib']} GiB"
            )
    doc.update(finished=now(), load_at_end=load())
    by = {(r["items"], r["mode"]): r for r in doc["results"]}
    doc["ratios"] = [
        {
            "items": n,
            "step_time_sparse_over_dense": round(
                by[n, "sparse"]["median"]["seconds"] / by[n, "dense"]["median"]["seconds"], 3
            ),
            "step_peak_extra_sparse_over_dense": (
                round(
                    by[n, "sparse"]["memory"]["step_peak_extra_gib"] / by[n, "dense"]["memory"]["step_peak_extra_gib"],
                    3,
                )
                if by[n, "dense"]["memory"]["step_peak_extra_gib"]
                else None
            ),
        }
        for n in sorted({k[0] for k in by})
        if (n, "sparse") in by and (n, "dense") in by
    ]
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "sparse-embeddings.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(write_summary(path, json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
