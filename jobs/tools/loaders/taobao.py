"""Taobao UserBehavior (Tianchi dataset 649): CSV without header.

Columns ``user_id,item_id,category_id,behavior_type,timestamp`` (unix seconds).
The category is one level (category_l1). Rows whose time lies outside the
dataset's documented window are kept: they fit the contract, so ingest
quarantines them (ts_too_old / future_ts) once write_raw has put them into the
window's first / last drop.
"""

from __future__ import annotations

import datetime as dt

import pyarrow.compute as pc

from userformer.jobs.tools.loaders import _base

COLUMNS = ["user_id", "item_id", "category_id", "behavior_type", "timestamp"]
EVENT_TYPES = {"pv": "view", "cart": "cart", "fav": "favourite", "buy": "purchase"}
# 2017-11-25..2017-12-03 Beijing time, as UTC dates.
WINDOW = (dt.date(2017, 11, 24), dt.date(2017, 12, 3))


def load(path, items_path=None):
    path = _base.require_file(path)
    _base.refuse_items("taobao", items_path)
    t, malformed = _base.read_csv_strings(path, COLUMNS, header=False)
    skipped = {"malformed CSV row": malformed} if malformed else {}

    ts = _base.seconds_to_ts(_base.to_int(t["timestamp"]))
    events = _base.events_table(
        {
            "user_id": t["user_id"],
            "ts": ts,
            "event_type": _base.map_values(t["behavior_type"], EVENT_TYPES),
            "item_id": t["item_id"],
        },
        skipped,
    )
    cats = _base.last_per_item(t.append_column("ts", ts), "item_id", ["category_id"], "ts")
    items = _base.items_table({"item_id": cats["item_id"], "category_l1": cats["category_id"]})

    day = pc.cast(events["ts"], "date32")
    outside = pc.sum(pc.cast(pc.or_(pc.less(day, WINDOW[0]), pc.greater(day, WINDOW[1])), "int64")).as_py() or 0
    if outside:
        _base.log.warning(
            "%s: %d event(s) outside %s..%s passed through for ingest to quarantine", path.name, outside, *WINDOW
        )
    return (
        events,
        items,
        _base.make_stats(
            "taobao",
            path,
            t.num_rows + malformed,
            events,
            items,
            skipped,
            window=WINDOW,
            outside_window=outside,
            unmapped_event_types=_base.unmapped(t["behavior_type"], EVENT_TYPES),
        ),
    )
