"""Downstream access to the published outputs: a small Python API and `recommend` / `similar-items` / `embeddings`.

    from userformer.jobs.tools.serve import Recommender, read_snapshot

    r = Recommender()                                   # load_config(): $USERFORMER_HOME, --config, ...
    r.recommend("u42", k=10, exclude_purchased=True)    # [Hit(rank, item_id, item_idx, score), ...]
    r.similar_items("i17", k=10)                        # nearest items, the item itself left out
    r.embeddings(["u1", "u2"])                          # pyarrow.Table: user_id, embedding, model_version, as_of
    read_snapshot("user_candidates")                    # any published table, as of the published snapshot

Everything here reads the **published snapshot** (jobs/core/snapshot.py): the
table versions, item index and model that the last release named, by Delta
time travel; never the tables' latest versions, which a running day may be
committing to. A Recommender resolves the snapshot once, when first needed,
and keeps it (user rows, index and purchases of one released day for its whole
life); make a new one to pick up a newer release. Excluding purchases reads
the user's ``events`` rows with event_type purchase (a pushed-down filter, no
full scan) of the snapshot's events version.

Errors are UserError with an exit code: an unknown user or item -> 3, nothing
released yet (or a released version no longer readable) -> 2.
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from userformer.jobs.core import snapshot
from userformer.jobs.core.config import Config, load_config
from userformer.jobs.core.errors import UserError
from userformer.jobs.core.storage import delta
from userformer.jobs.steps import candidates
from userformer.jobs.steps import index as index_step
from userformer.schemas.tables import USER_EMBEDDINGS

EMBEDDING_COLUMNS = ["user_id", "embedding", "model_version", "as_of"]


class UnknownId(UserError):
    """A user or item the published outputs do not know (exit 3)."""

    def __init__(self, message: str):
        super().__init__(message, code=3)


@dataclass
class Hit:
    rank: int
    item_id: str
    item_idx: int
    score: float


class Recommender:
    """The published snapshot's user embeddings and item index, for one process."""

    def __init__(self, cfg: Config | None = None):
        self.cfg = cfg or load_config()
        self._snapshot: dict | None = None
        self._index: index_step.ItemIndex | None = None
        self._users = None
        self._user_snapshot: delta.Snapshot | None = None
        self._events = None

    # ---------------------------------------------------------------- sources
    @property
    def snapshot(self) -> dict:
        """The published snapshot this Recommender reads (resolved once)."""
        if self._snapshot is None:
            self._snapshot = snapshot.require(self.cfg)
        return self._snapshot

    @property
    def index(self) -> index_step.ItemIndex:
        if self._index is None:
            self._index = index_step.open_version(self.cfg, self.snapshot["index"]["version"])
        return self._index

    def _user_table(self):
        if self._users is None:
            path = self.cfg.table_path("user_embeddings")
            self._users = delta.open_table(path, snapshot.table_version(self.cfg, "user_embeddings", self.snapshot))
        return self._users

    def _user_rows(self) -> delta.Snapshot:
        if self._user_snapshot is None:
            t = self._user_table()
            self._user_snapshot = delta.Snapshot(self.cfg.table_path("user_embeddings"), t.version())
        return self._user_snapshot

    def as_of(self) -> str:
        """The latest as_of of user_embeddings (from the log's file stats when they have it)."""
        t = self._user_table()
        try:
            acts = pa.table(t.get_add_actions(flatten=True))
            if "max.as_of" in acts.column_names and acts.num_rows:
                v = pc.max(acts["max.as_of"]).as_py()
                if v is not None:
                    return str(v)
        except Exception:  # pragma: no cover - stats are an optimisation
            pass
        v = pc.max(self._user_rows().to_table(columns=["as_of"])["as_of"]).as_py()
        return str(v) if v is not None else "never: the table is empty"

    def _unknown_user(self, user_id: str) -> UnknownId:
        return UnknownId(
            f"user {user_id} has no published embedding (as of {self.as_of()}, "
            f"user_embeddings v{self._user_table().version()})"
        )

    def embeddings(self, user_ids, missing: str = "error") -> pa.Table:
        """Rows of user_embeddings for `user_ids`, in that order (duplicates once).

        missing="error": an unknown id raises UnknownId (exit 3); "skip": unknown ids are left out.
        """
        ids = list(dict.fromkeys(str(u) for u in user_ids))
        schema = pa.schema([f for f in USER_EMBEDDINGS if f.name in EMBEDDING_COLUMNS])
        if not ids:
            return schema.empty_table()
        # Read with deletion vectors applied: publish MERGEs user_embeddings with them.
        t = self._user_rows().to_table(columns=EMBEDDING_COLUMNS, filter=index_step.str_in("user_id", ids))
        pos = {u: i for i, u in enumerate(t["user_id"].to_pylist())}
        lost = [u for u in ids if u not in pos]
        if lost and missing == "error":
            if len(lost) == 1:
                raise self._unknown_user(lost[0])
            shown = ", ".join(lost[:5]) + (f" and {len(lost) - 5} more" if len(lost) > 5 else "")
            raise UnknownId(f"{len(lost)} users have no published embedding (as of {self.as_of()}): {shown}")
        order = [pos[u] for u in ids if u in pos]
        return t.take(pa.array(order, pa.int64())).cast(schema)

    def user_vector(self, user_id: str) -> tuple[np.ndarray, dict]:
        t = self.embeddings([user_id])
        row = {c: t[c][0].as_py() for c in ("user_id", "model_version", "as_of")}
        return index_step.vectors_of(t["embedding"])[0], row

    def purchased(self, user_id: str) -> set[int]:
        v = self.snapshot["tables"].get("events")
        if v is None:
            return set()
        if self._events is None:  # opened once: each open reads the table's log
            self._events = delta.Snapshot(self.cfg.table_path("events"), v)
        return candidates.purchased_items(self.cfg, [user_id], events=self._events).get(user_id, set())

    # --------------------------------------------------------------- queries
    def recommend(self, user_id: str, k: int = 10, exclude_purchased: bool = False) -> list[Hit]:
        """The k items of the published index with the highest dot product with the user's embedding."""
        return self._recommend(user_id, k, exclude_purchased)[0]

    def _recommend(self, user_id: str, k: int, exclude_purchased: bool) -> tuple[list[Hit], dict]:
        vec, row = self.user_vector(user_id)
        idx = self.index
        if row["model_version"] != idx.model_version:
            raise UserError(
                f"user {user_id}'s embedding is of model {row['model_version']} but the published index "
                f"{idx.version} is of model {idx.model_version}: the published snapshot "
                f"{snapshot.path(self.cfg)} is inconsistent; rerun `userformer release --dt D` for the last day"
            )
        exclude = [self.purchased(user_id)] if exclude_purchased else None
        labels, scores = candidates.topn(idx, vec[None, :], _k(k), exclude)[0]
        return self._hits(labels, scores), row

    def similar_items(self, item_id: str, k: int = 10) -> list[Hit]:
        """The k items nearest to `item_id` in the published index (the item itself left out)."""
        idx = self.index
        item_idx = idx.idx_of_item(str(item_id))
        if item_idx is None:
            raise UnknownId(
                f"item {item_id} is not in the published item index ({idx.version}, "
                f"{idx.ntotal:,} items of model {idx.model_version})"
            )
        labels, scores = candidates.topn(idx, idx.vector(item_idx)[None, :], _k(k), [{item_idx}])[0]
        return self._hits(labels, scores)

    def _hits(self, labels: np.ndarray, scores: np.ndarray) -> list[Hit]:
        ids = self.index.ids_of(labels) if len(labels) else []
        return [Hit(r + 1, str(i), int(l), float(s)) for r, (i, l, s) in enumerate(zip(ids, labels, scores))]


