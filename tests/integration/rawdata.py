"""Hand-made raw drops for the ingest/sequences tests: small, exact, every case visible."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from userformer.schemas.tables import RAW_EVENTS, RAW_ITEMS

D1, D2, D3 = dt.date(2026, 1, 1), dt.date(2026, 1, 2), dt.date(2026, 1, 3)

# These drops hold a few rows, many of them bad on purpose (quarantine, duplicates, late events): far outside the
# events gate's ratios and row-count band, which tests/unit/test_check.py and tests/integration/test_gates.py
# judge. The tests of these drops open the gate with these settings.
OPEN_GATE = {
    "USERFORMER__QUALITY__MAX_REJECTED_RATIO": "1",
    "USERFORMER__QUALITY__MAX_DUPLICATE_RATIO": "1",
    "USERFORMER__QUALITY__ROW_COUNT_BAND": "[0, 1000]",
}


def open_gate(monkeypatch) -> None:
    for k, v in OPEN_GATE.items():
        monkeypatch.setenv(k, v)


def ts(day: dt.date, hour: int, minute: int = 0) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=dt.UTC)


def events_table(rows: list[tuple]) -> pa.Table:
    """rows: (event_id, user_id, ts, event_type, item_id) with surface/duration filled in."""
    cols = list(zip(*rows)) if rows else [[]] * 5
    n = len(rows)
    return pa.table(
        {
            "event_id": pa.array(cols[0], pa.string()),
            "user_id": pa.array(cols[1], pa.string()),
            "ts": pa.array(cols[2], RAW_EVENTS.field("ts").type),
            "event_type": pa.array(cols[3], pa.string()),
            "item_id": pa.array(cols[4], pa.string()),
            "surface": ["home"] * n,
            "duration_s": [1.5] * n,
            "value": pa.nulls(n, pa.float64()),
            "query": pa.nulls(n, pa.string()),
        },
        schema=RAW_EVENTS,
    )


def write_drop(raw_root: Path, day: dt.date, table: pa.Table, name: str = "part-0.parquet") -> Path:
    d = Path(raw_root) / "events" / f"dt={day}"
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, d / name)
    return d / name


def write_items(raw_root: Path, day: dt.date, rows: list[tuple]) -> None:
    """rows: (item_id, l1, l2, l3, brand, price)."""
    d = Path(raw_root) / "items" / f"dt={day}"
    d.mkdir(parents=True, exist_ok=True)
    cols = list(zip(*rows))
    t = pa.table(
        {
            "item_id": cols[0],
            "category_l1": cols[1],
            "category_l2": cols[2],
            "category_l3": cols[3],
            "brand": cols[4],
            "title": [f"title {i}" for i in cols[0]],
            "price": cols[5],
        },
        schema=RAW_ITEMS,
    )
    pq.write_table(t, d / "items.parquet")


def three_days(raw_root: Path) -> None:
    """Three drops: duplicates within and across drops, a late event, an unknown item, bad rows."""
    write_items(
        raw_root,
        D1,
        [
            ("i1", "beauty", "skin", "cream", "B1", 10.0),
            ("i2", "beauty", "hair", None, "B2", 5.0),
            ("i3", "home", "kitchen", "pans", None, 30.0),
        ],
    )
    write_drop(
        raw_root,
        D1,
        events_table(
            [
                ("e1", "u1", ts(D1, 1), "view", "i1"),
                ("e2", "u1", ts(D1, 2), "cart", "i1"),
                ("e3", "u2", ts(D1, 3), "view", "i2"),
                ("e3", "u2", ts(D1, 3), "view", "i2"),  # duplicate within the drop
                (None, None, ts(D1, 4), "view", "i1"),  # null user
                ("e4", "u3", ts(D1, 5), "search", None),
                ("e5", "u3", ts(D1, 6), "clck", "i2"),  # unknown event type
                ("e6", "u3", ts(D1, 7), "view", None),  # item event without item
                ("e7", "u3", ts(D2, 12), "view", "i2"),  # in the future of drop D1
            ]
        ),
    )
    write_drop(
        raw_root,
        D2,
        events_table(
            [
                ("e8", "u1", ts(D2, 1), "purchase", "i1"),
                ("e9", "u2", ts(D1, 23), "view", "i3"),  # late: happened on D1
                ("e1", "u1", ts(D1, 1), "view", "i1"),  # delivered again (was in D1)
                ("e10", "u4", ts(D2, 5), "view", "i9"),  # item not in the catalogue
                (None, "u4", ts(D2, 6), "search", None),  # no event_id: content hash
            ]
        ),
    )
    write_drop(
        raw_root,
        D3,
        events_table(
            [
                ("e11", "u1", ts(D3, 1), "view", "i2"),
                ("e12", "u2", ts(D3, 2), "view", "i2"),
                ("e13", "u2", ts(D2, 22), "cart", "i3"),  # late
            ]
        ),
    )
