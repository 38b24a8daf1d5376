"""`userformer infer` / `publish` / `check outputs` on a real warehouse (generate -> ingest -> sequences with Spark).

The warehouse of tests/integration/test_train.py (300 users, 400 items, 4 days +
an empty 5th drop) is built once for the module, and one tiny model is trained
as of D3 (1 epoch). Every test gets its own copy of the warehouse's tables and
of the registry, so published tables never leak between tests.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from tests.integration.test_train import EXE, START, TINY, quiet, warehouse  # noqa: F401 (warehouse: the fixture)
from userformer.jobs.core import drops
from userformer.jobs.core import registry as model_registry
from userformer.jobs.core.config import load_config
from userformer.jobs.core.errors import UserError
from userformer.jobs.core.spark import spark_session
from userformer.jobs.core.storage import delta, files
from userformer.jobs.steps import check as check_step
from userformer.jobs.steps import infer as infer_step
from userformer.jobs.steps import publish as publish_step
from userformer.jobs.steps import train as train_step
from userformer.jobs.tools.maintain import maintain

pytestmark = pytest.mark.spark

D1, D3, D4, D5 = (START + dt.timedelta(days=i) for i in (0, 2, 3, 4))
KEYS = {
    "user_embeddings": ("user_id",),
    "user_preference_scores": ("user_id", "task"),
    "item_embeddings": ("item_idx",),
}


def staged(cfg, day, version, shard, shards) -> Path:
    """The folder of a staged shard's files: the run its manifest names (one run folder, the others gone)."""
    folder = infer_step.shard_dir(cfg, day, version, shard, shards)
    assert [p.name for p in folder.iterdir() if p.name.startswith("run=")] == [
        infer_step.read_manifest(folder)["files"]
    ]
    return Path(infer_step.read_manifest(folder)["path"])


def env_of(root, home):
    return {
        "USERFORMER_HOME": str(home),
        "USERFORMER__PATHS__RAW_ROOT": str(root / "raw"),
        **{f"USERFORMER__{k}": v for k, v in {**TINY, "TRAIN__EPOCHS": "1"}.items()},
    }


@pytest.fixture(scope="module")
def registry(warehouse, tmp_path_factory):  # noqa: F811
    """models/ holding one tiny model trained as of D3, published (the first model)."""
    home = tmp_path_factory.mktemp("registry")
    shutil.copytree(warehouse / "warehouse", home / "warehouse")
    cfg = load_config(env=env_of(warehouse, home))
    s = train_step.train(cfg, day=D3, progress=False, log=quiet)
    return cfg.models_root, s["version"]


@pytest.fixture
def setup(warehouse, registry, tmp_path):  # noqa: F811
    """A function giving a fresh home (own copy of the warehouse tables and of the registry) -> its config."""

    def make(name: str = "home", **settings):
        home = tmp_path / name
        shutil.copytree(warehouse / "warehouse", home / "warehouse")
        shutil.copytree(registry[0], home / "models")
        return load_config(env={**env_of(warehouse, home), **settings})

    return make


def rows(cfg, table: str, version: int | None = None, drop=()) -> dict:
    """A published table as {key: row} (row without `drop` columns)."""
    t = delta.read_arrow(cfg.table_path(table), version)
    out = {}
    for r in t.to_pylist():
        k = tuple(r[c] for c in KEYS[table])
        assert k not in out, f"{table}: {k} twice"
        out[k] = {c: v for c, v in r.items() if c not in drop}
    return out


def versions(cfg) -> dict:
    return {t: delta.version_of(cfg.table_path(t)) for t in infer_step.OUTPUTS}


def run_day(cfg, day, shards=1, **kw):
    ms = [infer_step.infer(cfg, day, shard=i, shards=shards, log=quiet, **kw) for i in range(shards)]
    return ms, publish_step.publish(cfg, day, shards=shards, log=quiet)


