"""`mythos-probe dashboard FILE`: open a store (a DuckDB file or a Parquet folder) read-only and
serve the dashboard on it.

When the file cannot be opened (missing, held by a writer such as `mythos-probe serve`, written by
a newer mythos-probe) the dashboard still starts, says why in the page, and keeps trying: it shows
the store once the writer stops or the file appears (`WaitingStore`). Given the URL of a running
serve, it reads the store serve is writing, live, through serve's read API
(`collectors.remote.RemoteStore`). This module is not the live dashboard, which `mythos-probe
serve` hosts next to its writer.
"""

from __future__ import annotations

import argparse
import sys
import time

from mythos_probe.cli import port_number

HELP = "open a store (DuckDB file or Parquet folder) read-only in the dashboard"
# DuckDB keeps scanned pages cached up to its memory limit (80 % of RAM by default): on a 10,000-
# forward store the what-if replay alone grew the process past 800 MiB. Capped, it evicts and
# spills instead, at about the same speed (measured: 1.5 s → 1.3 s, peak 820 → 380 MiB).
DUCKDB_MEMORY_LIMIT = "160MB"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="DuckDB store file or Parquet store folder written by mythos-probe "
                        "(a notebook recorder or serve), or the URL of a running serve "
                        "(http://HOST:OTLP_PORT) to read the store it is writing, live")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=port_number, default=8050, help="port (default: 8050; 0 picks a free one)")
    parser.add_argument("--token", default=None,
                        help="with a serve URL: serve's --token (default: $MYTHOS_PROBE_TOKEN)")
    parser.add_argument("--profiles", help="loop profiles file (`mythos-probe profiles`) the Budgets page shows")


def open_store(path: str, token: str | None = None):
    """(store, None) or (None, message saying why the file cannot be shown). A serve URL gives a
    `RemoteStore`, which waits for a serve that is not up yet and catches up once it is."""
    from mythos_probe.collectors.parquet_store import open_read_only
    from mythos_probe.collectors.remote import RemoteStore, is_url
    from mythos_probe.collectors.store import SchemaError, StoreError

    try:
        if is_url(path):
            return RemoteStore(path, token=token, wait=True), None
        return open_read_only(path), None
    except (StoreError, SchemaError) as exc:
        return None, f"Cannot show this store: {exc}"


class WaitingStore:
    """A store file that cannot be opened yet (missing, held by a writer such as `serve`): every
    query tries to open it again, at most every `retry_s`, and raises why not until it opens, so
    the live page says why and recovers by itself when the writer stops or the file appears."""

    read_only = True

    def __init__(self, path: str, problem: str, retry_s: float = 1.0) -> None:
        import threading

        self.path, self.problem, self.retry_s = path, problem, retry_s
        self._store = None
        self._tried = time.monotonic()
        self._lock = threading.Lock()

    def _open(self):
        from mythos_probe.collectors.store import StoreError

        with self._lock:
            if self._store is None and time.monotonic() - self._tried >= self.retry_s:
                self._tried = time.monotonic()
                store, problem = open_store(self.path)
                if store is not None:
                    store.query(f"SET memory_limit = '{DUCKDB_MEMORY_LIMIT}'")
                    self._store = store
                    print(f"mythos-probe dashboard: opened {self.path}", file=sys.stderr, flush=True)
                else:
                    self.problem = problem
            if self._store is None:
                raise StoreError(f"{self.problem} (retrying every {self.retry_s:g} s)")
            return self._store

    def query(self, sql: str, params=()):
        return self._open().query(sql, params)

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()


def run(args: argparse.Namespace) -> int:
    if getattr(args, "profiles", None):
        import os

        from mythos_probe.dashboards.pages.budgets import ENV

        os.environ[ENV] = os.path.abspath(args.profiles)  # the Budgets page reads it per view
    from mythos_probe.collectors.serve import bind, wsgi_server
    from mythos_probe.dashboards.app import create_app

    # The port first: one in use stops here, before the store is opened and the what-if prewarm
    # starts reading it (its traceback used to come before the one-line error).
    sock = bind(args.host, args.port)
    store, problem = open_store(args.file, args.token)
    if store is not None:
        store.query(f"SET memory_limit = '{DUCKDB_MEMORY_LIMIT}'")
    live = store is not None and getattr(store, "url", None) is not None  # a serve's store grows
    if problem:
        print(f"mythos-probe dashboard: {problem}; retrying every second", file=sys.stderr, flush=True)
        store, live = WaitingStore(args.file, problem), True  # live: the page retries and recovers
    try:
        server = wsgi_server(create_app(store, live=live).server, sock=sock)
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
