"""The Markdown of a benchmark result file (results/*.json): one renderer per kind of result.

The benchmark scripts write it beside their JSON (results/<name>.md) and print it; the documentation site
(docs/hooks.py) shows the same blocks on its measured-results page. Every block starts with the command and the
commit the numbers were recorded with. Pure formatting on the standard library: MkDocs imports this file at every
build, so nothing here may import torch, FAISS, Spark or pandas.

    python -m tests.benchmarks.render            # rewrite every results/*.md from its JSON
    python -m tests.benchmarks.render --check    # only say which differ (exit 1 if any)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------ helpers
def num(x, fmt: str = ",.1f") -> str:
    return "—" if x is None else format(x, fmt)


def cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list], align: str | None = None) -> str:
    """A Markdown table; align has one letter a column, "r" for right-aligned (numbers)."""
    align = align or "-" * len(header)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def on_off(flag) -> str:
    return "not recorded" if flag is None else "on" if flag else "off"


def pct(x) -> str:
    return "—" if x is None else f"{x:.1%}"


def sample_list(xs, fmt: str = ",.1f") -> str:
    return ", ".join(num(x, fmt) for x in xs)


def _details(summary: str, parts: list[str]) -> str:
    """A folded block: open on GitHub and on the site alike (md_in_html reads the Markdown inside)."""
    return f'<details markdown="1"><summary>{summary}</summary>\n\n' + "\n\n".join(parts) + "\n\n</details>"


def _nearest_median(step: dict) -> dict | None:
    runs = step.get("runs") or []
    return min(runs, key=lambda x: abs(x["seconds"] - step["median_s"])) if runs else None


def _stages(run: dict | None, k: int = 3) -> str:
    """The slowest Spark stages of one sample: their count, summed wall time, and the k slowest (wall s / tasks)."""
    sp = (run or {}).get("spark") or {}
    slow = sp.get("slowest") or []
    if not slow:
        return "not recorded"
    top = "; ".join(f"{s['name']} {s['wall_s']:.1f} s/{s['tasks']}t" for s in slow[:k])
    return f"{sp['n_stages']} stages, {sp['stages_wall_s']:.1f} s: {top}"


# --------------------------------------------------------------- provenance
def commit_of(d: dict) -> str | None:
    return (d.get("git") or {}).get("commit") or d.get("commit")


def provenance(name: str, d: dict, path: str | None = None) -> str:
    """Command, commit, when, where: what a reader needs to trust or redo a number. path: where the file lies
    (default tests/benchmarks/results/<name>)."""
    cmd = d.get("command")
    git = d.get("git") or {}
    commit = commit_of(d)
    out = [f"- **Command:** `{cmd.strip()}`" if cmd else "- **Command:** not recorded in the file"]
    if commit:
        line = f"- **Commit:** `{commit}`"
        if git.get("dirty") is True:
            changed = [f"`{c.strip()}`" for c in git.get("changed_files") or []]
            line += f", with uncommitted changes ({', '.join(changed) or 'files not listed'}"
            line += f"; {len(git.get('untracked') or [])} untracked files)"
        elif git.get("dirty") is False:
            line += ", clean working tree"
        else:
            line += " (whether the working tree had changes is not recorded)"
        out.append(line)
    else:
        out.append("- **Commit:** not recorded in the file")
    if d.get("started"):
        out.append(f"- **When:** {d['started']} .. {d.get('finished', '?')}")
    m = d.get("machine")
    if m:
        parts = [f"{m.get('cpu_count')} CPUs ({m.get('cpu_model')})", f"{m.get('memory_total_gib')} GiB"]
        # Installed versions in pip's notation, as `pip freeze` and the lock file write them.
        parts += [f"Python {m['python']}"] if m.get("python") else []
        parts += [f"{k}=={m[k]}" for k in ("pyspark", "deltalake", "pyarrow", "faiss") if m.get(k)]
        torch = (d.get("torch") or {}).get("torch")
        if torch:
            parts.append(f"torch=={torch}")
        out.append("- **Machine:** " + ", ".join(parts))
    if d.get("load_at_start"):
        load = ", ".join(str(x) for x in d["load_at_start"])
        end = f"; at the end {', '.join(str(x) for x in d['load_at_end'])}" if d.get("load_at_end") else ""
        out.append(f"- **Load average at the start:** {load}{end} (a shared machine: compare within one run)")
    out.append(f"- **File:** `{path or f'tests/benchmarks/results/{name}'}`")
    return "\n".join(out)


# ------------------------------------------------------------ per benchmark
STEP_NAMES = {
    "ingest": "ingest",
    "sequences_first_build": "sequences (first build)",
    "sequences_rebuild": "sequences --rebuild",
}


def pipeline_throughput(d: dict) -> str:
    rows, stages = [], []
    for r in d["results"]:
        spark = r.get("config", {}).get("spark", {})
        where = (
            f"{spark.get('master')}, driver {spark.get('driver_memory')}, {spark.get('shuffle_partitions')} partitions"
        )
        for key, label in STEP_NAMES.items():
            s = r["steps"].get(key)
            if s:
                samples = sample_list(s["samples_s"]) + (" (budget)" if s.get("reduced") else "")
                rows.append(
                    [f"{r['events_raw']:,}", label, num(s["median_s"]), samples, f"{s['events_per_s']:,}", where]
                )
                stages.append([f"{r['events_raw']:,}", label, _stages(_nearest_median(s))])
        both = r.get("ingest_plus_sequences")
        if both:
            rows.append(
                [
                    f"{r['events_raw']:,}",
                    "ingest + sequences (sum of medians)",
                    num(both["median_s"]),
                    "",
                    f"{both['events_per_s']:,}",
                    where,
                ]
            )
    drops = "; ".join(
        f"{r['events_raw']:,} raw events from {r['users']:,} users, generated in {r['generate']['seconds']:.1f} s"
        for r in d["results"]
        if r.get("users") and r.get("generate")
    )
    head = "One raw drop of each size; medians of the samples." + (
        f" The drops (generation not timed): {drops}." if drops else ""
    )
    table = md_table(["raw events", "step", "median s", "samples s", "events/s", "Spark"], rows, "rlrlrl")
    out = [head, table]
    if any(s[2] != "not recorded" for s in stages):
        folded = md_table(["raw events", "step", "Spark stages (wall s / tasks)"], stages, "rll")
        out.append(_details("The slowest Spark stages of the sample nearest the median", [folded]))
    return "\n\n".join(out)


def _optimized(mt: dict) -> str:
    """What `maintain` did to user_sequences, as its OPTIMIZE metrics and the vacuum record say."""
    tables = mt.get("tables") or {}
    opt = (tables.get("user_sequences") or {}).get("optimize") or {}
    said = []
    if opt:
        said.append(
            f"OPTIMIZE removed {opt.get('numRemovedFiles')} files ({num((opt.get('numRemovedBytes') or 0) / 2**20)}"
            f" MiB, {opt.get('numDeletionVectorsRemoved', 0)} deletion vectors) and added "
            f"{opt.get('numAddedFiles')} ({num((opt.get('numAddedBytes') or 0) / 2**20)} MiB)"
        )
    if tables:
        said.append(f"{sum(t.get('files_deleted') or 0 for t in tables.values())} files vacuumed over all tables")
    return f" ({'; '.join(said)})" if said else ""


def pipeline_incremental(d: dict) -> str:
    r = d["results"][0]
    last, gen = r["last_day"], r.get("generate", {})
    head = (
        f"History: {r['users']:,} users over {r['days']} days, {r['active_frac']:.0%} active per day; "
        f"{gen.get('events_total', 0):,} raw events, {r.get('events_total_accepted', 0):,} accepted. "
        f"Day measured, {last['dt']}: {last['raw_events']:,} raw events, {last['active_users']:,} active users of "
        f"{last['user_sequences_rows']:,} in `user_sequences`."
    )

    def row(label, s, events):
        return [label, num(s["median_s"]), sample_list(s["samples_s"]), num(events / s["median_s"], ",.0f")]

    times = md_table(
        ["measure", "median s", "samples s", "events/s"],
        [
            row("ingest of the day", r["ingest_last_day"], last["raw_events"]),
            row("`sequences --dt` (one MERGE)", r["sequences_incremental"], last["raw_events"]),
            row("`sequences --rebuild` (all history)", r["sequences_rebuild"], r.get("events_total_accepted", 0)),
        ],
        "lrlr",
    )
    ratio = (
        f"**Ratio incremental / rebuild: {r['ratio_incremental_to_rebuild']:.2f}**; "
        f"the two tables are {'identical' if r.get('tables_equal') else 'NOT identical'}."
    )
    if not r.get("tables_equal") and r.get("tables_difference"):
        ratio += f" First difference: {r['tables_difference']}."
    w = r["written"]
    inc, reb = w["incremental"], w["rebuild"]

    def wrow(label, x):
        return [
            label,
            f"{x['rows_written']:,}",
            x["files_added"],
            num(x["bytes_added"] / 2**20),
            x.get("files_rewritten", "—"),
            x.get("deletion_vectors_added", "—"),
            x.get("target_rows_copied", "—"),
            num(x["scan_ms"] / 1000) if "scan_ms" in x else "—",
            num(x["rewrite_ms"] / 1000) if "rewrite_ms" in x else "—",
        ]

    written = md_table(
        [
            "path",
            "rows written",
            "files added",
            "MiB added",
            "files rewritten",
            "deletion vectors",
            "rows copied",
            "MERGE scan s",
            "MERGE rewrite s",
        ],
        [wrow("incremental", inc), wrow("rebuild", reb)],
        "lrrrrrrrr",
    )
    mt = r.get("maintain") or {}
    maint = (
        f"`maintain` afterwards: {num(mt['seconds'])} s; `user_sequences` files "
        f"{mt['user_sequences_files_before']} → {mt['user_sequences_files_after']}{_optimized(mt)}."
        if mt
        else "`maintain` was not measured in this file."
    )
    out = [head, times, ratio, "What each path wrote (from the commit's operation metrics):", written, maint]
    folded = [
        "Spark stages of the sample nearest the median (wall s / tasks):\n\n"
        f"- `sequences --dt`: {_stages(_nearest_median(r['sequences_incremental']))}\n"
        f"- `sequences --rebuild`: {_stages(_nearest_median(r['sequences_rebuild']))}"
    ]
    ps = r.get("per_day_summary")
    if ps:
        folded.append("The pass that built the history, day by day (each day `ingest`, then `sequences --dt`):")
        folded.append(
            md_table(
                ["step", "total s", "median s", "min s", "max s"],
                [
                    [label, *(num(ps[key][k]) for k in ("total_s", "median_s", "min_s", "max_s"))]
                    for key, label in (("ingest_s", "ingest"), ("sequences_s", "sequences --dt"))
                ],
                "lrrrr",
            )
        )
    if r.get("per_day"):
        folded.append(
            md_table(
                [
                    "day",
                    "raw events",
                    "ingest s",
                    "active users",
                    "sequences s",
                    "rows written",
                    "files added",
                    "files rewritten",
                ],
                [
                    [
                        p["dt"],
                        f"{p['raw_events']:,}",
                        num(p["ingest_s"]),
                        f"{p['active_users']:,}",
                        num(p["sequences_s"]),
                        num(p.get("rows_written"), ","),
                        num(p.get("files_added"), ","),
                        num(p.get("files_rewritten"), ","),
                    ]
                    for p in r["per_day"]
                ],
                "lrrrrrrr",
            )
        )
    out.append(_details("Day by day, and where Spark spent the time", folded))
    return "\n\n".join(out)


def infer_incremental(d: dict) -> str:
    p = d.get("params", {})
    model = (d.get("setup") or {}).get("model")
    cand = "candidates_s" in d["full"]
    head = (
        f"{d['users_in_table']:,} users in `user_sequences`, the day cut to a stable-hash "
        f"{p.get('active_share', 0):.0%} of them; {d['items']:,} items, a d={d.get('d_model')} model"
        f"{f' (`{model}`)' if model else ''}; `infer` + `publish`{' + `candidates`' if cand else ''} of the same day, "
        f"{'the incremental samples first, ' if cand else 'alternating, '}{d.get('repeats')} samples each, "
        f"device `{p.get('device', d.get('device'))}`."
    )
    rows = []
    for key, label in (("full", "full re-embed (`infer --all-users`)"), ("incremental", "incremental (`infer`)")):
        x = d[key]
        rows.append(
            [
                label,
                f"{x['users']:,}",
                num(x["infer_s"]),
                num(x["publish_s"]),
                *([num(x["candidates_s"])] if cand else []),
                num(x["total_s"]),
                sample_list(x["samples_total_s"]),
                num(x["users"] / x["infer_s"], ",.0f"),
            ]
        )
    cols = ["run", "users", "infer s", "publish s", *(["candidates s"] if cand else []), "total s"]
    table = md_table([*cols, "samples total s", "users/s (infer)"], rows, "lr" + "r" * (len(cols) - 2) + "lr")
    ratio = d["ratio"]
    line = (
        f"**Ratio incremental / full: total {ratio['total_s']:.3f}, infer {ratio['infer_s']:.3f}, "
        f"publish {ratio['publish_s']:.3f}"
        + (f", candidates {ratio['candidates_s']:.3f}" if cand else "")
        + f"** for {pct(ratio['users'])} of the users (medians)."
    )
    out = [head, table, line]
    written = [
        [kind, t, w.get("operation") or "", *_written(w)]
        for kind in ("full", "incremental")
        for t, w in (d["runs"][kind][0].get("written") or {}).items()
    ]
    if written:
        out.append("What each commit wrote (first sample; Delta's operation metrics):")
        out.append(md_table(["run", "table", "operation", *WRITTEN], written, "lll" + "r" * len(WRITTEN)))
    return "\n\n".join(out)


WRITTEN = ["rows written", "rows replaced", "rows copied", "files added", "files removed", "deletion vectors"]


def _written(w: dict) -> list[str]:
    """A commit's operation metrics in WRITTEN's order (a WRITE and a MERGE name them differently)."""
    merge = "numTargetRowsInserted" in w
    vals = [
        w.get("numTargetRowsInserted", 0) + w.get("numTargetRowsUpdated", 0) if merge else w.get("numOutputRows"),
        w.get("numTargetRowsUpdated", 0) + w.get("numTargetRowsDeleted", 0) if merge else None,
        w.get("numTargetRowsCopied"),
        w.get("numTargetFilesAdded") if merge else w.get("numFiles"),
        w.get("numTargetFilesRemoved"),
        w.get("numTargetDeletionVectorsAdded"),
    ]
    return [f"{v:,}" if v is not None else "" for v in vals]


def sparse_embeddings(d: dict) -> str:
    rs = d["results"]
    r0 = rs[0]
    head = (
        f"One training step of `ModelConfig()` (d={r0['d_model']}) with `TrainConfig()`'s batch (128 full-width "
        f"sequences, 2048 negatives), {r0['precision']} on `{r0['device']}` ({r0['threads']} threads), at catalogues of "
        f"{', '.join(f'{n:,}' for n in sorted({r['items'] for r in rs}))} items: dense (AdamW over every row) against "
        "`train.sparse_embeddings` (sparse item-id gradients, SparseAdam). Medians of the timed steps; peak = the "
        "process's resident memory high-water mark during them, over its size before them."
    )
    rows = []
    for r in rs:
        m, mem = r["median"], r["memory"]
        rows.append(
            [
                f"{r['items']:,}",
                r["mode"],
                num(m["seconds"], ".3f"),
                num(m["forward_s"], ".3f"),
                num(m["backward_s"], ".3f"),
                num(m["clip_optimizer_s"], ".3f"),
                f"{m['item_rows_with_gradient']:,.0f}",
                num(mem.get("rss_before_steps_gib"), ".2f"),
                num(mem.get("step_peak_extra_gib"), ".2f"),
                sample_list([s["seconds"] for s in r["steps"]], ".2f"),
            ]
        )
    table = md_table(
        [
            "items",
            "mode",
            "step s",
            "forward s",
            "backward s",
            "clip + optimizer s",
            "item rows with a gradient",
            "RSS before steps GiB",
            "step peak over it GiB",
            "samples s",
        ],
        rows,
        "llrrrrrrrl",
    )
    lines = [
        f"- {x['items']:,} items: sparse / dense step time **{x['step_time_sparse_over_dense']:.3f}**"
        + (
            f", step peak memory {x['step_peak_extra_sparse_over_dense']:.3f}"
            if x.get("step_peak_extra_sparse_over_dense") is not None
            else ""
        )
        for x in d.get("ratios", [])
    ]
    return "\n\n".join([head, table, "\n".join(lines)])


def index_speed(d: dict) -> str:
    cfg, data, p = d["index_config"], d.get("data", {}), d["params"]
    head = (
        f"d={data.get('dimension')} unit vectors around {data.get('clusters'):,} centres (Zipf {data.get('zipf')} "
        f"cluster sizes, spread {data.get('spread')}), {p.get('queries'):,} user-like queries; recall@10 against "
        f"exact search; FAISS threads {d.get('faiss_threads')}. Build s: the median of the samples (their number in "
        f"brackets); batch q/s: the queries over the median time of one batch search of all of them "
        f"({p.get('repeats')} samples); single query: the median of {p.get('single')} one-query calls. Rows marked ★ "
        f"are what `userformer index` builds at that size with the default `[index]` settings (exact up to "
        f"{cfg['flat_max_items']:,} items, HNSW up to {cfg['hnsw_max_items']:,}, IVF above; efSearch "
        f"{cfg['hnsw_ef_search']}, nprobe {cfg['ivf_nprobe']})."
    )
    if d.get("total_s"):
        head += f" The whole run took {d['total_s']:.0f} s."
    rows = []
    for r in d["results"]:
        n, kind = r["items"], r.get("default_kind")

        def add(label, params, build, e, default, n=n):
            rows.append(
                [
                    f"{n:,}",
                    label + (" ★" if default else ""),
                    params,
                    f"{num(build['median_s'], '.2f')} ({len(build['samples_s'])})" if build else "″",
                    num(e["recall_at_10"], ".3f"),
                    num(e["qps"], ",.0f"),
                    num(e["single_query_ms"]["median"], ".3f"),
                ]
            )

        ex = r["exact"]
        add("exact", "IndexFlatIP", ex["build"], ex, kind == "flat")
        for key, knob, cfg_key in (("hnsw", "efSearch", "hnsw_ef_search"), ("ivf", "nprobe", "ivf_nprobe")):
            ix = r.get(key)
            if not ix:
                continue
            fixed = {k: v for k, v in ix["params"].items() if k not in ("metric", knob)}
            for i, e in enumerate(ix["sweep"]):
                params = " ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in fixed.items())
                add(
                    key.upper(),
                    f"{params} {knob}={e[knob]}",
                    ix["build"] if i == 0 else None,
                    e,
                    kind == key and e[knob] == cfg[cfg_key],
                )
    table = md_table(
        ["items", "index", "parameters", "build s (samples)", "recall@10", "batch q/s", "single query ms"],
        rows,
        "rllrrrr",
    )
    return head + "\n\n" + table


QUALITY_MODELS = {"full": "full model", "id_only": "id-only SASRec", "popular": "most popular"}


def _metric(m: dict, key: str, fmt: str = ".4f") -> str:
    v = m.get(key)
    if v is None:
        return "—"
    std = (m.get("std") or {}).get(key)
    return f"{v:{fmt}}" + (f" ± {std:{fmt}}" if std is not None else "")


def quality(d: dict) -> str:
    data, cfg = d["data"], d["config"]
    mc, tc = cfg["model"], cfg["train"]
    seeds = cfg.get("seeds") or []
    head = (
        f"`{d['dataset']}`: {data['users']:,} users, {data['items']:,} items, {data['events']:,} events, "
        f"{data['test_users']:,} test users. Protocol: {d['protocol']}."
    )
    settings = (
        f"Settings: d={mc['d_model']}, {mc['n_layers']} layer(s), {mc['n_heads']} head(s), max_len {mc['max_len']}, "
        f"dropout {mc['dropout']}, item dropout {mc.get('item_dropout')}, item MLP {on_off(mc['item_mlp'])}, output MLP "
        f"{on_off(mc['output_mlp'])}; {tc['objective']}, {tc['loss']} softmax with {tc['uniform_negatives']:,} uniform "
        f"negatives{' per positive' if tc.get('negatives_per_row') else ' shared by the batch'}, lr {tc['lr']}, "
        f"batch {tc['batch_size']}, patience {tc['patience']}; seed(s) {', '.join(str(s) for s in seeds)}."
    )
    models = d["models"]
    has_recall = any("recall@10" in m for m in models.values())
    header = ["model", "HR@10", "NDCG@10"] + (["recall@10"] if has_recall else [])
    header += ["coverage@10", "history kept: HR@10 / NDCG@10", "best epoch", "validation (early stopping)"]
    rows = []
    for name, m in models.items():
        kept = m.get("history_kept") or {}
        bv = m.get("best_valid")
        if isinstance(bv, dict):
            key = "recall@10" if "recall@10" in bv else "ndcg@10"
            valid = f"{key} {bv[key]:.4f}"
        elif isinstance(bv, float):
            valid = f"{'recall@10' if 'recall@10' in m else 'ndcg@10'} {bv:.4f}"
        else:
            valid = "—"
        best = m.get("best_epoch")
        row = [QUALITY_MODELS.get(name, name), _metric(m, "hr@10"), _metric(m, "ndcg@10")]
        row += [_metric(m, "recall@10")] if has_recall else []
        row += [
            _metric(m, "coverage@10", ".3f"),
            f"{num(kept.get('hr@10'), '.4f')} / {num(kept.get('ndcg@10'), '.4f')}",
            "—" if best is None else f"{best:g}" if isinstance(best, int) else f"{best:.1f} (mean)",
            valid,
        ]
        rows.append(row)
    table = md_table(header, rows, "l" + "r" * (len(header) - 1))
    out = [head, settings, table]
    full, ido = models.get("full"), models.get("id_only")
    if full and ido:
        rel = [f"{k} {full[k] / ido[k] - 1:+.1%}" for k in ("hr@10", "ndcg@10", "recall@10") if k in full and k in ido]
        out.append("Full model against id-only SASRec of the same run: " + ", ".join(rel) + ".")
    heads = []
    for name, m in models.items():
        for task, h in (m.get("heads") or {}).items():
            heads.append(
                [QUALITY_MODELS.get(name, name), task, num(h.get("acc@1"), ".3f"), num(h.get("majority@1"), ".3f")]
            )
    if heads:
        out.append("Preference heads on the test targets:")
        out.append(md_table(["model", "head", "acc@1", "majority class acc@1"], heads, "llrr"))
    return "\n\n".join(out)


def _sys_share(runs: list[dict]) -> float | None:
    """Share of the process's CPU time spent in the kernel (page faults of fresh large allocations, mostly)."""
    u = sum(r.get("cpu_user_s") or 0 for r in runs)
    k = sum(r.get("cpu_sys_s") or 0 for r in runs)
    return k / (u + k) if u + k else None


