"""Bounded pieces of what a gate judges: row batches, and hash partitions of an id for uniqueness.

No gate holds a whole table, a whole day or all ids of a table. Rows are read
in batches of at most ``quality.batch_rows`` (`rebatch`), and Great Expectations
evaluates the suite on each batch's frame; the runner (jobs/steps/check.py)
sums their counts and keeps the first ``quality.examples`` examples.

A uniqueness check cannot be judged batch by batch: two copies of an id may
sit in different batches. `partitions` splits the rows by a stable hash of the
key instead, so that every copy of a key value lands in the same part, and GE
judges each part on its own; the counts summed are exactly those of one frame
of all rows. Part j of k holds the rows whose key hashes to j modulo k, k =
ceil(rows / ``quality.ids_per_pass``), so a part holds about
``ids_per_pass`` keys (a part that turns out larger is split in two, up to
`MAX_SPLITS` times: only one key value repeated more often than that can make a
part exceed the bound). The cost is one read of the key columns per part: k
passes over a column, instead of one frame of every id.

A null id is not compared by GE's column uniqueness; rows with a null id are
spread over the parts by position (so that a column of nulls does not land in
one part) and still counted (element and missing counts, and the not-null
expectation where a part carries it). Compound keys (GE compares their rows
with nulls too) hash null as a value of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

READ_ROWS = 65_536  # rows read from a file at once, at most (fewer when quality.batch_rows is smaller)
MAX_SPLITS = 6  # times a part larger than ids_per_pass is split again before it is taken as it is
_MIX = np.uint64(0x9E3779B97F4A7C15)  # combines the hashes of a compound key's columns


def read_rows(batch_rows: int) -> int:
    """Rows to read from storage at once for frames of at most `batch_rows` rows."""
    return max(1, min(batch_rows, READ_ROWS))


def rebatch(tables: Iterable[pa.Table], rows: int, empty: pa.Table | pa.Schema | None = None) -> Iterator[pa.Table]:
    """The rows of `tables` again, in order, in tables of `rows` rows (the last one fewer).

    Small reads (files, row groups, filtered batches) are joined up to `rows`, so that a suite pays GE's cost
    per frame once per `rows` rows, not once per file. At least one table comes out: `empty` (a table or a
    schema; default: the first input table's schema) when there is no row."""
    buf: list[pa.Table] = []
    held, yielded = 0, False
    schema = empty.schema if isinstance(empty, pa.Table) else empty
    for t in tables:
        schema = schema or t.schema
        if not t.num_rows:
            continue
        buf.append(t)
        held += t.num_rows
        while held >= rows:
            joined = pa.concat_tables(buf, promote_options="permissive") if len(buf) > 1 else buf[0]
            yield joined.slice(0, rows)
            yielded = True
            rest = joined.slice(rows)
            buf, held = ([rest] if rest.num_rows else []), rest.num_rows
    if held:
        yield pa.concat_tables(buf, promote_options="permissive") if len(buf) > 1 else buf[0]
    elif not yielded and schema is not None:
        yield schema.empty_table()


def hashes(t: pa.Table, key: list[str]) -> np.ndarray:
    """A stable 64-bit hash of each row's key values (null is a value of its own), the same for the same values
    in any batch, whatever the batch's physical types (values are hashed as their text)."""
    import pandas as pd

    out = None
    for c in key:
        text = pc.cast(t[c], pa.string()).to_numpy(zero_copy_only=False)
        h = pd.util.hash_array(np.asarray(text, dtype=object), categorize=False)
        out = h if out is None else out * _MIX + h
    return out


def all_null(t: pa.Table, key: list[str]) -> np.ndarray:
    mask = np.ones(t.num_rows, dtype=bool)
    for c in key:
        mask &= t[c].is_null().to_numpy(zero_copy_only=False)
    return mask


def bucket(t: pa.Table, key: list[str], modulus: int, first_row: int = 0, spread_nulls: bool = True) -> np.ndarray:
    """The part of each row, 0..modulus-1: its key's hash modulo `modulus`; with `spread_nulls`, a row whose key
    is all null goes by its position in the pass (`first_row`: the position of the table's first row)."""
    if modulus == 1:
        return np.zeros(t.num_rows, dtype=np.int64)
    out = (hashes(t, key) % np.uint64(modulus)).astype(np.int64)
    nulls = all_null(t, key) if spread_nulls else None
    if nulls is not None and nulls.any():
        out[nulls] = (first_row + np.flatnonzero(nulls)) % modulus
    return out


def parts_for(rows: int, ids_per_pass: int) -> int:
    """k: how many hash partitions keep a part at about `ids_per_pass` of `rows` rows."""
    return max(1, -(-rows // max(1, ids_per_pass)))


def partitions(
    read: Callable[[], Iterable[pa.Table]],
    key: list[str],
    rows: int,
    ids_per_pass: int,
    spread_nulls: bool = True,
    position: str | None = None,
) -> Iterator[tuple[int, int, pa.Table]]:
    """The rows `read()` gives (each call a new pass, in the same order), split into hash partitions of `key`
    (module doc): (modulus, residue, the part's rows) for each part, every row in exactly one part, and a row is
    in part (m, r) when `bucket(row, key, m) == r`. `rows` is how many rows a pass gives (it chooses k). Every
    part comes out, an empty one too, as long as `read()` gives a table (`Warehouse.scan` always does).
    `position`: a column added to each part with every row's position in the pass (to order examples as one
    frame of all rows would)."""
    k = parts_for(rows, ids_per_pass)
    todo = [(k, r) for r in range(k)]
    while todo:
        m, r = todo.pop(0)
        got: list[pa.Table] = []
        held, seen, schema, split = 0, 0, None, False
        for t in read():
            if position:
                t = t.append_column(position, pa.array(np.arange(seen, seen + t.num_rows, dtype=np.int64)))
            schema = t.schema
            part = t.filter(pa.array(bucket(t, key, m, seen, spread_nulls) == r)) if m > 1 else t
            seen += t.num_rows
            if not part.num_rows:
                continue
            got.append(part)
            held += part.num_rows
            if held > ids_per_pass and m < k << MAX_SPLITS:
                split = True  # hash skew: this part is too big to hold; its two halves are read instead
                break
        if split:
            got = []
            todo[:0] = [(2 * m, r), (2 * m, r + m)]
            continue
        if got:
            yield m, r, pa.concat_tables(got, promote_options="permissive") if len(got) > 1 else got[0]
        elif schema is not None:
            yield m, r, schema.empty_table()
