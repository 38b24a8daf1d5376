"""Item index speed: build time, recall@10 against exact search and queries/s of exact vs HNSW (vs IVF).

    python -m tests.benchmarks.index_speed                       # 100K and 1M items, d=64 (about 10 min here)
    python -m tests.benchmarks.index_speed --sizes 100000 --repeats 5 --out /tmp/ix

Not a test: nothing asserts a time. One run measures every size and index kind, on the same synthetic data,
so the ratios are of one machine state; the load average is recorded before every sample.

Data: clustered unit vectors, d=64: 1,000 centres on the unit sphere with Zipf(0.8) cluster sizes; an item is
its centre + N(0, spread^2/d) per dimension, normalised (spread 0.9: cosine to the centre ~0.74). Queries
stand for users: a random mix of two centres (popularity-weighted) + the same noise, normalised. Each index
is built by jobs/steps/index.py's own build_faiss with build_params of the default [index] config (what
`userformer index` builds), plus a sweep of the search parameter (HNSW efSearch, IVF nprobe).

Measured per size: exact IndexFlatIP (build = add; search = the reference), HNSW, and IVF at the sizes in
--ivf-sizes: build seconds (median of samples; after the first, as many as fit in --build-budget-s), recall@10
of the batch search against exact on --queries queries, queries/s of one batch search of all queries (median
of --repeats) and the median latency of single-query calls (--single queries, one call each, one thread).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from tests.benchmarks.pipeline import REPO, git_info, load, machine_info, mem_available_gib, now, summary
from tests.benchmarks.render import write_summary

D = 64
CLUSTERS = 1000
ZIPF = 0.8
SPREAD = 0.9


def log(msg: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", flush=True)


# ------------------------------------------------------------------- data
def make_data(n: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLUSTERS, D)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    w = 1.0 / np.arange(1, CLUSTERS + 1) ** ZIPF
    w /= w.sum()
    noise = np.float32(SPREAD / np.sqrt(D))

    def unit(x):
        return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)

    items = np.empty((n, D), np.float32)
    for s in range(0, n, 250_000):  # in chunks: bounded temporaries
        m = min(250_000, n - s)
        items[s : s + m] = unit(centres[rng.choice(CLUSTERS, m, p=w)] + noise * rng.standard_normal((m, D), np.float32))
    a, b = rng.choice(CLUSTERS, n_queries, p=w), rng.choice(CLUSTERS, n_queries, p=w)
    mix = rng.random(n_queries, np.float32)[:, None]
    queries = unit(mix * centres[a] + (1 - mix) * centres[b] + noise * rng.standard_normal((n_queries, D), np.float32))
    return items, queries


# ----------------------------------------------------------------- timing
def sample(fn) -> tuple[float, object, list[float]]:
    ld = load()[0]
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out, ld


def builds(fn, repeats: int, budget_s: float) -> tuple[object, dict]:
    """Build `repeats` times at most; after the first, only as many as fit in budget_s. Returns the last index."""
    secs, loads = [], []
    index = None
    while True:
        del index
        s, index, ld = sample(fn)
        secs.append(s)
        loads.append(ld)
        want = repeats if repeats <= 1 else max(1, min(repeats, 1 + int(budget_s // max(secs[0], 1e-9))))
        if len(secs) >= want:
            break
    return index, {**summary(secs), "load_before": loads, "reduced": len(secs) < repeats}


def searches(index, queries: np.ndarray, k: int, repeats: int, n_single: int) -> tuple[np.ndarray, dict]:
    """Batch search of all queries `repeats` times (q/s of the median) and n_single one-query calls."""
    secs, loads = [], []
    labels = None
    for _ in range(repeats):
        s, (_, labels), ld = sample(lambda: index.search(queries, k))
        secs.append(s)
        loads.append(ld)
    # One query per call, as `recommend` / `similar-items` search; on one FAISS thread, since a single query
    # gains nothing from more and an OpenMP team on a loaded machine adds scheduling waits to every call.
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    single = []
    try:
        for q in queries[:n_single]:
            t0 = time.perf_counter()
            index.search(q[None, :], k)
            single.append(time.perf_counter() - t0)
    finally:
        faiss.omp_set_num_threads(threads)
    med = statistics.median(secs)
    return labels, {
        "batch": {**summary(secs), "load_before": loads},
        "queries": len(queries),
        "qps": round(len(queries) / med, 1),
        "single_query_ms": {
            "median": round(1000 * statistics.median(single), 3),
            "p90": round(1000 * float(np.percentile(single, 90)), 3),
            "calls": len(single),
        },
    }


# ------------------------------------------------------------------ bench
def bench_size(n: int, args, cfg) -> dict:
    from userformer.jobs.steps import index as index_step

    log(f"n={n:,}: data")
    t0 = time.perf_counter()
    items, queries = make_data(n, args.queries, args.seed)
    ids = np.arange(1, n + 1, dtype=np.int64)
    out = {
        "items": n,
        "dimension": D,
        "data_s": round(time.perf_counter() - t0, 2),
        "default_kind": index_step.choose_kind(cfg, n),
        "load_at_start": load(),
        "mem_available_gib": mem_available_gib(),
    }
    k = 10

    log(f"n={n:,}: exact")
    flat, b = builds(
        lambda: index_step.build_faiss(items, ids, "flat", index_step.build_params(cfg, "flat", n, D)), args.repeats, 60
    )
    truth, s = searches(flat, queries, k, args.repeats, args.single)
    out["exact"] = {
        "index_class": index_step._class_name(flat),
        "params": index_step.build_params(cfg, "flat", n, D),
        "build": b,
        "recall_at_10": index_step.recall_at_k(truth, truth),
        **s,
    }
    del flat

    log(f"n={n:,}: hnsw build")
    hp = index_step.build_params(cfg, "hnsw", n, D)
    hnsw, b = builds(lambda: index_step.build_faiss(items, ids, "hnsw", hp), args.repeats, args.build_budget_s)
    out["hnsw"] = {"index_class": index_step._class_name(hnsw), "params": hp, "build": b, "sweep": []}
    for ef in args.ef_search:
        index_step.set_search_params(hnsw, "hnsw", {**hp, "efSearch": ef})
        found, s = searches(hnsw, queries, k, args.repeats, args.single)
        r = round(index_step.recall_at_k(truth, found), 4)
        out["hnsw"]["sweep"].append({"efSearch": ef, "recall_at_10": r, **s})
        log(f"n={n:,}: hnsw efSearch={ef}: recall@10 {r}, {s['qps']:,} q/s")
    del hnsw

    if n in args.ivf_sizes:
        log(f"n={n:,}: ivf build")
        vp = index_step.build_params(cfg, "ivf", n, D)
        ivf, b = builds(lambda: index_step.build_faiss(items, ids, "ivf", vp), args.repeats, args.build_budget_s)
        out["ivf"] = {"index_class": index_step._class_name(ivf), "params": vp, "build": b, "sweep": []}
        for npr in args.nprobe:
            index_step.set_search_params(ivf, "ivf", {**vp, "nprobe": npr})
            found, s = searches(ivf, queries, k, args.repeats, args.single)
            r = round(index_step.recall_at_k(truth, found), 4)
            out["ivf"]["sweep"].append({"nprobe": npr, "recall_at_10": r, **s})
            log(f"n={n:,}: ivf nprobe={npr}: recall@10 {r}, {s['qps']:,} q/s")
        del ivf
    out["load_at_end"] = load()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.benchmarks.index_speed", description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(float(x.replace("M", "e6").replace("K", "e3"))) for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--sizes", type=ints, default=[100_000, 1_000_000], help="catalogue sizes (100K,1M)")
    ap.add_argument("--ivf-sizes", type=ints, default=[100_000, 1_000_000], help="sizes that also get an IVF index")
    ap.add_argument("--queries", type=int, default=1000, help="queries for recall and batch q/s")
    ap.add_argument("--single", type=int, default=100, help="one-query calls timed for latency")
    ap.add_argument("--repeats", type=int, default=3, help="samples of each search (and build, budget allowing)")
    ap.add_argument(
        "--build-budget-s",
        type=float,
        default=60.0,
        help="after a build's first sample, take more only as fit in this many seconds",
    )
    ap.add_argument("--ef-search", type=ints, default=[16, 32, 64, 128, 256], help="HNSW efSearch sweep")
    ap.add_argument("--nprobe", type=ints, default=[8, 16, 32, 64, 128], help="IVF nprobe sweep")
    ap.add_argument("--threads", type=int, default=0, help="FAISS threads (0: FAISS's default)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "benchmarks" / "results")
    args = ap.parse_args(argv)

    import faiss

    from userformer.jobs.core.config import load_config

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    cfg = load_config(env={"USERFORMER_HOME": "/tmp/userformer-bench-unused"})
    t0 = time.perf_counter()
    res = {
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "command": " ".join(["python -m tests.benchmarks.index_speed", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {**machine_info(), "faiss": faiss.__version__},
        "faiss_threads": faiss.omp_get_max_threads(),
        "git": git_info(),
        "started": now(),
        "load_at_start": load(),
        "mem_available_gib_at_start": mem_available_gib(),
        "data": {"dimension": D, "clusters": CLUSTERS, "zipf": ZIPF, "spread": SPREAD, "seed": args.seed},
        "index_config": cfg.to_dict()["index"],
        "results": [],
    }
    for n in args.sizes:
        res["results"].append(bench_size(n, args, cfg))
    res.update(finished=now(), load_at_end=load(), total_s=round(time.perf_counter() - t0, 1))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "index-speed.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(write_summary(path, json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
