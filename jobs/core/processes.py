"""Processes started in a group of their own (Airflow standalone, the Spark Connect server): alive, and ended."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (exited, not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def group_alive(pgid: int) -> bool:
    """True while any process of group `pgid` exists, a zombie included."""
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def end_group(pgid: int, term_s: float, kill_s: float = 10.0) -> None:
    """SIGTERM the group, SIGKILL it after `term_s`; return once no process of it is left (or `kill_s` after the
    SIGKILL). Its leader is reaped when it is this process's child: a zombie leader keeps the group."""
    for sig, wait in ((signal.SIGTERM, term_s), (signal.SIGKILL, kill_s)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pgid, os.WNOHANG)
            if not group_alive(pgid):
                return
            time.sleep(0.1)
