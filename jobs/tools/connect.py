"""`userformer spark-connect start|stop|status`: one long-lived Spark driver that every step talks to.

Without it, every Spark-using step (and so every Airflow task) starts a JVM
of its own: seconds of start-up and warm-up per task, most of a small day's
time. A Spark Connect server is that driver, started once. The steps become
thin clients over gRPC (``spark.remote``), with a session each (their
settings and temporary views stay their own) on the server's Spark:
``spark.master`` runs the jobs, local[N] or the standalone cluster.

What `start` does:

- Starts ``spark-submit --class org.apache.spark.sql.connect.service.SparkConnectServer`` from the venv's pyspark,
  with the driver settings every in-process driver uses (jobs/core/spark.py: `driver_conf`: Delta's JARs and SQL
  extension, memory, `spark.master`), bound to 127.0.0.1 only.
- Writes them to a properties file of mode 600, with a generated bearer token
  (``spark.connect.authenticate.token``), so the token never appears on a command line.
  A client must present the token: jobs/core/spark.py's `client_url` adds it for the steps of this home,
  read from the same folder.
- Puts the server in a process group of its own, and records its PID in ``<home>/run/connect/server.json``.
  `stop` ends it by that PID: SIGTERM to the group, then SIGKILL after a timeout.
- `start` while it runs is a no-op that prints the same URL.

The server's log is ``<home>/run/connect/server.log``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

from userformer.jobs.core import processes
from userformer.jobs.core.config import Config
from userformer.jobs.core.errors import UserError
from userformer.jobs.core.spark import CONNECT_TOKEN as TOKEN
from userformer.jobs.core.spark import connect_dir as run_dir
from userformer.jobs.core.spark import driver_conf

HOST = "127.0.0.1"
SERVER_CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"
STATE = "server.json"


def status(cfg: Config) -> dict | None:
    """The running server of this home ({"pid", "port", "url", "log", ...}), None when none runs."""
    try:
        st = json.loads((run_dir(cfg) / STATE).read_text())
    except (OSError, ValueError):
        return None
    return st if processes.pid_alive(int(st["pid"])) else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _started(log: Path, offset: int) -> bool:
    """The server wrote, since `offset` of its log, that it listens."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            return b"Spark Connect server started" in f.read()
    except OSError:
        return False


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def start(cfg: Config, port: int | None = None, timeout: float = 180.0) -> dict:
    """Start this home's server (or find it running) and return its state."""
    from filelock import FileLock

    d = run_dir(cfg)
    d.mkdir(parents=True, exist_ok=True)
    with FileLock(str(d / "start.lock")):  # two starts at once: the second finds the first's server
        running = status(cfg)
        return running if running is not None else _start(cfg, d, port, timeout)


def _start(cfg: Config, d: Path, port: int | None, timeout: float) -> dict:
    port = port or _free_port()
    if not _port_free(port):
        raise UserError(f"port {port} on {HOST} is in use: give the Spark Connect server another (--port)")
    token = secrets.token_hex(32)
    conf = {
        **driver_conf(cfg),
        "spark.connect.grpc.binding.address": HOST,
        "spark.connect.grpc.binding.port": str(port),
        "spark.connect.authenticate.token": token,
    }
    if cfg.spark.master.startswith("spark://"):  # the local cluster's shared secret (infra/spark/start-cluster.sh)
        cluster = Path(os.environ.get("USERFORMER_SPARK_RUN_DIR") or cfg.home / "run" / "spark") / "conf"
        for line in _read_lines(cluster / "spark-defaults.conf"):
            k, _, v = line.partition(" ")
            conf.setdefault(k, v.strip())
    props = d / "spark-connect.conf"
    old = os.umask(0o077)
    try:
        props.write_text("".join(f"{k} {v}\n" for k, v in conf.items()))
        (d / TOKEN).write_text(token + "\n")
    finally:
        os.umask(old)
    import pyspark

    spark_home = Path(pyspark.__file__).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPARK_CONNECT_", "PYSPARK_"))}
    env.update(
        SPARK_HOME=str(spark_home),
        SPARK_LOCAL_IP=HOST,
        PYSPARK_PYTHON=sys.executable,
        PYSPARK_DRIVER_PYTHON=sys.executable,
        SPARK_CONF_DIR=str(d),  # no stray spark-defaults.conf / spark-env.sh from elsewhere
    )
    log = d / "server.log"
    offset = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [
                str(spark_home / "bin" / "spark-submit"),
                "--properties-file",
                str(props),
                "--class",
                SERVER_CLASS,
                "spark-internal",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: stop() ends the JVM and its Python workers together
        )
    state = {
        "pid": proc.pid,
        "port": port,
        "url": f"sc://{HOST}:{port}",
        "master": cfg.spark.master,
        "log": str(log),
        "started_at": time.time(),
    }
    deadline = time.monotonic() + timeout
    while not _started(log, offset):
        if proc.poll() is not None or time.monotonic() > deadline:
            processes.end_group(proc.pid, 30.0)
            why = f"exited with {proc.returncode}" if proc.poll() is not None else f"not listening after {timeout:.0f}s"
            raise UserError(f"the Spark Connect server (pid {proc.pid}) {why}; last lines of {log}:\n{_tail(log)}")
        time.sleep(0.25)
    (d / STATE).write_text(json.dumps(state, indent=2))
    return state


def _read_lines(p: Path) -> list[str]:
    try:
        return [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    except OSError:
        return []


def stop(cfg: Config) -> dict | None:
    """Stop this home's server; the state it had, None when none ran."""
    st = status(cfg)
    if st is not None:
        processes.end_group(int(st["pid"]), 30.0)
    for name in (STATE, TOKEN):
        with contextlib.suppress(FileNotFoundError):
            (run_dir(cfg) / name).unlink()
    return st


@contextlib.contextmanager
def serving(cfg: Config, log=None):
    """A server for the block's Spark work, stopped after it: yields the environment a step needs to use it
    ({"USERFORMER__SPARK__REMOTE": url}). Nothing is started when spark.remote names a server already."""
    if cfg.spark.remote:
        yield {}
        return
    st = start(cfg)
    if log:
        log(f"Spark Connect server {st['url']} (pid {st['pid']}, master {st['master']}, log {st['log']})")
    try:
        yield {"USERFORMER__SPARK__REMOTE": st["url"]}
    finally:
        stop(cfg)


# -------------------------------------------------------------------- CLI
def register(sub) -> None:
    p = sub.add_parser(
        "spark-connect",
        help="start, stop or show the Spark Connect server the steps use when spark.remote is set",
        description="One long-lived Spark driver (a Spark Connect server on 127.0.0.1, token-authenticated) "
        "for every step: set spark.remote (USERFORMER__SPARK__REMOTE) to the URL `start` prints. "
        "See jobs/tools/connect.py.",
    )
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--port", type=int, help="gRPC port on 127.0.0.1 (default: a free one)")
    p.set_defaults(func=run)


def run(args, cfg: Config) -> int:
    if args.action == "start":
        st = start(cfg, args.port)
        print(f"Spark Connect server pid {st['pid']}, master {st['master']}, log {st['log']}", file=sys.stderr)
        print(st["url"])
        return 0
    if args.action == "stop":
        st = stop(cfg)
        print("stopped" if st else "not running", file=sys.stderr)
        return 0
    st = status(cfg)
    print(json.dumps(st, indent=2) if st else "not running")
    return 0 if st else 1
