"""The one configuration: every knob of the pipeline, typed, with its range.

Resolution order (later wins):
  1. the defaults below;
  2. a TOML file: ``--config FILE`` or ``$USERFORMER_CONFIG``
     (``infra/config/userformer.toml`` is the commented example);
  3. environment variables ``USERFORMER__SECTION__KEY=value``
     (e.g. ``USERFORMER__SPARK__MASTER=spark://127.0.0.1:7077``);
  4. ``$USERFORMER_HOME``, which moves every default path at once.

Paths left empty derive from ``paths.home``: raw/, warehouse/, models/, index/,
reports/ beneath it, so one variable points a whole run somewhere else.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from userformer.jobs.core.storage.files import Location, location
from userformer.models.config import ModelConfig, TrainConfig
from userformer.models.config import bounds as _rng
from userformer.models.config import subset as _subset


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


@dataclass
class PathsConfig:
    # Root of all state; USERFORMER_HOME overrides it.
    home: str = ""
    # Raw drops: raw/events/dt=YYYY-MM-DD/*.parquet and raw/items/dt=.../*.parquet.
    raw_root: str = ""
    # Delta tables, one folder per table, and the files kept beside them (_staging, _published, _repair).
    # A local folder, or an object-store URI (s3://bucket/prefix; see docs/operations.md "Object storage").
    warehouse_root: str = ""
    models_root: str = ""
    index_root: str = ""
    # HTML/JSON reports of checks and runs.
    reports_root: str = ""


@dataclass
class SparkConfig:
    # local[*], local[N] or spark://host:port of a standalone master.
    master: str = "local[2]"
    app_name: str = "userformer"
    driver_memory: str = "4g"
    executor_memory: str = "2g"
    # Small on purpose: a day of events is small; AQE coalesces further.
    shuffle_partitions: int = field(default=8, metadata=_rng(1, 100_000))
    # Extra spark.* settings, e.g. {"spark.executor.cores" = "1"}.
    extra: dict = field(default_factory=dict)
    # sc://host:port of a running Spark Connect server (`userformer spark-connect start`): every step is a client
    # of that one driver instead of starting a JVM of its own. "" = each step starts a driver for `master`.
    remote: str = ""
    # Folder of Delta's Spark JARs with their jars.sha256 ("" = infra/jars/lib, filled by `make jars`).
    jars_dir: str = ""


@dataclass
class IngestConfig:
    # Event types the contract knows; anything else is rejected (reason unknown_event_type).
    item_event_types: list = field(
        default_factory=lambda: ["view", "click", "cart", "remove_from_cart", "purchase", "favourite", "rate"]
    )
    non_item_event_types: list = field(default_factory=lambda: ["search", "signup", "login", "filter"])
    # Events more than this many days before the drop date are rejected (ts_too_old).
    max_late_days: int = field(default=7, metadata=_rng(0, 3650))
    # Events this far after the end of the drop date are rejected (future_ts): clock skew allowance.
    future_tolerance_s: int = field(default=3600, metadata=_rng(0, 7 * 86400))
    # A duplicate of an event delivered in one of the previous N drops is dropped too. At least max_late_days: a
    # late event may come again in any drop of its late window, and a copy from before the lookback would be
    # accepted twice.
    dedupe_lookback_days: int = field(default=7, metadata=_rng(0, 3650))
    # Values outside are rejected (bad_duration).
    max_duration_s: float = field(default=86400.0, metadata=_rng(1.0, None))
    # A single user with more events than this in one drop is a bot/replay burst:
    # the excess (latest events kept) goes to events_rejected (user_burst).
    max_events_per_user_per_day: int = field(default=20_000, metadata=_rng(10, None))
    # Longer ids, event types or surfaces are rejected (too_long); the rejected row keeps the first this many.
    max_id_chars: int = field(default=512, metadata=_rng(16, 1_000_000))

    @property
    def event_types(self) -> list:
        return list(self.item_event_types) + list(self.non_item_event_types)


@dataclass
class SequencesConfig:
    # Events kept per user (the most recent ones).
    max_len: int = field(default=256, metadata=_rng(1, 100_000))
    # Target rows per Parquet file when user_sequences is written whole (rebuild, first day); a day's MERGE
    # writes the active users' rows apart and `maintain` compacts.
    rows_per_file: int = field(default=200_000, metadata=_rng(1_000, None))


@dataclass
class QualityConfig:
    # Row count of a day must lie within [lo, hi] x the median of the trailing days.
    row_count_band: list = field(default_factory=lambda: [0.2, 5.0])
    trailing_days: int = field(default=7, metadata=_rng(1, 365))
    # Fractions of the raw rows of a drop.
    max_duplicate_ratio: float = field(default=0.05, metadata=_rng(0.0, 1.0))
    max_rejected_ratio: float = field(default=0.05, metadata=_rng(0.0, 1.0))
    # How many unexpected example values a failed expectation shows.
    examples: int = field(default=5, metadata=_rng(0, 100))
    # The memory bound of a gate: it reads at most this many rows at once (never a whole table or day) and hands
    # Great Expectations frames of at most this many rows, combining their results (docs/quality.md).
    batch_rows: int = field(default=200_000, metadata=_rng(1, 100_000_000))
    # Uniqueness checks (event_id of a day, user_id over user_sequences and the staged outputs) hold at most about
    # this many ids at once: one pass over the id column per ceil(rows / ids_per_pass) hash partitions.
    ids_per_pass: int = field(default=1_000_000, metadata=_rng(1, 1_000_000_000))


# [model] and [train]: models/config.py (ModelConfig, TrainConfig).


@dataclass
class StorageConfig:
    # `userformer maintain` deletes files no version of the last N days references.
    # Time travel (restore, reruns of a past day) reaches back this far and no further.
    retention_days: float = field(default=30.0, metadata=_rng(0.0, 3650.0))
    # The shortest window `maintain` accepts (its --retention-days included): reruns of recent days, a repair of
    # them and readers of the published snapshot need their versions. Lower it only knowing what you give up.
    min_retention_days: float = field(default=7.0, metadata=_rng(0.0, 3650.0))
    # Writers (the steps that change tables, the registry or the index) hold the warehouse's lease one at a
    # time (jobs/core/lease.py); a second one waits this long for it, then fails naming the holder (exit 75).
    lease_wait_s: float = field(default=900.0, metadata=_rng(0.0, 86400.0))
    # How often a holder refreshes the heartbeat in its lease record (what a waiting writer shows).
    lease_heartbeat_s: float = field(default=15.0, metadata=_rng(0.1, 3600.0))
    # Folder of the lease's lock. "" = <warehouse>/_lease, or <home>/lease for a warehouse in a bucket (exclusive
    # on one host only: writers on several hosts need a shared folder with flock, see the operations page).
    lease_dir: str = ""


GATE_METRICS = ["hr@10", "ndcg@10", "recall@10"]


@dataclass
class FinetuneConfig:
    # `userformer finetune --dt D`: warm start from the published model on D's active users.
    epochs: int = field(default=2, metadata=_rng(1, 1000))
    lr: float = field(default=0.0003, metadata=_rng(1e-7, 1.0))
    # Share of the users NOT active on D replayed with them (against forgetting), sampled per day by hash.
    replay_fraction: float = field(default=0.1, metadata=_rng(0.0, 1.0))
    # Share of D's active users kept out of training to gate the candidate on (sampled per day by hash).
    holdout_fraction: float = field(default=0.2, metadata=_rng(0.01, 0.9))
    # Promote only if candidate >= published x (1 - this) on every gate metric; < 0 demands a gain.
    max_quality_drop: float = field(default=0.02, metadata=_rng(-10.0, 1.0))
    gate_metrics: list = field(default_factory=lambda: ["ndcg@10", "recall@10"], metadata=_subset(GATE_METRICS))
    # Fewer held-out users with positives on D than this: too noisy to judge, the candidate is not promoted.
    min_holdout_users: int = field(default=10, metadata=_rng(0, 10_000_000))


@dataclass
class InferConfig:
    # `userformer infer --dt D` / `publish --dt D` (jobs/steps/infer.py, jobs/steps/publish.py).
    # Users per forward pass.
    batch_size: int = field(default=512, metadata=_rng(1, 1_000_000))
    # Users read from user_sequences per chunk (bounds memory; one Parquet row group per chunk is written).
    chunk_users: int = field(default=8192, metadata=_rng(1, 10_000_000))
    # Labels kept per preference task in user_preference_scores (best first).
    top_k_labels: int = field(default=10, metadata=_rng(1, 10_000))
    # Shards `publish` expects when --shards is not given (users split by a stable hash of user_id).
    shards: int = field(default=1, metadata=_rng(1, 100_000))
    # auto = cuda when available, else cpu; bf16 autocast on CUDA (outputs are re-normalised in float32).
    device: str = field(default="auto", metadata=_rng(choices=["auto", "cpu", "cuda"]))
    bf16: bool = True
    # Where the users are embedded: "local" = in the step's own process (small installs, no Spark started);
    # "spark" = on the executors of cfg.spark.master (mapInArrow, the model loaded once per Python worker, on the
    # GPU Spark assigned to the task when the cluster schedules GPUs, docs/operations.md). Same output.
    engine: str = field(default="local", metadata=_rng(choices=["local", "spark"]))
    # Output checks before publishing: |norm - 1| of every embedding below this.
    norm_tolerance: float = field(default=1e-3, metadata=_rng(1e-7, 0.5))
    # Mean top-1 preference probability of every task within [lo, hi] (0..1): outside, a head has
    # collapsed (near 1) or says nothing (near 0).
    top1_mean_band: list = field(default_factory=lambda: [0.01, 0.99])


INDEX_KINDS = ["auto", "flat", "hnsw", "ivf"]


@dataclass
class IndexConfig:
    # `userformer index --dt D` (jobs/steps/index.py): FAISS index of item_embeddings, chosen by catalogue size.
    # auto: exact IndexFlatIP up to flat_max_items, HNSW up to hnsw_max_items, IVF above; or force one kind.
    # Measured here (tests/benchmarks/results/index-speed.md, d=64): at 100K HNSW (defaults below) reaches
    # recall@10 ~0.98 at 3x exact's batch q/s; at 1M it builds 24x slower than IVF and falls below 0.9 at
    # efSearch 128, while IVF (nprobe 32) keeps ~0.98: exact up to 100K, HNSW to 300K, IVF beyond.
    kind: str = field(default="auto", metadata=_rng(choices=INDEX_KINDS))
    flat_max_items: int = field(default=100_000, metadata=_rng(0, 1_000_000_000))
    hnsw_max_items: int = field(default=300_000, metadata=_rng(0, 1_000_000_000))
    # HNSW (IndexHNSWFlat, inner product): links per node, build and search beam widths.
    hnsw_m: int = field(default=32, metadata=_rng(4, 256))
    hnsw_ef_construction: int = field(default=80, metadata=_rng(8, 4096))
    hnsw_ef_search: int = field(default=128, metadata=_rng(8, 4096))
    # IVF (IndexIVFFlat, or IVF-PQ when ivf_pq_m > 0): lists (0 = about sqrt(items)), lists probed per query,
    # training sample (vectors; at least 39 per list are used), PQ sub-quantizers (must divide the dimension).
    ivf_nlist: int = field(default=0, metadata=_rng(0, 1_000_000))
    ivf_nprobe: int = field(default=32, metadata=_rng(1, 1_000_000))
    ivf_train_size: int = field(default=200_000, metadata=_rng(1_000, 100_000_000))
    ivf_pq_m: int = field(default=0, metadata=_rng(0, 1024))
    # Index check before the switch: recall@10 against exact search on this many queries (user embeddings of
    # the model version when there are any, else item vectors), at least min_recall_at_10.
    recall_sample: int = field(default=1000, metadata=_rng(10, 1_000_000))
    min_recall_at_10: float = field(default=0.9, metadata=_rng(0.0, 1.0))
    # Complete index versions kept under index_root/versions (the current one always among them).
    versions_kept: int = field(default=3, metadata=_rng(1, 1000))
    # FAISS threads (0 = FAISS's default: every core).
    threads: int = field(default=0, metadata=_rng(0, 1024))
    # `userformer candidates --dt D`: top-N items per user refreshed on D, searched in batches of this many users.
    candidates_n: int = field(default=100, metadata=_rng(1, 10_000))
    candidates_batch_users: int = field(default=8192, metadata=_rng(1, 10_000_000))
    # Leave out items the user has purchased (events up to D) from user_candidates.
    candidates_exclude_purchased: bool = False


@dataclass
class PipelineConfig:
    # The daily pipeline (jobs/flows/pipeline.py: `userformer run-day`, the Airflow DAGs in dags/).
    # A raw drop is ready when its folder holds this marker (written by the producer last); "" = any Parquet file.
    ready_marker: str = "_SUCCESS"
    # When nothing is published yet, the day's step trains a first model from scratch (as `userformer train
    # --dt D`) with at most this many epochs (0 = train.epochs); until the warehouse has events before the
    # validation window (train.eval_horizon_days), the model steps are skipped and nothing is published.
    bootstrap_epochs: int = field(default=0, metadata=_rng(0, 10_000))
    # Airflow: wait for the raw drop this long (poke every sensor_poke_s) before failing the run.
    sensor_timeout_s: int = field(default=6 * 3600, metadata=_rng(1, 7 * 86400))
    # Keep it well above a task's start-up time (~10 s) wherever sensors really wait: Airflow 3.3 can mark a
    # reschedule-mode sensor failed when its next poke is requeued before the end of the previous one was processed.
    sensor_poke_s: int = field(default=60, metadata=_rng(1, 86400))
    # Airflow: retries of a task on a transient error (never on a data-quality failure), with exponential
    # backoff from retry_delay_s.
    retries: int = field(default=2, metadata=_rng(0, 20))
    retry_delay_s: int = field(default=60, metadata=_rng(1, 86400))
    # Airflow pool of the inference shards (size = GPU workers) and its slot count when the pool is created.
    gpu_pool: str = "gpu"
    # Airflow pool of one slot for every task that writes (all DAGs): writing tasks of overlapping runs (a backfill
    # beside the schedule, a repair) queue for it instead of failing on the warehouse lease.
    writers_pool: str = "userformer_writers"
    gpu_pool_slots: int = field(default=1, metadata=_rng(1, 10_000))
    # Environment variables Airflow's tasks get besides the pipeline's own and what Python, Java, Spark,
    # torch==2.13.0 and object storage need (jobs/tools/orchestrator.py task_environment); the rest stays out.
    task_env: list = field(default_factory=list)


@dataclass
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    sequences: SequencesConfig = field(default_factory=SequencesConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    # ---- derived locations -------------------------------------------------
    @property
    def home(self) -> Path:
        return Path(self.paths.home).expanduser().resolve()

    def _sub(self, value: str, name: str) -> Path:
        return Path(value).expanduser().resolve() if value else self.home / name

    @property
    def raw_root(self) -> Path:
        return self._sub(self.paths.raw_root, "raw")

    @property
    def warehouse_root(self) -> Location:
        """The tables and the files kept beside them: a local folder, or an object-store URI (s3://bucket/wh)."""
        return location(self.paths.warehouse_root) if self.paths.warehouse_root else self.home / "warehouse"

    @property
    def models_root(self) -> Path:
        return self._sub(self.paths.models_root, "models")

    @property
    def index_root(self) -> Path:
        return self._sub(self.paths.index_root, "index")

    @property
    def reports_root(self) -> Path:
        return self._sub(self.paths.reports_root, "reports")

    def table_path(self, name: str) -> Location:
        """Folder of the Delta table `name` (see schemas.tables)."""
        return self.warehouse_root / name

    def raw_events_dir(self, dt) -> Path:
        return self.raw_root / "events" / f"dt={dt}"

    def raw_items_dir(self, dt) -> Path:
        return self.raw_root / "items" / f"dt={dt}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DEFAULT_HOME = "~/.local/share/userformer"
ENV_PREFIX = "USERFORMER__"


def _coerce(value, typ, where: str):
    """Convert an env-var string or TOML value to the field's declared type."""
    origin = typing.get_origin(typ) or typ
    if isinstance(value, str) and origin is not str:
        if origin is bool:
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{where}: expected a boolean, got {value!r}")
        if origin in (list, dict):
            try:
                value = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{where}: expected a TOML {origin.__name__}, got {value!r}") from exc
    try:
        if origin is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return float(value)
        if origin is int and isinstance(value, (int, str)) and not isinstance(value, bool):
            return int(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: expected {origin.__name__}, got {value!r}") from exc
    if not isinstance(value, origin):
        raise ConfigError(f"{where}: expected {origin.__name__}, got {type(value).__name__} {value!r}")
    return value


def _apply(section_obj, values: dict, where: str) -> None:
    hints = typing.get_type_hints(type(section_obj))
    names = {f.name: f for f in dataclasses.fields(section_obj)}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"{where}.{key}: unknown setting (known: {', '.join(sorted(names))})")
        setattr(section_obj, key, _coerce(value, hints[key], f"{where}.{key}"))


def _validate(cfg: Config) -> None:
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        for f in dataclasses.fields(obj):
            meta = f.metadata
            if not meta:
                continue
            v = getattr(obj, f.name)
            where = f"{section.name}.{f.name}"
            if meta.get("subset") is not None and not set(v) <= set(meta["subset"]):
                raise ConfigError(f"{where}={v!r}: allowed items are {meta['subset']}")
            if meta.get("choices") is not None and v not in meta["choices"]:
                raise ConfigError(f"{where}={v!r}: must be one of {meta['choices']}")
            if meta.get("lo") is not None and v < meta["lo"]:
                raise ConfigError(f"{where}={v!r}: must be >= {meta['lo']}")
            if meta.get("hi") is not None and v > meta["hi"]:
                raise ConfigError(f"{where}={v!r}: must be <= {meta['hi']}")
    if cfg.ingest.dedupe_lookback_days < cfg.ingest.max_late_days:
        raise ConfigError(
            f"ingest.dedupe_lookback_days={cfg.ingest.dedupe_lookback_days} is under ingest.max_late_days="
            f"{cfg.ingest.max_late_days}: a late event delivered again after the lookback would be accepted twice"
        )
    if cfg.storage.retention_days < cfg.storage.min_retention_days:
        raise ConfigError(
            f"storage.retention_days={cfg.storage.retention_days} is under storage.min_retention_days="
            f"{cfg.storage.min_retention_days}: reruns and repairs of the last days need their versions"
        )
    lo, hi = (cfg.quality.row_count_band + [None, None])[:2]
    if len(cfg.quality.row_count_band) != 2 or not (0 <= lo <= 1 <= hi):
        raise ConfigError(f"quality.row_count_band={cfg.quality.row_count_band!r}: must be [lo<=1, hi>=1]")
    if cfg.model.d_model % cfg.model.n_heads:
        raise ConfigError(f"model.d_model={cfg.model.d_model} must be divisible by model.n_heads={cfg.model.n_heads}")
    if not cfg.model.item_features:
        raise ConfigError("model.item_features: the item tower needs at least one feature")
    if cfg.train.loss == "sampled" and cfg.train.uniform_negatives + cfg.train.inbatch_negatives == 0:
        raise ConfigError("train: sampled softmax needs uniform_negatives or inbatch_negatives > 0")
    band = cfg.infer.top1_mean_band
    if len(band) != 2 or not all(isinstance(b, (int, float)) for b in band) or not (0 <= band[0] <= band[1] <= 1):
        raise ConfigError(f"infer.top1_mean_band={band!r}: must be [lo, hi] with 0 <= lo <= hi <= 1")
    if cfg.index.hnsw_max_items < cfg.index.flat_max_items:
        raise ConfigError(
            f"index.hnsw_max_items={cfg.index.hnsw_max_items} must be >= "
            f"index.flat_max_items={cfg.index.flat_max_items}"
        )
    overlap = set(cfg.ingest.item_event_types) & set(cfg.ingest.non_item_event_types)
    if overlap:
        raise ConfigError(f"ingest: event types both item and non-item: {sorted(overlap)}")


def load_config(path: str | os.PathLike | None = None, env: dict | None = None) -> Config:
    """Build the configuration from defaults, file, environment (see module doc)."""
    env = os.environ if env is None else env
    cfg = Config()
    path = path or env.get("USERFORMER_CONFIG")
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
        sections = {f.name for f in dataclasses.fields(cfg)}
        for name, values in data.items():
            if name not in sections or not isinstance(values, dict):
                raise ConfigError(f"{p}: unknown section [{name}] (known: {', '.join(sorted(sections))})")
            _apply(getattr(cfg, name), values, name)
    for key, value in sorted(env.items()):
        if not key.startswith(ENV_PREFIX):
            continue
        parts = key[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2 or not hasattr(cfg, parts[0]):
            raise ConfigError(f"{key}: expected USERFORMER__SECTION__KEY with a known section")
        _apply(getattr(cfg, parts[0]), {parts[1]: value}, parts[0])
    if env.get("USERFORMER_HOME"):
        cfg.paths.home = env["USERFORMER_HOME"]
    if not cfg.paths.home:
        cfg.paths.home = DEFAULT_HOME
    _validate(cfg)
    return cfg
