"""`userformer report --dt D`: the daily HTML report of drop D, the last step of `run-day`.

One self-contained page, ``reports_root/daily/dt=D/index.html`` (plots inline
as SVG, no script, nothing fetched), made from what the day left behind: the
ledger of its steps (jobs/core/ledger.py), the check reports, the model registry's
manifests and the published Delta tables (time travel to the versions the
day's publish committed). Sections:

1. the day's steps: done / skipped (why) / failed, seconds, and every check
   with its failed expectations and a link to its HTML report;
2. metrics over the days up to D: users active, new and refreshed, the gate's
   held-out metrics (candidate, published, most popular), the first model's
   validation metrics, the index's recall@10;
3. the training loss per epoch of the model trained on D;
4. the distribution of the top-1 preference score per task of D's refreshed users;
5. embedding drift: cosine between each refreshed user's vector before and
   after D's publish (and each item's), with the model change noted;
6. where things are: tables and their versions, model, index, folders.

A section whose inputs do not exist (no model yet, an empty day, a skipped
publish) says "not available" and why. The page is rendered in memory and
then replaced atomically, so a failed report leaves the previous one whole;
``reports_root/daily/index.html`` (every day's link) is rewritten after it.
"""

from __future__ import annotations

import datetime as dt
import html
import io
import json
import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from userformer.jobs.core import registry
from userformer.jobs.core.config import Config
from userformer.jobs.core.dates import date_arg
from userformer.jobs.core.errors import UserError
from userformer.jobs.core.ledger import ENTRIES, ledger_dir, read_ledger
from userformer.jobs.core.storage import delta, files
from userformer.jobs.steps import index, infer

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

