"""The warehouse lease: one writer at a time.

Every step that changes what readers see (a Delta table, the model registry, the item index, the publish marker)
runs inside ``lease.hold(cfg, step)`` (or is decorated ``@lease.writer("step")``). The lease is an exclusive
`filelock` on ``<lease folder>/lease.lock`` plus a record of its holder beside it, ``holder.json``: who (a random
id, pid, host), what (step, Airflow DAG / run / task when run by Airflow), since when, and a heartbeat the holder
refreshes every ``storage.lease_heartbeat_s``.

- **A second writer waits** up to ``storage.lease_wait_s``, saying once on stderr whom it waits for, then fails
  with `LeaseBusy` (exit 75, "try again later") naming the holder. Airflow queues its writing tasks in one pool
  of one slot before they get here (``pipeline.writers_pool``); the lease is what also covers the CLI, a repair
  by hand and a second Airflow.
- **A dead holder's lease is free at once**: the kernel drops a process's file locks when it dies, SIGKILL
  included, so no lease outlives its process and none has to be broken by hand. The next writer finds the dead
  holder's record (it never got to remove it), says it took the lease over, and goes on: each step is itself
  safe to rerun after a crash (its commits are atomic; staged files are cleaned by the rerun or `maintain`).
- **Re-entrant in a process**: `run-day`, `retrain` and `repair` hold the lease for the whole flow; the steps
  they call take it again without waiting.

Where the lock lives: ``<warehouse>/_lease`` for a local warehouse. A warehouse in a bucket has no file lock: its
lease folder is local (``storage.lease_dir``, default ``<home>/lease``), which is exclusive for the writers of
one host only. Several hosts writing one bucket must share one lock: point ``storage.lease_dir`` at a shared
POSIX file system with working ``flock`` (NFSv4, EFS), or let one Airflow with its one-slot writers pool be the
only writer. Delta's optimistic commits still refuse a commit made on a moved table (exit 75) either way.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import filelock

from userformer.jobs.core import hooks
from userformer.jobs.core.errors import TryAgain
from userformer.jobs.core.storage import files

LOCK_FILE = "lease.lock"
HOLDER_FILE = "holder.json"
# Context Airflow puts in a task's environment: recorded so that a waiting writer can name the run it waits for.
AIRFLOW_KEYS = {"dag_id": "AIRFLOW_CTX_DAG_ID", "run_id": "AIRFLOW_CTX_DAG_RUN_ID", "task_id": "AIRFLOW_CTX_TASK_ID"}


class LeaseBusy(TryAgain):
    """Another writer held the warehouse for longer than this one may wait (exit 75: try again later)."""


def lease_dir(cfg) -> Path:
    """The folder of the lock and its holder record (module doc)."""
    if cfg.storage.lease_dir:
        return Path(cfg.storage.lease_dir).expanduser().resolve()
    root = cfg.warehouse_root
    return cfg.home / "lease" if files.is_remote(root) else root / "_lease"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def describe(holder: dict | None) -> str:
    """A holder record in one line, for messages."""
    if not holder:
        return "an unknown writer (no holder record)"
    airflow = ", ".join(f"{k} {holder[k]}" for k in AIRFLOW_KEYS if holder.get(k))
    return (
        f"step {holder.get('step')} (pid {holder.get('pid')} on {holder.get('host')}"
        + (f"; Airflow {airflow}" if airflow else "")
        + f"; since {holder.get('started_at')}, heartbeat {holder.get('heartbeat_at')})"
    )


def read_holder(cfg) -> dict | None:
    """The current holder's record; None when the lease is free (or its record is unreadable)."""
    try:
        return json.loads((lease_dir(cfg) / HOLDER_FILE).read_text())
    except (OSError, ValueError):
        return None


class _Held:
    """This process's lease on one folder: the lock, its record, the heartbeat thread, the nesting depth."""

    def __init__(self, folder: Path, lock: filelock.BaseFileLock, record: dict, heartbeat_s: float):
        self.folder, self.lock, self.record, self.depth = folder, lock, record, 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            self.record["heartbeat_at"] = _now()
            with contextlib.suppress(OSError):
                files.write_json(self.folder / HOLDER_FILE, self.record)

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        # The record goes before the lock: a record without a lock is a crash, which the next holder reports.
        with contextlib.suppress(FileNotFoundError):
            (self.folder / HOLDER_FILE).unlink()
        self.lock.release()


_HELD: dict[Path, _Held] = {}
_HELD_LOCK = threading.Lock()


def _acquire(cfg, step: str, log) -> _Held:
    folder = lease_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(folder / LOCK_FILE, thread_local=False)
    wait_s, said = cfg.storage.lease_wait_s, False
    deadline = time.monotonic() + wait_s
    while True:
        try:
            lock.acquire(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            break
        except filelock.Timeout:
            holder = read_holder(cfg)
            if time.monotonic() >= deadline:
                raise LeaseBusy(
                    f"the warehouse is being written by {describe(holder)}; waited {wait_s:g} s "
                    f"(storage.lease_wait_s) for its lease at {folder}. Run this step again when it has finished"
                ) from None
            if not said:
                log(f"{step}: waiting up to {wait_s:g} s for the warehouse lease held by {describe(holder)}")
                said = True
    try:
        return _take(cfg, folder, lock, step, log)
    except BaseException:
        lock.release()  # the record could not be written: do not keep a lock nobody is recorded for
        raise


def _take(cfg, folder: Path, lock: filelock.BaseFileLock, step: str, log) -> _Held:
    """The lock is ours: write the holder record (reporting a dead holder's leftover one) and start the heartbeat."""
    previous = read_holder(cfg)  # a record under a free lock: its holder died holding it
    record = {
        "holder": uuid.uuid4().hex[:12],
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "step": step,
        **{k: os.environ[v] for k, v in AIRFLOW_KEYS.items() if os.environ.get(v)},
        "started_at": _now(),
        "heartbeat_at": _now(),
    }
    if previous:
        record["took_over_from"] = {k: previous.get(k) for k in ("holder", "pid", "host", "step", "heartbeat_at")}
        log(f"{step}: took over the warehouse lease of {describe(previous)}, which ended without releasing it")
    files.write_json(folder / HOLDER_FILE, record)
    hooks.pause("lease.acquired")
    return _Held(folder, lock, record, cfg.storage.lease_heartbeat_s)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def hold(cfg, step: str, log=_stderr):
    """Hold the warehouse lease for `step` while the block runs (module doc). Yields the holder record."""
    folder = lease_dir(cfg)
    with _HELD_LOCK:
        held = _HELD.get(folder)
        if held is not None:
            held.depth += 1
    if held is None:
        held = _acquire(cfg, step, log)
        with _HELD_LOCK:
            _HELD[folder] = held
    try:
        yield held.record
    finally:
        with _HELD_LOCK:
            held.depth -= 1
            last = held.depth == 0
            if last:
                del _HELD[folder]
        if last:
            held.release()


def writer(step: str):
    """Decorate a function whose first argument is the Config: it runs holding the warehouse lease for `step`."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(cfg, *args, **kwargs):
            with hold(cfg, step):
                return fn(cfg, *args, **kwargs)

        return run

    return wrap
