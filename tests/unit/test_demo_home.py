"""The demo clears only a home it made, and only inside it; without a home of its own it uses its own default."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest

from userformer.jobs.core.config import DEFAULT_HOME, load_config
from userformer.jobs.core.errors import UserError
from userformer.jobs.flows import demo


def test_the_marker_names_the_home_and_a_second_demo_clears_it(home):
    cfg = load_config()
    (cfg.warehouse_root / "events").mkdir(parents=True)
    (cfg.warehouse_root / "events" / "part.parquet").write_text("x")
    with pytest.raises(UserError, match="no demo made"):
        demo._fresh_demo_home(cfg)
    assert (cfg.warehouse_root / "events" / "part.parquet").exists()

    shutil.rmtree(cfg.warehouse_root)
    demo._fresh_demo_home(cfg)
    marker = json.loads((cfg.home / demo.DEMO_MARKER).read_text())
    assert marker["home"] == str(cfg.home.resolve())
    (cfg.warehouse_root / "events").mkdir(parents=True)
    demo._fresh_demo_home(cfg)  # a demo's own data: cleared
    assert not (cfg.warehouse_root / "events").exists()


def test_a_moved_home_or_an_old_marker_is_not_trusted(home, tmp_path):
    cfg = load_config()
    cfg.home.mkdir(parents=True, exist_ok=True)
    (cfg.home / demo.DEMO_MARKER).write_text(json.dumps({"home": str(tmp_path / "elsewhere")}))
    (cfg.models_root / "versions").mkdir(parents=True)
    with pytest.raises(UserError, match="was not made by a demo for this folder"):
        demo._fresh_demo_home(cfg)
    (cfg.home / demo.DEMO_MARKER).write_text("made by `userformer demo`\n")  # the format before it named its home
    with pytest.raises(UserError, match="names no home"):
        demo._fresh_demo_home(cfg)
    assert (cfg.models_root / "versions").is_dir()


def test_paths_outside_the_home_are_refused(home, tmp_path, monkeypatch):
    precious = tmp_path / "production-warehouse"
    (precious / "events").mkdir(parents=True)
    monkeypatch.setenv("USERFORMER__PATHS__WAREHOUSE_ROOT", str(precious))
    cfg = load_config()
    cfg.home.mkdir(parents=True, exist_ok=True)
    (cfg.home / demo.DEMO_MARKER).write_text(json.dumps({"home": str(cfg.home.resolve())}))
    with pytest.raises(UserError, match=r"only clears folders inside its home .*warehouse is "):
        demo._fresh_demo_home(cfg)
    assert (precious / "events").is_dir()
    monkeypatch.setenv("USERFORMER__PATHS__WAREHOUSE_ROOT", "s3://bucket/wh")
    with pytest.raises(UserError, match="warehouse is s3://bucket/wh"):
        demo._fresh_demo_home(load_config())


def test_the_demo_has_its_own_default_home(monkeypatch):
    # demo_config exports both variables; set first so that monkeypatch removes them again afterwards (a delenv of
    # an unset variable records nothing to undo).
    for k in ("USERFORMER_HOME", "USERFORMER_CONFIG"):
        monkeypatch.setenv(k, "unset")
        monkeypatch.delenv(k)
    cfg = load_config()
    assert cfg.paths.home == DEFAULT_HOME
    got = demo.demo_config(argparse.Namespace(config=None), cfg)
    assert got.home != cfg.home and str(got.home).endswith("userformer-demo")
