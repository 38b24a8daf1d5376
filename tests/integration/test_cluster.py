"""Smoke test: the pipeline's SparkSession runs on a real standalone cluster on 127.0.0.1.

The driver runs in a subprocess (one SparkContext per process; the test process
may hold the local[2] session of conftest). The same script runs once on the
cluster and once in local[2]; both results must agree, and with a closed form.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from .spark_cluster import SCRIPTS, SparkCluster, pid_alive

N_ROWS = 100_000
N_KEYS = 37

# argv: output folder, executors to wait for (0 in local mode), rows, keys.
DRIVER = r"""
import json, sys, time
from pyspark.sql import functions as F
from userformer.jobs.core.config import load_config
from userformer.jobs.core.spark import spark_session, stop_spark

out, want, rows, keys = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
spark = spark_session(load_config())
sc = spark.sparkContext
deadline = time.monotonic() + 120
while len(sc.statusTracker().getExecutorInfos()) < want + 1 and time.monotonic() < deadline:
    time.sleep(0.25)
# Which interpreter runs Python on the executors.
pythons = sorted(set(sc.parallelize(range(8), 8).map(lambda _: sys.executable).collect()))
bucket = F.udf(lambda v: (v * 7919) % 1000, "long")  # a Python UDF: executors must run Python
(
    spark.range(0, rows, numPartitions=4)
    .withColumn("bucket", bucket(F.col("id")))
    .withColumn("k", F.col("bucket") % keys)
    .groupBy("k")  # the shuffle
    .agg(F.count("*").alias("n"), F.sum("id").alias("s"), F.max("bucket").alias("mx"))
    .write.mode("overwrite").parquet(out)
)
info = {
    "master": sc.master,
    "app_id": sc.applicationId,
    "executors": sc._jsc.sc().getExecutorMemoryStatus().size(),  # executors + the driver
    "pythons": pythons,
}
stop_spark()
print(json.dumps(info))
"""


def _rows(path) -> list[dict]:
    return sorted(pq.read_table(path).to_pylist(), key=lambda r: r["k"])


def _expected() -> list[dict]:
    ids = np.arange(N_ROWS, dtype=np.int64)
    bucket = (ids * 7919) % 1000
    k = bucket % N_KEYS
    return [
        {"k": int(j), "n": int((k == j).sum()), "s": int(ids[k == j].sum()), "mx": int(bucket[k == j].max())}
        for j in range(N_KEYS)
    ]


@pytest.mark.cluster
def test_cluster_runs_pipeline_session_like_local(tmp_path):
    home = tmp_path / "home"
    cluster = SparkCluster(tmp_path / "spark", workers=2, cores=1, memory="1g")
    with cluster:
        assert cluster.master_url == f"spark://127.0.0.1:{cluster.master_port}"
        st = cluster.state()
        assert st["status"] == "ALIVE"
        assert [w["state"] for w in st["workers"]] == ["ALIVE", "ALIVE"]
        assert all(w["host"] == "127.0.0.1" and w["cores"] == 1 and w["memory"] == 1024 for w in st["workers"])
        pids = dict(cluster.pids)
        assert len(pids) == 3 and all(pid_alive(p) for p in pids.values()), pids
        # Shared-secret authentication: the secret in a private file the daemons read, never on a command line.
        conf = tmp_path / "spark" / "conf" / "spark-defaults.conf"
        assert conf.stat().st_mode & 0o777 == 0o600 and "spark.authenticate true" in conf.read_text()
        secret = (tmp_path / "spark" / "secret").read_text().strip()
        assert len(secret) == 64 and secret in conf.read_text()
        for pid in pids.values():
            assert secret not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        master_log = next((tmp_path / "spark" / "logs").glob("*Master*.out")).read_text()
        assert "authentication enabled" in master_log, master_log[-3000:]

        # start-cluster.sh again: a no-op that prints the same URL.
        again = subprocess.run(
            ["bash", str(SCRIPTS / "start-cluster.sh")],
            env=cluster._script_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip().splitlines()[-1] == cluster.master_url

        # The pipeline's session, on the cluster.
        env = cluster.driver_env(home=home)
        t0 = time.monotonic()
        r = cluster.run_python(DRIVER, env, args=[tmp_path / "out_cluster", 2, N_ROWS, N_KEYS], timeout=600)
        on_cluster = json.loads(r.stdout.strip().splitlines()[-1])
        t_cluster = time.monotonic() - t0
        assert on_cluster["master"] == cluster.master_url
        assert on_cluster["executors"] == 3, (on_cluster, cluster.log_tail())  # 2 executors + driver
        assert on_cluster["pythons"] == [cluster.python]
        app = cluster.app(on_cluster["app_id"])
        assert app is not None, cluster.state()
        assert app["state"] == "FINISHED", app

        # The same script in local mode.
        local_env = dict(env, USERFORMER__SPARK__MASTER="local[2]")
        t0 = time.monotonic()
        r = cluster.run_python(DRIVER, local_env, args=[tmp_path / "out_local", 0, N_ROWS, N_KEYS], timeout=600)
        t_local = time.monotonic() - t0
        local = json.loads(r.stdout.strip().splitlines()[-1])
        assert local["master"] == "local[2]" and local["executors"] == 1

        got = _rows(tmp_path / "out_cluster")
        assert got == _rows(tmp_path / "out_local")
        assert got == _expected()
        print(
            f"\ncluster start {cluster.start_seconds:.1f}s, driver on cluster {t_cluster:.1f}s,"
            f" driver local[2] {t_local:.1f}s",
            end="",
        )

    print(f", stop {cluster.stop_seconds:.1f}s")
    assert not [p for p in pids.values() if pid_alive(p)], "Spark daemons still running after stop"
    assert not list((tmp_path / "spark" / "pids").glob("*.pid"))
    # (No check that the ports are closed: with the PIDs gone they are, and a free
    # ephemeral port may be taken at once by any other process on a busy machine.)
    # Stopping again is a no-op.
    again = subprocess.run(
        ["bash", str(SCRIPTS / "stop-cluster.sh")],
        env=cluster._script_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr


def _tables(home) -> dict:
    """Every table of a home, sorted so that equal content compares equal."""
    from userformer.jobs.core.storage import delta
    from userformer.schemas.tables import FOUNDATION_TABLES

    keys = {
        "events": ["event_id"],
        "events_rejected": ["dt", "reason", "source_file", "event_id", "ts_raw"],
        "vocab": ["kind", "idx"],
        "items": ["item_idx"],
        "user_sequences": ["user_id"],
    }
    out = {}
    for name in FOUNDATION_TABLES:
        t = delta.read_arrow(home / "warehouse" / name)
        out[name] = t.sort_by([(k, "ascending") for k in keys[name]])
    return out


@pytest.mark.cluster
def test_ingest_and_sequences_on_the_cluster_equal_local_mode(tmp_path):
    """`userformer` steps with spark.master=spark://127.0.0.1:PORT give the same tables as local[2]."""
    raw = tmp_path / "raw"
    with SparkCluster(tmp_path / "spark", workers=2, cores=1, memory="1g") as cluster:
        env = cluster.driver_env(home=tmp_path / "unused")
        gen = subprocess.run(
            [
                cluster.bin("userformer"),
                "generate",
                "--users",
                "300",
                "--items",
                "400",
                "--days",
                "3",
                "--start",
                "2026-03-01",
                "--seed",
                "11",
                "--out",
                str(raw),
                "--malformed-rate",
                "0.01",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert gen.returncode == 0, gen.stderr
        homes = {}
        for mode in ("cluster", "local"):
            home = tmp_path / mode
            env = cluster.driver_env(home=home, USERFORMER__PATHS__RAW_ROOT=str(raw))
            if mode == "local":
                env["USERFORMER__SPARK__MASTER"] = "local[2]"
            r = subprocess.run(
                [cluster.bin("userformer"), "run-day", "--dt", "2026-03-01", "--to", "2026-03-03"],
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert r.returncode == 0, f"{mode}:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}\n{cluster.log_tail()}"
            homes[mode] = home
        apps = [a for a in cluster.state().get("completedapps", []) if a["name"] == "userformer"]
        assert apps, "the cluster run must show up as an application on the master"
    on_cluster, local = _tables(homes["cluster"]), _tables(homes["local"])
    assert on_cluster["events"].num_rows > 1000 and on_cluster["user_sequences"].num_rows > 100
    assert on_cluster["events_rejected"].num_rows > 0
    for name in on_cluster:
        assert on_cluster[name].equals(local[name]), name
