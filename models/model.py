"""The customer model: item tower + event featuriser + user encoder + preference heads + temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from userformer.models.config import ModelConfig
from userformer.models.data import ItemCatalog
from userformer.models.encoder import UserEncoder
from userformer.models.features import EventFeaturizer, TimeFeatures
from userformer.models.heads import PreferenceHeads
from userformer.models.item_tower import ItemTower


class UserFormer(nn.Module):
    def __init__(self, cfg: ModelConfig, catalog: ItemCatalog):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.sizes = dict(catalog.sizes)
        self.item_tower = ItemTower(
            cfg.item_features,
            d,
            catalog,
            mlp=cfg.item_mlp,
            id_plus_mean=cfg.pooling == "id_plus_mean",
            dropout=cfg.item_dropout,
        )
        feats = EventFeaturizer(
            cfg.event_features,
            d,
            catalog.sizes,
            cfg.max_len,
            cfg.pooling,
            cfg.time_buckets,
            cfg.time_periods_s,
            shared=self.item_tower.embs if cfg.tie_embeddings else None,
        )
        time_ref = TimeFeatures(d, cfg.time_buckets, cfg.time_periods_s) if "time_ref" in cfg.event_features else None
        self.encoder = UserEncoder(
            feats, d, cfg.n_layers, cfg.n_heads, cfg.ffn_mult, cfg.dropout, cfg.output_mlp, time_ref
        )
        self.heads = PreferenceHeads(cfg.heads, d, catalog.sizes)
        self.log_temperature = nn.Parameter(
            torch.tensor(math.log(cfg.temperature)), requires_grad=cfg.learn_temperature
        )
        # The embedding of a user without events (a new sign-up): trained on every user's first event.
        self.cold = nn.Parameter(torch.randn(d) / math.sqrt(d))

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp_min(1e-3)

    def cold_embedding(self) -> torch.Tensor:
        """(d,) unit-norm embedding of a user with no events."""
        return F.normalize(self.cold, dim=-1)

    def user_embedding(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, d) unit-norm embedding at the newest event (last column: sequences are left-padded); users
        without events get the cold-start embedding."""
        h = self.encoder.hidden(batch)
        u = self.encoder.embed(h[:, -1], batch["ref_ts"] - batch["ts"][:, -1])
        return torch.where(batch["mask"].any(1, keepdim=True), u, self.cold_embedding().to(u.dtype))

    def preferences(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per head, (B, labels) preference distribution read from the whole sequence."""
        return self.heads.preferences(self.encoder.hidden(batch), batch["mask"])

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
