"""One way to start Spark: the session every Spark job uses, with Delta Lake's JARs."""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import sys
import urllib.parse
from pathlib import Path

from userformer.jobs.core.config import Config
from userformer.jobs.core.errors import UserError
from userformer.jobs.core.storage import delta
from userformer.schemas.tables import TABLES

_SESSION = None

# infra/jars/lib/, filled by `make jars` (infra/jars/fetch.sh) and listed with
# checksums in its jars.sha256.
DEFAULT_JARS_DIR = Path(__file__).resolve().parents[2] / "infra" / "jars" / "lib"


def delta_jars(cfg: Config) -> list[Path]:
    """The verified JAR set of cfg.spark.jars_dir; refuses a missing, partial or altered set with how to reinstall."""
    root = Path(cfg.spark.jars_dir).expanduser() if cfg.spark.jars_dir else DEFAULT_JARS_DIR
    fix = "reinstall them with `make jars` (infra/jars/fetch.sh)"
    listing = root / "jars.sha256"
    if not listing.is_file():
        raise UserError(f"Delta's Spark JARs are not installed in {root} (no jars.sha256): {fix}")
    jars = []
    for line in listing.read_text().splitlines():
        if not line.strip():
            continue
        digest, name = line.split(maxsplit=1)
        jar = root / name.strip()
        if not jar.is_file():
            raise UserError(f"Delta's Spark JAR {jar} is missing: {fix}")
        h = hashlib.sha256()
        with open(jar, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != digest:
            raise UserError(f"Delta's Spark JAR {jar} does not match its checksum (corrupt or replaced): {fix}")
        jars.append(jar)
    if not any(j.name.startswith("delta-spark_") for j in jars):
        raise UserError(f"{listing} lists no delta-spark JAR: {fix}")
    return jars


def driver_conf(cfg: Config) -> dict[str, str]:
    """Settings fixed when a driver starts (a SparkContext's or a Spark Connect server's).

    Why: Delta's JARs from infra/jars (spark.jars: also shipped to a cluster's
    executors) with its SQL extension and catalog; no UI; no .crc / _SUCCESS
    side files beside local data files (the Delta log has its own checksums);
    executors run this venv's Python.
    """
    out = {
        "spark.master": cfg.spark.master,
        "spark.app.name": cfg.spark.app_name,
        "spark.jars": ",".join(str(j) for j in delta_jars(cfg)),
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.driver.memory": cfg.spark.driver_memory,
        "spark.executor.memory": cfg.spark.executor_memory,
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        # The session catalog's own folder (register_tables' database) under the home, not in the cwd.
        "spark.sql.warehouse.dir": str(cfg.home / "spark-warehouse"),
        "spark.hadoop.fs.file.impl": "org.apache.hadoop.fs.RawLocalFileSystem",
        "spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs": "false",
        "spark.executorEnv.PYSPARK_PYTHON": sys.executable,
    }
    return {**out, **{k: str(v) for k, v in {**s3a_from_env(cfg), **cfg.spark.extra}.items()}}


def session_conf(cfg: Config) -> dict[str, str]:
    """Settings every session sets for itself, also on a shared Spark Connect server.

    Why: Parquet timestamps as INT64 micros (what every other reader of the
    tables expects; Spark's INT96 default reads back as nanoseconds); UTC
    everywhere so dates do not shift with the host; raw files written by
    pandas/pyarrow often carry nanosecond timestamps, which Spark refuses, so
    they are read as longs and converted in ingest.
    """
    return {
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.shuffle.partitions": str(cfg.spark.shuffle_partitions),
        # Delta rebuilds a table's state from its log in this many tasks before every read, write and MERGE;
        # its default (50) makes that the slowest stage of a small day on a few cores.
        "spark.databricks.delta.snapshotPartitions": str(cfg.spark.shuffle_partitions),
        "spark.sql.adaptive.enabled": "true",
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        "spark.sql.parquet.compression.codec": "snappy",
        "spark.sql.legacy.parquet.nanosAsLong": "true",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
    }


# The Spark Connect server of a home (jobs/tools/connect.py): its folder and the file of its bearer token.
CONNECT_TOKEN = "token"


def connect_dir(cfg: Config) -> Path:
    return cfg.home / "run" / "connect"


def client_url(cfg: Config) -> str:
    """cfg.spark.remote with the token of this home's server when the URL carries none (a server started
    elsewhere takes its token in the URL, or in SPARK_CONNECT_AUTHENTICATE_TOKEN)."""
    url = cfg.spark.remote
    token = connect_dir(cfg) / CONNECT_TOKEN
    if ";token=" in url or not token.is_file() or "SPARK_CONNECT_AUTHENTICATE_TOKEN" in os.environ:
        return url
    # gRPC's local credentials carry a token without TLS only to "localhost" (pyspark's ChannelBuilder).
    url = url.replace("sc://127.0.0.1:", "sc://localhost:")
    return url.rstrip("/") + "/;token=" + token.read_text().strip()


def _reusable(session, cfg: Config) -> bool:
    if session is None:
        return False
    if cfg.spark.remote:
        return getattr(session, "_userformer_remote", None) == cfg.spark.remote and not session.is_stopped
    return (
        getattr(session, "_jsc", None) is not None
        and getattr(session, "_userformer_remote", None) is None
        and session.conf.get("spark.master") == cfg.spark.master
    )


def spark_session(cfg: Config):
    """A SparkSession that reads and writes Delta natively: a client of the Spark Connect server at
    cfg.spark.remote (one long-lived driver for every task: jobs/tools/connect.py starts it), else a driver in
    this process for cfg.spark.master (local[N] or spark://...)."""
    global _SESSION
    if _reusable(_SESSION, cfg):
        return _SESSION
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    if cfg.spark.remote:
        _SESSION = SparkSession.builder.remote(client_url(cfg)).getOrCreate()
        for k, v in session_conf(cfg).items():
            _SESSION.conf.set(k, v)
        _SESSION._userformer_remote = cfg.spark.remote
        # Close the client before the interpreter's last collection: a DataFrame cached on the server
        # (localCheckpoint) left alive then (a step that failed) asks the server to release it from its __del__,
        # and a gRPC call made during finalization never returns. Once the client is closed, it asks nothing.
        atexit.register(stop_spark)
        return _SESSION
    if cfg.spark.master.startswith("spark://") and "SPARK_CONF_DIR" not in os.environ:
        # The local standalone cluster (infra/spark/start-cluster.sh) authenticates with a generated secret,
        # kept in its run folder's spark-defaults.conf: a driver reads it there, never from its command line.
        conf = Path(os.environ.get("USERFORMER_SPARK_RUN_DIR") or cfg.home / "run" / "spark") / "conf"
        if (conf / "spark-defaults.conf").is_file():
            os.environ["SPARK_CONF_DIR"] = str(conf)
    b = SparkSession.builder
    for k, v in {**session_conf(cfg), **driver_conf(cfg)}.items():  # driver_conf ends with spark.extra: it wins
        b = b.config(k, v)
    _SESSION = b.getOrCreate()
    _SESSION.sparkContext.setLogLevel("WARN")
    return _SESSION


def s3a_from_env(cfg: Config) -> dict:
    """S3A settings for a warehouse in S3, from the AWS environment that delta-rs and fsspec read, so the three
    reach the same endpoint (credentials: S3A's default chain reads AWS_ACCESS_KEY_ID etc. itself).
    `[spark] extra` overrides each."""
    if not str(cfg.warehouse_root).startswith("s3://"):
        return {}
    # S3A buffers uploads in local files through Hadoop's checksummed LocalFileSystem, which fs.file.impl
    # (RawLocalFileSystem, above) is not: buffer in memory instead.
    out = {"spark.hadoop.fs.s3a.fast.upload.buffer": "bytebuffer"}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:  # an S3-compatible store (MinIO, Ceph, moto): addressed by path, TLS as its URL says
        out["spark.hadoop.fs.s3a.endpoint"] = endpoint
        out["spark.hadoop.fs.s3a.path.style.access"] = "true"
        out["spark.hadoop.fs.s3a.connection.ssl.enabled"] = str(endpoint.startswith("https://")).lower()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        out["spark.hadoop.fs.s3a.endpoint.region"] = region
    return out


def register_tables(spark, cfg: Config, database: str = "userformer") -> list[str]:
    """Register every existing warehouse table as the external table `<database>.<name>` of the session's catalog.

    `CREATE TABLE ... USING DELTA LOCATION`: the catalog only points at the
    table (dropping the entry deletes nothing). A name already registered at
    another location (another USERFORMER_HOME in this session) is pointed at
    this one. Returns the qualified names registered.
    """
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", database):
        raise UserError(f"not a plain database name: {database!r}")
    spark.sql(f"CREATE DATABASE IF NOT EXISTS `{database}`")
    out = []
    for name in TABLES:
        path = cfg.table_path(name)
        if not delta.exists(path):
            continue
        loc = delta.spark_uri(path)
        full = f"`{database}`.`{name}`"
        if spark.catalog.tableExists(f"{database}.{name}"):
            have = spark.sql(f"DESCRIBE DETAIL {full}").first()["location"]
            if _same_location(have, loc):
                out.append(f"{database}.{name}")
                continue
            spark.sql(f"DROP TABLE {full}")  # external: only the catalog entry goes
        quoted = loc.replace("\\", "\\\\").replace("'", "\\'")
        spark.sql(f"CREATE TABLE IF NOT EXISTS {full} USING DELTA LOCATION '{quoted}'")
        out.append(f"{database}.{name}")
    return out


def _same_location(a: str, b: str) -> bool:
    def norm(x: str) -> str:
        x = re.sub(r"^file:(//)?", "", x).rstrip("/")
        return urllib.parse.unquote(x)

    return norm(a) == norm(b)


def stop_spark() -> None:
    global _SESSION
    if _SESSION is not None:
        _SESSION.stop()
        _SESSION = None
