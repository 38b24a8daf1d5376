"""`userformer airflow`: the project's Airflow 3 (standalone) on this machine, and a small client for it.

`start(cfg, port=...)` runs ``airflow standalone`` in the background (its own session, so a Ctrl-C of the caller
does not reach it) and returns an `Airflow` handle once the API answers, the scheduler and DAG processor are
healthy and the project's DAGs are parsed:

- ``AIRFLOW_HOME = $USERFORMER_HOME/airflow`` (SQLite, logs, the admin password: generated here into
  ``simple_auth_manager_passwords.json.generated``, mode 0600, so that Airflow does not print it to its log),
- the DAGs folder = this repository's ``dags/`` (or ``$USERFORMER_DAGS_FOLDER``),
- the API/UI on ``127.0.0.1`` only, on `port` (default: 8080 when free, else a free port),
- LocalExecutor with a small parallelism, no example DAGs, one API worker,
- the venv's ``bin`` first on PATH (standalone starts its parts as ``airflow ...``), and of this process's
  environment only what the tasks need (`task_environment`: ``USERFORMER*``, Python, Java, Spark,
  torch==2.13.0, object storage, locale, and the names in ``pipeline.task_env``) passed through to every task,
- the inference pool ``pipeline.gpu_pool`` created with ``pipeline.gpu_pool_slots`` slots (if missing), and the
  writers' pool ``pipeline.writers_pool`` with exactly one slot.

The handle has ``.url``, ``.username``, ``.password``, ``.pid``, ``.log_path`` and REST helpers (token from
``POST /auth/token``): `unpause`, `backfill` (``POST /api/v2/backfills``), `dag_runs`, `task_instances`,
`wait_runs`; `stop()` sends SIGINT to the standalone parent (it stops its parts and waits for them; SIGTERM would
orphan them), waits, and only then ends what is left of its own process group. Usable as a context manager.

``userformer airflow start`` (``make airflow``) runs it in the foreground, prints the URL and the login, and stops
it cleanly on Ctrl-C. ``userformer airflow backfill --from D1 --to D2`` starts one, backfills daily_refresh over
the dates, waits, reports every run's state and stops it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from userformer.jobs.core import processes
from userformer.jobs.core.config import Config
from userformer.jobs.core.dates import date_arg
from userformer.jobs.core.errors import UserError

DEFAULT_PORT = 8080
HOST = "127.0.0.1"
FINISHED = {"success", "failed"}
# How long a backfill request waits out a metadata database locked by the scheduler (SQLite).
BUSY_DB_WAIT_S = 120.0
PASSWORDS_FILE = "simple_auth_manager_passwords.json.generated"


class AirflowError(UserError):
    """Airflow did not start, refused a request, or a run did not finish as asked."""


def dags_folder() -> Path:
    """The project's DAGs: $USERFORMER_DAGS_FOLDER, else dags/ beside jobs/ in this checkout."""
    env = os.environ.get("USERFORMER_DAGS_FOLDER")
    d = Path(env) if env else Path(__file__).resolve().parents[2] / "dags"
    if not (d / "daily_refresh.py").is_file():
        raise AirflowError(f"no DAGs folder with daily_refresh.py at {d} (set USERFORMER_DAGS_FOLDER)")
    return d


def airflow_home(cfg: Config) -> Path:
    return cfg.home / "airflow"


