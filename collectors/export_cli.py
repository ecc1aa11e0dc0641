"""`mythos-probe export`: a store → partitioned Parquet.

`--parquet DIR` writes one Hive-partitioned dataset per table (`DIR/<table>/date=…/model_id=…/`)
through DuckDB's COPY, which DuckDB, Spark, ClickHouse and Polars read back with Hive
partitioning. Child tables get their forward's date and model by a join, so every table
partitions the same way; spans that are not forwards (per-iteration children) have no forward
row and land under `date=NULL/model_id=NULL`.

This module is not: the store (`store`) or the span encoding (`spans`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mythos_probe.collectors.schema import TABLES
from mythos_probe.collectors.store import Store

HELP = "export a store to partitioned Parquet or over OTLP"

_PARTITION = "strftime(f.start_time, '%Y-%m-%d') AS date, f.model_id AS model_id"


def export_parquet(store: Store, out: str | Path) -> dict[str, Path]:
    """Writes every table under `out/<table>/date=…/model_id=…/*.parquet`; returns the folders."""
    out = Path(out)
    folders = {}
    for table in TABLES:
        if table == "forwards":
            select = "SELECT *, strftime(start_time, '%Y-%m-%d') AS date FROM forwards"
        else:
            select = (
                f"SELECT t.*, strftime(f.start_time, '%Y-%m-%d') AS date, f.model_id AS model_id "
                f"FROM {table} t LEFT JOIN forwards f USING (trace_id, span_id)"
            )
        folder = out / table
        folder.mkdir(parents=True, exist_ok=True)
        # COPY takes no parameter for its target, so the path goes in as a quoted SQL literal.
        target = "'" + str(folder).replace("'", "''") + "'"
        store.query(f"COPY ({select}) TO {target} (FORMAT parquet, PARTITION_BY (date, model_id), OVERWRITE_OR_IGNORE)")
        folders[table] = folder
    return folders


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="DuckDB store to read (opened read-only)")
    parser.add_argument("--parquet", metavar="DIR", help="write partitioned Parquet under DIR")


def run(args: argparse.Namespace) -> int:
    if not args.parquet:
        raise SystemExit("nothing to do: pass --parquet DIR")
    with Store.open_read_only(args.store) as store:
        folders = export_parquet(store, args.parquet)
    print(json.dumps({t: str(p) for t, p in folders.items()}))
    return 0
