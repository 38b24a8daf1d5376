"""The CLI as a user runs it: one executable, --help on every subcommand, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from userformer.jobs.cli import build_parser

EXE = str(Path(sys.executable).parent / "userformer")


def commands() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sorted(sub.choices)


def run(*args, home=None):
    env = {**os.environ}
    if home:
        env["USERFORMER_HOME"] = str(home)
    return subprocess.run([EXE, *args], capture_output=True, text=True, env=env, timeout=120)


def test_every_subcommand_has_help():
    names = commands()
    assert {
        "generate",
        "load",
        "ingest",
        "sequences",
        "check",
        "demo",
        "run-day",
        "tables",
        "schema",
        "train",
        "finetune",
        "evaluate",
    } <= set(names)
    top = run("--help")
    assert top.returncode == 0 and all(n in top.stdout for n in names)
    for name in names:
        r = run(name, "--help")
        assert r.returncode == 0, (name, r.stderr)
        assert r.stdout.startswith("usage: userformer " + name), name


def test_help_loads_no_heavy_library():
    """`userformer --help` answers in a second: torch, Spark, FAISS and GE load only in the steps that use them."""
    code = (
        "import sys; from userformer.jobs.cli import build_parser; build_parser(); "
        "print(' '.join(m for m in ('torch', 'pyspark', 'faiss', 'great_expectations') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["ingest", "--dt", "2026-13-01"], "not a date"),
        (["ingest"], "the following arguments are required: --dt"),
    ],
)
def test_argument_errors(args, message, home):
    r = run(*args, home=home)
    assert r.returncode == 2 and message in r.stderr


def test_missing_raw_partition_is_a_clear_error(home):
    r = run("ingest", "--dt", "2026-01-01", home=home)
    assert r.returncode == 2
    assert "userformer ingest: error: raw partition not found" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_config_is_a_clear_error(home):
    env_home = home
    r = subprocess.run(
        [EXE, "tables"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "USERFORMER_HOME": str(env_home), "USERFORMER__SEQUENCES__MAX_LEN": "-1"},
    )
    assert r.returncode == 2 and "sequences.max_len=-1: must be >= 1" in r.stderr


def test_schema_and_tables_commands(home):
    r = run("schema", home=home)
    assert r.returncode == 0 and "### `user_sequences`" in r.stdout and "| `lifetime_counts` |" in r.stdout
    r = run("tables", home=home)
    assert r.returncode == 0 and "(not created yet)" in r.stdout