def _phase_shares(runs: list[dict]) -> str:
    """Forward / backward / clip + optimizer shares of a training step (medians over the samples; CPU only)."""
    ph = [x["phases_s"] for x in runs if x.get("phases_s")]
    if not ph:
        return "—"
    tot = {k: statistics.median(p[k] for p in ph) for k in ph[0]}
    s = sum(tot.values())
    return " / ".join(f"{tot[k] / s:.0%}" for k in ("forward", "backward", "clip_optimizer"))


def _rate_cells(r: dict, x: dict, rate: str, flops: str, peak: dict) -> list[str]:
    """The cells a training and an inference row share: what ran, its rate (median, samples), the FLOPs per unit
    (already formatted), GFLOP/s and its share of the matmul peak, padding, the FLOP counter's check."""
    fc = (x.get("flop_check") or {}).get("ratio_counter_to_formula")
    return [
        r["config"],
        r["mix"],
        x["precision"],
        num(x[rate]["median"], ",.0f"),
        sample_list(x[rate]["samples"], ",.0f"),
        flops,
        num(x["gflops_formula"]["median"]),
        pct(x["gflops_formula"]["median"] / peak[x["precision"]]),
        pct(x.get("padding_share")),
        num(fc, ".3f"),
    ]


def _model_speed_details(d: dict) -> str:
    """Every measurement of a model-speed run, folded: matmul, training and inference per precision, FLOPs by part,
    the profiler's view, the length mixes."""
    peak, prm = d["peak_gflops"], d.get("params", {})
    parts = []
    by: dict[tuple, dict] = {}
    for r in d.get("matmul") or []:
        by.setdefault((r["shape"], r["m"], r["k"], r["n"]), {})[r["dtype"]] = r["gflops"]["median"]
    if by:
        rows = [
            [
                shape,
                f"{m} × {k} × {n}",
                num(v.get("fp32"), ",.0f"),
                num(v.get("bf16"), ",.0f"),
                num(v["bf16"] / v["fp32"] if "bf16" in v and "fp32" in v else None),
            ]
            for (shape, m, k, n), v in by.items()
        ]
        parts.append("Matmul rates (medians):")
        parts.append(md_table(["shape", "m × k × n", "fp32 GFLOP/s", "bf16 GFLOP/s", "bf16 / fp32"], rows, "llrrr"))
    rows = []
    for r in d["results"]:
        for tr in r["train"]:
            rows.append(
                _rate_cells(r, tr, "sequences_per_s", num(tr["flops_per_sequence_formula"] / 1e9, ".3f"), peak)
                + [_phase_shares(tr["runs"]), num(tr.get("cpu_utilisation"), ".2f"), pct(_sys_share(tr["runs"]))]
            )
    parts.append(
        f"Training: one optimizer step as `fit` takes it (forward, backward, clip, AdamW), batch "
        f"{prm.get('batch_size')}, {prm.get('negatives')} sampled negatives. FLOPs per sequence from the formula; "
        f"the FLOP counter checks it on a {prm.get('check_rows')}-row slice of the median batch (first precision). "
        "CPU use = CPU s / wall s; sys = the kernel's part of the CPU time."
    )
    parts.append(
        md_table(
            [
                "config",
                "mix",
                "precision",
                "seq/s",
                "samples seq/s",
                "GFLOP/seq",
                "GFLOP/s",
                "of peak",
                "padding",
                "counter / formula",
                "forward / backward / optimizer",
                "CPU use",
                "sys",
            ],
            rows,
            "lllrlrrrrrlrr",
        )
    )
    rows = []
    for r in d["results"]:
        for inf in r["infer"]:
            it = inf.get("items") or {}
            rows.append(
                _rate_cells(r, inf, "users_per_s", num(inf["flops_per_user_formula"] / 1e6), peak)
                + [
                    num(inf.get("cpu_utilisation"), ".2f"),
                    num((it.get("items_per_s") or {}).get("median"), ",.0f"),
                    num((it.get("gflops_formula") or {}).get("median")),
                ]
            )
    parts.append(
        f"Inference: `embed_users` (batches of {prm.get('infer_batch_size')}, padding timed) in users/s; "
        "`item_tower.all_items` in items/s."
    )
    parts.append(
        md_table(
            [
                "config",
                "mix",
                "precision",
                "users/s",
                "samples users/s",
                "MFLOP/user",
                "GFLOP/s",
                "of peak",
                "padding",
                "counter / formula",
                "CPU use",
                "items/s",
                "item GFLOP/s",
            ],
            rows,
            "lllrlrrrrrrrr",
        )
    )
    fwd = [r for r in d["results"] if r["train"]]
    if fwd:
        names = list(dict.fromkeys(k for r in fwd for k in r["train"][0]["forward_parts_per_sequence"]))
        rows = []
        for r in fwd:
            p = r["train"][0]["forward_parts_per_sequence"]
            tot = sum(p.values())
            rows.append(
                [r["config"], r["mix"]] + [f"{p[k] / 1e6:.1f}M ({p[k] / tot:.0%})" if p.get(k) else "—" for k in names]
            )
        parts.append("FLOPs of one training forward pass per sequence, by part (formula):")
        parts.append(md_table(["config", "mix", *names], rows, "ll" + "r" * len(names)))
    prof = [(r, x, kind) for r in d["results"] for kind in ("train", "infer") for x in r[kind] if x.get("profile")]
    if prof:
        rows = []
        for r, x, kind in prof:
            pr = x["profile"]
            kinds = ", ".join(f"{k} {v:.0%}" for k, v in list(pr["by_kind"].items())[:5])
            tops = ", ".join(f"`{o['op'].replace('aten::', '')}` {o['share']:.0%}" for o in pr["top_ops"][:5])
            what = "training steps" if kind == "train" else "embedding batch"
            rows.append([r["config"], r["mix"], what, x["precision"], kinds, tops])
        parts.append("Where the time goes (torch.profiler, self time of the aten ops):")
        parts.append(md_table(["config", "mix", "what", "precision", "by kind", "top ops"], rows, "llllll"))
    mixes = []
    for r in d["results"]:
        ln = r.get("lengths")
        if ln:
            mixes.append(
                f"`{r['config']}` / `{r['mix']}`: {ln['users']:,} users, lengths median {ln['p50']:g}, "
                f"p90 {ln['p90']:g}, p99 {ln['p99']:.0f}, max {ln['max']:,}; {ln['share_over_max_len']:.0%} longer "
                "than max_len"
            )
    if mixes:
        parts.append("The training sequences of each mix: " + "; ".join(mixes) + ".")
    return _details("Every measurement of the run", parts)


