"""The drop date: how the CLI reads it, how days are counted, where a day starts and ends (UTC)."""

from __future__ import annotations

import argparse
import datetime as dt


def date_arg(value: str) -> dt.date:
    """argparse type for --dt / --start: YYYY-MM-DD."""
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {value!r}") from None


def date_range(start: dt.date, days: int) -> list[dt.date]:
    return [start + dt.timedelta(days=i) for i in range(days)]


def day_start(day: dt.date) -> float:
    """Seconds since the epoch of 00:00 UTC of `day`."""
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC).timestamp()


def day_end(day: dt.date) -> float:
    """Seconds since the epoch of the end of `day` (00:00 UTC of the next day)."""
    return day_start(day + dt.timedelta(days=1))


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()
