"""Per-request loop budgets (issue 26, `LoopTrace.row_*`) are stored: list columns of `forwards`
named as the record's fields, one entry per batch row in row order, NULL for a forward that ran one
n_loops for every row. Checked literally (the column names, types and values written out here, not
only read back by our own reader), in a DuckDB store, a Parquet folder and through the receiver's
decoding, and in a store built by the previous version, migrated on open."""

from __future__ import annotations

import dataclasses
import math

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mythos_probe.collectors import migrations
from mythos_probe.collectors.export_cli import stored_traces
from mythos_probe.collectors.parquet_store import ParquetStore
from mythos_probe.collectors.rows import decode_span, trace_tables
from mythos_probe.collectors.spans import FORWARD_SPAN_NAME, trace_to_attributes
from mythos_probe.collectors.store import Store
from tests.collectors.factory import make_trace

COLUMNS = {"row_max_loops": "BIGINT[]", "row_min_loops": "BIGINT[]", "row_exit_threshold": "DOUBLE[]",
           "row_budget_reason": "VARCHAR[]"}
SELECT = "SELECT step, row_max_loops, row_min_loops, row_exit_threshold, row_budget_reason FROM forwards ORDER BY step"


def budgeted():
    """Three rows with three different budgets (one threshold left to the policy's default), a
    two-row forward with others, and one without budgets."""
    a = dataclasses.replace(make_trace(1, batch=3), step=1, row_max_loops=[2, 5, 4], row_min_loops=[1, 3, 4],
                            row_exit_threshold=[0.5, None, 0.125],
                            row_budget_reason=["profile endpoint=/easy", "", "governor: user ana over budget"])
    b = dataclasses.replace(make_trace(2, detail="summary"), step=2, row_max_loops=[8, 1], row_min_loops=[2, 1],
                            row_exit_threshold=[1e-3, 2.0], row_budget_reason=["a", "b"])
    none = dataclasses.replace(make_trace(3), step=3)
    return [a, b, none]


def literal(df) -> list[tuple]:
    def value(v):
        if v is None or v is pd.NA:
            return None
        return [None if isinstance(x, float) and math.isnan(x) else (x if isinstance(x, str) else x.item())
                for x in v]

    return [(int(r.step), *(value(r[c]) for c in COLUMNS)) for _, r in df.iterrows()]


WANT = [
    (1, [2, 5, 4], [1, 3, 4], [0.5, None, 0.125], ["profile endpoint=/easy", "", "governor: user ana over budget"]),
    (2, [8, 1], [2, 1], [1e-3, 2.0], ["a", "b"]),
    (3, None, None, None, None),
]


def test_duckdb_store_holds_each_rows_budget_in_list_columns_named_as_the_record(tmp_path):
    with Store(tmp_path / "s.duckdb") as store:
        store.write_traces(budgeted())
        types = dict(store.query("SELECT column_name, data_type FROM information_schema.columns "
                                 "WHERE table_name = 'forwards' AND column_name LIKE 'row_%'").itertuples(index=False))
        assert types == COLUMNS
        assert literal(store.query(SELECT)) == WANT
        # NaN (the policy's default threshold) is stored as NaN, not NULL: the list keeps its length
        assert store.query("SELECT isnan(row_exit_threshold[2]) AS nan, len(row_exit_threshold) AS n "
                           "FROM forwards WHERE step = 1").to_dict("records") == [{"nan": True, "n": 3}]
        # one row per request, as a reader would get them
        per_row = store.query("SELECT step, UNNEST(row_max_loops) AS max_loops, UNNEST(row_budget_reason) AS reason "
                              "FROM forwards ORDER BY step, max_loops").values.tolist()
        assert per_row == [[1, 2, "profile endpoint=/easy"], [1, 4, "governor: user ana over budget"], [1, 5, ""],
                           [2, 1, "b"], [2, 8, "a"]]
        back = {t.step: t for chunk in stored_traces(store) for _, t in chunk}
    for sent in budgeted():
        got = back[sent.step]
        for name in COLUMNS:
            want = getattr(sent, name)
            if want is None:
                assert getattr(got, name) is None, name
            elif name == "row_budget_reason":
                assert getattr(got, name) == want
            else:
                np.testing.assert_array_equal(getattr(got, name), want)
                assert getattr(got, name).dtype == want.dtype


def test_parquet_folder_holds_the_same_columns(tmp_path):
    with ParquetStore(tmp_path / "folder") as store:
        store.write_traces(budgeted())
        assert literal(store.query(SELECT)) == WANT
    # the files themselves, read by Arrow: list columns of the same names and element types
    files = sorted((tmp_path / "folder" / "forwards").rglob("*.parquet"))
    schema = pa.unify_schemas([pq.read_schema(f) for f in files])
    types = {name: schema.field(name).type for name in COLUMNS}
    assert all(pa.types.is_list(t) for t in types.values())
    assert {name: str(t.value_type) for name, t in types.items()} == {
        "row_max_loops": "int64", "row_min_loops": "int64", "row_exit_threshold": "double", "row_budget_reason": "string"}


def test_the_receivers_decoding_stores_the_budgets_from_span_attributes(tmp_path):
    """spans → rows as the OTLP receiver and the SDK exporter do it (`rows.decode_span`)."""
    decoded = [decode_span(trace_id=t.trace_id, span_id=t.span_id, parent_span_id=None, name=FORWARD_SPAN_NAME,
                           kind="INTERNAL", start_ns=t.start_ns, end_ns=t.end_ns, status_code="UNSET",
                           status_message=None, resource={}, attributes=trace_to_attributes(t))
               for t in budgeted()]
    with Store(tmp_path / "r.duckdb") as store:
        store.write([t for t, _ in decoded], [row for _, row in decoded])
        assert literal(store.query(SELECT)) == WANT


def test_a_store_of_the_previous_version_migrates_and_keeps_its_forwards(tmp_path):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    previous = [m.name for m in migrations.MIGRATIONS].index("m005_issue26_row_budgets")  # the version before it
    assert migrations.migrate(con, str(path), upto=previous) == previous
    assert "m005_issue26_row_budgets" not in migrations.applied(con)
    old = dataclasses.replace(make_trace(7), step=7)
    had = {}
    for table, arrow in trace_tables([old], 1).items():  # the rows the previous version wrote: its columns only
        had[table] = {c for (c,) in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table]).fetchall()}
        assert not set(COLUMNS) & had[table]
        arrow = arrow.select([c for c in arrow.column_names if c in had[table]])
        con.register("_batch", arrow)
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _batch")
        con.unregister("_batch")
    con.close()
    with Store(path) as store:
        assert store.schema_version == migrations.STORE_VERSION
        store.write_traces(budgeted()[:1])
        assert literal(store.query(SELECT)) == [WANT[0], (7, None, None, None, None)]
        back = {t.step: t for chunk in stored_traces(store) for _, t in chunk}
    assert back[7].row_max_loops is None and back[7].row_budget_reason is None
    assert back[7].position_metrics.keys() == old.position_metrics.keys() & had["positions"]
    assert back[1].row_max_loops.tolist() == [2, 5, 4]
