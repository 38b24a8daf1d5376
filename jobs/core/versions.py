"""A version store: numbered, immutable versions in folders, and one atomic pointer to the version in use.

The model registry (jobs/core/registry.py: PUBLISHED) and the item index
(jobs/steps/index.py: CURRENT) are both one of these. Layout under ``root``::

    versions/<version>/          one version; complete once its manifest.json is there (written last)
    versions/INDEX.jsonl         every id ever allocated, one JSON line each: {"version", ..., "allocated_at"}
    <pointer_name>               {"version", ...}: the version in use; replaced atomically (temp file + os.replace)
    <log_name>                   every change of the pointer, in order, one JSON line each ("version": null when
                                 the pointer was removed)

Ids carry a number (the first group of ``id_pattern``): a new id's number is
one more than any allocated before (folder names and INDEX.jsonl), so a
deleted version's number is never handed out again. The allocation holds an
exclusive lock on INDEX.jsonl (two writers never share a number, even with
ids of different kinds or days) and takes the folder by an exclusive mkdir.

What the pointer and its log lines hold is the caller's (the registry and the
index write different keys); the store writes them as given, so the files
keep their format.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from userformer.jobs.core import hooks
from userformer.jobs.core.errors import UserError
from userformer.jobs.core.storage import files

MANIFEST = "manifest.json"
ALLOCATIONS = "INDEX.jsonl"


def now_iso() -> str:
    """The current UTC time as ISO text to the second (what pointers, logs and manifests record)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class VersionStore:
    """Versions under ``root/versions`` and the pointer ``root/<pointer_name>`` with its log (module doc)."""

    root: Path
    id_pattern: re.Pattern  # a full version id; group 1 is its number
    pointer_name: str  # e.g. PUBLISHED, CURRENT
    log_name: str  # e.g. publish_log.jsonl
    label: str  # what a version is called in messages, e.g. "model version"
    example: str  # a valid id, shown when one is not
    pointer_label: str  # what the pointer is called in messages, e.g. "published pointer"
    pointer_fix: str  # what to do when the pointer is corrupt
    time_key: str  # the key of a pointer entry that says when it was set, e.g. "published_at"
    unfinished: str = "it was not finished"  # why a version folder can lack its manifest

    # ------------------------------------------------------------- paths
    @property
    def versions_root(self) -> Path:
        return self.root / "versions"

    @property
    def pointer_path(self) -> Path:
        return self.root / self.pointer_name

    @property
    def log_path(self) -> Path:
        return self.root / self.log_name

    @property
    def allocations_path(self) -> Path:
        return self.versions_root / ALLOCATIONS

    def valid(self, version) -> bool:
        """Is `version` an id of this store?"""
        return isinstance(version, str) and self.id_pattern.match(version) is not None

    def number(self, version: str) -> int:
        """The number of a version id (its allocation order)."""
        self._check_id(version)
        return int(self.id_pattern.match(version).group(1))

    def path(self, version: str) -> Path:
        """The folder of `version` (whether or not it exists); a UserError when the id is not one of this store."""
        self._check_id(version)
        return self.versions_root / version

    def _check_id(self, version) -> None:
        if not self.valid(version):
            article = "an" if self.label[:1] in "aeiou" else "a"
            raise UserError(f"not {article} {self.label} id: {version!r} (expected e.g. {self.example})")

    def _sorted(self, ids) -> list[str]:
        return sorted(ids, key=lambda v: (self.number(v), v))

    # -------------------------------------------------------- allocation
    def allocated(self) -> list[str]:
        """Every id ever allocated, oldest first: the version folders (also one a crash kept out of the log) and
        the lines of INDEX.jsonl (also of versions whose folder was deleted)."""
        root = self.versions_root
        ids = {p.name for p in root.iterdir() if self.valid(p.name)} if root.is_dir() else set()
        if self.allocations_path.is_file():
            for line in self.allocations_path.read_text().splitlines():
                try:
                    v = json.loads(line).get("version")
                except (ValueError, AttributeError):
                    continue  # a torn or foreign line: the folders still count
                if self.valid(v):
                    ids.add(v)
        return self._sorted(ids)

    def allocate(self, make_id: Callable[[int], str], **fields) -> tuple[str, Path]:
        """A new id, ``make_id(n)`` with n one more than any number allocated before, and its (empty) folder.

        The id is logged to INDEX.jsonl as ``{"version", **fields, "allocated_at"}``."""
        root = self.versions_root
        root.mkdir(parents=True, exist_ok=True)
        with open(self.allocations_path, "a") as log:
            # Held until the line is written: a second writer reads the numbers only after this one's is taken.
            fcntl.flock(log, fcntl.LOCK_EX)
            n = max((self.number(v) for v in self.allocated()), default=0) + 1
            while True:
                version = make_id(n)
                self._check_id(version)
                if self.number(version) != n:
                    raise ValueError(f"make_id({n}) gave {version!r}, which is not number {n}")
                folder = root / version
                try:
                    folder.mkdir()  # exclusive: a writer that does not lock still never gets the same folder
                    break
                except FileExistsError:
                    n += 1
            log.write(json.dumps({"version": version, **fields, "allocated_at": now_iso()}) + "\n")
            log.flush()
        return version, folder

    # ------------------------------------------------------------ reading
    def folders(self) -> list[str]:
        """Every version folder, complete or not (a build or registration may be running), oldest first."""
        root = self.versions_root
        if not root.is_dir():
            return []
        return self._sorted(p.name for p in root.iterdir() if p.is_dir() and self.valid(p.name))

    def is_complete(self, version: str) -> bool:
        return (self.path(version) / MANIFEST).is_file()

    def versions(self) -> list[str]:
        """The complete versions (with a manifest), oldest first."""
        return [v for v in self.folders() if self.is_complete(v)]

    def read_manifest(self, version: str) -> dict:
        """The manifest of a complete version; a UserError saying whether the version is missing, incomplete or
        its manifest unreadable."""
        p = self.path(version) / MANIFEST
        try:
            return json.loads(p.read_text())
        except FileNotFoundError:
            if p.parent.is_dir():
                raise UserError(f"{self.label} {version} is incomplete (no {p}): {self.unfinished}") from None
            raise UserError(f"no {self.label} {version} under {self.versions_root}") from None
        except ValueError as exc:
            raise UserError(f"{p}: not valid JSON ({exc})") from None

    def write_manifest(self, version: str, manifest: dict) -> None:
        """Replace the manifest of `version` atomically."""
        files.write_json(self.path(version) / MANIFEST, manifest)

    def manifests(self) -> list[dict]:
        """The manifests of every complete version, oldest first."""
        return [self.read_manifest(v) for v in self.versions()]

    # ------------------------------------------------------------ pointer
    def pointer(self) -> dict | None:
        """The pointer ({"version", ...}), or None when none is set; a UserError when it is corrupt."""
        return files.read_pointer(self.pointer_path, self.id_pattern, self.pointer_label, self.pointer_fix)

    def set_pointer(self, version: str, fields: dict) -> dict:
        """Point at `version` and append the change to the log. The entry (the whole pointer file, written
        atomically) is ``{"version", **fields, <time_key>: now, "previous": the version pointed at before}``.
        Returns the entry."""
        self._check_id(version)
        prev = self.pointer()
        entry = {"version": version, **fields, self.time_key: now_iso(), "previous": prev["version"] if prev else None}
        # The log first: a crash between the two leaves a logged switch that did not happen, which the step's
        # rerun makes again (logged again); the other order would lose the entry of a switch that happened.
        self._append(entry)
        hooks.pause("versions.between_log_and_pointer")
        files.write_json(self.pointer_path, entry)
        return entry

    def clear_pointer(self, fields: dict) -> dict | None:
        """Remove the pointer (no version in use) and log ``{"version": None, **fields, <time_key>, "previous"}``.
        Returns the log entry, None when there was no pointer (nothing changes then)."""
        prev = self.pointer()
        if prev is None:
            return None
        entry = {"version": None, **fields, self.time_key: now_iso(), "previous": prev["version"]}
        self.pointer_path.unlink()
        files.fsync_dir(self.pointer_path.parent)
        self._append(entry)
        return entry

    def _append(self, entry: dict) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def log(self) -> list[dict]:
        """Every entry of the pointer's log, oldest first (a removal has version None)."""
        if not self.log_path.is_file():
            return []
        out = []
        for i, line in enumerate(self.log_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError as exc:
                raise UserError(f"{self.log_path}, line {i}: not valid JSON ({exc})") from None
        return out

    def pointer_at(self, when: dt.datetime) -> dict | None:
        """The pointer entry in effect at `when` (naive: UTC), replayed from the log: the last entry set at or
        before it, in log order; None when there was none yet or the pointer was removed then. Times are
        recorded to the second: of several changes within one second, the last is in effect."""
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        state = None
        for e in self.log():
            try:
                at = dt.datetime.fromisoformat(e[self.time_key])
            except (KeyError, TypeError, ValueError):
                continue  # a line without a time cannot be placed
            if at.tzinfo is None:
                at = at.replace(tzinfo=dt.UTC)
            if at <= when:
                state = e if e.get("version") is not None else None
        return state
