"""Small things every step shares: the user-facing error and argument types."""

from __future__ import annotations

import argparse
import datetime as dt


class UserError(Exception):
    """Bad input or a failed gate: the CLI prints it as one clear message and exits with `code`."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class GateFailed(UserError):
    """A data-quality gate failed: nothing downstream runs or is published. Exit code 1; never retried."""

    def __init__(self, message: str):
        super().__init__(message, code=1)


def date_arg(value: str) -> dt.date:
    """argparse type for --dt / --start: YYYY-MM-DD."""
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {value!r}") from None


def date_range(start: dt.date, days: int) -> list[dt.date]:
    return [start + dt.timedelta(days=i) for i in range(days)]
