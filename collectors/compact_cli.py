"""`mythos-probe compact DIR`: compacts a Parquet store folder in place (`parquet_store.compact`).

Safe while writers (`serve --parquet`, `to_parquet`, other ranks) and readers (the dashboard)
use the folder: the merged files replace the small ones in one commit. Also deletes what dead
writers left uncommitted and the files earlier compactions replaced, once `--retain-seconds` have
passed since (readers still running on them finish first).

This module is not: the compaction itself (`parquet_store`).
"""

from __future__ import annotations

import argparse

from mythos_probe.collectors.parquet_store import RETAIN_REMOVED_SECONDS, compact

HELP = "compact a Parquet store folder in place, safely while others write and read it"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="Parquet store folder (written by to_parquet or serve --parquet)")
    parser.add_argument("--retain-seconds", type=float, default=RETAIN_REMOVED_SECONDS,
                        help="keep replaced files this long for queries already reading them (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    result = compact(args.folder, args.retain_seconds)
    print(f"mythos-probe compact: {args.folder}: {result['before']} committed files → {result['after']}", flush=True)
    return 0
