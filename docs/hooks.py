"""MkDocs hooks (mkdocs.yml `hooks:`), run at every `mkdocs build`:

- measured results: the markers in docs/measured.md become tables read from the benchmark results
  (tests/benchmarks/results/*.json) and the sweeps (experiments/<name>/results.json + one TOML per run), each block
  with the command and the commit it was recorded with (or a line saying the file lacks them);
- the design page's Mermaid flowchart becomes an inline SVG, so the site shows it without fetching a script.

Markers, each alone on a line: ``<!-- RESULT file.json -->``, ``<!-- EXPERIMENT name -->``, ``<!-- RESULT-INDEX -->``.
A marker naming a missing file, a result file no marker renders, or a sweep whose recorded numbers disagree with the
result file it cites stops the build.
"""

from __future__ import annotations

import html
import json
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "tests" / "benchmarks" / "results"
EXPERIMENTS = ROOT / "experiments"

MARKER = re.compile(r"^<!-- (RESULT|EXPERIMENT) ([\w.@-]+) -->$|^<!-- RESULT-INDEX -->$", re.M)
MERMAID = re.compile(r"^```mermaid\n(.*?)^```$", re.M | re.S)


class DocsError(Exception):
    """Something the page asks for cannot be rendered truthfully: the build stops."""


# ------------------------------------------------------------------ helpers
def _num(x, fmt: str = ",.1f") -> str:
    return "—" if x is None else format(x, fmt)


def _cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list], align: str | None = None) -> str:
    align = align or "-" * len(header)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _on(flag) -> str:
    return "not recorded" if flag is None else "on" if flag else "off"


def _pct(x) -> str:
    return "—" if x is None else f"{x:.1%}"


def load_results() -> dict[str, dict]:
    """Every result file, by name."""
    return {p.name: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}


def commit_of(d: dict) -> str | None:
    return (d.get("git") or {}).get("commit") or d.get("commit")


def provenance(name: str, d: dict) -> str:
    """Command, commit, when, where: what a reader needs to trust or redo a number."""
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
        parts += [f"{k} {m[k]}" for k in ("python", "pyspark", "deltalake", "faiss") if m.get(k)]
        torch = (d.get("torch") or {}).get("torch")
        if torch:
            parts.append(f"torch {torch}")
        out.append("- **Machine:** " + ", ".join(parts))
    if d.get("load_at_start"):
        load = ", ".join(str(x) for x in d["load_at_start"])
        end = f"; at the end {', '.join(str(x) for x in d['load_at_end'])}" if d.get("load_at_end") else ""
        out.append(f"- **Load average at the start:** {load}{end} (a shared machine: compare within one run)")
    out.append(f"- **File:** `tests/benchmarks/results/{name}`")
    return "\n".join(out)


# ------------------------------------------------------------ per benchmark
STEP_NAMES = {
    "ingest": "ingest",
    "sequences_first_build": "sequences (first build)",
    "sequences_rebuild": "sequences --rebuild",
}


def pipeline_throughput(d: dict) -> str:
    rows = []
    for r in d["results"]:
        spark = r.get("config", {}).get("spark", {})
        where = (
            f"{spark.get('master')}, driver {spark.get('driver_memory')}, {spark.get('shuffle_partitions')} partitions"
        )
        for key, label in STEP_NAMES.items():
            s = r["steps"].get(key)
            if s:
                n = f"{len(s['samples_s'])}" + (" (budget)" if s.get("reduced") else "")
                rows.append([f"{r['events_raw']:,}", label, _num(s["median_s"]), n, f"{s['events_per_s']:,}", where])
        both = r.get("ingest_plus_sequences")
        if both:
            rows.append(
                [
                    f"{r['events_raw']:,}",
                    "ingest + sequences (sum of medians)",
                    _num(both["median_s"]),
                    "",
                    f"{both['events_per_s']:,}",
                    where,
                ]
            )
    table = _table(["raw events", "step", "median s", "samples", "events/s", "Spark"], rows, "rlrrrl")
    return "One raw drop of each size; medians of the samples.\n\n" + table


