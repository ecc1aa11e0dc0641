"""`Store`: the one place that opens the DuckDB file, migrates it, ingests and queries it.

DuckDB allows one read-write process or many read-only ones. A `Store` is shared by every thread
of its process: each `query` runs on its own cursor, and writes are serialised by a lock so the
dedupe check and the inserts of one batch form one transaction. Ingest goes through Arrow tables
(`rows`), never row by row, one INSERT per table per batch (`write_batch` takes tables a decode
worker built); SQL values travel only as parameters.

Idempotence: a forward is identified by (trace_id, span_id). A batch only inserts forwards (and
raw spans) whose key the store does not hold yet, so a span delivered twice, by a retrying
exporter or a replay, stays once. Which keys are new is answered in memory (`known_keys`) and,
when any may be stored, by DuckDB's exact query. New forwards are numbered (`forward_id`, see `schema`) after
the largest number stored, inside the same transaction.

This module is not: the layout (`schema`), the migrations (`migrations`) or the row building
(`rows`).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from mythos_probe.collectors import migrations, rollups
from mythos_probe.collectors.known_keys import KnownKeys
from mythos_probe.collectors.migrations import SchemaError
from mythos_probe.collectors.rows import Batch, spans_table, trace_span_row, trace_tables
from mythos_probe.collectors.schema import insert_arrow
from mythos_probe.records import LoopTrace

__all__ = ["Store", "StoreError", "StoreLockedError", "SchemaError"]

logger = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """The store cannot be opened: missing, not a DuckDB file, or unreadable."""


class StoreLockedError(StoreError):
    """Another process holds the store for writing."""


# The keys of a batch's forwards (`k.spans` false) and span rows (true) that the store lacks, in one
# statement: DuckDB's fixed cost per statement is a large part of a small batch's write.
_NEW_KEYS = """
SELECT DISTINCT k.spans, k.trace_id, k.span_id FROM _keys k
WHERE NOT k.spans AND NOT EXISTS (SELECT 1 FROM forwards t WHERE t.trace_id = k.trace_id AND t.span_id = k.span_id)
   OR k.spans AND NOT EXISTS (SELECT 1 FROM spans t WHERE t.trace_id = k.trace_id AND t.span_id = k.span_id)
"""


def _lock_message(path: Path, read_only: bool, exc: Exception) -> str:
    """Who holds `path`: readers share the file with readers and lock out a writer, a writer
    locks out everyone. DuckDB's error names the holding process but not how it opened the file,
    so a writer refused asks whether a reader would get in: then only readers hold it."""
    holder = re.search(r"held in (.+?\(PID \d+\))", str(exc))
    who = f" ({holder.group(1)})" if holder else ""
    if not read_only:
        try:
            duckdb.connect(str(path), read_only=True).close()
        except duckdb.Error:
            pass
        else:
            return (f"store {path} is open read-only in another process{who}, e.g. `mythos-probe dashboard` or a "
                    "notebook: a writer needs the file to itself. Close the readers and retry, or write a new file "
                    "(`mythos-probe serve` hosts the dashboard itself while it writes)")
    return (f"store {path} is held by a writer process{who}. Open the live store through the "
            "`mythos-probe serve` dashboard, or stop the writer and retry")


class Cursors:
    """The cursors one DuckDB connection hands to threads (a connection is not thread-safe; a
    cursor is a connection of its own). `close` interrupts the reads still running, waits for every
    cursor to return, then closes the connection: DuckDB refuses to close a connection whose
    cursors are busy ("connection is busy"), which a background reader such as the dashboard's
    what-if prewarm would otherwise turn into an error at shutdown. Writes are waited for, never
    interrupted."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con
        self._cond = threading.Condition()
        self._open: dict[duckdb.DuckDBPyConnection, bool] = {}  # cursor → may be interrupted
        self._closed = False

    @contextmanager
    def cursor(self, read: bool = True, before=None):
        with self._cond:
            if self._closed:
                raise StoreError("the store is closed")
            if before is not None:
                before()  # under the lock, on the connection itself (e.g. binding views)
            cur = self.con.cursor()
            self._open[cur] = read
        try:
            yield cur
        finally:
            cur.close()
            with self._cond:
                del self._open[cur]
                self._cond.notify_all()

    def close(self, timeout_s: float = 30.0) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            deadline = time.monotonic() + timeout_s
            while self._open and time.monotonic() < deadline:
                # again and again: an interrupt that lands before the cursor's query starts is lost
                for cur, read in self._open.items():
                    if read:
                        cur.interrupt()
                self._cond.wait(0.05)
            self.con.close()


