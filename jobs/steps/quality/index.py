"""The index gate: is an item index version (jobs/steps/index.py) fit to serve the published item vectors?

``userformer check index --dt D`` runs it on the CURRENT index (the pipeline's
``check index`` step); `userformer index` runs it on the version it has just
built, before anything points at it (``check(cfg, "index", D, {"version":
v})``), and makes that version current only when it passes. Same report and
exit code as the table checks (``reports_root/checks/index/dt=D.json`` +
``.html``). Against ``item_embeddings`` as it is now:

- recall@10 of the index against exact inner-product search >=
  ``index.min_recall_at_10``, on ``index.recall_sample`` queries: user
  embeddings of the index's model version when there are any, else item
  vectors (drawn with D as the seed: a rerun draws the same queries);
- one vector per item_embeddings row; the index's dimension = the item
  embeddings' (= the user embeddings' when there are users);
- finite, unit-norm item vectors (``infer.norm_tolerance``); one vector per
  item id (the FAISS ids are item_idx);
- item_embeddings holds the index's model version and no other.

Each is decided here with numpy and FAISS and reported as an `Outcome` (a
few numbers per index: GE would add seconds to every build, nothing else).
The recall measured (and its sample) are facts of the result, which the
build keeps in the version's manifest.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from userformer.jobs.steps import index as item_index
from userformer.jobs.steps.quality.suites import MissingData, Outcome, Plan

if TYPE_CHECKING:
    from userformer.jobs.steps.quality.source import Warehouse

RECALL_K = 10
USERS_KEY = "user_embeddings_version"  # the manifest's record of the users the recall queries came from


def recall_queries(
    cfg, src: Warehouse, model_version: str, items: np.ndarray, seed: int
) -> tuple[np.ndarray, str, int | None]:
    """Recall queries: a sample of user embeddings of the model version, else of item vectors. Returns (queries,
    where they came from, the user_embeddings Delta version or None)."""
    n_want = cfg.index.recall_sample
    rng = np.random.default_rng(seed)
    if src.exists("user_embeddings"):
        n = src.count_rows("user_embeddings")
        if n:
            # Oversample, keep the rows of this model version (usually all after a full re-embed).
            take = np.sort(rng.choice(n, min(n, 4 * n_want), replace=False))
            rows = src.take("user_embeddings", take, ["embedding", "model_version"])
            rows = rows.filter(pc.equal(rows["model_version"].cast(pa.string()), model_version))
            if rows.num_rows:
                pick = np.sort(rng.permutation(rows.num_rows)[:n_want])
                queries = item_index.vectors_of(rows["embedding"].take(pa.array(pick)))
                return queries, "user_embeddings", src.version("user_embeddings")
    take = np.sort(rng.choice(len(items), min(len(items), n_want), replace=False))
    return items[take], "item_embeddings", None


def _measured_on_these_inputs(man: dict, day: _dt.date, src: Warehouse) -> bool:
    """Did the build measure this index's recall on exactly what the gate would measure it on now: the same
    item_embeddings and user_embeddings versions and the same day (the queries' seed)?"""
    users = src.version("user_embeddings") if src.exists("user_embeddings") else None
    return (
        man.get("recall_at_10") is not None
        and man.get("as_of") == str(day)
        and man.get("item_embeddings_version") == src.version("item_embeddings")
        and USERS_KEY in man
        and man[USERS_KEY] == users
    )


def _norm_bad(vectors: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """(not finite, finite but not of unit norm) per vector."""
    finite = np.isfinite(vectors).all(axis=1)
    norms = np.linalg.norm(np.where(np.isfinite(vectors), vectors, 0.0), axis=1)
    return ~finite, finite & (np.abs(norms - 1.0) > tol)


def index(cfg, day: _dt.date, src: Warehouse, version: str | None = None) -> Plan:
    """The index gate of `version` (default: the CURRENT index) for drop date `dt` (module doc)."""
    checking_current = version is None
    if version is None:
        version = src.current_index()
        if version is None:
            raise MissingData(f"no item index is current under {cfg.index_root}: run `userformer index --dt {day}`")
    opened = src.item_index(version)
    man = opened.manifest
    model_version = man["model_version"]
    data = src.read("item_embeddings", ["item_id", "item_idx", "embedding", "model_version"])
    rows = data.num_rows
    vectors = item_index.vectors_of(data["embedding"])
    d = vectors.shape[1] if rows else None

    tr = time.perf_counter()
    if checking_current and _measured_on_these_inputs(man, day, src):
        # The build measured this index on the same item_embeddings and user_embeddings versions with the same
        # seed: the exact search (the gate's costly part) would give the same number again.
        recall, query_source, users_version = man["recall_at_10"], man["recall_query_source"], man[USERS_KEY]
        n_queries, user_d = man["recall_sample"], man.get("dimension") if query_source == "user_embeddings" else None
        measured = "at build, on the same inputs"
    else:
        queries, query_source, users_version = recall_queries(cfg, src, model_version, vectors, seed=day.toordinal())
        n_queries, user_d = len(queries), queries.shape[1] if query_source == "user_embeddings" else None
        if not rows or opened.index.d != d or (user_d is not None and user_d != d):
            recall = float("nan")  # nothing to compare, or vectors of another length than the index's
        else:
            ids = data["item_idx"].to_numpy().astype(np.int64)
            truth = item_index.exact_topk(vectors, ids, queries, RECALL_K)
            _, found = opened.index.search(queries, min(RECALL_K, rows))
            recall = item_index.recall_at_k(truth, found)
        measured = "now"
    recall_s = time.perf_counter() - tr

    ic, examples = cfg.index, cfg.quality.examples
    plan = Plan("index", day)
    plan.items.append(
        Outcome(
            "expect_index_recall_at_10_to_be_at_least",
            {"min_value": ic.min_recall_at_10, "queries": n_queries, "query_source": query_source},
            success=bool(recall >= ic.min_recall_at_10),
            examples=[round(recall, 4)],
            description="recall@10 of the index against exact inner-product search >= index.min_recall_at_10",
            scope="metrics",
        )
    )
    plan.items.append(
        Outcome(
            "expect_index_vector_count_to_equal",
            {"value": rows},
            success=opened.ntotal == rows,
            examples=[opened.ntotal],
            description="one vector per item_embeddings row",
            scope="metrics",
        )
    )
    plan.items.append(
        Outcome(
            "expect_index_dimension_to_equal",
            {"value": d, "user_embeddings": user_d},
            success=bool(opened.index.d == d and (user_d is None or user_d == d)),
            examples=[int(opened.index.d)],
            description="index dimension == item embedding length (== user embedding length when there are users)",
            scope="metrics",
        )
    )
    nonfinite, offnorm = _norm_bad(vectors, cfg.infer.norm_tolerance)
    item_ids = data["item_id"].to_numpy(zero_copy_only=False)
    for name, mask, desc in (
        ("expect_item_vectors_to_be_finite", nonfinite, "no NaN or inf in an item vector (examples: item_id)"),
        (
            "expect_item_vectors_to_be_unit_norm",
            offnorm,
            f"|norm - 1| <= infer.norm_tolerance ({cfg.infer.norm_tolerance:g}) (examples: item_id)",
        ),
    ):
        plan.items.append(
            Outcome(
                name,
                {"column": "embedding"},
                success=not mask.any(),
                unexpected_count=int(mask.sum()),
                element_count=rows,
                examples=[str(x) for x in item_ids[mask][:examples]],
                description=desc,
                scope="rows",
            )
        )
    uniq, counts = np.unique(data["item_idx"].to_numpy(), return_counts=True)
    dup = uniq[counts > 1]
    plan.items.append(
        Outcome(
            "expect_column_values_to_be_unique",
            {"column": "item_idx"},
            success=not len(dup),
            unexpected_count=int(counts[counts > 1].sum()),
            element_count=rows,
            examples=[int(x) for x in dup[:examples]],
            description="one vector per item id (FAISS ids = item_idx)",
            scope="rows",
        )
    )
    in_table = sorted(set(data["model_version"].cast(pa.string()).to_pylist()))
    plan.items.append(
        Outcome(
            "expect_index_model_version_to_match_item_embeddings",
            {"value": model_version},
            success=in_table == [model_version],
            examples=in_table,
            description="item_embeddings holds the index's model version and no other (else rebuild: "
            f"`userformer index --dt {day}`)",
            scope="metrics",
        )
    )
    plan.facts.update(
        version=version,
        model_version=model_version,
        items=man.get("items"),
        dimension=man.get("dimension"),
        kind=man.get("kind"),
        params=man.get("params"),
        item_embeddings_version=man.get("item_embeddings_version"),
        item_embeddings_rows=rows,
        recall_at_10=None if math.isnan(recall) else round(recall, 5),
        recall_sample=n_queries,
        recall_query_source=query_source,
        recall_seconds=round(recall_s, 3),
        recall_measured=measured,
        user_embeddings_version=users_version,
    )
    return plan