def pipeline_incremental(d: dict) -> str:
    r = d["results"][0]
    last, gen = r["last_day"], r.get("generate", {})
    head = (
        f"History: {r['users']:,} users over {r['days']} days, {r['active_frac']:.0%} active per day; "
        f"{gen.get('events_total', 0):,} raw events, {r.get('events_total_accepted', 0):,} accepted. "
        f"Day measured, {last['dt']}: {last['raw_events']:,} raw events, {last['active_users']:,} active users of "
        f"{last['user_sequences_rows']:,} in `user_sequences`."
    )

    def row(label, s):
        return [label, _num(s["median_s"]), ", ".join(_num(x) for x in s["samples_s"])]

    times = _table(
        ["measure", "median s", "samples s"],
        [
            row("ingest of the day", r["ingest_last_day"]),
            row("`sequences --dt` (one MERGE)", r["sequences_incremental"]),
            row("`sequences --rebuild` (all history)", r["sequences_rebuild"]),
        ],
        "lrl",
    )
    ratio = (
        f"**Ratio incremental / rebuild: {r['ratio_incremental_to_rebuild']:.2f}**; "
        f"the two tables are {'identical' if r.get('tables_equal') else 'NOT identical'}."
    )
    w = r["written"]
    inc, reb = w["incremental"], w["rebuild"]

    def wrow(label, x):
        return [
            label,
            f"{x['rows_written']:,}",
            x["files_added"],
            _num(x["bytes_added"] / 2**20),
            x.get("files_rewritten", "—"),
            x.get("deletion_vectors_added", "—"),
            x.get("target_rows_copied", "—"),
            _num(x["scan_ms"] / 1000) if "scan_ms" in x else "—",
            _num(x["rewrite_ms"] / 1000) if "rewrite_ms" in x else "—",
        ]

    written = _table(
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
        f"`maintain` afterwards: {_num(mt['seconds'])} s; `user_sequences` files "
        f"{mt['user_sequences_files_before']} → {mt['user_sequences_files_after']}."
        if mt
        else "`maintain` was not measured in this file."
    )
    return "\n\n".join(
        [head, times, ratio, "What each path wrote (from the commit's operation metrics):", written, maint]
    )


def infer_incremental(d: dict) -> str:
    p = d.get("params", {})
    head = (
        f"{d['users_in_table']:,} users in `user_sequences`, the day cut to a stable-hash "
        f"{p.get('active_share', 0):.0%} of them; {d['items']:,} items, a d={d.get('d_model')} model; "
        f"`infer` + `publish` of the same day, alternating, {d.get('repeats')} samples each, "
        f"device `{p.get('device', d.get('device'))}`."
    )
    rows = []
    for key, label in (("full", "full re-embed (`infer --all-users`)"), ("incremental", "incremental (`infer`)")):
        x = d[key]
        rows.append(
            [
                label,
                f"{x['users']:,}",
                _num(x["infer_s"]),
                _num(x["publish_s"]),
                _num(x["total_s"]),
                ", ".join(_num(s) for s in x["samples_total_s"]),
            ]
        )
    table = _table(["run", "users", "infer s", "publish s", "total s", "samples total s"], rows, "lrrrrl")
    ratio = d["ratio"]
    line = (
        f"**Ratio incremental / full: total {ratio['total_s']:.3f}, infer {ratio['infer_s']:.3f}, "
        f"publish {ratio['publish_s']:.3f}** for {_pct(ratio['users'])} of the users (medians)."
    )
    return "\n\n".join([head, table, line])


