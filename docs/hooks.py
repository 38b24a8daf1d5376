"""MkDocs hooks (mkdocs.yml `hooks:`), run at every `mkdocs build`:

- measured results: the markers in docs/measured.md become tables read from the benchmark results
  (tests/benchmarks/results/*.json) and the sweeps (experiments/<name>/results.json + one TOML per run), each block
  with the command and the commit it was recorded with (or a line saying the file lacks them); a result file is
  rendered by tests/benchmarks/render.py, the renderer that writes the `.md` beside it too;
- the design page's Mermaid flowchart becomes an inline SVG, so the site shows it without fetching a script.

Markers, each alone on a line: ``<!-- RESULT file.json -->``, ``<!-- EXPERIMENT name -->``, ``<!-- RESULT-INDEX -->``.
A marker naming a missing file, a result file no marker renders, or a sweep whose recorded numbers disagree with the
result file it cites stops the build.
"""

from __future__ import annotations

import html
import importlib.util
import json
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "tests" / "benchmarks" / "results"
EXPERIMENTS = ROOT / "experiments"


def _load_render():
    """tests/benchmarks/render.py, by its path: MkDocs runs this file as a hook, with no package around it to import
    the repository's modules from (and the render module needs none: it imports the standard library only). Loaded
    afresh with the hook, so `mkdocs serve` shows an edit of it at the next build."""
    spec = importlib.util.spec_from_file_location("userformer_benchmarks_render", RESULTS.parent / "render.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


render = _load_render()

MARKER = re.compile(r"^<!-- (RESULT|EXPERIMENT) ([\w.@-]+) -->$|^<!-- RESULT-INDEX -->$", re.M)
MERMAID = re.compile(r"^```mermaid\n(.*?)^```$", re.M | re.S)


class DocsError(Exception):
    """Something the page asks for cannot be rendered truthfully: the build stops."""


def load_results() -> dict[str, dict]:
    """Every result file, by name."""
    return {p.name: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}


def render_result(name: str, results: dict[str, dict]) -> str:
    if name not in results:
        raise DocsError(f"no result file tests/benchmarks/results/{name}")
    return render.block(name, results[name])


def render_index(results: dict[str, dict]) -> str:
    rows = []
    for name, d in results.items():
        commit = render.commit_of(d)
        dirty = (d.get("git") or {}).get("dirty")
        rows.append(
            [
                f"`{name}`",
                f"`{d['command'].strip()}`" if d.get("command") else "not recorded",
                (f"`{commit[:10]}`" + (" (uncommitted changes)" if dirty else "")) if commit else "not recorded",
                d["started"][:10] if d.get("started") else "not recorded",
            ]
        )
    return render.md_table(["file", "command", "commit", "date"], rows)


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
        if run.get("commit") != render.commit_of(d):
            problems.append(f"{where}: commit {run.get('commit')} but {src} says {render.commit_of(d)}")
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
            cell = render.num(v, spec["format"])
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
    table = render.md_table(header, rows, "ll" + "r" * len(metrics) + "l")
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
