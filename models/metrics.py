"""Full-catalogue ranking metrics: every user is scored against ALL items (no sampled negatives).

Protocol: nothing is excluded from the ranking except the padding row 0, unless
the evaluation set says `exclude_history` (data.EvalSet): then the user's
history items cannot be recommended either. S3-Rec's code and the eSASRec
benchmark (whose published Beauty numbers docs/measured.md compares with) exclude
them; where users repeat items (views) they must stay. A target's rank is its
position in the score-sorted list (0 = top; ties in topk's order).

Only the best max(k, k_div) items of each user are kept, so a catalogue of any
size is scored in chunks of items (`top_items`): each chunk's best are merged
with the best so far, and no users x catalogue matrix is ever held.

- HR@10: share of users whose (single) target ranks < 10 (= Recall@10 with one target).
- NDCG@10: 1 / log2(rank + 2) when rank < 10, else 0, averaged over users.
- Recall@10 (several targets, time split): |top10 & positives| / |positives|, averaged.
- coverage@10: share of the catalogue that appears in at least one user's top 10.
- entropy@50: per user, Shannon entropy (nats) of the category distribution of the
  top 50 (items with an unknown category ignored), averaged over users.
"""

from __future__ import annotations

import numpy as np
import torch


def ndcg_from_ranks(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


def entropies(labels: np.ndarray) -> np.ndarray:
    """Per row of a (U, K) label matrix, the Shannon entropy (nats) of its label distribution (labels <= 0, unknown,
    ignored; a row without a known label has 0)."""
    labels = np.asarray(labels, np.int64)
    n_lab = int(labels.max(initial=0)) + 1
    counts = np.zeros((len(labels), n_lab))
    np.add.at(counts, (np.repeat(np.arange(len(labels)), labels.shape[1]), labels.ravel()), 1.0)
    counts[:, 0] = 0.0
    tot = counts.sum(1, keepdims=True)
    p = np.divide(counts, tot, out=np.zeros_like(counts), where=tot > 0)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(1)


# The most scores one chunk of `top_items` holds (users x items; 32M floats, 128 MB).
SCORE_BLOCK = 1 << 25


def top_items(
    users: torch.Tensor,
    items: torch.Tensor,
    kk: int,
    exclude: tuple[np.ndarray, np.ndarray] | None = None,
    block: int = SCORE_BLOCK,
) -> torch.Tensor:
    """Indices (U, kk) of the kk best-scoring rows of `items` for each user (dot product), best first. Row 0
    (padding) and the (user row, item) pairs of `exclude` score -inf. Items are scored in chunks of at most
    `block` / U rows; each chunk's top kk is merged with the running top kk (ties: topk's order)."""
    n, u = items.shape[0], users.shape[0]
    step = max(kk, block // max(u, 1))
    ex_rows = ex_items = None
    if exclude is not None:
        ex_rows = torch.as_tensor(exclude[0], dtype=torch.long, device=users.device)
        ex_items = torch.as_tensor(exclude[1], dtype=torch.long, device=users.device)
    best_v = best_i = None
    for lo in range(0, n, step):
        s = (users @ items[lo : lo + step].T).float()
        if lo == 0:
            s[:, 0] = float("-inf")  # padding is not an item
        if ex_items is not None:
            inside = (ex_items >= lo) & (ex_items < lo + s.shape[1])
            s[ex_rows[inside], ex_items[inside] - lo] = float("-inf")
        v, i = s.topk(min(kk, s.shape[1]), dim=1)
        i = i + lo
        if best_v is not None:
            v, at = torch.cat([best_v, v], 1).topk(min(kk, best_v.shape[1] + v.shape[1]), dim=1)
            i = torch.cat([best_i, i], 1).gather(1, at)
        best_v, best_i = v, i
    return best_i


class RankingAccumulator:
    """Collects per-chunk results of full-catalogue ranking, then summarises."""

    def __init__(self, n_items: int, item_category: np.ndarray | None, k: int = 10, k_div: int = 50):
        self.n_items, self.cat, self.k, self.k_div = n_items, item_category, k, k_div
        self.ranks, self.recalls, self.entropies = [], [], []
        self.seen = np.zeros(n_items + 1, bool)

    def add(
        self,
        scores: torch.Tensor,
        targets: torch.Tensor,
        target_sets: list | None = None,
        exclude: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """`scores` (U, n_items + 1) is modified in place (column 0 set to -inf). `exclude`: (rows, items)
        pairs that may not be recommended (a user's history, when the protocol excludes it)."""
        scores = scores.float()
        scores[:, 0] = float("-inf")  # padding is not an item
        if exclude is not None:
            scores[torch.as_tensor(exclude[0], dtype=torch.long), torch.as_tensor(exclude[1], dtype=torch.long)] = (
                float("-inf")
            )
        self.add_top(scores.topk(self.kk, dim=1).indices, targets, target_sets)

    def add_embeddings(
        self,
        users: torch.Tensor,
        items: torch.Tensor,
        targets: torch.Tensor,
        target_sets: list | None = None,
        exclude: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """As `add` with scores users @ items.T, computed in chunks of items (`top_items`)."""
        self.add_top(top_items(users.float(), items.float(), self.kk, exclude), targets, target_sets)

    def add_shared(
        self,
        scores: torch.Tensor,
        targets: torch.Tensor,
        target_sets: list | None = None,
        exclude: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """As `add` when every user has the same scores (n_items + 1,), e.g. popularity: scored as a one-dimensional
        dot product (1 x score), in chunks of items, so the row is never repeated per user."""
        self.add_embeddings(torch.ones(len(targets), 1), scores[:, None], targets, target_sets, exclude)

    @property
    def kk(self) -> int:
        """How many of each user's best items the metrics need."""
        return min(max(self.k, self.k_div), self.n_items)

    def add_top(self, top_t: torch.Tensor, targets: torch.Tensor, target_sets: list | None = None) -> None:
        """Each user's best `kk` items (U, kk), best first."""
        kk = top_t.shape[1]
        # Rank within the top kk (= kk when the target is further down): all that @k metrics need, and
        # much cheaper than comparing every score. Ties are ordered by topk, as any ranker would.
        hit = top_t == targets[:, None].to(top_t.device)
        self.ranks.append(torch.where(hit.any(1), hit.float().argmax(1), kk).cpu().numpy())
        top = top_t.cpu().numpy()
        self.seen[top[:, : self.k].ravel()] = True
        if self.cat is not None:
            self.entropies.append(entropies(self.cat[top[:, : self.k_div]]))
        if target_sets is not None:
            for row, pos in zip(top[:, : self.k], target_sets):
                self.recalls.append(len(np.intersect1d(row, pos)) / max(len(pos), 1))

    def result(self) -> dict:
        r = np.concatenate(self.ranks) if self.ranks else np.zeros(0)
        k = self.k
        out = {
            "users": len(r),
            f"hr@{k}": float((r < k).mean()) if len(r) else 0.0,
            f"ndcg@{k}": float(ndcg_from_ranks(r, k).mean()) if len(r) else 0.0,
            f"coverage@{k}": float(self.seen[1:].sum() / max(self.n_items, 1)),
            f"entropy@{self.k_div}": float(np.concatenate(self.entropies).mean()) if self.entropies else 0.0,
        }
        if self.recalls:
            out[f"recall@{k}"] = float(np.mean(self.recalls))
        return out


class HeadAccuracy:
    """Accuracy of each preference head: does the head's top label (top 5) equal the label of the user's next
    event (the target's category / brand / event type)? Targets with an unknown label (0) are skipped.
    `majority@1` is the share of the most frequent label among the targets: what a constant guess gets."""

    def __init__(self):
        self.hits1, self.hits5, self.labels = {}, {}, {}

    def add(self, task: str, scores: torch.Tensor, labels: torch.Tensor) -> None:
        labels = labels.to(scores.device)
        ok = labels > 0
        if not ok.any():
            return
        top = scores[ok].topk(min(5, scores.shape[1]), dim=1).indices
        lab = labels[ok]
        self.hits1.setdefault(task, []).append((top[:, 0] == lab).cpu().numpy())
        self.hits5.setdefault(task, []).append((top == lab[:, None]).any(1).cpu().numpy())
        self.labels.setdefault(task, []).append(lab.cpu().numpy())

    def result(self) -> dict:
        out = {}
        for task in self.hits1:
            lab = np.concatenate(self.labels[task])
            out[task] = {
                "users": int(len(lab)),
                "acc@1": float(np.concatenate(self.hits1[task]).mean()),
                "acc@5": float(np.concatenate(self.hits5[task]).mean()),
                "majority@1": float(np.bincount(lab).max() / len(lab)),
            }
        return out
