"""The store's in-memory key check (`known_keys.KnownKeys`) on real DuckDB files: new keys are
stored without DuckDB's scan, every duplicate is still dropped (from the sorted keys, from the keys
added since, after the merge of the two), a hash collision costs a scan and never a row, and rows
written behind its back make it read the keys again instead of answering "new"."""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pytest

from mythos_probe.collectors import known_keys, store as store_module
from mythos_probe.collectors.rows import span_row, trace_span_row
from mythos_probe.collectors.store import Store
from tests.collectors.factory import make_trace


def _count(store: Store, table: str = "forwards") -> int:
    return int(store.query(f"SELECT count(*) AS n FROM {table}").n[0])


@pytest.fixture
def exact_queries(monkeypatch):
    """How many times the store asked DuckDB's exact NOT EXISTS query (the scan)."""
    calls = []
    original = store_module._NEW_KEYS

    real = Store._new

    def counting(self, cur, forward_keys, span_keys, counts):
        execute = cur.execute

        class Spy:
            def __getattr__(self, name):
                return getattr(cur, name)

            def execute(self, sql, *args):
                if sql is original:
                    calls.append(sql)
                # DuckDB's replacement scan reads `_keys` from the frame calling execute: this one
                _keys = sys._getframe(1).f_locals.get("_keys")  # noqa: F841
                return execute(sql, *args)

        return real(self, Spy(), forward_keys, span_keys, counts)

    monkeypatch.setattr(Store, "_new", counting)
    return calls


def test_new_keys_are_stored_without_the_scan_and_duplicates_are_dropped(tmp_path, exact_queries):
    with Store(tmp_path / "s.duckdb") as store:
        assert store.write_traces([make_trace(i) for i in range(5)]) == 5
        assert store.write_traces([make_trace(i) for i in range(5, 9)]) == 4
        assert exact_queries == []  # all new: answered in memory
        assert store.write_traces([make_trace(3), make_trace(9)]) == 1  # 3 was added since the load
        assert len(exact_queries) == 1
        assert _count(store) == 10 and _count(store, "spans") == 10
        assert store._known.loads == 1


def _other_span(i: int) -> dict:
    return span_row(trace_id=f"{i:032x}", span_id=f"{i + 7:016x}", parent_span_id=None, name="http request",
                    kind="SERVER", start_ns=1, end_ns=2, status_code="UNSET", status_message=None,
                    resource={}, attributes={"i": i})


def test_span_rows_without_a_forward_are_known_by_their_own_keys(tmp_path, exact_queries):
    """Span rows that are not forwards have keys of their own, after the forwards' in a batch."""
    with Store(tmp_path / "s.duckdb") as store:
        traces = [make_trace(i) for i in range(3)]
        store.write(traces, [trace_span_row(t) for t in traces] + [_other_span(100), _other_span(101)])
        assert _count(store, "spans") == 5 and exact_queries == []
        assert store.write([], [_other_span(101), _other_span(102)]) == 0
        assert len(exact_queries) == 1  # 101 is known
        assert store.write([], [_other_span(100), _other_span(101), _other_span(102)]) == 0
        assert _count(store, "spans") == 6 and _count(store) == 3
        assert store.query("SELECT count(DISTINCT (trace_id, span_id)) AS n FROM spans").n[0] == 6


def test_forwards_written_without_their_span_rows_are_known_by_the_forward_keys(tmp_path):
    with Store(tmp_path / "s.duckdb") as store:
        traces = [make_trace(i) for i in range(4)]
        assert store.write(traces, []) == 4
        assert store.write(traces[2:], []) == 0
        assert _count(store) == 4 and _count(store, "spans") == 0


