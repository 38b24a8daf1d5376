"""`delta.dataset`: a local table's pyarrow dataset reads its files with Arrow's own filesystem, so that a process
exits cleanly after a read. delta-rs's default reads through a Python filesystem handler, whose file objects Arrow's
worker threads may still hold after the read returned: in an exiting interpreter a worker that then takes the GIL is
ended by Python, and the process aborts with "terminate called without an active exception"."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import pyarrow as pa
import pyarrow.fs as pafs
from deltalake import DeltaTable, write_deltalake

from userformer.jobs.core.storage import delta


def test_local_tables_read_through_arrows_filesystem_with_the_same_rows(tmp_path):
    path = tmp_path / "t"
    # Partition values that are percent-encoded in the folder names.
    rows = pa.table({"k": ["a b:c%/x", "plain", "ü"], "dt": [dt.date(2026, 11, 1)] * 3, "v": [1, 2, 3]})
    write_deltalake(str(path), rows, partition_by=["k", "dt"])
    t = delta.open_table(path)
    ds = delta.dataset(t)
    assert isinstance(ds.filesystem, pafs.SubTreeFileSystem)
    assert isinstance(ds.filesystem.base_fs, pafs.LocalFileSystem)
    mine = ds.to_table().sort_by("v")
    assert mine.equals(DeltaTable(str(path)).to_pyarrow_dataset().to_table().sort_by("v"))
    assert delta.read_arrow(path, columns=["k", "v"]).sort_by("v").to_pylist() == mine.select(["k", "v"]).to_pylist()


def test_a_process_exits_after_reads_even_one_left_unfinished(tmp_path):
    """With delta-rs's Python handler the process below never exits (a scan left after its first batch keeps
    Arrow's workers on Python files: they deadlock with the finalizing interpreter), and a finished read aborted
    the exit now and then; both are the same worker threads holding Python objects."""
    path = tmp_path / "t"
    for i in range(4):
        rows = pa.table({"user_id": [f"u{i}_{j}" for j in range(20_000)], "n": range(20_000)})
        write_deltalake(str(path), rows, mode="append")
    script = (
        "import sys\nfrom userformer.jobs.core.storage import delta\n"
        "print(delta.read_arrow(sys.argv[1], columns=['user_id', 'n']).num_rows)\n"
        "print(next(delta.scan(sys.argv[1], columns=['user_id', 'n'], batch_size=1000)).num_rows)\n"
    )
    r = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split() == ["80000", "1000"], (r.returncode, r.stderr[-2000:])
