"""Comparing two homes' warehouses table by table (the Airflow, backfill and repair tests: "equals a clean run").

Equal means: events, events_rejected, vocab, items and user_sequences row for row; user_embeddings,
user_preference_scores, item_embeddings and user_candidates with a float tolerance; both without the run-specific
columns (updated_at, index_version, and source_file: a path into the home). With ``renumbered``, model version
ids are compared without their allocation number (a repair re-trains into new numbers).
"""

from __future__ import annotations

import datetime as dt
import re

import numpy as np
import pyarrow as pa

from userformer.jobs.core.config import load_config
from userformer.jobs.core.storage import delta
from userformer.jobs.flows import pipeline
from userformer.jobs.tools import generate

# Two generated days (150 users, 200 items) with a model small enough to train in seconds: D1 is too short to
# train on, so the first model is trained and published on D2.
D1, D2 = dt.date(2026, 11, 1), dt.date(2026, 11, 2)
SMALL = {
    "PIPELINE__BOOTSTRAP_EPOCHS": "1",
    "TRAIN__NUM_THREADS": "1",
    "MODEL__D_MODEL": "8",
    "MODEL__MAX_LEN": "10",
    "MODEL__TIME_BUCKETS": "4",
    "TRAIN__BATCH_SIZE": "64",
    "TRAIN__UNIFORM_NEGATIVES": "32",
    "TRAIN__STREAM_CHUNK_USERS": "64",
}


def small_env(home, **paths) -> dict:
    """The USERFORMER_* environment of a small home (`paths`: paths.* overrides, e.g. warehouse_root)."""
    return {
        "USERFORMER_HOME": str(home),
        **{f"USERFORMER__{k}": v for k, v in SMALL.items()},
        **{f"USERFORMER__PATHS__{k.upper()}": str(v) for k, v in paths.items()},
    }


def two_days(home):
    """A home with the two small days generated and run with `pipeline.run_day`; its configuration."""
    cfg = load_config(env=small_env(home))
    generate.generate(cfg, users=150, items=200, days=2, start=D1, seed=5)
    for day in (D1, D2):
        pipeline.run_day(cfg, day)
    return cfg


EXACT = {
    "events": ("event_id",),
    "events_rejected": None,
    "vocab": ("kind", "key"),
    "items": ("item_id",),
    "user_sequences": ("user_id",),
}
FLOATS = {
    "user_embeddings": ("user_id",),
    "user_preference_scores": ("user_id", "task"),
    "item_embeddings": ("item_idx",),
    "user_candidates": ("user_id",),
}
RUN_SPECIFIC = {"updated_at", "index_version", "source_file"}


def model_id(v):
    """A model version id without its allocation number: v0003-20261102-train -> 20261102-train."""
    return re.sub(r"^v\d+-", "", v) if isinstance(v, str) else v


def table_rows(cfg, table: str, keys, *, renumbered: bool = False, users=None) -> dict:
    """key -> row (run-specific columns dropped; string_view read as string); `users` keeps only their rows."""
    t = delta.read_arrow(cfg.table_path(table))
    t = pa.table({c: (t[c].cast(pa.string()) if pa.types.is_string_view(t[c].type) else t[c]) for c in t.column_names})
    out = {}
    for r in t.to_pylist():
        r = {
            c: (model_id(v) if renumbered and c == "model_version" else v)
            for c, v in r.items()
            if c not in RUN_SPECIFIC
        }
        if users is not None and r.get("user_id") not in users:
            continue
        k = tuple(r[c] for c in keys) if keys else tuple(str(r[c]) for c in sorted(r))
        assert k not in out, f"{table}: {k} twice"
        out[k] = r
    return out


def close(a, b) -> bool:
    if isinstance(a, list) and a and isinstance(a[0], float):
        return b is not None and len(a) == len(b) and np.allclose(a, b, rtol=0, atol=1e-5)
    return a == b


def assert_same_tables(a, b, tables=None, *, renumbered: bool = False, users=None) -> None:
    """Every table (or `tables`) of config B equals config A's (module doc)."""
    for table in tables or [*EXACT, *FLOATS]:
        keys = EXACT.get(table, FLOATS.get(table))
        ra = table_rows(a, table, keys, renumbered=renumbered, users=users)
        rb = table_rows(b, table, keys, renumbered=renumbered, users=users)
        assert ra.keys() == rb.keys(), f"{table}: {len(ra.keys() ^ rb.keys())} keys differ"
        for k, row in ra.items():
            if table in EXACT:
                assert rb[k] == row, f"{table} {k} differs"
            else:
                bad = [c for c in row if not close(row[c], rb[k][c])]
                assert not bad, f"{table} {k}: {bad} differ"
