"""Steps as clients of one long-lived Spark Connect server give the tables their own drivers give.

`userformer spark-connect start` starts the server (its own process group, PID recorded); the steps run as
subprocesses with spark.remote set and NO Java on their PATH, so they cannot have started a driver of their own.
A rerun of a day (RESTORE + MERGE, as SQL through the server) is part of it. The same steps in another home, run
in the test process on its own local driver, give the reference tables.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.spark_cluster import pid_alive
from tests.integration.test_cluster import _tables
from userformer.jobs.core.config import load_config
from userformer.jobs.core.errors import UserError
from userformer.jobs.steps import ingest, sequences
from userformer.jobs.tools import connect, generate

pytestmark = pytest.mark.spark

START = dt.date(2026, 3, 1)
DAYS = [str(START + dt.timedelta(days=i)) for i in range(3)]
EXE = str(Path(sys.executable).parent / "userformer")


def _without_java(env: dict) -> dict:
    """`env` with every PATH entry that holds a `java` removed and no JAVA_HOME: no JVM can start from it."""
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and not (Path(p) / "java").exists()]
    out = {k: v for k, v in env.items() if k not in ("JAVA_HOME", "SPARK_HOME")}
    out["PATH"] = os.pathsep.join(path)
    return out


def _steps(env: dict) -> None:
    """Ingest and sequences for three days, then the last day's sequences again (a rerun: RESTORE + MERGE)."""
    commands = [c for day in DAYS for c in (["ingest", "--dt", day], ["sequences", "--dt", day])]
    for args in [*commands, ["sequences", "--dt", DAYS[-1]]]:
        r = subprocess.run([EXE, *args], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{args}:\n{r.stdout[-2000:]}\n{r.stderr[-5000:]}"


def _steps_here(cfg) -> None:
    """The same steps in this process, on the session's own local driver: the reference tables."""
    for day in DAYS:
        ingest.ingest(cfg, dt.date.fromisoformat(day))
        sequences.update(cfg, dt.date.fromisoformat(day))
    sequences.update(cfg, dt.date.fromisoformat(DAYS[-1]))


def test_steps_through_spark_connect_equal_their_own_driver(tmp_path, spark):
    raw = tmp_path / "raw"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("USERFORMER_", "USERFORMER__"))}
    own = load_config(env={**base, "USERFORMER_HOME": str(tmp_path / "own"), "USERFORMER__PATHS__RAW_ROOT": str(raw)})
    generate.generate(own, users=300, items=400, days=3, start=START, seed=11, out=raw, malformed_rate=0.01)

    _steps_here(own)

    env = {**base, "USERFORMER_HOME": str(tmp_path / "remote"), "USERFORMER__PATHS__RAW_ROOT": str(raw)}
    cfg = load_config(env=env)
    server = connect.start(cfg)
    try:
        assert server["url"].startswith("sc://127.0.0.1:") and pid_alive(server["pid"])
        assert connect.start(cfg) == server  # started already: the same server
        # The token is in a private file and in no process's command line.
        token = (connect.run_dir(cfg) / connect.TOKEN).read_text().strip()
        assert len(token) == 64 and (connect.run_dir(cfg) / connect.TOKEN).stat().st_mode & 0o777 == 0o600
        assert token not in Path(f"/proc/{server['pid']}/cmdline").read_bytes().decode(errors="replace")
        _steps(_without_java({**env, "USERFORMER__SPARK__REMOTE": server["url"]}))
        # Without the token the server refuses the client.
        anonymous = subprocess.run(
            [
                sys.executable,
                "-c",
                "from pyspark.sql import SparkSession; import sys;"
                "SparkSession.builder.remote(sys.argv[1]).getOrCreate().range(1).count()",
                server["url"],
            ],
            env=_without_java(base),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert anonymous.returncode != 0
        # A step that fails while it holds a DataFrame cached on the server exits (pyspark's client would ask the
        # server to release it during the interpreter's finalization, and wait forever).
        failing = subprocess.run(
            [
                sys.executable,
                "-c",
                "from userformer.jobs.core.config import load_config\n"
                "from userformer.jobs.core.spark import spark_session\n"
                "kept = spark_session(load_config()).range(100).localCheckpoint()\n"
                "assert kept.count() == 100\n"
                "raise RuntimeError('the step failed')\n",
            ],
            env=_without_java({**env, "USERFORMER__SPARK__REMOTE": server["url"]}),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert failing.returncode == 1 and "the step failed" in failing.stderr, failing.stderr[-3000:]
    finally:
        connect.stop(cfg)
    assert not pid_alive(server["pid"]) and connect.status(cfg) is None
    with pytest.raises(ProcessLookupError):
        os.killpg(server["pid"], 0)  # no process of its group is left, not even an unreaped leader

    # A server that cannot start is a clear error naming its log, and leaves no process: a taken port is refused
    # before anything starts; a driver that fails (an unknown master) ends the server.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(UserError, match="is in use"):
            connect.start(cfg, port=taken.getsockname()[1])
    bad = load_config(env={**env, "USERFORMER__SPARK__MASTER": "nowhere://0"})
    with pytest.raises(UserError, match=r"Spark Connect server \(pid (\d+)\) exited") as err:
        connect.start(bad, timeout=120)
    assert "server.log" in str(err.value) and connect.status(bad) is None
    assert not pid_alive(int(re.search(r"pid (\d+)", str(err.value)).group(1)))

    remote, local = _tables(tmp_path / "remote"), _tables(tmp_path / "own")
    assert remote["user_sequences"].num_rows > 100 and remote["events_rejected"].num_rows > 0
    for name in local:
        assert remote[name].equals(local[name]), name
