"""The item index (jobs/steps/index.py) and its gate (jobs/steps/quality/index.py), user_candidates
(jobs/steps/candidates.py) and the downstream API/CLI (jobs/tools/serve.py).

The published tables are written here directly with delta.write_arrow (synthetic clustered unit vectors),
so these tests do not depend on `infer` / `publish`; `show` then makes their latest versions the published
snapshot, as a release would (jobs/steps/release.py is tested on real publishes). Small catalogues, d=16: fast.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from userformer.jobs.core import snapshot
from userformer.jobs.core.config import load_config
from userformer.jobs.core.errors import GateFailed, UserError
from userformer.jobs.core.ledger import read_ledger
from userformer.jobs.core.storage import delta
from userformer.jobs.flows import pipeline
from userformer.jobs.steps import candidates, check, index
from userformer.jobs.tools import serve
from userformer.schemas import tables

EXE = str(Path(sys.executable).parent / "userformer")
D1, D2 = dt.date(2026, 1, 6), dt.date(2026, 1, 7)
MV = "v0001-20260105-train"
DIM = 16

# Small thresholds so that a few thousand items exercise every index kind.
TEST_ENV = {
    "USERFORMER__INDEX__FLAT_MAX_ITEMS": "1000",
    "USERFORMER__INDEX__HNSW_MAX_ITEMS": "3000",
    "USERFORMER__INDEX__HNSW_M": "16",
    "USERFORMER__INDEX__HNSW_EF_CONSTRUCTION": "40",
    "USERFORMER__INDEX__HNSW_EF_SEARCH": "64",
    "USERFORMER__INDEX__IVF_NPROBE": "16",
    "USERFORMER__INDEX__RECALL_SAMPLE": "200",
    "USERFORMER__INDEX__CANDIDATES_N": "20",
    "USERFORMER__INDEX__CANDIDATES_BATCH_USERS": "64",
    "USERFORMER__INDEX__VERSIONS_KEPT": "2",
    "USERFORMER__INDEX__THREADS": "2",
}


@pytest.fixture
def icfg(home, monkeypatch):
    for k, v in TEST_ENV.items():
        monkeypatch.setenv(k, v)
    return load_config()


# ------------------------------------------------------------------ data
def show(cfg, day=D1) -> dict:
    """Publish the tables' latest versions and the CURRENT index to readers (the snapshot a release writes)."""
    ptr = index.current(cfg)
    rec = {
        "dt": str(day),
        "model_version": ptr["model_version"],
        "tables": {t: delta.version_of(cfg.table_path(t)) for t in snapshot.TABLES},
        "index": {"version": ptr["version"], "model_version": ptr["model_version"]},
    }
    return snapshot.flip(cfg, rec)


def clustered(n: int, seed: int, clusters: int = 40, spread: float = 0.5) -> np.ndarray:
    """Unit vectors around `clusters` random centres (the same centres for every seed)."""
    centres = np.random.default_rng(1234).standard_normal((clusters, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, clusters, n)] + spread / np.sqrt(DIM) * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def vec_col(x: np.ndarray) -> pa.Array:
    return pa.array([row for row in x.astype(np.float32)], pa.list_(pa.float32()))


def write_items(cfg, n: int, *, mv: str = MV, as_of=D1, seed: int = 1, versions: list[str] | None = None) -> np.ndarray:
    x = clustered(n, seed)
    t = pa.table(
        {
            "item_id": [f"i{j}" for j in range(n)],
            "item_idx": pa.array(np.arange(1, n + 1), pa.int64()),  # item_idx = j + 1
            "embedding": vec_col(x),
            "has_metadata": [True] * n,
            "model_version": versions or [mv] * n,
            "as_of": pa.array([as_of] * n, pa.date32()),
        }
    )
    delta.write_arrow(cfg.table_path("item_embeddings"), t, tables.ITEM_EMBEDDINGS, mode="overwrite")
    return x


def user_rows(users: list[str], x: np.ndarray, as_of, mv: str = MV) -> pa.Table:
    n = len(users)
    return pa.table(
        {
            "user_id": users,
            "embedding": vec_col(x),
            "model_version": [mv] * n,
            "as_of": pa.array([as_of] * n, pa.date32()),
            "updated_at": pa.array([dt.datetime(2026, 1, 8, tzinfo=dt.UTC)] * n, tables.TS),
        }
    )


