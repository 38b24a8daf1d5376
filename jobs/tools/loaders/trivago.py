"""RecSys Challenge 2019 (trivago) session logs: Parquet (or the challenge's CSV).

Columns used: ``user_id, session_id, timestamp, step, action_type, reference, device``.
Item actions take the hotel id from ``reference``; search and filter actions
carry their text there and become non-item events with that ``query``. There
is no item metadata: the items table lists the ids only.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from userformer.jobs.core.errors import UserError
from userformer.jobs.tools.loaders import _base

COLUMNS = ["user_id", "session_id", "timestamp", "step", "action_type", "reference", "device"]
EVENT_TYPES = {
    "clickout item": "click",
    "interaction item image": "view",
    "interaction item info": "view",
    "interaction item rating": "view",
    "interaction item deals": "view",
    "search for item": "view",
    "search for destination": "search",
    "search for poi": "search",
    "filter selection": "filter",
    "change of sort order": "filter",
}
ITEM_ACTIONS = [a for a, e in EVENT_TYPES.items() if e in ("click", "view")]
QUERY_ACTIONS = [a for a, e in EVENT_TYPES.items() if e in ("search", "filter")]


def _read(path):
    if path.suffix.lower() == ".csv":
        names = _base.header_names(path, ",")
        _base.check_columns(path, names, COLUMNS)
        return _base.read_csv_strings(path, names, header=True)
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several types for truncated/corrupt files
        raise UserError(f"{path}: unreadable Parquet file: {exc}") from None
    _base.check_columns(path, schema.names, COLUMNS)
    return pq.read_table(path, columns=COLUMNS), 0


def load(path, items_path=None):
    path = _base.require_file(path)
    _base.refuse_items("trivago", items_path)
    t, malformed = _read(path)
    skipped = {"malformed CSV row": malformed} if malformed else {}

    action = t["action_type"]
    is_item = pc.fill_null(pc.is_in(action, value_set=pa.array(ITEM_ACTIONS)), False)
    is_query = pc.fill_null(pc.is_in(action, value_set=pa.array(QUERY_ACTIONS)), False)
    none = pa.scalar(None, pa.string())
    # "unknown" is the challenge's placeholder for a hotel it could not resolve.
    hotel = pc.if_else(pc.fill_null(pc.equal(t["reference"], "unknown"), False), none, t["reference"])
    step = pc.cast(t["step"], pa.string())
    secs = _base.to_int(t["timestamp"])
    # (session_id, step) identifies an event, but session ids recur with steps restarting: add the time.
    event_id = pc.binary_join_element_wise(t["session_id"], step, pc.cast(secs, pa.string()), ":")
    events = _base.events_table(
        {
            "event_id": event_id,
            "user_id": t["user_id"],
            "ts": _base.seconds_to_ts(secs),
            "event_type": _base.map_values(action, EVENT_TYPES),
            "item_id": pc.if_else(is_item, hotel, none),
            "surface": pc.if_else(pc.fill_null(pc.equal(action, "search for item"), False), "search", t["device"]),
            "query": pc.if_else(is_query, t["reference"], none),
        },
        skipped,
    )
    ids = pc.unique(events["item_id"].drop_null())
    items = _base.items_table({"item_id": ids.take(pc.array_sort_indices(ids))})
    return (
        events,
        items,
        _base.make_stats(
            "trivago",
            path,
            t.num_rows + malformed,
            events,
            items,
            skipped,
            unmapped_event_types=_base.unmapped(action, EVENT_TYPES),
            unknown_item_refs=pc.sum(pc.cast(pc.and_(is_item, pc.is_null(hotel)), pa.int64())).as_py() or 0,
        ),
    )
