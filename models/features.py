"""MCM heterogeneous event featurisation: one vector per event from many features.

Every event is a set of features (item id, category levels, brand, event type
= MCM's token type, surface, log duration, time gap to the previous event).
Each feature gives a d-vector; ``mean`` pooling averages the ones the event
has (MCM: an unknown brand adds nothing instead of a zero), ``id_plus_mean``
adds the item id's vector to the mean of the others (content then cannot
dilute an item's identity; an unseen item is its content), ``concat``
concatenates them and projects back to d (lets the model weigh features).
A learned position embedding (counted from the newest event, so left padding
does not move it) is added after pooling. Any feature can be switched off:
id-only SASRec = ["item_id", "position"].

The time to the reference time ("time since the event", PinnerFormer) depends
on *when* the user is embedded, so it is not an event feature here: the
encoder adds it per query position (see encoder.py), which keeps training
causal. ``time_features`` below is shared by both.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from userformer.models.item_tower import FIELD, embedding, pool

CATEGORICAL = ("item_id", "category_l1", "category_l2", "category_l3", "brand", "event_type", "surface")


class TimeFeatures(nn.Module):
    """Gap in seconds -> embedding of its log2 bucket + projection of sin/cos over fixed periods (BST, PinnerFormer)."""

    def __init__(self, d: int, buckets: int, periods_s: list[float]):
        super().__init__()
        self.buckets = buckets
        self.bucket = nn.Embedding(buckets, d)
        nn.init.normal_(self.bucket.weight, std=1.0 / math.sqrt(d))
        self.register_buffer("periods", torch.tensor([float(p) for p in periods_s] or [86400.0]), persistent=False)
        self.periodic = nn.Linear(2 * len(self.periods), d)

    def forward(self, gap_s: torch.Tensor) -> torch.Tensor:
        gap = gap_s.clamp_min(0.0)
        b = torch.log2(1.0 + gap).floor().long().clamp_(0, self.buckets - 1)
        ang = (2 * math.pi) * gap.unsqueeze(-1) / self.periods
        return self.bucket(b) + self.periodic(torch.cat([ang.sin(), ang.cos()], -1).float())


class EventFeaturizer(nn.Module):
    def __init__(
        self,
        features: list[str],
        d: int,
        sizes: dict[str, int],
        max_len: int,
        pooling: str = "mean",
        time_buckets: int = 32,
        time_periods_s: list[float] | None = None,
        shared: nn.ModuleDict | None = None,
    ):
        super().__init__()
        self.features = list(features)
        self.pooling = pooling
        self.embs = nn.ModuleDict()
        for f in self.features:
            if f in CATEGORICAL:
                # Tied to the item tower's table when it has one: one vector per item in and out.
                self.embs[f] = shared[f] if shared is not None and f in shared else embedding(sizes[FIELD[f]], d)
        self.duration = nn.Linear(2, d) if "duration" in self.features else None
        self.time_gap = TimeFeatures(d, time_buckets, time_periods_s or []) if "time_gap" in self.features else None
        self.position = nn.Embedding(max_len, d) if "position" in self.features else None
        if self.position is not None:
            nn.init.normal_(self.position.weight, std=1.0 / math.sqrt(d))
        n_parts = len(self.embs) + (self.duration is not None) + (self.time_gap is not None)
        if n_parts == 0:
            raise ValueError("event_features: at least one event feature besides position is needed")
        self.project = nn.Linear(n_parts * d, d) if pooling == "concat" else None

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Batch of LEFT-padded (B, L) tensors (data.pad_batch) -> (B, L, d); padded rows are zero."""
        mask = batch["mask"]
        parts, present = [], []
        for f, emb in self.embs.items():
            ids = batch[FIELD[f]]
            parts.append(emb(ids.clamp(0, emb.num_embeddings - 1) * (ids < emb.num_embeddings)))
            present.append(ids > 0)
        if self.duration is not None:
            dur = batch["duration"]
            known = ~torch.isnan(dur)
            x = torch.stack([torch.log1p(torch.where(known, dur, 0.0).clamp_min(0.0)), known.float()], -1)
            parts.append(self.duration(x))
            present.append(known)
        if self.time_gap is not None:
            ts = batch["ts"]
            gap = torch.zeros_like(ts)
            gap[:, 1:] = (ts[:, 1:] - ts[:, :-1]) * mask[:, :-1]  # 0 for the first real event
            parts.append(self.time_gap(gap))
            present.append(mask)
        if self.pooling == "concat":
            x = self.project(torch.cat(parts, -1))
        else:
            x = pool(parts, present, self.pooling == "id_plus_mean" and "item_id" in self.embs)
        if self.position is not None:
            L = mask.shape[1]
            recency = torch.arange(L - 1, -1, -1, device=mask.device).clamp_max(self.position.num_embeddings - 1)
            x = x + self.position(recency)
        return x * mask.unsqueeze(-1)
