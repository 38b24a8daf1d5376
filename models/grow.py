"""Grow a trained model to a larger vocabulary: ids added since it was trained get rows, old rows stay exactly.

The vocabulary is append-only (an id never changes meaning), so a model
trained on day D is valid for day D+1 once every id-indexed table has rows for
the new ids. `grow` extends, in place:

- the item tower's embedding tables (item id, category levels, brand) and its
  ``attrs`` buffer (item -> attribute ids; taken whole from the new catalogue,
  so corrected attributes of old items apply too);
- the event featuriser's own tables (event type, surface; and item/category/brand
  when the towers are not tied): shared tables stay shared;
- every preference head's label table (and its per-label prior, if it has one).

New rows: zero for categories, brands, event types, surfaces and head labels
("knows nothing yet": an unknown value adds nothing to a mean-pooled event or
item and scores 0 in a head); a new label's prior is the lowest prior of the
known labels (it has not been seen yet). A new ITEM's id row makes the item
exactly its content before any fine-tuning: the mean of its (grown) attribute
embeddings under mean pooling (id and content are averaged), zero under
``id_plus_mean`` pooling (the id is added to the content mean). A new item
none of whose attribute values the model has learned (no metadata yet, or a
new category and brand) has no content to be: its id row is the mean of the
trained items' id rows (`cold_item_row`), never a zero vector.

No optimizer state crosses a growth: fine-tuning a grown model builds a new
optimizer (train.fit), whose moments are tables of the grown size, zero for
every row; under ``train.sparse_embeddings`` a row's moments (and the row)
move only in steps whose batch uses it, so a new item no batch has seen keeps
its content start. A grown table keeps its ``sparse`` flag.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from userformer.models.data import ITEM_ATTRS, ItemCatalog
from userformer.models.item_tower import FIELD


def _grown(emb: nn.Embedding, n: int) -> nn.Embedding:
    # A table with sparse gradients keeps them (train.fit sets the flag from its config anyway).
    new = nn.Embedding(
        n,
        emb.embedding_dim,
        padding_idx=emb.padding_idx,
        sparse=emb.sparse,
        device=emb.weight.device,
        dtype=emb.weight.dtype,
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[: emb.num_embeddings] = emb.weight
    new.weight.requires_grad_(emb.weight.requires_grad)
    return new


def cold_item_row(trained_rows: torch.Tensor) -> torch.Tensor:
    """The id row of a new item with no content the model has learned (no metadata, or only attribute values
    new since training): the mean of the trained items' id rows, a typical item, until fine-tuning places it.
    Without it such an item's vector is zero (no id, no content), which no ranking can use and the outputs'
    unit-norm check refuses."""
    if not len(trained_rows):
        return torch.zeros(trained_rows.shape[-1], dtype=trained_rows.dtype, device=trained_rows.device)
    return trained_rows.mean(0)


@torch.no_grad()
def grow(model, catalog: ItemCatalog) -> dict:
    """Extend `model` (a UserFormer) to `catalog`'s vocabulary sizes, in place. Returns {kind: [old, new]} of
    what grew ({} when nothing did). A catalogue smaller than the model in any kind is an error (ValueError):
    the vocabulary only grows, so it comes from another warehouse."""
    old_sizes = dict(model.sizes)
    new_sizes = dict(old_sizes)
    for k, n in catalog.sizes.items():
        if k in old_sizes and n < old_sizes[k]:
            raise ValueError(
                f"catalogue has {n} {k} ids but the model {old_sizes[k]}: the vocabulary only grows, so "
                "the catalogue is older than the model (use a later drop date) or from another warehouse"
            )
        new_sizes[k] = max(n, old_sizes.get(k, 1))
    grown = {k: [old_sizes.get(k, 1), n] for k, n in new_sizes.items() if n != old_sizes.get(k, 1)}
    tower = model.item_tower
    attrs = torch.from_numpy(np.stack([catalog.attrs[a] for a in ITEM_ATTRS], 1)).long()
    n_items = new_sizes["item"]
    if attrs.shape[0] < n_items:
        attrs = torch.cat([attrs, attrs.new_zeros(n_items - attrs.shape[0], attrs.shape[1])])
    old_attrs = tower.attrs
    if not grown and attrs.shape == old_attrs.shape and torch.equal(attrs.to(old_attrs.device), old_attrs):
        return {}

    replaced: dict[int, tuple[nn.Embedding, nn.Embedding]] = {}  # id(old) -> (old, new); old kept alive

    def regrow(emb: nn.Embedding, kind: str) -> nn.Embedding:
        if id(emb) not in replaced:
            want = new_sizes[kind]
            replaced[id(emb)] = (emb, _grown(emb, want) if want > emb.num_embeddings else emb)
        return replaced[id(emb)][1]

    for f in list(tower.embs):
        tower.embs[f] = regrow(tower.embs[f], FIELD[f])
    feats = model.encoder.features
    for f in list(feats.embs):
        feats.embs[f] = regrow(feats.embs[f], FIELD[f])  # a table shared with the tower maps to the same new one
    for task, r in model.heads.readouts.items():
        old_n = r.labels.num_embeddings
        want = max(new_sizes[FIELD[task]], 2)
        if want > old_n:
            r.labels = _grown(r.labels, want)
            bias = getattr(r, "bias", None)
            if isinstance(bias, nn.Parameter) and bias.dim() == 1 and bias.shape[0] == old_n:
                prior = bias.detach()[1:].min() if old_n > 1 else bias.new_zeros(())
                r.bias = nn.Parameter(
                    torch.cat([bias.detach(), prior.expand(want - old_n)]), requires_grad=bias.requires_grad
                )
    tower.attrs = attrs.to(old_attrs.device)
    tower.n_items = n_items - 1

    # The new items' id rows (item tower side; tied tables see them too): their content, or the fallback.
    if "item_id" in tower.embs:
        ids = tower.embs["item_id"]
        old_n = old_sizes["item"]
        if ids.num_embeddings > old_n:
            new = torch.arange(old_n, ids.num_embeddings, device=tower.attrs.device)
            total = torch.zeros(len(new), ids.embedding_dim, device=ids.weight.device, dtype=ids.weight.dtype)
            count = torch.zeros(len(new), 1, device=ids.weight.device, dtype=ids.weight.dtype)
            trained = torch.zeros(len(new), dtype=torch.bool, device=ids.weight.device)
            for f, emb in tower.embs.items():
                if f == "item_id":
                    continue
                a = tower.attrs[new, ITEM_ATTRS.index(f)]
                a = torch.where(a < emb.num_embeddings, a, torch.zeros_like(a))
                total += emb.weight[a]
                count += (a > 0).unsqueeze(-1).to(count.dtype)
                trained |= ((a > 0) & (a < old_sizes.get(FIELD[f], 1))).to(trained.device)
            own = torch.zeros_like(total) if getattr(tower, "id_plus_mean", False) else total / count.clamp_min(1.0)
            ids.weight[new] = torch.where(trained[:, None], own, cold_item_row(ids.weight[1:old_n]))
    model.sizes = new_sizes
    return grown