def model_speed(d: dict) -> str:
    peak = d["peak_gflops"]
    t = d.get("torch") or {}
    nt = (d.get("params") or {}).get("threads", t.get("num_threads"))
    head = (
        f"torch=={t.get('torch')}, {t.get('num_threads')} threads, CPU capability {t.get('cpu_capability')}, device "
        f"`{t.get('device')}` (CUDA available: {'yes' if t.get('cuda_available') else 'no'}). Matmul 2048³ in the "
        f"same run, the peak the fractions divide by: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} "
        f"GFLOP/s. Medians; FLOPs from the model's shape."
    )
    configs = d.get("configs", {})
    mcfg = d.get("model_config", {})
    rows = []
    for r in d["results"]:
        tr = {x["precision"]: x for x in r["train"]}
        inf = {x["precision"]: x for x in r["infer"]}

        def rate(x, key, prec):
            return num(x[prec][key]["median"], ",.0f") if prec in x else "—"

        def frac(x, prec):
            return pct(x[prec]["gflops_formula"]["median"] / peak[prec]) if prec in x else "—"

        check = (tr.get("fp32") or {}).get("flop_check") or {}
        rows.append(
            [
                r["config"],
                r["mix"],
                rate(tr, "sequences_per_s", "fp32"),
                frac(tr, "fp32"),
                rate(tr, "sequences_per_s", "bf16"),
                rate(inf, "users_per_s", "fp32"),
                frac(inf, "fp32"),
                rate(inf, "users_per_s", "bf16"),
                num(check.get("ratio_counter_to_formula"), ".3f"),
            ]
        )
    table = md_table(
        [
            "config",
            "mix",
            "training fp32 seq/s",
            "of fp32 peak",
            "training bf16 seq/s",
            "inference fp32 users/s",
            "of fp32 peak",
            "inference bf16 users/s",
            "FLOP counter / formula",
        ],
        rows,
        "llrrrrrrr",
    )
    desc = []
    for name, text in configs.items():
        mc = mcfg.get(name, {})
        desc.append(
            f"`{name}`: {text}; item MLP {on_off(mc.get('item_mlp'))}, output MLP {on_off(mc.get('output_mlp'))}"
        )
    out = [head, table, "Configurations as recorded: " + "; ".join(desc) + "."]
    probe = [r for r in d["results"] if r.get("thread_probe")]
    mm1 = {x["dtype"]: x["gflops"]["median"] for x in d.get("matmul_1_thread") or []}
    if probe or mm1:
        lines = []
        if mm1:
            lines.append(
                ", ".join(f"matmul 2048³ {k} {v:.0f} GFLOP/s ({nt} threads: {peak[k]:.0f})" for k, v in mm1.items())
            )
        for r in probe:
            p = r["thread_probe"]
            tr2 = next(x for x in r["train"] if x["precision"] == p["precision"])
            in2 = next(x for x in r["infer"] if x["precision"] == p["precision"])
            line = (
                f"{r['config']} / {r['mix']} / {p['precision']}: training "
                f"{p['train']['sequences_per_s']['median']:,.0f} seq/s ({nt} threads: "
                f"{tr2['sequences_per_s']['median']:,.0f}), inference {p['infer']['users_per_s']['median']:,.0f} "
                f"users/s ({nt} threads: {in2['users_per_s']['median']:,.0f})"
            )
            i1 = ((p["infer"].get("items") or {}).get("items_per_s") or {}).get("median")
            i2 = ((in2.get("items") or {}).get("items_per_s") or {}).get("median")
            if i1 and i2:
                line += f", all items {i1:,.0f} items/s ({nt} threads: {i2:,.0f})"
            lines.append(line)
        out.append("The same run at 1 thread: " + "; ".join(lines) + ".")
    out.append(_model_speed_details(d))
    return "\n\n".join(out)


