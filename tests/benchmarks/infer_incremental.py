"""Inference cost of an incremental day (~5% of users active) versus a full re-embed, as a ratio in one run.

    python -m tests.benchmarks.infer_incremental [--users N] [--items N] [--active-share F] [--repeats K]
                                                  [--device cpu|cuda|auto] [--out DIR]

Setup (not timed): a fresh USERFORMER_HOME under /tmp; three generated drops,
the first two with most users active (the history), the third cut down to the
events of a stable-hash share ``--active-share`` of the users (a real drop of
the same world, fewer users: the "day with ~5% active"); ingest + sequences of
all three (Spark); a small model trained as of the second day, published, and
its inference of the second day published (so the third is a plain daily
refresh: same model, an earlier publish).

Measured ``--repeats`` times each on the third day, the incremental samples first, then the full ones
(not alternated: a full sample publishes every user as of the day, after which the day's candidates are
every user's again):
  full         ``infer --all-users`` (every user in user_sequences) + ``publish`` (the user tables overwritten)
               + ``candidates`` (every user searched; one MERGE)
  incremental  ``infer`` (users with updated_dt = the day) + ``publish`` (Spark MERGE of those users, deletion
               vectors) + ``candidates`` (those users searched; one MERGE)
Both also embed the whole catalogue (shard 0), a cost that does not shrink with
the day. The item index is built once, in the setup. Reported: medians, the
ratio median(incremental) / median(full) of each part and of the total,
users/s, and what each publish commit wrote (its Delta operation metrics).
Nothing is asserted. Results: DIR/infer-incremental.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.benchmarks.pipeline import git_info, load, log, machine_info, mem_available_gib, now
from tests.benchmarks.render import write_summary

RESULTS = Path(__file__).resolve().parent / "results"
START = dt.date(2026, 2, 1)
SEED = 23


def _in_share(user_ids: list[str], share: float) -> list[bool]:
    return [
        int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(), "big") / 2**64 < share for u in user_ids
    ]


def cut_drop(path: Path, share: float) -> tuple[int, int]:
    """Keep only the events of a stable-hash share of the users in one raw drop file; returns (before, after)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    ids = [u or "" for u in t["user_id"].to_pylist()]
    kept = t.filter(pa.array(_in_share(ids, share)))
    pq.write_table(kept, path)
    return t.num_rows, kept.num_rows


def setup(home: Path, users: int, items: int, share: float, device: str) -> tuple[object, dict]:
    from userformer.jobs.core.config import load_config
    from userformer.jobs.core.spark import stop_spark
    from userformer.jobs.steps import ingest, sequences, train
    from userformer.jobs.tools.generate import generate

    cfg = load_config(
        env={
            "USERFORMER_HOME": str(home),
            "USERFORMER__INFER__DEVICE": device,
            "USERFORMER__TRAIN__DEVICE": device,
            # The cut day holds ~6% of a history day's rows: under the events gate's default row-count band.
            "USERFORMER__QUALITY__ROW_COUNT_BAND": "[0.0, 5.0]",
        }
    )
    d1, d2, d3 = (START + dt.timedelta(days=i) for i in range(3))
    t0 = time.perf_counter()
    gen = generate(
        cfg, users=users, items=items, days=3, start=START, seed=SEED, active_frac=0.9, events_per_active_user=6.0
    )
    before, after = cut_drop(cfg.raw_events_dir(d3) / "part-00000.parquet", share)
    log(
        f"generated {gen['events_total']:,} raw events; day 3 cut to {after:,} of {before:,} rows "
        f"({share:.0%} of users) in {time.perf_counter() - t0:.1f}s"
    )
    seq = {}
    for d in (d1, d2, d3):
        ingest.ingest(cfg, d)
        seq[str(d)] = sequences.update(cfg, d)
        log(f"  {d}: {seq[str(d)]['active_users']:,} active users")
    stop_spark()
    t0 = time.perf_counter()
    tr = train.train(cfg, day=d2, epochs=1, max_users=5000, publish=True, progress=False, log=log)
    log(f"trained {tr['version']} (1 epoch, ~5000 users) in {time.perf_counter() - t0:.1f}s")
    measure(cfg, d2, full=True, candidates=False)  # the model's first publish: every user as of day 2
    from userformer.jobs.steps import index

    index.build_index(cfg, d2)  # the index candidates search (the model's items of day 2)
    from userformer.jobs.steps import candidates

    candidates.candidates(cfg, d2)  # every user's candidates as of day 2: a day's MERGE has a table to update
    return cfg, {
        "generate": {"events": gen["events_total"], "day3_rows_before_cut": before, "day3_rows": after},
        "sequences": seq,
        "model": tr["version"],
    }