def seq_users(cfg, day, only_day=True) -> set:
    v, _ = drops.sequences_version(cfg, day)
    t = delta.read_arrow(cfg.table_path("user_sequences"), v, columns=["user_id", "updated_dt"])
    if only_day:
        t = t.filter(pc.equal(t["updated_dt"], pa.scalar(day, pa.date32())))
    return set(t["user_id"].to_pylist())


def new_version(cfg, day) -> str:
    """Register and publish a perturbed copy of the published model (another version, other vectors)."""
    _, ck = model_registry.load(cfg)
    g = torch.Generator().manual_seed(1)
    sd = {
        k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in ck["state_dict"].items()
    }
    v = model_registry.register(cfg, {**ck, "state_dict": sd}, kind="train", day=day)
    model_registry.publish(cfg, v, "test: a new model")
    return v


# ------------------------------------------------------------------ the day
def test_a_day_refreshes_exactly_its_users_and_leaves_the_others_untouched(setup):
    cfg = setup()
    v1 = model_registry.published(cfg)["version"]
    (m3,), r3 = run_day(cfg, D3)
    assert m3["full"] and "no publish before" in m3["reason"] and m3["users"] == len(seq_users(cfg, D3, False))
    assert all(c["committed"] for c in r3["commits"].values())
    ue3, ps3, it3 = (rows(cfg, t) for t in infer_step.OUTPUTS)
    assert len(it3) == m3["rows"]["item_embeddings"] < 400 and len(ps3) == 3 * len(ue3)
    v_after_d3 = versions(cfg)

    (m4,), r4 = run_day(cfg, D4)
    day_users = seq_users(cfg, D4)
    assert not m4["full"] and m4["users"] == len(day_users) and 0 < len(day_users) < len(ue3)
    ue4, ps4, it4 = (rows(cfg, t) for t in infer_step.OUTPUTS)
    assert {k[0] for k in ue4} == {k[0] for k in ue3} | day_users
    for (u,), r in ue4.items():
        if u in day_users:
            assert r["as_of"] == D4 and r["model_version"] == v1 and len(r["embedding"]) == 16
            assert abs(np.linalg.norm(r["embedding"]) - 1) < 1e-3
        else:
            assert r == ue3[(u,)]  # untouched: the same embedding, as_of and updated_at
    for (u, task), r in ps4.items():
        assert r == ps3[(u, task)] if u not in day_users else r["as_of"] == D4
    assert {k[0] for k in ps4} == {k[0] for k in ue4} and len(ps4) == 3 * len(ue4)
    assert len(it4) == 400 and all(r["as_of"] == D4 for r in it4.values())  # the catalogue grew: rewritten
    # History: the previous day stays readable (time travel), and every commit says what it was.
    assert rows(cfg, "user_embeddings", v_after_d3["user_embeddings"]) == ue3
    h = delta.history(cfg.table_path("user_embeddings"), 1)[0]
    seq_v, _ = drops.sequences_version(cfg, D4)
    assert {k: h[k] for k in ("step", "dt", "model_version", "shards", "full", "users", "user_sequences_version")} == {
        "step": "publish",
        "dt": str(D4),
        "model_version": v1,
        "shards": "1",
        "full": "False",
        "users": str(len(day_users)),
        "user_sequences_version": str(seq_v),
    }
    assert publish_step.published_outputs(cfg)["tables"] == versions(cfg) and publish_step.published_outputs(cfg)[
        "dt"
    ] == str(D4)
    # The day cost its users, not the table: the MERGEs marked the replaced rows (deletion vectors) and copied no
    # row of another user into a rewritten file.
    stayed = {k[0] for k in ue3} & day_users
    for t, replaced in (("user_embeddings", len(stayed)), ("user_preference_scores", 3 * len(stayed))):
        m = delta.history(cfg.table_path(t), 1)[0]["operationMetrics"]
        assert int(m["numTargetRowsCopied"]) == 0 and int(m["numTargetDeletionVectorsAdded"]) > 0, (t, m)
        changed = int(m.get("numTargetRowsUpdated", 0)) + int(m.get("numTargetRowsDeleted", 0))
        assert changed == replaced, (t, m)

    # Publishing the same staged output again changes nothing; a rerun of the day gives the same rows.
    v_d4 = versions(cfg)
    again = publish_step.publish(cfg, D4, log=quiet)
    assert not any(c["committed"] for c in again["commits"].values()) and versions(cfg) == v_d4
    run_day(cfg, D4)
    assert versions(cfg)["user_embeddings"] == v_d4["user_embeddings"] + 1
    drop = ("updated_at",)
    assert rows(cfg, "user_embeddings", drop=drop) == {
        k: {c: v for c, v in r.items() if c not in drop} for k, r in ue4.items()
    }
    assert rows(cfg, "user_preference_scores") == ps4 and rows(cfg, "item_embeddings") == it4

    # An empty day: nothing to refresh, nothing new published, success.
    v_d4 = versions(cfg)
    (m5,), r5 = run_day(cfg, D5)
    assert m5["users"] == 0 and m5["rows"]["item_embeddings"] == 400 and not m5["full"]
    assert not any(c["committed"] for c in r5["commits"].values()) and versions(cfg) == v_d4
    assert pq.read_table(staged(cfg, D5, v1, 0, 1) / "user_embeddings.parquet").num_rows == 0
    # An older drop than the last published one is refused.
    with pytest.raises(UserError, match="is published already"):
        publish_step.publish(cfg, D3, log=quiet)
    # Retention: maintain vacuums the published tables too, and compacts the user tables' MERGE files and
    # deletion vectors without changing a row.
    assert set(infer_step.OUTPUTS) <= set(maintain(cfg, dry_run=True)["tables"])
    before = {t: rows(cfg, t) for t in infer_step.OUTPUTS}
    maintain(cfg)
    for t in ("user_embeddings", "user_preference_scores"):
        assert rows(cfg, t) == before[t], t
        assert all(f.keep is None for f in delta.data_files(cfg.table_path(t))), t  # the marks are purged
    # Incremental = full: re-embedding everyone gives every user the vector and preferences the days gave them
    # (a user is embedded at their newest event, whichever day computes it).
    run_day(cfg, D5, all_users=True)
    full = {t: rows(cfg, t, drop=("as_of", "updated_at")) for t in ("user_embeddings", "user_preference_scores")}
    assert full["user_embeddings"].keys() == before["user_embeddings"].keys()
    for k, r in full["user_embeddings"].items():
        assert np.allclose(r["embedding"], before["user_embeddings"][k]["embedding"], atol=1e-5), k
    assert full["user_preference_scores"].keys() == before["user_preference_scores"].keys()
    for k, r in full["user_preference_scores"].items():
        old = before["user_preference_scores"][k]
        assert r["label_idx"] == old["label_idx"] and np.allclose(r["scores"], old["scores"], atol=1e-5), k


