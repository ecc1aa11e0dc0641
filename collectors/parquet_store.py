"""`ParquetStore`: a store that is a folder of Parquet files, written by many processes at once and
read through DuckDB with the same tables (and so the same queries) as the DuckDB `Store`.

Layout, Hive-partitioned by the forward's UTC date so that DuckDB, Spark, ClickHouse, Trino and
Polars read it as they are:

    DIR/mythos-probe.json                                marks the folder, with its layout version
    DIR/<table>/date=YYYY-MM-DD/<writer>-<n>-<i>.parquet   table: forwards, iterations, positions, experts, spans

Every writing process is a writer with its own id (host, pid, random suffix); each `write` adds one
file set (one file per table and date) and never touches another writer's files, so writers need
no lock and no server. Every file set costs the readers a listing and a footer read per query, so
a long-lived writer (`serve --parquet`) passes `flush_seconds` and buffers its writes into one file
set per interval (at most `MAX_BUFFERED` forwards; a crash loses what is buffered). A file is
written under `DIR/.tmp-<writer>/` and moved into place with an atomic rename: a reader sees a
whole file or none (a crashed writer leaves its `.tmp-` folder, which readers never list). Within
a file set the forwards are renamed in last, so a reader that sees a forward also sees its
iterations, positions and experts.

`forward_id` (the key the dashboard joins on) must be unique across writers that never talk:
it is a 63-bit hash of (trace_id, span_id), and each file is sorted by it so a one-forward lookup
reads one row group. A writer skips forwards and spans whose key the folder already held when it
opened or that it wrote since (a span delivered twice stays once); two writers given the same
forward at the same moment would both keep it.

Reading is DuckDB in memory: one view per table over `read_parquet(DIR/<table>/*/*.parquet)`,
re-globbed at every query, casting columns to the store's types (`schema.TABLES`). It never writes
the folder. `mythos-probe export DIR --parquet OUT` copies a folder into one file per table, date
and model, for other engines.

This module is not: the DuckDB store (`store`), the row building (`rows`) or the layout of the
tables (`schema`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from mythos_probe.collectors.migrations import SchemaError
from mythos_probe.collectors.rows import spans_table, trace_span_row, trace_tables
from mythos_probe.collectors.schema import TABLES, quote
from mythos_probe.collectors.store import Cursors, StoreError
from mythos_probe.records import LoopTrace

__all__ = ["ParquetStore", "open_read_only"]

logger = logging.getLogger(__name__)

MARKER = "mythos-probe.json"
LAYOUT_VERSION = 1
_CHILD_TABLES = ("iterations", "positions", "experts")
# With `flush_seconds`, a full buffer is written at once: bounds the memory held between flushes.
MAX_BUFFERED = 4096


def open_read_only(path: str | Path):
    """A store to read, whichever kind `path` is: a folder is a `ParquetStore`, a file a DuckDB
    `Store`. Raises `StoreError` or `SchemaError` saying why it cannot be read."""
    if Path(path).is_dir():
        return ParquetStore.open_read_only(path)
    from mythos_probe.collectors.store import Store

    return Store.open_read_only(path)


def forward_ids(trace_ids: Sequence[str], span_ids: Sequence[str]) -> np.ndarray:
    """A 63-bit integer per (trace_id, span_id), the same in every process."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(f"{t}{s}".encode(), digest_size=8).digest(), "big") >> 1
         for t, s in zip(trace_ids, span_ids)],
        dtype=np.int64,
    )


def _sql_literal(text: str) -> str:
    # COPY and read_parquet take no parameter for their path, so it goes in as a quoted literal.
    return "'" + text.replace("'", "''") + "'"


def _casts(table: str, present: Iterable[str]) -> str:
    present = set(present)
    return ", ".join(
        f"CAST({quote(c) if c in present else 'NULL'} AS {t}) AS {quote(c)}" for c, t in TABLES[table]
    )


