"""The Airflow UI in a real browser: headless Chromium logs into the Airflow UI, starts a backfill of daily_refresh from
the DAG page's Trigger dialog, and the pipeline's runs for those dates succeed.

Chromium is Debian's ``chromium`` package (``/usr/bin/chromium``; `.ci/run` installs it), driven by Playwright
with the system binary (no ``playwright install``). Without it the test skips, or fails when
``USERFORMER_REQUIRE_BROWSER=1`` (CI). Screenshots (and the HTML of each page) are kept under
``$USERFORMER_TEST_ARTIFACTS`` (default ``var/test-artifacts/``) in ``ui_backfill/``.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
DEMO_CONFIG = REPO / "infra" / "config" / "demo.toml"
DAG = "daily_refresh"
D1, D2 = dt.date(2026, 11, 1), dt.date(2026, 11, 2)
# This closed network refuses Chromium's own outbound connections: no background networking, updates or sync.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UI_TIMEOUT_MS = 60_000  # a UI step on a busy 2-core machine
RUNS_TIMEOUT_S = 1500  # both days through every task of the DAG

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.timeout(2400)]


@pytest.fixture
def chromium() -> Path:
    if not os.access(CHROMIUM, os.X_OK):
        msg = (
            f"no Chromium at {CHROMIUM}: `apt-get install -y --no-install-recommends chromium` "
            "(Debian's package; .ci/run installs it)"
        )
        if os.environ.get("USERFORMER_REQUIRE_BROWSER") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    pytest.importorskip("playwright.sync_api")
    return CHROMIUM


@pytest.fixture
def artifacts() -> Path:
    d = Path(os.environ.get("USERFORMER_TEST_ARTIFACTS") or REPO / "var" / "test-artifacts") / "ui_backfill"
    d.mkdir(parents=True, exist_ok=True)
    for old in d.glob("*.*"):
        old.unlink()
    return d


@pytest.fixture
def pipeline_cfg(home, monkeypatch):
    """Two small generated days, the demo's short training; the environment Airflow's tasks inherit."""
    from userformer.jobs.core.config import load_config
    from userformer.jobs.tools import generate

    monkeypatch.setenv("USERFORMER_CONFIG", str(DEMO_CONFIG))
    monkeypatch.setenv("USERFORMER__PIPELINE__BOOTSTRAP_EPOCHS", "1")
    monkeypatch.setenv("USERFORMER__TRAIN__NUM_THREADS", "1")
    cfg = load_config()
    generate.generate(cfg, users=200, items=300, days=2, start=D1, seed=7)
    return cfg


@pytest.fixture
def airflow(pipeline_cfg):
    from userformer.jobs.tools import orchestrator

    af = orchestrator.start(pipeline_cfg, orchestrator.free_port(), scheduled_runs=False)
    try:
        yield af
    finally:
        af.stop()  # SIGINT to the standalone parent's pid, then what is left of its process group


class Shots:
    """Numbered screenshots + page HTML under the artifacts folder."""

    def __init__(self, page, folder: Path):
        self.page, self.folder, self.n = page, folder, 0

    def __call__(self, name: str, full_page: bool = False) -> Path:
        self.n += 1
        png = self.folder / f"{self.n:02d}-{name}.png"
        self.page.screenshot(path=str(png), full_page=full_page)
        png.with_suffix(".html").write_text(self.page.content())
        print(f"screenshot: {png}", flush=True)
        return png


def pick_datetime(page, dialog, label: str, day: dt.date) -> None:
    """The dialog's date-time field `label` ("From"/"To"): its popover's Date and Time inputs."""
    field = dialog.get_by_role("group").filter(has=page.get_by_text(label, exact=True))
    field.get_by_test_id("datetime-input").click()
    popover = page.get_by_role("dialog").filter(has=page.get_by_placeholder("YYYY/MM/DD")).last
    popover.get_by_placeholder("YYYY/MM/DD").fill(day.strftime("%Y/%m/%d"))
    popover.get_by_placeholder("HH:mm").fill("00:00")
    page.keyboard.press("Escape")  # closes the popover, keeps the value
    from playwright.sync_api import expect

    expect(field).to_contain_text(f"{day:%b %d, %Y} 00:00")


def start_backfill_in_ui(page, af, shot) -> None:
    from playwright.sync_api import expect

    page.goto(af.url + "/auth/login")
    page.get_by_label("Username").fill(af.username)
    page.get_by_label("Password").fill(af.password)
    shot("login")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/auth/login" not in url)

    page.goto(f"{af.url}/dags/{DAG}")
    page.get_by_role("button", name="Trigger Dag").click()
    dialog = page.get_by_role("dialog").filter(has=page.get_by_role("radio", name="Backfill"))
    expect(dialog).to_contain_text(f"Trigger Dag - {DAG}")
    shot("trigger-dialog")
    dialog.get_by_role("radio", name="Backfill").check(force=True)  # the input under the radio card
    expect(dialog).to_contain_text(f"Run Backfill - {DAG}")
    pick_datetime(page, dialog, "From", D1)
    pick_datetime(page, dialog, "To", D2)
    # "Missing Runs" (the default) is refused for a DAG with depends_on_past tasks.
    dialog.get_by_role("radio", name="Missing and Errored Runs").check(force=True)
    expect(dialog.get_by_text(re.compile(r"2 runs will be triggered"))).to_be_visible()
    expect(dialog.get_by_role("checkbox", name=f"Unpause {DAG} on trigger")).to_be_checked()
    shot("backfill-dialog")
    dialog.get_by_role("button", name="Run Backfill").click()
    expect(dialog).to_be_hidden()
    shot("backfill-started")


def test_backfill_from_the_ui_dialog_runs_both_days(chromium, artifacts, airflow, pipeline_cfg, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from userformer.jobs.core import ledger
    from userformer.jobs.core.storage import delta

    af = airflow
    t0 = time.monotonic()
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(chromium),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1400, "height": 900},
        )
        ctx.set_default_timeout(UI_TIMEOUT_MS)
        expect.set_options(timeout=UI_TIMEOUT_MS)
        page = ctx.pages[0] if ctx.pages else ctx.new_page()
        shot = Shots(page, artifacts)
        try:
            assert af.dag_runs(DAG) == []
            start_backfill_in_ui(page, af, shot)

            runs = af.wait_runs(
                DAG,
                start=D1,
                end=D2,
                timeout=RUNS_TIMEOUT_S,
                progress=lambda r: print(f"{time.monotonic() - t0:6.0f}s {r['dag_run_id']}: {r['state']}", flush=True),
            )
            failed = {
                r["dag_run_id"]: [
                    (t["task_id"], t["state"], [str(x) for x in af.task_log_path(DAG, r["dag_run_id"], t["task_id"])])
                    for t in af.failed_tasks(DAG, r["dag_run_id"])
                ]
                for r in runs
                if r["state"] != "success"
            }
            assert not failed, f"runs did not succeed: {failed}"

            # What the dialog made: one backfill over exactly D1..D2, and its runs are the DAG's only ones.
            backfills = af.api("GET", "/backfills", query={"dag_id": DAG}).get("backfills", [])
            assert [(b["from_date"][:10], b["to_date"][:10]) for b in backfills] == [(str(D1), str(D2))]
            runs = af.dag_runs(DAG)
            assert [(r["logical_date"][:10], r["run_type"], r["state"]) for r in runs] == [
                (str(D1), "backfill", "success"),
                (str(D2), "backfill", "success"),
            ]

            for day in (D1, D2):
                entries = ledger.read_ledger(pipeline_cfg, day)
                missing = {
                    "ingest",
                    "check_events",
                    "sequences",
                    "publish",
                    "index",
                    "candidates",
                    "report",
                } - entries.keys()
                assert not missing, f"{day}: no ledger entry for {sorted(missing)}"
                assert entries["ingest"]["result"]["accepted"] > 0
            events = delta.read_arrow(pipeline_cfg.table_path("events"))
            assert sorted({str(d) for d in events["dt"].to_pylist()}) == [str(D1), str(D2)]

            # The runs list, as a user sees it at the end.
            page.goto(f"{af.url}/dags/{DAG}/runs")
            for r in runs:
                row = page.get_by_role("row").filter(has=page.get_by_text(r["dag_run_id"], exact=True))
                expect(row).to_contain_text("Success")
                expect(row).to_contain_text("Backfill")
            shot("runs-list", full_page=True)
        except BaseException:
            try:
                shot("failure", full_page=True)
            except Exception as exc:  # the browser itself may be what failed
                print(f"no failure screenshot: {exc}")
            raise
        finally:
            ctx.close()
    print(f"browser backfill test: {time.monotonic() - t0:.0f}s; artifacts in {artifacts}")
