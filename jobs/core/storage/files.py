"""Files a reader must never see half-written: JSON pointers and manifests, checkpoints; and the folders the
pipeline keeps beside its tables, on local disk or in a bucket.

Both registries (jobs/core/registry.py: PUBLISHED; jobs/steps/index.py: CURRENT) swap a
small JSON pointer to make a version current, and write manifests and weights
next to it; they share these helpers.

Locations: a local folder is a `pathlib.Path`; an object-store URI (s3://,
gs://, abfss://) is a `upath.UPath`, which has the same API over fsspec. What
a local rename gives (a file or folder appears whole or not at all), an object
store gives per object: one PUT is atomic. So whatever must appear whole is
written as its data objects first and one small object last that names them
(a manifest, a pointer), and readers trust only what the last object names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import re
import shutil
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path

from upath import UPath

from userformer.jobs.core.errors import UserError

# A folder or file the pipeline reads and writes: local, or in an object store.
Location = Path | UPath


def location(value: str | Path) -> Location:
    """`value` as a Location: object-store URIs (s3a:// is Spark's name for s3://) as UPath, local paths
    (file:// URIs included) as absolute Paths."""
    if isinstance(value, UPath) and is_remote(value):
        return value
    s = str(value)
    if s.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(s).path))
    if "://" in s:
        return UPath("s3://" + s[len("s3a://") :] if s.startswith("s3a://") else s)
    return Path(s).expanduser().resolve()


def is_remote(p) -> bool:
    """True for a location in an object store (no rename, no append, no directory of its own)."""
    return isinstance(p, UPath) and getattr(p, "protocol", "") not in ("", "file", "local")


def arrow(p: Location):
    """(filesystem, path) for pyarrow's readers and writers: (None, the path) locally; the location's own
    fsspec filesystem (same credentials and endpoint) wrapped for pyarrow in a bucket."""
    if not is_remote(p):
        return None, str(p)
    import pyarrow.fs as pafs

    return pafs.PyFileSystem(pafs.FSSpecHandler(p.fs)), p.path


def parquet_dataset(paths: list, **kwargs):
    """A pyarrow dataset over Parquet files of one filesystem, given as local paths or URIs."""
    import pyarrow.dataset as pds

    locs = [location(p) for p in paths]
    fs = arrow(locs[0])[0] if locs else None
    return pds.dataset([arrow(p)[1] for p in locs], filesystem=fs, format="parquet", **kwargs)


def remove_tree(p: Location) -> None:
    """Delete a folder and everything under it; nothing when it does not exist."""
    if is_remote(p):
        if p.exists():
            p.fs.rm(p.path, recursive=True)
        return
    shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def scratch(parent: Location):
    """A fresh folder under `parent` (warehouse/_staging/<step>/) for one run's intermediate files, deleted on
    exit; `maintain` clears the folders of runs that died (a kill skips this cleanup)."""
    stamp = f"{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}"
    d = parent / stamp
    d.mkdir(parents=True, exist_ok=True)
    try:
        yield d
    finally:
        remove_tree(d)


def move(src: Location, dest: Location) -> None:
    """Move a file or folder. Locally one rename; in a bucket a copy then a delete (not atomic: callers
    record what they moved and can be rerun)."""
    if is_remote(src):
        fs = src.fs
        if src.is_file():
            fs.copy(src.path, dest.path)
        else:  # object by object: a folder's listing can name prefixes that are no objects to copy
            base = src.path.rstrip("/")
            objects = fs.find(base)
            if objects:
                fs.copy(objects, [dest.path.rstrip("/") + o[len(base) :] for o in objects])
        fs.rm(src.path, recursive=True)
        return
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    os.rename(src, dest)


def newest_mtime(p: Location) -> float | None:
    """The newest modification time (epoch seconds) of folder `p` or anything under it, None when there is none.
    Object stores keep no folder times: the age of staged work is the age of its newest file."""
    if is_remote(p):
        times = []
        for info in p.fs.find(p.path, detail=True).values():
            m = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
            if m is not None:
                times.append(m.timestamp() if hasattr(m, "timestamp") else float(m))
        return max(times) if times else None
    times = [os.stat(p).st_mtime] if os.path.isdir(p) else []  # local folders have times: an empty one counts
    times += [os.stat(os.path.join(root, n)).st_mtime for root, dirs, names in os.walk(p) for n in dirs + names]
    return max(times) if times else None


def append_line(path: Location, line: str) -> None:
    """Append one line to a log file. Object stores cannot append: there the object is rewritten (a log of one
    writer at a time, which the pipeline's writers are)."""
    line = line.rstrip("\n") + "\n"
    if is_remote(path):
        old = path.read_text() if path.exists() else ""
        path.write_text(old + line)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(line)


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


def replace_atomically(path: Location, write: Callable[[Location], None]) -> None:
    """`write(tmp)` into a temporary file beside `path`, fsync it, rename it over `path`: a reader (or a crash)
    sees the old file or the new one, never part of one. In a bucket, `write(path)`: one PUT is atomic."""
    if is_remote(path):
        write(path)
        return
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


def write_json(path: Location, obj) -> None:
    """`obj` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, default=jsonable) + "\n"
    replace_atomically(path, lambda tmp: tmp.write_text(text))


def read_pointer(path: Path, version: re.Pattern, what: str, fix: str) -> dict | None:
    """A JSON pointer {"version": ..., ...}, or None when there is none yet; a clear UserError naming the file
    and `fix` when it is unreadable or names no valid version."""
    path = location(path) if isinstance(path, str) else path
    if not path.exists():
        return None
    try:
        ptr = json.loads(path.read_text())
        if not isinstance(ptr, dict) or not version.match(str(ptr.get("version", ""))):
            raise ValueError("no valid 'version'")
    except ValueError as exc:
        raise UserError(f"{path}: corrupt {what} ({exc}); {fix}") from None
    return ptr
