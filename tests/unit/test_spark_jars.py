"""Delta's Spark JARs: the installed set is verified before any Spark job starts, with a fix in the message."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from userformer.jobs.core.config import load_config
from userformer.jobs.core.errors import UserError
from userformer.jobs.core.spark import DEFAULT_JARS_DIR, delta_jars

EXE = str(Path(sys.executable).parent / "userformer")


@pytest.fixture
def jars_copy(tmp_path):
    """A copy of the installed JAR folder that a test may damage."""
    d = tmp_path / "jars"
    shutil.copytree(DEFAULT_JARS_DIR, d)
    return d


def cfg_for(d: Path, tmp_path):
    return load_config(env={"USERFORMER_HOME": str(tmp_path / "home"), "USERFORMER__SPARK__JARS_DIR": str(d)})


def test_installed_set_is_complete_and_pinned(tmp_path):
    jars = delta_jars(load_config(env={"USERFORMER_HOME": str(tmp_path)}))
    names = {j.name for j in jars}
    pinned = {
        line.split()[1]
        for line in (DEFAULT_JARS_DIR.parents[0] / "jars.sha256").read_text().splitlines()
        if line.strip()
    }
    assert names == pinned
    assert any(n.startswith("delta-spark_4.2_2.13-") for n in names) and any(
        n.startswith("delta-storage-") for n in names
    )


@pytest.mark.parametrize(
    "damage, message",
    [
        ("remove_jar", "is missing"),
        ("corrupt_jar", "does not match its checksum"),
        ("remove_listing", "are not installed"),
    ],
)
def test_damaged_set_is_refused_with_the_fix(jars_copy, tmp_path, damage, message):
    delta_jar = next(jars_copy.glob("delta-spark_*.jar"))
    if damage == "remove_jar":
        delta_jar.unlink()
    elif damage == "corrupt_jar":
        with open(delta_jar, "r+b") as f:  # a truncated download
            f.truncate(delta_jar.stat().st_size // 2)
    else:
        (jars_copy / "jars.sha256").unlink()
    with pytest.raises(UserError, match=message) as err:
        delta_jars(cfg_for(jars_copy, tmp_path))
    assert "make jars" in str(err.value)


def test_a_step_refuses_to_start_without_the_jars(jars_copy, tmp_path):
    """The CLI says what is wrong and how to fix it, before any Spark work (exit 2, no traceback)."""
    next(jars_copy.glob("delta-storage-*.jar")).unlink()
    raw = tmp_path / "home" / "raw"
    r = subprocess.run(
        [
            EXE,
            "generate",
            "--users",
            "20",
            "--items",
            "30",
            "--days",
            "1",
            "--start",
            "2026-11-01",
            "--seed",
            "1",
            "--out",
            str(raw),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "USERFORMER_HOME": str(tmp_path / "home")},
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [EXE, "ingest", "--dt", "2026-11-01"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "USERFORMER_HOME": str(tmp_path / "home"), "USERFORMER__SPARK__JARS_DIR": str(jars_copy)},
    )
    assert r.returncode == 2, r.stderr
    assert "delta-storage" in r.stderr and "is missing" in r.stderr and "make jars" in r.stderr
    assert "Traceback" not in r.stderr
