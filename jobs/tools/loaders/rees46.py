"""REES46 e-commerce behaviour (Kaggle "eCommerce behavior data from multi category store"): CSV with header.

``event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session``;
event types already match the contract (view, cart, remove_from_cart, purchase).
category_code is a dotted path: its first two levels go to category_l1/l2, the
rest (rarely more than one level) to category_l3; without a code the numeric
category_id is the only level. Item attributes are the latest seen per product.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from userformer.jobs.tools.loaders import _base
from userformer.schemas import tables

COLUMNS = [
    "event_time",
    "event_type",
    "product_id",
    "category_id",
    "category_code",
    "brand",
    "price",
    "user_id",
    "user_session",
]
_PATH_RE = r"^(?P<l1>[^.]*)(?:\.(?P<l2>[^.]*))?(?:\.(?P<l3>.*))?$"


def load(path, items_path=None):
    path = _base.require_file(path)
    _base.refuse_items("rees46", items_path)
    names = _base.header_names(path, ",")
    _base.check_columns(path, names, [c for c in COLUMNS if c != "user_session"])
    t, malformed = _base.read_csv_strings(path, names, header=True)
    skipped = {"malformed CSV row": malformed} if malformed else {}

    ts = pc.cast(
        pc.strptime(
            pc.utf8_trim_whitespace(t["event_time"]), format="%Y-%m-%d %H:%M:%S UTC", unit="s", error_is_null=True
        ),
        tables.TS,
    )
    price = _base.to_float(t["price"])
    is_purchase = pc.fill_null(pc.equal(t["event_type"], "purchase"), False)
    events = _base.events_table(
        {
            "user_id": t["user_id"],
            "ts": ts,
            "event_type": t["event_type"],
            "item_id": t["product_id"],
            "value": pc.if_else(is_purchase, price, pa.scalar(None, pa.float64())),
        },
        skipped,
    )

    levels = pc.extract_regex(t["category_code"], _PATH_RE)
    l1, l2, l3 = (_base.null_if_empty(pc.struct_field(levels, k)) for k in ("l1", "l2", "l3"))
    attrs = pa.table(
        {
            "item_id": t["product_id"],
            "ts": ts,
            "category_l1": pc.coalesce(l1, t["category_id"]),
            "category_l2": l2,
            "category_l3": l3,
            "brand": t["brand"],
            "price": price,
        }
    )
    last = _base.last_per_item(attrs, "item_id", ["category_l1", "category_l2", "category_l3", "brand", "price"], "ts")
    items = _base.items_table({c: last[c] for c in last.column_names})
    return events, items, _base.make_stats("rees46", path, t.num_rows + malformed, events, items, skipped)
