"""`RemoteStore`: read the store a running `mythos-probe serve` writes, from another process.

    store = mythos_probe.collectors.connect("http://127.0.0.1:4318", token=...)
    store.frame("forwards")                # pandas, up to date
    store.query("SELECT model_id, count(*) FROM forwards GROUP BY 1")

It keeps an in-memory DuckDB replica with the store's tables, brought up to date from serve's read
API (`read_api`) before a query, at most every `refresh_s` seconds, by fetching the forwards it
has not seen yet (with their iterations, positions, experts and spans) as Arrow. So every
dashboard query, `frame` and `export` runs unchanged on the replica, and a reader never blocks the
writer. While serve is unreachable the replica answers with what it has (`last_error` says why it
is behind) and catches up when serve is back; a restarted serve (a new `store_id`) is read again
from the start, so nothing is doubled.

This module is not: the server side (`read_api`, in `receiver`) or the DuckDB store (`store`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Mapping, Sequence

import pandas as pd
import pyarrow as pa

from mythos_probe.collectors.store import Store, StoreError
from mythos_probe.collectors.schema import insert_arrow

logger = logging.getLogger(__name__)

TABLE_ORDER = ("iterations", "positions", "experts", "spans", "forwards")  # forwards last: a reader
# of the replica that sees a forward also sees its rows
FORWARDS_PER_ROUND = 256
TOKEN_ENV = "MYTHOS_PROBE_TOKEN"


class RemoteStore:
    """A read-only replica of a `serve` store at `url` (the OTLP base URL, e.g.
    http://127.0.0.1:4318). `token`: serve's `--token` (default: $MYTHOS_PROBE_TOKEN). Raises
    `StoreError` when serve does not answer at first, unless `wait` (then it starts empty)."""

    read_only = True

    def __init__(self, url: str, token: str | None = None, refresh_s: float = 1.0, timeout_s: float = 30.0,
                 wait: bool = False) -> None:
        self.url = url.rstrip("/")
        self.path = self.url  # what the dashboard and export print
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self._replica = Store(":memory:")
        self._sync_lock = threading.Lock()
        self._synced_at = -float("inf")
        self._store_id: str | None = None
        self.max_forward_id = 0
        self.last_error: str | None = None
        self.sync()  # fails loudly when nothing answers at first (unless `wait`: the dashboard
        if self.last_error is not None and not wait:  # waits for a serve that starts later)
            self._replica.close()
            raise StoreError(f"cannot read {self.url}: {self.last_error}")

    # -- reading --------------------------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> pd.DataFrame:
        self._maybe_sync()
        return self._replica.query(sql, params)

    def frame(self, table: str) -> pd.DataFrame:
        """A whole table, up to date, in forward order (pandas)."""
        if table not in TABLE_ORDER:
            raise ValueError(f"table must be one of {TABLE_ORDER}, got {table!r}")
        self.sync()
        order = "forward_id" if table != "spans" else "start_ns"
        return self._replica.query(f"SELECT * FROM {table} ORDER BY {order}")

    def close(self) -> None:
        self._replica.close()

    def __enter__(self) -> "RemoteStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- syncing ---------------------------------------------------------------------------------

    def _maybe_sync(self) -> None:
        if time.monotonic() - self._synced_at >= self.refresh_s:
            self.sync()

    def sync(self) -> int:
        """Fetch what serve stored since the last sync; returns the number of new forwards. Never
        raises for a serve that is away: `last_error` says why the replica is behind."""
        with self._sync_lock:
            try:
                new = self._sync()
                self.last_error = None
                return new
            except (OSError, ValueError, pa.ArrowInvalid) as exc:
                if self.last_error is None:
                    logger.warning("cannot reach %s (%s); showing what was read so far", self.url, exc)
                self.last_error = str(getattr(exc, "reason", None) or exc)
                return 0
            finally:
                self._synced_at = time.monotonic()

    def _sync(self) -> int:
        head = json.loads(self._get("/v1/read"))
        if head["store_id"] != self._store_id:
            if self._store_id is not None:
                logger.warning("%s restarted: reading its store again from the start", self.url)
            self._clear()  # a new serve: start over
            self._store_id, self.max_forward_id = head["store_id"], 0
        target, new = int(head["max_forward_id"]), 0
        while self.max_forward_id < target:
            upto = min(target, self.max_forward_id + FORWARDS_PER_ROUND)
            tables = {t: self._arrow(t, self.max_forward_id, upto) for t in TABLE_ORDER}
            self._append(tables)
            new += tables["forwards"].num_rows
            self.max_forward_id = upto
        return new

    def _get(self, path: str) -> bytes:
        request = urllib.request.Request(self.url + path)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                return reply.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace").strip()
            if exc.code == 401:
                raise ValueError(f"authentication failed at {self.url} (HTTP 401): pass serve's --token") from None
            raise ValueError(f"{self.url}{path} answered HTTP {exc.code}: {detail}") from None

    def _arrow(self, table: str, after: int, upto: int) -> pa.Table:
        body = self._get(f"/v1/read/{table}?after={after}&upto={upto}")
        return pa.ipc.open_stream(pa.BufferReader(body)).read_all()

    def _append(self, tables: dict[str, pa.Table]) -> None:
        """Adds fetched rows to the replica in one transaction, forwards last."""
        with self._replica._cursors.cursor(read=False) as cur:  # noqa: SLF001 — the replica is ours
            cur.execute("BEGIN TRANSACTION")
            try:
                for name in TABLE_ORDER:
                    if tables[name].num_rows:
                        insert_arrow(cur, name, tables[name])
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise

    def _clear(self) -> None:
        with self._replica._cursors.cursor(read=False) as cur:  # noqa: SLF001
            for name in TABLE_ORDER:
                cur.execute(f"DELETE FROM {name}")


def connect(url: str, token: str | None = None, refresh_s: float = 1.0) -> RemoteStore:
    """A `RemoteStore` reading the store of the `mythos-probe serve` at `url`."""
    return RemoteStore(url, token=token, refresh_s=refresh_s)


def is_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))
