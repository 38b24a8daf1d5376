"""The item ANN index: `userformer index --dt D`.

**index --dt D** builds a FAISS index from ``item_embeddings`` (every row must
carry one model version, the published one when the registry has a
PUBLISHED pointer). The kind follows the catalogue size (``[index]``):
exact ``IndexFlatIP`` up to ``flat_max_items``, ``IndexHNSWFlat`` (inner
product; M / efConstruction / efSearch from the config) up to
``hnsw_max_items``, ``IndexIVFFlat`` (IVF-PQ when ``ivf_pq_m`` > 0; nlist
about sqrt(n), nprobe from the config) above. FAISS ids are the items'
``item_idx`` (``IndexIDMap2`` around flat/HNSW, IVF's own ids with a hash
direct map), so every kind can hand back an item's vector by its id.

Before anything becomes current the new version is checked by the ``index``
quality suite (jobs/steps/quality/index.py, the runner of ``userformer check``):
recall@10 against exact search on ``recall_sample`` queries (user embeddings
of the same model version when there are any, else item vectors) >=
``min_recall_at_10``, vector count == item_embeddings rows, dimension == the
embeddings' (users' too), finite unit-norm vectors, unique item ids, one model
version. The report is ``userformer check``'s:
``reports_root/checks/index/dt=D.json`` + ``.html``; ``userformer check index
--dt D`` runs the same suite on the CURRENT index.

Layout under ``index_root`` (a version store, jobs/core/versions.py, like the
model registry's)::

    versions/<version>/index.faiss     the FAISS index (search parameters also in the manifest)
    versions/<version>/items.parquet   item_idx, item_id of every vector (sorted by item_idx)
    versions/<version>/manifest.json   model version, as_of (D), items, dimension, kind + parameters, build
                                       seconds, recall@10 + sample, item_embeddings Delta version,
                                       status (checking, then current/rejected) and the check; written
                                       last when built, rewritten with the check's outcome
    versions/INDEX.jsonl               every version id ever allocated (ids are never reused)
    CURRENT                            {"version", "model_version", "as_of", "switched_at", "previous"}
    switch_log.jsonl                   every switch of CURRENT, in order
    _building/                         versions being built (a crash leaves them here, never current)

A version ``i<NNNN>-<YYYYMMDD>`` is built in ``_building/`` and renamed into
``versions/`` complete (status ``checking``), checked there, then CURRENT is
replaced atomically (temp file + os.replace). A reader resolves CURRENT once
and opens that folder, so it gets the previous complete index or the new
complete one, never part of one. A failed check leaves the built version in
``versions/`` with status ``rejected`` (for inspection) and CURRENT as it was
(exit 1). After a switch, retention keeps the newest ``versions_kept``
accepted versions (the current one among them) and removes older or rejected
ones and leftovers of crashed builds.

**Reruns.** When CURRENT was built from exactly the same inputs (model
version, item_embeddings Delta version, build parameters), ``index`` does
nothing and says so (exit 0); ``--force`` builds a new version anyway.

`userformer candidates --dt D` (jobs/steps/candidates.py) searches the current
index for the users refreshed on D.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from userformer.jobs.core import hooks, lease, registry, snapshot
from userformer.jobs.core.config import Config
from userformer.jobs.core.dates import date_arg
from userformer.jobs.core.errors import UserError
from userformer.jobs.core.storage import delta, files
from userformer.jobs.core.versions import MANIFEST, VersionStore, now_iso
from userformer.jobs.steps.check import CheckResult, check, summary

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
ITEMS_FILE = "items.parquet"
CHECKING = "checking"  # the status of a built version until its check has decided
# What the check measured that the manifest keeps (the quality suite's facts).
_RECALL_FACTS = ("recall_at_10", "recall_sample", "recall_query_source", "recall_seconds", "user_embeddings_version")
_VERSION = re.compile(r"^i(\d{4,})-(\d{8})$")


class NoIndex(UserError):
    """No current index: the API and `candidates` cannot run (exit 2, naming the command that builds one)."""

    def __init__(self, cfg: Config, detail: str = ""):
        super().__init__(
            f"no item index is current under {cfg.index_root}{detail}: "
            "run `userformer index --dt D` first (after `userformer publish --dt D`)",
            code=2,
        )


# ------------------------------------------------------------------ layout
def store(cfg: Config) -> VersionStore:
    """The index's version store: versions under index_root/versions, the CURRENT pointer, switch_log.jsonl."""
    return VersionStore(
        cfg.index_root,
        _VERSION,
        "CURRENT",
        "switch_log.jsonl",
        "index version",
        example="i0001-20260107",
        pointer_label="index pointer",
        pointer_fix="rebuild with `userformer index --dt D --force`",
        time_key="switched_at",
        unfinished="its build did not finish",
    )


