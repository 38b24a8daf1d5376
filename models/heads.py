"""MCM task-aware attentional readout: preference scores per task (next category, brand, event type, ...).

For label w of a task with embedding e_w and encoder states h_i of the events
the user has had:  a_{w,i} = softmax_i(e_w . h_i),  r_w = sum_i a_{w,i} h_i,
s(w) = r_w . e_w (+ a learned per-label prior b_w, so that a user with no
events gets the population's preferences).  Each label looks at the events relevant to it; a softmax
over the task's labels gives the user's preference scores. Label 0 (unknown)
is never predicted. Trained on random prefixes (MCM): the readout only ever
sees the past.

The attention of every label over every position is a (batch, labels,
length) tensor: a task with many labels (brands) is read out in chunks of
labels, each recomputed in the backward pass instead of kept (activation
checkpointing), so memory stays that of one chunk however many labels there
are. Each label's softmax is over positions, so the chunks are independent.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from userformer.models.item_tower import FIELD

# Attention scores one chunk of labels may hold (batch x labels x length): 16M floats, 64 MB.
READOUT_BLOCK = 1 << 24


def _read(h: torch.Tensor, mask: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """s(w) for the labels `e` (W, d): (B, W)."""
    att = torch.einsum("bld,wd->bwl", h, e)  # e_w . h_i
    a = torch.softmax(att.masked_fill(~mask[:, None, :], float("-inf")), -1).nan_to_num(0.0)
    # s(w) = r_w . e_w = sum_i a_wi (h_i . e_w) = sum_i a_wi att_wi: no (B, W, d) readout tensor needed.
    # A user with no events reads nothing (a = 0, s = 0).
    return (a * att).sum(-1)


class TaskReadout(nn.Module):
    def __init__(self, n_labels: int, d: int):
        super().__init__()
        self.labels = nn.Embedding(max(n_labels, 2), d)
        nn.init.normal_(self.labels.weight, std=1.0 / math.sqrt(d))
        # Per-label prior (not in MCM's formula): what a user without events gets, and a calibration offset.
        self.bias = nn.Parameter(torch.zeros(max(n_labels, 2)))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h (B, L, d), mask (B, L) of the positions to read -> scores (B, W); column 0 is -inf."""
        e = self.labels.weight  # (W, d)
        step = max(1, READOUT_BLOCK // max(h.shape[0] * h.shape[1], 1))
        if step >= e.shape[0]:
            s = _read(h, mask, e)
        else:
            # Training: each chunk is recomputed in backward instead of kept; inference needs no such care.
            read = partial(checkpoint, _read, use_reentrant=False) if torch.is_grad_enabled() else _read
            s = torch.cat([read(h, mask, e[lo : lo + step]) for lo in range(0, e.shape[0], step)], 1)
        s = s + self.bias
        s[:, 0] = float("-inf")
        return s


class PreferenceHeads(nn.Module):
    """One readout per task; tasks name a field of the next event (category_l1, brand, event_type, ...)."""

    def __init__(self, tasks: list[str], d: int, sizes: dict[str, int]):
        super().__init__()
        self.tasks = list(tasks)
        self.readouts = nn.ModuleDict({t: TaskReadout(sizes[FIELD[t]], d) for t in self.tasks})

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return {t: r(h, mask) for t, r in self.readouts.items()}

    def preferences(self, h: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Preference scores: per task, a distribution over its labels."""
        return {t: torch.softmax(s, -1) for t, s in self.forward(h, mask).items()}
