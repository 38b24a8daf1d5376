"""Which drops the warehouse holds: the last one user_sequences applied, the table version "as of" a day, and
what the warehouse holds of one drop (applied, ingested, empty, missing). Read from the Delta commit metadata
each step writes (dt / upto / step), never from the data."""

from __future__ import annotations

import datetime as dt

from userformer.jobs.core.errors import UserError
from userformer.jobs.core.storage import delta


def last_drop(seq_path) -> tuple[dt.date | None, int | None]:
    """(last drop applied to user_sequences, version holding the state just before it).

    Read from the commit metadata. The second value is where a rerun of that
    same drop starts from, so a rerun replaces the drop's effect instead of
    merging its events twice (-1 when that drop created the table; None after a
    rebuild, which has no single drop to undo). A restore without a drop in its
    metadata (by hand, or a rerun's first commit) is followed to the version it
    restored (Delta records it in operationParameters).
    """
    if not delta.exists(seq_path):
        return None, None
    hist = {h["version"]: h for h in delta.history(seq_path)}
    v = max(hist)
    # Maintenance commits (vacuum, optimize, purge, properties) change no rows: look past them.
    while v - 1 in hist and str(hist[v].get("operation", "")).startswith(delta.NO_DATA_CHANGE):
        v -= 1
    h = hist[v]
    while h.get("operation") == "RESTORE" and not (h.get("dt") or h.get("upto")):
        h = hist.get(int((h.get("operationParameters") or {})["version"]), {})
        while h and str(h.get("operation", "")).startswith(delta.NO_DATA_CHANGE) and h["version"] - 1 in hist:
            h = hist[h["version"] - 1]
    applied = h.get("dt") or h.get("upto")
    if not applied:
        return None, None
    if h.get("step") != "sequences":
        return dt.date.fromisoformat(applied), None
    base = h["version"] - 1
    while base in hist and hist[base].get("step") == "sequences" and hist[base].get("dt") == applied:
        base -= 1
    return dt.date.fromisoformat(applied), base


def applied_drop(cfg) -> dt.date | None:
    """The last drop user_sequences includes (from its commit metadata)."""
    return last_drop(cfg.table_path("user_sequences"))[0]


def _commit_day(h: dict) -> dt.date | None:
    d = h.get("dt") or h.get("upto")
    return dt.date.fromisoformat(d) if d else None


def sequences_version(cfg, day: dt.date | None) -> tuple[int, dt.date]:
    """(user_sequences version, drop date) to read for "as of `day`" (None: the latest drop).

    Raises UserError when the table is missing, does not reach `day` yet, or the
    version of `day` was vacuumed."""
    path = cfg.table_path("user_sequences")
    if not delta.exists(path):
        raise UserError(f"no user_sequences table at {path}: run `userformer sequences --dt D` first")
    latest = applied_drop(cfg)
    if latest is None:
        raise UserError(
            f"user_sequences at {path} has no drop in its commit metadata (restored by hand?); "
            "rebuild it with `userformer sequences --rebuild`"
        )
    current = delta.version_of(path)
    if day is None or day == latest:
        return current, latest
    if day > latest and all(
        drop_state(cfg, latest + dt.timedelta(days=i)) == "empty" for i in range(1, (day - latest).days + 1)
    ):
        return current, day  # only drops without events since: the table as it is, as of `day`
    if day > latest:
        raise UserError(
            f"user_sequences includes drops up to {latest} only, not {day}: run `userformer sequences --dt {day}` first"
        )
    chosen = None
    for h in delta.lineage(path):  # oldest first; commits a repair's RESTORE undid are not in it
        d = _commit_day(h)
        if d is not None and h.get("step") in ("sequences", "sequences-rebuild"):
            if d <= day:
                chosen = h["version"]
        elif (
            chosen is not None
            and h["version"] == chosen + 1
            and str(h.get("operation", "")).startswith(delta.NO_DATA_CHANGE)
        ):
            chosen = h["version"]
    if chosen is None:
        raise UserError(f"user_sequences has no version that includes drops up to {day} (its first drop is later)")
    if delta.missing_files(path, chosen):
        raise UserError(
            f"user_sequences as of {day} (version {chosen}) was vacuumed (storage.retention_days); "
            f"use a later --dt, or rebuild with `userformer sequences --rebuild --upto {day}` in a copy"
        )
    return chosen, day


def drop_state(cfg, day: dt.date) -> str:
    """What the warehouse holds of drop `day`: 'applied' (user_sequences includes it), 'empty' (ingested
    without events), 'ingested' (events, but sequences not run yet) or 'missing'."""
    latest = applied_drop(cfg) if delta.exists(cfg.table_path("user_sequences")) else None
    events = cfg.table_path("events")
    # Rows readers see (deleted ones excluded), not the files' record counts.
    has_events = delta.exists(events) and any(
        str(k) == str(day) and n > 0 for k, n in delta.partition_rows(events, "dt").items()
    )
    ingested = has_events or (
        delta.exists(events)
        and any(h.get("step") == "ingest" and h.get("dt") == str(day) for h in delta.lineage(events))
    )
    if latest is not None and day <= latest and (has_events or day == latest):
        return "applied"
    if has_events:
        return "ingested"
    return "empty" if ingested else "missing"