def versions_root(cfg: Config) -> Path:
    return store(cfg).versions_root


def version_dir(cfg: Config, version: str) -> Path:
    """The folder of an index version; a UserError when `version` is not an index version id."""
    return store(cfg).path(version)


def current_path(cfg: Config) -> Path:
    return store(cfg).pointer_path


def current(cfg: Config) -> dict | None:
    """The CURRENT pointer, or None when no index was ever made current."""
    return store(cfg).pointer()


def read_manifest(cfg: Config, version: str) -> dict:
    """The manifest of a complete version; a UserError when it is missing, incomplete or unreadable."""
    return store(cfg).read_manifest(version)


def list_versions(cfg: Config) -> list[str]:
    """The complete versions (current, rejected, being checked), oldest first."""
    return store(cfg).versions()


def _status(cfg: Config, version: str) -> str | None:
    """The status in a version's manifest; None when it has none yet (being built) or it cannot be read."""
    try:
        return json.loads((version_dir(cfg, version) / MANIFEST).read_text()).get("status")
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ faiss
def _faiss(cfg: Config | None = None):
    import faiss

    if cfg is not None and cfg.index.threads:
        faiss.omp_set_num_threads(cfg.index.threads)
    return faiss


def choose_kind(cfg: Config, n: int) -> str:
    ic = cfg.index
    if ic.kind != "auto":
        return ic.kind
    if n <= ic.flat_max_items:
        return "flat"
    return "hnsw" if n <= ic.hnsw_max_items else "ivf"


def build_params(cfg: Config, kind: str, n: int, d: int) -> dict:
    """What the index of `kind` is built and searched with (stored in the manifest)."""
    ic = cfg.index
    if kind == "flat":
        return {"metric": "inner_product"}
    if kind == "hnsw":
        return {
            "metric": "inner_product",
            "M": ic.hnsw_m,
            "efConstruction": ic.hnsw_ef_construction,
            "efSearch": ic.hnsw_ef_search,
        }
    nlist = ic.ivf_nlist or max(1, int(round(math.sqrt(n))))
    nlist = max(1, min(nlist, n))
    train = min(n, max(ic.ivf_train_size, 39 * nlist))
    p = {"metric": "inner_product", "nlist": nlist, "nprobe": min(ic.ivf_nprobe, nlist), "train_size": train}
    if ic.ivf_pq_m:
        if d % ic.ivf_pq_m:
            raise UserError(f"index.ivf_pq_m={ic.ivf_pq_m} must divide the dimension {d}")
        p.update(pq_m=ic.ivf_pq_m, pq_bits=8)
    return p


def build_faiss(vectors: np.ndarray, ids: np.ndarray, kind: str, params: dict, seed: int = 0):
    """A FAISS index over `vectors` (float32, n x d) with FAISS ids `ids` (int64)."""
    faiss = _faiss()
    n, d = vectors.shape
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
        index.add_with_ids(vectors, ids)
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(d, params["M"], ip)
        inner.hnsw.efConstruction = params["efConstruction"]
        index = faiss.IndexIDMap2(inner)
        index.add_with_ids(vectors, ids)
    elif kind == "ivf":
        quantizer = faiss.IndexFlatIP(d)
        if params.get("pq_m"):
            index = faiss.IndexIVFPQ(quantizer, d, params["nlist"], params["pq_m"], params["pq_bits"], ip)
        else:
            index = faiss.IndexIVFFlat(quantizer, d, params["nlist"], ip)
        rng = np.random.default_rng(seed)
        sample = (
            vectors
            if params["train_size"] >= n
            else vectors[np.sort(rng.choice(n, params["train_size"], replace=False))]
        )
        index.cp.seed = seed
        index.train(np.ascontiguousarray(sample))
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct(item_idx) for similar_items
        index.add_with_ids(vectors, ids)
    else:
        raise UserError(f"unknown index kind {kind!r}")
    set_search_params(index, kind, params)
    return index


