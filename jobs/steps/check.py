"""`userformer check TABLE --dt D`: the data-quality gate of one drop date, with Great Expectations.

The suites (what good data means) live in jobs/steps/quality/suites.py; this step
opens the warehouse for them (jobs/steps/quality/source.py), lets GE evaluate the expectations on pandas
(frame by frame for a `Stream`: batches of at most ``quality.batch_rows`` rows, or hash partitions of an id,
their results combined into one per expectation; jobs/steps/quality/streams.py), writes
``reports/checks/<table>/dt=D.html`` and ``.json``, and exits 1 when any
expectation fails so that the pipeline stops before bad data spreads. The item
index has a suite too (``check index``: the CURRENT index; `userformer index`
runs it on each version it builds, before making it current).
"""

from __future__ import annotations

import datetime
import functools
import html
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from userformer.jobs.core.config import Config
from userformer.jobs.core.dates import date_arg
from userformer.jobs.core.errors import GateFailed, UserError
from userformer.jobs.steps.quality.source import Warehouse
from userformer.jobs.steps.quality.suites import SUITES, Batch, MissingData, Outcome, Plan, Stream

log = logging.getLogger(__name__)


@dataclass
class ExpectationResult:
    expectation: str  # GE expectation type, e.g. expect_column_values_to_not_be_null
    kwargs: dict  # its parameters: column, value_set, min_value, ...
    success: bool
    unexpected_count: int | None = None
    element_count: int | None = None
    unexpected_percent: float | None = None
    examples: list = field(default_factory=list)  # a few unexpected values as JSON values (or ids of failing rows)
    description: str = ""
    note: str = ""  # why it was skipped, or the error GE hit
    skipped: bool = False
    scope: str = ""  # what it ran on: rows (of the day), users, metrics (one row of day-level numbers), schema

    @property
    def column(self) -> str | None:
        kw = self.kwargs
        if "column" in kw:
            return kw["column"]
        if "column_A" in kw:
            return f"{kw['column_A']}, {kw['column_B']}"
        return None


@dataclass
class CheckResult:
    table: str
    dt: datetime.date
    success: bool
    results: list[ExpectationResult] = field(default_factory=list)
    error: str | None = None  # the table or the day is missing: nothing could be checked
    facts: dict = field(default_factory=dict)
    seconds: float = 0.0
    html_path: Path | None = None
    json_path: Path | None = None

    @property
    def failed(self) -> list[ExpectationResult]:
        return [r for r in self.results if not r.success]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["results"] = [{**asdict(r), "column": r.column} for r in self.results]
        return _jsonable(d)


