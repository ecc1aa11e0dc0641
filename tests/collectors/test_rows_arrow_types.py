"""`collectors/rows.py`: the Arrow type of every column of every table it builds, for a batch with
every kind of gap (a forward without token text, one without per-position values, one without
experts, metrics missing) and for an empty batch. The store inserts these tables as they are, and
the Parquet store writes them to files other engines read, so a column that comes out int64
instead of int32, or a dictionary with int64 indices, changes the files. Written against
survivors of `scripts/mutation.sh collectors/rows.py`; tests/collectors/test_wire_format.py has
the values."""

from __future__ import annotations

import pyarrow as pa
import pytest

from mythos_probe.collectors import rows
from mythos_probe.collectors.schema import TABLES
from tests.collectors.test_wire_format import hand_trace

TYPES = {"VARCHAR": pa.string(), "JSON": pa.string(), "BIGINT": pa.int64(), "INTEGER": pa.int32(),
         "DOUBLE": pa.float64(), "REAL": pa.float32(), "TIMESTAMP": pa.timestamp("us"),
         # per-row budgets: one entry per batch row (schema.ROW_BUDGET_COLUMNS)
         "BIGINT[]": pa.list_(pa.int64()), "DOUBLE[]": pa.list_(pa.float64()), "VARCHAR[]": pa.list_(pa.string())}
# per-forward strings travel as dictionaries: each id once per forward, not once per row
DICTIONARY = pa.dictionary(pa.int32(), pa.string())
DICTIONARY_COLUMNS = {"trace_id", "span_id", "token_text"}


def expected_type(table: str, column: str) -> pa.DataType:
    if table != "forwards" and column in DICTIONARY_COLUMNS:
        return DICTIONARY
    return TYPES[dict(TABLES[table])[column]]


def gappy_batch():
    return [
        hand_trace(),
        hand_trace(trace_id="1" * 32, token_text=None, token_ids=None, position_iterations=None),
        hand_trace(trace_id="2" * 32, detail="summary", position_metrics={}, expert_load=None,
                   iteration_metrics={"halt_prob": [0.5, 0.25]}, forward_metrics={}),
    ]


@pytest.mark.parametrize("traces", [gappy_batch(), [], [hand_trace(detail="summary", position_metrics={}, expert_load=None)]],
                         ids=["gaps", "empty", "no child rows"])
def test_every_column_has_the_schema_type(traces):
    tables = rows.trace_tables(traces, 7)
    for name, table in tables.items():
        for field in table.schema:
            assert field.type == expected_type(name, field.name), (name, field.name, field.type)
        # the child tables leave out no column of the schema that holds data
        assert set(table.schema.names) <= {c for c, _ in TABLES[name]}


def test_arrow_schema_maps_each_sql_type():
    for table in TABLES:
        schema = rows.arrow_schema(table)
        assert [(f.name, f.type) for f in schema] == [(c, TYPES[t]) for c, t in TABLES[table]]


def test_missing_values_are_null_and_present_ones_are_not():
    tables = rows.trace_tables(gappy_batch(), 0)
    positions = tables["positions"]
    assert positions.column("token_text").null_count == 12  # the second forward's 12 rows
    assert positions.column("token_id").null_count == 12
    assert positions.column("forward_id").null_count == 0 and positions.column("iteration").null_count == 0
    iterations = tables["iterations"]
    assert iterations.column("halt_prob").null_count == 0
    assert iterations.column("rel_residual").null_count == 2  # the third forward lacks it
    assert iterations.column("iteration").null_count == 0


def test_spans_table_has_the_schema_types_even_when_a_column_is_all_null():
    row = rows.trace_span_row(hand_trace())  # parent_span_id and status_message are None
    table = rows.spans_table([row])
    assert table.schema == rows.arrow_schema("spans")
    assert table.column("parent_span_id").type == pa.string() and table.column("parent_span_id").to_pylist() == [None]
    assert rows.spans_table([]).schema == rows.arrow_schema("spans")


def test_token_text_keeps_every_character():
    # numpy's fixed-width str arrays drop trailing NULs; a tokenizer's byte tokens may end in one
    words = (("a\x00", "\x00", "c"), ("d", "e\x00\x00", ""))
    got = rows.positions_table([hand_trace(token_text=words)], 0).column("token_text").to_pylist()
    assert got == ["a\x00", "a\x00", "\x00", "\x00", "c", "c", "d", "d", "e\x00\x00", "e\x00\x00", "", ""]
