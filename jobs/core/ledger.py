"""The day ledger: each step's latest result for a drop date, in reports_root/runs/dt=D/<step>.json, and the
order of a day's steps (declared here once: the day flow runs them in it, the report and the DAG test read it)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from userformer.jobs.core.config import Config
from userformer.jobs.core.storage import files

# The steps of a day, in order (ledger names; infer is "infer-<shard>-of-<shards>").
STEPS = [
    "ingest",
    "sequences",
    "finetune",
    "gate",
    "infer",
    "check_outputs",
    "publish",
    "index",
    "check_index",
    "candidates",
    "release",
    "report",
]


# The gate a writing step runs on its staged rows before it commits: its result is a ledger entry of its own.
GATES = {"ingest": "check_events", "sequences": "check_user_sequences"}
# Every ledger entry of a day, in order: each step, its gate after it.
ENTRIES = [e for s in STEPS for e in (s, GATES.get(s)) if e]


def ledger_dir(cfg: Config, day: dt.date) -> Path:
    return cfg.reports_root / "runs" / f"dt={day}"


def record(cfg: Config, day: dt.date, step: str, result: dict, seconds: float) -> dict:
    """Keep a step's result in the day's ledger (atomically; a rerun replaces it) and return it."""
    out = {
        "step": step,
        "dt": str(day),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 2),
        "result": result,
    }
    files.write_json(ledger_dir(cfg, day) / f"{step}.json", out)
    return result


def read_ledger(cfg: Config, day: dt.date) -> dict[str, dict]:
    """Step name -> its ledger entry for drop `day` (missing steps absent)."""
    d = ledger_dir(cfg, day)
    if not d.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))}