def free_port(preferred: int | None = None) -> int:
    """`preferred` if nothing listens on it on 127.0.0.1, else a port the OS hands out."""
    if preferred:
        with socket.socket() as s:
            try:
                s.bind((HOST, preferred))
                return preferred
            except OSError:
                pass
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# What of the starting environment reaches Airflow and so every task: the pipeline's own settings, what Python,
# Java, Spark, torch==2.13.0 and object storage need, and the locale. Anything else (tokens, credentials of other
# systems) stays behind; a variable a task needs besides these is named in pipeline.task_env.
TASK_ENV = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "TZ", "TMPDIR", "VIRTUAL_ENV", "LD_LIBRARY_PATH")
TASK_ENV_PREFIXES = (
    "USERFORMER",
    "AIRFLOW__",
    "LC_",
    "PYTHON",
    "JAVA_",
    "SPARK_",
    "PYSPARK_",
    "HADOOP_",
    "AWS_",
    "CUDA_",
    "NVIDIA_",
    "OMP_",
    "MKL_",
    "TORCH",
    "SSL_CERT_",
)


def task_environment(cfg: Config, base: dict) -> dict:
    """The variables of `base` Airflow's tasks may see (TASK_ENV, TASK_ENV_PREFIXES, pipeline.task_env)."""
    extra = set(cfg.pipeline.task_env)
    return {k: v for k, v in base.items() if k in TASK_ENV or k in extra or k.startswith(TASK_ENV_PREFIXES)}


def environment(
    cfg: Config, port: int, *, parallelism: int = 2, scheduled_runs: bool = True, base: dict | None = None
) -> dict:
    """The environment standalone (and so every task) runs with: `task_environment` of this process's, plus
    Airflow's settings."""
    env = task_environment(cfg, dict(os.environ if base is None else base))
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    env["USERFORMER_HOME"] = str(cfg.home)
    url = f"http://{HOST}:{port}"
    env.update(
        {
            "AIRFLOW_HOME": str(airflow_home(cfg)),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder()),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(parallelism),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__API__HOST": HOST,
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__BASE_URL": url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "60",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
            # The demo and tests create their runs explicitly (backfills); `make airflow` schedules as usual.
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": str(bool(scheduled_runs)),
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": env.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO"),
            "SPARK_LOCAL_IP": env.get("SPARK_LOCAL_IP", HOST),
            "PYSPARK_PYTHON": env.get("PYSPARK_PYTHON", sys.executable),
            "NO_COLOR": "1",
        }
    )
    return env


