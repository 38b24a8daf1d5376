"""`userformer load`: public behaviour datasets -> raw daily drops in the raw contract.

Each format module has ``load(path, items_path=None) -> (events, items, stats)``
with events in RAW_EVENTS and items in RAW_ITEMS (schemas/tables.py). Rows that
fit the contract but break its rules (an absurd time, an unknown event type)
pass through, so that ingest quarantines them with a reason; rows that cannot
be represented at all (truncated lines, no user, no parseable time) are skipped
and counted in ``stats["skipped"]``.

``write_raw`` lays them out as drops: the arrival date of an event is its UTC
date, so ``userformer ingest --dt D`` replays the dataset day by day.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from userformer.jobs.core.errors import UserError
from userformer.jobs.tools.loaders import movielens, rees46, s3rec, taobao, trivago
from userformer.schemas import tables

LOADERS = {
    "taobao": taobao.load,
    "rees46": rees46.load,
    "trivago": trivago.load,
    "movielens": movielens.load,
    "s3rec": s3rec.load,
}

_FORMATS_HELP = {
    "taobao": "Taobao UserBehavior CSV (no header)",
    "rees46": "REES46 e-commerce CSV",
    "trivago": "RecSys 2019 trivago Parquet/CSV",
    "movielens": "RecBole .inter (+ .item)",
    "s3rec": "S3-Rec Beauty.txt (+ _item2attributes.json)",
}


def write_raw(
    events: pa.Table, items: pa.Table, out_root, fmt: str = "raw", window: tuple[dt.date, dt.date] | None = None
) -> list[dt.date]:
    """Write events as out_root/events/dt=D/part-<fmt>.parquet per UTC date D and the items at the first date.

    `window` (first, last date) clamps arrival dates: an event dated outside
    the dataset's documented range arrives with its first / last drop, where
    ingest quarantines it, instead of opening a drop of its own. Rewriting a
    day replaces that day's file of this format. Returns the dates written.
    """
    events = events.cast(tables.RAW_EVENTS)
    items = items.cast(tables.RAW_ITEMS)
    out_root = Path(out_root)
    day = pc.cast(events["ts"], pa.date32())
    if window is not None:
        day = pc.max_element_wise(pc.min_element_wise(day, pa.scalar(window[1])), pa.scalar(window[0]))
    order = pc.sort_indices(day)  # stable: keeps the input order within a day
    events, day = events.take(order), day.take(order)
    days, start = [], 0
    runs = pc.run_end_encode(day.combine_chunks() if isinstance(day, pa.ChunkedArray) else day)
    for end, d in zip(runs.run_ends.to_pylist(), runs.values.to_pylist()):
        folder = out_root / "events" / f"dt={d.isoformat()}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(events.slice(start, end - start), folder / f"part-{fmt}.parquet")
        days.append(d)
        start = end
    if days and len(items):
        folder = out_root / "items" / f"dt={days[0].isoformat()}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(items, folder / "items.parquet")
    return days


# --------------------------------------------------------------------- CLI
def register(sub) -> None:
    p = sub.add_parser(
        "load",
        help="public dataset (taobao, rees46, trivago, movielens, s3rec) -> raw daily drops",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "format",
        metavar="FORMAT",
        choices=list(LOADERS),
        help="input format: " + "; ".join(f"{k} = {v}" for k, v in _FORMATS_HELP.items()),
    )
    p.add_argument("--input", required=True, type=Path, metavar="PATH", help="the dataset file to read")
    p.add_argument(
        "--items",
        type=Path,
        metavar="PATH",
        help="item attribute file (movielens: .item, s3rec: _item2attributes.json; "
        "default: the sibling file of the input)",
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="raw root to write events/dt=*/ and items/dt=*/ under (default: the configured raw root)",
    )
    p.set_defaults(func=run)


def run(args, cfg) -> int:
    if args.format not in LOADERS:
        raise UserError(f"unknown format {args.format!r}; known: {', '.join(LOADERS)}")
    out = args.out or cfg.raw_root
    events, items, stats = LOADERS[args.format](args.input, args.items)
    if not len(events):
        raise UserError(f"{args.input}: no events could be read (skipped: {stats['skipped']})")
    days = write_raw(events, items, out, fmt=args.format, window=stats.get("window"))
    print(f"{args.format}: {args.input}")
    print(
        f"  events {stats['events']:,}   users {stats['users']:,}   items {stats['items']:,}"
        f"   catalogue items {stats['catalogue_items']:,}"
    )
    print(f"  time {stats['first_ts']} .. {stats['last_ts']}")
    print(f"  days written {len(days)} ({days[0]} .. {days[-1]}) under {out}")
    skipped = ", ".join(f"{k}: {v}" for k, v in stats["skipped"].items()) or "none"
    print(f"  rows skipped {stats['rows_skipped']:,} ({skipped})")
    if stats.get("outside_window"):
        print(
            f"  outside {stats['window'][0]} .. {stats['window'][1]}: {stats['outside_window']}"
            " (kept; ingest will quarantine them)"
        )
    if stats.get("unmapped_event_types"):
        print(f"  unknown event types (kept; ingest will quarantine them): {stats['unmapped_event_types']}")
    return 0
