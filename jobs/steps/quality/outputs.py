"""The output checks: the staged inference of drop D (jobs/steps/infer.py), before `userformer publish` commits it.

``userformer check outputs --dt D [--shards n]`` runs them (same HTML/JSON
report and exit code as the table checks); `publish` runs them first and
publishes nothing when one fails. What they hold, for the published model's
staged shards 0..n-1 of D:

- every shard is there (else the check fails naming the missing ones and the
  command that makes them) and all were inferred from the same inputs;
- the staged files have the published tables' column types;
- user and item embeddings: no NaN/inf, unit norm (``|norm - 1| <
  infer.norm_tolerance``), dimension = the model's d_model, the model version
  and drop date of the run; one row per user over all shards, each user in the
  shard its hash names;
- row counts: per shard and in total, the users to refresh counted again from
  ``user_sequences`` at the version the shards read (``updated_dt = D``, or
  every user for a full re-embed); items = the catalogue as of D;
- preference scores: one row per user and head, label ids / labels / scores
  parallel with the run's top-K per task, probabilities finite and in [0, 1],
  best first, summing to at most 1 per task, and the mean top-1 probability of
  every task within ``infer.top1_mean_band``.

Array properties are computed with numpy, batch by batch, and validated as GE
expectations on frames of at most ``quality.batch_rows`` rows (a `Stream`):
no more than that many rows of any staged table are held at once, never all
the users or scores of a full re-embed. Uniqueness (user_id over all shards,
(user_id, task), item_idx) and the preference rows per user are judged on hash
partitions of the key (jobs/steps/quality/streams.py): about
``quality.ids_per_pass`` keys per part, one pass over the key columns per part
(for a user's preference rows: one pass over their user_id column per part of
the users). Row counts come from the files' Parquet footers, the users to
refresh are counted per shard batch by batch, and the mean top-1 probability is
summed in one pass over the scores before the rows are judged.
"""

from __future__ import annotations

import datetime as _dt
import functools
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from userformer.jobs.steps import infer
from userformer.jobs.steps.quality.streams import bucket, partitions, rebatch
from userformer.jobs.steps.quality.suites import IDS, POSITION, Batch, MissingData, Outcome, Plan, Stream, type_check

if TYPE_CHECKING:
    from userformer.jobs.steps.quality.source import Warehouse
from userformer.schemas import tables

SUM_TOLERANCE = 1e-4  # float32 rounding of probabilities that sum to 1


