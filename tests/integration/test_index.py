"""`index` / `candidates` / the API on outputs published by the real `infer` + `publish` (Spark-built warehouse).

Uses the warehouse and the tiny trained model of tests/integration/test_infer.py (300 users, 400 items).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from tests.integration.test_infer import D3, D4, new_version, registry, run_day, setup  # noqa: F401 (fixtures)
from tests.integration.test_train import warehouse  # noqa: F401 (fixture)
from userformer.jobs.core import registry as model_registry
from userformer.jobs.core.errors import UserError
from userformer.jobs.core.storage import delta
from userformer.jobs.steps import candidates, release
from userformer.jobs.steps import index as index_step
from userformer.jobs.tools import serve

pytestmark = pytest.mark.spark


def exact_top(cfg, users: list[str], n: int) -> dict[str, list[int]]:
    """Brute force over the published tables: each user's top-n item_idx by dot product."""
    it = delta.read_arrow(cfg.table_path("item_embeddings"), columns=["item_idx", "embedding"])
    ue = delta.read_arrow(
        cfg.table_path("user_embeddings"), columns=["user_id", "embedding"], filter=index_step.str_in("user_id", users)
    )  # string_view files: see index_step.str_field
    iv, uv = index_step.vectors_of(it["embedding"]), index_step.vectors_of(ue["embedding"])
    order = np.argsort(-(uv @ iv.T), axis=1, kind="stable")[:, :n]
    ids = it["item_idx"].to_numpy()
    return {u: ids[o].tolist() for u, o in zip(ue["user_id"].to_pylist(), order)}


def test_published_outputs_to_index_candidates_and_recommendations(setup):  # noqa: F811
    cfg = setup()
    cfg.index.candidates_n = 15
    v1 = model_registry.published(cfg)["version"]
    run_day(cfg, D3)
    n_items = delta.read_arrow(cfg.table_path("item_embeddings"), columns=["item_idx"]).num_rows
    res = index_step.build_index(cfg, D3)
    m = res.manifest
    assert res.status == "current" and m["kind"] == "flat" and m["items"] == n_items and m["model_version"] == v1
    assert m["recall_query_source"] == "user_embeddings" and m["recall_at_10"] == 1.0 and m["dimension"] == 16

    out = candidates.candidates(cfg, D3)
    cand = delta.read_arrow(cfg.table_path("user_candidates"))
    all_users = delta.read_arrow(cfg.table_path("user_embeddings"), columns=["user_id"])["user_id"].to_pylist()
    assert out["written"] == cand.num_rows == len(all_users)  # the first publish embedded everyone
    sample = sorted(all_users)[:20]
    ref = exact_top(cfg, sample, 15)
    got = {r["user_id"]: r["item_idx"] for r in cand.filter(pc.is_in(cand["user_id"], pa.array(sample))).to_pylist()}
    assert got == ref
    rel = release.release(cfg, D3)
    assert rel["changed"] and rel["dt"] == str(D3) and rel["index"]["version"] == res.version
    assert rel["tables"]["user_candidates"] == delta.version_of(cfg.table_path("user_candidates"))

    # D4: a few users refreshed; the catalogue grew, so item_embeddings was rewritten and the index is rebuilt.
    before = {r["user_id"]: r for r in delta.read_arrow(cfg.table_path("user_candidates")).to_pylist()}
    run_day(cfg, D4)
    # Published, not released: readers keep D3 (its users, its index), and D4 cannot be released before its index
    # and candidates exist.
    with pytest.raises(release.NotReady, match="is not the checked index of what 2026-11-04 published") as e:
        release.release(cfg, D4)
    assert e.value.code == 2
    assert serve.Recommender(cfg).snapshot["dt"] == str(D3) and serve.Recommender(cfg).index.version == res.version
    ue = delta.read_arrow(cfg.table_path("user_embeddings"), columns=["user_id", "as_of"])
    day_users = set(ue.filter(pc.equal(ue["as_of"], pa.scalar(D4, pa.date32())))["user_id"].to_pylist())
    assert 0 < len(day_users) < len(ue)
    r4 = index_step.build_index(cfg, D4)
    assert r4.status == "current" and r4.version != res.version and r4.manifest["items"] > n_items
    with pytest.raises(release.NotReady, match="user_candidates holds no candidates of 2026-11-04"):
        release.release(cfg, D4)
    assert serve.Recommender(cfg).index.version == res.version  # kept by retention while it is released
    out4 = candidates.candidates(cfg, D4)
    assert out4["written"] == len(day_users)
    after = {r["user_id"]: r for r in delta.read_arrow(cfg.table_path("user_candidates")).to_pylist()}
    for u, r in after.items():
        if u in day_users:
            assert r["as_of"] == D4 and r["index_version"] == r4.version
        else:
            assert r == before[u]
    ref = exact_top(cfg, sorted(day_users)[:10], 15)
    assert {u: after[u]["item_idx"] for u in ref} == ref
    assert release.release(cfg, D4)["changed"] and not release.release(cfg, D4)["changed"]
    assert release.release(cfg, D3)["skipped"].startswith("the published snapshot is of 2026-11-04")

    # The API over the same outputs, with the user's real purchases from events.
    ev = delta.read_arrow(
        cfg.table_path("events"),
        columns=["user_id", "item_idx"],
        filter=index_step.str_field("event_type") == "purchase",
    )
    buyer = next(u for u in ev["user_id"].to_pylist() if u in after)
    bought = set(ev.filter(pc.equal(ev["user_id"], buyer))["item_idx"].to_pylist()) - {0}
    r = serve.Recommender(cfg)
    full = [h.item_idx for h in r.recommend(buyer, k=400)]
    assert [h.item_idx for h in r.recommend(buyer, k=10, exclude_purchased=True)] == [
        i for i in full if i not in bought
    ][:10]
    assert r.purchased(buyer) == bought
    items = delta.read_arrow(cfg.table_path("item_embeddings"), columns=["item_id", "item_idx", "embedding"])
    iv = index_step.vectors_of(items["embedding"])
    j = int(np.argmax(items["item_idx"].to_numpy() == sorted(bought)[0]))
    nearest = [int(items["item_idx"][int(x)].as_py()) for x in np.argsort(-(iv @ iv[j]), kind="stable") if x != j][:3]
    assert [h.item_idx for h in r.similar_items(items["item_id"][j].as_py(), k=3)] == nearest

    # A new model published but not yet inferred: item_embeddings is still v1, so index refuses.
    v2 = new_version(cfg, D4)
    with pytest.raises(UserError, match=f"item_embeddings holds model version {v1} but the published model is {v2}"):
        index_step.build_index(cfg, D4, force=True)
    assert index_step.current(cfg)["version"] == r4.version
    # Readers keep the released day of the old model meanwhile: recommendations still work.
    assert serve.Recommender(cfg).recommend(buyer, k=3)
