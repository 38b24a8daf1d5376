"""`userformer maintain`: vacuum beyond the retention window keeps the current tables intact."""

from __future__ import annotations

import pytest

from userformer.jobs import ingest, maintain, sequences
from userformer.jobs.common import UserError
from userformer.jobs.storage import delta

from .rawdata import D1, D2, D3, three_days

pytestmark = pytest.mark.spark


def test_vacuum_deletes_only_unreferenced_files(cfg, spark):
    three_days(cfg.raw_root)
    for d in (D1, D2, D3):
        ingest.ingest(cfg, d)
        sequences.update(cfg, d)
    ingest.ingest(cfg, D3)  # a rerun: the replaced files of D3 are garbage now
    seq_path = cfg.table_path("user_sequences")
    before = {t: delta.read_arrow(cfg.table_path(t)) for t in ("events", "user_sequences")}
    on_disk = len(list(seq_path.glob("*.parquet")))
    assert on_disk > len(delta.active_files(seq_path))

    # Within the default window nothing goes; a dry run with a zero window only lists.
    assert maintain.maintain(cfg)["tables"]["user_sequences"]["files_deleted"] == 0
    dry = maintain.maintain(cfg, dry_run=True, retention_days=0)
    assert dry["tables"]["user_sequences"]["files_to_delete"] == on_disk - len(delta.active_files(seq_path))
    assert len(list(seq_path.glob("*.parquet"))) == on_disk

    res = maintain.maintain(cfg, retention_days=0)
    assert res["tables"]["events"]["files_deleted"] >= 1
    assert len(list(seq_path.glob("*.parquet"))) == len(delta.active_files(seq_path))
    for t, data in before.items():
        assert delta.read_arrow(cfg.table_path(t)).equals(data), t
    # A rerun of D3 needs the vacuumed state before D3: refused with the way out, which works.
    with pytest.raises(UserError, match="was vacuumed"):
        sequences.update(cfg, D3)
    sequences.rebuild(cfg, upto=D3)
    assert delta.read_arrow(seq_path).sort_by("user_id").equals(before["user_sequences"].sort_by("user_id"))


def test_stale_staging_folders_are_cleared(cfg):
    import os
    import time

    stale = cfg.warehouse_root / "_staging" / "events" / "20200101T000000-dead"
    fresh = cfg.warehouse_root / "_staging" / "events" / "20990101T000000-live"
    for d in (stale, fresh):
        d.mkdir(parents=True)
        (d / "part-0.parquet").write_bytes(b"x")
    old = time.time() - 3 * 24 * 3600
    os.utime(stale, (old, old))
    res = maintain.maintain(cfg)
    assert res["stale_staging"] == [str(stale)]
    assert not stale.exists() and fresh.exists()
