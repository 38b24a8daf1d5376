"""Retrieval losses (sampled softmax with logQ correction, full softmax), objectives, multi-task sum.

Sampled softmax scores the positive against a shared set of negatives per
batch: `uniform` random items (cheap, but too easy alone) mixed with
`inbatch` items drawn from the batch's positives (popularity-distributed: they
penalise popular items unless corrected). logQ correction subtracts from every
candidate's logit the log of its expected count in the sample,
    log Q(i) = log(n_inbatch * p(i) + n_uniform / N),
p(i) = the item's share of training events, so the sampled softmax estimates
the full one (Yi et al. 2019; PinnerFormer). Accidental hits (a negative equal
to the row's positive) are masked.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class NegativeSampler:
    """Draws the negatives and knows each item's log Q.

    `per_row=False`: one shared set of M negatives for the whole batch (cheap: one (N, M) product).
    `per_row=True`: every positive gets its own M negatives (SASRec+SS / gSASRec / RecTools): the same
    number of logits, but the batch pushes away ~N x M distinct draws instead of M, so far more of the
    catalogue gets a gradient per step; item vectors are computed once per distinct id (`item_vectors`).
    """

    def __init__(self, counts: np.ndarray, n_uniform: int, n_inbatch: int, seed: int = 0, per_row: bool = False):
        counts = np.asarray(counts, np.float64).copy()
        counts[0] = 0.0
        self.n_items = len(counts) - 1
        self.n_uniform, self.n_inbatch, self.per_row = n_uniform, n_inbatch, per_row
        p = counts / max(counts.sum(), 1.0)
        q = n_inbatch * p + n_uniform / self.n_items
        # Uniform negatives alone have the same Q for every item: the correction is a constant, a no-op.
        self.log_q = torch.from_numpy(np.log(np.maximum(q, 1e-30))).float() if n_inbatch else None
        self.gen = torch.Generator().manual_seed(seed)

    def sample(self, positives: torch.Tensor) -> torch.Tensor:
        """Negative ids: (M,) shared, or (N, M) per positive when `per_row`; uniform over 1..N plus items of
        random rows of `positives` (its valid ids: popularity-distributed in-batch negatives)."""
        shape = (len(positives),) if self.per_row else ()
        out = [torch.randint(1, self.n_items + 1, (*shape, self.n_uniform), generator=self.gen)]
        pos = positives[positives > 0].cpu()
        if self.n_inbatch and len(pos):
            out.append(pos[torch.randint(0, len(pos), (*shape, self.n_inbatch), generator=self.gen)])
        return torch.cat(out, -1)


def item_vectors(tower, ids: torch.Tensor) -> torch.Tensor:
    """Item tower outputs for `ids` of any shape, computing each distinct id once."""
    uniq, inv = torch.unique(ids, return_inverse=True)
    return tower(uniq)[inv]


def sampled_softmax(
    user: torch.Tensor,
    pos_vec: torch.Tensor,
    pos_ids: torch.Tensor,
    neg_vec: torch.Tensor,
    neg_ids: torch.Tensor,
    log_q: torch.Tensor | None,
    temperature: torch.Tensor,
) -> torch.Tensor:
    """Mean CE of the positive among [positive, negatives]. user/pos_vec (N, d); negatives shared, neg_vec
    (M, d) / neg_ids (M,), or per row, (N, M, d) / (N, M); log_q (n_items + 1,) or None (no correction)."""
    user = user / temperature  # (N, d), not the (N, M) logits: the cheap side of the product
    pos_logit = (user * pos_vec).sum(-1)
    if neg_ids.dim() == 1:
        neg_logit = user @ neg_vec.T
        neg_ids = neg_ids[None, :]
    else:
        neg_logit = torch.bmm(neg_vec, user[:, :, None])[..., 0]
    if log_q is not None:
        pos_logit = pos_logit - log_q[pos_ids]
        neg_logit = neg_logit - log_q[neg_ids]
    neg_logit = neg_logit.masked_fill(neg_ids == pos_ids[:, None], float("-inf"))
    logits = torch.cat([pos_logit[:, None], neg_logit], 1)
    return F.cross_entropy(logits.float(), torch.zeros(len(user), dtype=torch.long, device=user.device))


def full_softmax(
    user: torch.Tensor, all_items: torch.Tensor, pos_ids: torch.Tensor, temperature: torch.Tensor
) -> torch.Tensor:
    """Mean CE over the whole catalogue (row 0 = padding excluded): exact, for small catalogues."""
    logits = user @ all_items.T / temperature
    logits[:, 0] = float("-inf")
    return F.cross_entropy(logits.float(), pos_ids)


# -------------------------------------------------------------- objectives
def next_action_targets(batch: dict[str, torch.Tensor]) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SASRec: a batch padded to L+1 -> (input batch of L, targets (B, L), target mask (B, L), query_ts (B, L)).
    Position t of the input predicts event t+1; its query time is that event's time."""
    inp = {k: (v[:, :-1] if v.dim() == 2 else v) for k, v in batch.items()}
    tgt = batch["item"][:, 1:]
    ok = batch["mask"][:, 1:] & batch["mask"][:, :-1] & (tgt > 0)
    return inp, tgt, ok, batch["ts"][:, 1:]


def dense_all_action_targets(
    batch: dict[str, torch.Tensor], n_pos: int, horizon: float, by_time: bool, gen: torch.Generator
) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PinnerFormer: from `n_pos` random positions per sequence, one random positive among the events in
    the next `horizon` seconds (by_time) or the next `horizon` events. Returns the input batch of L, the
    chosen positions (B, P), their targets (B, P) and a validity mask (B, P)."""
    inp = {k: (v[:, :-1] if v.dim() == 2 else v) for k, v in batch.items()}
    mask, items, ts = batch["mask"], batch["item"], batch["ts"]
    B, L1 = mask.shape
    L = L1 - 1
    valid_src = mask[:, :-1] & mask[:, 1:]  # a position with at least one later event
    dev = mask.device
    # Drawn by `gen` on its own device (the same draws wherever the batch is), then moved to the batch's.
    r = torch.rand(B, n_pos, L, generator=gen, device=gen.device).to(dev).masked_fill(~valid_src[:, None, :], -1.0)
    pos = r.argmax(-1)  # (B, P)
    has = valid_src.gather(1, pos)
    j = torch.arange(L1, device=dev)[None, None, :]
    after = j > pos[..., None]
    if by_time:
        t0 = ts.gather(1, pos)
        near = (ts[:, None, :] - t0[..., None]) <= horizon
    else:
        near = j <= pos[..., None] + horizon
    cand = after & near & mask[:, None, :] & (items[:, None, :] > 0)
    pick = torch.rand(B, n_pos, L1, generator=gen, device=gen.device).to(dev).masked_fill(~cand, -1.0).argmax(-1)
    tgt = items.gather(1, pick)
    ok = has & cand.any(-1)
    return inp, pos, tgt, ok


def multitask_loss(retrieval: torch.Tensor, head_losses: dict[str, torch.Tensor], weight: float) -> torch.Tensor:
    """Retrieval loss + weight x each preference head's loss (MCM sums its task losses)."""
    return retrieval + weight * sum(head_losses.values(), torch.zeros((), device=retrieval.device))