class ParquetStore:
    """A Parquet store folder. `ParquetStore(dir)` creates it when missing and writes into it;
    `ParquetStore.open_read_only(dir)` only reads. Both answer `query` like `Store`."""

    def __init__(self, path: str | Path, read_only: bool = False, flush_seconds: float | None = None) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self.files: list[Path] = []  # written by this writer, in order
        marker = self.path / MARKER
        if read_only:
            if not marker.is_file():
                what = "is not a mythos-probe Parquet store (no mythos-probe.json)" if self.path.exists() \
                    else "does not exist: nothing has been recorded there yet"
                raise StoreError(f"{self.path} {what}")
        else:
            if self.path.exists() and not self.path.is_dir():
                raise StoreError(f"{self.path} is a file; a Parquet store is a folder (pass a folder path)")
            if self.path.exists() and not marker.is_file() and any(not p.name.startswith(".") for p in self.path.iterdir()):
                raise StoreError(f"{self.path} holds other files; give a new or empty folder for a Parquet store")
            self.path.mkdir(parents=True, exist_ok=True)
            if not marker.is_file():
                self._replace_atomically(marker, json.dumps({"format": "mythos-probe parquet store",
                                                             "layout_version": LAYOUT_VERSION}).encode())
        try:
            version = json.loads(marker.read_text())["layout_version"]
        except (ValueError, KeyError) as exc:
            raise StoreError(f"{marker} is not a mythos-probe marker ({exc}); it was not written by mythos-probe") from None
        if version > LAYOUT_VERSION:
            raise SchemaError(f"{self.path} has Parquet layout version {version}, newer than this mythos-probe "
                              f"reads ({LAYOUT_VERSION}); upgrade mythos-probe")
        self._con = duckdb.connect(":memory:")
        self._cursors = Cursors(self._con)
        self._write_lock = threading.Lock()
        self._bound: set[str] = set()  # tables whose view reads files (the others are empty so far)
        self._refresh_views()
        if not read_only:
            writer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
            self.writer = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in writer)
            self._tmp = self.path / f".tmp-{self.writer}"
            self._tmp.mkdir()
            self._sequence = 0
            self._keys = {table: set(map(tuple, self.query(f"SELECT trace_id, span_id FROM {table}").to_numpy()))
                          for table in ("forwards", "spans")}
            self._buffer: tuple[list[LoopTrace], list[Mapping[str, Any]]] = ([], [])
            self._flush_seconds = flush_seconds
            self._closing = threading.Event()
            if flush_seconds is not None:
                self._flusher = threading.Thread(target=self._flush_every, args=(flush_seconds,),
                                                 name="parquet-store-flush", daemon=True)
                self._flusher.start()

    @classmethod
    def open_read_only(cls, path: str | Path) -> "ParquetStore":
        return cls(path, read_only=True)

    def __enter__(self) -> "ParquetStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if not self.read_only:
            self._closing.set()
            if self._flush_seconds is not None:
                self._flusher.join()
            self.flush()
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._cursors.close()

    # reading

    def _refresh_views(self) -> None:
        """Binds each table's view to its files once the first file exists (read_parquet fails on
        a glob that matches nothing, so until then the view is an empty table of the right types)."""
        for table in TABLES:
            if table in self._bound:
                continue
            if any((self.path / table).glob("*/*.parquet")):
                glob = _sql_literal(str(self.path / table / "*" / "*.parquet"))
                source = f"read_parquet({glob}, hive_partitioning = true, union_by_name = true)"
                # a column no file has yet (a metric added after the folder was written) reads as NULL
                columns = self._con.execute(f"DESCRIBE SELECT * FROM {source}").df()["column_name"].tolist()
                self._bound.add(table)
            else:
                source, columns = "(SELECT 1 WHERE FALSE)", []
            self._con.execute(f"CREATE OR REPLACE VIEW {table} AS SELECT {_casts(table, columns)} FROM {source}")

    def query(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> pd.DataFrame:
        """Run `sql` with `params` over the folder as it is now; safe from any thread."""
        refresh = self._refresh_views if len(self._bound) < len(TABLES) else None
        with self._cursors.cursor(before=refresh) as cur:
            return cur.execute(sql, params).df()

    # writing

    def write_traces(self, traces: Iterable[LoopTrace], resource: Mapping[str, Any] | None = None) -> int:
        """Store `traces` with their raw span rows as one file set; returns the number of new forwards."""
        traces = list(traces)
        return self.write(traces, [trace_span_row(t, resource) for t in traces])

    def write(self, traces: Sequence[LoopTrace], span_rows: Sequence[Mapping[str, Any]]) -> int:
        """Store decoded forwards and raw span rows, skipping known keys: as one file set now, or
        with `flush_seconds`, buffered into the next one. Returns the number of new forwards."""
        if self.read_only:
            raise StoreError(f"Parquet store {self.path} is open read-only")
        with self._write_lock:
            traces = self._new("forwards", traces, lambda t: (t.trace_id, t.span_id))
            self._buffer[0].extend(traces)
            self._buffer[1].extend(self._new("spans", span_rows, lambda r: (r["trace_id"], r["span_id"])))
            if self._flush_seconds is None or len(self._buffer[0]) >= MAX_BUFFERED:
                self._write_buffer()
        return len(traces)

    def flush(self) -> None:
        """Write what is buffered as one file set."""
        with self._write_lock:
            self._write_buffer()

    def _flush_every(self, seconds: float) -> None:
        while not self._closing.wait(seconds):
            try:
                self.flush()
            except Exception:  # kept buffered: the next flush retries
                logger.exception("could not write buffered traces to %s", self.path)

    def _write_buffer(self) -> None:
        traces, span_rows = self._buffer
        if not (traces or span_rows):
            return
        tables = {name: arrow for name, arrow in (trace_tables(traces, 0) if traces else {}).items() if arrow.num_rows}
        if traces:  # store-local numbering 0..n-1 → the writer-independent hash
            ids = forward_ids([t.trace_id for t in traces], [t.span_id for t in traces])
            for name, arrow in tables.items():
                local = arrow.column("forward_id").to_numpy()
                tables[name] = arrow.set_column(arrow.schema.get_field_index("forward_id"), "forward_id",
                                                pa.array(ids[local], pa.int64()))
        if span_rows:
            tables["spans"] = spans_table(span_rows)
        # children and spans first, forwards last: a visible forward has all its rows
        for name in [*_CHILD_TABLES, "spans", "forwards"]:
            if name in tables:
                self._write_table(name, tables[name], tables.get("forwards"))
        self._sequence += 1
        self._buffer = ([], [])

    def _new(self, table: str, items: Sequence[Any], key) -> list[Any]:
        kept = []
        for item in items:
            k = key(item)
            if k not in self._keys[table]:
                self._keys[table].add(k)
                kept.append(item)
        return kept

    def _write_table(self, table: str, arrow: pa.Table, forwards: pa.Table | None) -> None:
        with self._cursors.cursor(read=False) as cur:
            cur.register("_batch", arrow)
            # the partition date is the forward's: children join the batch's forwards for it
            if table in _CHILD_TABLES:
                cur.register("_forwards", forwards)
                date = ("(SELECT strftime(f.start_time, '%Y-%m-%d') FROM _forwards f"
                        " WHERE f.forward_id = _batch.forward_id)")
            elif table == "forwards":
                date = "strftime(start_time, '%Y-%m-%d')"
            else:
                date = "strftime(make_timestamp(start_ns // 1000), '%Y-%m-%d')"
            order = " ORDER BY forward_id" if table != "spans" else ""
            staging = self._tmp / f"{table}-{self._sequence}"
            cur.execute(
                f"COPY (SELECT {_casts(table, arrow.column_names)}, {date} AS date FROM _batch{order}) "
                f"TO {_sql_literal(str(staging))} (FORMAT parquet, PARTITION_BY (date))"
            )
        for part in sorted(staging.glob("date=*")):
            for i, staged in enumerate(sorted(part.glob("*.parquet"))):
                target = self.path / table / part.name / f"{self.writer}-{self._sequence:06d}-{i}.parquet"
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, target)  # atomic within one filesystem
                self.files.append(target)
        shutil.rmtree(staging)

    def _replace_atomically(self, target: Path, data: bytes) -> None:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
