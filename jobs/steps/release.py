"""`userformer release --dt D`: make drop D's outputs visible to readers, all at once; `userformer snapshot`: show them.

The last step of a day. Until it runs, readers (jobs/tools/serve.py, the docs'
recipes, `read_snapshot`) keep reading the previous published snapshot
(jobs/core/snapshot.py) even though D's commits are in the tables. It flips the
snapshot to D only when everything D publishes agrees:

- publish of D completed (``_published/outputs.json`` names D): its output
  checks passed and its three commits landed;
- the item index CURRENT passed its check, is of D's model and was built from
  the ``item_embeddings`` rows D published;
- ``user_candidates`` was written for D's refreshed users from D's
  ``user_embeddings`` (a day that refreshed nobody keeps the table as it is).

Otherwise it refuses (exit 2, nothing changes): readers keep the last good
day. A later drop already published or released makes releasing D pointless;
it is skipped (the later release makes D's rows visible too). Releasing the
same day twice changes nothing.

The record names the Delta version of every table readers may read (outputs
and the inputs they were computed from), the index version and the model
version. The Airflow task that runs this step updates the assets
``userformer://user_embeddings`` ... (dags/common.py ``RELEASED``), on which
downstream DAGs can be scheduled.
"""

from __future__ import annotations

import datetime as dt
import json
import logging

from userformer.jobs.core import hooks, lease, snapshot
from userformer.jobs.core.config import Config
from userformer.jobs.core.dates import date_arg
from userformer.jobs.core.errors import UserError
from userformer.jobs.core.storage import delta
from userformer.jobs.core.versions import now_iso
from userformer.jobs.steps import index as index_step
from userformer.jobs.steps import publish as publish_step

log = logging.getLogger(__name__)


class NotReady(UserError):
    """Drop D's outputs do not agree yet: the snapshot stays where it is (exit 2)."""

    def __init__(self, day: dt.date, why: str, fix: str):
        super().__init__(f"release dt={day}: {why}; the published snapshot stays as it is. {fix}", code=2)


def _same_rows(path, a: int, b: int) -> bool:
    """Do versions a and b of a table hold the same rows (only maintenance commits between them)?"""
    lo, hi = sorted((int(a), int(b)))
    if lo == hi:
        return True
    now = delta.version_of(path)
    between = [h for h in delta.history(path, now - lo) if lo < int(h["version"]) <= hi]
    return len(between) == hi - lo and all(
        str(h.get("operation", "")).startswith(delta.NO_DATA_CHANGE) for h in between
    )


def _as_of_drop(path, day: dt.date) -> int | None:
    """The newest version of an input table that holds no drop after `day` (events of D+1 ingested before D is
    released are left out)."""
    v = delta.version_of(path)
    if v is None:
        return None
    for h in delta.history(path, 200):
        d = h.get("dt") or h.get("upto")
        if d is None:
            continue
        if dt.date.fromisoformat(d[:10]) > day:
            v = int(h["version"]) - 1
        else:
            break
    return v if v >= 0 else None


def _last_commit(path, step: str) -> dict | None:
    if not delta.exists(path):
        return None
    return next((h for h in reversed(delta.lineage(path)) if h.get("step") == step), None)


