"""Steps as real processes (the `userformer` executable), held at named pause points (jobs/core/hooks.py).

A crash test SIGKILLs a step held at a point; a concurrency test holds several steps at one point until all are
there, then releases them together. Output goes to files (a full pipe would block a chatty Spark process).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from userformer.jobs.core import hooks

EXE = str(Path(sys.executable).parent / "userformer")
# Each step process starts its own Spark: small, so that two of them and the test's own fit beside other work.
SMALL_SPARK = {"USERFORMER__SPARK__DRIVER_MEMORY": "1g", "USERFORMER__SPARK__SHUFFLE_PARTITIONS": "2"}


@dataclass
class Step:
    proc: subprocess.Popen
    out: Path
    err: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout=timeout)

    @property
    def stderr(self) -> str:
        return self.err.read_text()

    def kill(self) -> None:
        """SIGKILL the step and its Spark JVM (its own process group: started with start_new_session)."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)


def start(
    home: Path,
    logs: Path,
    *args: str,
    pause_at: str = "",
    pause_dir: Path | None = None,
    name: str = "",
    env: dict | None = None,
) -> Step:
    """`userformer ARGS` in `home` (`env`: more variables, e.g. settings as USERFORMER__SECTION__KEY)."""
    logs.mkdir(parents=True, exist_ok=True)
    name = name or "-".join(args).replace("/", "_")
    env = {**os.environ, "USERFORMER_HOME": str(home), **SMALL_SPARK, **(env or {})}
    if pause_at:
        env[hooks.ENV_POINTS] = pause_at
        env[hooks.ENV_DIR] = str(pause_dir)
    out, err = logs / f"{name}.out", logs / f"{name}.err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen([EXE, *args], env=env, stdout=o, stderr=e, start_new_session=True)
    return Step(proc, out, err)


def wait_paused(pause_dir: Path, point: str, steps: list[Step], timeout: float = 300) -> None:
    """Until every step waits at `point`; a step that exits first fails the test with its stderr."""
    deadline = time.monotonic() + timeout
    while True:
        if all((pause_dir / f"{point}.{s.pid}").exists() for s in steps):
            return
        for s in steps:
            if s.proc.poll() is not None:
                raise AssertionError(f"pid {s.pid} exited ({s.proc.returncode}) before {point}:\n{s.stderr[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not every step reached {point} within {timeout} s")
        time.sleep(0.1)


def wait_said(step: Step, text: str, timeout: float = 120) -> None:
    """Until `text` is in the step's stderr (e.g. "waiting up to": it waits for the lease); the step exiting first
    fails the test with its stderr."""
    deadline = time.monotonic() + timeout
    while text not in step.stderr:
        assert step.proc.poll() is None, step.stderr[-4000:]
        assert time.monotonic() < deadline, f"pid {step.pid} never said {text!r} within {timeout} s"
        time.sleep(0.2)


def release(pause_dir: Path, point: str) -> None:
    (pause_dir / f"{point}.go").touch()


def stop_all(steps: list[Step]) -> None:
    """Cleanup after a failed test: no step outlives it."""
    for s in steps:
        if s.proc.poll() is None:
            s.kill()
