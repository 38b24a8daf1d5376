"""Arrow schemas of the raw inputs and of every table, documented once.

The jobs write with these schemas, the checks validate against them, the tests
compare to them, and ``userformer schema`` prints them as docs/tables.md's column
reference. Integer ids (``*_idx``) come from the append-only ``vocab`` table:
0 means "none/unknown", real values start at 1 and never change meaning.
"""

from __future__ import annotations

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")


def col(name: str, typ: pa.DataType, doc: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, typ, nullable=nullable, metadata={"doc": doc})


def doc_of(f: pa.Field) -> str:
    return (f.metadata or {}).get(b"doc", b"").decode()


# --------------------------------------------------------------------- raw
RAW_EVENTS = pa.schema(
    [
        col("event_id", pa.string(), "Producer's id of the event; derived from its content when absent."),
        col("user_id", pa.string(), "Customer id. Required.", nullable=False),
        col(
            "ts", TS, "When the event happened (UTC). Required; may precede the drop date (late event).", nullable=False
        ),
        col(
            "event_type",
            pa.string(),
            "view, click, cart, purchase, favourite, ... or a non-item action: search, signup. Required.",
            nullable=False,
        ),
        col("item_id", pa.string(), "Item acted on; null for non-item actions."),
        col("surface", pa.string(), "Where it happened (home, search, pdp, app, ...)."),
        col("duration_s", pa.float64(), "Dwell time in seconds."),
        col("value", pa.float64(), "Monetary value (purchases) or rating."),
        col("query", pa.string(), "Search text for search events."),
    ]
)
RAW_EVENTS_REQUIRED = ("user_id", "ts", "event_type")
# Raw files are what producers send: required columns must exist, but a null in
# them is a bad row for quarantine, not an unreadable file, so all are nullable.
RAW_EVENTS = pa.schema([f.with_nullable(True) for f in RAW_EVENTS], metadata=RAW_EVENTS.metadata)

RAW_ITEMS = pa.schema(
    [
        col("item_id", pa.string(), "Item id as in the events. Required.", nullable=False),
        col("category_l1", pa.string(), "Top level of the category path (line)."),
        col("category_l2", pa.string(), "Second level (category)."),
        col("category_l3", pa.string(), "Third level (subcategory)."),
        col("brand", pa.string(), "Brand name."),
        col("title", pa.string(), "Title text."),
        col("price", pa.float64(), "Current price."),
    ]
)
RAW_ITEMS = pa.schema([f.with_nullable(True) for f in RAW_ITEMS])

# ------------------------------------------------------------------ tables
_ID_COLS = [
    col("item_idx", pa.int64(), "Vocabulary id of item_id (0 for non-item events)."),
    col("category_l1_idx", pa.int32(), "Vocabulary id of the item's category level 1 (0 unknown)."),
    col("category_l2_idx", pa.int32(), "Vocabulary id of the item's category path to level 2 (0 unknown)."),
    col("category_l3_idx", pa.int32(), "Vocabulary id of the item's category path to level 3 (0 unknown)."),
    col("brand_idx", pa.int32(), "Vocabulary id of the item's brand (0 unknown)."),
]

EVENTS = pa.schema(
    [
        col("dt", pa.date32(), "Drop (arrival) date; the partition column.", nullable=False),
        col(
            "event_id",
            pa.string(),
            "Unique event id: the producer's, or sha1 of user_id|ts|event_type|item_id.",
            nullable=False,
        ),
        col("user_id", pa.string(), "Customer id.", nullable=False),
        col("ts", TS, "Event time, UTC.", nullable=False),
        col("event_type", pa.string(), "Event type (one of ingest.event_types).", nullable=False),
        col("event_type_idx", pa.int32(), "Vocabulary id of event_type.", nullable=False),
        col("item_id", pa.string(), "Item id; null for non-item actions."),
        *_ID_COLS,
        col("surface", pa.string(), "Surface, as delivered."),
        col("surface_idx", pa.int32(), "Vocabulary id of surface (0 none)."),
        col("duration_s", pa.float64(), "Dwell time in seconds."),
        col("value", pa.float64(), "Monetary value or rating."),
        col("query", pa.string(), "Search text."),
    ]
)

EVENTS_REJECTED = pa.schema(
    [
        col("dt", pa.date32(), "Drop date; the partition column.", nullable=False),
        col(
            "reason",
            pa.string(),
            "Why: null_user_id, null_ts, unparseable_ts, future_ts, ts_too_old, unknown_event_type, null_event_type, "
            "missing_item_id, bad_duration, user_burst, duplicate.",
            nullable=False,
        ),
        col("detail", pa.string(), "Human-readable detail of the reason."),
        col("source_file", pa.string(), "Raw file the row came from."),
        col("event_id", pa.string(), "event_id as delivered."),
        col("user_id", pa.string(), "user_id as delivered."),
        col("ts_raw", pa.string(), "ts as delivered, as text."),
        col("event_type", pa.string(), "event_type as delivered."),
        col("item_id", pa.string(), "item_id as delivered."),
    ]
)

