"""The daily report (jobs/steps/report.py) on a real 4-day warehouse built by the pipeline itself.

generate -> pipeline.run_day for D1 (no model yet: the model steps are skipped), D2 (the first model is
trained and published), D3 (fine-tune + gate), then D4, an empty drop that the events check stops. The
report of each day is checked against the ledger, the registry and the Delta tables read here directly.
"""

from __future__ import annotations

import datetime as dt
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.integration.test_train import TINY
from userformer.jobs.cli import main
from userformer.jobs.core import ledger, registry
from userformer.jobs.core.config import load_config
from userformer.jobs.core.errors import GateFailed
from userformer.jobs.core.storage import delta
from userformer.jobs.flows import pipeline
from userformer.jobs.steps import report
from userformer.jobs.tools import generate
from userformer.schemas.tables import RAW_EVENTS

pytestmark = [pytest.mark.spark, pytest.mark.slow]

START = dt.date(2026, 11, 1)
D1, D2, D3, D4 = (START + dt.timedelta(days=i) for i in range(4))
PLOTTED = ("metrics", "loss", "scores", "drift")


@pytest.fixture(scope="module")
def built(tmp_path_factory, spark):
    """(cfg, run_day results of D1..D3) of a warehouse whose D4 stopped at the events check."""
    home = tmp_path_factory.mktemp("report")
    settings = {**TINY, "TRAIN__NUM_THREADS": "1", "PIPELINE__BOOTSTRAP_EPOCHS": "2"}
    cfg = load_config(env={"USERFORMER_HOME": str(home), **{f"USERFORMER__{k}": v for k, v in settings.items()}})
    generate.generate(cfg, users=300, items=400, days=3, start=START, seed=3)
    results = {day: pipeline.run_day(cfg, day) for day in (D1, D2, D3)}
    d = cfg.raw_events_dir(D4)  # a drop marked complete but without events
    d.mkdir(parents=True)
    pq.write_table(RAW_EVENTS.empty_table(), d / "part-0.parquet")
    (d / cfg.pipeline.ready_marker).touch()
    with pytest.raises(GateFailed, match="events check failed"):
        pipeline.run_day(cfg, D4)
    return cfg, results


def sections(page: str) -> dict[str, str]:
    """Section id -> its HTML."""
    return dict(re.findall(r'<section id="(\w+)">(.*?)</section>', page, flags=re.S))


