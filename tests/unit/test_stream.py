"""Streaming user_sequences from Delta in chunks: bounded chunks, every user once per epoch, shuffled, deterministic."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from userformer.jobs.core import dates, stream
from userformer.jobs.core.storage import delta
from userformer.schemas import tables

DAY = dt.date(2026, 11, 3)
T0 = dates.day_start(DAY)


def seq_rows(users: range, day: dt.date) -> pa.Table:
    """One row per user: `n` events an hour apart ending at noon of `day`, items u, u+1, ..."""
    rows = []
    for u in users:
        n = 1 + u % 5
        ts = [
            dt.datetime.fromtimestamp(dates.day_start(day) + 12 * 3600 - (n - 1 - k) * 3600, dt.UTC) for k in range(n)
        ]
        rows.append(
            {
                "user_id": f"u{u:04d}",
                "item_idx": [u % 50 + k + 1 for k in range(n)],
                "event_type_idx": [1] * n,
                "ts": ts,
                "category_l1_idx": [1] * n,
                "category_l2_idx": [0] * n,
                "category_l3_idx": [0] * n,
                "brand_idx": [2] * n,
                "surface_idx": [1] * n,
                "duration_s": [None] * n,
                "seq_len": n,
                "lifetime_events": n,
                "lifetime_counts": [("view", n)],
                "first_event_ts": ts[0],
                "last_event_ts": ts[-1],
                "updated_dt": day,
            }
        )
    return pa.Table.from_pylist(rows, schema=tables.USER_SEQUENCES)


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "user_sequences"
    for i, (lo, hi) in enumerate([(0, 130), (130, 200), (200, 333)]):  # three files
        delta.write_arrow(path, seq_rows(range(lo, hi), DAY - dt.timedelta(days=2 - i)), tables.USER_SEQUENCES)
    return path


def test_chunks_are_bounded_cover_every_user_once_and_shuffle(table):
    src = stream.DeltaSequences(table, delta.version_of(table), 40, min_len=1)
    assert src.n_rows == 333 and len(src.pieces) == 3
    src.summarise(60)
    assert src.n_users == 333 and src.n_sequences == 333

    def epoch(seed):
        chunks = list(src.tables(np.random.default_rng(seed)))
        assert all(c.num_rows <= 40 for c in chunks)
        return [u for c in chunks for u in c["user_id"].to_pylist()]

    a, b, again = epoch(1), epoch(2), epoch(1)
    assert sorted(a) == [f"u{u:04d}" for u in range(333)]  # every user exactly once
    assert a == again and a != b  # deterministic by seed, different per epoch
    assert a != sorted(a)  # files interleaved, not read one after the other
    plain = [u for c in src.tables() for u in c["user_id"].to_pylist()]  # no rng: file after file, as stored
    ends = np.cumsum([p.rows for p in src.pieces])
    files = [plain[s:e] for s, e in zip([0, *ends[:-1]], ends)]
    assert sorted(plain) == sorted(a) and all(f == sorted(f) for f in files)  # three files, each sorted by user_id
    # The files' order is set by what they hold (rows, statistics), not by their random names.
    assert [p.rows for p in src.pieces] == sorted(p.rows for p in src.pieces)


def test_time_cut_selection_and_counts(table):
    v = delta.version_of(table)
    cut = T0 + 11.5 * 3600  # on DAY, drops the noon event of the newest file's users
    src = stream.DeltaSequences(
        table, v, 64, t_max=cut, select=lambda t: np.array([int(u[1:]) % 2 == 0 for u in t["user_id"].to_pylist()])
    )
    src.summarise(60)
    seen = [u for c in src.chunks(np.random.default_rng(0)) for u in c.user_ids]
    # even users; those of the newest file lose their last event and need 2 left to be trained on
    want = [u for u in range(0, 333, 2) if (1 + u % 5) - (u >= 200) >= 2]
    assert sorted(seen) == [f"u{u:04d}" for u in want] and src.n_sequences == len(want)
    assert all((c.ts < cut).all() for c in src.chunks())
    assert src.item_counts(60).sum() == sum((1 + u % 5) - (u >= 200) for u in want)


def test_window_users_sample_does_not_depend_on_chunking(table):
    v = delta.version_of(table)
    start, end = T0 + 11.5 * 3600, T0 + 13 * 3600  # DAY's noon events are the positives

    def collect(chunk):
        w = stream.WindowUsers(start, end, cap=25, salt="s")
        stream.DeltaSequences(table, v, chunk).summarise(60, (w,))
        return w

    w7, w100 = collect(7), collect(100)
    assert w7.total == w100.total == 133  # users of the newest file
    e7, e100 = w7.result(), w100.result()
    assert len(e7.targets) == 25 and list(e7.history.user_ids) == list(e100.history.user_ids)
    for i, u in enumerate(e7.history.user_ids):
        k = int(u[1:])
        n = 1 + k % 5
        assert e7.history.lengths[i] == n - 1 and list(e7.target_sets[i]) == [k % 50 + n]
    assert np.all(e7.ref_ts == start)