def _written(cfg, table: str, version: int) -> dict:
    """What a commit wrote, from its operation metrics (rows, files, deletion vectors, rows copied)."""
    from userformer.jobs.core.storage import delta

    h = next((h for h in delta.history(cfg.table_path(table), 20) if int(h["version"]) == int(version)), {})
    m = h.get("operationMetrics") or {}
    keys = (
        "numOutputRows",
        "numTargetRowsInserted",
        "numTargetRowsUpdated",
        "numTargetRowsDeleted",
        "numTargetRowsCopied",
        "numTargetFilesAdded",
        "numTargetFilesRemoved",
        "numTargetDeletionVectorsAdded",
        "numFiles",
        "numOutputBytes",
        "numTargetBytesAdded",
    )
    return {"operation": h.get("operation"), **{k: int(m[k]) for k in keys if k in m}}


def measure(cfg, day: dt.date, full: bool, candidates: bool = True) -> dict:
    from userformer.jobs.steps import candidates as candidates_step
    from userformer.jobs.steps import infer, publish

    quiet = lambda *_: None  # noqa: E731
    t0 = time.perf_counter()
    m = infer.infer(cfg, day, all_users=full, log=quiet)
    t1 = time.perf_counter()
    p = publish.publish(cfg, day, log=quiet)
    t2 = time.perf_counter()
    c = candidates_step.candidates(cfg, day) if candidates else None
    t3 = time.perf_counter()
    if m["full"] != full:
        raise RuntimeError(f"expected a {'full' if full else 'incremental'} inference, got {m['reason']}")
    out = {
        "users": m["users"],
        "items": m["rows"]["item_embeddings"],
        "infer_s": round(t1 - t0, 3),
        "publish_s": round(t2 - t1, 3),
        "candidates_s": round(t3 - t2, 3),
        "total_s": round(t3 - t0, 3),
        "load_before": load(),
        "commits": {t: r.get("committed") for t, r in p["commits"].items()},
        "written": {
            t: _written(cfg, t, r["version"])
            for t, r in p["commits"].items()
            if r.get("committed") and t != "item_embeddings"
        },
    }
    if c is not None:
        out["written"]["user_candidates"] = _written(cfg, "user_candidates", c["table_version"])
    return out


PARTS = ("infer_s", "publish_s", "candidates_s", "total_s")


def summarise(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in PARTS} | {
        "users": runs[0]["users"],
        "samples_total_s": [r["total_s"] for r in runs],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.infer_incremental", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--active-share", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--keep-home", action="store_true", help="keep the temporary USERFORMER_HOME")
    a = p.parse_args(argv)
    doc = {
        "benchmark": "infer-incremental",
        "params": vars(a) | {"out": str(a.out)},
        "machine": machine_info(),
        "git": git_info(),
        "started": now(),
        "load_at_start": load(),
        "mem_available_gib_at_start": mem_available_gib(),
        "command": " ".join(sys.argv),
    }
    home = Path(tempfile.mkdtemp(prefix="userformer-bench-infer-", dir="/tmp"))
    try:
        cfg, info = setup(home / "home", a.users, a.items, a.active_share, a.device)
        day = START + dt.timedelta(days=2)
        runs = {"full": [], "incremental": []}
        for kind in ("incremental", "full"):
            for k in range(a.repeats):
                r = measure(cfg, day, full=kind == "full")
                runs[kind].append(r)
                log(
                    f"  {kind} #{k + 1}: {r['users']:,} users, infer {r['infer_s']:.2f}s, publish {r['publish_s']:.2f}s, "
                    f"candidates {r['candidates_s']:.2f}s"
                )
        from userformer.jobs.core import registry

        f, i = summarise(runs["full"]), summarise(runs["incremental"])
        doc.update(
            setup=info,
            runs=runs,
            full=f,
            incremental=i,
            repeats=a.repeats,
            device=a.device,
            users_in_table=f["users"],
            items=runs["full"][0]["items"],
            active_share_measured=i["users"] / f["users"],
            d_model=registry.read_manifest(cfg, info["model"])["model_config"]["d_model"],
            ratio={k: i[k] / f[k] for k in PARTS} | {"users": i["users"] / f["users"]},
            finished=now(),
        )
    finally:
        if not a.keep_home:
            shutil.rmtree(home, ignore_errors=True)
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "infer-incremental.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(write_summary(path, json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
