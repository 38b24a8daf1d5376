"""The model's configuration: the `[model]` and `[train]` sections of the one configuration (jobs/core/config.py
composes them with the pipeline's sections). Plain dataclasses, so the model needs nothing but torch and these.
Each field's metadata gives its allowed range or values, checked when the configuration is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field


def bounds(lo=None, hi=None, choices=None):
    """Field metadata: the allowed range (inclusive) or set of values."""
    return {"lo": lo, "hi": hi, "choices": choices}


# Feature names the user tower can read per event (models/features.py).
EVENT_FEATURES = [
    "item_id",
    "category_l1",
    "category_l2",
    "category_l3",
    "brand",
    "event_type",
    "surface",
    "duration",
    "time_gap",
    "time_ref",
    "position",
]
# Item attributes the item tower can read (models/item_tower.py).
ITEM_FEATURES = ["item_id", "category_l1", "category_l2", "category_l3", "brand"]
# Preference heads (MCM task-aware readout) the model can have.
HEAD_TASKS = ["category_l1", "category_l2", "category_l3", "brand", "event_type"]


def subset(allowed):
    """Field metadata: a list whose items must all be in `allowed`."""
    return {"lo": None, "hi": None, "choices": None, "subset": allowed}


@dataclass
class ModelConfig:
    # Width of every embedding and of the transformer. Defaults = the tuned
    # SASRec+SS setting on Amazon Beauty (eSASRec benchmark).
    d_model: int = field(default=64, metadata=bounds(8, 4096))
    n_layers: int = field(default=1, metadata=bounds(1, 48))
    n_heads: int = field(default=1, metadata=bounds(1, 64))
    # Hidden width of the feed-forward = ffn_mult x d_model (SASRec: 1).
    ffn_mult: int = field(default=1, metadata=bounds(1, 16))
    dropout: float = field(default=0.2, metadata=bounds(0.0, 0.9))
    # Events the encoder reads (the newest); sequences are LEFT-padded to it.
    max_len: int = field(default=50, metadata=bounds(2, 100_000))
    # Per-event inputs; id-only SASRec = ["item_id", "position"].
    event_features: list = field(default_factory=lambda: list(EVENT_FEATURES), metadata=subset(EVENT_FEATURES))
    # How feature vectors become one event vector: mean (MCM), id_plus_mean or concat (concatenate + project).
    # id_plus_mean: the item id's vector + the mean of the other features (content does not dilute identity;
    # an unseen item is its content), in events and in the item tower alike.
    pooling: str = field(default="id_plus_mean", metadata=bounds(choices=["mean", "id_plus_mean", "concat"]))
    # Item tower inputs; drop "item_id" for a purely content-based (inductive) tower.
    item_features: list = field(default_factory=lambda: list(ITEM_FEATURES), metadata=subset(ITEM_FEATURES))
    # Item tower MLP after pooling (False: pooled embeddings only, as SASRec). Off by default: on Beauty
    # the model without the item and output MLPs reached validation NDCG@10 0.065 against 0.061 (docs/measured.md).
    item_mlp: bool = False
    # Dropout on the pooled item vector while training (RecTools' SASRec drops item embeddings too);
    # on Beauty 0.2 gave test NDCG@10 0.0536 against 0.0518 without (docs/measured.md).
    item_dropout: float = field(default=0.2, metadata=bounds(0.0, 0.9))
    # The user tower's item/category/brand embeddings are the item tower's (SASRec's shared in/out table).
    tie_embeddings: bool = True
    # Residual MLP after the transformer (PinnerFormer), before the L2 normalisation (off by default, as item_mlp).
    output_mlp: bool = False
    # Log-scale buckets of time gaps (seconds) and the periods (s) of their sin/cos features.
    time_buckets: int = field(default=32, metadata=bounds(2, 256))
    time_periods_s: list = field(default_factory=lambda: [3600.0, 86400.0, 604800.0])
    # Preference heads (MCM task-aware attentional readout); [] = none.
    heads: list = field(default_factory=lambda: ["category_l1", "brand", "event_type"], metadata=subset(HEAD_TASKS))
    # Score = cosine / temperature; learned from this start (PinnerFormer).
    temperature: float = field(default=0.05, metadata=bounds(0.001, 10.0))
    learn_temperature: bool = True


@dataclass
class TrainConfig:
    # next_action: every position predicts the next item (SASRec); dense_all_action:
    # sampled positions predict a positive within the next K days (PinnerFormer).
    objective: str = field(default="next_action", metadata=bounds(choices=["next_action", "dense_all_action"]))
    # dense_all_action: horizon in days, or in events when the data has no real times.
    dense_horizon_days: float = field(default=14.0, metadata=bounds(0.01, 3650.0))
    dense_horizon_events: int = field(default=10, metadata=bounds(1, 10_000))
    # dense_all_action: positions sampled per sequence.
    dense_positions: int = field(default=8, metadata=bounds(1, 10_000))
    # sampled: softmax over the positive + negatives, logQ-corrected; full: over the whole catalogue.
    loss: str = field(default="sampled", metadata=bounds(choices=["sampled", "full"]))
    # Negatives per batch: uniformly random items and positives of other rows of the batch.
    # 2048 shared by the batch: on Beauty within ~7% of 256 per positive per epoch (first 4 epochs) at less
    # than half the time per epoch on these CPUs.
    uniform_negatives: int = field(default=2048, metadata=bounds(0, 1_000_000))
    inbatch_negatives: int = field(default=0, metadata=bounds(0, 1_000_000))
    # Own negatives for every positive (SASRec+SS, gSASRec) instead of one set shared by the batch.
    negatives_per_row: bool = False
    # Weight of each preference head's loss (added to the retrieval loss).
    head_weight: float = field(default=0.1, metadata=bounds(0.0, 100.0))
    lr: float = field(default=0.001, metadata=bounds(1e-6, 1.0))
    # AdamW's decoupled weight decay, on the dense parameters; with sparse_embeddings, not on the sparse tables.
    weight_decay: float = field(default=0.0, metadata=bounds(0.0, 10.0))
    # Sparse gradients for the item-id tables (the item tower's; the event featuriser's when not tied) and for
    # every other id table of the towers with at least sparse_min_rows rows (a large brand vocabulary), updated by
    # SparseAdam (lazy Adam: only the rows a step used move, and only their moments), AdamW for the rest. A step
    # then costs the rows it touches instead of the whole catalogue (tests/benchmarks/results/sparse-embeddings.*).
    # The sparse tables get no weight decay (as is usual for id embeddings). Off by default (every table dense, AdamW):
    # on Beauty its validation NDCG@10 trailed dense's at every epoch (docs/design.md).
    # Worthless with loss = "full", which touches every item row every step. Data-parallel: gloo only (CPUs); NCCL
    # cannot all-reduce sparse gradients, so several GPU processes refuse it.
    sparse_embeddings: bool = False
    sparse_min_rows: int = field(default=100_000, metadata=bounds(1, 2**62))
    batch_size: int = field(default=128, metadata=bounds(1, 1_000_000))
    epochs: int = field(default=200, metadata=bounds(1, 100_000))
    # Early stopping: evaluations without a better validation NDCG@10.
    patience: int = field(default=50, metadata=bounds(1, 100_000))
    eval_every: int = field(default=1, metadata=bounds(1, 100_000))
    grad_clip: float = field(default=1.0, metadata=bounds(0.0, 1e6))
    seed: int = field(default=42, metadata=bounds(0, 2**31 - 1))
    # auto = cuda when available, else cpu. The same code runs on both.
    device: str = field(default="auto", metadata=bounds(choices=["auto", "cpu", "cuda"]))
    # bf16 autocast on CUDA; cpu_bf16 also on CPU (fast on AVX512-BF16, less exact).
    bf16: bool = True
    cpu_bf16: bool = False
    # CPU threads for torch (the machines here have 2 cores).
    num_threads: int = field(default=2, metadata=bounds(1, 1024))
    # Data-parallel processes of `userformer train` / `retrain` (DDP started on this machine by torch.distributed's
    # elastic launcher: gloo on CPUs, nccl with one GPU each); each uses num_threads. Fine-tuning runs in one process.
    processes: int = field(default=1, metadata=bounds(1, 1024))
    # --- training from the warehouse (`userformer train` / `evaluate`, jobs/core/stream.py) ---
    # Users read from user_sequences per chunk (memory bound); chunk order and rows are shuffled per epoch.
    stream_chunk_users: int = field(default=4096, metadata=bounds(1, 10_000_000))
    # Time protocol: training uses events before T - this (T = end of the drop date); the window
    # [T - this, T) gives the validation (early stopping) and `evaluate` positives.
    eval_horizon_days: float = field(default=1.0, metadata=bounds(0.01, 365.0))
    # Users of the window kept for validation / evaluation (a stable hash sample beyond this).
    max_eval_users: int = field(default=5000, metadata=bounds(1, 10_000_000))
    # Share of the window's users (stable hash of user_id) used for early stopping; `evaluate` reports on the rest.
    valid_user_fraction: float = field(default=0.5, metadata=bounds(0.05, 0.95))
