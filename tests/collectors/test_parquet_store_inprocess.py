"""`collectors/parquet_store.py` driven in this process, for the mutation run (issue 24) and as
pins of the folder's format: the commit entry and the manifest written literally (file names,
sequence numbers, rows and bytes, models and runs, keys), each file sorted by its lookup key, the
date partition of each row (a span by its own start, a child row by its forward's), compaction's
entry and what it deletes when, the cleaning of a dead writer's files (and only of those), the
background compaction above a file count, a failure before and after the commit's link, a link
that NFS reports as failed although it was made, two compactions racing, and layout 1 converted.
Every expected value is worked out here from the traces or written literally, not read back
through the store. The process-based faults are in test_parquet_faults.py."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mythos_probe.collectors import parquet_store as PS
from mythos_probe.collectors.parquet_store import ParquetStore, committed
from mythos_probe.collectors.rows import trace_span_row
from mythos_probe.collectors.schema import TABLES
from mythos_probe.collectors.store import Store
from tests.collectors.factory import make_trace

DAY_NS = 86_400 * 10**9
# 2025-10-09T08:53:20Z: make_trace's default start
T0 = 1_760_000_000_000_000_000


def traces(seeds, day=0, model="mythos-tiny", run="run-a", **kw):
    return [make_trace(s, batch=2, seq_len=3, n_loops=3, model_id=model, run_id=run, start_ns=T0 + day * DAY_NS, **kw)
            for s in seeds]


def log(folder) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(folder) / "_log").glob("*.json"))]


def on_disk(folder) -> set[str]:
    return {p.relative_to(folder).as_posix() for t in TABLES for p in (Path(folder) / t).glob("date=*/*.parquet")}


def rows_of(ts) -> dict[str, int]:
    return {"forwards": len(ts), "iterations": sum(t.iterations for t in ts),
            "positions": sum(t.batch * t.seq_len * t.iterations for t in ts if t.detail == "positions"),
            "experts": sum(t.expert_load.size for t in ts if t.expert_load is not None), "spans": len(ts)}


def test_a_file_set_and_its_commit_entry_are_written_as_specified(tmp_path):
    folder = tmp_path / "pq"
    day0 = traces([3, 1], model="m-b", run="r-2") + traces([2], model="m-a", run="r-1")
    day1 = traces([4], day=1, model="m-c", run="r-3")
    with ParquetStore(folder) as w:
        before = time.time()
        assert w.write_traces(day0 + day1) == 4
        after = time.time()
        writer = w.writer
        assert w.files == [folder / e["path"] for e in log(folder)[0]["add"]]
        assert w.write_traces(traces([5])) == 1
    assert sorted(p.name for p in (folder / "_log").iterdir()) == ["000000000001.json", "000000000002.json"]
    first, second = log(folder)
    # host-pid-6 hex digits: the suffix tells apart writers of one pid over time (pid reuse)
    assert re.fullmatch(rf"{re.escape(PS._host())}-{os.getpid()}-[0-9a-f]{{6}}", writer)
    assert set(first) == {"writer", "time", "add", "remove", "keys"}
    assert first["writer"] == writer and before <= first["time"] <= after and first["remove"] == []
    dates = {"2025-10-09": day0, "2025-10-10": day1}
    want = []
    for table in ("iterations", "positions", "experts", "spans", "forwards"):  # the order the files are written in
        for date, ts in dates.items():
            labels = (None, None) if table == "spans" else (sorted({t.model_id for t in ts}), sorted({t.run_id for t in ts}))
            want.append({"path": f"{table}/date={date}/{writer}-000000-0.parquet", "table": table, "date": date,
                         "rows": rows_of(ts)[table], "models": labels[0], "runs": labels[1]})
    got = [{k: e[k] for k in ("path", "table", "date", "rows", "models", "runs")} for e in first["add"]]
    assert got == want
    for e in first["add"]:
        path = folder / e["path"]
        assert e["bytes"] == path.stat().st_size
        assert e["columns"] == pq.read_schema(path).names
        assert set(e["columns"]) <= {c for c, _ in TABLES[e["table"]]}
    # the keys: the 63-bit hash of (trace_id, span_id), forwards and spans alike
    ids = PS.forward_ids([t.trace_id for t in day0 + day1], [t.span_id for t in day0 + day1]).tolist()
    assert first["keys"] == {"forwards": ids, "spans": ids}
    assert [e["path"] for e in second["add"]][0].endswith(f"{writer}-000001-0.parquet")
    # each file sorted by its lookup key, the forward_id the hash of its forward's key
    fw = pq.read_table(folder / f"forwards/date=2025-10-09/{writer}-000000-0.parquet")
    assert fw["forward_id"].to_pylist() == sorted(ids[:3])
    assert dict(zip(fw["trace_id"].to_pylist(), fw["forward_id"].to_pylist())) == \
        {t.trace_id: i for t, i in zip(day0, ids[:3])}
    it = pq.read_table(folder / f"iterations/date=2025-10-09/{writer}-000000-0.parquet")
    assert it["forward_id"].to_pylist() == sorted(it["forward_id"].to_pylist()) and set(it["forward_id"].to_pylist()) == set(ids[:3])
    sp = pq.read_table(folder / f"spans/date=2025-10-09/{writer}-000000-0.parquet")
    keys = list(zip(sp["trace_id"].to_pylist(), sp["span_id"].to_pylist()))
    assert keys == sorted((t.trace_id, t.span_id) for t in day0)


def test_a_span_is_partitioned_by_its_own_start_a_child_row_by_its_forwards(tmp_path):
    late = make_trace(1, batch=1, seq_len=2, n_loops=2, start_ns=T0 - 9 * 3600 * 10**9)  # 2025-10-08 23:53
    row = dict(trace_span_row(late), start_ns=T0 + DAY_NS)  # a span that starts the next day
    with ParquetStore(tmp_path / "pq") as w:
        assert w.write([late], [row]) == 1
    entries = committed(tmp_path / "pq").entries.values()
    assert {(e["table"], e["date"]) for e in entries} == {
        ("forwards", "2025-10-08"), ("iterations", "2025-10-08"), ("positions", "2025-10-08"),
        ("experts", "2025-10-08"), ("spans", "2025-10-10")}


def test_days_of_rows_unsorted_and_on_a_day_boundary():
    day = 86_400_000_000_000
    tables = {
        "forwards": pa.table({"forward_id": [30, 10, 20], "start_ns": [2 * day, day - 1, day]}),
        "iterations": pa.table({"forward_id": [20, 30, 10, 10]}),
        "spans": pa.table({"start_ns": [0, day]}),
    }
    days = PS._days(tables)
    assert days["forwards"].tolist() == ["1970-01-03", "1970-01-01", "1970-01-02"]
    assert days["iterations"].tolist() == ["1970-01-02", "1970-01-03", "1970-01-01", "1970-01-01"]
    assert days["spans"].tolist() == ["1970-01-01", "1970-01-02"]
    assert PS._days({"spans": tables["spans"]}).keys() == {"spans"}
    assert PS._day(pd.Timestamp("2026-01-01 23:30", tz="America/New_York")) == "2026-01-02"
    assert PS._day(pd.Timestamp("2026-01-01 23:30")) == "2026-01-01"


def test_writing_nothing_new_commits_nothing_and_spans_alone_are_stored(tmp_path):
    folder = tmp_path / "pq"
    ts = traces([1, 2])
    with ParquetStore(folder) as w:
        assert w.write([], []) == 0 and log(folder) == []
        assert w.write([], [trace_span_row(t) for t in ts]) == 0  # spans only: no forward is new
        assert [e["table"] for e in log(folder)[0]["add"]] == ["spans"]
        assert log(folder)[0]["keys"] == {"forwards": [], "spans": PS.forward_ids([t.trace_id for t in ts], [t.span_id for t in ts]).tolist()}
        assert w.write_new(ts, []) == ts
        assert w.write_new(ts + ts, [trace_span_row(t) for t in ts]) == []
        assert len(log(folder)) == 2
        counts = {t: int(w.query(f"SELECT count(*) AS n FROM {t}")["n"].iloc[0]) for t in TABLES}
    assert counts == rows_of(ts)


def test_an_empty_folder_answers_with_every_column_and_no_row(tmp_path):
    with ParquetStore(tmp_path / "pq") as w:
        for table, columns in TABLES.items():
            df = w.query(f"SELECT * FROM {table}")
            assert list(df.columns) == [c for c, _ in columns] and len(df) == 0, table
        # a column a file lacks reads as NULL, of the table's type
        w.write_traces(traces([1]))
        assert PS._casts("experts", ["load"]).startswith('CAST(NULL AS VARCHAR) AS "trace_id"')
        assert 'CAST("load" AS BIGINT) AS "load"' in PS._casts("experts", ["load"])


def test_open_read_only_opens_a_folder_as_parquet_and_a_file_as_duckdb(tmp_path):
    with ParquetStore(tmp_path / "pq") as w:
        w.write_traces(traces([1]))
    Store(tmp_path / "s.duckdb").close()
    with PS.open_read_only(tmp_path / "pq") as r:
        assert isinstance(r, ParquetStore) and r.read_only is True
    r = PS.open_read_only(tmp_path / "s.duckdb")
    assert isinstance(r, Store)
    r.close()


def test_close_keeps_a_read_only_folder_as_it_is(tmp_path):
    folder = tmp_path / "pq"
    ParquetStore(folder).close()
    staging = folder / ".tmp-someone-else"
    staging.mkdir()
    with ParquetStore.open_read_only(folder) as r:
        assert r.snapshot().version == 0
    assert staging.is_dir()


def test_compaction_entry_merged_files_and_what_is_deleted_when(tmp_path):
    folder = tmp_path / "pq"
    sets = [traces([1, 2], model="m-b", run="r-1"), traces([3], model="m-a", run="r-2"), traces([4], model="m-a", run="r-1")]
    with ParquetStore(folder) as w:
        for s in sets:
            w.write_traces(s)
        old = set(committed(folder).entries)
        assert w.compact() == {"before": 15, "after": 5}
        writer = w.writer
    entry = log(folder)[-1]
    assert set(entry["remove"]) == old and entry["writer"] == writer
    order = ["experts", "forwards", "iterations", "positions", "spans"]  # the groups, sorted by table
    assert [e["path"] for e in entry["add"]] == [f"{t}/date=2025-10-09/{writer}-000003-c{i}.parquet" for i, t in enumerate(order)]
    every = [t for s in sets for t in s]
    for e in entry["add"]:
        assert e["rows"] == rows_of(every)[e["table"]]
        labels = (None, None) if e["table"] == "spans" else (["m-a", "m-b"], ["r-1", "r-2"])
        assert (e["models"], e["runs"]) == labels
        table = pq.read_table(folder / e["path"])
        if e["table"] == "spans":
            keys = list(zip(table["trace_id"].to_pylist(), table["span_id"].to_pylist()))
            assert keys == sorted(keys)
        else:
            assert table["forward_id"].to_pylist() == sorted(table["forward_id"].to_pylist())
    # the replaced files stay RETAIN_REMOVED_SECONDS for running queries …
    assert on_disk(folder) == set(committed(folder).entries) | old
    with ParquetStore(folder) as w:
        assert w.clean() == 0 and on_disk(folder) >= old
        assert w.clean(retain_removed_seconds=0) == len(old)  # … then go
        assert on_disk(folder) == set(committed(folder).entries)
        assert w.compact() == {"before": 5, "after": 5}  # one file per table and date: nothing to merge
    assert len(log(folder)) == 4
    with ParquetStore.open_read_only(folder) as r:
        assert {t: int(r.query(f"SELECT count(*) AS n FROM {t}")["n"].iloc[0]) for t in TABLES} == rows_of(every)


def test_compaction_leaves_large_files_and_a_group_of_one_alone(tmp_path, monkeypatch):
    folder = tmp_path / "pq"
    with ParquetStore(folder) as w:
        w.write_traces(traces([1]))
        w.write_traces(traces([2]))
        w.write_traces(traces([3], day=1))  # its own dates: groups of one file
        entries = committed(folder).entries
        monkeypatch.setattr(PS, "COMPACT_BELOW_BYTES", min(e["bytes"] for e in entries.values()))
        assert w.compact(retain_removed_seconds=0) == {"before": 15, "after": 15}
        # at the size of the largest file of the first day: that file stays out (below, not at)
        limit = max(e["bytes"] for e in entries.values() if e["date"] == "2025-10-09")
        groups = {}
        for e in entries.values():
            groups.setdefault((e["table"], e["date"]), []).append(e["bytes"])
        merged = [len([b for b in sizes if b < limit]) for sizes in groups.values()]
        at_or_below = [len([b for b in sizes if b <= limit]) for sizes in groups.values()]
        want = 15 - sum(n - 1 for n in merged if n > 1)
        assert want != 15 - sum(n - 1 for n in at_or_below if n > 1)  # the fixture tells < from <=
        monkeypatch.setattr(PS, "COMPACT_BELOW_BYTES", limit)
        assert w.compact(retain_removed_seconds=0) == {"before": 15, "after": want}
    assert [len(e["remove"]) for e in log(folder)] == [0, 0, 0, sum(n for n in merged if n > 1)]


def test_clean_deletes_what_dead_writers_left_and_nothing_else(tmp_path):
    folder = tmp_path / "pq"
    with ParquetStore(folder) as w:
        w.write_traces(traces([1]))
        committed_files = on_disk(folder)
        old = time.time() - PS.FOREIGN_ORPHAN_SECONDS - 60
        part = folder / "forwards" / "date=2025-10-09"
        dead = [part / "far-away-4242-abcdef-000000-0.parquet", folder / "spans" / "date=2025-10-01" / "far-9-aaaaaa-000007-0.parquet"]
        alive = [part / "far-away-4243-abcdef-000000-0.parquet", part / f"{w.writer}-000099-0.parquet"]
        for path in dead + alive:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
        for path in dead:
            os.utime(path, (old, old))
        staging_dead, staging_alive = folder / ".tmp-far-away-4242-abcdef", folder / ".tmp-far-away-4243-abcdef"
        for staging in (staging_dead, staging_alive):
            (staging / "x.parquet").parent.mkdir()
            (staging / "x.parquet").write_bytes(b"x")
        os.utime(staging_dead, (old, old))
        old_own = folder / f".tmp-{w.writer}"
        assert w.clean() == 2  # files only; the staging folder is not counted
        assert on_disk(folder) == committed_files | {p.relative_to(folder).as_posix() for p in alive}
        assert not staging_dead.exists() and staging_alive.is_dir()
        os.utime(alive[1], (old, old))  # this writer's own file, however old: it may be committing it
        assert w.clean() == 0
        assert alive[1].exists()
    assert not old_own.exists()


def test_a_new_writer_cleans_what_a_dead_one_left(tmp_path):
    folder = tmp_path / "pq"
    ParquetStore(folder).close()
    staging = folder / ".tmp-far-1-abcdef"
    staging.mkdir()
    old = time.time() - PS.FOREIGN_ORPHAN_SECONDS - 1
    os.utime(staging, (old, old))
    ParquetStore(folder).close()
    assert not staging.exists()


def test_writer_liveness_when_the_pid_belongs_to_another_user(monkeypatch):
    def refuse(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(PS.os, "kill", refuse)
    assert PS._writer_alive(f"{PS._host()}-12345-abc", time.time()) is True
    assert PS._writer_alive(f"{PS._host()}-x-abc", time.time()) is True  # no pid: not ours to judge
    assert PS._writer_alive(f"{PS._host()}-12345-abc", time.time() - PS.FOREIGN_ORPHAN_SECONDS) is False


def test_a_foreign_writer_is_an_orphan_from_exactly_a_day_on(monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(PS.time, "time", lambda: 2_000_000_000.0)
        day = PS.FOREIGN_ORPHAN_SECONDS
        assert PS._writer_alive("far-1-abc", 2_000_000_000.0 - day) is False
        assert PS._writer_alive("far-1-abc", 2_000_000_000.0 - day + 1) is True


def test_mtime_of_a_vanished_path_is_now(tmp_path):
    before = time.time()
    assert before <= PS._mtime(tmp_path / "gone") <= time.time()
    (tmp_path / "f").write_text("x")
    os.utime(tmp_path / "f", (1000.0, 1000.0))
    assert PS._mtime(tmp_path / "f") == 1000.0


def test_compact_above_compacts_in_the_background_after_a_write(tmp_path):
    folder = tmp_path / "pq"
    with ParquetStore(folder, compact_above=10) as w:
        w.write_traces(traces([1]))
        w.write_traces(traces([2]))  # 10 files: not above 10
        assert w._compactor is None
        w.write_traces(traces([3]))  # 15: compacts in a thread; close waits for it
        assert w._compactor is not None
        assert (w._compactor.name, w._compactor.daemon) == ("parquet-compact", True)  # never holds the process up
    assert [bool(e["remove"]) for e in log(folder)] == [False, False, False, True]
    assert len(committed(folder).entries) == 5
    with ParquetStore(folder) as w:  # compact_above None: never
        for s in range(4, 7):
            w.write_traces(traces([s]))
        assert w._compactor is None
    assert len(committed(folder).entries) == 20


def test_a_failed_background_compaction_is_logged_and_the_folder_kept(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "pq"

    def fail(self, *a, **k):
        raise OSError("disk on fire")

    monkeypatch.setattr(ParquetStore, "compact", fail)
    with caplog.at_level(logging.ERROR, logger=PS.__name__):
        with ParquetStore(folder, compact_above=1) as w:
            assert w.write_traces(traces([1])) == 1
    assert any(f"compaction of {folder} failed" in r.getMessage() for r in caplog.records)
    assert len(committed(folder).entries) == 5


def test_a_commit_that_fails_before_its_link_deletes_its_files_after_it_keeps_them(tmp_path, monkeypatch):
    folder = tmp_path / "pq"
    with ParquetStore(folder) as w:
        real = PS._fsync

        def fsync_failing(on):
            def fsync(path):
                if on(Path(path)):
                    raise OSError("fsync failed")
                real(path)
            return fsync

        monkeypatch.setattr(PS, "_fsync", fsync_failing(lambda p: p.name.startswith("commit-")))
        with pytest.raises(OSError, match="fsync failed"):
            w.write_traces(traces([1]))
        assert on_disk(folder) == set() and log(folder) == []
        monkeypatch.setattr(PS, "_fsync", fsync_failing(lambda p: p.name == "_log"))
        with pytest.raises(OSError, match="fsync failed"):
            w.write_traces(traces([1]))
        assert len(log(folder)) == 1 and on_disk(folder) == set(committed(folder).entries) != set()
        monkeypatch.setattr(PS, "_fsync", real)
        assert w.write_traces(traces([1])) == 0  # committed already
        # the same for a file set of one file (spans only)
        monkeypatch.setattr(PS, "_fsync", fsync_failing(lambda p: p.name == "_log"))
        with pytest.raises(OSError, match="fsync failed"):
            w.write([], [trace_span_row(t) for t in traces([7])])
        assert len(log(folder)) == 2 and on_disk(folder) == set(committed(folder).entries)
        monkeypatch.setattr(PS, "_fsync", real)
        # a data file's fsync failing: the files placed before it are deleted, nothing committed
        monkeypatch.setattr(PS, "_fsync", fsync_failing(lambda p: p.name.startswith("forwards-")))
        before = on_disk(folder)
        with pytest.raises(OSError, match="fsync failed"):
            w.write_traces(traces([2]))
        assert on_disk(folder) == before and len(log(folder)) == 2


def test_a_link_reported_failed_although_made_commits_once(tmp_path, monkeypatch):
    """NFS may answer EEXIST to a link it made when it retried the call: the entry is ours."""
    folder = tmp_path / "pq"
    real = os.link
    calls = []

    def link_then_eexist(src, dst):
        calls.append(dst)
        real(src, dst)
        raise FileExistsError(17, "File exists")

    with ParquetStore(folder) as w:
        monkeypatch.setattr(PS.os, "link", link_then_eexist)
        assert w.write_traces(traces([1])) == 1
        monkeypatch.setattr(PS.os, "link", real)
        assert len(calls) == 1 and len(log(folder)) == 1
        assert w.write_traces(traces([2])) == 1
    assert sorted(p.name for p in (folder / "_log").iterdir()) == ["000000000001.json", "000000000002.json"]


def test_a_writer_that_lost_a_version_to_another_takes_the_next(tmp_path, monkeypatch):
    folder = tmp_path / "pq"
    a, b = ParquetStore(folder), ParquetStore(folder)
    real = os.link
    raced = []

    def b_first(src, dst):
        if not raced:  # b commits version 1 after a read the log and chose 1
            raced.append(None)
            raced[0] = b.write_traces(traces([2]))
        return real(src, dst)

    monkeypatch.setattr(PS.os, "link", b_first)
    assert a.write_traces(traces([1])) == 1
    monkeypatch.setattr(PS.os, "link", real)
    a.close(), b.close()
    assert raced == [1] and [e["writer"] for e in log(folder)] == [b.writer, a.writer]
    with ParquetStore.open_read_only(folder) as r:
        assert r.query("SELECT count(*) AS n FROM forwards")["n"].iloc[0] == 2


def test_two_compactions_racing_the_loser_deletes_its_merged_files(tmp_path):
    folder = tmp_path / "pq"
    with ParquetStore(folder) as w:
        for s in range(3):
            w.write_traces(traces([s]))
    a, b = ParquetStore(folder), ParquetStore(folder)
    sync = a._sync_folders

    def b_compacts_first(entries):
        sync(entries)
        b.compact()

    a._sync_folders = b_compacts_first
    a.compact()
    a.close(), b.close()
    removals = [e for e in log(folder) if e["remove"]]
    assert len(removals) == 1 and removals[0]["writer"] == b.writer
    snap = committed(folder)
    assert on_disk(folder) == set(snap.entries) | set(snap.removed)  # a's merged files are gone


@pytest.mark.parametrize("stale", [True, False], ids=["after a killed attempt", "first attempt"])
def test_layout_1_converted_in_process(tmp_path, monkeypatch, stale):
    """As test_parquet_faults.py's conversion test, without the CLI process: a forwards file there
    twice and child files whose forwards never came; each forward kept once with its rows. An
    earlier attempt killed before it wrote the marker left a log naming its files (one already
    deleted): they go; without it there is no `_log` at all."""
    import shutil

    cwd = tmp_path / "cwd"  # the conversion's DuckDB is in memory: nothing appears where it runs
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    folder, other = tmp_path / "pq", tmp_path / "other"
    kw = {} if stale else {"n_experts": 0}  # no experts files at all: the tables after them are still converted
    kept = traces([0, 1], model="m-a", run="r-1", **kw) + traces([2], day=1, model="m-b", run="r-2", **kw)
    orphaned = traces([10], **kw)
    with ParquetStore(folder) as w:
        w.write_traces(kept[:2])
        w.write_traces(kept[2:])
    with ParquetStore(other) as w:
        w.write_traces(orphaned)
    shutil.rmtree(folder / "_log")
    (folder / "mythos-probe.json").write_text(json.dumps({"format": "mythos-probe parquet store", "layout_version": 1}))
    old = on_disk(folder)
    for table in ("forwards", "iterations", "positions", "spans"):
        first = sorted((folder / table).glob("date=*/*.parquet"))[0]
        shutil.copy(first, first.with_name("vm-1-aaaaaa-000009-0.parquet"))
    for table in ("iterations", "experts"):
        for f in (other / table).glob("date=*/*.parquet"):  # none for experts without experts
            shutil.copy(f, folder / f.relative_to(other).with_name("vm-2-bbbbbb-000000-0.parquet"))
    if stale:
        (folder / "_log").mkdir()
        left = "forwards/date=2025-10-09/stale-1-cccccc-000000-0.parquet"
        shutil.copy(folder / sorted(old)[0], folder / left)
        (folder / "_log" / "000000000001.json").write_text(json.dumps({"time": 0.0, "add": [
            {"path": "spans/date=2025-10-09/stale-1-cccccc-000000-0.parquet", "table": "spans"},  # deleted already
            {"path": left, "table": "forwards"}]}))
    assert PS.compact(folder) == ({"before": 10, "after": 10} if stale else {"before": 8, "after": 8})
    assert list(cwd.iterdir()) == []
    assert json.loads((folder / "mythos-probe.json").read_text()) == {"format": "mythos-probe parquet store", "layout_version": 2}
    first = log(folder)[0]
    assert first["remove"] == [] and len(log(folder)) == 1
    ids = PS.forward_ids([t.trace_id for t in kept], [t.span_id for t in kept]).tolist()
    assert sorted(first["keys"]["forwards"]) == sorted(ids) and sorted(first["keys"]["spans"]) == sorted(ids)
    entries = {(e["table"], e["date"]): e for e in first["add"]}
    assert entries[("forwards", "2025-10-09")]["models"] == ["m-a"] and entries[("forwards", "2025-10-10")]["runs"] == ["r-2"]
    assert entries[("spans", "2025-10-09")]["models"] is None and entries[("spans", "2025-10-09")]["runs"] is None
    assert re.fullmatch(rf"{re.escape(PS._host())}-{os.getpid()}-[0-9a-f]{{6}}", first["writer"])
    assert all(e["path"].endswith(f"/{first['writer']}-000000-0.parquet") for e in first["add"])
    assert on_disk(folder) == set(committed(folder).entries)
    assert not list(folder.glob(".tmp-*"))
    with ParquetStore.open_read_only(folder) as r:
        got = {t: int(r.query(f"SELECT count(*) AS n FROM {t}")["n"].iloc[0]) for t in TABLES}
        fw = r.query("SELECT forward_id, trace_id FROM forwards ORDER BY forward_id")
        assert "date" not in r.query("SELECT * FROM forwards").columns
    assert got == rows_of(kept)
    assert fw["forward_id"].tolist() == sorted(ids)
    with ParquetStore(folder) as w:
        assert w.write_traces(kept + orphaned) == 1


def test_compact_of_a_damaged_marker_says_what_is_wrong(tmp_path):
    (tmp_path / "mythos-probe.json").write_text("{")
    with pytest.raises(PS.StoreError, match="is not a mythos-probe marker"):
        PS.compact(tmp_path)


def test_a_store_makes_no_file_where_it_runs(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"  # its DuckDB connection is in memory
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with ParquetStore(tmp_path / "pq") as w:
        w.write_traces(traces([1]))
        assert w.query("SELECT count(*) AS n FROM forwards")["n"].iloc[0] == 1
    with ParquetStore.open_read_only(tmp_path / "pq") as r:
        r.query("SELECT 1")
    assert list(cwd.iterdir()) == []


def test_compact_of_a_folder_keeps_what_it_replaced_for_the_retention_then_deletes_it(tmp_path):
    folder = tmp_path / "pq"
    with ParquetStore(folder) as w:
        w.write_traces(traces([1]))
        w.write_traces(traces([2]))
    before = on_disk(folder)
    assert PS.compact(folder) == {"before": 10, "after": 5}
    assert on_disk(folder) == before | set(committed(folder).entries)  # the default retention: 600 s
    assert PS.compact(folder, retain_removed_seconds=0) == {"before": 5, "after": 5}
    assert on_disk(folder) == set(committed(folder).entries)


def _manifest(tmp_path) -> PS.Snapshot:
    """Forwards and child files over three days, two models and runs, a spans file, and a
    forwards file that does not know its models (None)."""
    snap = PS.Snapshot(tmp_path)
    add = []
    for day, model, run in (("2026-01-01", "m1", "r1"), ("2026-01-02", "m2", "r2"), ("2026-01-03", "m1", "r2")):
        for table in ("forwards", "positions"):
            add.append({"path": f"{table}/{day}/{model}", "table": table, "date": day, "models": [model], "runs": [run]})
    # spans are kept whatever the selection, and their dates do not move a window (only forwards' do)
    add.append({"path": "spans/2026-01-05/s", "table": "spans", "date": "2026-01-05", "models": None, "runs": None})
    add.append({"path": "forwards/2026-01-01/unknown", "table": "forwards", "date": "2026-01-01", "models": None, "runs": None})
    snap._apply(1, {"time": 0.0, "add": add})
    return snap


@pytest.mark.parametrize("kw, want", [
    ({"start": pd.Timestamp("2026-01-02 23:00"), "end": None},
     {"forwards/2026-01-02/m2", "positions/2026-01-02/m2", "forwards/2026-01-03/m1", "positions/2026-01-03/m1"}),
    ({"start": None, "end": pd.Timestamp("2026-01-02T01:00", tz="Europe/Paris")},  # 2026-01-02 00:00 UTC
     {"forwards/2026-01-01/m1", "positions/2026-01-01/m1", "forwards/2026-01-01/unknown",
      "forwards/2026-01-02/m2", "positions/2026-01-02/m2"}),
    ({"models": ("m1",)}, {"forwards/2026-01-01/m1", "positions/2026-01-01/m1", "forwards/2026-01-03/m1",
                           "positions/2026-01-03/m1", "forwards/2026-01-01/unknown"}),
    ({"runs": ("r2",), "models": ("m1",)}, {"forwards/2026-01-03/m1", "positions/2026-01-03/m1", "forwards/2026-01-01/unknown"}),
    # a window relative to the newest date (2026-01-03): 36 h back reaches 2026-01-01 12:00, so that date stays,
    # and the window keeps every model and run
    ({"window_s": 36 * 3600.0, "models": ("m2",)}, None),
    ({"window_s": 3600.0}, {"forwards/2026-01-02/m2", "positions/2026-01-02/m2", "forwards/2026-01-03/m1",
                            "positions/2026-01-03/m1"}),
    ({"window_s": 3600.0, "start": pd.Timestamp("2026-01-03")}, {"forwards/2026-01-03/m1", "positions/2026-01-03/m1"}),
])
def test_pruned_keeps_the_entries_a_selected_forward_may_be_in(tmp_path, kw, want):
    snap = _manifest(tmp_path)
    kw = {"start": None, "end": None, "window_s": None, "models": (), "runs": (), **kw}
    kept = PS.Pruned(None, kw["start"], kw["end"], kw["window_s"], kw["models"], kw["runs"]).keep(snap)
    every = set(snap.entries)
    assert set(kept) == (every if want is None else want | {"spans/2026-01-05/s"})


def test_pruned_of_a_store_and_its_query(tmp_path):
    folder = tmp_path / "pq"
    with ParquetStore(folder) as w:
        w.write_traces(traces([1], model="m-a") + traces([2], day=1, model="m-b"))
        w.write_traces(traces([3], day=2, model="m-a"))
        assert w.pruned() is w and w.pruned(models=[]) is w
        for kw in ({"start": 0}, {"end": 0}, {"window_s": 0}, {"models": ["m-a"]}, {"runs": ["r"]}):
            assert isinstance(w.pruned(**kw), PS.Pruned), kw
        p = w.pruned(start=pd.Timestamp("2025-10-10"), end=pd.Timestamp("2025-10-10 23:00"), models=["m-b", "m-x"], runs=iter(["run-a"]))
        assert (p.store, p.models, p.runs, p.window_s) == (w, {"m-b", "m-x"}, {"run-a"}, None)
        assert p.has_rollups is False
        sql = "SELECT model_id, count(*) AS n FROM forwards GROUP BY model_id"
        assert p.query(sql).to_dict("list") == {"model_id": ["m-b"], "n": [1]}
        assert p.query("SELECT count(*) AS n FROM forwards WHERE model_id = ?", ["m-a"])["n"].iloc[0] == 0
        assert w.pruned(window_s=60).window_s == 60
        assert w.pruned(models=["m-a", "m-b"]).query("SELECT count(*) AS n FROM spans")["n"].iloc[0] == 3  # nothing pruned: shared views
        # what it reads: a damaged file outside the selection is never opened
        entries = committed(folder).entries
        outside = [rel for rel, e in entries.items() if e["table"] == "forwards" and e["date"] != "2025-10-10"]
        for rel in outside:
            (folder / rel).write_bytes(b"garbage" * 10)
        assert p.query("SELECT count(*) AS n FROM positions WHERE forward_id IN (SELECT forward_id FROM forwards)")["n"].iloc[0] \
            == rows_of(traces([2], day=1))["positions"]
        with pytest.raises(Exception):
            w.query("SELECT count(*) FROM forwards")  # the unpruned read meets the garbage


def test_views_are_bound_once_per_log_version(tmp_path, monkeypatch):
    """Binding a view reads a footer of each group of files: a query on an unchanged log binds none."""
    with ParquetStore(tmp_path / "pq") as w:
        w.write_traces(traces([1]))
        bound = []
        source = w._source
        monkeypatch.setattr(w, "_source", lambda table, entries: bound.append(table) or source(table, entries))
        for _ in range(3):
            assert w.query("SELECT count(*) AS n FROM forwards")["n"].iloc[0] == 1
        assert sorted(bound) == sorted(TABLES)
        w.write_traces(traces([2]))
        assert w.query("SELECT count(*) AS n FROM forwards")["n"].iloc[0] == 2
        assert len(bound) == 2 * len(TABLES)


def test_a_pruned_query_whose_file_vanished_retries_pruned(tmp_path):
    """The retry after an IO error (a compaction deleted a file meanwhile) reads the log again and
    still only the selected files: the damaged file outside the selection stays unread."""
    folder = tmp_path / "pq"
    with ParquetStore(folder) as w:
        w.write_traces(traces([1], model="m-a"))
        w.write_traces(traces([2], day=1, model="m-b"))
        entries = committed(folder).entries
        for rel, e in entries.items():
            if e["table"] == "forwards" and e["models"] == ["m-a"]:
                (folder / rel).write_bytes(b"garbage" * 10)
        selected = next(e for e in entries.values() if e["table"] == "forwards" and e["models"] == ["m-b"])
        real, calls = w.snapshot, []

        def snapshot():
            snap = real()
            if not calls:  # the first read sees a file that is gone by the time it is read
                calls.append(1)
                snap.entries["forwards/date=2025-10-10/gone.parquet"] = dict(selected, path="forwards/date=2025-10-10/gone.parquet")
            return snap

        w.snapshot = snapshot
        got = w.pruned(models=["m-b"]).query("SELECT model_id FROM forwards")
        assert got["model_id"].tolist() == ["m-b"] and len(calls) == 1


def test_advance_says_whether_the_log_moved(tmp_path):
    folder = tmp_path / "pq"
    ParquetStore(folder).close()
    snap = PS.Snapshot(folder)
    assert snap.advance() is False and snap.version == 0
    with ParquetStore(folder) as w:
        w.write_traces(traces([1]))
        w.write_traces(traces([2]))
    assert snap.advance() is True and snap.version == 2
    assert snap.advance() is False and snap.version == 2
