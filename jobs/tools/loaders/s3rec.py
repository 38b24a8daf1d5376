"""S3-Rec preprocessed Amazon data (``Beauty.txt`` + ``Beauty_item2attributes.json``), used by DuoRec, eSASRec, ...

``Beauty.txt``: one line per user, ``user item1 item2 ...`` in time order, no
times. Every item is a "purchase" (a review in Amazon terms). The k-th item of a
user (k = 0, 1, ...) gets BASE + k hours: order-only data, so the times only
keep the order (leave-one-out evaluation needs nothing more); they are not real.

``<stem>_item2attributes.json``: item -> attribute ids. S3-Rec's preprocessing
writes, per item, the brand first (when known) and then the category path
below "Beauty" (e.g. Skin Care > Face > Creams), sometimes a second path. We
recover that structure from the file: a brand is an id that some item lists
first but no item lists later; the top-level categories are the ids that follow
such a brand. Then per item: brand = the first id unless it is a top-level
category; the category path = the longest run that starts at a top-level id;
category_l1/l2 = its first two levels, category_l3 = the rest joined by ".".
Attribute ids stay ids (as strings); their names are not in the data.
"""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from userformer.jobs.core.errors import UserError
from userformer.jobs.tools.loaders import _base

BASE = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
_HOUR_US = 3_600_000_000


def _events(path, skipped):
    try:
        lines = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=["line"]),
            parse_options=pacsv.ParseOptions(delimiter="\x01", quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types={"line": pa.string()}),
        )["line"].combine_chunks()
    except pa.ArrowInvalid as exc:
        raise UserError(f"{path}: cannot read as text lines: {exc}") from None
    toks = pc.utf8_split_whitespace(lines)
    short = pc.less(pc.list_value_length(toks), 2)
    if n := pc.sum(pc.cast(short, pa.int64())).as_py():
        skipped["line without items"] = n
        toks = toks.filter(pc.invert(short))
    users = pc.list_element(toks, 0)
    seqs = pc.list_slice(toks, 1)
    flat = pc.list_flatten(seqs)
    parent = pc.list_parent_indices(seqs).to_numpy()
    lengths = pc.list_value_length(seqs).to_numpy()
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    k = np.arange(len(flat)) - starts[parent]
    ts_us = int(BASE.timestamp()) * 1_000_000 + k * _HOUR_US
    events = _base.events_table(
        {
            "user_id": users.take(pa.array(parent)),
            "ts": pa.array(ts_us, pa.int64()),
            "event_type": pa.repeat("purchase", len(flat)),
            "item_id": flat,
        },
        skipped,
    )
    return events, len(lines)


def attribute_roles(attrs: dict[str, list[int]]) -> tuple[set[int], set[int]]:
    """(brand ids, top-level category ids) as inferred from the positions of the ids (see module doc)."""
    later = {a for v in attrs.values() for a in v[1:]}
    brands = {v[0] for v in attrs.values() if v} - later
    tops = {v[1] for v in attrs.values() if len(v) > 1 and v[0] in brands}
    return brands, tops


def split_attributes(ids: list[int], tops: set[int]) -> tuple[int | None, list[int]]:
    """(brand, category path) of one item."""
    brand = ids[0] if ids and ids[0] not in tops else None
    rest = ids[1:] if brand is not None else ids
    paths: list[list[int]] = []
    for a in rest:
        if a in tops or not paths:
            paths.append([a])
        elif a != paths[-1][-1]:
            paths[-1].append(a)
    return brand, max(paths, key=len, default=[])


def _items(path):
    try:
        attrs = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(attrs, dict):
        raise UserError(f"{path}: expected an object item -> [attribute ids]")
    _, tops = attribute_roles(attrs)
    cols = {k: [] for k in ("item_id", "brand", "category_l1", "category_l2", "category_l3")}
    for item, ids in attrs.items():
        brand, cats = split_attributes(list(ids or []), tops)
        cols["item_id"].append(str(item))
        cols["brand"].append(None if brand is None else str(brand))
        cols["category_l1"].append(str(cats[0]) if cats else None)
        cols["category_l2"].append(str(cats[1]) if len(cats) > 1 else None)
        cols["category_l3"].append(".".join(map(str, cats[2:])) or None)
    return _base.items_table({k: pa.array(v, pa.string()) for k, v in cols.items()}), len(tops)


def default_items_path(path):
    return path.with_name(f"{path.stem}_item2attributes.json")


def load(path, items_path=None):
    path = _base.require_file(path)
    if items_path is not None:
        items_path = _base.require_file(items_path, "item")
    skipped: dict[str, int] = {}
    events, lines = _events(path, skipped)
    items_path = items_path or default_items_path(path)
    tops = 0
    if items_path.is_file():
        items, tops = _items(items_path)
    else:
        _base.log.warning("%s not found: items get ids only", items_path)
        items = _base.items_table({"item_id": pc.unique(events["item_id"])})
    return (
        events,
        items,
        _base.make_stats(
            "s3rec",
            path,
            lines,
            events,
            items,
            skipped,
            items_input=str(items_path),
            synthetic_ts=f"{BASE.isoformat()} + k hours",
            top_level_categories=tops,
        ),
    )