@dataclass
class Airflow:
    """A running standalone Airflow (see module doc)."""

    url: str
    home: Path
    proc: subprocess.Popen
    log_path: Path
    username: str = ""
    password: str = ""
    _token: str | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    # ------------------------------------------------------------ lifecycle
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 90.0) -> int | None:
        """SIGINT to the standalone parent, wait for it (it stops and joins its parts), then end leftovers of its
        process group (SIGTERM, then SIGKILL). Returns the parent's exit code."""
        if self.alive():
            try:
                os.kill(self.proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(15)
        self._end_group()
        return self.proc.returncode

    def _end_group(self) -> None:
        processes.end_group(self.proc.pid, 10.0, 5.0)  # start_new_session: the group id is the parent's pid

    def __enter__(self) -> Airflow:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------- REST
    def token(self, refresh: bool = False) -> str:
        if self._token is None or refresh:
            res = self._request(
                "POST", "/auth/token", {"username": self.username, "password": self.password}, auth=False
            )
            self._token = res["access_token"]
        return self._token

    def _request(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        *,
        auth: bool = True,
        query: dict | None = None,
        ok: tuple = (),
    ) -> dict:
        url = self.url + path + (("?" + urllib.parse.urlencode(query, doseq=True)) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token()}"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
                return json.loads(raw) if raw else {}
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            if exc.code in ok:
                return {"status": exc.code, "detail": text}
            if exc.code == 401 and auth:
                self._token = None
            raise AirflowError(f"Airflow {method} {path}: HTTP {exc.code}: {text[:2000]}") from None

    def api(self, method: str, path: str, body: dict | None = None, **kw) -> dict:
        """A call of the public REST API (``/api/v2`` + path)."""
        return self._request(method, "/api/v2" + path, body, **kw)

    def health(self) -> dict:
        return self._request("GET", "/api/v2/monitor/health", auth=False)

    def import_errors(self) -> list[dict]:
        return self.api("GET", "/importErrors").get("import_errors", [])

    def dag(self, dag_id: str) -> dict | None:
        res = self.api("GET", f"/dags/{dag_id}", ok=(404,))
        return None if res.get("status") == 404 else res

    def ensure_pool(self, name: str, slots: int, description: str = "", *, exact: bool = False) -> dict:
        """Create pool `name` with `slots` slots unless it exists; an existing pool keeps its size, unless `exact`
        (the writers' pool must have exactly one slot)."""
        res = self.api("POST", "/pools", {"name": name, "slots": slots, "description": description}, ok=(409,))
        if res.get("status") != 409:
            return res
        pool = self.api("GET", f"/pools/{name}")
        if exact and pool.get("slots") != slots:
            pool = self.api("PATCH", f"/pools/{name}?update_mask=slots", {"slots": slots})
        return pool

    def unpause(self, dag_id: str) -> dict:
        return self.api("PATCH", f"/dags/{dag_id}", {"is_paused": False})

    def backfill(
        self,
        dag_id: str,
        start: dt.date,
        end: dt.date,
        *,
        reprocess: str = "failed",
        conf: dict | None = None,
        max_active_runs: int = 1,
        wait_running_s: float = 0.0,
    ) -> dict:
        """``POST /api/v2/backfills``: one run per logical date start..end (inclusive), in date order.

        `reprocess`: what happens to dates that have a finished run: "failed" reruns failed ones, "completed"
        reruns every finished one, "none" leaves them (not allowed for DAGs with depends_on_past). Airflow runs
        one backfill per DAG at a time and marks a finished one complete a few seconds after its last run:
        `wait_running_s` retries that long while the previous backfill is still running (HTTP 409). A metadata
        database busy with the scheduler's writes (HTTP 503, SQLite) is retried for up to BUSY_DB_WAIT_S."""
        body = {
            "dag_id": dag_id,
            "from_date": _midnight(start),
            "to_date": _midnight(end),
            "reprocess_behavior": reprocess,
            "max_active_runs": max_active_runs,
            "run_backwards": False,
        }
        if conf is not None:
            body["dag_run_conf"] = conf
        start_t = time.monotonic()
        while True:
            res = self.api("POST", "/backfills", body, ok=(409, 503))
            status = res.get("status")
            if status not in (409, 503):
                return res
            # 503: on SQLite Airflow refuses to create a backfill while the scheduler writes ("Database is
            # locked"); it is free again within seconds.
            waited = time.monotonic() - start_t
            if waited > (wait_running_s if status == 409 else max(wait_running_s, BUSY_DB_WAIT_S)):
                raise AirflowError(f"Airflow POST /backfills: HTTP {status}: {res['detail'][:2000]}")
            time.sleep(2.0)

    def dag_runs(self, dag_id: str, **query) -> list[dict]:
        q = {"limit": 100, "order_by": "logical_date", **query}
        return self.api("GET", f"/dags/{dag_id}/dagRuns", query=q).get("dag_runs", [])

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        q = {"limit": 1000}
        path = f"/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances"
        return self.api("GET", path, query=q).get("task_instances", [])

    def wait_runs(
        self,
        dag_id: str,
        *,
        run_ids: list[str] | None = None,
        start: dt.date | None = None,
        end: dt.date | None = None,
        timeout: float = 1800.0,
        poll: float = 3.0,
        progress=None,
    ) -> list[dict]:
        """Wait until the runs (these run ids, or one per logical date start..end) have all finished.

        Returns them (dicts of the REST API: ``dag_run_id``, ``logical_date``, ``state``, ...), in date order.
        `progress(run)` is called whenever a run's state changes. Raises AirflowError on timeout or when Airflow
        stops."""
        if run_ids is None and (start is None or end is None):
            raise ValueError("wait_runs: pass run_ids, or start and end")
        want = len(run_ids) if run_ids is not None else (end - start).days + 1
        query = (
            {} if run_ids is not None else {"logical_date_gte": _midnight(start), "logical_date_lte": _midnight(end)}
        )
        deadline = time.monotonic() + timeout
        seen: dict[str, str] = {}
        while True:
            if not self.alive():
                raise AirflowError(f"Airflow stopped (exit {self.proc.returncode}); see {self.log_path}")
            runs = self.dag_runs(dag_id, **query)
            if run_ids is not None:
                runs = [r for r in runs if r["dag_run_id"] in run_ids]
            for r in runs:
                if seen.get(r["dag_run_id"]) != r["state"]:
                    seen[r["dag_run_id"]] = r["state"]
                    if progress:
                        progress(r)
            if len(runs) >= want and all(r["state"] in FINISHED for r in runs):
                return runs
            if time.monotonic() > deadline:
                states = {r["dag_run_id"]: r["state"] for r in runs}
                raise AirflowError(f"runs of {dag_id} not finished after {timeout:.0f}s: {states}")
            time.sleep(poll)

    def failed_tasks(self, dag_id: str, run_id: str) -> list[dict]:
        return [t for t in self.task_instances(dag_id, run_id) if t["state"] not in ("success", "skipped")]

    def task_log_path(self, dag_id: str, run_id: str, task_id: str) -> list[Path]:
        root = self.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        return sorted(root.rglob("*.log")) if root.is_dir() else []


def _midnight(day: dt.date) -> str:
    return f"{day.isoformat()}T00:00:00Z"


def ensure_password(home: Path, user: str = "admin") -> Path:
    """The admin password, generated here into Airflow's password file (mode 0600) before Airflow starts: Airflow
    then finds it and does not print it to its log. Returns the file."""
    p = home / PASSWORDS_FILE
    if _read_password(home, user):
        return p
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({user: secrets.token_urlsafe(12)}) + "\n")
    return p


