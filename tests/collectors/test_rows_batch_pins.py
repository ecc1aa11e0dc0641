"""`rows.Batch` pinned (issue 24's mutation run of collectors/rows.py): what `Batch.of` keeps,
`Batch.concat` numbering the forwards on across the requests of a group commit, and
`Batch.select` keeping and renumbering the new forwards and span rows, with their rollup
increments only when every forward is kept. Each result is compared with the tables built in one
go from the traces themselves (`trace_tables` over the same forwards, numbered as the store
would) and the rollup peaks with numpy over the records, on fixtures where the numbering can show:
several requests of different sizes, a forward numbered 0, forwards left out in the middle, a
summary-detail forward (no position rows) and one without experts (no expert rows)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from mythos_probe.collectors import rollups, rows
from mythos_probe.collectors.rows import Batch, trace_span_row, trace_tables
from tests.collectors.factory import make_trace


def group(sizes, **kw):
    """Requests of `sizes` forwards each, different seeds throughout."""
    out, seed = [], 0
    for n in sizes:
        out.append([make_trace(seed + i, batch=2, seq_len=3, n_loops=4, **kw) for i in range(n)])
        seed += n
    return out


def spans_of(traces):
    return [trace_span_row(t) for t in traces]


def _nan_free(v):
    if isinstance(v, float) and v != v:
        return "NaN"  # NaN equals itself here, as the stored value does
    if isinstance(v, dict):
        return {k: _nan_free(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_nan_free(x) for x in v]
    return v


def pylists(tables):
    return {name: _nan_free(t.to_pylist()) for name, t in tables.items()}


def peaks(traces, first=0):
    """forward number → the largest finite growth_ratio of its iterations, from the records."""
    out = {}
    for i, t in enumerate(traces, first):
        g = np.asarray(t.iteration_metrics["growth_ratio"], float)
        g = g[np.isfinite(g)]
        out[i] = float(g.max()) if len(g) else None
    return out


def summed(table: pa.Table) -> pd.DataFrame:
    """An hour-keyed increment summed per key: increments side by side sum to the batch's own."""
    df = table.to_pandas()
    keys = [c for c in df.columns if not (c.startswith(("sum__", "n__", "fsum__", "fn__")) or c in ("rows", "load"))]
    return df.groupby(keys, dropna=False).sum().sort_index()


def test_of_keeps_the_traces_only_when_asked_and_no_increments_without_forwards():
    traces = group([3])[0]
    batch = Batch.of(tuple(traces), spans_of(traces), keep_traces=True)
    assert isinstance(batch.traces, list) and batch.traces == traces
    plain = Batch.of(traces, spans_of(traces))
    assert plain.traces is None
    assert (plain.n_forwards, plain.n_spans) == (3, 3)
    assert plain.keys("forwards") == plain.keys("spans") == [(t.trace_id, t.span_id) for t in traces]
    assert pylists(plain.tables) == pylists({**trace_tables(traces, 0), "spans": rows.spans_table(spans_of(traces))})
    assert {n: {r["forward_id"]: r["growth_peak"] for r in t.to_pylist()}
            for n, t in plain.increments.items() if n == "rollup_peaks"} == {"rollup_peaks": peaks(traces)}
    assert set(plain.increments) == {"rollup_peaks", "rollup_iterations", "rollup_experts"}
    spans_only = Batch.of([], spans_of(traces))
    assert spans_only.increments == {} and spans_only.n_forwards == 0 and spans_only.n_spans == 3


def test_concat_numbers_the_forwards_on_across_requests():
    requests = group([2, 1, 3])  # three requests: an offset that is not the last request's size
    every = [t for r in requests for t in r]
    made = [Batch.of(r, spans_of(r), keep_traces=True) for r in requests]
    one = Batch.concat(made)
    want = {**trace_tables(every, 0), "spans": rows.spans_table(spans_of(every))}
    assert list(one.tables) == list(want)
    assert pylists(one.tables) == pylists(want)
    assert one.traces == every
    assert set(one.increments) == {"rollup_peaks", "rollup_iterations", "rollup_experts"}
    assert {r["forward_id"]: r["growth_peak"] for r in one.increments["rollup_peaks"].to_pylist()} == peaks(every)
    whole = rollups.increments(trace_tables(every, 0))
    for name in ("rollup_iterations", "rollup_experts"):
        pd.testing.assert_frame_equal(summed(one.increments[name]), summed(whole[name]), obj=name)


def test_concat_of_one_is_that_batch_and_a_missing_part_makes_the_whole_missing():
    requests = group([2, 2])
    made = [Batch.of(r, spans_of(r), keep_traces=True) for r in requests]
    assert Batch.concat(made[:1]) is made[0]
    made[1].traces = None
    assert Batch.concat(made).traces is None
    made = [Batch.of(r, spans_of(r)) for r in requests]
    made[0].increments = None  # built where the increments were not computed
    one = Batch.concat(made)
    assert one.increments is None and one.traces is None
    assert pylists(one.tables) == pylists({**trace_tables(requests[0] + requests[1], 0),
                                           "spans": rows.spans_table(spans_of(requests[0] + requests[1]))})