OUTPUTS = ("user_embeddings", "user_preference_scores", "item_embeddings")
GATE_METRICS = ("ndcg@10", "recall@10", "hr@10")
# Drift compares at most this many refreshed users (the first by user_id): a summary needs no more.
MAX_DRIFT_ROWS = 200_000
_DAY_DIR = re.compile(r"^dt=(\d{4}-\d{2}-\d{2})$")

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #1a7f37; } .skipped { color: #9a6700; } .failed { color: #cf222e; font-weight: bold; }
.na { color: #666; font-style: italic; } .note { color: #555; }
code { font-size: 0.9em; } svg { max-width: 100%; height: auto; }
"""


class NotAvailable(Exception):
    """A section (or part of one) cannot be shown; the message says why."""


# ------------------------------------------------------------------ paths
def daily_root(cfg: Config) -> Path:
    return cfg.reports_root / "daily"


def report_path(cfg: Config, day: dt.date) -> Path:
    return daily_root(cfg) / f"dt={day}" / "index.html"


# ------------------------------------------------------------ HTML pieces
def esc(v) -> str:
    return html.escape(str(v), quote=True)


def fmt(v, digits: int = 4) -> str:
    """A number as the page shows it ('' for None/NaN)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def table(header: list[str], rows: list[list], digits: dict[int, int] | None = None) -> str:
    """An HTML table; numbers right-aligned and formatted (`digits`: decimals by column, default 4), strings
    escaped, `Raw` cells inserted as they are."""
    digits = digits or {}
    out = ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    for r in rows:
        cells = []
        for i, v in enumerate(r):
            if isinstance(v, Raw):
                cells.append(f"<td>{v}</td>")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                cells.append(f'<td class="num">{esc(fmt(v, digits.get(i, 4)))}</td>')
            else:
                cells.append(f"<td>{esc(fmt(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


class Raw(str):
    """HTML that is already escaped."""


def na(why: str) -> str:
    return f'<p class="na">not available: {esc(why)}</p>'


def svg(fig) -> str:
    """A matplotlib figure as inline SVG markup (text kept as text, no metadata block)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(
            buf,
            format="svg",
            bbox_inches="tight",
            metadata={"Creator": None, "Date": None, "Format": None, "Type": None},
        )
    text = buf.getvalue()
    return text[text.index("<svg") :]


def figure(width: float, height: float, ncols: int = 1):
    """A Figure with `ncols` subplots side by side (no pyplot: no global state, no display)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


# ------------------------------------------------------------- the inputs
def ledger_days(cfg: Config, upto: dt.date) -> list[dt.date]:
    """Every drop date <= `upto` with a ledger, oldest first."""
    root = cfg.reports_root / "runs"
    days = (
        [dt.date.fromisoformat(m.group(1)) for p in root.iterdir() if (m := _DAY_DIR.match(p.name))]
        if root.is_dir()
        else []
    )
    return sorted(d for d in days if d <= upto)


def result(ledger: dict, step: str) -> dict | None:
    """A step's result from a ledger, or None when the step has no entry."""
    e = ledger.get(step)
    return e["result"] if e else None


def manifest(cfg: Config, version: str | None) -> dict | None:
    if not version:
        return None
    try:
        return registry.read_manifest(cfg, version)
    except UserError:
        return None


def publish_of(ledger: dict, day: dt.date) -> dict:
    """The day's publish result; NotAvailable (why) when it did not run or was skipped."""
    pub = result(ledger, "publish")
    if pub is None:
        raise NotAvailable(
            f"the publish step has no ledger entry for {day} (the day stopped before it, or it has not run yet)"
        )
    if "skipped" in pub:
        raise NotAvailable(f"publish was skipped on {day}: {pub['skipped']}")
    return pub


def step_status(res: dict) -> tuple[str, str]:
    """(status, detail) of a ledger result: done / skipped / failed."""
    if "skipped" in res:
        return "skipped", res["skipped"]
    if res.get("success") is False:
        return "failed", "failed: " + (", ".join(res.get("failed") or []) or "see its report")
    if res.get("status") == "rejected" and "recall_at_10" in res:
        return "failed", f"index rejected (recall@10 {fmt(res.get('recall_at_10'))})"
    if res.get("problems"):
        return "failed", "; ".join(res["problems"])
    detail = res.get("reason") or ""
    if res.get("status") in ("promoted", "rejected", "candidate"):
        detail = f"{res['status']}: {detail}"
    return "done", detail


# ------------------------------------------------------------ 1: the steps
def section_steps(cfg: Config, day: dt.date, ledger: dict) -> tuple[str, dict]:
    """The day's steps in pipeline order, then every check report of the day."""
    names = []
    for s in ENTRIES:
        if s == "infer":
            names += sorted(k for k in ledger if k.startswith("infer-")) or ["infer"]
        else:
            names.append(s)
    rows, counts = [], {"done": 0, "skipped": 0, "failed": 0, "not run": 0}
    for s in names:
        e = ledger.get(s)
        if s == "report":
            rows.append([s, Raw('<span class="ok">this page</span>'), "", ""])
            continue
        if e is None:
            counts["not run"] += 1
            rows.append([s, Raw('<span class="na">not run</span>'), "", "no ledger entry for this day"])
            continue
        status, detail = step_status(e["result"])
        counts[status] += 1
        rows.append([s, Raw(f'<span class="{status}">{status}</span>'), float(e["seconds"]), detail])
    body = table(["step", "status", "seconds", "detail"], rows, {2: 2})

    checks = []
    for p in sorted((cfg.reports_root / "checks").glob(f"*/dt={day}.json")):
        try:
            c = json.loads(p.read_text())
        except ValueError:
            checks.append([p.parent.name, Raw('<span class="failed">unreadable</span>'), "", "", str(p)])
            continue
        failed = [
            f"{r['expectation']}" + (f" ({r['column']})" if r.get("column") else "")
            for r in c.get("results", [])
            if not r.get("success")
        ]
        html_file = p.with_suffix(".html")
        link = (
            Raw(f'<a href="{esc(_rel(html_file, report_path(cfg, day)))}">{esc(html_file.name)}</a>')
            if html_file.is_file()
            else ""
        )
        status = "ok" if c.get("success") else "failed"
        checks.append(
            [
                c.get("table", p.parent.name),
                Raw(f'<span class="{status}">{status}</span>'),
                len(c.get("results", [])),
                "; ".join(failed) or (c.get("error") or ""),
                link,
            ]
        )
    body += "<h3>Checks</h3>" + (
        table(["table", "result", "expectations", "failed", "report"], checks)
        if checks
        else na(f"no check report for {day} under {cfg.reports_root / 'checks'}")
    )
    return body, {"steps": counts, "checks": len(checks)}


def _rel(target: Path, page: Path) -> str:
    import os

    return Path(os.path.relpath(target, page.parent)).as_posix()


# ------------------------------------------------------ 2: metrics over days
def day_row(cfg: Config, day: dt.date, ledger: dict) -> dict:
    """What one day contributes to the metrics over days (None where the day has no such number)."""
    seq = result(ledger, "sequences") or {}
    pub = result(ledger, "publish") or {}
    ft = result(ledger, "finetune") or {}
    gate = result(ledger, "gate") or {}
    idx = result(ledger, "index") or {}
    row = {
        "dt": str(day),
        "active_users": seq.get("active_users"),
        "new_users": seq.get("new_users"),
        "refreshed": None if "skipped" in pub else pub.get("users"),
        "model": pub.get("model_version"),
        "action": ft.get("action") or ("skipped" if "skipped" in ft else None),
        "verdict": gate.get("status"),
        "index_recall@10": idx.get("recall_at_10"),
    }
    if ft.get("action") == "bootstrap":
        for m in GATE_METRICS:
            row[f"train_valid_{m}"] = (ft.get("valid") or {}).get(m)
            row[f"most_popular_{m}"] = (ft.get("valid_most_popular") or {}).get(m)
    elif ft.get("action") == "finetune" and ft.get("version"):
        g = ((manifest(cfg, ft["version"]) or {}).get("metrics") or {}).get("gate") or {}
        checks = (ft.get("gate") or {}).get("checks") or {}
        for m in GATE_METRICS:
            row[f"candidate_{m}"] = (g.get("candidate") or {}).get(m, (checks.get(m) or {}).get("candidate"))
            row[f"published_{m}"] = (g.get("published") or {}).get(m, (checks.get(m) or {}).get("published"))
            row[f"most_popular_{m}"] = (g.get("most_popular") or {}).get(m)
    return row


def section_metrics(cfg: Config, day: dt.date) -> tuple[str, dict]:
    """Users and model quality over every day with a ledger up to D: two plots and the numbers."""
    rows = [day_row(cfg, d, read_ledger(cfg, d)) for d in ledger_days(cfg, day)]
    x = list(range(len(rows)))  # positions, labelled MM-DD below (the year adds nothing on the axis)
    labels = [r["dt"][5:] for r in rows]

    def series(key):
        return [float("nan") if r.get(key) is None else float(r[key]) for r in rows]

    fig, (ax,) = figure(7, 2.6)
    for key, label in (("active_users", "active"), ("new_users", "new"), ("refreshed", "refreshed (published)")):
        ax.plot(x, series(key), marker="o", label=label)
    ax.set_title("users per day")
    ax.set_xticks(x, labels)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    plots = [svg(fig)]

    fig, axes = figure(10, 2.8, 3)
    styles = (
        ("candidate", "candidate (gate)", "o-"),
        ("published", "published (gate)", "s-"),
        ("train_valid", "new model (validation)", "D"),
        ("most_popular", "most popular", "x--"),
    )
    for ax, m in zip(axes[:2], ("ndcg@10", "recall@10")):
        for key, label, style in styles:
            ax.plot(x, series(f"{key}_{m}"), style, label=label)
        ax.set_title(m, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.set_xticks(x, labels)
    axes[0].legend(fontsize=7)
    axes[2].plot(x, series("index_recall@10"), "o-")
    axes[2].set_title("index recall@10 (vs exact)", fontsize=10)
    axes[2].set_ylim(0, 1.05)
    axes[2].set_xticks(x, labels)
    plots.append(svg(fig))

    header = [
        "dt",
        "active users",
        "new users",
        "users refreshed",
        "model published",
        "model step",
        "gate",
        "candidate ndcg@10",
        "published ndcg@10",
        "candidate recall@10",
        "published recall@10",
        "new model valid recall@10",
        "most popular recall@10",
        "index recall@10",
    ]
    body_rows = [
        [
            r["dt"],
            r["active_users"],
            r["new_users"],
            r["refreshed"],
            r["model"],
            r["action"],
            r["verdict"],
            r.get("candidate_ndcg@10"),
            r.get("published_ndcg@10"),
            r.get("candidate_recall@10"),
            r.get("published_recall@10"),
            r.get("train_valid_recall@10"),
            r.get("most_popular_recall@10"),
            r["index_recall@10"],
        ]
        for r in rows
    ]
    note = (
        '<p class="note">Gate metrics: the candidate fine-tuned on the day and the published model on the same '
        "held-out users of the day. A new model (bootstrap) is measured on its validation window instead.</p>"
    )
    return "".join(plots) + note + table(header, body_rows), {
        "days": len(rows),
        "plots": len(plots),
        "users_refreshed": {r["dt"]: r["refreshed"] for r in rows},
    }


# --------------------------------------------------------- 3: training loss
def section_loss(cfg: Config, day: dt.date, ledger: dict) -> tuple[str, dict]:
    """Loss (and validation metrics, when measured) per epoch of the model trained on D."""
    ft = result(ledger, "finetune")
    if ft is None:
        raise NotAvailable(f"the finetune step has no ledger entry for {day}")
    if "skipped" in ft:
        raise NotAvailable(f"no model was trained on {day}: {ft['skipped']}")
    version = ft.get("version")
    if not version:
        raise NotAvailable(f"no model was trained on {day}: {ft.get('reason') or 'the step trained nothing'}")
    man = manifest(cfg, version)
    if man is None:
        raise NotAvailable(f"the manifest of {version} is not in the registry ({cfg.models_root})")
    hist = man.get("history") or []
    if not hist:
        raise NotAvailable(f"{version} has no training history in its manifest")
    epochs = [h["epoch"] for h in hist]
    fig, (ax,) = figure(6, 2.8)
    ax.plot(epochs, [h["loss"] for h in hist], "o-", color="C0", label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_xticks(epochs)
    has_valid = any("valid_recall@10" in h for h in hist)
    if has_valid:
        ax2 = ax.twinx()
        ax2.plot(
            epochs,
            [h.get("valid_recall@10", float("nan")) for h in hist],
            "s--",
            color="C1",
            label="validation recall@10",
        )
        ax2.set_ylabel("validation recall@10")
        fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    ax.set_title(f"{version} ({man.get('kind')})", fontsize=10)
    note = "" if ft.get("trained", True) else " (a rerun: the day's candidate trained earlier)"
    if ft.get("action") == "bootstrap" and ft.get("published") is True:
        note = ", published as the first model"
    intro = (
        f"<p>Model <code>{esc(version)}</code>, {esc(man.get('kind'))} on {esc(man.get('dt'))}, parent "
        f"<code>{esc(man.get('parent') or 'none')}</code>, status <b>{esc(man.get('status'))}</b>{esc(note)}."
        "</p>"
    )
    rows = [
        [h["epoch"], h["loss"], h.get("valid_ndcg@10"), h.get("valid_recall@10"), h.get("epoch_seconds")] for h in hist
    ]
    body = intro + svg(fig) + table(["epoch", "loss", "valid ndcg@10", "valid recall@10", "seconds"], rows, {4: 2})
    return body, {"version": version, "epochs": len(hist), "final_loss": hist[-1]["loss"], "plots": 1}


# ------------------------------------------------------ 4: score distributions
def section_scores(cfg: Config, day: dt.date, ledger: dict) -> tuple[str, dict]:
    """Histogram of the top-1 preference score per task, over the users refreshed on D."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    pub = publish_of(ledger, day)
    if not pub.get("users"):
        raise NotAvailable(f"no user was refreshed on {day}: nothing new to score")
    t = "user_preference_scores"
    version = pub["tables"][t]
    data = _at_version(cfg, t, version).to_table(
        columns=["task", "labels", "scores"], filter=pds.field("as_of") == pa.scalar(day, pa.date32())
    )
    if not data.num_rows:
        raise NotAvailable(f"{t} version {version} holds no row as of {day}")
    tasks = sorted(set(data["task"].cast(pa.string()).to_pylist()))
    fig, axes = figure(min(3.2 * len(tasks), 11), 2.4, len(tasks))
    rows, facts = [], {}
    task_col = data["task"].cast(pa.string())
    for ax, task in zip(axes, tasks):
        part = data.filter(pc.equal(task_col, task))
        top1 = pc.list_element(part["scores"], 0).to_numpy(zero_copy_only=False).astype(float)
        labels = pc.list_element(part["labels"], 0).cast(pa.string()).to_pylist()
        ax.hist(top1, bins=20, color="C2")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("top-1 score", fontsize=8)
        common = max(set(labels), key=labels.count)
        p10, p50, p90 = np.percentile(top1, [10, 50, 90])
        rows.append(
            [
                task,
                len(top1),
                float(top1.mean()),
                float(p10),
                float(p50),
                float(p90),
                common,
                labels.count(common) / len(labels),
            ]
        )
        facts[task] = {"users": len(top1), "mean": float(top1.mean())}
    axes[0].set_ylabel("users")
    body = (
        f"<p>{pub['users']:,} users refreshed on {esc(day)}, model <code>{esc(pub['model_version'])}</code>; "
        f"{esc(t)} version {version}.</p>"
        + svg(fig)
        + table(["task", "users", "mean top-1", "p10", "median", "p90", "most common top-1 label", "its share"], rows)
    )
    return body, {"tasks": facts, "plots": 1}


def _at_version(cfg: Config, table_name: str, version: int):
    """A table at a version, opened for reads (`delta.Snapshot`); NotAvailable when that version can no longer be
    read."""
    path = cfg.table_path(table_name)
    if not delta.exists(path):
        raise NotAvailable(f"no {table_name} table at {path}")
    try:
        delta.open_table(path, version)
    except Exception as exc:  # delta-rs raises several kinds for a version whose log is gone
        raise NotAvailable(f"{table_name} version {version} cannot be read ({exc})") from None
    if delta.missing_files(path, version):
        raise NotAvailable(f"{table_name} version {version} has been vacuumed (storage.retention_days)")
    return delta.Snapshot(path, version)  # the user tables carry deletion vectors


# ----------------------------------------------------------- 5: drift
def previous_publish(cfg: Config, table_name: str, day: dt.date) -> dict | None:
    """The last publish commit of `table_name` for a drop before `day` (Delta history, commit metadata dt)."""
    commits = [h for h in infer.publish_commits(cfg, table_name) if h.get("dt") and h["dt"] < str(day)]
    return commits[-1] if commits else None


def vectors(ds, key: str, keep=None) -> tuple[list, "np.ndarray", set]:
    """(keys, vectors as rows, model versions) of a `delta.Snapshot`, only keys in `keep` when given (read in
    batches)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    keys, vecs, models = [], [], set()
    for b in ds.scan(columns=[key, "embedding", "model_version"]):
        k = b.column(key)
        if pa.types.is_string_view(k.type) or pa.types.is_large_string(k.type):
            k = k.cast(pa.string())  # delta-rs MERGE writes string_view, which is_in cannot take
        if keep is not None:
            mask = pc.is_in(k, value_set=keep)
            b, k = b.filter(mask), k.filter(mask)
        if not b.num_rows:
            continue
        emb = b.column("embedding")
        d = len(emb[0])
        vecs.append(pc.list_flatten(emb).to_numpy(zero_copy_only=False).reshape(-1, d))
        keys += k.to_pylist()
        models |= set(b.column("model_version").cast(pa.string()).to_pylist())
    return keys, (np.concatenate(vecs) if vecs else np.zeros((0, 0), np.float32)), models


def cosines(old_keys, old, new_keys, new) -> tuple[list, "np.ndarray"]:
    """Keys in both, with the cosine between their old and new vector."""
    import numpy as np

    at = {k: i for i, k in enumerate(old_keys)}
    both = [(k, at[k], j) for j, k in enumerate(new_keys) if k in at]
    if not both:
        return [], np.zeros(0)
    a = old[[i for _, i, _ in both]].astype(np.float64)
    b = new[[j for _, _, j in both]].astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return [k for k, _, _ in both], cos


def drift(cfg: Config, day: dt.date, pub: dict, table_name: str) -> dict:
    """Cosine between each row's vector at the previous day's publish and at D's (users: those refreshed on D)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.dataset as pds

    key = "user_id" if table_name == "user_embeddings" else "item_id"
    prev = previous_publish(cfg, table_name, day)
    if prev is None:
        raise NotAvailable(f"no publish of {table_name} before {day}: nothing to compare with")
    commit = (pub.get("commits") or {}).get(table_name) or {}
    now_v = pub["tables"][table_name]
    if not commit.get("committed", True) or now_v == prev["version"]:
        raise NotAvailable(f"{table_name} was not changed on {day}: {commit.get('reason') or 'no new commit'}")
    new_ds = _at_version(cfg, table_name, now_v)
    old_ds = _at_version(cfg, table_name, prev["version"])
    if table_name == "user_embeddings":
        # Only users refreshed on D: the others keep their vector (cosine 1) and would hide the drift.
        ids = new_ds.to_table(columns=[key], filter=pds.field("as_of") == pa.scalar(day, pa.date32()))[key]
        ids = sorted(ids.cast(pa.string()).to_pylist())[:MAX_DRIFT_ROWS]
        keep = pa.array(ids, pa.string())
    else:
        keep = None
    new_keys, new, new_models = vectors(new_ds, key, keep)
    old_keys, old, old_models = vectors(old_ds, key, keep)
    if not new_keys or not old_keys:
        raise NotAvailable(f"no {key} of {table_name} version {now_v} is in version {prev['version']}")
    if old.shape[1] != new.shape[1]:
        raise NotAvailable(
            f"the vectors changed size ({old.shape[1]} -> {new.shape[1]}): a different model, not comparable"
        )
    keys, cos = cosines(old_keys, old, new_keys, new)
    if not len(cos):
        raise NotAvailable(f"no {key} is in both version {prev['version']} and {now_v} of {table_name}")
    p = np.percentile(cos, [5, 25, 50, 75, 95])
    order = np.argsort(cos, kind="stable")
    return {
        "table": table_name,
        "key": key,
        "rows": len(cos),
        "new_rows": len(new_keys),
        "from": {
            "version": prev["version"],
            "dt": prev.get("dt"),
            "model_version": prev.get("model_version"),
            "models": sorted(old_models),
        },
        "to": {
            "version": now_v,
            "dt": str(day),
            "model_version": pub.get("model_version"),
            "models": sorted(new_models),
        },
        "model_changed": old_models != new_models,
        "mean": float(cos.mean()),
        "min": float(cos.min()),
        "p5": float(p[0]),
        "p25": float(p[1]),
        "p50": float(p[2]),
        "p75": float(p[3]),
        "p95": float(p[4]),
        "lowest": [(keys[i], float(cos[i])) for i in order[:5]],
        "cosines": cos,
    }


def section_drift(cfg: Config, day: dt.date, ledger: dict) -> tuple[str, dict]:
    """User and item embedding drift between the previous publish and D's: summary, histogram, most moved."""
    import numpy as np

    pub = publish_of(ledger, day)
    parts, results, facts = [], [], {}
    for t in ("user_embeddings", "item_embeddings"):
        try:
            results.append(drift(cfg, day, pub, t))
        except NotAvailable as exc:
            parts.append(f"<h3>{esc(t)}</h3>" + na(str(exc)))
            facts[t] = {"not_available": str(exc)}
    if results:
        fig, axes = figure(4.5 * len(results), 2.6, len(results))
        for ax, r in zip(axes, results):
            # Rounded: the cosines of unchanged vectors differ by rounding noise (~1e-16), fewer than 30 bins
            ax.hist(np.round(np.asarray(r["cosines"], dtype=np.float64), 6), bins=30, color="C4")
            ax.set_title(f"{r['table']}: cosine old vs new", fontsize=10)
            ax.set_xlabel("cosine", fontsize=8)
            ax.ticklabel_format(axis="x", useOffset=False)
        parts.insert(0, svg(fig))
    for r in results:
        frm, to = r["from"], r["to"]
        if r["model_changed"]:
            change = (
                f'<p class="note">The model changed ({esc(", ".join(frm["models"]))} &rarr; '
                f"{esc(', '.join(to['models']))}): drift is expected, the vectors come from a different "
                "model and are not comparable across versions.</p>"
            )
        else:
            change = f'<p class="note">Same model ({esc(", ".join(to["models"]))}) before and after.</p>'
        who = (
            "users refreshed on this day that were published before"
            if r["key"] == "user_id"
            else "items in both catalogues"
        )
        parts.append(
            f"<h3>{esc(r['table'])}</h3><p>Version {frm['version']} (publish of {esc(frm['dt'])}) vs version "
            f"{to['version']} (publish of {esc(to['dt'])}): {r['rows']:,} {who} (of {r['new_rows']:,}).</p>"
            + change
            + table(
                ["rows", "mean", "min", "p5", "p25", "median", "p75", "p95"],
                [[r["rows"], r["mean"], r["min"], r["p5"], r["p25"], r["p50"], r["p75"], r["p95"]]],
            )
            + f"<p>Moved most ({esc(r['key'])}, cosine):</p>"
            + table([r["key"], "cosine"], [[k, c] for k, c in r["lowest"]])
        )
        facts[r["table"]] = {k: r[k] for k in ("rows", "mean", "p50", "model_changed")}
    if not results:
        raise NotAvailable("; ".join(v["not_available"] for v in facts.values()))
    facts["plots"] = 1
    return "".join(parts), facts


# ------------------------------------------------------ 6: where things are
def section_where(cfg: Config, day: dt.date, ledger: dict) -> tuple[str, dict]:
    """Table paths and versions (now, and as published on D), the model and index versions, the folders."""
    pub = result(ledger, "publish") or {}
    on_day = pub.get("tables") or {}
    rows = []
    for t in ("events", "user_sequences", *OUTPUTS, "user_candidates"):
        path = cfg.table_path(t)
        rows.append([t, Raw(f"<code>{esc(path)}</code>"), delta.version_of(path), on_day.get(t)])
    body = table(["table", "path", "version now", "version published on this day"], rows)
    ptr = registry.published(cfg)
    cur = index.current(cfg)
    idx = result(ledger, "index") or {}
    things = [
        ["model of this day's publish", pub.get("model_version") or "none"],
        ["model published now", ptr["version"] if ptr else "none"],
        ["index built on this day", idx.get("version") or idx.get("skipped") or "none"],
        ["index CURRENT now", cur["version"] if cur else "none"],
        ["ledger", Raw(f"<code>{esc(ledger_dir(cfg, day))}</code>")],
        ["check reports", Raw(f"<code>{esc(cfg.reports_root / 'checks')}</code>")],
        ["model registry", Raw(f"<code>{esc(cfg.models_root)}</code>")],
        ["index", Raw(f"<code>{esc(cfg.index_root)}</code>")],
    ]
    body += table(["what", "where / which"], things)
    return body, {
        "model_version": pub.get("model_version"),
        "published_now": ptr["version"] if ptr else None,
        "index_version": idx.get("version"),
        "index_current": cur["version"] if cur else None,
    }


# ---------------------------------------------------------------- the page
SECTIONS = [
    ("steps", "The day's steps and checks", lambda cfg, day, led: section_steps(cfg, day, led)),
    ("metrics", "Metrics over days", lambda cfg, day, led: section_metrics(cfg, day)),
    ("loss", "Training loss of the day's model", section_loss),
    ("scores", "Preference score distributions", section_scores),
    ("drift", "Embedding drift since the previous publish", section_drift),
    ("where", "Where things are", section_where),
]


def render(cfg: Config, day: dt.date, ledger: dict) -> tuple[str, list[dict], dict]:
    """(page HTML, sections [{"id", "title", "available", "why"?}], facts per section) of drop `day`."""
    parts, sections, facts = [], [], {}
    for i, (sid, title, build) in enumerate(SECTIONS, 1):
        try:
            body, f = build(cfg, day, ledger)
            sections.append({"id": sid, "title": title, "available": True})
            facts[sid] = f
        except NotAvailable as exc:
            body = na(str(exc))
            sections.append({"id": sid, "title": title, "available": False, "why": str(exc)})
        parts.append(f'<section id="{sid}"><h2>{i}. {esc(title)}</h2>\n{body}\n</section>')
    nav = " &middot; ".join(f'<a href="#{s["id"]}">{esc(s["title"])}</a>' for s in sections)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    page = (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>userformer daily report dt={esc(day)}</title><style>{CSS}</style></head><body>\n"
        f"<h1>userformer daily report: drop {esc(day)}</h1>\n"
        f'<p class="note">Generated {esc(now)} from {esc(cfg.home)}. '
        f'<a href="../index.html">All days</a></p>\n<nav>{nav}</nav>\n' + "\n".join(parts) + "\n</body></html>\n"
    )
    return page, sections, facts


def render_index(cfg: Config) -> str:
    """The list of every day's report, newest first, with the day's users refreshed and model."""
    rows = []
    root = daily_root(cfg)
    days = (
        sorted(
            (m.group(1) for p in root.iterdir() if (m := _DAY_DIR.match(p.name)) and (p / "index.html").is_file()),
            reverse=True,
        )
        if root.is_dir()
        else []
    )
    for d in days:
        led = read_ledger(cfg, dt.date.fromisoformat(d))
        pub = result(led, "publish") or {}
        failed = [s for s, e in led.items() if step_status(e["result"])[0] == "failed"]
        rows.append(
            [
                Raw(f'<a href="dt={esc(d)}/index.html">{esc(d)}</a>'),
                pub.get("users") if "skipped" not in pub else None,
                pub.get("model_version") or pub.get("skipped") or "",
                ", ".join(failed),
            ]
        )
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>userformer daily reports</title>'
        f"<style>{CSS}</style></head><body>\n<h1>userformer daily reports</h1>\n"
        + table(["drop", "users refreshed", "model", "failed steps"], rows)
        + "\n</body></html>\n"
    )


def report(cfg: Config, day: dt.date) -> dict:
    """Write the daily report of drop `day` (module doc) and the list of days; returns the path and a summary."""
    ledger = read_ledger(cfg, day)
    if not ledger:
        raise UserError(
            f"no ledger for drop {day} under {ledger_dir(cfg, day)}: run the day first "
            f"(`userformer run-day --dt {day}`)"
        )
    page, sections, facts = render(cfg, day, ledger)
    path = report_path(cfg, day)
    files.replace_atomically(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    index_page = daily_root(cfg) / "index.html"
    text = render_index(cfg)
    files.replace_atomically(index_page, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    log.info("report dt=%s: %s", day, path)
    metrics = facts.get("metrics", {})
    return {
        "html": str(path),
        "index": str(index_page),
        "sections": sections,
        "plots": page.count("<svg"),
        "users_refreshed": metrics.get("users_refreshed", {}).get(str(day)),
        "model_version": facts.get("where", {}).get("model_version"),
        "drift_mean": {
            t: f.get("mean") for t, f in facts.get("drift", {}).items() if isinstance(f, dict) and "mean" in f
        },
    }


# -------------------------------------------------------------------- CLI
def register(sub) -> None:
    p = sub.add_parser(
        "report",
        help="the daily HTML report of drop D: steps, checks, metrics over days, loss, scores, embedding drift",
        description="Write reports/daily/dt=D/index.html (self-contained, plots as SVG) from the "
        "day's ledger, the registry and the published tables, and reports/daily/"
        "index.html listing every day. See jobs/steps/report.py.",
    )
    p.add_argument("--dt", type=date_arg, required=True, help="drop date YYYY-MM-DD")
    p.set_defaults(func=run)


def run(args, cfg: Config) -> int:
    print(report(cfg, args.dt)["html"])
    return 0