def index_speed(d: dict) -> str:
    cfg, data = d["index_config"], d.get("data", {})
    head = (
        f"d={data.get('dimension')} unit vectors around {data.get('clusters'):,} centres, "
        f"{d['params'].get('queries'):,} user-like queries; recall@10 against exact search; "
        f"FAISS threads {d.get('faiss_threads')}. Rows marked ★ are what `userformer index` builds at that size "
        f"with the default `[index]` settings (exact up to {cfg['flat_max_items']:,} items, HNSW up to "
        f"{cfg['hnsw_max_items']:,}, IVF above; efSearch {cfg['hnsw_ef_search']}, nprobe {cfg['ivf_nprobe']})."
    )
    rows = []
    for r in d["results"]:
        n, kind = r["items"], r.get("default_kind")

        def add(label, params, build, e, default, n=n):
            rows.append(
                [
                    f"{n:,}",
                    label + (" ★" if default else ""),
                    params,
                    f"{_num(build['median_s'], '.2f')} ({len(build['samples_s'])})" if build else "″",
                    _num(e["recall_at_10"], ".3f"),
                    _num(e["qps"], ",.0f"),
                    _num(e["single_query_ms"]["median"], ".3f"),
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
    table = _table(
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
        f"dropout {mc['dropout']}, item dropout {mc.get('item_dropout')}, item MLP {_on(mc['item_mlp'])}, output MLP "
        f"{_on(mc['output_mlp'])}; {tc['objective']}, {tc['loss']} softmax with {tc['uniform_negatives']:,} uniform "
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
            f"{_num(kept.get('hr@10'), '.4f')} / {_num(kept.get('ndcg@10'), '.4f')}",
            "—" if best is None else f"{best:g}" if isinstance(best, int) else f"{best:.1f} (mean)",
            valid,
        ]
        rows.append(row)
    table = _table(header, rows, "l" + "r" * (len(header) - 1))
    out = [head, settings, table]
    full, ido = models.get("full"), models.get("id_only")
    if full and ido:
        rel = [f"{k} {full[k] / ido[k] - 1:+.1%}" for k in ("hr@10", "ndcg@10", "recall@10") if k in full and k in ido]
        out.append("Full model against id-only SASRec of the same run: " + ", ".join(rel) + ".")
    heads = []
    for name, m in models.items():
        for task, h in (m.get("heads") or {}).items():
            heads.append(
                [QUALITY_MODELS.get(name, name), task, _num(h.get("acc@1"), ".3f"), _num(h.get("majority@1"), ".3f")]
            )
    if heads:
        out.append("Preference heads on the test targets:")
        out.append(_table(["model", "head", "acc@1", "majority class acc@1"], heads, "llrr"))
    return "\n\n".join(out)


def model_speed(d: dict) -> str:
    peak = d["peak_gflops"]
    t = d.get("torch") or {}
    head = (
        f"torch {t.get('torch')}, {t.get('num_threads')} threads, CPU capability {t.get('cpu_capability')}, device "
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
            return _num(x[prec][key]["median"], ",.0f") if prec in x else "—"

        def frac(x, prec):
            return _pct(x[prec]["gflops_formula"]["median"] / peak[prec]) if prec in x else "—"

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
                _num(check.get("ratio_counter_to_formula"), ".3f"),
            ]
        )
    table = _table(
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
        desc.append(f"`{name}`: {text}; item MLP {_on(mc.get('item_mlp'))}, output MLP {_on(mc.get('output_mlp'))}")
    out = [head, table, "Configurations as recorded: " + "; ".join(desc) + "."]
    probe = [r for r in d["results"] if r.get("thread_probe")]
    mm1 = {x["dtype"]: x["gflops"]["median"] for x in d.get("matmul_1_thread") or []}
    if probe or mm1:
        lines = []
        if mm1:
            lines.append(
                ", ".join(f"matmul 2048³ {k} {v:.0f} GFLOP/s (2 threads: {peak[k]:.0f})" for k, v in mm1.items())
            )
        for r in probe:
            p = r["thread_probe"]
            tr2 = next(x for x in r["train"] if x["precision"] == p["precision"])
            in2 = next(x for x in r["infer"] if x["precision"] == p["precision"])
            lines.append(
                f"{r['config']} / {r['mix']} / {p['precision']}: training "
                f"{p['train']['sequences_per_s']['median']:,.0f} seq/s (2 threads: "
                f"{tr2['sequences_per_s']['median']:,.0f}), inference {p['infer']['users_per_s']['median']:,.0f} "
                f"users/s (2 threads: {in2['users_per_s']['median']:,.0f})"
            )
        out.append("The same run at 1 thread: " + "; ".join(lines) + ".")
    return "\n\n".join(out)


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
}


def render_result(name: str, results: dict[str, dict]) -> str:
    if name not in results:
        raise DocsError(f"no result file tests/benchmarks/results/{name}")
    d = results[name]
    fn = RENDERERS.get(kind(name, d))
    body = fn(d) if fn else "(no table for this kind of result: the file holds the numbers)"
    return provenance(name, d) + "\n\n" + body


def render_index(results: dict[str, dict]) -> str:
    rows = []
    for name, d in results.items():
        commit = commit_of(d)
        dirty = (d.get("git") or {}).get("dirty")
        rows.append(
            [
                f"`{name}`",
                f"`{d['command'].strip()}`" if d.get("command") else "not recorded",
                (f"`{commit[:10]}`" + (" (uncommitted changes)" if dirty else "")) if commit else "not recorded",
                d["started"][:10] if d.get("started") else "not recorded",
            ]
        )
    return _table(["file", "command", "commit", "date"], rows)


# ------------------------------------------------------------------- sweeps
def load_sweep(name: str) -> dict:
    p = EXPERIMENTS / name / "results.json"
    if not p.is_file():
        raise DocsError(f"no sweep {p.relative_to(ROOT)}")
    return json.loads(p.read_text())


def overrides(path: Path) -> list[str]:
    """A run's TOML as `--set` arguments (section.key=value), in file order."""
    data = tomllib.loads(path.read_text())
    out = []
    for section, values in data.items():
        for key, v in values.items():
            v = str(v).lower() if isinstance(v, bool) else v
            out.append(f"{section}.{key}={v}")
    return out


# Sweep metric -> (where in a quality result's model entry, how to read it).
SOURCE_KEYS = {
    "valid_ndcg@10": lambda m: m["best_valid"].get("ndcg@10") if isinstance(m.get("best_valid"), dict) else None,
    "test_hr@10": lambda m: m.get("hr@10"),
    "test_ndcg@10": lambda m: m.get("ndcg@10"),
    "test_recall@10": lambda m: m.get("recall@10"),
    "best_epoch": lambda m: m.get("best_epoch"),
}


def _decimals(fmt: str) -> int | None:
    m = re.fullmatch(r"\.(\d+)f", fmt)
    return int(m.group(1)) if m else (0 if fmt == "d" else None)


def check_sweep(sweep: dict, results: dict[str, dict] | None = None) -> list[str]:
    """What in a sweep disagrees with the files it names: configs, and the numbers of runs kept as result files."""
    results = load_results() if results is None else results
    name, problems = sweep["sweep"], []
    for run in sweep["runs"]:
        where = f"{name}/{run['name']}"
        cfg = EXPERIMENTS / name / run["config"]
        if not cfg.is_file():
            problems.append(f"{where}: no config {cfg.relative_to(ROOT)}")
            continue
        src = run.get("source")
        if not src:
            if run.get("commit"):
                problems.append(f"{where}: a commit without a result file to show it")
            continue
        d = results.get(Path(src).name)
        if d is None:
            problems.append(f"{where}: cites missing {src}")
            continue
        if run.get("commit") != commit_of(d):
            problems.append(f"{where}: commit {run.get('commit')} but {src} says {commit_of(d)}")
        if run.get("command") != d.get("command"):
            problems.append(f"{where}: command differs from the one {src} records")
        m = d["models"].get(run["model"])
        if m is None:
            problems.append(f"{where}: {src} has no model {run['model']}")
            continue
        for key, value in run["results"].items():
            if value is None:
                continue
            std = key.endswith("_std")
            base = key[: -len("_std")] if std else key
            if base not in SOURCE_KEYS:
                problems.append(f"{where}: {key} has no counterpart in a result file")
                continue
            got = SOURCE_KEYS[base]({**m, **(m.get("std") or {})} if std else m)
            nd = _decimals(sweep["metrics"][base]["format"])
            if got is None or round(got, nd) != round(value, nd):
                problems.append(f"{where}: {key} {value} but {src} says {got}")
        # The TOML says what ran: its settings must be the recorded run's.
        variant = d["config"]["variants"].get(run["model"], {})
        ran = {"model": variant, "train": m.get("train_config") or d["config"]["train"]}
        for item in overrides(cfg):
            k, v = item.split("=", 1)
            section, key = k.split(".")
            rec = ran.get(section, {}).get(key)
            rec = str(rec).lower() if isinstance(rec, bool) else rec
            if rec is None or (str(rec) != v and not _same_number(rec, v)):
                problems.append(f"{where}: {run['config']} sets {k}={v}, {src} ran with {rec}")
    return problems


def _same_number(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def render_sweep(name: str, results: dict[str, dict] | None = None) -> str:
    sweep = load_sweep(name)
    problems = check_sweep(sweep, results)
    if problems:
        raise DocsError("; ".join(problems))
    metrics = sweep["metrics"]
    head = [
        f"**{sweep['title']}.** {sweep['description']}",
        f"- **Dataset:** `{sweep['dataset']}`; {sweep['protocol']}.",
        f"- **Base command:** `{sweep['base_command']}`",
        f"- **Commit:** {('`' + sweep['commit'] + '`') if sweep.get('commit') else 'none for the sweep as a whole'}. "
        f"{sweep.get('commit_note', '')}",
        f"- **Files:** `experiments/{name}/` (one TOML per run, `results.json`)",
    ]
    rows, details = [], []
    for run in sweep["runs"]:
        r = run["results"]
        cells = []
        for key, spec in metrics.items():
            v, std = r.get(key), r.get(f"{key}_std")
            cell = _num(v, spec["format"])
            if v is not None and std is not None:
                cell += f" ± {std:{spec['format']}}"
            cells.append(cell)
        if run.get("commit"):
            commit = f"`{run['commit'][:10]}`"
        elif run.get("commit_range"):
            commit = f"one of `{run['commit_range']}`"
        else:
            commit = "not recorded"
        rows.append([f"`{run['name']}`", run["model"], *cells, commit])
        sets = " ".join(f"`{o}`" for o in overrides(EXPERIMENTS / name / run["config"]))
        note = f" {run['note']}" if run.get("note") else ""
        details.append(f"- `{run['name']}`: `{run['config']}` = {sets}.{note}")
    header = ["run", "model", *(s["label"] for s in metrics.values()), "commit"]
    table = _table(header, rows, "ll" + "r" * len(metrics) + "l")
    cmds = "\n".join(f"{run['name']}: {run['command']}" for run in sweep["runs"])
    recorded = f'??? note "Commands as recorded"\n\n    ```text\n{_indent(cmds, 4)}\n    ```'
    table += "\n\nEach run's configuration (as `--set` overrides) and notes:\n\n" + "\n".join(details)
    return head[0] + "\n\n" + "\n".join(head[1:]) + "\n\n" + table + "\n\n" + recorded


def _indent(text: str, n: int) -> str:
    return "\n".join(" " * n + line for line in text.splitlines())


# ------------------------------------------------------------------ the page
def render_measured(markdown: str, results: dict[str, dict] | None = None) -> str:
    """docs/measured.md with every marker replaced; every result file must be rendered by a RESULT marker."""
    results = load_results() if results is None else results
    used = set()

    def sub(m: re.Match) -> str:
        what, name = m.group(1), m.group(2)
        if what == "RESULT":
            used.add(name)
            return render_result(name, results)
        if what == "EXPERIMENT":
            return render_sweep(name, results)
        return render_index(results)

    out = MARKER.sub(sub, markdown)
    missing = sorted(set(results) - used)
    if missing:
        raise DocsError(f"result files without a RESULT marker in measured.md: {', '.join(missing)}")
    return out


# ------------------------------------------------------------------ diagram
NODE = re.compile(r'^(\w+)(\["(.+)"\]|\{\{"(.+)"\}\}|\[\("(.+)"\)\]|\[/"(.+)"/\])$')
SHAPES = ("step", "check", "table", "file")


def parse_flowchart(src: str) -> tuple[dict[str, tuple[str, str]], list[str], list[tuple[str, str]]]:
    """The subset of Mermaid the design page uses: nodes ``id["step"]``, ``id{{"check"}}``, ``id[("table")]``,
    ``id[/"file"/]``; one chain ``a --> b --> c`` (the order of the steps, may span lines) and ``a -.-> b`` (what a
    step writes). Returns nodes (id -> (shape, label)), the chain, the writes."""
    nodes, chain, writes = {}, [], []
    for raw in src.splitlines():
        line = raw.strip()
        if not line or line.startswith("%%") or line.startswith("flowchart"):
            continue
        if m := NODE.match(line):
            groups = m.groups()[2:]
            shape = next(s for s, g in zip(SHAPES, groups) if g is not None)
            nodes[m.group(1)] = (shape, next(g for g in groups if g is not None))
        elif m := re.fullmatch(r"(\w+) -\.-> (\w+)", line):
            writes.append((m.group(1), m.group(2)))
        elif re.fullmatch(r"(\w+ --> )+\w+", line):
            ids = line.split(" --> ")
            if chain and chain[-1] != ids[0]:
                raise DocsError(f"flowchart: the chain breaks at {line!r}")
            chain += ids[1:] if chain else ids
        else:
            raise DocsError(f"flowchart: cannot draw {line!r}")
    for a, b in [*zip(chain, chain[1:]), *writes]:
        for n in (a, b):
            if n not in nodes:
                raise DocsError(f"flowchart: {n} is used but not declared")
    return nodes, chain, writes


def flowchart_svg(src: str) -> str:
    """The flowchart drawn top-down: the steps in one column in chain order, what each writes to its right."""
    nodes, chain, writes = parse_flowchart(src)
    char, row, box_h = 7.4, 40, 28
    lw = max(len(nodes[n][1]) for n in chain) * char + 28
    targets = [b for _, b in writes]
    rw = max((len(nodes[n][1]) for n in targets), default=10) * char + 28
    lx, rx = 8, 8 + lw + 90
    pos, y = {}, 8
    for n in chain:
        outs = list(dict.fromkeys(b for a, b in writes if a == n and b not in pos))
        pos[n] = (lx, y, lw)
        for i, t in enumerate(outs):
            pos[t] = (rx, y + i * row, rw)
        y += max(1, len(outs)) * row + 8
    width, height = rx + rw + 8, y
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="flowchart" viewBox="0 0 {width:.0f} {height:.0f}" '
        f'width="{width:.0f}" role="img" aria-labelledby="flow-title">',
        '<title id="flow-title">The steps of a day in order, and what each writes</title>',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" class="head"/></marker></defs>',
    ]
    for a, b in zip(chain, chain[1:]):
        x, y1, w = pos[a]
        parts.append(
            f'<line class="flow" x1="{x + w / 2:.1f}" y1="{y1 + box_h}" x2="{x + w / 2:.1f}" '
            f'y2="{pos[b][1]}" marker-end="url(#arrow)"/>'
        )
    for a, b in writes:
        (x1, y1, w1), (x2, y2, _) = pos[a], pos[b]
        mid = x1 + w1 + 45
        parts.append(
            f'<path class="write" d="M{x1 + w1:.1f},{y1 + box_h / 2} H{mid:.1f} V{y2 + box_h / 2} H{x2:.1f}" '
            'marker-end="url(#arrow)"/>'
        )
    for n, (x, y, w) in pos.items():
        shape, label = nodes[n]
        h, cy = box_h, y + box_h / 2
        if shape == "step":
            body = f'<rect x="{x}" y="{y}" width="{w:.1f}" height="{h}" rx="4"/>'
        elif shape == "check":
            e = 10
            pts = [(x, cy), (x + e, y), (x + w - e, y), (x + w, cy), (x + w - e, y + h), (x + e, y + h)]
            body = '<polygon points="' + " ".join(f"{px:.1f},{py:.1f}" for px, py in pts) + '"/>'
        elif shape == "table":
            e = 4
            body = (
                f'<path d="M{x},{y + e} a{w / 2:.1f},{e} 0 0,0 {w:.1f},0 v{h - 2 * e} a{w / 2:.1f},{e} 0 0,1 '
                f'-{w:.1f},0 z"/><path class="rim" d="M{x},{y + e} a{w / 2:.1f},{e} 0 0,1 {w:.1f},0"/>'
            )
        else:
            e = 8
            pts = [(x + e, y), (x + w, y), (x + w - e, y + h), (x, y + h)]
            body = '<polygon points="' + " ".join(f"{px:.1f},{py:.1f}" for px, py in pts) + '"/>'
        parts.append(
            f'<g class="{shape}">{body}<text x="{x + w / 2:.1f}" y="{cy + 4:.1f}" '
            f'text-anchor="middle">{html.escape(label)}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


# -------------------------------------------------------------------- hooks
def on_page_markdown(markdown: str, page, config, files) -> str:
    src = page.file.src_uri
    if src == "measured.md":
        markdown = render_measured(markdown)
    if src == "design.md":
        markdown = MERMAID.sub(lambda m: f'<div class="flowchart-figure">{flowchart_svg(m.group(1))}</div>', markdown)
    return markdown
