"""`ParquetStore`: a store that is a folder of Parquet files, written by many processes at once and
read through DuckDB with the same tables (and so the same queries) as the DuckDB `Store`.

Layout (Hive-partitioned by the forward's UTC date, so other engines find the `date` column):

    DIR/mythos-probe.json                                  marks the folder, with its layout version
    DIR/_log/000000000001.json, 000000000002.json, …       the commit log: one file per commit
    DIR/<table>/date=YYYY-MM-DD/<writer>-<n>-<i>.parquet   table: forwards, iterations, positions, experts, spans
    DIR/.tmp-<writer>/                                     a writer's staging files

**Commit protocol.** A Parquet file in the folder is data only once a commit names it. A writer
writes its file set (one file per table and date), fsyncs it, renames it into place, then commits
it by creating the next log entry `_log/<version>.json` with `link()`, which fails if that version
exists: of two writers racing for version N exactly one wins, and the other reads commit N and
tries N+1. The entry names the files it adds (and, for compaction, those it removes) and the keys
of the forwards and spans it adds. So a file set becomes visible all at once, when its entry
appears, or never; the files of a writer killed before its commit are named by no entry, readers
never read them, and a later writer or `compact` deletes them once the writer is gone (its pid no
longer runs on this host, or a day has passed for a writer on another host), together with its
staging folder.

**Idempotence with several writers.** A forward's key is `forward_id`, a 63-bit hash of
(trace_id, span_id) that every process computes alike (spans: the same hash of theirs). Before
committing version N a writer has read every entry below N and drops the forwards and spans whose
key one of them added; if another writer takes N first, the loser reads N and, when it added one of
the same keys, rewrites its file set without them before trying again. Commits are totally
ordered and each was checked against all before it, so no key is committed twice: a retry that
reaches a second receiver, a replay or a second `to_parquet` stores nothing new, and
`write_new` returns only the forwards it stored (what Prometheus counts). Every commit is fsynced
(data files, their folders, the entry, `_log`) before `write` returns: once it has returned, a
crash of the process or of the machine keeps it.

**What a reader sees.** A reader reads the log from the version it knows (one failed `open` when
nothing is new) and queries one DuckDB view per table over exactly the committed files, rebuilt
only when the log moved: never a file of an uncommitted set, never half a set, never a forward
twice, no globbing. Each file is sorted by `forward_id` (spans by their ids), so a one-forward
lookup reads one row group. The log is never truncated: opening a folder reads each entry once. The read-side API for other engines is `committed(DIR)`: a `Snapshot` whose
`files(table, dates=…, models=…, runs=…)` lists the committed files of a table, pruned by the
manifest (each entry records its date, rows, bytes, columns, models and runs). Spark reads them
with `spark.read.option("basePath", f"{DIR}/{table}").parquet(*files)`. Globbing the folder
instead (`read_parquet('DIR/forwards/*/*.parquet')`) may see uncommitted files and files a
compaction has replaced: read through `committed`.

**Compaction** (`compact`, `mythos-probe compact DIR`, and `serve --parquet` above a file count)
merges the committed files of a table and date into one file, sorted by `forward_id`, committed
as one entry that adds the merged file and removes the files it replaces: a reader sees either
the old files or the new one, writers keep committing meanwhile (they only add). A compaction
that finds one of its files already removed by another compaction gives up and deletes its own
file. Removed files stay on disk `RETAIN_REMOVED_SECONDS` for queries already running, then a
later compaction deletes them; a reader whose file vanished reads the log again and retries once.

A folder of layout 1 (before the commit log) is refused until `compact` converts it
(`adopt_layout_1`). Needs a POSIX filesystem where `rename` and `link` are atomic (a local disk, NFS, Lustre), not
an object store. This module is not: the DuckDB store (`store`), the row building (`rows`) or the
layout of the tables (`schema`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import secrets
import shutil
import socket
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mythos_probe.collectors.migrations import SchemaError
from mythos_probe.collectors.rows import spans_table, trace_span_row, trace_tables
from mythos_probe.collectors.schema import TABLES, quote
from mythos_probe.collectors.store import Cursors, StoreError
from mythos_probe.records import LoopTrace

__all__ = ["ParquetStore", "Snapshot", "committed", "compact", "open_read_only"]

logger = logging.getLogger(__name__)

MARKER = "mythos-probe.json"
LOG = "_log"
LAYOUT_VERSION = 2  # 2: the commit log; 1 (no log) is refused with the way to convert it
_CHILD_TABLES = ("iterations", "positions", "experts")
_KEYED = ("forwards", "spans")
# Compacted-away files are deleted this long after their removal: queries already running finish.
RETAIN_REMOVED_SECONDS = 600.0
# Uncommitted files of a writer on another host (whose pid cannot be checked) are orphans after this.
FOREIGN_ORPHAN_SECONDS = 24 * 3600.0
# `compact` merges files smaller than this; larger ones are already cheap to read.
COMPACT_BELOW_BYTES = 256 << 20


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


# The partition is in the manifest: DuckDB would otherwise add a `date` column from the path.
_NO_HIVE = "hive_partitioning = false"


def _sql_literal(text: str) -> str:
    # COPY and read_parquet take no parameter for their path, so it goes in as a quoted literal.
    return "'" + text.replace("'", "''") + "'"


def _casts(table: str, present: Iterable[str]) -> str:
    present = set(present)
    return ", ".join(
        f"CAST({quote(c) if c in present else 'NULL'} AS {t}) AS {quote(c)}" for c, t in TABLES[table]
    )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _entry_path(root: Path, version: int) -> Path:
    return root / LOG / f"{version:012d}.json"


def _check_marker(root: Path) -> None:
    marker = root / MARKER
    try:
        version = json.loads(marker.read_text())["layout_version"]
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"{marker} is not a mythos-probe marker ({exc}); it was not written by mythos-probe") from None
    if version > LAYOUT_VERSION:
        raise SchemaError(f"{root} has Parquet layout version {version}, newer than this mythos-probe "
                          f"reads ({LAYOUT_VERSION}); upgrade mythos-probe")
    if version < LAYOUT_VERSION:
        raise SchemaError(f"{root} was written by a mythos-probe without the commit log (layout {version}); "
                          f"convert it with `mythos-probe compact {root}` once no writer is running")


class Snapshot:
    """The committed state of a store folder at one log version: what a reader may read.

    `files(table, …)` lists the committed files; `entries` maps each (path relative to the folder)
    to its manifest entry: table, date, rows, bytes, columns, models and runs (None: not known,
    for spans). `advance()` reads the commits made since."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.version = 0
        self.entries: dict[str, dict[str, Any]] = {}
        self.removed: dict[str, float] = {}  # path → when a compaction removed it
        # keys added by commits: a sorted array, plus the recent commits' keys until they are
        # worth merging into it (re-sorting a million keys at every commit would cost ~50 ms)
        self._sorted: dict[str, np.ndarray] = {t: np.empty(0, np.int64) for t in _KEYED}
        self._recent: dict[str, list[np.ndarray]] = {t: [] for t in _KEYED}

    def copy(self) -> "Snapshot":
        other = Snapshot(self.root)
        other.version, other.entries, other.removed = self.version, dict(self.entries), dict(self.removed)
        other._sorted, other._recent = dict(self._sorted), {t: list(v) for t, v in self._recent.items()}
        return other

    def advance(self) -> bool:
        """Reads the entries after `version`; True when there were any."""
        moved = False
        while True:
            try:
                data = _entry_path(self.root, self.version + 1).read_bytes()
            except FileNotFoundError:
                return moved
            self._apply(self.version + 1, json.loads(data))
            moved = True

    def _apply(self, version: int, commit: Mapping[str, Any]) -> None:
        for rel in commit.get("remove", ()):
            self.entries.pop(rel, None)
            self.removed[rel] = commit["time"]
        for entry in commit.get("add", ()):
            self.entries[entry["path"]] = entry
        for table, keys in commit.get("keys", {}).items():
            if keys:
                recent = self._recent[table]
                recent.append(np.asarray(keys, dtype=np.int64))
                if sum(map(len, recent)) > max(4096, len(self._sorted[table]) // 8):
                    self._sorted[table] = np.sort(np.concatenate([self._sorted[table], *recent]))
                    recent.clear()
        self.version = version

    def known(self, table: str, keys: np.ndarray) -> np.ndarray:
        """Per key of `table` ("forwards" or "spans"): whether a commit already added it."""
        keys = np.asarray(keys, dtype=np.int64)
        found = np.zeros(len(keys), bool)
        stored = self._sorted[table]
        if len(stored):
            at = np.minimum(np.searchsorted(stored, keys), len(stored) - 1)
            found |= stored[at] == keys
        for recent in self._recent[table]:
            found |= np.isin(keys, recent)
        return found

    def files(self, table: str, dates: Iterable[str] | None = None, models: Iterable[str] | None = None,
              runs: Iterable[str] | None = None) -> list[Path]:
        """The committed files of `table`, keeping only those that may hold a row of one of `dates`
        (YYYY-MM-DD), `models` or `runs` when given (an entry that does not know its models or runs
        is kept)."""
        wanted = [(k, {v} if isinstance(v, str) else set(v))  # one name or several
                  for k, v in (("date", dates), ("models", models), ("runs", runs)) if v is not None]
        out = []
        for rel, entry in sorted(self.entries.items()):
            if entry["table"] != table:
                continue
            if all((entry[k] in v) if k == "date" else (entry[k] is None or bool(v & set(entry[k]))) for k, v in wanted):
                out.append(self.root / rel)
        return out


def committed(path: str | Path) -> Snapshot:
    """The committed files of the store folder `path` as of now, with their manifest entries: the
    one function other engines (Spark, Polars, a script) need to read the folder safely."""
    root = Path(path)
    _check_marker(root)
    snapshot = Snapshot(root)
    snapshot.advance()
    return snapshot


# The tables whose files are partitioned by their forward's date and list its models and runs.
_PRUNED_TABLES = ("forwards", *_CHILD_TABLES)


def _day(t) -> str:
    """The UTC date (YYYY-MM-DD, a partition name) of a time; naive times are UTC, as stored."""
    t = pd.Timestamp(t)
    return (t.tz_convert("UTC") if t.tzinfo is not None else t).strftime("%Y-%m-%d")


class Pruned:
    """A `ParquetStore` read for one selection (`ParquetStore.pruned`): `query` answers as the
    store's does over the files whose manifest entry may hold a selected forward, by date
    partition, models and runs. A relative window (`window_s`) keeps every model and run: its
    bound is relative to the newest forward of all (the queries' `max(start_time)`), so only
    the dates before the newest date less the window are dropped."""

    has_rollups = False

    def __init__(self, store: ParquetStore, start, end, window_s, models: tuple, runs: tuple) -> None:
        self.store, self.start, self.end, self.window_s = store, start, end, window_s
        self.models, self.runs = set(models), set(runs)

    def keep(self, snapshot: Snapshot) -> dict[str, dict[str, Any]]:
        """The entries of `snapshot` a selected forward's rows may be in."""
        lo = None if self.start is None else _day(self.start)
        hi = None if self.end is None else _day(self.end)
        labels = (("models", self.models), ("runs", self.runs))
        if self.window_s is not None:
            labels = ()  # see the class docstring
            dates = [e["date"] for e in snapshot.entries.values() if e["table"] == "forwards"]
            if dates:
                since = _day(pd.Timestamp(max(dates)) - pd.Timedelta(seconds=float(self.window_s)))
                lo = since if lo is None else max(lo, since)

        def may_hold(entry: Mapping[str, Any]) -> bool:
            if entry["table"] not in _PRUNED_TABLES:
                return True
            if (lo is not None and entry["date"] < lo) or (hi is not None and entry["date"] > hi):
                return False
            return all(not wanted or entry[k] is None or bool(wanted & set(entry[k])) for k, wanted in labels)

        return {rel: e for rel, e in snapshot.entries.items() if may_hold(e)}

    def query(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> pd.DataFrame:
        return self.store.query(sql, params, keep=self.keep)


class _Conflict(Exception):
    """Another commit took what this one needed (a key it adds, a file it removes)."""


def _writer_alive(writer: str, mtime: float) -> bool:
    """Whether the writer `host-pid-suffix` whose newest file is from `mtime` may still commit:
    its pid runs on this host, or (its pid cannot be checked on another host) the file is younger
    than `FOREIGN_ORPHAN_SECONDS`."""
    if time.time() - mtime >= FOREIGN_ORPHAN_SECONDS:
        return False
    try:
        host, pid, _ = writer.rsplit("-", 2)  # pragma: no mutate (a writer name has exactly two dashes: _host() replaces them)
        pid = int(pid)
    except ValueError:
        return True
    if host != _host():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # runs, as another user
        return True
    return True


def _host() -> str:
    return "".join(ch if ch.isalnum() or ch in "_." else "_" for ch in socket.gethostname())


class ParquetStore:
    """A Parquet store folder. `ParquetStore(dir)` creates it when missing and writes into it;
    `ParquetStore.open_read_only(dir)` only reads. Both answer `query` like `Store`.

    `compact_above`: after a write, compact in the background when the folder holds more
    committed files than this (`serve --parquet` sets it)."""

    def __init__(self, path: str | Path, read_only: bool = False, compact_above: int | None = None) -> None:
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
            (self.path / LOG).mkdir(parents=True, exist_ok=True)
            if not marker.is_file():
                tmp = self.path / f".{MARKER}.{secrets.token_hex(4)}.tmp"  # pragma: no mutate (the temporary name's length does not matter)
                tmp.write_text(json.dumps({"format": "mythos-probe parquet store", "layout_version": LAYOUT_VERSION}))
                os.replace(tmp, marker)
        _check_marker(self.path)
        self._snapshot = Snapshot(self.path)
        self._log_lock = threading.Lock()  # guards the snapshot
        self._con = duckdb.connect(":memory:")
        # the footers of the committed files are read once per process, not once per query
        self._con.execute("SET parquet_metadata_cache = true")  # pragma: no mutate (SQL is read case-insensitively)
        self._cursors = Cursors(self._con)
        self._views_version = -1
        self._write_lock = threading.Lock()
        self._compact_lock = threading.Lock()
        self._compactor: threading.Thread | None = None
        self.compact_above = compact_above
        if not read_only:
            self.writer = f"{_host()}-{os.getpid()}-{secrets.token_hex(3)}"
            self._tmp = self.path / f".tmp-{self.writer}"
            self._sequence = itertools.count()  # file set numbers; next() is atomic across threads
            with self._log_lock:
                self._snapshot.advance()
            self.clean()

    @classmethod
    def open_read_only(cls, path: str | Path) -> "ParquetStore":
        return cls(path, read_only=True)

    def __enter__(self) -> "ParquetStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._compactor is not None:
            self._compactor.join()
        if not self.read_only:
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._cursors.close()

    def snapshot(self) -> Snapshot:
        """The committed state as of now (see `committed`), a copy later commits leave alone."""
        with self._log_lock:
            self._snapshot.advance()
            return self._snapshot.copy()

    # reading

    def _refresh_views(self) -> None:
        """Points each table's view at the committed files when the log has moved. Files written
        with different columns (before a metric existed) are read in groups, the missing columns
        as NULL, so no query reads every file's schema."""
        with self._log_lock:
            self._snapshot.advance()
            if self._snapshot.version == self._views_version:
                return
            snapshot = self._snapshot.copy()
        for table in TABLES:
            self._con.execute(f"CREATE OR REPLACE VIEW {table} AS {self._source(table, snapshot.entries)}")
        self._views_version = snapshot.version

    def _source(self, table: str, entries: Mapping[str, Mapping[str, Any]]) -> str:
        """SELECT of `table`'s rows in the files `entries` names (of any table)."""
        groups: dict[tuple[str, ...], list[str]] = defaultdict(list)
        for rel, entry in sorted(entries.items()):
            if entry["table"] == table:
                groups[tuple(entry["columns"])].append(str(self.path / rel))
        selects = [f"SELECT {_casts(table, columns)} FROM read_parquet([{', '.join(map(_sql_literal, files))}], {_NO_HIVE})"
                   for columns, files in groups.items()]
        return " UNION ALL ".join(selects) or f"SELECT {_casts(table, ())} WHERE FALSE"

    def query(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = (), keep=None) -> pd.DataFrame:
        """Run `sql` with `params` over the committed files as they are now; safe from any thread.
        `keep(snapshot)`: the manifest entries a query may need (`pruned`); the query then reads
        only those files, through views local to its cursor."""
        def run_on(keep) -> pd.DataFrame:
            if keep is None:
                with self._cursors.cursor(before=self._refresh_views) as cur:
                    return cur.execute(sql, params).df()
            # Every table as a view of this cursor's only (gone with it) over the kept files. Not
            # the shared views: binding a view over files reads a footer of each group of them.
            snapshot = self.snapshot()
            entries = keep(snapshot)
            if len(entries) == len(snapshot.entries):  # nothing pruned: the shared views, bound once
                return run_on(None)
            with self._cursors.cursor() as cur:
                for table in TABLES:
                    cur.execute(f"CREATE OR REPLACE TEMP VIEW {table} AS {self._source(table, entries)}")
                return cur.execute(sql, params).df()
        try:
            return run_on(keep)
        except duckdb.IOException:
            # a compaction's removed files were deleted after this view was made: read the log again
            return run_on(keep)

    def pruned(self, start=None, end=None, window_s: float | None = None, models: Iterable[str] = (),
               runs: Iterable[str] = ()) -> "Pruned":
        """This store as a query needs it that keeps only forwards starting in [`start`, `end`]
        (UTC), in the last `window_s` seconds before the newest forward, of `models` and of `runs`
        (empty: any): its `query` opens only the files the manifest says may hold such a forward.
        The store itself when nothing is to be pruned."""
        if start is None and end is None and window_s is None and not models and not runs:
            return self
        return Pruned(self, start, end, window_s, tuple(models), tuple(runs))

    # writing

    def write_traces(self, traces: Iterable[LoopTrace], resource: Mapping[str, Any] | None = None) -> int:
        """Store `traces` with their raw span rows as one committed file set; returns the number of new forwards."""
        traces = list(traces)
        return self.write(traces, [trace_span_row(t, resource) for t in traces])

    def write(self, traces: Sequence[LoopTrace], span_rows: Sequence[Mapping[str, Any]]) -> int:
        """Store decoded forwards and raw span rows not yet in the folder, as one committed file
        set; returns the number of new forwards."""
        return len(self.write_new(traces, span_rows))

    def write_new(self, traces: Sequence[LoopTrace], span_rows: Sequence[Mapping[str, Any]]) -> list[LoopTrace]:
        """As `write`, returning the forwards that were new: stored now, by no earlier commit of
        any writer. Returns once the file set is committed and on disk (fsynced)."""
        if self.read_only:
            raise StoreError(f"Parquet store {self.path} is open read-only")
        traces, span_rows = list(traces), list(span_rows)
        keys = {"forwards": forward_ids([t.trace_id for t in traces], [t.span_id for t in traces]),
                "spans": forward_ids([r["trace_id"] for r in span_rows], [r["span_id"] for r in span_rows])}
        with self._write_lock:
            while True:
                with self._log_lock:
                    self._snapshot.advance()
                    keep = {t: _first_new(self._snapshot, t, k) for t, k in keys.items()}
                new = [t for t, k in zip(traces, keep["forwards"]) if k]
                rows = [r for r, k in zip(span_rows, keep["spans"]) if k]
                if not new and not rows:
                    return []
                added = self._write_files(new, rows)
                commit = {"add": added, "keys": {t: keys[t][keep[t]].tolist() for t in _KEYED}}

                def still_new(snapshot: Snapshot) -> bool:
                    return not any(snapshot.known(t, keys[t][keep[t]]).any() for t in _KEYED)

                try:
                    self._commit(commit, still_new)
                except _Conflict:  # another writer committed some of these keys first: drop them
                    self._delete(added)
                    continue
                except BaseException:
                    self._delete_uncommitted(added)
                    raise
                self.files.extend(self.path / e["path"] for e in added)
                break
        self._maybe_compact()
        return new

    def _write_files(self, traces: list[LoopTrace], span_rows: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """One file per table and date, fsynced and renamed into place (not yet committed);
        their manifest entries."""
        tables = {name: arrow for name, arrow in (trace_tables(traces, 0) if traces else {}).items() if arrow.num_rows}
        if traces:  # store-local numbering 0..n-1 → the writer-independent hash
            ids = forward_ids([t.trace_id for t in traces], [t.span_id for t in traces])
            for name, arrow in tables.items():
                local = arrow.column("forward_id").to_numpy()
                tables[name] = arrow.set_column(arrow.schema.get_field_index("forward_id"), "forward_id",
                                                pa.array(ids[local], pa.int64()))
        if span_rows:
            tables["spans"] = spans_table(span_rows)
        days = _days(tables)
        self._tmp.mkdir(parents=True, exist_ok=True)
        sequence = next(self._sequence)
        added: list[dict[str, Any]] = []
        try:
            for name in [t for t in (*_CHILD_TABLES, "spans", "forwards") if t in tables]:
                for date in np.unique(days[name]):
                    part = tables[name].filter(pa.array(days[name] == date))
                    # sorted by the lookup key: one forward's rows are in one row group
                    part = part.sort_by("forward_id" if name != "spans" else [("trace_id", "ascending"), ("span_id", "ascending")])
                    staged = self._tmp / f"{name}-{sequence}-{date}.parquet"
                    pq.write_table(part, staged)
                    models = runs = None  # spans: unknown
                    if name != "spans":  # the manifest's pruning keys: the models and runs of the date's forwards
                        forwards = tables["forwards"].filter(pa.array(days["forwards"] == date))
                        models, runs = (sorted(set(forwards.column(c).to_pylist()) - {None}) for c in ("model_id", "run_id"))
                    rel = f"{name}/date={date}/{self.writer}-{sequence:06d}-0.parquet"
                    added.append(self._place(staged, rel, name, str(date), models, runs))
            self._sync_folders(added)
        except BaseException:
            self._delete(added)
            raise
        return added

    def _place(self, staged: Path, rel: str, table: str, date: str, models, runs) -> dict[str, Any]:
        """Fsyncs `staged`, renames it to `rel` and returns its manifest entry."""
        meta = pq.read_metadata(staged)
        entry = {"path": rel, "table": table, "date": date, "rows": meta.num_rows, "bytes": staged.stat().st_size,
                 "columns": meta.schema.to_arrow_schema().names, "models": models, "runs": runs}
        _fsync(staged)
        target = self.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)  # atomic within one filesystem; the folder is fsynced by `_sync_folders`
        return entry

    def _sync_folders(self, entries: Iterable[Mapping[str, Any]]) -> None:
        """Fsyncs the folders `entries` were renamed into, once each: then the renames are durable."""
        for folder in sorted({(self.path / e["path"]).parent for e in entries}):
            _fsync(folder)

    def _delete(self, entries: Iterable[Mapping[str, Any]]) -> None:
        for entry in entries:
            (self.path / entry["path"]).unlink(missing_ok=True)  # pragma: no mutate (the files were just placed; missing_ok only spares a second delete)

    def _delete_uncommitted(self, entries: Sequence[Mapping[str, Any]]) -> None:
        """Deletes a failed commit's files, unless it failed after its entry was linked (e.g. the
        fsync of `_log`): a committed file is never deleted but by a compaction."""
        with self._log_lock:
            if entries and entries[0]["path"] in self._snapshot.entries:
                return
        self._delete(entries)

    def _commit(self, commit: dict[str, Any], valid) -> int:
        """Appends `commit` to the log as its next version; raises `_Conflict` when `valid(snapshot)`
        fails on the log as it then is. Returns the version."""
        commit = {"writer": self.writer, "time": time.time(), "add": [], "remove": [], "keys": {}, **commit}
        self._tmp.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp / f"commit-{secrets.token_hex(4)}.json"  # pragma: no mutate (the temporary name's length does not matter)
        tmp.write_text(json.dumps(commit))
        _fsync(tmp)
        try:
            while True:
                with self._log_lock:
                    self._snapshot.advance()
                    if not valid(self._snapshot):
                        raise _Conflict()
                    version = self._snapshot.version + 1
                    target = _entry_path(self.path, version)
                    try:
                        os.link(tmp, target)  # fails if the version exists: one writer wins it
                    except FileExistsError:
                        # NFS may report EEXIST for a link it made when it retried the call
                        if tmp.stat().st_nlink < 2:
                            continue
                    self._snapshot._apply(version, commit)
                    _fsync(target.parent)
                    return version
        finally:
            tmp.unlink(missing_ok=True)

    # compaction and cleaning

    def _maybe_compact(self) -> None:
        if self.compact_above is None or len(self._snapshot.entries) <= self.compact_above:
            return
        if self._compactor is not None and self._compactor.is_alive():
            return

        def run() -> None:
            try:
                self.compact()
            except Exception:  # the folder stays as it was; the next write tries again
                logger.exception("compaction of %s failed", self.path)

        self._compactor = threading.Thread(target=run, name="parquet-compact", daemon=True)
        self._compactor.start()

    def compact(self, retain_removed_seconds: float = RETAIN_REMOVED_SECONDS) -> dict[str, int]:
        """Merges the committed files of each table and date (smaller than `COMPACT_BELOW_BYTES`)
        into one file, committed as one entry; then deletes orphans and files removed more than
        `retain_removed_seconds` ago. Returns {"before": files, "after": files}."""
        if self.read_only:
            raise StoreError(f"Parquet store {self.path} is open read-only")
        with self._compact_lock:
            entries = dict(self.snapshot().entries)
            groups: dict[tuple, list[str]] = defaultdict(list)
            for rel, e in sorted(entries.items()):
                if e["bytes"] < COMPACT_BELOW_BYTES:
                    groups[(e["table"], e["date"], tuple(e["columns"]))].append(rel)
            groups = {k: v for k, v in groups.items() if len(v) > 1}
            if groups:
                self._merge(entries, groups)
            self.clean(retain_removed_seconds)
            return {"before": len(entries), "after": len(self.snapshot().entries)}

    def _merge(self, entries: Mapping[str, Mapping[str, Any]], groups: Mapping[tuple, list[str]]) -> None:
        sequence = next(self._sequence)
        self._tmp.mkdir(parents=True, exist_ok=True)
        added, removed = [], []
        try:
            for i, ((table, date, _), rels) in enumerate(sorted(groups.items())):
                order = "forward_id" if table != "spans" else "trace_id, span_id"
                staged = self._tmp / f"compact-{sequence}-{i}.parquet"
                files = ", ".join(_sql_literal(str(self.path / r)) for r in rels)
                with self._cursors.cursor(read=False) as cur:
                    cur.execute(f"COPY (SELECT * FROM read_parquet([{files}], {_NO_HIVE}) ORDER BY {order}) "
                                f"TO {_sql_literal(str(staged))} (FORMAT parquet)")
                models, runs = (None if any(entries[r][k] is None for r in rels)
                                else sorted({v for r in rels for v in entries[r][k]}) for k in ("models", "runs"))
                rel = f"{table}/date={date}/{self.writer}-{sequence:06d}-c{i}.parquet"
                added.append(self._place(staged, rel, table, date, models, runs))
                removed.extend(rels)
            self._sync_folders(added)
            self._commit({"add": added, "remove": removed},
                         lambda snapshot: all(r in snapshot.entries for r in removed))
        except _Conflict:  # another compaction replaced some of these files first
            self._delete(added)
        except BaseException:
            self._delete_uncommitted(added)
            raise

    def clean(self, retain_removed_seconds: float = RETAIN_REMOVED_SECONDS) -> int:
        """Deletes what no reader reads: the files and staging folders of writers that died before
        committing, and files a compaction removed more than `retain_removed_seconds` ago.
        Returns the number of files deleted."""
        snapshot = self.snapshot()
        known = set(snapshot.entries) | set(snapshot.removed)
        now, deleted = time.time(), 0
        for staging in self.path.glob(".tmp-*"):
            writer = staging.name[len(".tmp-"):]
            if writer != self.writer and not _writer_alive(writer, _mtime(staging)):
                shutil.rmtree(staging, ignore_errors=True)
        for table in TABLES:
            for path in (self.path / table).glob("date=*/*.parquet"):
                rel = path.relative_to(self.path).as_posix()
                if rel in snapshot.removed:
                    gone = now - snapshot.removed[rel] >= retain_removed_seconds
                elif rel not in known:
                    writer = path.name.rsplit("-", 2)[0]
                    gone = writer != self.writer and not _writer_alive(writer, _mtime(path))
                else:
                    gone = False
                if gone:
                    path.unlink(missing_ok=True)
                    deleted += 1
        return deleted


def _days(tables: Mapping[str, pa.Table]) -> dict[str, np.ndarray]:
    """Per table, each row's partition: the UTC date (YYYY-MM-DD) of its forward's start, or of the
    span's own start for spans."""
    def day(ns: np.ndarray) -> np.ndarray:
        return (np.asarray(ns, np.int64) // 86_400_000_000_000).astype("datetime64[D]").astype(str)

    days = {}
    if "spans" in tables:
        days["spans"] = day(tables["spans"].column("start_ns").to_numpy())
    if "forwards" in tables:
        ids = tables["forwards"].column("forward_id").to_numpy()
        forward_days = day(tables["forwards"].column("start_ns").to_numpy())
        order = np.argsort(ids)
        for name in (n for n in tables if n != "spans"):
            at = order[np.searchsorted(ids, tables[name].column("forward_id").to_numpy(), sorter=order)]
            days[name] = forward_days[at]
    return days


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return time.time()


def _first_new(snapshot: Snapshot, table: str, keys: np.ndarray) -> np.ndarray:
    """Keys not committed yet, each kept at its first occurrence in the batch."""
    first = np.zeros(len(keys), bool)
    if len(keys):
        first[np.unique(keys, return_index=True)[1]] = True
    return first & ~snapshot.known(table, keys)


def compact(path: str | Path, retain_removed_seconds: float = RETAIN_REMOVED_SECONDS) -> dict[str, int]:
    """Compacts the store folder `path` in place (see `ParquetStore.compact`); a folder of layout 1
    (before the commit log) is converted first (`adopt_layout_1`)."""
    if not (Path(path) / MARKER).is_file():
        raise StoreError(f"{path} is not a mythos-probe Parquet store folder (no {MARKER}); nothing to compact")
    try:
        version = json.loads((Path(path) / MARKER).read_text())["layout_version"]
    except (ValueError, KeyError, TypeError):
        version = LAYOUT_VERSION  # ParquetStore says what is wrong  # pragma: no mutate (any version but 1 does the same)
    if version == 1:
        adopt_layout_1(path)
    with ParquetStore(path) as store:
        return store.compact(retain_removed_seconds)


_ADOPT = {  # layout 1 could hold a forward twice and child rows without their forward: kept once, with it
    "forwards": "SELECT DISTINCT ON (forward_id) * FROM {src} ORDER BY forward_id",
    "spans": "SELECT DISTINCT ON (trace_id, span_id) * FROM {src} ORDER BY trace_id, span_id",
    **{t: "SELECT DISTINCT * FROM {src} WHERE forward_id IN (SELECT forward_id FROM adopted_forwards) ORDER BY forward_id"
       for t in _CHILD_TABLES},
}


def adopt_layout_1(path: str | Path) -> None:
    """Converts a folder written before the commit log (layout 1) in place, with no writer running:
    its rows, each forward once and only child rows whose forward is there, become one committed
    file set per table and date, the marker says layout 2, and the old files, named by no commit,
    are deleted. Killed midway, it starts again from the old files."""
    root = Path(path)
    unfinished = Snapshot(root)  # an earlier attempt, killed before the marker: its files go
    unfinished.advance()
    for rel in unfinished.entries:
        (root / rel).unlink(missing_ok=True)
    shutil.rmtree(root / LOG, ignore_errors=True)
    old = {t: sorted((root / t).glob("date=*/*.parquet")) for t in TABLES}
    (root / LOG).mkdir()
    store = ParquetStore.__new__(ParquetStore)  # a writer of layout 2 without the marker check
    store.path, store.read_only, store.files = root, False, []  # pragma: no mutate (the conversion's writer checks no read_only flag)
    store._snapshot, store._log_lock = Snapshot(root), threading.Lock()
    store.writer = f"{_host()}-{os.getpid()}-{secrets.token_hex(3)}"
    store._tmp, store._sequence = root / f".tmp-{store.writer}", itertools.count()
    con = duckdb.connect(":memory:")
    added, keys = [], {}
    try:
        store._tmp.mkdir()
        for table in ("forwards", *_CHILD_TABLES, "spans"):
            if not old[table]:
                continue
            files = ", ".join(_sql_literal(str(f)) for f in old[table])
            src = f"read_parquet([{files}], hive_partitioning = true, union_by_name = true)"
            con.execute(f"CREATE TABLE adopted_{table} AS {_ADOPT[table].format(src=src)}")
            for (date,) in con.execute(f"SELECT DISTINCT date FROM adopted_{table}").fetchall():
                staged = store._tmp / f"{table}-{date}.parquet"
                con.execute(f"COPY (SELECT * EXCLUDE (date) FROM adopted_{table} WHERE date = ?) "
                            f"TO {_sql_literal(str(staged))} (FORMAT parquet)", [date])
                labels = (None, None) if table == "spans" else [
                    sorted(v for (v,) in con.execute(f"SELECT DISTINCT {c} FROM adopted_forwards WHERE date = ?", [date]).fetchall())
                    for c in ("model_id", "run_id")]  # pragma: no mutate (SQL identifiers are case-insensitive)
                added.append(store._place(staged, f"{table}/date={date}/{store.writer}-000000-0.parquet", table, str(date), *labels))
        if old["forwards"]:
            keys["forwards"] = [int(v) for (v,) in con.execute("SELECT forward_id FROM adopted_forwards").fetchall()]  # pragma: no mutate (SQL is read case-insensitively)
        if old["spans"]:
            ids = con.execute("SELECT trace_id, span_id FROM adopted_spans").fetchall()  # pragma: no mutate (SQL is read case-insensitively)
            keys["spans"] = forward_ids([t for t, _ in ids], [s for _, s in ids]).tolist()
        store._sync_folders(added)
        store._commit({"add": added, "keys": keys}, lambda snapshot: snapshot.version == 0)
        tmp = root / f".{MARKER}.{secrets.token_hex(4)}.tmp"  # pragma: no mutate (the temporary name's length does not matter)
        tmp.write_text(json.dumps({"format": "mythos-probe parquet store", "layout_version": LAYOUT_VERSION}))
        os.replace(tmp, root / MARKER)
    finally:
        con.close()
        shutil.rmtree(store._tmp, ignore_errors=True)  # pragma: no mutate (the folder exists: it is made first in the try)
    for files in old.values():
        for f in files:
            f.unlink(missing_ok=True)  # pragma: no mutate (no writer runs during a conversion: nothing else deletes them)