def test_the_key_with_the_largest_hash_is_known(tmp_path):
    """The sorted keys' last element is looked up like any other (the edge of a binary search)."""
    traces = [make_trace(i) for i in range(20)]
    with Store(tmp_path / "s.duckdb") as store:
        store.write(traces, [])
    with Store(tmp_path / "s.duckdb") as store:
        hashes = store.query("SELECT trace_id, hash(trace_id, span_id) AS h FROM forwards ORDER BY h").trace_id.tolist()
        last, first = (next(t for t in traces if t.trace_id == tid) for tid in (hashes[-1], hashes[0]))
        assert store.write([last], []) == 0  # alone: another key's hit would send the batch to the exact query
        assert store.write([first], []) == 0
        assert _count(store) == 20 and store._known.loads == 1


def test_keys_stored_before_the_process_started_are_known(tmp_path, exact_queries):
    with Store(tmp_path / "s.duckdb") as store:
        store.write_traces([make_trace(i) for i in range(6)])
    with Store(tmp_path / "s.duckdb") as store:
        assert store.write_traces([make_trace(i) for i in range(4, 8)]) == 2  # 4, 5 from the sorted keys
        assert _count(store) == 8
        assert store._known.loads == 1


def test_keys_merged_into_the_sorted_array_are_still_known(tmp_path, monkeypatch):
    monkeypatch.setattr(known_keys, "_MERGE_AT", 3)
    with Store(tmp_path / "s.duckdb") as store:
        for i in range(0, 12, 2):
            store.write_traces([make_trace(i), make_trace(i + 1)])
        assert len(store._known._sorted["forwards"]) >= 4  # merged at least once
        assert store.write_traces([make_trace(i) for i in range(14)]) == 2
        assert _count(store) == 14 and _count(store, "spans") == 14


def test_a_hash_collision_costs_a_scan_never_a_row(tmp_path, exact_queries):
    with Store(tmp_path / "s.duckdb") as store:
        store.write_traces([make_trace(0)])
        new = make_trace(1)
        # plant the new key's hash as if another stored key had the same 64-bit hash
        h = store.query("SELECT hash(?, ?) AS h", [new.trace_id, new.span_id]).h[0]
        store._known._recent["forwards"].add(int(h))
        assert store.write_traces([new]) == 1
        assert len(exact_queries) == 1
        assert _count(store) == 2


def test_rows_written_behind_its_back_make_it_read_the_keys_again(tmp_path):
    with Store(tmp_path / "s.duckdb") as store:
        store.write_traces([make_trace(0)])
        loads = store._known.loads
        # another path copies forward 0 under the key of forward 1 (as a replica or a manual fix might)
        one = make_trace(1)
        store.query("INSERT INTO forwards SELECT * REPLACE (? AS trace_id, ? AS span_id, forward_id + 100 AS forward_id) "
                    "FROM forwards", [one.trace_id, one.span_id])
        assert store.write_traces([one, make_trace(2)]) == 1  # forward 1 is known again: not doubled
        assert store._known.loads == loads + 1
        assert _count(store) == 3


def test_the_hashes_are_duckdbs_of_the_two_ids():
    """The key check hashes (trace_id, span_id) with DuckDB's own hash, in DuckDB, on both sides:
    the stored rows' and the batch's hashes agree whatever the ids' text."""
    import duckdb

    con = duckdb.connect()
    con.execute("CREATE TABLE forwards AS SELECT 'a' AS trace_id, 'b' AS span_id")
    con.execute("CREATE TABLE spans AS SELECT 'c' AS trace_id, 'd' AS span_id")
    keys = known_keys.KnownKeys()
    batch = pa.table({"spans": [False, True, False], "trace_id": ["a", "c", "b"], "span_id": ["b", "d", "a"]})
    hashes, all_new = keys.check(con, batch, {"forwards": 1, "spans": 1})
    assert not all_new
    expected = con.execute("SELECT hash('a', 'b'), hash('c', 'd'), hash('b', 'a')").fetchall()[0]
    assert hashes.tolist() == [np.uint64(h) for h in expected]
    swapped = pa.table({"spans": [False, True], "trace_id": ["b", "d"], "span_id": ["a", "c"]})
    assert keys.check(con, swapped, {"forwards": 1, "spans": 1})[1]  # swapped ids are other keys
