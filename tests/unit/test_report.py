"""jobs/steps/report.py without a warehouse: a day with no ledger, and a failure while rendering."""

from __future__ import annotations

import datetime as dt

import pytest

from userformer.jobs.core import ledger
from userformer.jobs.core.errors import UserError
from userformer.jobs.steps import report

DAY = dt.date(2026, 11, 1)


def test_a_day_without_a_ledger_is_a_clear_error(cfg):
    with pytest.raises(UserError, match=r"no ledger for drop 2026-11-01 under .*runs/dt=2026-11-01: run the day"):
        report.report(cfg, DAY)
    assert not report.report_path(cfg, DAY).exists()


def test_a_failed_report_leaves_the_previous_one_whole(cfg, monkeypatch):
    ledger.record(cfg, DAY, "ingest", {"dt": str(DAY), "raw_rows": 10, "accepted": 10}, 1.5)
    ledger.record(cfg, DAY, "finetune", {"skipped": "no published model yet", "candidate": None}, 0.1)
    out = report.report(cfg, DAY)
    page = report.report_path(cfg, DAY)
    before = page.read_text()
    assert out["html"] == str(page)
    assert "no model was trained on 2026-11-01: no published model yet" in before
    assert "the publish step has no ledger entry for 2026-11-01" in before
    assert '<a href="dt=2026-11-01/index.html">' in (report.daily_root(cfg) / "index.html").read_text()

    def broken(fig):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(report, "svg", broken)
    ledger.record(cfg, DAY, "sequences", {"dt": str(DAY), "active_users": 7, "new_users": 7}, 2.0)
    with pytest.raises(RuntimeError, match="plotting failed"):
        report.report(cfg, DAY)
    assert page.read_text() == before
    assert sorted(p.name for p in page.parent.iterdir()) == ["index.html"]  # no temporary file left
