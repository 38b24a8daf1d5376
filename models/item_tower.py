"""Item tower: item id + content (category levels, brand) -> (MLP) -> L2-normalised vector.

Content embeddings make the tower inductive: an item whose id the model never
saw (id 0 / out of range) still gets a vector from its category and brand.
The embedding tables double as the user tower's item/category/brand inputs
when ``model.tie_embeddings`` is on (SASRec shares its item table in and out).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from userformer.models.data import ITEM_ATTRS, ItemCatalog

# Config feature name -> sequence/catalog field name.
FIELD = {
    "item_id": "item",
    "category_l1": "category_l1",
    "category_l2": "category_l2",
    "category_l3": "category_l3",
    "brand": "brand",
    "event_type": "event_type",
    "surface": "surface",
}


def embedding(n: int, d: int) -> nn.Embedding:
    """Row 0 (none/unknown/padding) is a fixed zero vector, so an unknown attribute adds nothing."""
    e = nn.Embedding(max(n, 1), d, padding_idx=0)
    nn.init.normal_(e.weight, std=1.0 / math.sqrt(d))
    with torch.no_grad():
        e.weight[0].zero_()
    return e


def pool(parts: list[torch.Tensor], present: list[torch.Tensor], id_first: bool) -> torch.Tensor:
    """Mean of the feature vectors an event (or item) has; with `id_first`, parts[0] (the item id's vector)
    plus the mean of the others, so that shared content vectors do not drown the identity."""
    if id_first and len(parts) > 1:
        return parts[0] + pool(parts[1:], present[1:], False)
    cnt = torch.stack(present, -1).float().sum(-1, keepdim=True).clamp_min(1.0)
    return torch.stack(parts, 0).sum(0) / cnt


class ResidualMLP(nn.Module):
    """x + W2 GELU(W1 LN(x)): starts near the identity, so it can only refine the pooled vector."""

    def __init__(self, d: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Dropout(dropout), nn.Linear(d, d))

    def forward(self, x):
        return x + self.net(x)


class ItemTower(nn.Module):
    def __init__(
        self,
        features: list[str],
        d: int,
        catalog: ItemCatalog,
        mlp: bool = True,
        id_plus_mean: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.id_plus_mean = id_plus_mean
        self.drop = nn.Dropout(dropout)
        self.features = [f for f in features if f in ("item_id", *ITEM_ATTRS)]
        self.n_items = catalog.n_items
        self.embs = nn.ModuleDict({f: embedding(catalog.sizes[FIELD[f]], d) for f in self.features})
        # item id -> attribute ids, one column per ITEM_ATTRS entry (row 0 = padding).
        table = np.stack([catalog.attrs[a] for a in ITEM_ATTRS], axis=1).astype(np.int64)
        self.register_buffer("attrs", torch.from_numpy(table), persistent=True)
        self.mlp = ResidualMLP(d) if mlp else nn.Identity()

    def forward(self, item_idx: torch.Tensor, attrs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Vectors of `item_idx` (any shape) -> (..., d), unit norm. `attrs` overrides the catalogue's
        attributes (for items not in it); an id outside the table counts as unknown (0)."""
        known = (item_idx > 0) & (item_idx < self.attrs.shape[0])
        idx = torch.where(known, item_idx, torch.zeros_like(item_idx))
        parts, present = [], []
        for f, emb in self.embs.items():
            if f == "item_id":
                ids = idx.clamp_max(emb.num_embeddings - 1) * (idx < emb.num_embeddings)
            else:
                ids = attrs[f] if attrs is not None and f in attrs else self.attrs[idx, ITEM_ATTRS.index(f)]
                ids = torch.where(ids < emb.num_embeddings, ids, torch.zeros_like(ids))
            parts.append(emb(ids))
            present.append(ids > 0)
        # Mean over the attributes the item has (an unknown brand does not dilute the rest); or id + that mean.
        pooled = self.drop(pool(parts, present, self.id_plus_mean and "item_id" in self.embs))
        return F.normalize(self.mlp(pooled), dim=-1)

    def all_items(self) -> torch.Tensor:
        """(n_items + 1, d): every catalogue item; row 0 is padding and must be ignored by rankers."""
        return self.forward(torch.arange(self.n_items + 1, device=self.attrs.device))