def write_users(cfg, n: int, as_of=D1, seed: int = 2, mv: str = MV) -> np.ndarray:
    x = clustered(n, seed)
    delta.write_arrow(
        cfg.table_path("user_embeddings"),
        user_rows([f"u{j}" for j in range(n)], x, as_of, mv),
        tables.USER_EMBEDDINGS,
        mode="overwrite",
    )
    return x


def refresh_users(cfg, users: list[str], as_of, seed: int) -> np.ndarray:
    """New embeddings for `users` as of `as_of` (what publish's MERGE leaves behind), one commit."""
    x = clustered(len(users), seed)
    path = cfg.table_path("user_embeddings")
    (
        delta.open_table(path)
        .merge(
            user_rows(users, x, as_of).cast(tables.USER_EMBEDDINGS),
            "t.user_id = s.user_id",
            source_alias="s",
            target_alias="t",
        )
        .when_matched_update_all()
        .when_not_matched_insert_all()
        .execute()
    )
    return x


def write_purchases(cfg, rows: list[tuple[str, int]], day=D1) -> None:
    """events rows of type purchase for (user_id, item_idx), plus one view per user (not a purchase)."""
    rows = rows + [(u, 1) for u, _ in rows[:1]]
    types = ["purchase"] * (len(rows) - 1) + ["view"]
    n = len(rows)
    cols = {
        "dt": pa.array([day] * n, pa.date32()),
        "event_id": [f"e{j}" for j in range(n)],
        "user_id": [u for u, _ in rows],
        "ts": pa.array([dt.datetime.combine(day, dt.time(12), dt.UTC)] * n, tables.TS),
        "event_type": types,
        "event_type_idx": pa.array([1] * n, pa.int32()),
        "item_id": [f"i{i - 1}" for _, i in rows],
        "item_idx": pa.array([i for _, i in rows], pa.int64()),
    }
    for f in tables.EVENTS:
        if f.name not in cols:
            cols[f.name] = pa.nulls(n, f.type)
    delta.write_arrow(cfg.table_path("events"), pa.table(cols), tables.EVENTS, partition_by=["dt"])


