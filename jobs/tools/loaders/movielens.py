"""MovieLens in RecBole atomic files: ``<name>.inter`` plus ``<name>.item``, tab-separated, typed header.

``.inter``: ``user_id:token item_id:token rating:float timestamp:float``; every
row is a "rate" event with value = rating. ``.item``: title, release year and
space-separated genres; category_l1 = first genre, category_l2 = release
decade ("1990s", from the title's "(1995)" when the year column is unusable).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from userformer.jobs.tools.loaders import _base

_TITLE = ("movie_title", "title")
_YEAR = ("release_year", "year")
_GENRES = ("class", "genre", "genres")


def _pick(names, candidates):
    return next((c for c in candidates if c in names), None)


def _items(path):
    names = _base.header_names(path, "\t")
    _base.check_columns(path, names, ["item_id"])
    t, malformed = _base.read_csv_strings(path, names, header=True, delimiter="\t", quoting=False)
    if malformed:
        _base.log.warning("%s: skipped %d malformed item row(s)", path.name, malformed)
    none = pa.nulls(t.num_rows, pa.string())
    title = t[c] if (c := _pick(names, _TITLE)) else none
    genres = t[c] if (c := _pick(names, _GENRES)) else none
    year = _base.to_int(t[c]) if (c := _pick(names, _YEAR)) else pa.nulls(t.num_rows, pa.int64())
    in_title = _base.to_int(pc.struct_field(pc.extract_regex(title, r"\((?P<y>\d{4})\)\s*$"), "y"))
    year = pc.coalesce(year, in_title)
    decade = pc.binary_join_element_wise(pc.cast(pc.multiply(pc.divide(year, 10), 10), pa.string()), "s", "")
    first_genre = pc.struct_field(pc.extract_regex(genres, r"^\s*(?P<g>\S+)"), "g")
    return _base.items_table(
        {"item_id": t["item_id"], "title": title, "category_l1": first_genre, "category_l2": decade}
    )


def load(path, items_path=None):
    path = _base.require_file(path)
    if items_path is not None:
        items_path = _base.require_file(items_path, "item")
    names = _base.header_names(path, "\t")
    _base.check_columns(path, names, ["user_id", "item_id", "timestamp"])
    t, malformed = _base.read_csv_strings(path, names, header=True, delimiter="\t", quoting=False)
    skipped = {"malformed row": malformed} if malformed else {}
    events = _base.events_table(
        {
            "user_id": t["user_id"],
            "ts": _base.seconds_to_ts(_base.to_float(t["timestamp"])),
            "event_type": pa.repeat("rate", t.num_rows),
            "item_id": t["item_id"],
            "value": _base.to_float(t["rating"]) if "rating" in names else None,
        },
        skipped,
    )
    items_path = items_path or path.with_suffix(".item")
    if items_path.is_file():
        items = _items(items_path)
    else:
        _base.log.warning("%s not found: items get ids only", items_path)
        items = _base.items_table({"item_id": pc.unique(events["item_id"].drop_null())})
    return (
        events,
        items,
        _base.make_stats(
            "movielens", path, t.num_rows + malformed, events, items, skipped, items_input=str(items_path)
        ),
    )
