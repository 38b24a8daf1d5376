"""One way to start Spark: the session every Spark job uses."""

from __future__ import annotations

import os
import sys

from userformer.jobs.config import Config

_SESSION = None


def spark_session(cfg: Config):
    """A SparkSession for cfg.spark.master (local[N] or spark://...), set up for Delta-by-delta-rs.

    Why the settings: Parquet timestamps as INT64 micros (Spark's INT96 default
    reads back as nanoseconds, which delta-rs rejects); no _SUCCESS/.crc side
    files in table folders; UTC everywhere so dates do not shift with the host.
    """
    global _SESSION
    if _SESSION is not None and _SESSION._jsc is not None and _SESSION.conf.get("spark.master") == cfg.spark.master:
        return _SESSION
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    b = (
        SparkSession.builder.master(cfg.spark.master)
        .appName(cfg.spark.app_name)
        .config("spark.driver.memory", cfg.spark.driver_memory)
        .config("spark.executor.memory", cfg.spark.executor_memory)
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", str(cfg.spark.shuffle_partitions))
        .config("spark.sql.adaptive.enabled", "true")
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
        .config("spark.sql.parquet.compression.codec", "snappy")
        # Raw files written by pandas/pyarrow often carry nanosecond timestamps,
        # which Spark refuses; read them as longs and convert in ingest.
        .config("spark.sql.legacy.parquet.nanosAsLong", "true")
        .config("spark.sql.sources.partitionOverwriteMode", "static")
        .config("spark.hadoop.fs.file.impl", "org.apache.hadoop.fs.RawLocalFileSystem")
        .config("spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs", "false")
        .config("spark.hadoop.parquet.summary.metadata.level", "NONE")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.executorEnv.PYSPARK_PYTHON", sys.executable)
    )
    for k, v in cfg.spark.extra.items():
        b = b.config(k, str(v))
    _SESSION = b.getOrCreate()
    _SESSION.sparkContext.setLogLevel("WARN")
    return _SESSION


def stop_spark() -> None:
    global _SESSION
    if _SESSION is not None:
        _SESSION.stop()
        _SESSION = None