def set_search_params(index, kind: str, params: dict) -> None:
    faiss = _faiss()
    if kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efSearch = params["efSearch"]
    elif kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = params["nprobe"]


def describe(kind: str, params: dict) -> str:
    if kind == "flat":
        return "exact IndexFlatIP"
    if kind == "hnsw":
        return f"IndexHNSWFlat M={params['M']} efConstruction={params['efConstruction']} efSearch={params['efSearch']}"
    what = f"IndexIVFPQ m={params['pq_m']}" if params.get("pq_m") else "IndexIVFFlat"
    return f"{what} nlist={params['nlist']} nprobe={params['nprobe']}"


def exact_topk(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the exact top-k inner products (the recall reference)."""
    faiss = _faiss()
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    _, pos = flat.search(queries, min(k, len(vectors)))
    return np.where(pos >= 0, ids[np.clip(pos, 0, None)], -1)


def recall_at_k(truth: np.ndarray, found: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (labels -1 ignored)."""
    if not len(truth):
        return float("nan")
    hits = []
    for t, f in zip(truth, found):
        t = set(int(x) for x in t if x >= 0)
        hits.append(len(t & set(int(x) for x in f if x >= 0)) / max(1, len(t)))
    return float(np.mean(hits))


def vectors_of(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A list<float> column with equal lengths as a float32 (n x d) array."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    lens = pc.list_value_length(arr)
    lo, hi = pc.min(lens).as_py(), pc.max(lens).as_py()
    if lo != hi or lo is None or arr.null_count:
        raise UserError(f"embeddings of unequal length ({lo}..{hi}) or null: cannot index them")
    flat = pc.list_flatten(arr).cast(pa.float32())
    return np.ascontiguousarray(flat.to_numpy(zero_copy_only=False).reshape(n, lo))


def str_field(name: str) -> pc.Expression:
    """A string column in a pyarrow dataset filter, cast to string.

    delta-rs (1.6) MERGE / DELETE rewrite string columns as Arrow string_view
    (https://github.com/delta-io/delta-rs/issues/4579), and pyarrow has no comparison kernel for string_view
    against a string literal: a plain ``pc.field("user_id") == "u1"`` fails on those files. Casting the field
    works on both kinds of file (it costs row-group pruning on that column)."""
    return pc.field(name).cast(pa.string())


def str_in(name: str, values) -> pc.Expression:
    values = list(values)
    return str_field(name) == values[0] if len(values) == 1 else str_field(name).isin(pa.array(values, pa.string()))


# ------------------------------------------------------------- open (readers)
@dataclass
class ItemIndex:
    """One complete index version, opened: search by vector, look items up by id."""

    version: str
    path: Path
    manifest: dict
    index: object  # faiss.Index
    item_idx: np.ndarray  # sorted
    item_id: np.ndarray  # object array, parallel to item_idx
    _by_id: dict | None = field(default=None, repr=False)

    @property
    def model_version(self) -> str:
        return self.manifest["model_version"]

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def ids_of(self, labels: np.ndarray) -> np.ndarray:
        pos = np.clip(np.searchsorted(self.item_idx, labels), 0, len(self.item_idx) - 1)
        return self.item_id[pos]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, item_idx) of the top k per query; -1 pads where the index found fewer."""
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32).reshape(-1, self.index.d))
        return self.index.search(q, max(1, min(k, self.ntotal)))

    def idx_of_item(self, item_id: str) -> int | None:
        if self._by_id is None:
            self._by_id = {s: int(i) for s, i in zip(self.item_id.tolist(), self.item_idx.tolist())}
        return self._by_id.get(item_id)

    def vector(self, item_idx: int) -> np.ndarray:
        return self.index.reconstruct(int(item_idx))


def open_version(cfg: Config, version: str) -> ItemIndex:
    import pyarrow.parquet as pq

    faiss = _faiss(cfg)
    d = version_dir(cfg, version)
    man = read_manifest(cfg, version)
    try:
        index = faiss.read_index(str(d / INDEX_FILE))
        items = pq.read_table(d / ITEMS_FILE, columns=["item_idx", "item_id"])
    except (RuntimeError, OSError, pa.ArrowInvalid) as exc:
        raise UserError(f"index version {version} at {d} cannot be read: {exc}") from None
    set_search_params(index, man["kind"], man["params"])
    return ItemIndex(
        version, d, man, index, items["item_idx"].to_numpy(), np.asarray(items["item_id"].to_pylist(), dtype=object)
    )


def open_current(cfg: Config) -> ItemIndex:
    ptr = current(cfg)
    if ptr is None:
        raise NoIndex(cfg, " (no CURRENT pointer)")
    return open_version(cfg, ptr["version"])


# ------------------------------------------------------------------- build
@dataclass
class IndexResult:
    dt: datetime.date
    status: str  # current (built and switched), rejected (check failed), unchanged (no-op rerun)
    version: str
    manifest: dict
    check: CheckResult | None = None
    previous: str | None = None
    removed: list[str] = field(default_factory=list)


def _read_items(cfg: Config) -> tuple[pa.Table, int]:
    path = cfg.table_path("item_embeddings")
    if not delta.exists(path):
        raise UserError(f"no item_embeddings table at {path}: run `userformer publish --dt D` first")
    t = delta.open_table(path)
    data = delta.dataset(t).to_table(columns=["item_id", "item_idx", "embedding", "model_version", "as_of"])
    return data, t.version()


def _model_version(cfg: Config, data: pa.Table) -> str:
    counts = {r["values"]: r["counts"] for r in pc.value_counts(data["model_version"]).to_pylist()}
    if len(counts) != 1:
        shown = ", ".join(f"{v} ({n} rows)" for v, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        raise UserError(
            f"item_embeddings mixes model versions: {shown}; an index is of one version: "
            "publish the item embeddings of one version first (`userformer publish --dt D`)"
        )
    mv = next(iter(counts))
    try:
        pub = registry.published(cfg)
    except UserError:
        raise
    except Exception:  # pragma: no cover - registry unreadable for another reason: the table decides
        pub = None
    if pub and pub["version"] != mv:
        raise UserError(
            f"item_embeddings holds model version {mv} but the published model is {pub['version']}: "
            "run `userformer infer --dt D` and `userformer publish --dt D` first"
        )
    return mv


def _write_items(path: Path, data: pa.Table) -> None:
    import pyarrow.parquet as pq

    items = data.select(["item_idx", "item_id"])
    items = items.take(pc.sort_indices(items["item_idx"]))
    pq.write_table(items, path)


def _write_index(index, path: Path) -> None:
    _faiss().write_index(index, str(path))


@lease.writer("index")
def build_index(cfg: Config, day: datetime.date, *, force: bool = False) -> IndexResult:
    """Build, check and (when the check passes) make current an index of item_embeddings. See the module doc."""
    t0 = time.perf_counter()
    faiss = _faiss(cfg)
    data, table_version = _read_items(cfg)
    if data.num_rows == 0:
        raise UserError(f"item_embeddings at {cfg.table_path('item_embeddings')} has no rows: nothing to index")
    model_version = _model_version(cfg, data)
    vectors = vectors_of(data["embedding"])
    n, d = vectors.shape
    kind = choose_kind(cfg, n)
    params = build_params(cfg, kind, n, d)
    inputs = {
        "model_version": model_version,
        "item_embeddings_version": table_version,
        "kind": kind,
        "params": params,
        "items": n,
        "dimension": d,
    }

    ptr = current(cfg)
    if ptr and not force:
        try:
            cur = read_manifest(cfg, ptr["version"])
        except UserError:
            cur = None
        if cur and {k: cur.get(k) for k in inputs} == inputs:
            log.info("index %s is current and was built from the same inputs: nothing to do", ptr["version"])
            return IndexResult(day, "unchanged", ptr["version"], cur, previous=ptr["version"])

    as_of = data["as_of"]
    versions = store(cfg)
    version, dest = versions.allocate(lambda n: f"i{n:04d}-{day:%Y%m%d}", dt=str(day))
    building = cfg.index_root / "_building" / f"{version}.{uuid.uuid4().hex[:8]}"
    try:
        building.mkdir(parents=True)
        ids = data["item_idx"].to_numpy().astype(np.int64)
        tb = time.perf_counter()
        index = build_faiss(vectors, ids, kind, params, seed=day.toordinal())
        build_s = time.perf_counter() - tb
        _write_index(index, building / INDEX_FILE)
        _write_items(building / ITEMS_FILE, data)
        manifest = {
            "version": version,
            "as_of": str(day),
            "status": CHECKING,
            **inputs,
            "index_class": _class_name(index),
            "item_embeddings_as_of": [str(pc.min(as_of).as_py()), str(pc.max(as_of).as_py())],
            "build_seconds": round(build_s, 3),
            "recall_at_10": None,
            "recall_sample": None,
            "recall_query_source": None,
            "recall_seconds": None,
            "user_embeddings_version": None,
            "files": {
                INDEX_FILE: (building / INDEX_FILE).stat().st_size,
                ITEMS_FILE: (building / ITEMS_FILE).stat().st_size,
            },
            "faiss_version": faiss.__version__,
            "built_at": now_iso(),
            "check": None,
        }
        files.write_json(building / MANIFEST, manifest)
        files.fsync_dir(building)
        hooks.pause("index.before_rename")  # tests: a kill with the version built in _building
        os.rename(building, dest)  # replaces the empty placeholder the allocation made
        files.fsync_dir(dest.parent)
        # The gate runs on the version as a reader would open it; nothing points at it until it passes.
        res = check(cfg, "index", day, {"version": version})
        manifest.update(
            status="current" if res.success else "rejected",
            **{k: res.facts.get(k) for k in _RECALL_FACTS},
            check={"success": res.success, "failed": [r.expectation for r in res.failed]},
        )
        if res.error:
            manifest["check"]["error"] = res.error
        versions.write_manifest(version, manifest)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        if dest.is_dir() and _status(cfg, version) in (None, CHECKING):
            shutil.rmtree(dest, ignore_errors=True)
        raise
    result = IndexResult(
        day, manifest["status"], version, manifest, check=res, previous=ptr["version"] if ptr else None
    )
    if not res.success:
        log.warning("index %s failed its check: CURRENT stays %s", version, result.previous)
        return result
    hooks.pause("index.before_switch")  # tests: checked and accepted, CURRENT not switched
    switch(cfg, version, manifest)
    result.removed = retain(cfg)
    log.info("index %s is current (%.1fs)", version, time.perf_counter() - t0)
    return result


def _class_name(index) -> str:
    faiss = _faiss()
    outer = type(faiss.downcast_index(index)).__name__
    inner = getattr(index, "index", None)
    return (
        f"{outer}({type(faiss.downcast_index(inner)).__name__})"
        if inner is not None and outer.startswith("IndexIDMap")
        else outer
    )


@lease.writer("index")
def switch(cfg: Config, version: str, manifest: dict | None = None, extra: dict | None = None) -> dict:
    """Make a complete, accepted version current (atomic pointer replace) and log the switch (`extra`: e.g. a
    repair's id, in the pointer and the log)."""
    manifest = manifest or read_manifest(cfg, version)
    if manifest.get("status") != "current":
        raise UserError(f"index version {version} was {manifest.get('status')}: it cannot be made current")
    return store(cfg).set_pointer(
        version, {"model_version": manifest["model_version"], "as_of": manifest["as_of"], **(extra or {})}
    )


@lease.writer("index")
def unset_current(cfg: Config, extra: dict | None = None) -> dict | None:
    """Remove the CURRENT pointer (no index, as before the first one; `repair` back to before the first model).
    The versions stay. Logged in switch_log.jsonl with ``"version": null``; None when there was no CURRENT."""
    return store(cfg).clear_pointer(dict(extra or {}))


def retain(cfg: Config) -> list[str]:
    """Keep the newest `versions_kept` accepted versions (the current one and the released one always); remove
    the rest."""
    versions = store(cfg)
    ptr = versions.pointer()
    cur = ptr["version"] if ptr else None
    removed = []
    accepted, other = [], []
    for v in versions.folders():
        status = _status(cfg, v)
        (accepted if status == "current" else other).append((v, status))
    keep = {v for v, _ in accepted[-cfg.index.versions_kept :]}
    if cur:
        keep.add(cur)
    released = (snapshot.current(cfg) or {}).get("index") or {}
    if released.get("version"):
        keep.add(released["version"])  # what readers search until the next release
    cur_n = versions.number(cur) if cur else None
    for v, status in accepted + other:
        if v in keep:
            continue
        if status in (None, CHECKING) and (cur_n is None or versions.number(v) > cur_n):
            continue  # built or checked after the current one: a build may be running
        shutil.rmtree(versions.path(v), ignore_errors=True)
        removed.append(v)
    stale = time.time() - 86400
    for p in (cfg.index_root / "_building").glob("*") if (cfg.index_root / "_building").is_dir() else []:
        if p.stat().st_mtime < stale:
            shutil.rmtree(p, ignore_errors=True)
    return sorted(removed, key=versions.number)


# --------------------------------------------------------------------- CLI
def register(sub) -> None:
    """The `index` subcommand."""
    p = sub.add_parser(
        "index",
        help="build the FAISS item index from item_embeddings, check its recall, make it current",
        description="Build a FAISS index of item_embeddings (kind by catalogue size: exact, HNSW, IVF), measure "
        "recall@10 against exact search, check it, and switch index_root/CURRENT to it atomically "
        "(a failed check switches nothing and exits 1). A rerun with unchanged inputs does nothing "
        "(--force builds anyway). See jobs/steps/index.py.",
    )
    p.add_argument("--dt", type=date_arg, required=True, help="drop date YYYY-MM-DD (names the version, the report)")
    p.add_argument("--force", action="store_true", help="build a new version even if CURRENT has the same inputs")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=run_index)


def run_index(args, cfg: Config) -> int:
    """`userformer index`: build, print what was built and the check; exit 1 when the check rejected it."""
    res = build_index(cfg, args.dt, force=args.force)
    m = res.manifest
    if args.json:
        print(json.dumps({"status": res.status, **m}, indent=2, default=str))
    if res.status == "unchanged":
        if not args.json:
            print(
                f"index {res.version} is current and was built from the same inputs (model {m['model_version']}, "
                f"item_embeddings v{m['item_embeddings_version']}): nothing to do (--force builds a new version)"
            )
        return 0
    if not args.json:
        print(
            f"index {res.version}: {describe(m['kind'], m['params'])}, {m['items']:,} items x {m['dimension']}, "
            f"model {m['model_version']}, built in {m['build_seconds']:.1f}s"
        )
        rc = m["recall_at_10"]
        print(
            f"recall@10 {'n/a' if rc is None else f'{rc:.4f}'} on {m['recall_sample']} queries from "
            f"{m['recall_query_source']} (threshold {cfg.index.min_recall_at_10})"
        )
        print(summary(res.check))
        if res.status == "current":
            print(
                f"CURRENT -> {res.version}"
                + (f" (previous {res.previous})" if res.previous else "")
                + (f"; removed {', '.join(res.removed)}" if res.removed else "")
            )
        else:
            print(
                f"CURRENT unchanged: {res.previous or 'none'} (rejected version kept for inspection: "
                f"{versions_root(cfg) / res.version})"
            )
    return 0 if res.status == "current" else 1