def read_snapshot(table: str, columns: list[str] | None = None, filter=None, cfg: Config | None = None) -> pa.Table:
    """`table` as of the published snapshot (one Arrow table; `filter` a pyarrow.dataset expression).

    The outputs (user_embeddings, user_preference_scores, item_embeddings, user_candidates) and the inputs they
    were computed from (events, user_sequences, items, vocab) of the last released day, all of one day and one
    model; `snapshot_versions()` gives the versions for other readers (Spark's versionAsOf, Polars' version=).
    """
    return snapshot.read_table(cfg or load_config(), table, columns=columns, filter=filter)


def snapshot_versions(cfg: Config | None = None) -> dict:
    """{"dt", "model_version", "index", "tables": {table: Delta version}} of the published snapshot."""
    rec = snapshot.require(cfg or load_config())
    return {k: rec[k] for k in ("dt", "model_version", "index", "tables")}


def _k(k: int) -> int:
    if not isinstance(k, int) or k < 1:
        raise UserError(f"k must be a positive integer, got {k!r}")
    return k


# --------------------------------------------------------------------- output
def _embedding_text(vec) -> str:
    return "[" + ",".join(str(np.float32(v)) if np.isfinite(v) else "null" for v in vec) + "]"


# A spreadsheet runs a cell that begins with one of these as a formula (CSV injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(text: str | None) -> str | None:
    """A text cell that a spreadsheet shows as text: one beginning like a formula gets a leading apostrophe
    (OWASP's advice for CSV exports; the ids come from the raw logs, so from anyone)."""
    return "'" + text if isinstance(text, str) and text.startswith(FORMULA_START) else text