def fault_matrix(d: dict) -> str:
    """One row per kill point: was it reached, did the rerun equal the clean run, what did a reader see."""
    rows = []
    for r in d["results"]:
        if not r["reached"]:
            outcome = "not reached"
        elif r.get("rerun_error"):
            outcome = f"rerun failed: {r['rerun_error']}"
        elif r["equal"] and not r["mixed"] and not r["orphans"]:
            outcome = "as a clean run"
        else:
            outcome = "; ".join(
                x
                for x in (
                    None if r["equal"] else f"differs: {r.get('difference')}",
                    f"{len(r['mixed'])} mixed snapshots" if r["mixed"] else None,
                    f"orphans {r['orphans']}" if r["orphans"] else None,
                )
                if x
            )
        rows.append(
            [
                f"`{r['point']}`",
                r["what"],
                outcome,
                ", ".join(r["snapshots_seen"]) or "none",
                num(r["snapshot_reads"], ",d"),
                num(r["kill_seconds"]) + " / " + num(r["rerun_seconds"]),
            ]
        )
    good = sum(1 for r in d["results"] if r["reached"] and r["equal"] and not r["mixed"] and not r["orphans"])
    head = (
        f"Day {d['day']} killed (SIGKILL, with its Spark JVM) at each point, then run again: **{good} of "
        f"{len(d['results'])} points end equal to a clean run**, with no mixed snapshot seen by the polling reader "
        "and no orphaned file after `maintain`."
    )
    table = md_table(
        ["kill point", "what is half done there", "outcome", "snapshots a reader saw", "reads", "kill / rerun s"],
        rows,
        "lllllr",
    )
    return head + "\n\n" + table