# ----------------------------------------------------------------------- GE
@functools.cache
def _gx():
    """One ephemeral GE context and pandas data source per process (building them costs; they hold no data)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )
    from great_expectations.execution_engine import pandas_execution_engine

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    # GE labels each pandas batch with an md5 of a hash of every value (only below this size); the gates label
    # their frames themselves, and on a day's events that fingerprint took a third of the gate's time.
    pandas_execution_engine.HASH_THRESHOLD = 0
    ctx = gx.get_context(
        mode="ephemeral",
        project_config=DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
        ),
    )
    return ctx, ctx.data_sources.add_pandas("userformer")


@functools.cache
def _batch_definition(asset: str):
    _, source = _gx()
    return source.add_dataframe_asset(name=asset).add_batch_definition_whole_dataframe("whole")


def _wide(frame):
    """The frame with narrow integer and float columns widened to 64 bits: GE's pandas range check is vectorised
    only for int64 and float64 columns and calls a Python function per value for int32 (the vocabulary ids)."""
    import numpy as np

    narrow = {
        c: "float64" if t.kind == "f" else "int64"
        for c, t in frame.dtypes.items()
        if isinstance(t, np.dtype) and t.kind in "iuf" and t.itemsize < 8  # pandas' nullable types are left as they are
    }
    # copy(): one block per type again, or GE's every row filter merges the blocks anew
    return frame.astype(narrow).copy() if narrow else frame


def _validate(table: str, batch: Batch, examples: int) -> list[ExpectationResult]:
    return [r for r, _, _ in _results(table, batch, examples)]


def _results(
    table: str, batch: Batch, examples: int, position: str | None = None
) -> list[tuple[ExpectationResult, int | None, list | None]]:
    """GE's result of each expectation on the batch's frame, with its missing count (None: GE gave none) and,
    with a `position` column, the position of each example's row (else None)."""
    import great_expectations as gx

    if not batch.expectations:
        return []
    for i, e in enumerate(batch.expectations):
        e.meta = {**(e.meta or {}), "_i": i}  # GE does not promise to keep the suite's order
    suite = gx.ExpectationSuite(name=f"{table}.{batch.name}", expectations=batch.expectations)
    fmt: dict = {"result_format": "BASIC", "partial_unexpected_count": examples}
    index = [c for c in dict.fromkeys((batch.id_column, position)) if c]
    if index:
        fmt.update(result_format="SUMMARY", unexpected_index_column_names=index)
    gx_batch = _batch_definition(f"{table}.{batch.name}").get_batch(batch_parameters={"dataframe": _wide(batch.frame)})
    res = gx_batch.validate(suite, result_format=fmt)
    out = []
    for r in sorted(res.results, key=lambda r: r.expectation_config.meta["_i"]):
        cfg_ = r.expectation_config
        got = r.result or {}
        values = got.get("partial_unexpected_list") or []
        rows = got.get("partial_unexpected_index_list") or []
        if (cfg_.meta or {}).get("examples") == "ids" and batch.id_column:
            values = [row.get(batch.id_column) for row in rows]
        # GE lists the unexpected values and their rows in the same (frame) order.
        at = [int(row[position]) for row in rows][: len(values)] if position else None
        kwargs = {k: v for k, v in cfg_.kwargs.items() if k != "batch_id"}
        if isinstance(kwargs.get("row_condition"), dict):
            kwargs["row_condition"] = _condition_text(kwargs["row_condition"])
        result = ExpectationResult(
            expectation=cfg_.type,
            kwargs=kwargs,
            success=bool(r.success),
            unexpected_count=got.get("unexpected_count"),
            element_count=got.get("element_count"),
            unexpected_percent=got.get("unexpected_percent"),
            examples=_jsonable(values[:examples]),
            description=cfg_.description or "",
            note=_exception_text(r.exception_info),
            scope=batch.name,
        )
        out.append((result, got.get("missing_count"), at))
    return out


def _validate_stream(table: str, stream: Stream, examples: int) -> list[ExpectationResult]:
    """Each frame of the stream validated with the same suite, the results combined into one per expectation:
    what one frame of all the rows would give (counts summed, the first `examples` examples in frame order).
    Only one frame's results are held at a time."""
    total: list[tuple[ExpectationResult, int | None, list | None]] | None = None
    for frame in stream.frames:
        batch = Batch(stream.name, frame, stream.expectations, stream.id_column)
        got = _results(table, batch, examples, stream.position)
        total = got if total is None else [_combine(a, b, examples) for a, b in zip(total, got)]
    out = []
    for r, missing, _ in total or []:
        nonnull = None if r.element_count is None else r.element_count - (missing or 0)
        if r.unexpected_count is None or not r.element_count:
            r.unexpected_percent = None
        else:  # as GE: of the non-missing values where it counts them, else of all
            r.unexpected_percent = 100.0 * r.unexpected_count / nonnull if nonnull else None
        mostly = r.kwargs.get("mostly")
        if mostly is not None and not r.note and r.unexpected_count is not None:
            r.success = nonnull == 0 or (1 - r.unexpected_count / nonnull) >= mostly
        out.append(r)
    return out


