"""`mythos-probe dashboard FILE`: open a store (a DuckDB file or a Parquet folder) read-only and
serve the dashboard on it.

When the file cannot be opened (missing, held by a writer such as `mythos-probe serve`, written by
a newer mythos-probe) the dashboard still starts and says why in the page. This module is not the
live dashboard, which `mythos-probe serve` hosts next to its writer.
"""

from __future__ import annotations

import argparse
import sys

HELP = "open a store (DuckDB file or Parquet folder) read-only in the dashboard"
# DuckDB keeps scanned pages cached up to its memory limit (80 % of RAM by default): on a 10,000-
# forward store the what-if replay alone grew the process past 800 MiB. Capped, it evicts and
# spills instead, at about the same speed (measured: 1.5 s → 1.3 s, peak 820 → 380 MiB).
DUCKDB_MEMORY_LIMIT = "160MB"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="DuckDB store file or Parquet store folder written by mythos-probe "
                        "(a notebook recorder or serve)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8050, help="port (default: 8050)")
    parser.add_argument("--profiles", help="loop profiles file (`mythos-probe profiles`) the Budgets page shows")


def open_store(path: str):
    """(store, None) or (None, message saying why the file cannot be shown)."""
    from mythos_probe.collectors.parquet_store import open_read_only
    from mythos_probe.collectors.store import SchemaError, StoreError

    try:
        return open_read_only(path), None
    except (StoreError, SchemaError) as exc:
        return None, f"Cannot show this store: {exc}"


def run(args: argparse.Namespace) -> int:
    if getattr(args, "profiles", None):
        import os

        from mythos_probe.dashboards.pages.budgets import ENV

        os.environ[ENV] = os.path.abspath(args.profiles)  # the Budgets page reads it per view
    from mythos_probe.collectors.serve import wsgi_server
    from mythos_probe.dashboards.app import create_app

    store, problem = open_store(args.file)
    if store is not None:
        store.query(f"SET memory_limit = '{DUCKDB_MEMORY_LIMIT}'")
    if problem:
        print(f"mythos-probe dashboard: {problem}", file=sys.stderr)
    try:
        server = wsgi_server(create_app(store, problem=problem).server, args.host, args.port)
    except BaseException:
        if store is not None:
            store.close()
        raise
    print(f"mythos-probe dashboard: http://{args.host}:{server.port}/  (Ctrl+C to stop)", flush=True)
    try:
        server.serve_forever()
    finally:
        if store is not None:
            store.close()
    return 0