class Store:
    """A mythos-probe DuckDB store. `Store(path)` creates or migrates it; see `open_read_only`."""

    has_rollups = True  # the dashboard's views may read `collectors.rollups` (a Parquet folder has none)

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        if read_only and not self.path.exists():
            raise StoreError(f"no store at {self.path}: nothing has been recorded there yet")
        try:
            self._con = duckdb.connect(str(self.path), read_only=read_only)
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower():
                raise StoreLockedError(_lock_message(self.path, read_only, exc)) from None
            raise StoreError(f"{self.path} is not a readable DuckDB store (left untouched): {exc}") from None
        except duckdb.Error as exc:
            raise StoreError(f"{self.path} is not a readable DuckDB store (left untouched): {exc}") from None
        try:
            if read_only:
                self.schema_version = migrations.check(self._con, str(self.path), writable=False)
            else:
                self.schema_version = migrations.migrate(self._con, str(self.path))
        except duckdb.Error as exc:  # a truncated or damaged file fails on its first read, not on connect
            self._con.close()
            raise StoreError(f"{self.path} is not a readable DuckDB store (left untouched): {exc}") from None
        except BaseException:
            self._con.close()
            raise
        self._cursors = Cursors(self._con)
        self._write_lock = threading.Lock()
        self._rollup_hours: frozenset = frozenset()  # hours whose rollup rows ingest appended to (`rollups.update`)
        self._known = KnownKeys()  # the keys stored, so that a write of new keys scans no table

    @classmethod
    def open_read_only(cls, path: str | Path) -> "Store":
        return cls(path, read_only=True)

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._rollup_hours:
            self._compact_rollups()
        self._cursors.close()

    def _compact_rollups(self) -> None:
        """One rollup row per key in the hours ingest appended to last (`rollups.compact`). Left
        undone (a killed process, a full disk) it costs the views a few rows more, never a figure."""
        try:
            with self._write_lock, self._cursors.cursor(read=False) as cur:
                cur.execute("BEGIN TRANSACTION")
                try:
                    rollups.compact(cur, self._rollup_hours)
                    cur.execute("COMMIT")
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
                self._rollup_hours = frozenset()
        except (duckdb.Error, StoreError):
            logger.warning("could not compact the rollups of %s at close; the figures stay exact", self.path, exc_info=True)

    def query(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> pd.DataFrame:
        """Run `sql` with `params` on a fresh cursor; safe from any thread."""
        with self._cursors.cursor() as cur:
            return cur.execute(sql, params).df()

    def write_traces(self, traces: Iterable[LoopTrace], resource: Mapping[str, Any] | None = None) -> int:
        """Store `traces` with their raw span rows; returns the number of new forwards."""
        traces = list(traces)
        return self.write(traces, [trace_span_row(t, resource) for t in traces])

    def write(self, traces: Sequence[LoopTrace], span_rows: Sequence[Mapping[str, Any]]) -> int:
        """Store decoded forwards and raw span rows in one transaction, skipping known keys;
        returns the number of new forwards."""
        return len(self.write_new(traces, span_rows))

    def write_new(self, traces: Sequence[LoopTrace], span_rows: Sequence[Mapping[str, Any]]) -> list[LoopTrace]:
        """As `write`, returning the forwards that were new (not already stored)."""
        keys = ([(t.trace_id, t.span_id) for t in traces], [(r["trace_id"], r["span_id"]) for r in span_rows])

        def build(forwards: np.ndarray, spans: np.ndarray, first: int) -> tuple[dict[str, pa.Table], None]:
            tables = trace_tables([traces[i] for i in forwards], first) if len(forwards) else {}
            if len(spans):
                tables["spans"] = spans_table([span_rows[i] for i in spans])
            return tables, None

        return [traces[i] for i in self._write(keys, build)]

    def write_batch(self, batch: Batch) -> np.ndarray:
        """As `write_new` for a batch whose tables were built where it was decoded (`rows.Batch`);
        returns the positions in the batch of the forwards that were new."""
        return self._write((batch.keys("forwards"), batch.keys("spans")), batch.select)

    def _write(self, keys: tuple[list, list], build) -> np.ndarray:
        """One transaction: the positions of the new forwards and span rows among `keys`, their
        tables (and rollup increments, or None) from `build(forwards, spans, first forward number)`,
        each inserted with one statement, and their rollups. Returns the positions of the new forwards."""
        if self.read_only:
            raise StoreError(f"store {self.path} is open read-only")
        with self._write_lock, self._cursors.cursor(read=False) as cur:
            cur.execute("BEGIN TRANSACTION")
            try:
                first, n_forwards, n_spans = cur.execute(
                    "SELECT coalesce(max(forward_id), 0) + 1, count(*), (SELECT count(*) FROM spans) FROM forwards"
                ).fetchall()[0]
                forwards, spans, hashes = self._new(cur, *keys, {"forwards": n_forwards, "spans": n_spans})
                tables, added = build(forwards, spans, first) if len(forwards) or len(spans) else ({}, None)
                for table, arrow in tables.items():  # each table in one INSERT of the batch's columns
                    if arrow.num_rows:
                        insert_arrow(cur, table, arrow)
                dirty = self._rollup_hours
                if len(forwards):  # in the same transaction: never raw rows without their rollup
                    dirty = rollups.update(cur, tables, dirty, added)
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            self._rollup_hours = dirty
            if hashes is not None:
                self._known.added("forwards", hashes[forwards])
                self._known.added("spans", hashes[len(keys[0]) + spans])
        return forwards

    def _new(self, cur: duckdb.DuckDBPyConnection, forward_keys: list, span_keys: list,
             counts: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The positions of the forwards and of the span rows whose key (trace_id, span_id) the
        store does not hold yet, the first copy of a key within the batch winning; and the hash of
        every key (forwards' first; None without keys). `KnownKeys` answers when every key is
        certainly new; else DuckDB's exact query does (`counts`: the tables' row counts now)."""
        if not forward_keys and not span_keys:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), None
        both = forward_keys + span_keys
        # read by DuckDB's replacement scan, by this name (no catalog change: see schema.insert_arrow)
        _keys = pa.table({"spans": [False] * len(forward_keys) + [True] * len(span_keys),
                          "trace_id": [k[0] for k in both], "span_id": [k[1] for k in both]})
        hashes, all_new = self._known.check(cur, _keys, counts)
        fresh = None if all_new else set(map(tuple, cur.execute(_NEW_KEYS).fetchall()))
        kept = []
        for spans, keys in ((False, forward_keys), (True, span_keys)):
            seen, positions = set(), []
            for i, k in enumerate(keys):
                if (fresh is None or (spans, *k) in fresh) and k not in seen:
                    seen.add(k)
                    positions.append(i)
            kept.append(np.array(positions, dtype=np.int64))
        return kept[0], kept[1], hashes