# -------------------------------------------------------------------- scale
def _gib(x) -> str:
    return num(x, ".2f") if x is not None else ""


def scale(d: dict) -> str:
    sizes = d.get("sizes") or []
    if not sizes:
        return f"No size finished. {d.get('stopped') or ''}".strip()
    s0 = sizes[0]
    head = (
        f"Generated data, {s0['days']} days, {s0['active_frac']:.0%} of the users active a day "
        f"(~{s0['events_per_active_user']:.0f} events each); Spark `{s0['master']}` (driver {s0['driver_memory']}, "
        f"{s0['shuffle_partitions']} shuffle partitions), inference engine `{s0['infer_engine']}` on the CPU. "
        "Each step ran once; memory is the peak during the step: the driver's Python process and the Spark JVM "
        "(high-water marks), and the whole process tree (sampled every 0.2 s)."
    )
    rows = []
    for s in sizes:
        r = s["ratio_day_to_full"]
        rows.append(
            [
                f"{s['users']:,}",
                f"{s['users_in_table']:,}",
                f"{s['day']['users']:,} ({s['day_share_of_users']:.1%})",
                f"{s['day']['raw_events']:,}",
                f"{s['ingest_plus_sequences_events_per_s']:,}",
                num(r["sequences"], ".3f"),
                num(r["infer"], ".3f"),
                num(r["publish"], ".3f"),
                num(r["candidates"], ".3f"),
                "yes" if s["sequences_equal"]["equal"] else f"**no** {s['sequences_equal']}",
            ]
        )
    summary = md_table(
        [
            "users generated",
            "users in `user_sequences`",
            "day's users",
            "day's raw events",
            "ingest + sequences events/s",
            "sequences day / rebuild",
            "infer day / full",
            "publish day / full",
            "candidates day / full",
            "MERGEd = rebuilt",
        ],
        rows,
        "rrrrrrrrrl",
    )
    parts = [head, summary]
    # Per step, every size side by side: seconds and peaks (history ingests: the median day, the largest peaks).
    keys = []
    for s in sizes:
        for rec in s["steps"]:
            k = (rec["phase"], rec["step"])
            if k not in keys:
                keys.append(k)
    rows = []
    for phase, step in keys:
        for s in sizes:
            recs = [r for r in s["steps"] if (r["phase"], r["step"]) == (phase, step)]
            if not recs:
                continue
            secs = sorted(r["seconds"] for r in recs)
            eps = [r["events_per_s"] for r in recs if r.get("events_per_s")]
            mem = [r["memory"] for r in recs]
            label = f"{step} ({len(recs)} days, median)" if len(recs) > 1 else step
            rows.append(
                [
                    phase,
                    label,
                    f"{s['users']:,}",
                    num(secs[len(secs) // 2]),
                    f"{sorted(eps)[len(eps) // 2]:,}" if eps else "",
                    _gib(max(m["driver_python_peak_gib"] for m in mem)),
                    _gib(max(m["jvm_peak_gib"] for m in mem)),
                    _gib(max(m["tree_peak_gib"] for m in mem)),
                ]
            )
    parts.append(
        md_table(
            ["phase", "step", "users", "s", "events/s", "driver Python peak GiB", "JVM peak GiB", "tree peak GiB"],
            rows,
            "llrrrrrr",
        )
    )
    if d.get("stopped"):
        parts.append(f"Stopped: {d['stopped']}")
    return "\n\n".join(parts)


# -------------------------------------------------------------- every kind
def kind(name: str, d: dict) -> str:
    if "models" in d and "dataset" in d:
        return "quality"
    if "index_config" in d:
        return "index-speed"
    return d.get("benchmark") or Path(name).stem


RENDERERS = {
    "pipeline-throughput": pipeline_throughput,
    "pipeline-incremental": pipeline_incremental,
    "infer-incremental": infer_incremental,
    "index-speed": index_speed,
    "quality": quality,
    "model-speed": model_speed,
    "fault-matrix": fault_matrix,
    "sparse-embeddings": sparse_embeddings,
    "scale": scale,
}

# The title of a summary file (results/<name>.md); the site puts its own headings around the blocks.
TITLES = {
    "pipeline-throughput": "Pipeline throughput: one raw drop",
    "pipeline-incremental": "Pipeline: incremental day versus full rebuild",
    "infer-incremental": "Inference: incremental day versus full re-embed",
    "index-speed": "Item index speed: exact, HNSW, IVF",
    "quality": "Model quality",
    "model-speed": "Model speed",
    "fault-matrix": "Kill -9 fault matrix",
    "sparse-embeddings": "Sparse item-id embeddings: one training step, dense versus sparse",
    "scale": "Scale: a day against a full rebuild, and peak memory per step, as users grow",
}

# Kinds whose benchmark writes no summary beside its JSON: `userformer benchmark quality` (an installed command,
# which cannot import this file) prints a table of its own and writes the JSON only.
NO_SUMMARY = {"quality"}


def body(name: str, d: dict) -> str:
    fn = RENDERERS.get(kind(name, d))
    return fn(d) if fn else "(no table for this kind of result: the file holds the numbers)"


def block(name: str, d: dict, path: str | None = None) -> str:
    """What the site shows of a result file: its provenance, then its numbers."""
    return provenance(name, d, path) + "\n\n" + body(name, d)


def document(name: str, d: dict, path: str | None = None) -> str:
    """The summary file written beside the JSON (results/<name>.md): a title, then the block."""
    return f"# {TITLES.get(kind(name, d), Path(name).stem)}\n\n{block(name, d, path)}\n"


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def write_summary(json_path: Path, d: dict) -> str:
    """Write the summary of the result d (saved at json_path) beside it, as <stem>.md; return its text."""
    md = document(json_path.name, d, _shown(json_path))
    json_path.with_suffix(".md").write_text(md)
    return md


def summaries(folder: Path = RESULTS) -> dict[Path, str]:
    """Every summary file the result files of a folder call for, and its text."""
    out = {}
    for p in sorted(folder.glob("*.json")):
        d = json.loads(p.read_text())
        if kind(p.name, d) not in NO_SUMMARY:
            out[p.with_suffix(".md")] = document(p.name, d, _shown(p))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.benchmarks.render", description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", nargs="?", type=Path, default=RESULTS, help="results folder (default: results/)")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a summary differs from its JSON")
    a = ap.parse_args(argv)
    stale = []
    for path, md in summaries(a.folder).items():
        if path.is_file() and path.read_text() == md:
            continue
        stale.append(path)
        if not a.check:
            path.write_text(md)
    for path in stale:
        print(f"{'differs' if a.check else 'wrote'}: {_shown(path)}")
    return 1 if a.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