def _flat(arr) -> tuple[np.ndarray, np.ndarray]:
    """(row lengths, flat float64 values with null as NaN) of a list column."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    lens = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(arr).cast(pa.float64()).to_numpy(zero_copy_only=False)
    return lens, flat


def vector_stats(arr) -> dict[str, np.ndarray]:
    """Per row of a list<float> column: dim, norm, finite (no NaN/inf/null element)."""
    lens, flat = _flat(arr)
    n = len(lens)
    row = np.repeat(np.arange(n), lens)
    with np.errstate(invalid="ignore", over="ignore"):
        norm = np.sqrt(np.bincount(row, weights=flat * flat, minlength=n))
    bad = np.bincount(row, weights=~np.isfinite(flat), minlength=n) > 0
    return {"dim": lens, "norm": norm, "finite": ~bad & (lens > 0)}


def score_stats(scores, label_idx, labels) -> dict[str, np.ndarray]:
    """Per preference row: k, parallel arrays, finite, min, max, sum, top1, descending."""
    lens, flat = _flat(scores)
    n = len(lens)
    row = np.repeat(np.arange(n), lens)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    has = lens > 0
    out = {
        "k": lens,
        "parallel": (pc.fill_null(pc.list_value_length(label_idx), -1).to_numpy(zero_copy_only=False) == lens)
        & (pc.fill_null(pc.list_value_length(labels), -1).to_numpy(zero_copy_only=False) == lens),
    }
    out["finite"] = (np.bincount(row, weights=~np.isfinite(flat), minlength=n) == 0) & has
    mn, mx, top = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    if len(flat):
        mn[has] = np.minimum.reduceat(flat, starts[has])
        mx[has] = np.maximum.reduceat(flat, starts[has])
        top[has] = flat[starts[has]]
    with np.errstate(invalid="ignore"):
        out["sum"] = np.bincount(row, weights=flat, minlength=n)
        up = (flat[1:] > flat[:-1]) & (row[1:] == row[:-1])
    desc = np.ones(n, bool)
    desc[row[1:][up]] = False
    out.update(min=mn, max=mx, top1=top, descending=desc)
    return out


def _top1_means(src: Warehouse, manifests: list[dict]) -> dict[str, float]:
    """The mean top-1 probability of each task over the staged preference rows of all shards (NaN: no row of the
    task has a score), summed batch by batch."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for m in manifests:
        for t in src.staged_batches(src.staged_parts(m, "user_preference_scores"), ["task", "scores"]):
            lens, flat = _flat(t["scores"])
            top = np.full(len(lens), np.nan)
            has = lens > 0
            top[has] = flat[(np.cumsum(lens) - lens)[has]]
            task = np.asarray(t["task"].to_pylist(), object)
            for x in dict.fromkeys(task[pc.is_valid(t["task"]).to_numpy(zero_copy_only=False)]):
                v = top[task == x]
                v = v[~np.isnan(v)]
                sums[str(x)] = sums.get(str(x), 0.0) + float(v.sum())
                counts[str(x)] = counts.get(str(x), 0) + len(v)
    return {x: sums[x] / counts[x] if counts[x] else float("nan") for x in sums}


def _ids_counted(tables, hold: int) -> pa.Table:
    """(user_id, n): how many rows of `tables` each user id has, merged every `hold` rows so that no more are
    held than the distinct ids plus `hold`."""
    acc, pending, held = None, [], 0

    def counted(t: pa.Table, agg: tuple[str, str]) -> pa.Table:
        g = t.group_by("user_id").aggregate([agg])
        return pa.table({"user_id": g["user_id"], "n": g[f"{agg[0]}_{agg[1]}"]})

    def merge():
        parts = ([acc] if acc is not None else []) + [counted(p, ("user_id", "count")) for p in pending]
        if not parts:
            return None
        return counted(pa.concat_tables(parts, promote_options="permissive"), ("n", "sum"))

    for t in tables:
        pending.append(t.select(["user_id"]))
        held += t.num_rows
        if held >= hold:
            acc, pending, held = merge(), [], 0
    acc = merge()
    return acc if acc is not None else pa.table({"user_id": pa.array([], pa.string()), "n": pa.array([], pa.int64())})


