"""A day whose new items arrive without any metadata still publishes: the grown model gives them unit vectors."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.integration import warehouses
from userformer.jobs.core import registry
from userformer.jobs.core.storage import delta
from userformer.jobs.flows import pipeline

pytestmark = pytest.mark.spark
D3 = warehouses.D2 + dt.timedelta(days=1)


def test_a_day_of_items_without_metadata_publishes(tmp_path):
    cfg = warehouses.two_days(tmp_path / "home")
    assert registry.published(cfg) is not None
    # Day 3: day 2's events a day later, a tenth of them on five items no snapshot has ever described.
    raw = pq.read_table(cfg.raw_events_dir(warehouses.D2)).to_pandas()
    raw["ts"] = raw["ts"] + dt.timedelta(days=1)
    raw["event_id"] = raw["event_id"].astype("string") + "-d3"
    cold = raw.index[(raw["item_id"].notna()) & (np.arange(len(raw)) % 10 == 0)]
    raw.loc[cold, "item_id"] = [f"cold-{i % 5}" for i in range(len(cold))]
    out = cfg.raw_events_dir(D3)
    out.mkdir(parents=True)
    pq.write_table(pa.Table.from_pandas(raw, preserve_index=False), out / "part-0.parquet")
    (out / cfg.pipeline.ready_marker).touch()

    pipeline.run_day(cfg, D3, skip_finetune=True)

    items = delta.read_arrow(cfg.table_path("items"))
    new = items.filter(pc.starts_with(items["item_id"], "cold-"))
    assert new.num_rows == 5 and not any(new["has_metadata"].to_pylist())
    vecs = delta.read_arrow(cfg.table_path("item_embeddings"))
    mine = vecs.filter(pc.is_in(vecs["item_idx"], new["item_idx"]))
    norms = np.linalg.norm(np.array(mine["embedding"].to_pylist(), np.float64), axis=1)
    assert mine.num_rows == 5 and np.allclose(norms, 1.0, atol=1e-3)
