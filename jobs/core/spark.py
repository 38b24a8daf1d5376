"""One way to start Spark: the session every Spark job uses, with Delta Lake's JARs."""

from __future__ import annotations

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


def spark_session(cfg: Config):
    """A SparkSession for cfg.spark.master (local[N] or spark://...) that reads and writes Delta natively.

    Why the settings: Delta's JARs from infra/jars (spark.jars: also shipped to
    a cluster's executors) with its SQL extension and catalog; Parquet
    timestamps as INT64 micros (what every other reader of the tables expects;
    Spark's INT96 default reads back as nanoseconds); UTC everywhere so dates
    do not shift with the host.
    """
    global _SESSION
    if _SESSION is not None and _SESSION._jsc is not None and _SESSION.conf.get("spark.master") == cfg.spark.master:
        return _SESSION
    jars = delta_jars(cfg)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    if cfg.spark.master.startswith("spark://") and "SPARK_CONF_DIR" not in os.environ:
        # The local standalone cluster (infra/spark/start-cluster.sh) authenticates with a generated secret,
        # kept in its run folder's spark-defaults.conf: a driver reads it there, never from its command line.
        conf = Path(os.environ.get("USERFORMER_SPARK_RUN_DIR") or cfg.home / "run" / "spark") / "conf"
        if (conf / "spark-defaults.conf").is_file():
            os.environ["SPARK_CONF_DIR"] = str(conf)
    from pyspark.sql import SparkSession

    b = (
        SparkSession.builder.master(cfg.spark.master)
        .appName(cfg.spark.app_name)
        .config("spark.jars", ",".join(str(j) for j in jars))
        .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
        .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
        .config("spark.driver.memory", cfg.spark.driver_memory)
        .config("spark.executor.memory", cfg.spark.executor_memory)
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.session.timeZone", "UTC")
        # The session catalog's own folder (register_tables' database) under the home, not in the cwd.
        .config("spark.sql.warehouse.dir", str(cfg.home / "spark-warehouse"))
        .config("spark.sql.shuffle.partitions", str(cfg.spark.shuffle_partitions))
        # Delta rebuilds a table's state from its log in this many tasks before every read, write and MERGE;
        # its default (50) makes that the slowest stage of a small day on a few cores.
        .config("spark.databricks.delta.snapshotPartitions", str(cfg.spark.shuffle_partitions))
        .config("spark.sql.adaptive.enabled", "true")
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
        .config("spark.sql.parquet.compression.codec", "snappy")
        # Raw files written by pandas/pyarrow often carry nanosecond timestamps,
        # which Spark refuses; read them as longs and convert in ingest.
        .config("spark.sql.legacy.parquet.nanosAsLong", "true")
        # No .crc / _SUCCESS side files beside local data files (the Delta log has its own checksums).
        .config("spark.hadoop.fs.file.impl", "org.apache.hadoop.fs.RawLocalFileSystem")
        .config("spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs", "false")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.executorEnv.PYSPARK_PYTHON", sys.executable)
    )
    for k, v in {**s3a_from_env(cfg), **cfg.spark.extra}.items():
        b = b.config(k, str(v))
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