VOCAB = pa.schema(
    [
        col(
            "kind",
            pa.string(),
            "item, category_l1, category_l2, category_l3, brand, event_type or surface.",
            nullable=False,
        ),
        col("key", pa.string(), "The string value (category paths joined by ' > ').", nullable=False),
        col("idx", pa.int64(), "Its id: stable, append-only, from 1 per kind.", nullable=False),
        col("first_dt", pa.date32(), "Drop date on which it was first seen.", nullable=False),
    ]
)
VOCAB_KINDS = ("item", "category_l1", "category_l2", "category_l3", "brand", "event_type", "surface")

ITEMS = pa.schema(
    [
        col("item_id", pa.string(), "Item id.", nullable=False),
        col("item_idx", pa.int64(), "Vocabulary id of item_id.", nullable=False),
        col("category_l1", pa.string(), "Category level 1 (null unknown)."),
        col("category_l2", pa.string(), "Category level 2."),
        col("category_l3", pa.string(), "Category level 3."),
        col("brand", pa.string(), "Brand."),
        col("title", pa.string(), "Title."),
        col("price", pa.float64(), "Price from the latest catalogue snapshot."),
        *_ID_COLS[1:],
        col("has_metadata", pa.bool_(), "False for items seen only in events (attributes unknown).", nullable=False),
        col("first_dt", pa.date32(), "Drop date on which the item was first seen.", nullable=False),
        col("updated_dt", pa.date32(), "Drop date of the last change to this row.", nullable=False),
    ]
)

_SEQ_ARRAYS = [
    col("item_idx", pa.list_(pa.int64()), "Item ids of the last max_len events, oldest first (0: non-item event)."),
    col("event_type_idx", pa.list_(pa.int32()), "Event type ids, parallel to item_idx."),
    col("ts", pa.list_(TS), "Event times, ascending."),
    col("category_l1_idx", pa.list_(pa.int32()), "Category level 1 ids."),
    col("category_l2_idx", pa.list_(pa.int32()), "Category level 2 ids."),
    col("category_l3_idx", pa.list_(pa.int32()), "Category level 3 ids."),
    col("brand_idx", pa.list_(pa.int32()), "Brand ids."),
    col("surface_idx", pa.list_(pa.int32()), "Surface ids."),
    col("duration_s", pa.list_(pa.float64()), "Dwell times (null unknown)."),
]
SEQUENCE_ARRAYS = tuple(f.name for f in _SEQ_ARRAYS)

USER_SEQUENCES = pa.schema(
    [
        col("user_id", pa.string(), "Customer id; one row per user.", nullable=False),
        *_SEQ_ARRAYS,
        col("seq_len", pa.int32(), "Length of every array (<= sequences.max_len).", nullable=False),
        col(
            "lifetime_events",
            pa.int64(),
            "All accepted events of the user ever, not only the kept ones.",
            nullable=False,
        ),
        col("lifetime_counts", pa.map_(pa.string(), pa.int64()), "Lifetime events per event type."),
        col("first_event_ts", TS, "Earliest event time ever seen.", nullable=False),
        col("last_event_ts", TS, "Latest event time.", nullable=False),
        col("updated_dt", pa.date32(), "Last drop date that changed the row.", nullable=False),
    ]
)

# ------------------------------------------------------------ published outputs
# One published snapshot (these four tables and the item index) is always of one model version.
_VEC = pa.list_(pa.float32())
USER_EMBEDDINGS = pa.schema(
    [
        col("user_id", pa.string(), "Customer id; one current row per user.", nullable=False),
        col(
            "embedding",
            _VEC,
            "Unit-norm user vector (model.d_model floats); score an item by the dot product "
            "with its item_embeddings row.",
            nullable=False,
        ),
        col("model_version", pa.string(), "Registry version of the model that computed it.", nullable=False),
        col("as_of", pa.date32(), "Drop date D whose sequences it was computed from.", nullable=False),
        col(
            "updated_at",
            TS,
            "When the inference run that wrote this row computed it (republishing the same staged output keeps it).",
            nullable=False,
        ),
    ]
)
USER_PREFERENCE_SCORES = pa.schema(
    [
        col("user_id", pa.string(), "Customer id.", nullable=False),
        col(
            "task",
            pa.string(),
            "Preference head: category_l1, category_l2, category_l3, brand or event_type.",
            nullable=False,
        ),
        col("label_idx", pa.list_(pa.int64()), "Vocabulary ids of the top-K labels, best first.", nullable=False),
        col(
            "labels",
            pa.list_(pa.string()),
            "The labels themselves (vocab keys), parallel to label_idx.",
            nullable=False,
        ),
        col(
            "scores",
            pa.list_(pa.float32()),
            "Preference probability of each label (softmax over all the task's labels).",
            nullable=False,
        ),
        col("model_version", pa.string(), "Registry version of the model that computed it.", nullable=False),
        col("as_of", pa.date32(), "Drop date D whose sequences it was computed from.", nullable=False),
    ]
)
ITEM_EMBEDDINGS = pa.schema(
    [
        col("item_id", pa.string(), "Item id; one row per item of the catalogue.", nullable=False),
        col("item_idx", pa.int64(), "Vocabulary id of item_id.", nullable=False),
        col("embedding", _VEC, "Unit-norm item vector from the item tower (id + content).", nullable=False),
        col(
            "has_metadata",
            pa.bool_(),
            "False for items seen only in events (vector from the id alone).",
            nullable=False,
        ),
        col("model_version", pa.string(), "Registry version of the model that computed it.", nullable=False),
        col("as_of", pa.date32(), "Drop date D of the catalogue it was computed from.", nullable=False),
    ]
)
USER_CANDIDATES = pa.schema(
    [
        col("user_id", pa.string(), "Customer id (users refreshed on as_of).", nullable=False),
        col("item_idx", pa.list_(pa.int64()), "Top-N candidate item ids from the index, best first.", nullable=False),
        col("item_id", pa.list_(pa.string()), "The same items' ids.", nullable=False),
        col(
            "scores",
            pa.list_(pa.float32()),
            "Similarity of each candidate (dot product of unit vectors).",
            nullable=False,
        ),
        col("model_version", pa.string(), "Model version of the embeddings and index used.", nullable=False),
        col("index_version", pa.string(), "Item index version the candidates came from.", nullable=False),
        col("as_of", pa.date32(), "Drop date D.", nullable=False),
    ]
)