def test_shards_equal_one_shard_and_a_new_model_reembeds_everyone(setup, monkeypatch):
    a, b = setup("one"), setup("two")
    for day in (D3, D4):
        run_day(a, day)
        ms, _ = run_day(b, day, shards=2)
        assert all(m["users"] > 0 for m in ms) and sum(m["users"] for m in ms) == len(seq_users(b, day, day == D4))
        assert (staged(b, day, ms[0]["model_version"], 0, 2) / "item_embeddings.parquet").is_file()
        assert not (staged(b, day, ms[0]["model_version"], 1, 2) / "item_embeddings.parquet").exists()
    drop = ("updated_at",)
    for t in infer_step.OUTPUTS:
        assert rows(a, t, drop=drop) == rows(b, t, drop=drop), t

    # --all-users re-embeds everyone with the same model: the day's users as before, the others as they were.
    before = rows(a, "user_embeddings")
    (m,), _ = run_day(a, D4, all_users=True)
    assert m["full"] and m["users"] == len(before)
    for k, r in rows(a, "user_embeddings").items():
        np.testing.assert_allclose(r["embedding"], before[k]["embedding"], atol=1e-5)

    # A new published version: every user is re-embedded, and the publish is one version throughout -- even
    # when it crashes before its last commit and the whole day is rerun.
    v2 = new_version(b, D4)
    ms = [infer_step.infer(b, D4, shard=i, shards=2, log=quiet) for i in range(2)]
    assert all(m["full"] and "differs from" in m["reason"] for m in ms)
    assert sum(m["users"] for m in ms) == len(before)

    def crash(*args, **kw):
        raise RuntimeError("machine lost")

    monkeypatch.setattr(publish_step, "_overwrite_items", crash)
    with pytest.raises(RuntimeError, match="machine lost"):
        publish_step.publish(b, D4, shards=2, log=quiet)
    assert {r["model_version"] for r in rows(b, "user_embeddings").values()} == {v2}
    assert {r["model_version"] for r in rows(b, "item_embeddings").values()} != {v2}
    assert publish_step.published_outputs(b)["model_version"] != v2  # the consistent snapshot is still the old one
    monkeypatch.undo()
    ms = [infer_step.infer(b, D4, shard=i, shards=2, log=quiet) for i in range(2)]  # a rerun still re-embeds everyone
    assert all(m["full"] for m in ms)
    publish_step.publish(b, D4, shards=2, log=quiet)
    for t in infer_step.OUTPUTS:
        assert {r["model_version"] for r in rows(b, t).values()} == {v2}, t
    assert len(rows(b, "user_embeddings")) == len(before) and publish_step.published_outputs(b)["model_version"] == v2


