"""Look at the warehouse: `userformer tables` (versions, rows, partitions) and `userformer schema` (column
reference)."""

from __future__ import annotations

import json

from userformer.jobs.core.config import Config
from userformer.jobs.core.storage import delta
from userformer.schemas import tables


def table_summary(cfg: Config) -> list[dict]:
    """One dict per known table: path, version, rows, partitions, last commit's step — read from the Delta log only."""
    out = []
    for name in tables.TABLES:
        path = cfg.table_path(name)
        if not delta.exists(path):
            out.append({"table": name, "path": str(path), "exists": False})
            continue
        t = delta.open_table(path)
        files = delta.data_files(path, t.version())
        parts = sorted({str(f.partition["dt"]) for f in files if f.partition.get("dt") is not None})
        last = delta.history(path, 1)[0]  # Spark's commits carry step/dt in userMetadata: history() lifts them
        out.append(
            {
                "table": name,
                "path": str(path),
                "exists": True,
                "version": t.version(),
                # rows readers see: Spark's MERGE leaves replaced rows in the files, deleted by deletion vectors
                "rows": sum(f.kept for f in files),
                "files": len(files),
                "partitions": len(parts),
                "first_dt": parts[0] if parts else None,
                "last_dt": parts[-1] if parts else None,
                "last_step": last.get("step"),
                "last_commit_dt": last.get("dt") or last.get("upto"),
            }
        )
    return out


def register(sub) -> None:
    p = sub.add_parser(
        "tables", help="list the warehouse's tables: version, rows, files, partitions (from the Delta logs)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_tables)
    p = sub.add_parser("schema", help="print every table's columns and their meaning (Markdown)")
    p.set_defaults(func=run_schema)


def run_tables(args, cfg: Config) -> int:
    if args.json:
        print(json.dumps(table_summary(cfg), indent=2))
    else:
        print_tables(cfg)
    return 0


def print_tables(cfg: Config) -> None:
    """The table summary as aligned text (also the end of `userformer demo`)."""
    rows = table_summary(cfg)
    print(f"warehouse: {cfg.warehouse_root}")
    print(f"{'table':<18}{'version':>8}{'rows':>12}{'files':>7}{'dts':>5}  last commit")
    for r in rows:
        if not r["exists"]:
            print(f"{r['table']:<18}{'-':>8}  (not created yet)")
            continue
        print(
            f"{r['table']:<18}{r['version']:>8}{r['rows']:>12}{r['files']:>7}{r['partitions']:>5}  "
            f"{r['last_step'] or ''} {r['last_commit_dt'] or ''}"
        )


def run_schema(args, cfg: Config) -> int:
    print(tables.describe_markdown())
    return 0
