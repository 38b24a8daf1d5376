"""The one configuration: defaults, file, environment, USERFORMER_HOME, validation."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from userformer.jobs.core.config import Config, ConfigError, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "infra" / "config" / "userformer.toml"


def test_example_file_lists_every_setting_with_its_default():
    data = tomllib.loads(EXAMPLE.read_text())
    default = Config()
    for section in dataclasses.fields(default):
        obj = getattr(default, section.name)
        names = {f.name for f in dataclasses.fields(obj)}
        assert set(data[section.name]) == names, section.name
        for k, v in data[section.name].items():
            assert getattr(obj, k) == v, f"{section.name}.{k}"
    assert load_config(EXAMPLE, env={"USERFORMER_HOME": "/x"}).to_dict()["spark"] == dataclasses.asdict(default.spark)


def test_home_moves_every_path(tmp_path):
    cfg = load_config(env={"USERFORMER_HOME": str(tmp_path)})
    for sub, p in [
        ("raw", cfg.raw_root),
        ("warehouse", cfg.warehouse_root),
        ("models", cfg.models_root),
        ("index", cfg.index_root),
        ("reports", cfg.reports_root),
    ]:
        assert p == tmp_path / sub
    assert cfg.table_path("events") == tmp_path / "warehouse" / "events"


def test_file_then_environment_override(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[spark]\nmaster = "local[1]"\n[sequences]\nmax_len = 50\n[paths]\nraw_root = "/data/raw"\n')
    env = {
        "USERFORMER_HOME": str(tmp_path),
        "USERFORMER__SEQUENCES__MAX_LEN": "64",
        "USERFORMER__INGEST__NON_ITEM_EVENT_TYPES": '["search"]',
    }
    cfg = load_config(f, env=env)
    assert cfg.spark.master == "local[1]" and cfg.sequences.max_len == 64
    assert cfg.ingest.non_item_event_types == ["search"]
    assert cfg.raw_root == Path("/data/raw") and cfg.warehouse_root == tmp_path / "warehouse"
    assert load_config(env={"USERFORMER_CONFIG": str(f)}).spark.master == "local[1]"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"USERFORMER__SEQUENCES__MAX_LEN": "0"}, "sequences.max_len=0: must be >= 1"),
        ({"USERFORMER__SEQUENCES__MAX_LEN": "many"}, "expected int"),
        ({"USERFORMER__SEQUENCES__MAXLEN": "5"}, "unknown setting"),
        ({"USERFORMER__NOPE__X": "5"}, "known section"),
        ({"USERFORMER__QUALITY__MAX_REJECTED_RATIO": "1.5"}, "must be <= 1.0"),
        ({"USERFORMER__QUALITY__ROW_COUNT_BAND": "[2.0, 3.0]"}, "row_count_band"),
        ({"USERFORMER__INGEST__NON_ITEM_EVENT_TYPES": '["view"]'}, "both item and non-item"),
        ({"USERFORMER__MODEL__HEADS": '["nope"]'}, "model.heads=['nope']: allowed items"),
        ({"USERFORMER__MODEL__N_HEADS": "3"}, "must be divisible by model.n_heads=3"),
        ({"USERFORMER__TRAIN__OBJECTIVE": "bert"}, "train.objective='bert': must be one of"),
    ],
)
def test_bad_values_are_clear_errors(env, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config(env={"USERFORMER_HOME": "/tmp/x", **env})


def test_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml", env={})
    f = tmp_path / "bad.toml"
    f.write_text("[spark\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(f, env={})
    f.write_text("[sparks]\nmaster='x'\n")
    with pytest.raises(ConfigError, match=r"unknown section \[sparks\]"):
        load_config(f, env={})