def assert_same_outputs(a, b) -> None:
    """Two homes published the same rows: vectors and scores within float tolerance (batches differ), the same
    labels, versions and dates."""
    for t in infer_step.OUTPUTS:
        ra, rb = rows(a, t, drop=("updated_at",)), rows(b, t, drop=("updated_at",))
        assert ra.keys() == rb.keys(), t
        for k, r in ra.items():
            for c, v in r.items():
                if c in ("embedding", "scores"):
                    np.testing.assert_allclose(rb[k][c], v, atol=1e-5, err_msg=f"{t} {k} {c}")
                else:
                    assert rb[k][c] == v, (t, k, c)


def test_the_spark_engine_equals_the_in_process_path(setup):
    """infer.engine = spark embeds on the executors of the session's master (here local[2]): the same published
    rows as in-process, a day's users only, each partition's rows in the files its successful attempt wrote."""
    small = {"USERFORMER__INFER__CHUNK_USERS": "50", "USERFORMER__INFER__BATCH_SIZE": "16"}
    here = setup("here", **small)
    on_spark = setup("spark", USERFORMER__INFER__ENGINE="spark", **small)
    for day in (D3, D4):
        (mh,), _ = run_day(here, day)
        (ms,), _ = run_day(on_spark, day)
        assert ms["engine"] == "spark" and mh["engine"] == "local"
        assert ms["users"] == mh["users"] > 0 and ms["full"] == (day == D3)
        assert ms["devices"] == ["cpu"]
        folder = staged(on_spark, day, ms["model_version"], 0, 1)
        for t in ("user_embeddings", "user_preference_scores"):
            parts = ms["parts"][t]
            assert len(parts) >= 2 and all(p.startswith(f"{t}/part-") for p in parts)  # several tasks wrote
            assert sorted(p.name for p in (folder / t).iterdir()) == sorted(p.split("/")[1] for p in parts)
            assert sum(pq.read_metadata(folder / p).num_rows for p in parts) == ms["rows"][t]
        assert_same_outputs(here, on_spark)
    assert ms["users"] == len(seq_users(on_spark, D4))


def _executor_of(pid: int) -> int:
    """The executor JVM (CoarseGrainedExecutorBackend) a Python worker runs under: its nearest such ancestor."""
    p = pid
    while p > 1:
        if b"CoarseGrainedExecutorBackend" in Path(f"/proc/{p}/cmdline").read_bytes():
            return p
        p = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
    raise AssertionError(f"no executor JVM above Python worker {pid}")


