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
sort in creation order; NNNN is one more than any id allocated before, so two
writers never share one and a deleted version's number is not handed out
again. The folders, INDEX.jsonl, the pointer and its log are a version store
(jobs/core/versions.py), the same mechanism as the item index's.

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

from userformer.jobs.core import hooks, lease
from userformer.jobs.core.errors import UserError
from userformer.jobs.core.storage import files
from userformer.jobs.core.versions import VersionStore, now_iso

# torch and the model's modules are imported in the functions that load or save checkpoints: the steps that only
# read the registry's pointer (the checks, publish, the index, repair's planning) do not pay torch's import.

REEMBED_RULE = (
    "on promotion every user is re-embedded with the new model: user embeddings of an older "
    "version are not comparable with this version's item vectors (see stale_embeddings)"
)
REQUIRED_KEYS = ("state_dict", "model_config", "train_config", "vocab_sizes")
_VERSION = re.compile(r"^v(\d{4,})-(\d{8})-([a-z][a-z0-9_]*)$")


# ----------------------------------------------------------------- paths
def store(cfg) -> VersionStore:
    """The registry's version store: versions under models_root/versions, the PUBLISHED pointer, publish_log.jsonl."""
    return VersionStore(
        cfg.models_root,
        _VERSION,
        "PUBLISHED",
        "publish_log.jsonl",
        "model version",
        example="v0001-20261104-train",
        pointer_label="published pointer",
        pointer_fix=f"publish a version again (versions under {cfg.models_root / 'versions'})",
        time_key="published_at",
        unfinished="its registration did not finish",
    )


def versions_root(cfg) -> Path:
    return store(cfg).versions_root


def version_dir(cfg, version: str) -> Path:
    """The folder of a model version; a UserError when `version` is not a model version id."""
    return store(cfg).path(version)


def pointer_path(cfg) -> Path:
    return store(cfg).pointer_path


# ------------------------------------------------------------ file writes
def save_torch(path: Path, obj) -> None:
    import torch

    def write(tmp):
        torch.save(obj, tmp)
        hooks.pause("registry.checkpoint_written")  # tests: a kill with the temp file written, not renamed

    files.replace_atomically(path, write)


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
def allocate(cfg, day: dt.date | None, kind: str) -> tuple[str, Path]:
    """A fresh version id and its (empty) folder."""
    stamp = (day or dt.datetime.now(dt.UTC).date()).strftime("%Y%m%d")
    return store(cfg).allocate(lambda n: f"v{n:04d}-{stamp}-{kind}")


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
    store(cfg).write_manifest(version, man)
    return version


def set_status(cfg, version: str, status: str, decision: dict | None = None) -> dict:
    """Record a verdict on a registered version (e.g. candidate -> promoted/rejected) in its manifest."""
    man = read_manifest(cfg, version)
    man["status"] = status
    if decision is not None:
        man["gate"] = plain(decision)
    man.setdefault("status_history", []).append({"status": status, "at": now_iso()})
    store(cfg).write_manifest(version, man)
    return man


def read_manifest(cfg, version: str) -> dict:
    """The manifest of a complete version; a UserError when it is missing, incomplete or unreadable."""
    return store(cfg).read_manifest(version)


def list_versions(cfg) -> list[dict]:
    """Manifests of every complete version, oldest first."""
    return store(cfg).manifests()


# -------------------------------------------------------------- publishing
def published(cfg) -> dict | None:
    """The PUBLISHED pointer ({"version", "published_at", "reason", ...}), or None when nothing is published."""
    return store(cfg).pointer()


@lease.writer("publish-model")
def publish(cfg, version: str, reason: str, extra: dict | None = None) -> dict:
    """Make `version` the published model (atomic pointer swap); the version must load. `extra` keys (e.g. a
    repair's id) go into the pointer and its log line."""
    man = read_manifest(cfg, version)
    read_checkpoint(version_dir(cfg, version) / "model.pt", man)  # never point at something unloadable
    return store(cfg).set_pointer(version, {"reason": reason, **(extra or {})})


@lease.writer("publish-model")
def unpublish(cfg, reason: str, extra: dict | None = None) -> dict | None:
    """Remove the PUBLISHED pointer: no model is served, as before the first one (`repair` back to before the
    first model). Every version stays. Logged in publish_log.jsonl with ``"version": null``. Returns the log line,
    or None when nothing was published."""
    return store(cfg).clear_pointer({"reason": reason, **(extra or {})})


def publish_log(cfg) -> list[dict]:
    """Every line of publish_log.jsonl, oldest first (a repair's withdrawal has version None)."""
    return store(cfg).log()


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