def _combine(a: tuple, b: tuple, examples: int) -> tuple:
    """The results of one expectation on two frames of a stream as one: (result, missing count, positions of
    the examples). Examples with positions are the first `examples` by position (each frame gave its first
    ones, so these are the first of all rows); without, frames are runs of rows in order: a's, then b's."""
    (ra, ma, pa_), (rb, mb, pb) = a, b

    def plus(x, y):
        return None if x is None and y is None else (x or 0) + (y or 0)

    notes = [n for n in dict.fromkeys((ra.note, rb.note)) if n]
    ra.success = ra.success and rb.success
    ra.unexpected_count = plus(ra.unexpected_count, rb.unexpected_count)
    ra.element_count = plus(ra.element_count, rb.element_count)
    at = None
    if pa_ is not None and pb is not None:
        merged = sorted(zip(pa_ + pb, ra.examples + rb.examples), key=lambda x: x[0])[:examples]
        at, ra.examples = [p for p, _ in merged], [x for _, x in merged]
    else:
        ra.examples = (ra.examples + rb.examples)[:examples]
    ra.note = "; ".join(notes)
    return ra, plus(ma, mb), at


def _condition_text(c: dict) -> str:
    if c.get("type") == "comparison":
        return f"{c['column']['name']} {c['operator']} {c['parameter']}"
    return str(c)


def _exception_text(info) -> str:
    """GE reports an expectation it could not evaluate as failed with exception_info (flat or per metric)."""
    if not info:
        return ""
    infos = [info] if "raised_exception" in info else list(info.values())
    msgs = [i.get("exception_message") or "" for i in infos if isinstance(i, dict) and i.get("raised_exception")]
    return "; ".join(m for m in msgs if m)


def _outcome(o: Outcome, examples: int) -> ExpectationResult:
    pct = None
    if o.unexpected_count is not None and o.element_count:
        pct = 100.0 * o.unexpected_count / o.element_count
    return ExpectationResult(
        expectation=o.expectation,
        kwargs=o.kwargs,
        success=o.success,
        unexpected_count=o.unexpected_count,
        element_count=o.element_count,
        unexpected_percent=pct,
        examples=_jsonable(o.examples[:examples]),
        description=o.description,
        note=o.note,
        skipped=o.skipped,
        scope=o.scope,
    )


def evaluate(plan: Plan, examples: int) -> list[ExpectationResult]:
    out = []
    for item in plan.items:
        if isinstance(item, Stream):
            out += _validate_stream(plan.table, item, examples)
        elif isinstance(item, Batch):
            out += _validate(plan.table, item, examples)
        else:
            out.append(_outcome(item, examples))
    return out


# --------------------------------------------------------------------- step
def check(
    cfg: Config, table: str, day: datetime.date, options: dict | None = None, source: Warehouse | None = None
) -> CheckResult:
    """Run the suite of `table` for drop date `dt`; write the HTML and JSON reports; never raises on bad data.
    `options` go to the suite builder (outputs: shards; index: version, instead of the CURRENT one). `source` is
    what it reads: the warehouse as it is (default), or a writer's staged rows (`quality.source.Staged`)."""
    if table not in SUITES:
        raise UserError(f"no quality suite for table {table!r}; known: {', '.join(SUITES)}")
    t0 = time.perf_counter()
    try:
        plan = SUITES[table](cfg, day, source or Warehouse(cfg), **(options or {}))
        res = CheckResult(table, day, success=False, results=evaluate(plan, cfg.quality.examples), facts=plan.facts)
        res.success = not res.failed
    except MissingData as exc:
        res = CheckResult(table, day, success=False, error=str(exc))
    res.seconds = round(time.perf_counter() - t0, 3)
    out = cfg.reports_root / "checks" / table
    out.mkdir(parents=True, exist_ok=True)
    res.html_path, res.json_path = out / f"dt={day}.html", out / f"dt={day}.json"
    res.json_path.write_text(json.dumps(res.to_dict(), indent=2) + "\n")
    res.html_path.write_text(render_html(res))
    log.info("check %s dt=%s: %s in %.2fs", table, day, "passed" if res.success else "FAILED", res.seconds)
    return res