def _read_password(home: Path, user: str = "admin") -> str | None:
    p = home / PASSWORDS_FILE
    try:
        return json.loads(p.read_text()).get(user)
    except (OSError, ValueError):
        return None


def start(
    cfg: Config,
    port: int | None = None,
    *,
    parallelism: int = 2,
    scheduled_runs: bool = True,
    timeout: float = 240.0,
    dags: tuple[str, ...] = ("daily_refresh",),
    log=None,
    env: dict | None = None,
) -> Airflow:
    """Start standalone Airflow in the background and return once it is usable (module doc).

    `scheduled_runs=False` keeps the scheduler from creating runs on its own (``[scheduler] use_job_schedule``):
    backfills and triggered runs still run; what the demo and the tests use. `dags`: wait until these are parsed
    (an import error of the dags folder fails the start). `env`: variables every task gets besides (e.g.
    USERFORMER__SPARK__REMOTE)."""
    say = log or (lambda s: None)
    port = free_port(port or DEFAULT_PORT) if not port else port
    if port and free_port(port) != port:
        raise AirflowError(f"port {port} on {HOST} is in use")
    home = airflow_home(cfg)
    home.mkdir(parents=True, exist_ok=True)
    ensure_password(home)
    env = {**environment(cfg, port, parallelism=parallelism, scheduled_runs=scheduled_runs), **(env or {})}
    log_path = home / "standalone.log"
    out = open(log_path, "ab")
    out.write(f"\n---- userformer airflow start {dt.datetime.now(dt.UTC).isoformat()} port {port}\n".encode())
    out.flush()
    proc = subprocess.Popen(
        [sys.executable, "-m", "userformer.jobs.tools.orchestrator"],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        cwd=str(home),
    )
    out.close()
    af = Airflow(url=f"http://{HOST}:{port}", home=home, proc=proc, log_path=log_path, username="admin")
    say(f"airflow standalone pid {proc.pid} starting on {af.url} (log {log_path})")
    try:
        _wait_ready(af, cfg, timeout, dags, say)
    except BaseException:
        af.stop()
        raise
    return af