def write_embeddings(t: pa.Table, fmt: str, out) -> None:
    """`t` (embeddings()) as parquet, csv (the vector as a JSON array text; a text cell that would start a formula
    gets a leading apostrophe) or jsonl to a binary stream."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(t, buf)
        out.write(buf.getvalue())
        return
    vecs = index_step.vectors_of(t["embedding"]) if t.num_rows else np.zeros((0, 0), np.float32)
    users, mvs, dts = t["user_id"].to_pylist(), t["model_version"].to_pylist(), t["as_of"].to_pylist()
    if fmt == "jsonl":
        for u, v, m, d in zip(users, vecs, mvs, dts):
            out.write(
                (
                    f'{{"user_id": {json.dumps(u)}, "embedding": {_embedding_text(v)}, '
                    f'"model_version": {json.dumps(m)}, "as_of": "{d}"}}\n'
                ).encode()
            )
        return
    if fmt == "csv":
        import csv

        text = io.StringIO()
        w = csv.writer(text, lineterminator="\n")
        w.writerow(EMBEDDING_COLUMNS)
        for u, v, m, d in zip(users, vecs, mvs, dts):
            w.writerow([csv_cell(u), _embedding_text(v), csv_cell(m), str(d)])
        out.write(text.getvalue().encode())
        return
    raise UserError(f"unknown format {fmt!r}: parquet, csv or jsonl")


# ------------------------------------------------------------------------ CLI
def register(sub) -> None:
    p = sub.add_parser(
        "recommend",
        help="top-k items of the published index for a user (published embedding)",
        description="The k items with the highest dot product with the user's published embedding, "
        "searched in the published item index. Exit 3: unknown user; 2: no index/table.",
    )
    p.add_argument("--user", required=True, help="user_id")
    p.add_argument("-k", type=int, default=10, help="how many items (default 10)")
    p.add_argument("--exclude-purchased", action="store_true", help="leave out items the user purchased (events)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_recommend)
    p = sub.add_parser(
        "similar-items",
        help="nearest items of an item in the published index",
        description="The k items nearest to an item (dot product of item vectors) in the published "
        "item index, the item itself left out. Exit 3: unknown item; 2: no index.",
    )
    p.add_argument("--item", required=True, help="item_id")
    p.add_argument("-k", type=int, default=10, help="how many items (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_similar)
    p = sub.add_parser(
        "embeddings",
        help="published user embeddings of some users, to Parquet/CSV/JSON lines",
        description="Rows of user_embeddings (user_id, embedding, model_version, as_of) for the "
        "given users, in their order. CSV holds the vector as a JSON array text. "
        "Exit 3 when a user has no published embedding (unless --skip-missing).",
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--users", help="comma-separated user ids")
    g.add_argument("--users-file", help="file with one user id per line ('-' = stdin; blank lines and # ignored)")
    p.add_argument(
        "--format",
        choices=["parquet", "csv", "jsonl"],
        help="output format (default: from the --out suffix, else jsonl)",
    )
    p.add_argument("--out", default="-", help="output file, or - for stdout (default)")
    p.add_argument("--skip-missing", action="store_true", help="leave out unknown users instead of failing")
    p.set_defaults(func=run_embeddings)


def _print_hits(title: str, hits: list[Hit], meta: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps({**meta, "items": [asdict(h) for h in hits]}, indent=2))
        return
    print(title)
    w = max([len("item_id")] + [len(h.item_id) for h in hits])
    print(f"{'rank':>4}  {'item_id':<{w}}  {'item_idx':>9}  {'score':>8}")
    for h in hits:
        print(f"{h.rank:>4}  {h.item_id:<{w}}  {h.item_idx:>9}  {h.score:>8.4f}")


def run_recommend(args, cfg: Config) -> int:
    r = Recommender(cfg)
    hits, row = r._recommend(args.user, args.k, args.exclude_purchased)
    meta = {
        "user_id": args.user,
        "model_version": r.index.model_version,
        "index_version": r.index.version,
        "embedding_as_of": str(row["as_of"]),
        "k": args.k,
        "exclude_purchased": args.exclude_purchased,
    }
    _print_hits(
        f"user {args.user}: top {args.k} of index {r.index.version} (model {r.index.model_version}, "
        f"embedding as of {row['as_of']}" + (", purchases left out" if args.exclude_purchased else "") + ")",
        hits,
        meta,
        args.json,
    )
    return 0


def run_similar(args, cfg: Config) -> int:
    r = Recommender(cfg)
    hits = r.similar_items(args.item, k=args.k)
    meta = {"item_id": args.item, "model_version": r.index.model_version, "index_version": r.index.version, "k": args.k}
    _print_hits(
        f"item {args.item}: {args.k} nearest items in index {r.index.version} (model {r.index.model_version})",
        hits,
        meta,
        args.json,
    )
    return 0


def _read_ids(args) -> list[str]:
    if args.users is not None:
        ids = [u.strip() for u in args.users.split(",") if u.strip()]
    else:
        try:
            text = sys.stdin.read() if args.users_file == "-" else Path(args.users_file).read_text()
        except OSError as exc:
            raise UserError(f"cannot read --users-file {args.users_file}: {exc.strerror}") from None
        ids = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
    if not ids:
        raise UserError("no user ids given")
    return ids


def run_embeddings(args, cfg: Config) -> int:
    ids = _read_ids(args)
    fmt = args.format
    if fmt is None:
        suffix = Path(args.out).suffix.lower().lstrip(".") if args.out != "-" else ""
        fmt = {"parquet": "parquet", "pq": "parquet", "csv": "csv", "jsonl": "jsonl", "json": "jsonl"}.get(
            suffix, "jsonl"
        )
    t = Recommender(cfg).embeddings(ids, missing="skip" if args.skip_missing else "error")
    if args.out == "-":
        write_embeddings(t, fmt, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    else:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "wb") as f:
            write_embeddings(t, fmt, f)
        print(f"{t.num_rows} of {len(ids)} users -> {out} ({fmt})", file=sys.stderr)
    return 0
