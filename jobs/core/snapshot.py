"""The published snapshot: the one record that says what downstream readers see.

``warehouse/_published/snapshot.json`` names, for the last released drop D, the
Delta version of every table readers may read (the outputs ``user_embeddings``,
``user_preference_scores``, ``item_embeddings``, ``user_candidates`` and the
inputs they were computed from: ``events``, ``user_sequences``, ``items``,
``vocab``), the item index version and the model version. The release step
(jobs/steps/release.py) writes it in one atomic replace (temp file + rename),
only after the output checks, the index check and the candidates of D passed;
until then readers keep the previous record. Readers open each table at the
version the record names (Delta time travel), so they see D's users, D's item
vectors, D's index and D's candidates together, never a mix of two days or two
models, whatever the pipeline is committing meanwhile.

``snapshot_log.jsonl`` beside it keeps every record released, in order (what a
repair goes back to). ``userformer maintain`` keeps the current record's
versions whatever their age (and index retention its index); older records
stay readable for ``storage.retention_days``.
"""

from __future__ import annotations

import json

from userformer.jobs.core import hooks
from userformer.jobs.core.config import Config
from userformer.jobs.core.errors import UserError
from userformer.jobs.core.storage import delta, files

# What a snapshot names, in the order readers think of them.
OUTPUTS = ("user_embeddings", "user_preference_scores", "item_embeddings", "user_candidates")
INPUTS = ("events", "user_sequences", "items", "vocab")
TABLES = OUTPUTS + INPUTS


def root(cfg: Config) -> files.Location:
    return cfg.warehouse_root / "_published"


def path(cfg: Config) -> files.Location:
    return root(cfg) / "snapshot.json"


def log_path(cfg: Config) -> files.Location:
    return root(cfg) / "snapshot_log.jsonl"


def current(cfg: Config) -> dict | None:
    """The published snapshot, or None when nothing was released yet. A clear UserError when it is unreadable."""
    p = path(cfg)
    if not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text())
        if not isinstance(rec, dict) or not isinstance(rec.get("tables"), dict):
            raise ValueError("no 'tables'")
    except ValueError as exc:
        raise UserError(
            f"{p}: corrupt published snapshot ({exc}); put back the last good line of {log_path(cfg)} "
            "or rerun `userformer release --dt D` for the last complete drop"
        ) from None
    return rec


def history(cfg: Config) -> list[dict]:
    """Every record released, oldest first (lines that cannot be read are skipped)."""
    p = log_path(cfg)
    out = []
    for line in p.read_text().splitlines() if p.is_file() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def flip(cfg: Config, record: dict) -> dict:
    """Make `record` the published snapshot (one atomic replace), then add it to the log. The caller holds the
    warehouse lease. A crash between the two leaves the log one record short, which the next flip of the same
    record completes."""
    files.write_json(path(cfg), record)
    hooks.pause("release.before_log")  # tests: flipped, not yet in the log
    last = history(cfg)[-1:] or [None]
    if last[0] != json.loads(json.dumps(record, default=files.jsonable)):
        files.append_line(log_path(cfg), json.dumps(record, default=files.jsonable))
    return record


def remove(cfg: Config, aside: files.Location) -> None:
    """No snapshot any more (a repair back to before the first release): the record is moved to `aside`."""
    if path(cfg).is_file():
        files.move(path(cfg), aside / "snapshot.json")


def require(cfg: Config) -> dict:
    """The published snapshot; a UserError (exit 2) when nothing was released yet."""
    rec = current(cfg)
    if rec is None:
        raise UserError(
            f"nothing is published yet: {path(cfg)} does not exist (the daily run writes it at its end, "
            "`userformer release --dt D`)",
            code=2,
        )
    return rec


def table_version(cfg: Config, table: str, record: dict | None = None) -> int:
    """The Delta version of `table` in the published snapshot (or in `record`)."""
    rec = record or require(cfg)
    if table not in TABLES:
        raise UserError(f"{table} is not a published table (one of {', '.join(TABLES)})")
    v = rec["tables"].get(table)
    if v is None:
        raise UserError(f"the published snapshot of {rec.get('dt')} has no {table} table", code=2)
    return int(v)


def read_table(cfg: Config, table: str, columns: list[str] | None = None, filter=None, record: dict | None = None):
    """`table` as of the published snapshot, as one Arrow table (deletion vectors applied); `filter` is a
    pyarrow.dataset expression."""
    return delta.read_arrow(cfg.table_path(table), table_version(cfg, table, record), filter=filter, columns=columns)