def _wait_ready(af: Airflow, cfg: Config, timeout: float, dags: tuple[str, ...], say) -> None:
    deadline = time.monotonic() + timeout

    def left() -> bool:
        if not af.alive():
            raise AirflowError(
                f"airflow standalone exited with {af.proc.returncode}; see {af.log_path}:\n" + _tail(af.log_path)
            )
        if time.monotonic() > deadline:
            raise AirflowError(f"Airflow not ready after {timeout:.0f}s; see {af.log_path}:\n" + _tail(af.log_path))
        return True

    while left():  # the API answers and the scheduler + DAG processor heartbeat
        try:
            h = af.health()
            if all((h.get(k) or {}).get("status") == "healthy" for k in ("metadatabase", "scheduler", "dag_processor")):
                break
        except (AirflowError, OSError, ValueError):
            pass
        time.sleep(1.0)
    while left():
        af.password = _read_password(af.home, af.username) or ""
        if af.password:
            break
        time.sleep(0.5)
    af.ensure_pool(
        cfg.pipeline.gpu_pool,
        cfg.pipeline.gpu_pool_slots,
        "inference shards of userformer (size it to the GPU workers)",
    )
    af.ensure_pool(
        cfg.pipeline.writers_pool,
        1,
        "userformer tasks that write the warehouse: one at a time, whatever DAG or run they belong to",
        exact=True,
    )
    folder = str(dags_folder())
    while left():
        errors = [
            e
            for e in af.import_errors()
            if folder in str(e.get("filename", "")) or not str(e.get("filename", "")).startswith("/")
        ]
        if errors:
            raise AirflowError(
                "the DAGs do not import:\n" + "\n".join(f"{e.get('filename')}: {e.get('stack_trace')}" for e in errors)
            )
        if all(af.dag(d) is not None for d in dags):
            break
        time.sleep(1.0)
    say(f"airflow ready at {af.url} (user {af.username})")


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run_backfill(
    af: Airflow,
    dag_id: str,
    start: dt.date,
    end: dt.date,
    *,
    reprocess: str = "failed",
    conf: dict | None = None,
    timeout: float = 3600.0,
    progress=None,
) -> dict[str, str]:
    """Unpause `dag_id`, backfill start..end, wait; returns {logical date: state} of its runs."""
    af.unpause(dag_id)
    af.backfill(dag_id, start, end, reprocess=reprocess, conf=conf)
    runs = af.wait_runs(dag_id, start=start, end=end, timeout=timeout, progress=progress)
    return {r["logical_date"][:10]: r["state"] for r in runs}


# -------------------------------------------------------------------- CLI
def register(sub) -> None:
    p = sub.add_parser(
        "airflow",
        help="the project's Airflow: start it (what `make airflow` runs), or backfill daily_refresh through it",
        description="Standalone Airflow 3 on 127.0.0.1 with the project's DAGs; AIRFLOW_HOME is "
        "$USERFORMER_HOME/airflow. See jobs/tools/orchestrator.py.",
    )
    s = p.add_subparsers(dest="airflow_command", metavar="SUBCOMMAND", required=True)
    a = s.add_parser("start", help="run Airflow in the foreground: prints the URL and the login; Ctrl-C stops it")
    a.add_argument("--port", type=int, help=f"API/UI port on {HOST} (default {DEFAULT_PORT}, or a free one)")
    a.add_argument("--parallelism", type=int, default=2, help="task slots (default 2)")
    a.add_argument(
        "--no-schedule", action="store_true", help="create no scheduled runs (backfills and triggered runs only)"
    )
    a.add_argument(
        "--own-spark",
        action="store_true",
        help="each Spark task starts its own driver (default: one Spark Connect server for every task, started "
        "and stopped with Airflow, unless spark.remote names one)",
    )
    a.set_defaults(func=run)
    b = s.add_parser("backfill", help="start Airflow, backfill daily_refresh over --from..--to, wait, stop")
    b.add_argument("--from", dest="start", type=date_arg, required=True, help="first drop date")
    b.add_argument("--to", dest="end", type=date_arg, required=True, help="last drop date")
    b.add_argument("--dag", default="daily_refresh", help="DAG id (default daily_refresh)")
    b.add_argument(
        "--reprocess",
        choices=["failed", "completed", "none"],
        default="failed",
        help="dates that already have a finished run: rerun failed ones (default) or all",
    )
    b.add_argument("--port", type=int, help="API port (default: a free one)")
    b.add_argument("--own-spark", action="store_true", help="each Spark task starts its own driver (see start)")
    b.set_defaults(func=run)


