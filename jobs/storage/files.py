"""Files a reader must never see half-written: JSON pointers and manifests, checkpoints.

Both registries (models/registry.py: PUBLISHED; jobs/index.py: CURRENT) swap a
small JSON pointer to make a version current, and write manifests and weights
next to it; they share these helpers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path

from userformer.jobs.common import UserError


def fsync_dir(d: Path) -> None:
    """Make a rename inside `d` durable (best effort: some filesystems refuse directory fsync)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` into a temporary file beside `path`, fsync it, rename it over `path`: a reader (or a crash)
    sees the old file or the new one, never part of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def jsonable(o):
    """json.dumps default: numpy scalars and arrays, dataclasses; anything else (dates, paths) as text."""
    if hasattr(o, "item") and callable(o.item) and getattr(o, "ndim", 0) == 0:
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    return str(o)


def write_json(path: Path, obj) -> None:
    """`obj` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, default=jsonable) + "\n"
    replace_atomically(path, lambda tmp: tmp.write_text(text))


def read_pointer(path: Path, version: re.Pattern, what: str, fix: str) -> dict | None:
    """A JSON pointer {"version": ..., ...}, or None when there is none yet; a clear UserError naming the file
    and `fix` when it is unreadable or names no valid version."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        ptr = json.loads(path.read_text())
        if not isinstance(ptr, dict) or not version.match(str(ptr.get("version", ""))):
            raise ValueError("no valid 'version'")
    except ValueError as exc:
        raise UserError(f"{path}: corrupt {what} ({exc}); {fix}") from None
    return ptr