def compose(cfg: Config, day: dt.date, pub: dict | None) -> dict:
    """The record releasing D would write from `pub` (the last publish record); NotReady when D's outputs do not
    agree."""
    if pub is None or pub.get("dt") != str(day):
        raise NotReady(
            day,
            f"drop {day} is not published (the last complete publish is of {pub and pub.get('dt')})",
            f"Run `userformer publish --dt {day}` first.",
        )
    model = pub["model_version"]
    tables = dict(pub["tables"])

    ptr = index_step.current(cfg)
    if ptr is None:
        raise NotReady(day, "there is no item index", f"Run `userformer index --dt {day}`.")
    man = index_step.read_manifest(cfg, ptr["version"])
    ie_v = man.get("item_embeddings_version")
    if (
        man.get("status") != "current"
        or man.get("model_version") != model
        or ie_v is None
        or not _same_rows(cfg.table_path("item_embeddings"), ie_v, tables["item_embeddings"])
    ):
        raise NotReady(
            day,
            f"the current index {ptr['version']} (model {man.get('model_version')}, item_embeddings "
            f"v{ie_v}, {man.get('status')}) is not the checked index of what {day} published (model {model}, "
            f"item_embeddings v{tables['item_embeddings']})",
            f"Run `userformer index --dt {day}`.",
        )

    cand_path = cfg.table_path("user_candidates")
    c = _last_commit(cand_path, "candidates")
    if pub.get("users"):
        fresh = (
            c is not None
            and c.get("dt") == str(day)
            and c.get("index_version") == ptr["version"]
            and _same_rows(cfg.table_path("user_embeddings"), c["user_embeddings_version"], tables["user_embeddings"])
        )
        if not fresh:
            raise NotReady(
                day,
                f"user_candidates holds no candidates of {day}'s {pub['users']} refreshed users from index "
                f"{ptr['version']} (last candidates commit: {c and c.get('dt')}, index {c and c.get('index_version')})",
                f"Run `userformer candidates --dt {day}`.",
            )
    elif c is not None and c.get("dt") and c["dt"] > str(day):
        raise NotReady(day, f"user_candidates holds candidates of {c['dt']}, after {day}", "Release that drop.")
    tables["user_candidates"] = delta.version_of(cand_path)

    inputs = pub.get("inputs") or {}
    for t in ("user_sequences", "items", "vocab"):
        tables[t] = inputs.get(t)
    tables["events"] = _as_of_drop(cfg.table_path("events"), day)
    return {
        "dt": str(day),
        "model_version": model,
        "tables": {t: tables.get(t) for t in snapshot.TABLES},
        "index": {k: man.get(k) for k in ("version", "model_version", "kind", "items", "recall_at_10")},
        "users": pub.get("users"),
        "full": pub.get("full"),
        "outputs_id": pub.get("outputs_id"),
        "published_at": pub.get("published_at"),
    }


@lease.writer("release")
def release(cfg: Config, day: dt.date) -> dict:
    """Flip the published snapshot to drop `day` (module doc). Returns the record, or {"skipped": why}."""
    cur = snapshot.current(cfg)
    if cur and cur.get("dt") and cur["dt"] > str(day):
        return {"skipped": f"the published snapshot is of {cur['dt']}, after {day}", "snapshot": cur["dt"]}
    pub = publish_step.published_outputs(cfg)
    if pub is None:
        return {"skipped": "nothing is published yet"}
    if pub.get("dt") and pub["dt"] > str(day):
        return {"skipped": f"drop {pub['dt']} is published after {day}: its release makes {day} visible too"}
    rec = compose(cfg, day, pub)
    same = cur is not None and all(cur.get(k) == rec[k] for k in ("dt", "tables", "index", "outputs_id"))
    if same:
        snapshot.flip(cfg, cur)  # completes the log when a crash came between the flip and the log line
        return {**cur, "changed": False}
    rec.update(
        released_at=now_iso(),
        previous={k: cur.get(k) for k in ("dt", "model_version", "released_at")} if cur else None,
    )
    hooks.pause("release.before_flip")  # tests: everything of D committed and checked, readers still on D-1
    snapshot.flip(cfg, rec)
    log.info(
        "released %s: model %s, index %s, %s",
        day,
        rec["model_version"],
        rec["index"]["version"],
        ", ".join(f"{t} v{v}" for t, v in rec["tables"].items() if v is not None),
    )
    return {**rec, "changed": True}


# --------------------------------------------------------------------- CLI
def register(sub) -> None:
    p = sub.add_parser(
        "release",
        help="make drop D's published outputs visible to readers, all at once (the published snapshot)",
        description="Flip warehouse/_published/snapshot.json to drop D once its publish, its checked index and "
        "its candidates agree; exit 2 and no change otherwise. See jobs/steps/release.py.",
    )
    p.add_argument("--dt", type=date_arg, required=True, help="drop date YYYY-MM-DD")
    p.set_defaults(func=run_release)
    s = sub.add_parser(
        "snapshot",
        help="show the published snapshot: the drop, model, index and table versions readers read",
        description="Print warehouse/_published/snapshot.json (what every reader of the outputs reads); "
        "exit 2 when nothing was released yet.",
    )
    s.add_argument("--history", action="store_true", help="every snapshot released, oldest first")
    s.set_defaults(func=run_snapshot)


def run_release(args, cfg: Config) -> int:
    print(json.dumps(release(cfg, args.dt), indent=2, default=str))
    return 0


def run_snapshot(args, cfg: Config) -> int:
    out = snapshot.history(cfg) if args.history else snapshot.require(cfg)
    print(json.dumps(out, indent=2, default=str))
    return 0