def _print(line: str) -> None:
    print(line, flush=True)


def run(args, cfg: Config) -> int:
    from userformer.jobs.tools import connect

    if args.airflow_command == "backfill" and args.end < args.start:
        raise UserError(f"--to {args.end} is before --from {args.start}")
    spark = contextlib.nullcontext({}) if args.own_spark else connect.serving(cfg, log=_print)
    with spark as task_env:
        return _run(args, cfg, task_env)


def _run(args, cfg: Config, task_env: dict) -> int:
    if args.airflow_command == "start":
        af = start(
            cfg, args.port, parallelism=args.parallelism, scheduled_runs=not args.no_schedule, log=_print, env=task_env
        )
        print(
            f"\nAirflow is up: {af.url}\n  login: {af.username}, password in {af.home / PASSWORDS_FILE}\n"
            f"  DAGs: {dags_folder()}\n  log: {af.log_path}\n"
            "Ctrl-C stops it.",
            flush=True,
        )
        try:
            while af.alive():
                time.sleep(1.0)
        except KeyboardInterrupt:
            print("\nstopping Airflow ...", flush=True)
        finally:
            code = af.stop()
        print(f"Airflow stopped (exit {code}).", flush=True)
        return 0
    af = start(cfg, args.port or free_port(), scheduled_runs=False, log=_print, dags=(args.dag,), env=task_env)
    try:
        states = run_backfill(
            af,
            args.dag,
            args.start,
            args.end,
            reprocess=args.reprocess,
            progress=lambda r: _print(f"{r['logical_date'][:10]} {r['dag_run_id']}: {r['state']}"),
        )
    finally:
        af.stop()
    print(json.dumps(states, indent=2))
    return 0 if all(s == "success" for s in states.values()) else 1


def standalone_main() -> None:
    """``airflow standalone`` with its scheduler and triggerer started with ``--skip-serve-logs``.

    Their log servers would listen on every interface (``[logging] worker_log_server_port``, host "" hard-coded);
    on one machine the API server reads the task logs from ``$AIRFLOW_HOME/logs`` directly, so they are not
    needed. Everything else is Airflow's own standalone: SIGINT stops its parts and waits for them."""
    # A parent started in the background by a non-interactive shell hands down SIGINT ignored; standalone stops
    # its parts on KeyboardInterrupt, so SIGINT must raise it here whatever the parent did.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from airflow.cli.commands import standalone_command
    from airflow.configuration import write_default_airflow_configuration_if_needed

    # As the `airflow` executable does first: airflow.cfg (with its generated JWT and API secrets) exists before
    # any part starts, so that they all sign and check tokens with the same key.
    write_default_airflow_configuration_if_needed()
    base_init = standalone_command.SubCommand.__init__

    def init(self, parent, name, command, env):
        if name in ("scheduler", "triggerer"):
            command = [*command, "--skip-serve-logs"]
        base_init(self, parent, name, command, env)

    standalone_command.SubCommand.__init__ = init
    standalone_command.StandaloneCommand().run()


if __name__ == "__main__":
    standalone_main()