def outputs(cfg, day: _dt.date, src: Warehouse, shards: int | None = None) -> Plan:
    """The staged inference outputs of drop date `dt` for the published model (module doc)."""
    import pandas as pd
    from great_expectations import expectations as E

    shards = shards or cfg.infer.shards
    version = src.published_model()
    staged = src.staged_shards(day, version, shards)
    manifests = [m for m in staged if m is not None]
    missing = [i for i, m in enumerate(staged) if m is None]
    if missing:
        raise MissingData(
            f"no staged output of model {version} for shard(s) "
            f"{', '.join(infer.shard_name(i, shards) for i in missing)} "
            f"under {src.staged_dir(day, version)}: run "
            + "; ".join(f"`userformer infer --dt {day} --shard {i} --shards {shards}`" for i in missing[:3])
        )
    try:
        d_model = int(src.model_config(version)["d_model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise MissingData(f"cannot read the model configuration of {version}: {exc}") from None

    plan = Plan("outputs", day)
    first = manifests[0]
    keys = ("dt", "model_version", "full", "inputs", "tasks", "top_k_labels", "labels_per_task", "selection")
    diffs = [f"shard {m['shard']}: {k}" for m in manifests[1:] for k in keys if m.get(k) != first.get(k)]
    plan.items.append(
        Outcome(
            "expect_shards_to_share_their_inputs",
            {"shards": shards},
            success=not diffs,
            unexpected_count=len(diffs),
            element_count=len(manifests),
            examples=diffs,
            description="every shard ran the same model in the same mode on the same Delta versions",
            scope="shards",
        )
    )
    plan.facts.update(
        model_version=version,
        shards=shards,
        full=first["full"],
        reason=first.get("reason"),
        inputs={t: v["version"] for t, v in first["inputs"].items()},
        staged=src.staged_dir(day, version),
        d_model=d_model,
    )

    # Column types of every staged file.
    readable = {}
    for table, schema in (
        ("user_embeddings", tables.USER_EMBEDDINGS),
        ("user_preference_scores", tables.USER_PREFERENCE_SCORES),
        ("item_embeddings", tables.ITEM_EMBEDDINGS),
    ):
        problems, bad = [], set()
        for m in manifests if table != "item_embeddings" else manifests[:1]:
            for file in src.staged_parts(m, table):
                name = file.removeprefix(m["path"]).lstrip("/")
                try:
                    actual = src.staged_schema(file)
                except (OSError, pa.ArrowInvalid) as exc:
                    problems.append(f"shard {m['shard']}: {name} unreadable ({exc})")
                    bad.add("*")
                    continue
                o, b = type_check(table, schema, actual)
                problems += [f"shard {m['shard']}: {name}: {p}" for p in o.examples]
                bad |= b
        readable[table] = not bad
        plan.items.append(
            Outcome(
                "expect_column_types_to_match_schema",
                {"schema": table},
                success=not problems,
                unexpected_count=len(problems),
                element_count=len(schema),
                examples=problems,
                description=f"staged {table} files have the column types of schemas.tables",
                scope="schema",
            )
        )

    # Users to refresh, counted again from the table the shards read.
    inp = first["inputs"]["user_sequences"]
    filt = None if first["full"] else pc.field("updated_dt") == pa.scalar(day, pa.date32())
    selected = first.get("selection")
    if selected:  # a repair's explicit users (jobs/steps/infer.py): those of them with a row
        sel = src.staged_table(f"{first['path']}/{selected['file']}", ["user_id"])["user_id"]
        filt = pc.field("user_id").isin(sel.combine_chunks().cast(pa.string()))
    expected = np.zeros(shards, np.int64)
    for t in src.scan("user_sequences", ["user_id"], filter=filt, version=inp["version"]):
        if t.num_rows:
            expected += np.bincount(infer.shard_of(t["user_id"].to_pylist(), shards), minlength=shards)
    items_in = first["inputs"]["items"]
    catalogue = src.count_rows(
        "items", filter=pc.field("first_dt") <= pa.scalar(day, pa.date32()), version=items_in["version"]
    )

    # Row counts from the files' footers; the mean top-1 probability per task, summed batch by batch.
    n_tasks = len(first["tasks"])
    ks = first.get("labels_per_task") or {}
    q = cfg.quality
    shard_rows, n_users, n_pref = [], 0, 0
    if readable["user_embeddings"]:
        for m in manifests:
            n = src.staged_rows(src.staged_parts(m, "user_embeddings"))
            shard_rows.append(
                {"shard": m["shard"], "rows": n, "expected": int(expected[m["shard"]]), "manifest_rows": m["users"]}
            )
            n_users += n
    top1: dict[str, float] = {}
    if readable["user_preference_scores"]:
        n_pref = sum(src.staged_rows(src.staged_parts(m, "user_preference_scores")) for m in manifests)
        top1 = _top1_means(src, manifests)
    tol = cfg.infer.norm_tolerance

    def users_read():
        for m in manifests:
            yield from src.staged_batches(src.staged_parts(m, "user_embeddings"), ["user_id"])

    def prefs_read(columns: list[str]):
        for m in manifests:
            yield from src.staged_batches(src.staged_parts(m, "user_preference_scores"), columns)

    def users_by_id():
        """Hash partitions of the user ids of all shards, each with its users' preference rows counted (the
        preference rows of the same partition, read again per partition)."""
        import pandas as pd

        for mod, res, part in partitions(users_read, ["user_id"], n_users, q.ids_per_pass, position=POSITION):
            df = part.to_pandas()
            counts = _ids_counted(
                (
                    t.filter(pa.array(bucket(t, ["user_id"], mod) == res)) if mod > 1 else t
                    for t in (t.filter(t["user_id"].is_valid()) for t in prefs_read(["user_id"]))
                ),
                q.ids_per_pass,
            )
            tasks = pd.Series(counts["n"].to_numpy(), index=counts["user_id"].to_numpy(zero_copy_only=False))
            df["tasks"] = df["user_id"].map(tasks).fillna(0).astype(int)
            yield df

    def user_rows():
        def derived():
            for m in manifests:
                for t in src.staged_batches(
                    src.staged_parts(m, "user_embeddings"), ["user_id", "embedding", "model_version", "as_of"]
                ):
                    ids = t["user_id"].to_pylist()
                    yield pa.table(
                        {
                            "user_id": t["user_id"],
                            "in_shard": infer.shard_of(ids, shards) == m["shard"],
                            "model_version": t["model_version"],
                            "as_of_is_dt": pc.fill_null(pc.equal(t["as_of"], pa.scalar(day, pa.date32())), False),
                            **vector_stats(t["embedding"]),
                        }
                    )

        for t in rebatch(derived(), q.batch_rows):
            yield t.to_pandas()

    if n_users:
        plan.items.append(
            Stream(
                "users",
                users_by_id(),
                [
                    E.ExpectColumnValuesToNotBeNull(column="user_id", description="every row has a user"),
                    E.ExpectColumnValuesToBeUnique(column="user_id", description="one row per user, over all shards"),
                    E.ExpectColumnValuesToBeInSet(
                        column="tasks",
                        value_set=[n_tasks],
                        meta=IDS,
                        description=f"one preference row per head ({n_tasks}) (examples: user_id)",
                    ),
                ],
                id_column="user_id",
                position=POSITION,
            )
        )
        plan.items.append(
            Stream(
                "users",
                user_rows(),
                [
                    E.ExpectColumnValuesToBeInSet(
                        column="in_shard",
                        value_set=[True],
                        meta=IDS,
                        description="each user is in the shard its hash names (examples: user_id)",
                    ),
                    E.ExpectColumnValuesToBeInSet(
                        column="finite",
                        value_set=[True],
                        meta=IDS,
                        description="no NaN/inf in the embedding (examples: user_id)",
                    ),
                    E.ExpectColumnValuesToBeBetween(
                        column="norm",
                        min_value=1 - tol,
                        max_value=1 + tol,
                        description=f"unit norm: |norm - 1| <= infer.norm_tolerance ({tol:g})",
                    ),
                    E.ExpectColumnValuesToBeInSet(
                        column="dim", value_set=[d_model], description=f"dimension = the model's d_model ({d_model})"
                    ),
                    E.ExpectColumnValuesToBeInSet(
                        column="model_version", value_set=[version], description="computed by the published model"
                    ),
                    E.ExpectColumnValuesToBeInSet(
                        column="as_of_is_dt",
                        value_set=[True],
                        meta=IDS,
                        description=f"as_of = {day} (examples: user_id)",
                    ),
                ],
                id_column="user_id",
            )
        )
    else:
        plan.items.append(
            Outcome(
                "expect_column_values_to_be_between",
                {"column": "norm"},
                success=True,
                skipped=True,
                description="user embeddings: finite, unit norm, dimension, one row per user",
                note=f"no user to refresh on {day}",
                scope="users",
            )
        )

    def prefs_by_key():
        key = ["user_id", "task"]
        # GE compares (user_id, task) rows with nulls too: a null hashes as a value, not spread by position.
        read = functools.partial(prefs_read, key)
        for _, _, part in partitions(read, key, n_pref, q.ids_per_pass, spread_nulls=False, position=POSITION):
            yield part.to_pandas()

    def pref_rows():
        def derived():
            for t in prefs_read(["user_id", "task", "label_idx", "labels", "scores", "model_version"]):
                st = score_stats(t["scores"], t["label_idx"], t["labels"])
                task = np.asarray(t["task"].to_pylist(), object)
                k_want = np.array([ks.get(x, -1) for x in task], np.int64)
                st.pop("top1")
                yield pa.table(
                    {
                        "user_id": t["user_id"],
                        "task": t["task"],
                        "model_version": t["model_version"],
                        "k_is_top_k": st.pop("k") == k_want,
                        **st,
                    }
                )

        for t in rebatch(derived(), q.batch_rows):
            yield t.to_pandas()

    band = cfg.infer.top1_mean_band
    if n_pref:
        plan.items.append(
            Stream(
                "preferences",
                prefs_by_key(),
                [
                    E.ExpectCompoundColumnsToBeUnique(
                        column_list=["user_id", "task"], description="one row per user and head"
                    ),
                ],
                position=POSITION,
            )
        )
        plan.items.append(
            Stream(
                "preferences",
                pref_rows(),
                [
                    E.ExpectColumnValuesToBeInSet(
                        column="task", value_set=list(first["tasks"]), description="a head of the model"
                    ),
                    E.ExpectColumnValuesToBeInSet(
                        column="parallel",
                        value_set=[True],
                        meta=IDS,
                        description="label_idx, labels and scores have one element per label (examples: user_id)",
                    ),
                    E.ExpectColumnValuesToBeInSet(
                        column="k_is_top_k",
                        value_set=[True],
                        meta=IDS,
                        description="min(infer.top_k_labels, labels of the task) labels (examples: user_id)",
                    ),
                    E.ExpectColumnValuesToBeInSet(
                        column="finite",
                        value_set=[True],
                        meta=IDS,
                        description="no NaN/inf in the scores (examples: user_id)",
                    ),
                    E.ExpectColumnValuesToBeBetween(column="min", min_value=0.0, description="probabilities >= 0"),
                    E.ExpectColumnValuesToBeBetween(column="max", max_value=1.0, description="probabilities <= 1"),
                    E.ExpectColumnValuesToBeBetween(
                        column="sum",
                        max_value=1.0 + SUM_TOLERANCE,
                        description=f"the top-K of a task sum to <= 1 (+{SUM_TOLERANCE:g})",
                    ),
                    E.ExpectColumnValuesToBeInSet(
                        column="descending",
                        value_set=[True],
                        meta=IDS,
                        description="labels best first (examples: user_id)",
                    ),
                    E.ExpectColumnValuesToBeInSet(
                        column="model_version", value_set=[version], description="computed by the published model"
                    ),
                ],
                id_column="user_id",
            )
        )

    # Items (shard 0).
    items_rows = 0
    if readable["item_embeddings"]:
        item_parts = src.staged_parts(first, "item_embeddings")
        items_rows = src.staged_rows(item_parts)

        def items_by_idx():
            read = functools.partial(src.staged_batches, item_parts, ["item_idx"])
            for _, _, part in partitions(read, ["item_idx"], items_rows, q.ids_per_pass, position=POSITION):
                yield part.to_pandas()

        def item_rows():
            def derived():
                for t in src.staged_batches(item_parts, ["item_idx", "embedding", "model_version"]):
                    yield pa.table(
                        {
                            "item_idx": t["item_idx"],
                            "model_version": t["model_version"],
                            **vector_stats(t["embedding"]),
                        }
                    )

            for t in rebatch(derived(), q.batch_rows):
                yield t.to_pandas()

        if items_rows:
            plan.items.append(
                Stream(
                    "items",
                    items_by_idx(),
                    [E.ExpectColumnValuesToBeUnique(column="item_idx", description="one row per item")],
                    position=POSITION,
                )
            )
            plan.items.append(
                Stream(
                    "items",
                    item_rows(),
                    [
                        E.ExpectColumnValuesToBeInSet(
                            column="finite",
                            value_set=[True],
                            meta=IDS,
                            description="no NaN/inf in the item vector (examples: item_idx)",
                        ),
                        E.ExpectColumnValuesToBeBetween(
                            column="norm",
                            min_value=1 - tol,
                            max_value=1 + tol,
                            description=f"unit norm: |norm - 1| <= {tol:g}",
                        ),
                        E.ExpectColumnValuesToBeInSet(
                            column="dim", value_set=[d_model], description=f"dimension = {d_model}"
                        ),
                        E.ExpectColumnValuesToBeInSet(
                            column="model_version", value_set=[version], description="computed by the published model"
                        ),
                    ],
                    id_column="item_idx",
                )
            )

    # Counts.
    if shard_rows:
        sh = pd.DataFrame(shard_rows)
        sh["rows_minus_expected"] = sh["rows"] - sh["expected"]
        sh["rows_minus_manifest"] = sh["rows"] - sh["manifest_rows"]
        plan.items.append(
            Batch(
                "shards",
                sh,
                [
                    E.ExpectColumnValuesToBeBetween(
                        column="rows_minus_expected",
                        min_value=0,
                        max_value=0,
                        meta=IDS,
                        description="each shard has exactly its users to refresh, counted from "
                        "user_sequences (examples: shard)",
                    ),
                    E.ExpectColumnValuesToBeBetween(
                        column="rows_minus_manifest",
                        min_value=0,
                        max_value=0,
                        meta=IDS,
                        description="each shard's rows are what its _SUCCESS.json says (examples: shard)",
                    ),
                ],
                id_column="shard",
            )
        )
    metrics = {
        "users": n_users,
        "users_to_refresh": int(expected.sum()),
        "preference_rows": n_pref,
        "preference_rows_expected": n_users * n_tasks,
        "items": items_rows,
        "catalogue_items": int(catalogue),
    }
    exps = [
        E.ExpectColumnValuesToBeBetween(
            column="users",
            min_value=metrics["users_to_refresh"],
            max_value=metrics["users_to_refresh"],
            description=f"rows = users to refresh ({metrics['users_to_refresh']}: "
            + (
                "every user"
                if first["full"]
                else f"{selected['users']} selected users"
                if selected
                else f"updated_dt = {day}"
            )
            + ")",
        ),
        E.ExpectColumnValuesToBeBetween(
            column="preference_rows",
            min_value=metrics["preference_rows_expected"],
            max_value=metrics["preference_rows_expected"],
            description=f"preference rows = users x heads ({n_tasks})",
        ),
        E.ExpectColumnValuesToBeBetween(
            column="items",
            min_value=metrics["catalogue_items"],
            max_value=metrics["catalogue_items"],
            description=f"item rows = the catalogue as of {day} ({metrics['catalogue_items']})",
        ),
    ]
    for task, mean in sorted(top1.items()):
        metrics[f"top1_mean_{task}"] = mean
        exps.append(
            E.ExpectColumnValuesToBeBetween(
                column=f"top1_mean_{task}",
                min_value=band[0],
                max_value=band[1],
                description=f"mean top-1 probability of {task} within infer.top1_mean_band",
            )
        )
    plan.items.append(Batch("metrics", pd.DataFrame([metrics]), exps))
    plan.facts.update(
        metrics=metrics,
        rows_per_shard={r["shard"]: r["rows"] for r in shard_rows},
        expected_per_shard=expected.tolist(),
    )
    return plan
