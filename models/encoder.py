"""User tower: event vectors -> pre-norm causal transformer -> output MLP -> L2-normalised embedding.

Sequences are LEFT-padded (data.pad_batch): the newest event is column -1, so
the inference embedding is the last position. Attention of query i may use key
j only if j <= i (causal) and j is a real event; a padded query attends to
itself only, which keeps softmax finite (its output is ignored). Hence the
output at position t depends on events <= t only, and not on padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from userformer.models.features import EventFeaturizer, TimeFeatures
from userformer.models.item_tower import ResidualMLP


def attention_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) real-event mask -> (B, 1, L, L) boolean 'may attend' (causal, keys real, diagonal always)."""
    L = mask.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=mask.device).tril()
    eye = torch.eye(L, dtype=torch.bool, device=mask.device)
    return ((causal & mask[:, None, :]) | eye).unsqueeze(1)


class Block(nn.Module):
    """Pre-norm transformer block (LN -> attention -> residual; LN -> FFN -> residual)."""

    def __init__(self, d: int, heads: int, ffn_mult: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_mult * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_mult * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(B, L, d)))
        return x + self.drop(self.ffn(self.ln2(x)))


class UserEncoder(nn.Module):
    def __init__(
        self,
        featurizer: EventFeaturizer,
        d: int,
        layers: int,
        heads: int,
        ffn_mult: int,
        dropout: float,
        output_mlp: bool = True,
        time_ref: TimeFeatures | None = None,
    ):
        super().__init__()
        self.features = featurizer
        self.in_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(d, heads, ffn_mult, dropout) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        # Time from each position's event to the query time ("time since", PinnerFormer / BST's target
        # time): added after the transformer, so no event's vector depends on when it is read.
        self.time_ref = time_ref
        self.out = ResidualMLP(d, dropout) if output_mlp else nn.Identity()

    def hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, L, d) contextual states h_i (after the final LayerNorm): the heads read these."""
        x = self.in_drop(self.features(batch))
        allowed = attention_mask(batch["mask"])
        for blk in self.blocks:
            x = blk(x, allowed)
        return self.ln(x)

    def embed(self, h: torch.Tensor, gap_s: torch.Tensor | None = None) -> torch.Tensor:
        """States (..., d) -> unit-norm user embeddings. `gap_s` (...): seconds from each position's event to
        the time it is read at (training: the next event's time; inference: the reference time)."""
        if self.time_ref is not None and gap_s is not None:
            h = h + self.time_ref(gap_s)
        return F.normalize(self.out(h), dim=-1)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.hidden(batch)
        gap = (batch["ref_ts"][:, None] - batch["ts"]) * batch["mask"]
        return h, self.embed(h, gap)
