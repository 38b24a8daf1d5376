"""A warehouse in a bucket: the pipeline runs on s3:// as on local disk (docs/operations.md "Object storage").

A real S3 server (moto's, started as its own process on 127.0.0.1 and stopped by PID) holds home B's
warehouse; home A keeps its warehouse on local disk. Both run the same two generated days through
`userformer run-day` (B in a subprocess whose Spark has the S3A connector: `make jars-s3`, spark.jars_dir;
the endpoint comes from the AWS environment, as delta-rs and fsspec read it). Then:

- every table of B equals A's (Spark's tables through S3A, delta-rs's in the bucket, read back with delta-rs);
- the files beside the tables are in the bucket, not on local disk: the staged inference (a run folder and
  its manifest), the publish marker and its log;
- Polars reads a published table from the bucket;
- `userformer maintain` compacts and vacuums there, keeps staged inference in use (its age is its newest object's
  time: a bucket has no folder times) and clears a dead writer's staging;
- a restore repair of the last day moves nothing by rename and ends equal to the clean run again.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import REPO
from tests.integration import warehouses
from userformer.jobs.core.config import load_config
from userformer.jobs.core.storage import delta, files
from userformer.jobs.steps import infer, publish

pytestmark = [pytest.mark.spark, pytest.mark.slow]

D1, D2 = warehouses.D1, warehouses.D2
S3A_JARS = REPO / "infra" / "jars" / "lib-s3"
EXE = str(Path(sys.executable).with_name("userformer"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with an empty bucket; yields the AWS environment that reaches it."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-2000:]
                time.sleep(0.2)
        env = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            files.location("s3://userformer-test").fs.mkdir("userformer-test")
            yield env
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def run(args, env, timeout=900):
    r = subprocess.run([EXE, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (args, r.stdout[-3000:], r.stderr[-6000:])
    return r


def test_the_pipeline_runs_on_a_bucket_as_on_local_disk(tmp_path, bucket, spark):
    assert (S3A_JARS / "jars.sha256").is_file(), "the S3A JAR set is not installed: run `make jars-s3`"
    a = warehouses.two_days(tmp_path / "a")

    wh = "s3://userformer-test/wh"
    b_env = warehouses.small_env(tmp_path / "b", raw_root=a.raw_root, warehouse_root=wh)
    b = load_config(env=b_env)
    assert files.is_remote(b.warehouse_root) and str(b.table_path("events")) == f"{wh}/events"
    env = {k: v for k, v in os.environ.items() if not k.startswith("USERFORMER")}
    env.update(bucket, **b_env, USERFORMER__SPARK__JARS_DIR=str(S3A_JARS))
    run(["run-day", "--dt", str(D1), "--to", str(D2)], env)

    warehouses.assert_same_tables(a, b)
    assert not (b.home / "warehouse").exists()  # nothing of the warehouse on local disk
    # The files beside the tables, in the bucket: the staged shard (its manifest names its run folder) and
    # the publish marker with its log.
    version = publish.published_outputs(b)["model_version"]
    shard = infer.shard_dir(b, D2, version, 0, 1)
    manifest = infer.read_manifest(shard)
    assert manifest["path"].startswith(f"{wh}/_staging/infer/dt={D2}/") and manifest["files"].startswith("run=")
    assert [p.name for p in shard.iterdir()] == sorted([infer.MANIFEST, manifest["files"]])
    assert publish.published_outputs(b)["tables"] == {t: delta.version_of(b.table_path(t)) for t in infer.OUTPUTS}
    logs = [publish.marker_path(c).with_name("log.jsonl").read_text().splitlines() for c in (a, b)]
    assert len(logs[1]) == len(logs[0]) == 1  # D1 has too little history to train on: the first publish is D2
    # Polars reads a published table from the bucket (storage options from the same environment).
    ue = pl.read_delta(str(b.table_path("user_embeddings")), storage_options=bucket)
    assert ue.height == len(warehouses.table_rows(a, "user_embeddings", ("user_id",)))

    # maintain in the bucket: compaction and vacuum change no row; staged inference waiting for publish is kept
    # (its age is its newest object's), a dead writer's staging goes (no writer runs while maintain holds the lease).
    in_use = files.location(f"{wh}/_staging/infer/dt=2099-12-31")
    dead = files.location(f"{wh}/_staging/user_candidates/20991231T000000-killed")
    for d in (in_use, dead):
        (d / "part-0.parquet").write_bytes(b"x")
    res = run(["maintain"], env)
    warehouses.assert_same_tables(a, b)
    assert in_use.is_dir() and str(in_use) not in res.stdout
    assert not dead.is_dir() and str(dead) in res.stdout

    # A restore repair of the last day moves the publish marker aside (copy + delete) and reruns it.
    run(["repair", "--from", str(D2), "--to", str(D2), "--mode", "restore"], env)
    warehouses.assert_same_tables(a, b, renumbered=True)
    assert files.location(f"{wh}/_repair").is_dir()