@pytest.mark.cluster
def test_on_the_cluster_a_lost_executor_is_retried_and_the_day_equals_in_process(setup, warehouse, tmp_path):  # noqa: F811
    """`userformer infer` with infer.engine = spark on a real standalone cluster (2 workers). One executor is
    SIGKILLed (its JVM and its Python worker) while it embeds a partition: Spark reruns the partition on
    another executor, the run stages only the successful attempts' files, and the published day equals the
    in-process run."""
    from tests.integration.spark_cluster import SparkCluster, pid_alive

    here = setup("here")
    run_day(here, D3)
    target = setup("cluster", USERFORMER__INFER__ENGINE="spark", USERFORMER__INFER__CHUNK_USERS="50")
    pauses = tmp_path / "pauses"
    with SparkCluster(tmp_path / "spark", workers=2, cores=1, memory="1g") as cluster:
        env = cluster.driver_env(
            home=target.home,
            **{k: v for k, v in env_of(warehouse, target.home).items() if k != "USERFORMER_HOME"},
            USERFORMER__INFER__ENGINE="spark",
            USERFORMER__INFER__CHUNK_USERS="50",
            USERFORMER_PAUSE_AT="infer.on_executor",
            USERFORMER_PAUSE_DIR=str(pauses),
        )
        proc = subprocess.Popen(
            [cluster.bin("userformer"), "infer", "--dt", str(D3)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 300
            while not list(pauses.glob("infer.on_executor.*")):
                assert proc.poll() is None, proc.communicate()[1][-5000:]
                assert time.monotonic() < deadline, cluster.log_tail()
                time.sleep(0.2)
            worker = int(sorted(pauses.glob("infer.on_executor.*"))[0].suffix[1:])
            jvm = _executor_of(worker)
            for pid in (jvm, worker):
                os.kill(pid, signal.SIGKILL)
            while pid_alive(worker) or pid_alive(jvm):
                time.sleep(0.05)
            (pauses / "infer.on_executor.go").touch()
            out, err = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, f"{err[-5000:]}\n{cluster.log_tail()}"
    m = json.loads(out[out.index("{") :])  # the manifest, printed last
    assert m["engine"] == "spark" and m["spark"]["retried"], m["spark"]  # the lost executor's partition ran again
    folder = Path(m["path"])
    for t in ("user_embeddings", "user_preference_scores"):  # only the successful attempts' files remain
        assert sorted(p.name for p in (folder / t).iterdir()) == sorted(p.split("/")[1] for p in m["parts"][t])
    publish_step.publish(target, D3, log=quiet)
    assert_same_outputs(here, target)


# ------------------------------------------------------------------ faults
def test_a_crash_between_commits_is_completed_by_the_rerun(setup, monkeypatch):
    cfg, clean = setup("crash"), setup("clean")
    infer_step.infer(cfg, D3, log=quiet)
    shutil.copytree(
        infer_step.staging_root(cfg), infer_step.staging_root(clean)
    )  # the same staged output, published cleanly
    publish_step.publish(clean, D3, log=quiet)

    def crash(*args, **kw):
        raise RuntimeError("killed")

    monkeypatch.setattr(publish_step, "_merge_embeddings", crash)  # before the first commit: nothing changes
    with pytest.raises(RuntimeError):
        publish_step.publish(cfg, D3, log=quiet)
    assert versions(cfg) == dict.fromkeys(infer_step.OUTPUTS) and publish_step.published_outputs(cfg) is None
    monkeypatch.undo()
    monkeypatch.setattr(publish_step, "_replace_preferences", crash)  # between the first and the second commit
    with pytest.raises(RuntimeError):
        publish_step.publish(cfg, D3, log=quiet)
    v = versions(cfg)
    assert v["user_embeddings"] is not None and v["user_preference_scores"] is None and v["item_embeddings"] is None
    monkeypatch.undo()
    r = publish_step.publish(cfg, D3, log=quiet)
    assert not r["commits"]["user_embeddings"]["committed"] and r["commits"]["user_preference_scores"]["committed"]
    for t in infer_step.OUTPUTS:
        assert rows(cfg, t) == rows(clean, t), t  # equal to the clean run, updated_at included


def test_a_concurrent_writer_fails_the_publish_and_the_rerun_completes_it(setup, monkeypatch):
    """Each publish commit lands on the version publish read: a commit another writer made since makes it fail
    (ConcurrentWrite), not merged over; the rerun reads afresh, skips what was published and completes."""
    cfg, clean = setup("raced"), setup("clean")
    for c in (cfg, clean):
        run_day(c, D3)
    infer_step.infer(cfg, D4, log=quiet)
    shutil.copytree(infer_step.staging_root(cfg), infer_step.staging_root(clean), dirs_exist_ok=True)
    publish_step.publish(clean, D4, log=quiet)
    path = cfg.table_path("user_preference_scores")
    victim = sorted(seq_users(cfg, D4))[0]  # refreshed on D4: the rerun writes its rows again
    real = publish_step._replace_preferences

    def raced(*args, **kw):  # another writer commits after publish read the table
        delta.spark_delete(spark_session(cfg), path, f"user_id = '{victim}'")
        return real(*args, **kw)

    monkeypatch.setattr(publish_step, "_replace_preferences", raced)
    v = versions(cfg)
    with pytest.raises(delta.ConcurrentWrite, match="user_preference_scores"):
        publish_step.publish(cfg, D4, log=quiet)
    after = versions(cfg)
    assert after["user_embeddings"] == v["user_embeddings"] + 1  # committed before the race
    assert after["user_preference_scores"] == v["user_preference_scores"] + 1  # the other writer's commit only
    assert after["item_embeddings"] == v["item_embeddings"] and publish_step.published_outputs(cfg)["dt"] == str(D3)
    monkeypatch.undo()
    r = publish_step.publish(cfg, D4, log=quiet)
    assert not r["commits"]["user_embeddings"]["committed"] and r["commits"]["user_preference_scores"]["committed"]
    assert r["commits"]["user_preference_scores"]["version"] == after["user_preference_scores"] + 1
    for t in ("user_preference_scores", "item_embeddings"):
        assert rows(cfg, t) == rows(clean, t), t
    drop = ("updated_at",)
    assert rows(cfg, "user_embeddings", drop=drop) == rows(clean, "user_embeddings", drop=drop)


def test_a_missing_shard_or_a_failed_check_publishes_nothing(setup):
    cfg = setup()
    v1 = model_registry.published(cfg)["version"]
    infer_step.infer(cfg, D3, shard=0, shards=2, log=quiet)
    with pytest.raises(
        UserError,
        match=r"1 of 2 shards .*missing: shard=1-of-2.*userformer infer --dt 2026-11-03 "
        r"--shard 1 --shards 2",
    ):
        publish_step.publish(cfg, D3, shards=2, log=quiet)
    res = check_step.check(cfg, "outputs", D3, {"shards": 2})
    assert not res.success and "shard=1-of-2" in res.error and res.html_path.is_file()

    # One NaN in a staged embedding: the check names the user, publish refuses with exit code 1.
    infer_step.infer(cfg, D3, log=quiet)
    f = staged(cfg, D3, v1, 0, 1) / "user_embeddings.parquet"
    t = pq.read_table(f)
    emb = t["embedding"].to_pylist()
    emb[5] = [float("nan")] * len(emb[5])
    pq.write_table(t.set_column(1, t.schema.field("embedding"), pa.array(emb, t.schema.field("embedding").type)), f)
    with pytest.raises(UserError) as e:
        publish_step.publish(cfg, D3, log=quiet)
    assert e.value.code == 1 and "nothing was published" in str(e.value)
    assert "FAIL expect_column_values_to_be_in_set on finite" in str(e.value) and t["user_id"][5].as_py() in str(
        e.value
    )
    assert versions(cfg) == dict.fromkeys(infer_step.OUTPUTS) and publish_step.published_outputs(cfg) is None
    report = json.loads((cfg.reports_root / "checks" / "outputs" / f"dt={D3}.json").read_text())
    assert (
        not report["success"] and report["facts"]["metrics"]["users"] == report["facts"]["metrics"]["users_to_refresh"]
    )

    # Clean outputs but a score band nobody meets: the distribution check fails.
    infer_step.infer(cfg, D3, log=quiet)
    cfg.infer.top1_mean_band = [0.999, 1.0]
    res = check_step.check(cfg, "outputs", D3)
    assert not res.success and {r.column for r in res.failed} == {
        "top1_mean_brand",
        "top1_mean_category_l1",
        "top1_mean_event_type",
    }
    cfg.infer.top1_mean_band = [0.0, 1.0]
    assert check_step.check(cfg, "outputs", D3).success
    # A staged shard whose row count is not the users to refresh (a lost row).
    f = staged(cfg, D3, v1, 0, 1) / "user_embeddings.parquet"  # this rerun's own run folder
    t = pq.read_table(f)
    pq.write_table(t.slice(1), f)
    res = check_step.check(cfg, "outputs", D3)
    failed = {r.column for r in res.failed}
    assert {"rows_minus_expected", "rows_minus_manifest", "users", "preference_rows"} <= failed


def test_bad_checkpoints_are_clear_errors(setup, warehouse):  # noqa: F811
    cfg = setup()
    v1 = model_registry.published(cfg)["version"]
    path = model_registry.version_dir(cfg, v1) / "model.pt"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="checksum does not match"):
        infer_step.infer(cfg, D3, log=quiet)
    env = {**os.environ, **env_of(warehouse, cfg.home)}
    r = subprocess.run([EXE, "infer", "--dt", str(D3)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "userformer infer: error:" in r.stderr and "model.pt" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    path.unlink()
    with pytest.raises(UserError, match="model checkpoint not found"):
        infer_step.infer(cfg, D3, log=quiet)
    assert not infer_step.staging_root(cfg).exists() or not any(infer_step.staging_root(cfg).rglob(infer_step.MANIFEST))

    # Model/vocabulary size mismatch: inside the checkpoint, and against a catalogue older than the model.
    path.write_bytes(good)
    ck = torch.load(path, weights_only=True)
    ck["vocab_sizes"]["item"] += 7
    torch.save(ck, path)
    man = model_registry.read_manifest(cfg, v1)
    man["files"]["model.pt"]["sha256"] = model_registry.sha256(path)
    files.write_json(model_registry.version_dir(cfg, v1) / "manifest.json", man)
    with pytest.raises(UserError, match="model/vocabulary size mismatch"):
        infer_step.infer(cfg, D3, log=quiet)
    path.write_bytes(good)
    man["files"]["model.pt"]["sha256"] = model_registry.sha256(path)
    files.write_json(model_registry.version_dir(cfg, v1) / "manifest.json", man)
    with pytest.raises(UserError, match="model/vocabulary size mismatch: catalogue has"):
        infer_step.infer(cfg, D1, log=quiet)  # the model (as of D3) knows items the catalogue of D1 does not
    with pytest.raises(UserError, match="was not ingested"):
        infer_step.infer(cfg, D5 + dt.timedelta(days=1), log=quiet)
    with pytest.raises(UserError, match="--shard must be in 0..1"):
        infer_step.infer(cfg, D3, shard=2, shards=2, log=quiet)

    # The CLI: a failed output check exits 1 with the summary.
    infer_step.infer(cfg, D3, log=quiet)
    f = staged(cfg, D3, v1, 0, 1) / "item_embeddings.parquet"
    pq.write_table(pq.read_table(f).slice(3), f)
    r = subprocess.run([EXE, "check", "outputs", "--dt", str(D3)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and "check outputs dt=2026-11-03: FAILED" in r.stdout and "on items" in r.stdout, r.stdout
