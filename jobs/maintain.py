"""`userformer maintain`: keep the warehouse small without losing the history repairs need.

Every daily step rewrites files (copy-on-write), so removed files pile up.
Vacuum deletes files that no version younger than the retention window
references, plus orphans of failed runs; a checkpoint keeps log reads fast; the
staging folders of crashed runs are cleared. Time travel (and so `repair`)
works back to the retention window and no further: size it to the longest
repair you may need.
"""

from __future__ import annotations

import json
import logging
import shutil
import time

from userformer.jobs.config import Config
from userformer.jobs.storage import delta
from userformer.schemas.tables import TABLES

log = logging.getLogger(__name__)


def maintain(cfg: Config, *, dry_run: bool = False, retention_days: float | None = None) -> dict:
    """Vacuum every table beyond the retention window, checkpoint its log, clear stale staging folders."""
    days = cfg.storage.retention_days if retention_days is None else retention_days
    out = {"retention_days": days, "dry_run": dry_run, "tables": {}}
    for name in TABLES:
        path = cfg.table_path(name)
        if not delta.exists(path):
            continue
        t = delta.open_table(path)
        files = t.vacuum(retention_hours=int(days * 24), dry_run=dry_run, enforce_retention_duration=False)
        if not dry_run:
            t.create_checkpoint()
            t.cleanup_metadata()  # log entries older than the table's logRetentionDuration
        out["tables"][name] = {"files_deleted" if not dry_run else "files_to_delete": len(files), "version": t.version()}
    # Staging folders of runs that died without their cleanup (a killed JVM, a lost machine).
    stale = []
    cutoff = time.time() - 24 * 3600
    for d in (cfg.warehouse_root / "_staging").glob("*/*"):
        if d.is_dir() and d.stat().st_mtime < cutoff:
            stale.append(str(d))
            if not dry_run:
                shutil.rmtree(d, ignore_errors=True)
    out["stale_staging"] = stale
    log.info("maintain: %s", out)
    return out


def register(sub) -> None:
    p = sub.add_parser("maintain", help="vacuum old files beyond the retention window, checkpoint logs, clear stale staging")
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    p.add_argument("--retention-days", type=float, help="override storage.retention_days for this run")
    p.set_defaults(func=run)


def run(args, cfg: Config) -> int:
    print(json.dumps(maintain(cfg, dry_run=args.dry_run, retention_days=args.retention_days), indent=2, default=str))
    return 0