def test_select_keeps_renumbers_and_drops_the_increments_of_a_part():
    traces = group([5])[0]
    batch = Batch.of(traces, spans_of(traces))
    tables, added = batch.select(np.array([0, 2, 3]), np.array([1, 4]), 0)  # numbered from 0: the first kept is 0
    kept = [traces[i] for i in (0, 2, 3)]
    assert added is None
    assert list(tables) == ["forwards", "iterations", "positions", "experts", "spans"]
    assert pylists(tables) == pylists({**trace_tables(kept, 0), "spans": rows.spans_table(spans_of([traces[1], traces[4]]))})
    for t in tables.values():
        if "forward_id" in t.schema.names:
            assert t.schema.field("forward_id").type == pa.int64()


def test_select_of_every_forward_renumbers_the_increments_too():
    traces = group([3])[0]
    batch = Batch.of(traces, spans_of(traces))
    tables, added = batch.select(np.arange(3), np.arange(3), 41)
    assert pylists(tables) == pylists({**trace_tables(traces, 41), "spans": rows.spans_table(spans_of(traces))})
    assert set(added) == {"rollup_peaks", "rollup_iterations", "rollup_experts"}
    assert {r["forward_id"]: r["growth_peak"] for r in added["rollup_peaks"].to_pylist()} == peaks(traces, 41)
    assert added["rollup_peaks"].schema.field("forward_id").type == pa.int64()
    for name in ("rollup_iterations", "rollup_experts"):  # keyed by hour: kept whole
        assert pylists({name: added[name]}) == pylists({name: batch.increments[name]})
    batch.increments = None
    tables, added = batch.select(np.arange(3), np.arange(3), 1)
    assert added is None and pylists(tables) == pylists({**trace_tables(traces, 1), "spans": rows.spans_table(spans_of(traces))})


def test_select_with_tables_that_have_no_rows():
    """Summary-detail forwards (no position rows) without experts (no expert rows)."""
    traces = group([3], detail="summary", n_experts=0)[0]
    batch = Batch.of(traces, spans_of(traces))
    assert batch.tables["positions"].num_rows == batch.tables["experts"].num_rows == 0
    for forwards, first in ((np.array([2]), 5), (np.arange(3), 0)):
        tables, added = batch.select(forwards, np.array([0]), first)
        kept = [traces[i] for i in forwards]
        assert pylists(tables) == pylists({**trace_tables(kept, first), "spans": rows.spans_table(spans_of(traces[:1]))})
        assert tables["positions"].schema.field("forward_id").type == pa.int64()
        assert (added is None) == (len(forwards) < 3)
    assert batch.select(np.zeros(0, np.int64), np.array([1]), 3)[0]["forwards"].num_rows == 0


def test_decode_span_keeps_the_resource_and_parent():
    got, row = rows.decode_span(trace_id="ab" * 16, span_id="cd" * 8, parent_span_id="ef" * 8, name="other",
                                kind="SERVER", start_ns=5, end_ns=9, status_code="ERROR", status_message="boom",
                                resource={"service.name": "svc", "n": 2}, attributes={"k": [1.5, float("nan")]})
    assert got is None
    assert row == {"trace_id": "ab" * 16, "span_id": "cd" * 8, "parent_span_id": "ef" * 8, "name": "other",
                   "kind": "SERVER", "start_ns": 5, "end_ns": 9, "status_code": "ERROR", "status_message": "boom",
                   "resource": '{"service.name": "svc", "n": 2}', "attributes": '{"k": [1.5, null]}'}


@pytest.mark.parametrize("value, want", [
    ([np.float64("nan"), 1.0], [None, 1.0]),  # numpy scalars in a list (a user attribute)
    ((float("inf"), np.float64(2.5)), [None, 2.5]),
    ([[float("-inf")], 3.0], [[None], 3.0]),
])
def test_json_nulls_numpy_non_finite_scalars_in_lists(value, want):
    assert json.loads(rows.to_json({"a": value})) == {"a": want}


def test_experts_rows_of_a_single_expert():
    """One expert: each row is its own iteration (a divisor of 2 or more would merge them)."""
    trace = make_trace(2, batch=1, seq_len=3, n_loops=4, n_experts=1)
    table = rows.experts_table([trace], 5)
    iters = trace.expert_load.shape[0]
    assert table.column("iteration").to_pylist() == list(range(iters))
    assert table.column("expert").to_pylist() == [0] * iters
    assert table.column("load").to_pylist() == trace.expert_load[:, 0].tolist()
    assert table.column("forward_id").to_pylist() == [5] * iters


def test_positions_rows_of_one_token_sequences():
    """seq_len 1: each batch row is its own position 0 (a divisor of 2 or more would merge rows)."""
    trace = make_trace(4, batch=3, seq_len=1, n_loops=3)
    table = rows.positions_table([trace], 0)
    t = trace.iterations
    assert table.column("batch_index").to_pylist() == np.repeat(np.arange(3), t).tolist()
    assert table.column("position").to_pylist() == [0] * (3 * t)
    assert table.column("iteration").to_pylist() == np.tile(np.arange(t), 3).tolist()
    assert table.column("token_id").to_pylist() == np.repeat(trace.token_ids[:, 0], t).tolist()