# Table name -> (schema, partition columns, one-line description).
TABLES: dict[str, tuple[pa.Schema, list[str], str]] = {
    "events": (EVENTS, ["dt"], "Accepted, deduplicated events with their ids; partition dt = drop date."),
    "events_rejected": (
        EVENTS_REJECTED,
        ["dt"],
        "Quarantine: raw rows that broke the contract or were duplicates, with the reason.",
    ),
    "vocab": (VOCAB, [], "Append-only string -> integer id maps for items, categories, brands, event types, surfaces."),
    "items": (ITEMS, [], "Current item catalogue, one row per item id ever seen."),
    "user_sequences": (
        USER_SEQUENCES,
        [],
        "Per user, the most recent max_len events as parallel arrays, plus lifetime counts.",
    ),
    "user_embeddings": (
        USER_EMBEDDINGS,
        [],
        "Published: one current embedding per user (rows of users without new events stay untouched).",
    ),
    "user_preference_scores": (
        USER_PREFERENCE_SCORES,
        [],
        "Published: per user and preference task, the top-K labels with their probabilities.",
    ),
    "item_embeddings": (ITEM_EMBEDDINGS, [], "Published: every catalogue item's vector of the current model version."),
    "user_candidates": (
        USER_CANDIDATES,
        [],
        "Published: top-N candidate items per refreshed user, from the item index.",
    ),
}


# What ingest + sequences write (the rest are the model's published outputs).
FOUNDATION_TABLES = ("events", "events_rejected", "vocab", "items", "user_sequences")
# Written by Spark through delta-spark (the tables MERGEd by user with deletion vectors: user_sequences and the
# user-keyed outputs): restore and rewrite them with delta-spark and read them from Python through
# jobs/core/storage/delta.py; the others are delta-rs's.
SPARK_TABLES = (
    "events",
    "events_rejected",
    "user_sequences",
    "user_embeddings",
    "user_preference_scores",
    "user_candidates",
)


def describe_markdown() -> str:
    """The column reference of every table, as Markdown (used for docs/tables.md)."""
    out = []
    for name, (schema, parts, desc) in TABLES.items():
        out.append(f"### `{name}`\n\n{desc}" + (f" Partitioned by `{', '.join(parts)}`." if parts else "") + "\n")
        out.append("| column | type | meaning |\n|---|---|---|")
        for f in schema:
            req = "" if f.nullable else " (not null)"
            out.append(f"| `{f.name}` | `{f.type}`{req} | {doc_of(f)} |")
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------- Spark bridge
def spark_ddl(schema: pa.Schema) -> str:
    """An Arrow schema as Spark SQL type text ("`user_id` string, `embedding` array<float>, ...")."""
    return ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in to_spark(schema))


def to_spark(schema: pa.Schema):
    """The Spark StructType of an Arrow schema (timestamps as TimestampType, UTC session)."""
    from pyspark.sql import types as T

    def conv(t: pa.DataType):
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return T.StringType()
        if pa.types.is_int64(t):
            return T.LongType()
        if pa.types.is_int32(t):
            return T.IntegerType()
        if pa.types.is_float64(t):
            return T.DoubleType()
        if pa.types.is_float32(t):
            return T.FloatType()
        if pa.types.is_boolean(t):
            return T.BooleanType()
        if pa.types.is_date32(t):
            return T.DateType()
        if pa.types.is_timestamp(t):
            return T.TimestampType()
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return T.ArrayType(conv(t.value_type), True)
        if pa.types.is_map(t):
            return T.MapType(conv(t.key_type), conv(t.item_type), True)
        raise TypeError(f"no Spark type for {t}")

    # Nullable everywhere on the Spark side: Spark's not-null flags do not
    # survive its writers reliably; nullability is enforced by the checks.
    return T.StructType([T.StructField(f.name, conv(f.type), True) for f in schema])