def exact(items: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """item_idx (= position + 1) of the exact top k."""
    return np.argsort(-(q @ items.T), axis=1, kind="stable")[:, :k] + 1


# ------------------------------------------------------------------ index
def test_kind_follows_catalogue_size(icfg):
    assert [index.choose_kind(icfg, n) for n in (10, 1000, 1001, 3000, 3001)] == ["flat", "flat", "hnsw", "hnsw", "ivf"]
    icfg.index.kind = "hnsw"
    assert index.choose_kind(icfg, 10) == "hnsw"
    p = index.build_params(load_config(env={"USERFORMER_HOME": "/x"}), "ivf", 1_000_000, 64)
    assert p["nlist"] == 1000 and p["nprobe"] == 32 and p["train_size"] == 200_000


@pytest.mark.parametrize(
    "n, kind, cls",
    [
        (600, "flat", "IndexIDMap2(IndexFlatIP)"),
        (2000, "hnsw", "IndexIDMap2(IndexHNSWFlat)"),
        (4000, "ivf", "IndexIVFFlat"),
    ],
)
def test_build_by_size_measures_recall_and_switches(icfg, n, kind, cls):
    items = write_items(icfg, n)
    users = write_users(icfg, 300)
    res = index.build_index(icfg, D1)
    m = res.manifest
    assert res.status == "current" and res.check.success, index.json.dumps(res.check.to_dict(), indent=1)[:2000]
    assert m["kind"] == kind and m["index_class"] == cls and m["items"] == n and m["dimension"] == DIM
    assert m["model_version"] == MV and m["as_of"] == str(D1) and m["item_embeddings_as_of"] == [str(D1)] * 2
    assert m["item_embeddings_version"] == delta.version_of(icfg.table_path("item_embeddings"))
    assert m["recall_query_source"] == "user_embeddings" and m["recall_sample"] == 200
    assert m["recall_at_10"] >= 0.9 and m["build_seconds"] >= 0
    if kind == "flat":
        assert m["recall_at_10"] == 1.0
    if kind == "hnsw":
        assert m["params"] == {"metric": "inner_product", "M": 16, "efConstruction": 40, "efSearch": 64}
    if kind == "ivf":
        assert m["params"]["nlist"] == 63 and m["params"]["nprobe"] == 16  # ~sqrt(4000)
    assert index.current(icfg)["version"] == res.version == "i0001-20260106"
    vdir = icfg.index_root / "versions" / res.version
    assert {p.name for p in vdir.iterdir()} == {"index.faiss", "items.parquet", "manifest.json"}
    assert json.loads((vdir / "manifest.json").read_text()) == json.loads(json.dumps(m))
    assert pq.read_table(vdir / "items.parquet").column_names == ["item_idx", "item_id"]
    # FAISS ids are item_idx; the opened index reproduces exact search closely.
    opened = index.open_current(icfg)
    _, labels = opened.search(users[:50], 10)
    truth = exact(items, users[:50], 10)
    assert index.recall_at_k(truth, labels) >= 0.9
    assert np.allclose(opened.vector(5), items[4], atol=1e-6)
    assert opened.ids_of(np.array([1, n]))[1] == f"i{n - 1}"
    report = json.loads((icfg.reports_root / "checks" / "index" / f"dt={D1}.json").read_text())
    assert report["success"] and report["table"] == "index"
    assert (icfg.reports_root / "checks" / "index" / f"dt={D1}.html").exists()


def test_item_queries_when_there_are_no_users(icfg):
    write_items(icfg, 500)
    m = index.build_index(icfg, D1).manifest
    assert m["recall_query_source"] == "item_embeddings" and m["user_embeddings_version"] is None


def test_rerun_is_a_noop_unless_forced_or_inputs_change(icfg):
    write_items(icfg, 500)
    first = index.build_index(icfg, D1)
    again = index.build_index(icfg, D1)
    assert again.status == "unchanged" and again.version == first.version
    assert index.list_versions(icfg) == [first.version]
    forced = index.build_index(icfg, D1, force=True)
    assert forced.status == "current" and forced.version == "i0002-20260106" and forced.previous == first.version
    write_items(icfg, 500, seed=5)  # new item_embeddings version: a new index
    new = index.build_index(icfg, D2)
    assert new.status == "current" and new.version == "i0003-20260107"
    assert index.current(icfg) == {**index.current(icfg), "version": new.version, "previous": forced.version}


def test_refuses_mixed_model_versions_and_unpublished_version(icfg):
    write_items(icfg, 10, versions=[MV] * 6 + ["v0002-20260106-finetune"] * 4)
    with pytest.raises(
        UserError,
        match=r"mixes model versions: v0001-20260105-train \(6 rows\), "
        r"v0002-20260106-finetune \(4 rows\)",
    ):
        index.build_index(icfg, D1)
    write_items(icfg, 10)
    icfg.models_root.mkdir(parents=True)
    (icfg.models_root / "PUBLISHED").write_text(json.dumps({"version": "v0002-20260106-finetune"}))
    with pytest.raises(UserError, match="published model is v0002-20260106-finetune"):
        index.build_index(icfg, D1)
    assert index.current(icfg) is None


def test_index_gate_is_a_check_suite(icfg):
    """The build ran the `index` suite on its version; `check index` and the pipeline's check_index run it on
    CURRENT, against item_embeddings as it is now."""
    res = check.check(icfg, "index", D1)
    assert not res.success and "no item index is current" in res.error  # nothing built yet
    write_items(icfg, 500)
    write_users(icfg, 50)
    built = index.build_index(icfg, D1)
    m = built.manifest
    assert m["status"] == "current" and m["check"] == {"success": True, "failed": []}
    assert m["recall_sample"] == 50 and m["recall_query_source"] == "user_embeddings" and m["recall_seconds"] >= 0
    assert built.check.facts["version"] == built.version and built.check.facts["recall_at_10"] == m["recall_at_10"]
    res = check.check(icfg, "index", D1)
    assert res.success and res.facts["version"] == built.version and res.facts["recall_at_10"] == 1.0
    # The build measured recall on these very inputs: the gate on CURRENT takes that measurement (no second
    # exact search); on another day (other queries) it measures again.
    assert built.check.facts["recall_measured"] == "now"
    assert res.facts["recall_measured"] == "at build, on the same inputs" and res.facts["recall_sample"] == 50
    other_day = check.check(icfg, "index", D1 + dt.timedelta(days=1))
    assert other_day.success and other_day.facts["recall_measured"] == "now"
    assert [r.expectation for r in res.results] == [r.expectation for r in built.check.results]
    assert res.results[-1].expectation == "expect_index_model_version_to_match_item_embeddings"
    assert json.loads(res.json_path.read_text())["table"] == "index"
    assert res.json_path == icfg.reports_root / "checks" / "index" / f"dt={D1}.json"
    out = pipeline.check_index(icfg, D1)
    assert out["success"] and out["version"] == built.version and out["recall_at_10"] == 1.0
    assert read_ledger(icfg, D1)["check_index"]["result"]["recall_at_10"] == 1.0

    # item_embeddings moved on (another model, one item more) without a new index: CURRENT no longer fits.
    write_items(icfg, 501, mv="v0002-20260106-finetune")
    res = check.check(icfg, "index", D1)
    assert res.facts["recall_measured"] == "now"
    assert {r.expectation for r in res.failed} >= {
        "expect_index_vector_count_to_equal",
        "expect_index_model_version_to_match_item_embeddings",
    }
    with pytest.raises(GateFailed, match=r"index check failed for 2026-01-06: .*expect_index_vector_count_to_equal"):
        pipeline.check_index(icfg, D1)
    assert read_ledger(icfg, D1)["check_index"]["result"]["success"] is False
    assert index.current(icfg)["version"] == built.version


def test_failed_recall_check_does_not_switch(icfg, monkeypatch):
    write_items(icfg, 2000)
    good = index.build_index(icfg, D1)
    monkeypatch.setattr(index, "recall_at_k", lambda truth, found: 0.5)
    bad = index.build_index(icfg, D2, force=True)
    assert bad.status == "rejected" and not bad.check.success
    assert [r.expectation for r in bad.check.failed] == ["expect_index_recall_at_10_to_be_at_least"]
    assert index.current(icfg)["version"] == good.version
    assert index.open_current(icfg).version == good.version
    m = index.read_manifest(icfg, bad.version)
    assert m["status"] == "rejected" and m["recall_at_10"] == 0.5
    report = json.loads((icfg.reports_root / "checks" / "index" / f"dt={D2}.json").read_text())
    assert not report["success"] and report["results"][0]["examples"] == [0.5]
    with pytest.raises(UserError, match="cannot be made current"):
        index.switch(icfg, bad.version)


def test_failure_mid_build_leaves_current_complete(icfg, monkeypatch):
    items = write_items(icfg, 2000)
    good = index.build_index(icfg, D1)
    seen = {}

    def crash(path, data):
        path.write_bytes(b"PAR1 half a file")  # a half-written file in the version being built
        seen["during"] = index.open_current(icfg)  # a reader in the middle of the build
        raise OSError("disk full")

    monkeypatch.setattr(index, "_write_items", crash)
    with pytest.raises(OSError, match="disk full"):
        index.build_index(icfg, D2, force=True)
    assert seen["during"].version == good.version
    assert index.current(icfg)["version"] == good.version
    after = index.open_current(icfg)
    assert after.version == good.version and after.ntotal == 2000
    assert np.allclose(after.vector(1), items[0], atol=1e-6)
    folders = [p.name for p in (icfg.index_root / "versions").iterdir() if p.is_dir()]
    assert folders == [good.version]  # no half-written version anywhere under versions/
    assert not list((icfg.index_root / "_building").iterdir())
    monkeypatch.undo()
    assert index.build_index(icfg, D2, force=True).version == "i0003-20260107"  # the crashed id is not reused


def test_retention_keeps_the_newest_versions(icfg, monkeypatch):
    write_items(icfg, 500)
    built = [index.build_index(icfg, D1, force=True).version for _ in range(3)]
    assert index.list_versions(icfg) == built[1:]  # versions_kept = 2
    with monkeypatch.context() as m:
        m.setattr(index, "recall_at_k", lambda truth, found: 0.0)
        rejected = index.build_index(icfg, D2, force=True).version
    assert index.list_versions(icfg) == [*built[1:], rejected]  # kept for inspection until the next switch
    last = index.build_index(icfg, D2, force=True).version
    assert index.list_versions(icfg) == [built[2], last]
    log = [json.loads(l)["version"] for l in (icfg.index_root / "versions" / "INDEX.jsonl").read_text().splitlines()]
    assert log == [*built, rejected, last]
    switches = (icfg.index_root / "switch_log.jsonl").read_text().splitlines()
    assert [json.loads(l)["version"] for l in switches] == [*built, last]


# ------------------------------------------------------------- candidates
@pytest.mark.spark
def test_candidates_for_refreshed_users_only(icfg):
    items = write_items(icfg, 600)
    users = write_users(icfg, 100)
    index.build_index(icfg, D1)
    out = candidates.candidates(icfg, D1)
    assert out["written"] == 100 and out["users"] == 100
    path = icfg.table_path("user_candidates")
    before = delta.read_arrow(path).sort_by("user_id")
    assert before.schema == tables.USER_CANDIDATES and before.num_rows == 100
    row = before.filter(pc.field("user_id") == "u7").to_pylist()[0]
    assert row["item_idx"] == exact(items, users[7:8], 20)[0].tolist()  # flat index: exact
    assert row["item_id"] == [f"i{i - 1}" for i in row["item_idx"]]
    assert np.allclose(row["scores"], items[np.array(row["item_idx"]) - 1] @ users[7], atol=1e-5)
    assert row["index_version"] == "i0001-20260106" and row["model_version"] == MV and row["as_of"] == D1

    refreshed = [f"u{j}" for j in range(30)]
    new = refresh_users(icfg, refreshed, D2, seed=9)
    v0 = delta.version_of(path)
    out = candidates.candidates(icfg, D2)
    assert out["written"] == 30 and delta.version_of(path) == v0 + 1  # one commit
    after = delta.read_arrow(path).sort_by("user_id")
    assert after.num_rows == 100
    changed = after.filter(pc.field("as_of") == pa.scalar(D2, pa.date32()))
    assert sorted(changed["user_id"].to_pylist()) == sorted(refreshed)
    for r in changed.to_pylist():
        assert r["item_idx"] == exact(items, new[int(r["user_id"][1:])][None], 20)[0].tolist()
    others = pc.invert(pc.is_in(after["user_id"], pa.array(refreshed)))
    assert after.filter(others).equals(before.filter(pc.invert(pc.is_in(before["user_id"], pa.array(refreshed)))))
    history = delta.history(path, 1)[0]
    assert history.get("step") == "candidates" and history.get("dt") == str(D2)

    assert candidates.candidates(icfg, dt.date(2026, 1, 9))["written"] == 0  # nobody refreshed: nothing written
    assert delta.version_of(path) == v0 + 1


@pytest.mark.spark
def test_tables_written_by_a_delta_rs_merge_string_view_files(icfg):
    """publish MERGEs user_embeddings; delta-rs then writes strings as string_view, which a plain pyarrow
    filter cannot compare. Every read here must still work, and user_candidates must stay filterable."""
    items = write_items(icfg, 400)
    x = clustered(30, 2)
    path = icfg.table_path("user_embeddings")
    delta.ensure_table(path, tables.USER_EMBEDDINGS)
    src = user_rows([f"u{j}" for j in range(30)], x, D1).cast(tables.USER_EMBEDDINGS)
    (
        delta.open_table(path)
        .merge(
            pa.RecordBatchReader.from_batches(tables.USER_EMBEDDINGS, src.to_batches()),
            "t.user_id = s.user_id",
            source_alias="s",
            target_alias="t",
        )
        .when_matched_update_all()
        .when_not_matched_insert_all()
        .execute()
    )
    files = delta.open_table(path).file_uris()
    assert {str(pq.read_schema(f).field("user_id").type) for f in files} == {"string_view"}
    with pytest.raises(pa.ArrowNotImplementedError):  # the delta-rs behaviour worked around here
        delta.open_table(path).to_pyarrow_dataset().to_table(filter=pc.field("user_id") == "u3")
    write_purchases(icfg, [("u3", int(exact(items, x[3:4], 1)[0, 0]))])
    index.build_index(icfg, D1)
    assert index.read_manifest(icfg, "i0001-20260106")["recall_query_source"] == "user_embeddings"
    candidates.candidates(icfg, D1, exclude_purchased=True)
    candidates.candidates(icfg, D1)
    show(icfg)
    r = serve.Recommender(icfg)
    assert [h.item_idx for h in r.recommend("u3", k=3)] == exact(items, x[3:4], 3)[0].tolist()
    assert [h.item_idx for h in r.recommend("u3", k=3, exclude_purchased=True)] == exact(items, x[3:4], 4)[
        0, 1:
    ].tolist()
    assert r.embeddings(["u4", "u3"])["user_id"].to_pylist() == ["u4", "u3"]
    cand = delta.open_table(icfg.table_path("user_candidates"))
    assert {str(pq.read_schema(f).field("user_id").type) for f in cand.file_uris()} == {"string"}  # Spark's
    assert delta.read_arrow(icfg.table_path("user_candidates"), filter=pc.field("user_id") == "u3").num_rows == 1


@pytest.mark.spark
def test_candidates_of_users_without_an_embedding_are_dropped(icfg):
    write_items(icfg, 300)
    write_users(icfg, 50)
    index.build_index(icfg, D1)
    candidates.candidates(icfg, D1)
    ue = delta.read_arrow(icfg.table_path("user_embeddings"))
    delta.write_arrow(
        icfg.table_path("user_embeddings"),
        ue.filter(pc.field("user_id") != "u49"),
        tables.USER_EMBEDDINGS,
        mode="overwrite",
    )
    refresh_users(icfg, ["u1", "u2"], D2, seed=3)
    out = candidates.candidates(icfg, D2)
    assert (out["written"], out["kept"], out["dropped"]) == (2, 47, 1)
    users = delta.read_arrow(icfg.table_path("user_candidates"))["user_id"].to_pylist()
    assert len(users) == 49 and "u49" not in users


@pytest.mark.spark
def test_candidates_failing_midway_write_nothing(icfg, monkeypatch):
    write_items(icfg, 300)
    write_users(icfg, 100)  # two batches of 64
    index.build_index(icfg, D1)
    candidates.candidates(icfg, D1)
    path = icfg.table_path("user_candidates")
    before, v0 = delta.read_arrow(path), delta.version_of(path)
    calls = []
    real = candidates.topn

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise UserError("search failed")
        return real(*a, **kw)

    monkeypatch.setattr(candidates, "topn", flaky)
    refresh_users(icfg, [f"u{j}" for j in range(100)], D2, seed=4)
    with pytest.raises(UserError, match="search failed"):
        candidates.candidates(icfg, D2)
    assert delta.version_of(path) == v0 and delta.read_arrow(path).equals(before)
    assert not list((icfg.warehouse_root / "_staging" / "user_candidates").iterdir())


@pytest.mark.spark
def test_candidates_commit_on_the_version_they_read(icfg, monkeypatch):
    """A writer that commits to user_candidates after candidates read it makes its commit fail (ConcurrentWrite)
    instead of landing on rows it did not read; the rerun reads afresh and completes, the other row kept."""
    from userformer.jobs.core import hooks
    from userformer.jobs.core.spark import spark_session

    write_items(icfg, 300)
    write_users(icfg, 40)
    index.build_index(icfg, D1)
    candidates.candidates(icfg, D1)
    path = icfg.table_path("user_candidates")
    real = hooks.pause

    def racing(name, env=None):  # the other writer commits after candidates read the table
        if name == "candidates.before_commit":
            spark_session(icfg).sql(
                f"UPDATE {delta.spark_sql_name(path)} SET index_version = 'other' WHERE user_id = 'u39'"
            )
        return real(name, env)

    refresh_users(icfg, ["u1", "u2"], D2, seed=3)
    monkeypatch.setattr(hooks, "pause", racing)
    v0 = delta.version_of(path)
    with pytest.raises(delta.ConcurrentWrite, match="user_candidates"):
        candidates.candidates(icfg, D2)
    assert delta.version_of(path) == v0 + 1  # only the other writer's commit
    monkeypatch.undo()
    out = candidates.candidates(icfg, D2)
    assert (out["written"], out["kept"], out["dropped"]) == (2, 38, 0) and delta.version_of(path) == v0 + 2
    t = delta.read_arrow(path)
    assert t.num_rows == 40 and "other" in t["index_version"].to_pylist()  # the other writer's row survives
    assert sorted(t.filter(pc.field("as_of") == pa.scalar(D2, pa.date32()))["user_id"].to_pylist()) == ["u1", "u2"]
    # The day cost its users: the MERGE marked the two replaced rows and copied no other row.
    m = delta.history(path, 1)[0]["operationMetrics"]
    assert int(m["numTargetRowsCopied"]) == 0 and int(m["numTargetRowsUpdated"]) == 2


@pytest.mark.spark
def test_candidates_refuse_embeddings_of_another_model(icfg):
    write_items(icfg, 300)
    write_users(icfg, 20, mv="v0002-20260106-finetune")
    index.build_index(icfg, D1)
    with pytest.raises(UserError, match=r"of model v0002-20260106-finetune \(20 users\) but the current index"):
        candidates.candidates(icfg, D1)


@pytest.mark.spark
def test_exclude_purchased(icfg):
    items = write_items(icfg, 600)
    users = write_users(icfg, 10)
    index.build_index(icfg, D1)
    top = exact(items, users[1:2], 20)[0]
    bought = [int(top[0]), int(top[2]), int(top[5])]
    write_purchases(icfg, [("u1", i) for i in bought] + [("u2", int(exact(items, users[2:3], 1)[0, 0]))])
    candidates.candidates(icfg, D1, exclude_purchased=True)
    t = delta.read_arrow(icfg.table_path("user_candidates")).sort_by("user_id")
    row = t.filter(pc.field("user_id") == "u1").to_pylist()[0]
    assert row["item_idx"] == [int(i) for i in exact(items, users[1:2], 23)[0] if i not in bought][:20]
    # u0 bought nothing: unchanged; the view of u1 (item_idx 1) is not a purchase.
    assert t.filter(pc.field("user_id") == "u0").to_pylist()[0]["item_idx"] == exact(items, users[0:1], 20)[0].tolist()
    show(icfg)
    r = serve.Recommender(icfg)
    assert [h.item_idx for h in r.recommend("u1", k=5)] == top[:5].tolist()
    assert [h.item_idx for h in r.recommend("u1", k=5, exclude_purchased=True)] == [
        int(i) for i in top if i not in bought
    ][:5]
    assert r.purchased("u1") == set(bought)


# --------------------------------------------------------------------- API
def test_recommender_api(icfg):
    items = write_items(icfg, 600)
    users = write_users(icfg, 10)
    r = serve.Recommender(icfg)
    with pytest.raises(UserError, match=r"nothing is published yet: .*snapshot.json does not exist") as e:
        r.recommend("u1")
    assert e.value.code == 2
    index.build_index(icfg, D1)
    show(icfg)
    r = serve.Recommender(icfg)
    hits = r.recommend("u3", k=7)
    assert [h.item_idx for h in hits] == exact(items, users[3:4], 7)[0].tolist()
    assert [h.rank for h in hits] == list(range(1, 8)) and hits[0].item_id == f"i{hits[0].item_idx - 1}"
    assert hits[0].score == pytest.approx(float(items[hits[0].item_idx - 1] @ users[3]), abs=1e-5)
    sim = r.similar_items("i4", k=5)
    assert [h.item_idx for h in sim] == [int(i) for i in exact(items, items[4:5], 6)[0] if i != 5][:5]
    with pytest.raises(UserError, match=r"user nobody has no published embedding \(as of 2026-01-06") as e:
        r.recommend("nobody")
    assert e.value.code == 3
    with pytest.raises(UserError, match="item nope is not in the published item index") as e:
        r.similar_items("nope")
    assert e.value.code == 3
    t = r.embeddings(["u2", "u0", "u2"])
    assert t["user_id"].to_pylist() == ["u2", "u0"] and t.column_names == [
        "user_id",
        "embedding",
        "model_version",
        "as_of",
    ]
    assert np.allclose(index.vectors_of(t["embedding"]), users[[2, 0]])
    with pytest.raises(UserError, match="2 users have no published embedding") as e:
        r.embeddings(["u1", "x", "y"])
    assert e.value.code == 3
    assert r.embeddings(["u1", "x"], missing="skip")["user_id"].to_pylist() == ["u1"]
    buf = io.BytesIO()
    serve.write_embeddings(t, "csv", buf)
    lines = buf.getvalue().decode().splitlines()
    assert lines[0] == "user_id,embedding,model_version,as_of" and lines[1].startswith('u2,"[')
    # Ids come from the logs: one that a spreadsheet would run as a formula is written as text.
    evil = t.slice(0, 1).set_column(0, "user_id", pa.array(['=HYPERLINK("http://x","y")'], t.schema.field(0).type))
    buf = io.BytesIO()
    serve.write_embeddings(evil, "csv", buf)
    assert buf.getvalue().decode().splitlines()[1].startswith('"\'=HYPERLINK(""http://x"",""y"")"')
    # A user embedded by another model than the index: refused, not silently mixed.
    refresh_users(icfg, ["u5"], D2, seed=3)
    delta.write_arrow(
        icfg.table_path("user_embeddings"),
        user_rows(["u9"], clustered(1, 4), D2, mv="v0002-20260106-finetune"),
        tables.USER_EMBEDDINGS,
        mode="overwrite",
        predicate="user_id = 'u9'",
    )
    # Committed but not released: readers do not see it.
    assert serve.Recommender(icfg).embeddings(["u9"])["model_version"].to_pylist() == [MV]
    assert r.embeddings(["u5"])["as_of"].to_pylist() == [D1]  # a Recommender keeps the snapshot it read
    show(icfg, D2)
    assert serve.Recommender(icfg).embeddings(["u5"])["as_of"].to_pylist() == [D2]
    with pytest.raises(UserError, match="u9's embedding is of model v0002-20260106-finetune") as e:
        serve.Recommender(icfg).recommend("u9")
    assert e.value.code == 2


# --------------------------------------------------------------------- CLI
def cli(*args, home, env=None):
    e = {**os.environ, **TEST_ENV, "USERFORMER_HOME": str(home), **(env or {})}
    return subprocess.run([EXE, *args], capture_output=True, env=e, timeout=180)


def test_cli(icfg, home, tmp_path):
    r = cli("recommend", "--user", "u1", home=home)
    assert r.returncode == 2 and b"nothing is published yet" in r.stderr
    items = write_items(icfg, 600)
    users = write_users(icfg, 10)
    write_purchases(icfg, [("u1", int(exact(items, users[1:2], 1)[0, 0]))])

    r = cli("similar-items", "--item", "i1", home=home)
    assert r.returncode == 2 and b"nothing is published yet" in r.stderr and b"Traceback" not in r.stderr

    r = cli("index", "--dt", str(D1), home=home)
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode()
    assert "index i0001-20260106: exact IndexFlatIP, 600 items x 16" in out and "recall@10 1.0000" in out
    assert "CURRENT -> i0001-20260106" in out
    r = cli("index", "--dt", str(D1), home=home)
    assert r.returncode == 0 and b"nothing to do" in r.stdout
    show(icfg)
    r = cli("snapshot", home=home)
    assert r.returncode == 0 and json.loads(r.stdout)["index"]["version"] == "i0001-20260106"

    r = cli("recommend", "--user", "u1", "-k", "5", "--exclude-purchased", "--json", home=home)
    assert r.returncode == 0, r.stderr.decode()
    got = json.loads(r.stdout)
    assert got["index_version"] == "i0001-20260106" and got["model_version"] == MV and got["exclude_purchased"]
    assert [h["item_idx"] for h in got["items"]] == exact(items, users[1:2], 6)[0, 1:].tolist()
    r = cli("similar-items", "--item", "i4", "-k", "3", home=home)
    assert r.returncode == 0 and "rank  item_id" in r.stdout.decode() and r.stdout.decode().count("\n") == 5

    r = cli("recommend", "--user", "ghost", home=home)
    assert r.returncode == 3
    assert "userformer recommend: error: user ghost has no published embedding (as of 2026-01-06" in r.stderr.decode()
    r = cli("similar-items", "--item", "ghost", home=home)
    assert r.returncode == 3 and b"item ghost is not in the published item index" in r.stderr

    r = cli("embeddings", "--users", "u2,u0", home=home)
    assert r.returncode == 0
    rows = [json.loads(l) for l in r.stdout.decode().splitlines()]
    assert [x["user_id"] for x in rows] == ["u2", "u0"] and np.allclose(rows[0]["embedding"], users[2], atol=1e-6)
    assert rows[0]["model_version"] == MV and rows[0]["as_of"] == str(D1)
    ids = tmp_path / "ids.txt"
    ids.write_text("# users\nu3\n\nu4\n")
    r = cli("embeddings", "--users-file", str(ids), "--out", str(tmp_path / "e.parquet"), home=home)
    assert r.returncode == 0, r.stderr.decode()
    t = pq.read_table(tmp_path / "e.parquet")
    assert t["user_id"].to_pylist() == ["u3", "u4"] and t.schema.field("embedding").type == pa.list_(pa.float32())
    r = cli("embeddings", "--users", "u1,ghost", "--format", "csv", home=home)
    assert r.returncode == 3 and b"1 users" not in r.stderr and b"user ghost has no published embedding" in r.stderr

    r = cli("check", "index", "--dt", str(D1), home=home)
    assert r.returncode == 0 and "check index dt=2026-01-06: passed (7 expectations" in r.stdout.decode()

    r = cli("candidates", "--dt", str(D1), home=home)
    assert r.returncode == 0 and b"10 users x top 20 from index i0001-20260106" in r.stdout, r.stderr.decode()

    # A stricter recall threshold that IVF with one probed list cannot meet: exit 1, CURRENT unchanged.
    r = cli(
        "index",
        "--dt",
        str(D2),
        "--force",
        home=home,
        env={
            "USERFORMER__INDEX__KIND": "ivf",
            "USERFORMER__INDEX__IVF_NPROBE": "1",
            "USERFORMER__INDEX__MIN_RECALL_AT_10": "0.999",
        },
    )
    out = r.stdout.decode()
    assert r.returncode == 1, (out, r.stderr.decode())
    assert "FAIL expect_index_recall_at_10_to_be_at_least" in out and "CURRENT unchanged: i0001-20260106" in out
    assert index.current(icfg)["version"] == "i0001-20260106"
