"""`userformer maintain`: compaction, purge of deletion vectors and vacuum beyond the retention window keep the
current tables intact."""

from __future__ import annotations

import os
import time

import pytest

from userformer.jobs.core.errors import UserError
from userformer.jobs.core.storage import delta
from userformer.jobs.steps import ingest, sequences
from userformer.jobs.tools import maintain

from .rawdata import D1, D2, D3, open_gate, three_days

pytestmark = pytest.mark.spark


@pytest.fixture(autouse=True)
def _open_gate(home, monkeypatch):
    """Every test here runs on hand-made drops: the events gate is opened for them (rawdata.OPEN_GATE)."""
    open_gate(monkeypatch)


def test_vacuum_deletes_only_unreferenced_files(cfg, spark):
    three_days(cfg.raw_root)
    for d in (D1, D2, D3):
        ingest.ingest(cfg, d)
        sequences.update(cfg, d)
    ingest.ingest(cfg, D3)  # a rerun: the replaced files of D3 are garbage now
    seq_path = cfg.table_path("user_sequences")
    before = {t: delta.read_arrow(cfg.table_path(t)) for t in ("events", "user_sequences")}
    # One file per day (the first write, then each day's MERGE), deletion vectors for the replaced rows.
    assert len(delta.active_files(seq_path)) == 3 and list(seq_path.glob("deletion_vector_*.bin"))

    # Within the default window: the day files are compacted into one without deletion vectors; nothing goes.
    res = maintain.maintain(cfg)["tables"]
    assert res["user_sequences"]["files_deleted"] == 0
    assert res["user_sequences"]["optimize"]["numRemovedFiles"] == 3
    assert len(delta.active_files(seq_path)) == 1
    assert all(f.keep is None for f in delta.data_files(seq_path))
    assert delta.history(seq_path, 1)[0]["operation"].startswith("VACUUM")
    on_disk = list(seq_path.glob("*.parquet")) + list(seq_path.glob("deletion_vector_*.bin"))
    assert len(on_disk) > 1
    # A window under storage.min_retention_days is refused, changing nothing ...
    with pytest.raises(UserError, match="under storage.min_retention_days"):
        maintain.maintain(cfg, retention_days=0)
    # ... unless the floor is lowered. A dry run with a zero window only lists (old data files and deletion vectors).
    cfg.storage.min_retention_days = 0
    dry = maintain.maintain(cfg, dry_run=True, retention_days=0)
    assert dry["tables"]["user_sequences"]["files_to_delete"] == len(on_disk) - 1
    assert len(list(seq_path.glob("*.parquet")) + list(seq_path.glob("deletion_vector_*.bin"))) == len(on_disk)

    res = maintain.maintain(cfg, retention_days=0)
    assert res["tables"]["events"]["files_deleted"] >= 1
    assert res["tables"]["user_sequences"]["files_deleted"] == len(on_disk) - 1
    assert res["tables"]["vocab"]["files_deleted"] == 0  # delta-rs tables: delta-rs vacuum, as before
    assert len(list(seq_path.glob("*.parquet"))) == len(delta.active_files(seq_path)) == 1
    assert not list(seq_path.glob("deletion_vector_*.bin"))
    for t, data in before.items():
        assert (
            delta.read_arrow(cfg.table_path(t))
            .sort_by("event_id" if t == "events" else "user_id")
            .equals(data.sort_by("event_id" if t == "events" else "user_id"))
        ), t
    # A rerun of D3 needs the vacuumed state before D3: refused with the way out, which works.
    with pytest.raises(UserError, match="was vacuumed"):
        sequences.update(cfg, D3)
    sequences.rebuild(cfg, upto=D3)
    assert delta.read_arrow(seq_path).sort_by("user_id").equals(before["user_sequences"].sort_by("user_id"))


def test_stale_staging_folders_are_cleared(cfg):
    stale = cfg.warehouse_root / "_staging" / "user_candidates" / "20200101T000000-dead"
    killed = cfg.warehouse_root / "_staging" / "user_candidates" / "20990101T000000-killed"  # a writer's: none runs
    waiting = cfg.warehouse_root / "_staging" / "infer" / "dt=2099-01-01"  # staged inference waiting for publish
    in_use = cfg.warehouse_root / "_staging" / "infer" / "dt=2020-01-01"  # an old folder a run writes into now
    old_infer = cfg.warehouse_root / "_staging" / "infer" / "dt=2019-01-01"
    for d in (stale, killed, waiting, in_use / "model=m1", old_infer):
        d.mkdir(parents=True)
        (d / "part-0.parquet").write_bytes(b"x")
    old = time.time() - 3 * 24 * 3600
    for p in (stale / "part-0.parquet", stale, in_use / "model=m1", in_use, old_infer / "part-0.parquet", old_infer):
        os.utime(p, (old, old))
    dry = maintain.maintain(cfg, dry_run=True)
    assert sorted(dry["stale_staging"]) == sorted([str(stale), str(old_infer)])  # a dry run holds no lease
    res = maintain.maintain(cfg)
    assert sorted(res["stale_staging"]) == sorted([str(stale), str(killed), str(old_infer)])  # infer's by age
    assert not stale.exists() and not killed.exists() and not old_infer.exists()
    assert waiting.exists() and in_use.exists()


def test_log_retention_follows_the_window_and_orphans_go(cfg, spark):
    three_days(cfg.raw_root)
    ingest.ingest(cfg, D1)
    vocab = cfg.table_path("vocab")
    # A writer killed between writing its file and committing it leaves an orphan no version names.
    orphan = vocab / "part-00000-killed-writer.parquet"
    orphan.write_bytes((next(vocab.glob("*.parquet"))).read_bytes())
    cfg.storage.min_retention_days = 0
    maintain.maintain(cfg, retention_days=10)
    for name in ("vocab", "events"):
        conf = delta.open_table(cfg.table_path(name)).metadata().configuration
        assert conf["delta.logRetentionDuration"] == conf["delta.deletedFileRetentionDuration"] == "interval 240 hours"
    assert orphan.exists()  # younger than the window: it might be a writer's file about to be committed
    old = 20 * 86400
    os.utime(orphan, (time.time() - old, time.time() - old))
    maintain.maintain(cfg, retention_days=10)
    assert not orphan.exists()
    ops = [h["operation"] for h in delta.history(vocab)]
    assert ops.count("SET TBLPROPERTIES") == 1  # aligned once; the second run found them aligned