# Facts of a check's result that its ledger entry keeps (the daily report and the demo show them).
_LEDGER_FACTS = {"index": ("version", "model_version", "items", "recall_at_10")}


def ledger_entry(res: CheckResult) -> dict:
    """What the day's ledger keeps of a check (``check_<table>``): pass/fail, what failed, its reports."""
    return {
        "table": res.table,
        "success": res.success,
        "expectations": len(res.results),
        "failed": [r.expectation for r in res.failed],
        "html": str(res.html_path),
        "json": str(res.json_path),
        "seconds": res.seconds,
        **{k: res.facts.get(k) for k in _LEDGER_FACTS.get(res.table, ())},
    }


def gate_failed(res: CheckResult) -> GateFailed:
    """The error of a failed gate: what failed, where its report is, the summary; `.check` is its ledger entry."""
    return GateFailed(
        f"{res.table} check failed for {res.dt}: {', '.join(r.expectation for r in res.failed) or res.error} "
        f"(report: {res.html_path})\n{summary(res)}",
        check=ledger_entry(res),
    )


def gate(cfg: Config, table: str, day: datetime.date, source: Warehouse) -> dict:
    """The gate of what a writer is about to commit (`source`: the warehouse with its staged rows): its ledger
    entry when it passes; `GateFailed` when it fails, before anything is committed."""
    res = check(cfg, table, day, source=source)
    if not res.success:
        raise gate_failed(res)
    return ledger_entry(res)


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_jsonable(x) for x in v]
    if isinstance(v, datetime.date):  # also pandas.Timestamp
        return v.isoformat()
    if isinstance(v, Path):
        return str(v)
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):  # numpy scalars
        try:
            v = v.item()
        except (TypeError, ValueError):
            return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    try:  # pandas NaT / NA
        import pandas as pd

        if pd.isna(v):
            return None
    except (TypeError, ValueError):
        pass
    return str(v)


def _fmt(v) -> str:
    v = _jsonable(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return "null" if v is None else str(v)


def _params(r: ExpectationResult) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in r.kwargs.items() if k not in ("column", "column_A", "column_B"))


def _counts(r: ExpectationResult) -> str:
    if r.unexpected_count is None:
        return ""
    pct = f" ({r.unexpected_percent:.3g}%)" if r.unexpected_percent is not None else ""
    return f"{r.unexpected_count} of {r.element_count}{pct}"


