"""Model registry: every trained model is a version; one of them is PUBLISHED.

Layout under ``cfg.models_root``::

    versions/<version>/model.pt        checkpoint: weights, model_config, train_config, vocab_sizes, the Delta
                                       versions of user_sequences / items / vocab it was trained on, metrics,
                                       parent version, dt (torch.save; loadable with weights_only=True)
    versions/<version>/manifest.json   the same minus the weights, readable by people and tools, plus the
                                       sha256 of model.pt; written last: a version without it is incomplete
    versions/INDEX.jsonl               append-only log of every version ever allocated (ids are never reused)
    PUBLISHED                          {"version", "published_at", "reason", "previous"}: the model the pipeline
                                       serves; replaced atomically (temp file + os.replace)
    publish_log.jsonl                  every publish, in order (who was published when and why)
    runs/<run_id>/                     training runs (jobs/steps/train.py): run.json, last.pt (resumable), best.pt

Version ids ``v<NNNN>-<YYYYMMDD>-<kind>`` (e.g. ``v0003-20261104-finetune``)
sort in creation order; NNNN is one more than any id allocated before, taken
by an exclusive mkdir, so two writers never share one and a deleted version's
number is not handed out again.

Re-embedding rule: user embeddings are only comparable with the item vectors
of the model that produced them. When the PUBLISHED version changes, every
user is re-embedded with the new model (inference compares the
published version with the one its embeddings were made with); stale
embeddings are never mixed with a new item space. `userformer finetune`
measures what skipping that would cost (manifest: ``stale_embeddings``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
import zipfile
from pathlib import Path

from userformer.jobs.core.errors import UserError
from userformer.jobs.core.storage import files
from userformer.jobs.core.storage.files import write_json  # noqa: F401  (callers use registry.write_json)

REEMBED_RULE = (
    "on promotion every user is re-embedded with the new model: user embeddings of an older "
    "version are not comparable with this version's item vectors (see stale_embeddings)"
)
REQUIRED_KEYS = ("state_dict", "model_config", "train_config", "vocab_sizes")
_VERSION = re.compile(r"^v(\d{4,})-(\d{8})-([a-z][a-z0-9_]*)$")


# ----------------------------------------------------------------- paths
def versions_root(cfg) -> Path:
    return cfg.models_root / "versions"


def version_dir(cfg, version: str) -> Path:
    if not _VERSION.match(version):
        raise UserError(f"not a model version id: {version!r} (expected e.g. v0001-20261104-train)")
    return versions_root(cfg) / version


def pointer_path(cfg) -> Path:
    return cfg.models_root / "PUBLISHED"


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------ file writes
def save_torch(path: Path, obj) -> None:
    import torch

    files.replace_atomically(path, lambda tmp: torch.save(obj, tmp))


def plain(obj):
    """JSON-able copy (numpy scalars -> numbers, tuples -> lists, dates -> text): what a manifest can hold and a
    weights_only torch.load accepts."""
    return json.loads(json.dumps(obj, default=files.jsonable))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -------------------------------------------------------------- versions
def _allocated(cfg) -> list[str]:
    root = versions_root(cfg)
    names = {p.name for p in root.iterdir() if _VERSION.match(p.name)} if root.is_dir() else set()
    index = root / "INDEX.jsonl"
    if index.is_file():
        for line in index.read_text().splitlines():
            try:
                names.add(json.loads(line)["version"])
            except (ValueError, KeyError, TypeError):
                continue
    return sorted(names)


def allocate(cfg, day: dt.date | None, kind: str) -> tuple[str, Path]:
    """A fresh version id and its (empty) folder."""
    root = versions_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    n = max((int(_VERSION.match(v).group(1)) for v in _allocated(cfg)), default=0) + 1
    stamp = (day or dt.datetime.now(dt.UTC).date()).strftime("%Y%m%d")
    while True:
        version = f"v{n:04d}-{stamp}-{kind}"
        d = root / version
        try:
            d.mkdir()
        except FileExistsError:
            n += 1
            continue
        with open(root / "INDEX.jsonl", "a") as f:
            f.write(json.dumps({"version": version, "allocated_at": now_iso()}) + "\n")
        return version, d


def register(
    cfg, checkpoint: dict, *, kind: str, day: dt.date | None, status: str = "registered", manifest: dict | None = None
) -> str:
    """Store a checkpoint as a new version (model.pt, then manifest.json). Returns the version id."""
    missing = [k for k in REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint lacks {missing}")
    version, d = allocate(cfg, day, kind)
    ck = {
        **{k: (v if k == "state_dict" else plain(v)) for k, v in checkpoint.items()},
        "version": version,
        "kind": kind,
        "status": status,
        "dt": str(day) if day else None,
    }
    ck["state_dict"] = {k: v.detach().cpu() for k, v in checkpoint["state_dict"].items()}
    save_torch(d / "model.pt", ck)
    man = {
        "version": version,
        "kind": kind,
        "status": status,
        "dt": ck["dt"],
        "created_at": now_iso(),
        **{k: v for k, v in ck.items() if k not in ("state_dict", "version", "kind", "status", "dt")},
        **plain(manifest or {}),
        "reembedding_rule": REEMBED_RULE,
        "files": {"model.pt": {"bytes": (d / "model.pt").stat().st_size, "sha256": sha256(d / "model.pt")}},
    }
    write_json(d / "manifest.json", man)
    return version


def set_status(cfg, version: str, status: str, decision: dict | None = None) -> dict:
    """Record a verdict on a registered version (e.g. candidate -> promoted/rejected) in its manifest."""
    man = read_manifest(cfg, version)
    man["status"] = status
    if decision is not None:
        man["gate"] = plain(decision)
    man.setdefault("status_history", []).append({"status": status, "at": now_iso()})
    write_json(version_dir(cfg, version) / "manifest.json", man)
    return man


def read_manifest(cfg, version: str) -> dict:
    p = version_dir(cfg, version) / "manifest.json"
    if not p.is_file():
        if p.parent.is_dir():
            raise UserError(f"model version {version} is incomplete (no {p}): its registration did not finish")
        raise UserError(f"no model version {version} under {versions_root(cfg)}")
    try:
        return json.loads(p.read_text())
    except ValueError as exc:
        raise UserError(f"{p}: not valid JSON ({exc})") from None


def list_versions(cfg) -> list[dict]:
    """Manifests of every complete version, oldest first."""
    root = versions_root(cfg)
    if not root.is_dir():
        return []
    return [
        read_manifest(cfg, p.name)
        for p in sorted(root.iterdir())
        if _VERSION.match(p.name) and (p / "manifest.json").is_file()
    ]


# -------------------------------------------------------------- publishing
def published(cfg) -> dict | None:
    """The PUBLISHED pointer ({"version", "published_at", "reason", ...}), or None when nothing is published."""
    return files.read_pointer(
        pointer_path(cfg),
        _VERSION,
        "published pointer",
        f"publish a version again (versions under {versions_root(cfg)})",
    )


def publish(cfg, version: str, reason: str, extra: dict | None = None) -> dict:
    """Make `version` the published model (atomic pointer swap); the version must load. `extra` keys (e.g. a
    repair's id) go into the pointer and its log line."""
    man = read_manifest(cfg, version)
    read_checkpoint(version_dir(cfg, version) / "model.pt", man)  # never point at something unloadable
    prev = published(cfg)
    ptr = {
        "version": version,
        "published_at": now_iso(),
        "reason": reason,
        "previous": prev["version"] if prev else None,
        **(extra or {}),
    }
    write_json(pointer_path(cfg), ptr)
    _log_publish(cfg, ptr)
    return ptr


def unpublish(cfg, reason: str, extra: dict | None = None) -> dict | None:
    """Remove the PUBLISHED pointer: no model is served, as before the first one (`repair` back to before the
    first model). Every version stays. Logged in publish_log.jsonl with ``"version": null``. Returns the log line,
    or None when nothing was published."""
    prev = published(cfg)
    if prev is None:
        return None
    entry = {"version": None, "published_at": now_iso(), "reason": reason, "previous": prev["version"], **(extra or {})}
    pointer_path(cfg).unlink()
    files.fsync_dir(pointer_path(cfg).parent)
    _log_publish(cfg, entry)
    return entry


def publish_log(cfg) -> list[dict]:
    """Every line of publish_log.jsonl, oldest first (a repair's withdrawal has version None)."""
    p = cfg.models_root / "publish_log.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []


def _log_publish(cfg, entry: dict) -> None:
    with open(cfg.models_root / "publish_log.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


# ---------------------------------------------------------------- loading
def read_checkpoint(path: Path, manifest: dict | None = None) -> dict:
    """A checkpoint file, checked: exists, matches the manifest's checksum, unpickles, has the required keys."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"model checkpoint not found: {path}")
    want = ((manifest or {}).get("files") or {}).get("model.pt", {}).get("sha256")
    if want and sha256(path) != want:
        raise UserError(f"{path}: checksum does not match its manifest (truncated or modified file)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise UserError(
            f"{path}: unreadable model checkpoint (truncated or corrupt?): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    if not isinstance(ck, dict):
        raise UserError(f"{path}: not a model checkpoint (a {type(ck).__name__}, expected a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in ck]
    if missing:
        raise UserError(f"{path}: not a model checkpoint, missing {', '.join(missing)}")
    return ck


def catalog_of(ck: dict, path: Path | str = "checkpoint"):
    """The ItemCatalog a checkpoint was built for; a UserError naming the file when it does not fit."""
    from userformer.models.train import catalog_of as rebuild

    try:
        return rebuild(ck, path)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def model_from_checkpoint(ck: dict, path: Path | str = "checkpoint"):
    """Rebuild the UserFormer of a checkpoint; any disagreement of config, sizes and weights is a UserError."""
    from userformer.models.config import ModelConfig
    from userformer.models.model import UserFormer

    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(ck["model_config"]) - known)
    if unknown:
        raise UserError(
            f"{path}: model_config has settings this code does not know: {unknown} "
            "(written by another version of userformer)"
        )
    catalog = catalog_of(ck, path)
    try:
        model = UserFormer(ModelConfig(**ck["model_config"]), catalog)
        model.load_state_dict(ck["state_dict"])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = "; ".join(lines[:4])
        if "size mismatch" in str(exc):
            raise UserError(f"{path}: model/vocabulary size mismatch: {detail}") from None
        raise UserError(
            f"{path}: its weights do not fit this version of the model code (retrain, or run the "
            f"userformer that wrote it): {detail}"
        ) from None
    return model


def load(cfg, version: str | None = None):
    """(model, checkpoint) of `version`, or of the published version when None. The model is on the CPU, in eval
    mode, sized to the vocabulary it was trained with (see models/grow.py to extend it)."""
    if version is None:
        ptr = published(cfg)
        if ptr is None:
            raise UserError(f"no published model under {cfg.models_root}: run `userformer train` first")
        version = ptr["version"]
    man = read_manifest(cfg, version)
    path = version_dir(cfg, version) / "model.pt"
    ck = read_checkpoint(path, man)
    model = model_from_checkpoint(ck, path)
    return model.eval(), ck


def fit_to_catalog(model, catalog, where: str) -> dict:
    """Grow `model` to `catalog` (ids added since it was trained); a SMALLER catalogue is a UserError."""
    from userformer.models.grow import grow

    try:
        return grow(model, catalog)
    except ValueError as exc:
        raise UserError(f"{where}: model/vocabulary size mismatch: {exc}") from None
