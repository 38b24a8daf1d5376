"""A real Spark standalone cluster on 127.0.0.1 for integration tests.

    with SparkCluster(tmp_path / "spark", workers=2, cores=1, memory="1g") as c:
        env = c.driver_env(home=tmp_path / "home")      # USERFORMER__SPARK__MASTER=c.master_url, ...
        subprocess.run([c.bin("userformer"), "ingest", ...], env=env, check=True)

The cluster is started by infra/spark/start-cluster.sh (free ports picked
here, all state under `workdir`) and stopped on exit by stop-cluster.sh; the
PIDs read from its PID files are then checked gone (and SIGKILLed if not).

Drivers must run in a *subprocess*: a process holds one SparkContext, and the
test process may already hold the local[2] session of tests/conftest.py.
Executors are 1 core each and get at most `memory` (the worker's memory): a
driver asking for more (the config default spark.executor_memory is 2g) would
wait forever for resources, so driver_env() sets spark.executor_memory.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from userformer.jobs.core.processes import pid_alive

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "infra" / "spark"
# Same interpreter for driver, executors and the tests: the one running pytest.
VENV = Path(sys.prefix) if sys.prefix != sys.base_prefix else REPO / ".venv"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SparkClusterError(RuntimeError):
    pass


class SparkCluster:
    """Master + `workers` workers (`cores` cores, `memory` each) on 127.0.0.1, state under `workdir`."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        workers: int = 2,
        cores: int = 1,
        memory: str = "1g",
        *,
        master_port: int | None = None,
        webui_port: int | None = None,
        start_timeout: float = 120,
        stop_timeout: float = 30,
    ):
        self.workdir = Path(workdir).resolve()
        self.workers, self.cores, self.memory = workers, cores, memory
        self.master_port = master_port or free_port()
        self.webui_port = webui_port or free_port()
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.master_url: str | None = None
        self.pids: dict[str, int] = {}  # PID file stem -> PID, as read after start
        self.start_seconds: float | None = None
        self.stop_seconds: float | None = None

    # ---- locations ---------------------------------------------------------
    @property
    def python(self) -> str:
        return str(VENV / "bin" / "python")

    def bin(self, name: str) -> str:
        """A console script of the venv, e.g. bin("userformer")."""
        return str(VENV / "bin" / name)

    @property
    def webui_url(self) -> str:
        return f"http://127.0.0.1:{self.webui_port}"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    def _script_env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SPARK_", "PYSPARK_"))}
        env.update(
            VENV=str(VENV),
            USERFORMER_SPARK_RUN_DIR=str(self.workdir),
            USERFORMER_SPARK_START_TIMEOUT=str(int(self.start_timeout)),
            USERFORMER_SPARK_STOP_TIMEOUT=str(int(self.stop_timeout)),
            SPARK_MASTER_PORT=str(self.master_port),
            SPARK_MASTER_WEBUI_PORT=str(self.webui_port),
            SPARK_WORKER_PORT="0",
            SPARK_WORKER_WEBUI_PORT="0",
            SPARK_WORKER_INSTANCES=str(self.workers),
            SPARK_WORKER_CORES=str(self.cores),
            SPARK_WORKER_MEMORY=self.memory,
        )
        return env

    # ---- lifecycle ---------------------------------------------------------
    def start(self) -> "SparkCluster":
        self.workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        try:
            r = subprocess.run(
                ["bash", str(SCRIPTS / "start-cluster.sh")],
                env=self._script_env(),
                capture_output=True,
                text=True,
                timeout=self.start_timeout + 60,
            )
        except subprocess.TimeoutExpired as exc:
            self._read_pids()
            self.stop()
            raise SparkClusterError(f"start-cluster.sh hung:\n{exc.stderr}\n{self.log_tail()}") from exc
        self.start_seconds = time.monotonic() - t0
        self._read_pids()
        lines = r.stdout.strip().splitlines()
        if r.returncode != 0 or not lines or not lines[-1].startswith("spark://"):
            self.stop()
            raise SparkClusterError(f"start-cluster.sh failed (rc={r.returncode}):\n{r.stdout}\n{r.stderr}")
        self.master_url = lines[-1]
        return self

    def _read_pids(self) -> None:
        for f in sorted((self.workdir / "pids").glob("*.pid")):
            try:
                self.pids[f.stem] = int(f.read_text().strip())
            except ValueError:
                pass

    def alive_pids(self) -> list[int]:
        return [p for p in self.pids.values() if pid_alive(p)]

    def stop(self) -> None:
        """stop-cluster.sh, then make sure every PID seen at start is gone."""
        t0 = time.monotonic()
        try:
            subprocess.run(
                ["bash", str(SCRIPTS / "stop-cluster.sh")],
                env=self._script_env(),
                capture_output=True,
                text=True,
                timeout=self.stop_timeout + 30,
            )
        except subprocess.TimeoutExpired:
            pass
        for pid in self.alive_pids():  # belt and braces: by PID, never by name
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while self.alive_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.stop_seconds = time.monotonic() - t0

    def __enter__(self) -> "SparkCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- looking at it -----------------------------------------------------
    def state(self) -> dict:
        """The master's JSON (workers, activeapps, completedapps, ...)."""
        with urllib.request.urlopen(f"{self.webui_url}/json/", timeout=5) as r:
            return json.load(r)

    def app(self, app_id: str) -> dict | None:
        """The master's record of application `app_id` (active or completed), if any."""
        st = self.state()
        for a in st.get("activeapps", []) + st.get("completedapps", []):
            if a.get("id") == app_id:
                return a
        return None

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of every daemon log and executor stderr, for failure messages."""
        out = []
        files = sorted(self.log_dir.glob("*.out")) + sorted(self.workdir.glob("work/*/app-*/*/stderr"))
        for f in files:
            text = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"----- {f}\n" + "\n".join(text))
        return "\n".join(out)

    def driver_env(
        self,
        home: str | os.PathLike | None = None,
        *,
        driver_memory: str = "1g",
        executor_memory: str | None = None,
        base: dict | None = None,
        **extra: str,
    ) -> dict:
        """Environment for a driver subprocess (a script or the `userformer` CLI) on this cluster."""
        if self.master_url is None:
            raise SparkClusterError("cluster not started")
        env = dict(os.environ if base is None else base)
        env.pop("USERFORMER_CONFIG", None)
        for k in [k for k in env if k.startswith("USERFORMER__SPARK__")]:
            env.pop(k)
        spark_home = (
            VENV / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" / "pyspark"
        )
        env.update(
            USERFORMER__SPARK__MASTER=self.master_url,
            USERFORMER__SPARK__DRIVER_MEMORY=driver_memory,
            USERFORMER__SPARK__EXECUTOR_MEMORY=executor_memory or self.memory,
            SPARK_LOCAL_IP="127.0.0.1",
            SPARK_CONF_DIR=str(self.workdir / "conf"),  # the cluster's secret (spark.authenticate)
            PYSPARK_PYTHON=self.python,
            PYSPARK_DRIVER_PYTHON=self.python,
        )
        if spark_home.is_dir():
            env["SPARK_HOME"] = str(spark_home)  # the same Spark as the cluster's
        if home is not None:
            env["USERFORMER_HOME"] = str(home)
        env.update(extra)
        return env

    def run_python(
        self, code: str, env: dict, args=(), *, timeout: float = 600, cwd=None
    ) -> subprocess.CompletedProcess:
        """Run `code` (sys.argv[1:] = args) with the venv's Python in a subprocess;
        on failure raise with its output and the cluster's logs."""
        r = subprocess.run(
            [self.python, "-c", code, *map(str, args)],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if r.returncode != 0:
            raise SparkClusterError(
                f"driver failed (rc={r.returncode}):\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr[-8000:]}\n"
                f"--- cluster logs\n{self.log_tail()}"
            )
        return r


@pytest.fixture(scope="module")
def spark_cluster(tmp_path_factory):
    """A started 2-worker cluster shared by the tests of one module; stopped after them."""
    with SparkCluster(tmp_path_factory.mktemp("spark-cluster")) as c:
        yield c
