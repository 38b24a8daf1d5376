"""Security basics: checkpoints load as weights only, Airflow's tasks get a filtered environment, its password is
generated into a private file and never printed."""

from __future__ import annotations

import ast
import json
import os
import pickle

import pytest
import torch

from tests.conftest import REPO
from userformer.jobs.core.config import load_config
from userformer.jobs.tools import orchestrator


def _torch_loads(tree) -> list[ast.Call]:
    return [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr == "load"
        and isinstance(n.func.value, ast.Name)
        and n.func.value.id == "torch"
    ]


def test_every_torch_load_is_weights_only():
    seen = 0
    for folder in ("jobs", "models"):
        for path in (REPO / folder).rglob("*.py"):
            for call in _torch_loads(ast.parse(path.read_text())):
                seen += 1
                kw = {k.arg: k.value for k in call.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                assert ok, f"{path.relative_to(REPO)}:{call.lineno}: torch.load without weights_only=True"
    assert seen >= 3  # the registry, training's resume state, the model's checkpoints


class Payload:
    """What a tampered checkpoint could carry: unpickling it would run code."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_checkpoint_with_code_is_refused(tmp_path):
    from userformer.models.train import load_checkpoint

    path = tmp_path / "evil.pt"
    torch.save({"model_config": {}, "state_dict": {}, "x": Payload()}, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(path)


def test_tasks_get_only_what_they_need(home):
    cfg = load_config()
    base = {
        "PATH": "/usr/bin",
        "HOME": "/root",
        "USERFORMER__SPARK__MASTER": "local[2]",
        "AWS_ACCESS_KEY_ID": "key",
        "JAVA_HOME": "/opt/java",
        "GITHUB_TOKEN": "secret",
        "DATABASE_PASSWORD": "secret",
        "MY_TOOL_SETTING": "x",
    }
    env = orchestrator.environment(cfg, 8080, base=base)
    assert {"GITHUB_TOKEN", "DATABASE_PASSWORD", "MY_TOOL_SETTING"}.isdisjoint(env)
    assert env["AWS_ACCESS_KEY_ID"] == "key" and env["JAVA_HOME"] == "/opt/java"
    assert env["USERFORMER__SPARK__MASTER"] == "local[2]" and env["AIRFLOW__API__HOST"] == "127.0.0.1"
    cfg.pipeline.task_env = ["MY_TOOL_SETTING"]
    assert orchestrator.environment(cfg, 8080, base=base)["MY_TOOL_SETTING"] == "x"


def test_the_password_is_generated_private_and_kept(tmp_path):
    p = orchestrator.ensure_password(tmp_path)
    assert p.stat().st_mode & 0o777 == 0o600
    first = json.loads(p.read_text())["admin"]
    assert len(first) >= 16 and orchestrator.ensure_password(tmp_path) == p
    assert json.loads(p.read_text())["admin"] == first  # not regenerated: a running Airflow keeps its login