def summary(res: CheckResult) -> str:
    """What a person at a terminal needs: pass/fail, and for each failure what, where, how many, examples."""
    head = f"check {res.table} dt={res.dt}: "
    if res.error:
        lines = [head + f"FAILED: {res.error}"]
    elif res.success:
        skipped = sum(r.skipped for r in res.results)
        lines = [
            head
            + f"passed ({len(res.results)} expectations"
            + (f", {skipped} skipped" if skipped else "")
            + f", {res.seconds:.1f}s)"
        ]
    else:
        lines = [head + f"FAILED ({len(res.failed)} of {len(res.results)} expectations, {res.seconds:.1f}s)"]
        for r in res.failed:
            where = f" on {r.column}" if r.column else ""
            params = _params(r)
            lines.append(f"  FAIL {r.expectation}{where}" + (f" [{params}]" if params else ""))
            if r.description:
                lines.append(f"       {r.description}")
            if r.scope == "metrics" and r.examples:
                lines.append(f"       value: {_fmt(r.examples[0])}")
            else:
                if r.unexpected_count is not None:
                    lines.append(f"       {_counts(r)} {'columns' if r.scope == 'schema' else 'rows'} unexpected")
                if r.examples:
                    lines.append(f"       examples: {', '.join(_fmt(x) for x in r.examples)}")
            if r.note:
                lines.append(f"       {r.note}")
    lines.append(f"report: {res.html_path}")
    return "\n".join(lines)


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
.banner{padding:.8em 1em;border-radius:6px;font-size:1.3em;font-weight:600;color:#fff}
.pass{background:#2e7d32}.fail{background:#c62828}
table{border-collapse:collapse;margin-top:1em;width:100%}
th,td{border:1px solid #ddd;padding:.35em .6em;text-align:left;vertical-align:top}
th{background:#f5f5f5}tr.failed td{background:#fdecea}tr.skipped td{color:#777}
code{font-size:12px}.desc{color:#555;font-size:12px}
"""


def render_html(res: CheckResult) -> str:
    """A self-contained page: what was checked, pass/fail, one row per expectation with counts and examples."""
    e = html.escape
    state = "PASSED" if res.success else "FAILED"
    rows = []
    for r in sorted(res.results, key=lambda r: r.success):  # failures first, otherwise suite order
        status = "skipped" if r.skipped else ("ok" if r.success else "FAILED")
        cls = "skipped" if r.skipped else ("" if r.success else "failed")
        notes = " ".join(x for x in (r.description, r.note) if x)
        rows.append(
            f'<tr class="{cls}"><td>{status}</td>'
            f'<td><code>{e(r.expectation)}</code><div class="desc">{e(notes)}</div></td>'
            f"<td>{e(r.scope)}</td><td>{e(r.column or '')}</td>"
            f"<td><code>{e(_params(r))}</code></td><td>{e(_counts(r))}</td>"
            f"<td><code>{e(', '.join(_fmt(x) for x in r.examples))}</code></td></tr>"
        )
    facts = "".join(
        f"<tr><th>{e(str(k))}</th><td><code>{e(json.dumps(_jsonable(v)))}</code></td></tr>"
        for k, v in res.facts.items()
    )
    banner = e(res.error) if res.error else f"{len(res.failed)} of {len(res.results)} expectations failed"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>check {e(res.table)} dt={res.dt}: {state}</title>
<style>{_CSS}</style></head><body>
<h1>Data-quality check: {e(res.table)}, dt={res.dt}</h1>
<div class="banner {"pass" if res.success else "fail"}">{state}: {banner}</div>
<p>Checked {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S} UTC in {res.seconds:.2f}s.</p>
{f"<table><caption>Facts</caption>{facts}</table>" if facts else ""}
<table><tr><th>status</th><th>expectation</th><th>on</th><th>column</th><th>parameters</th><th>unexpected</th><th>examples</th></tr>
{"".join(rows)}
</table></body></html>
"""


# ---------------------------------------------------------------------- CLI
def register(sub) -> None:
    p = sub.add_parser(
        "check",
        help="data-quality gate of one drop date (Great Expectations); exit 1 when it fails",
        description="Validate a table for drop date D, write reports/checks/TABLE/dt=D.html and .json, "
        "and exit 1 when any expectation fails.",
    )
    p.add_argument(
        "table",
        metavar="TABLE",
        choices=sorted(SUITES),
        help=f"table to check: {', '.join(sorted(SUITES))} (events: partition dt=D; "
        "user_sequences: the rows refreshed on D; outputs: the staged `userformer infer` "
        "output of D, before `publish`; index: the CURRENT item index against item_embeddings)",
    )
    p.add_argument("--dt", type=date_arg, required=True, help="drop date to check, YYYY-MM-DD")
    p.add_argument("--shards", type=int, help="outputs only: shards to expect (default: infer.shards)")
    p.set_defaults(func=run)


def run(args, cfg: Config) -> int:
    if args.shards is not None and args.table != "outputs":
        raise UserError("--shards applies to `check outputs` only")
    if args.shards is not None and args.shards < 1:
        raise UserError(f"--shards must be >= 1, got {args.shards}")
    res = check(cfg, args.table, args.dt, {"shards": args.shards} if args.shards else None)
    print(summary(res))
    return 0 if res.success else 1
