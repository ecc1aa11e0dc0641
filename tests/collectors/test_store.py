import json
import math
import threading

import numpy as np

from mythos_probe.collectors.store import Store
from tests.collectors.conftest import table
from tests.collectors.factory import make_trace


def test_positions_rows_match_the_trace_arrays(store):
    trace = make_trace(4, batch=3, seq_len=4)
    store.write_traces([trace])
    df = table(store, "positions")
    b, s, t = trace.batch, trace.seq_len, trace.iterations
    assert len(df) == b * s * t
    row = df[(df.batch_index == 2) & (df.position == 1) & (df.iteration == 3)].iloc[0]
    assert row.token_id == trace.token_ids[2, 1]
    assert row.token_text == trace.token_text[2][1]
    assert row.iterations_used == trace.position_iterations[2, 1]
    assert row.halt_prob == trace.position_metrics["halt_prob"][2, 1, 3]
    assert df[df.iteration == 0].rel_residual.isna().all()  # NaN at t = 0 kept
    for name, values in trace.position_metrics.items():
        np.testing.assert_array_equal(df[name].to_numpy(np.float32), values.ravel())


def test_forward_iteration_and_expert_rows_match_the_trace(store):
    trace = make_trace(9, detail="summary")
    store.write_traces([trace])
    fwd = table(store, "forwards").iloc[0]
    assert (fwd.batch, fwd.seq_len, fwd.tokens, fwd.iterations, fwd.n_experts) == (
        trace.batch, trace.seq_len, trace.batch * trace.seq_len, trace.iterations, trace.n_experts
    )
    assert fwd.duration_ms == (trace.end_ns - trace.start_ns) / 1e6
    assert fwd.start_time.value == trace.start_ns // 1000 * 1000
    assert json.loads(fwd.attributes) == trace.attributes
    assert fwd.rho_A == trace.forward_metrics["rho_A"]
    it = table(store, "iterations")
    np.testing.assert_array_equal(it.cos_step.to_numpy(float), trace.iteration_metrics["cos_step"])
    ex = table(store, "experts")
    assert ex.groupby("iteration").load.sum().tolist() == trace.expert_load.sum(1).tolist()
    assert len(table(store, "positions")) == 0  # summary detail writes no position rows


def test_absent_metric_is_null_while_present_nan_is_nan(store):
    trace = make_trace(1, all_metrics=False)
    store.write_traces([trace])
    row = store.query("SELECT jacobian_sigma_max IS NULL AS absent, isnan(rel_residual) AS nan FROM iterations WHERE iteration = 0")
    assert row.to_dict("records") == [{"absent": True, "nan": True}]


def test_the_same_span_written_twice_is_stored_once(store):
    traces = [make_trace(i) for i in range(4)]
    assert store.write_traces(traces[:3]) == 3
    assert store.write_traces(traces + [traces[0]]) == 1  # duplicates across and within batches
    for name, per in {
        "forwards": lambda t: 1,
        "spans": lambda t: 1,
        "iterations": lambda t: t.iterations,
        "positions": lambda t: t.batch * t.seq_len * t.iterations,
        "experts": lambda t: t.expert_load.size,
    }.items():
        assert store.query(f"SELECT count(*) AS n FROM {name}").n[0] == sum(per(t) for t in traces), name


def test_queries_from_many_threads_while_writing(store):
    errors, counts = [], []

    def reader():
        try:
            for _ in range(20):
                counts.append(int(store.query("SELECT count(*) AS n FROM forwards WHERE step >= ?", [0]).n[0]))
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for th in threads:
        th.start()
    for i in range(20):
        store.write_traces([make_trace(100 + i, detail="summary")])
    for th in threads:
        th.join()
    assert errors == []
    assert store.query("SELECT count(*) AS n FROM forwards").n[0] == 20
    assert all(0 <= c <= 20 for c in counts)


def test_store_reopens_read_only_with_the_rows(tmp_path):
    path = tmp_path / "s.duckdb"
    with Store(path) as s:
        s.write_traces([make_trace(0)])
    with Store.open_read_only(path) as ro:
        assert ro.query("SELECT count(*) AS n FROM forwards").n[0] == 1
        assert not math.isnan(ro.schema_version)


def test_closing_interrupts_a_running_reader_and_then_refuses_new_ones(tmp_path):
    import duckdb
    import pytest

    from mythos_probe.collectors.store import StoreError

    store = Store(tmp_path / "s.duckdb")
    outcome = {}

    def long_read():
        try:
            store.query("SELECT sum(a.range * b.range) FROM range(1000000) a, range(1000000) b")  # hours if not interrupted
            outcome["read"] = "finished"
        except (duckdb.InterruptException, duckdb.Error) as exc:
            outcome["read"] = type(exc).__name__

    reader = threading.Thread(target=long_read)
    reader.start()
    while not store._cursors._open:  # the read has its cursor
        pass
    store.close()  # interrupts the read rather than failing with "connection is busy"
    reader.join(timeout=30)
    assert outcome["read"] == "InterruptException"
    with pytest.raises(StoreError, match="closed"):
        store.query("SELECT 1")
