"""Named pause points, so that tests can crash or race real processes at a known place.

A test sets ``USERFORMER_PAUSE_AT=name[,name...]`` and ``USERFORMER_PAUSE_DIR=<dir>`` in a step's environment.
A process reaching a listed point writes ``<dir>/<name>.<pid>`` and waits until ``<dir>/<name>.go`` exists.
Meanwhile the test can SIGKILL it there (a crash at a named point, not an exception), or wait until several
processes are all there and release them together (an overlap that does not depend on timing luck).
Without the variables (always, outside tests) `pause` does nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV_POINTS = "USERFORMER_PAUSE_AT"
ENV_DIR = "USERFORMER_PAUSE_DIR"
# A test that never releases its processes must not hang the run forever.
MAX_WAIT_S = 600.0


def forwarded() -> dict:
    """This process's pause settings, for work it hands to processes that do not inherit its environment (Spark
    executors, started by the cluster's workers): they pass it to `pause` as `env`."""
    return {k: os.environ[k] for k in (ENV_POINTS, ENV_DIR) if k in os.environ}


def pause(name: str, env: dict | None = None) -> None:
    env = os.environ if env is None else env
    points = env.get(ENV_POINTS)
    if not points or name not in {p.strip() for p in points.split(",")}:
        return
    d = Path(env.get(ENV_DIR) or ".")
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.{os.getpid()}").write_text(str(time.time()))
    go = d / f"{name}.go"
    deadline = time.monotonic() + MAX_WAIT_S
    while not go.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"pause point {name}: not released within {MAX_WAIT_S:.0f} s ({go} never appeared)")
        time.sleep(0.05)
