"""`userformer retrain` (jobs/flows/retrain.py, the `retrain` DAG's steps) on three generated days run by
`pipeline.run_day`."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest

from userformer.jobs.cli import main
from userformer.jobs.core import ledger, registry
from userformer.jobs.core.config import load_config
from userformer.jobs.core.storage import delta
from userformer.jobs.flows import pipeline, retrain
from userformer.jobs.tools import generate

pytestmark = [pytest.mark.spark, pytest.mark.slow]

START = dt.date(2026, 11, 1)
DAYS = [START + dt.timedelta(days=i) for i in range(3)]
SETTINGS = {
    "PIPELINE__BOOTSTRAP_EPOCHS": "2",
    "TRAIN__NUM_THREADS": "1",
    "MODEL__D_MODEL": "16",
    "MODEL__MAX_LEN": "20",
    "MODEL__TIME_BUCKETS": "8",
    "TRAIN__BATCH_SIZE": "64",
    "TRAIN__UNIFORM_NEGATIVES": "64",
    "TRAIN__STREAM_CHUNK_USERS": "64",
    "FINETUNE__EPOCHS": "1",
}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, spark):
    home = tmp_path_factory.mktemp("retrain") / "home"
    c = load_config(env={"USERFORMER_HOME": str(home), **{f"USERFORMER__{k}": v for k, v in SETTINGS.items()}})
    generate.generate(c, users=300, items=400, days=len(DAYS), start=START, seed=11)
    for d in DAYS:
        pipeline.run_day(c, d)
    return c


def test_the_promotion_rule():
    m = ["ndcg@10", "recall@10"]
    assert retrain.better({"ndcg@10": 0.2, "recall@10": 0.3}, {"ndcg@10": 0.1, "recall@10": 0.3}, m)["promote"]
    assert not retrain.better({"ndcg@10": 0.1, "recall@10": 0.3}, {"ndcg@10": 0.1, "recall@10": 0.3}, m)["promote"]
    assert not retrain.better({"ndcg@10": 0.3, "recall@10": 0.2}, {"ndcg@10": 0.1, "recall@10": 0.3}, m)["promote"]


def test_a_window_shorter_than_two_days_is_refused(cfg, capsys, monkeypatch):
    monkeypatch.setenv("USERFORMER_HOME", str(cfg.home))
    assert main(["retrain", "--window-days", "1"]) == 2
    assert "--window-days must be >= 2" in capsys.readouterr().err


def test_retrain_trains_on_the_window_judges_and_after_a_promotion_reembeds_everyone(cfg, monkeypatch):
    before = registry.published(cfg)["version"]
    users = delta.read_arrow(cfg.table_path("user_sequences")).num_rows
    # Whatever the metrics of this tiny model, take the promotion path (the rule itself is tested above).
    real = retrain.better
    monkeypatch.setattr(retrain, "better", lambda new, old, m: {**real(new, old, m), "promote": True})
    res = retrain.retrain(cfg, None, 2, epochs=2)
    new = res["train"]["version"]
    assert res["dt"] == str(DAYS[-1]) and new != before and res["train"]["published_before"] == before
    man = registry.read_manifest(cfg, new)
    assert man["kind"] == "train" and man["status"] == "promoted"
    assert man["protocol"]["window_days"] == 2
    assert man["protocol"]["trained_from"].startswith(str(DAYS[-2]))  # end of D3 minus 2 days = start of D2
    assert set(res["judge"]["metrics"]["new"]) == set(cfg.finetune.gate_metrics)
    assert registry.published(cfg)["version"] == new
    emb = delta.read_arrow(cfg.table_path("user_embeddings"))
    assert emb.num_rows == users and set(emb["model_version"].cast(pa.string()).to_pylist()) == {new}
    from userformer.jobs.steps import index

    assert index.current(cfg)["model_version"] == new
    led = ledger.read_ledger(cfg, DAYS[-1])
    assert {"retrain_train", "retrain_judge", "check_outputs", "publish", "index", "check_index"} <= set(led)
    # Judging the same version again keeps its verdict (a retried task changes nothing).
    again = retrain.judge(cfg, DAYS[-1], new)
    assert again["promoted"] is True and registry.published(cfg)["version"] == new


def test_a_model_that_is_not_better_changes_nothing(cfg, monkeypatch):
    before = registry.published(cfg)["version"]
    emb_version = delta.open_table(cfg.table_path("user_embeddings")).version()
    real = retrain.better
    monkeypatch.setattr(retrain, "better", lambda new, old, m: {**real(new, old, m), "promote": False})
    res = retrain.retrain(cfg, DAYS[-1], 3, epochs=1)
    assert res["judge"]["promoted"] is False and "infer" not in res
    assert registry.read_manifest(cfg, res["train"]["version"])["status"] == "rejected"
    assert registry.published(cfg)["version"] == before
    assert delta.open_table(cfg.table_path("user_embeddings")).version() == emb_version