def text(fragment: str) -> str:
    """Visible text of an HTML fragment, cells separated by single spaces (SVG left out)."""
    import html

    fragment = re.sub(r"<svg.*?</svg>", " ", fragment, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", fragment)))


def test_every_day_of_the_run_has_its_report(built):
    cfg, results = built
    for day, res in results.items():
        assert res["report"]["html"] == str(report.report_path(cfg, day))
        assert report.report_path(cfg, day).is_file()
        assert ledger.read_ledger(cfg, day)["report"]["result"]["html"] == res["report"]["html"]
    links = re.findall(r'href="(dt=[^"]+)"', (report.daily_root(cfg) / "index.html").read_text())
    assert [x for x in links if x != f"dt={D4}/index.html"] == [f"dt={d}/index.html" for d in (D3, D2, D1)]
    page = report.report_path(cfg, D3).read_text()
    # Self-contained: no script, nothing loaded, links only within the reports folder.
    assert "<script" not in page and "<link" not in page and "src=" not in page and "@import" not in page
    assert all(h.startswith(("#", "../")) for h in re.findall(r'href="([^"]*)"', page))


def test_day1_says_why_the_model_sections_are_empty(built):
    cfg, results = built
    s = sections(report.report_path(cfg, D1).read_text())
    assert results[D1]["finetune"]["skipped"].startswith("no published model yet and too little history")
    assert "not available: no model was trained on 2026-11-01: no published model yet and too little" in text(s["loss"])
    for sid in ("scores", "drift"):
        assert "not available: publish was skipped on 2026-11-01: no published model yet" in text(s[sid])
        assert "<svg" not in s[sid]
    assert "<svg" in s["metrics"]  # the day's data numbers are plotted even without a model
    assert re.search(r"finetune skipped [\d.]+ no published model yet and too little history", text(s["steps"]))
    assert "not available: no publish of user_embeddings before 2026-11-02" in text(
        sections(report.report_path(cfg, D2).read_text())["drift"]
    )


def test_day3_plots_and_per_day_numbers(built):
    cfg, results = built
    out = report.report(cfg, D3)
    page = report.report_path(cfg, D3).read_text()
    s = sections(page)
    assert list(s) == ["steps", "metrics", "loss", "scores", "drift", "where"]
    assert all(sec["available"] for sec in out["sections"])
    for sid in PLOTTED:
        assert "<svg" in s[sid], sid
    assert out["plots"] == page.count("<svg") >= len(PLOTTED)

    # Users refreshed per day: what publish committed (and what the ledger of sequences says about activity).
    metrics = text(s["metrics"])
    for day, res in results.items():
        pub, seq = res["publish"], res["sequences"]
        refreshed = "" if "skipped" in pub else f" {pub['users']:,}"
        assert f"{day} {seq['active_users']:,} {seq['new_users']:,}{refreshed} " in metrics, day
    assert out["users_refreshed"] == results[D3]["publish"]["users"] > 0

    # The gate's measurements of the day's candidate, from its manifest.
    version = results[D3]["finetune"]["version"]
    gate = registry.read_manifest(cfg, version)["metrics"]["gate"]
    assert f"{gate['candidate']['ndcg@10']:.4f} {gate['published']['ndcg@10']:.4f}" in metrics
    assert f"{results[D2]['finetune']['valid']['recall@10']:.4f}" in metrics

    # The loss of the fine-tuned candidate, epoch by epoch.
    loss = text(s["loss"])
    assert f"Model {version} , finetune on {D3}" in loss
    for h in registry.read_manifest(cfg, version)["history"]:
        assert f" {h['epoch']} {h['loss']:.4f} " in loss

    # Score distributions: one row per task over the users refreshed on D3.
    scores = text(s["scores"])
    for task in results[D3]["infer"][0]["tasks"]:
        assert f"{task} {results[D3]['publish']['users']:,} " in scores


def embeddings(cfg, table: str, version: int, key: str) -> dict:
    # delta.read_arrow applies deletion vectors (publish MERGEs user_embeddings with them).
    t = delta.read_arrow(
        cfg.table_path(table),
        version,
        columns=[key, "embedding", "model_version", *(["as_of"] if table == "user_embeddings" else [])],
    )
    ids = t[key].cast(pa.string()).to_pylist()
    return {k: r for k, r in zip(ids, t.drop_columns([key]).to_pylist())}


def test_drift_matches_a_cosine_computed_here(built):
    cfg, results = built
    out = report.report(cfg, D3)
    drift = text(sections(report.report_path(cfg, D3).read_text())["drift"])
    pub2, pub3 = results[D2]["publish"], results[D3]["publish"]
    for table, key in (("user_embeddings", "user_id"), ("item_embeddings", "item_id")):
        old = embeddings(cfg, table, pub2["tables"][table], key)
        new = embeddings(cfg, table, pub3["tables"][table], key)
        both = sorted(k for k in new if k in old and (key == "item_id" or new[k]["as_of"] == D3))
        cos = {
            k: float(
                np.dot(old[k]["embedding"], new[k]["embedding"])
                / np.linalg.norm(old[k]["embedding"])
                / np.linalg.norm(new[k]["embedding"])
            )
            for k in both
        }
        assert out["drift_mean"][table] == pytest.approx(np.mean(list(cos.values())), abs=1e-6)
        assert f"{len(both):,} " in drift
        # The five rows that moved most are listed with their cosine.
        for k in sorted(cos, key=cos.get)[:2]:
            assert f"{k} {cos[k]:.4f}" in drift
        changed = pub2["model_version"] != pub3["model_version"]
        assert ("The model changed" in drift) == changed
    assert (
        f"Version {pub2['tables']['user_embeddings']} (publish of {D2}) vs version "
        f"{pub3['tables']['user_embeddings']} (publish of {D3})" in drift
    )


def test_a_day_stopped_by_a_check_is_reported(built, capsys, monkeypatch):
    cfg, _ = built
    monkeypatch.setenv("USERFORMER_HOME", str(cfg.home))  # the CLI reads its configuration from the environment
    assert main(["report", "--dt", str(D4)]) == 0
    path = report.report_path(cfg, D4)
    assert capsys.readouterr().out.strip() == str(path)
    s = sections(path.read_text())
    steps = text(s["steps"])
    assert re.search(r"check_events failed [\d.]+ failed: ", steps)
    assert "sequences not run no ledger entry for this day" in steps
    assert f'href="../../checks/events/dt={D4}.html"' in s["steps"]
    assert (path.parent / f"../../checks/events/dt={D4}.html").resolve().is_file()
    assert "not available: the finetune step has no ledger entry for 2026-11-04" in text(s["loss"])
    assert "not available: the publish step has no ledger entry for 2026-11-04" in text(s["drift"])
    assert f"{D4}" in text(s["metrics"]) and "<svg" in s["metrics"]
    assert f'href="dt={D4}/index.html"' in (report.daily_root(cfg) / "index.html").read_text()
