"""The compare view's lookups and the trajectory queries against the traces: what the A/B boxes
resolve to (trace ids in any spelling, run ids, nothing), the defaults when nothing is given (two
runs, else two forwards, else none), one forward's per-forward columns and metrics (every column,
NaN skipped), and one forward's latent trajectories (every column, one batch row, only the
forwards recorded with the probe, the newest of them)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest

from mythos_probe.collectors.store import Store
from mythos_probe.dashboards import queries as Q
from mythos_probe.dashboards.queries import Selection
from mythos_probe.records import FORWARD_METRIC_NAMES
from tests.dashboards.factory import BASE_NS, synthetic_trace

SEC = 10**9


def _with_trajectory(t, rng):
    """`t` with the trajectory probe's position metrics."""
    shape = (t.batch, t.seq_len, t.iterations)
    traj = {name: rng.normal(size=shape) for name in Q.TRAJECTORY_COLUMNS}
    traj["traj_fixed"] = (rng.uniform(size=shape) < 0.5).astype(float)
    return dataclasses.replace(t, position_metrics={**t.position_metrics, **traj})


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    rng = np.random.default_rng(31)
    a = _with_trajectory(synthetic_trace(rng, run_id="solo", start_ns=BASE_NS, n_loops=3, batch=2, seq_len=4), rng)
    b = _with_trajectory(synthetic_trace(rng, run_id="solo", start_ns=BASE_NS + 5 * SEC, n_loops=4, batch=2, seq_len=3), rng)
    newer_plain = synthetic_trace(rng, run_id="solo", start_ns=BASE_NS + 9 * SEC, n_loops=2)  # no trajectories
    fm = dict(newer_plain.forward_metrics, rho_A=math.nan)
    newer_plain = dataclasses.replace(newer_plain, forward_metrics=fm)
    shadow = dataclasses.replace(_with_trajectory(synthetic_trace(rng, run_id="solo", start_ns=BASE_NS + 12 * SEC,
                                                                  n_loops=2), rng), kind="shadow")
    traces = [a, b, newer_plain, shadow]
    store = Store(tmp_path_factory.mktemp("cmp") / "c.duckdb")
    store.write_traces(traces)
    yield store, traces
    store.close()


def test_resolve_reads_trace_ids_in_any_spelling_and_run_ids(stored):
    store, traces = stored
    trace = traces[1].trace_id
    short = trace.lstrip("0") or "0"
    for text in (trace, trace.upper(), "0x" + trace, f"  {short}  ", "0X" + trace.upper()[:0] + trace):
        assert Q.resolve(store, text) == ("forward", trace), text
    assert Q.resolve(store, "solo") == ("run", "solo")
    assert Q.resolve(store, " solo ") == ("run", "solo")
    for nothing in (None, "", "   ", "nope", "abc123"):
        assert Q.resolve(store, nothing) is None


def test_resolve_prefers_a_trace_and_falls_back_to_a_hex_looking_run(tmp_path):
    rng = np.random.default_rng(2)
    t = synthetic_trace(rng, run_id="beef")  # a run id made of hex digits and no trace of that id
    store = Store(tmp_path / "h.duckdb")
    try:
        store.write_traces([t])
        assert Q.resolve(store, "beef") == ("run", "beef")
        assert Q.resolve(store, t.trace_id) == ("forward", t.trace_id)
    finally:
        store.close()


def test_compare_defaults_two_runs_else_two_forwards_else_none(stored, tmp_path):
    store, traces = stored
    served = sorted((t for t in traces if t.kind == "served"), key=lambda t: t.start_ns)
    # one run only: its two newest served forwards, the older as A
    assert Q.compare_defaults(store, Selection()) == (("forward", served[-2].trace_id), ("forward", served[-1].trace_id))
    only = Selection(kinds=("shadow",))
    assert Q.compare_defaults(store, only) == (("forward", traces[3].trace_id), None)
    assert Q.compare_defaults(store, Selection(runs=("nobody",))) == (None, None)
    rng = np.random.default_rng(3)
    runs = [synthetic_trace(rng, run_id=r, start_ns=BASE_NS + k * SEC) for k, r in enumerate(("r-old", "r-new", "r-mid"))]
    runs[2] = dataclasses.replace(runs[2], start_ns=BASE_NS - SEC, end_ns=BASE_NS)  # oldest of all
    two = Store(tmp_path / "two.duckdb")
    try:
        two.write_traces(runs)
        assert Q.compare_defaults(two, Selection(group="attr:x")) == (("run", "r-old"), ("run", "r-new"))
    finally:
        two.close()


def test_compare_forward_metrics_of_one_forward_every_column(stored):
    store, traces = stored
    t = traces[2]
    row = Q.compare_forward_metrics(store, Selection(), ("forward", t.trace_id))
    assert list(row.columns) == ["forwards", *Q.COMPARE_FORWARD_COLUMNS, *FORWARD_METRIC_NAMES]
    assert len(row) == 1 and row["forwards"].iloc[0] == 1
    expected = dict(iterations=t.iterations, n_loops=t.n_loops, tokens=t.batch * t.seq_len, duration_ms=t.duration_ms)
    for name, value in expected.items():
        assert row[name].iloc[0] == pytest.approx(value), name
    for name in FORWARD_METRIC_NAMES:
        value = t.forward_metrics.get(name, math.nan)
        if math.isfinite(value):
            assert row[name].iloc[0] == pytest.approx(value), name
        else:
            assert pd.isna(row[name].iloc[0]), name  # NaN reads as missing, not as a number
    assert pd.isna(row["rho_A"].iloc[0])


def test_compare_iterations_of_a_forward_is_its_iteration_rows(stored):
    store, traces = stored
    t = traces[1]
    df = Q.compare_iterations(store, Selection(), ("forward", t.trace_id), ("state_norm", "rel_residual"))
    assert list(df.columns) == ["iteration", "state_norm", "rel_residual"]
    assert df["iteration"].tolist() == list(range(t.iterations))
    np.testing.assert_allclose(df["state_norm"], t.iteration_metrics["state_norm"])
    np.testing.assert_allclose(df["rel_residual"], t.iteration_metrics["rel_residual"])


def test_a_run_side_is_one_group_whatever_the_filter_bar_groups_by(stored):
    """The compare view's run side: per iteration the mean over every selected forward of the run,
    one row per iteration even when the filter bar groups (here by kind, two groups)."""
    store, traces = stored
    sel = Selection(kinds=(), group="kind")
    df = Q.compare_iterations(store, sel, ("run", "solo"), ("state_norm",))
    width = max(t.iterations for t in traces)
    sums, counts = np.zeros(width), np.zeros(width)
    for t in traces:
        sums[: t.iterations] += t.iteration_metrics["state_norm"]
        counts[: t.iterations] += 1
    assert df["iteration"].tolist() == list(range(width))
    np.testing.assert_allclose(df["state_norm"], sums / counts)
    row = Q.compare_forward_metrics(store, sel, ("run", "solo"))
    assert len(row) == 1 and row["forwards"].iloc[0] == len(traces)
    assert row["tokens"].iloc[0] == pytest.approx(np.mean([t.batch * t.seq_len for t in traces]))


@pytest.mark.parametrize("which, row", [(0, 0), (0, 1), (1, 1)])
def test_trajectories_every_column_of_one_batch_row(stored, which, row):
    store, traces = stored
    t = traces[which]
    df = Q.trajectories(store, t.trace_id, row)
    assert list(df.columns) == ["position", "iteration", *Q.TRAJECTORY_COLUMNS, "token_text"]
    pos, it = np.meshgrid(np.arange(t.seq_len), np.arange(t.iterations), indexing="ij")
    assert df["position"].tolist() == pos.ravel().tolist() and df["iteration"].tolist() == it.ravel().tolist()
    for name in Q.TRAJECTORY_COLUMNS:
        np.testing.assert_allclose(df[name], t.position_metrics[name][row].ravel(), err_msg=name)
    assert df["token_text"].tolist() == [t.token_text[row][p] for p in pos.ravel()]


def test_trajectories_of_a_forward_without_them_or_of_another_row_are_empty(stored):
    store, traces = stored
    assert Q.trajectories(store, traces[2].trace_id, 0).empty  # a forward recorded without the probe
    assert Q.trajectories(store, traces[0].trace_id, 2).empty  # no such batch row
    assert Q.trajectories(store, "f" * 32, 0).empty  # no such forward


def test_newest_trajectory_trace_skips_forwards_without_them(stored):
    store, traces = stored
    assert Q.newest_trajectory_trace(store, Selection()) == traces[1].trace_id  # traces[2] is newer, without
    assert Q.newest_trajectory_trace(store, Selection(kinds=())) == traces[3].trace_id
    assert Q.newest_trajectory_trace(store, Selection(end=pd.Timestamp(BASE_NS + SEC, unit="ns"))) == traces[0].trace_id
    assert Q.newest_trajectory_trace(store, Selection(runs=("nobody",))) is None


def test_sweep_curves_edges_one_position_no_lens_and_no_targets(tmp_path):
    """Per sweep forward, against the traces: one compared position (agreement and accuracy over
    a count of 1), a sweep recorded without the lens (no prediction: 0 positions and agreeing, no
    agreement), a sweep without targets (its best loop counts by agreement), and no sweep at all
    (an empty frame with the view's columns)."""
    from tests.dashboards.test_issue25_views import sweep_traces

    rng = np.random.default_rng(7)
    one = sweep_traces(rng, "one", {1: np.array([[4]]), 2: np.array([[5]])}, 0, targets=np.array([[4]]))
    blind = sweep_traces(rng, "blind", {1: np.array([[1, 2]]), 2: np.array([[1, 2]])}, 10)
    blind = [dataclasses.replace(t, position_metrics={**t.position_metrics,
                                                      "lens_argmax": np.full_like(t.position_metrics["lens_argmax"], np.nan)})
             for t in blind]
    agree = sweep_traces(rng, "agree", {2: np.array([[7, 8]]), 3: np.array([[0, 8]]), 4: np.array([[0, 1]])}, 20)
    store = Store(tmp_path / "sw.duckdb")
    try:
        store.write_traces(one + blind + agree)
        df = Q.sweep_curves(store, Selection())
        assert df["sweep"].tolist() == ["agree"] * 3 + ["blind"] * 2 + ["one"] * 2  # newest sweep first
        by = df.set_index(["sweep", "loops"])
        assert by.loc[("one", 1), "positions"] == 1 and by.loc[("one", 1), "agreeing"] == 0
        assert by.loc[("one", 1), "agreement"] == 0.0 and by.loc[("one", 2), "agreement"] == 1.0
        assert by.loc[("one", 1), "accuracy"] == 1.0 and by.loc[("one", 2), "accuracy"] == 0.0
        assert by.loc[("one", 1), "best"] and not by.loc[("one", 2), "best"]  # by accuracy, not agreement
        for n in (1, 2):
            row = by.loc[("blind", n)]
            assert row["positions"] == 0 and row["agreeing"] == 0 and pd.isna(row["agreement"]) and pd.isna(row["accuracy"])
        assert df["positions"].dtype.kind == "i" and df["agreeing"].dtype.kind == "i"
        np.testing.assert_allclose(by.loc["agree", "agreement"], [0.0, 0.5, 1.0])
        assert by.loc["agree", "best"].tolist() == [False, False, True]  # no targets: the highest agreement
        empty = Q.sweep_curves(store, Selection(models=("nobody",)))
        assert empty.empty and list(empty.columns) == ["sweep", "loops", "model_id", "positions", "agreeing", "agreement",
                                                       "correct", "accuracy", "best", "newest"]
    finally:
        store.close()


def test_sweep_curves_of_sweeps_ending_together_go_by_sweep_name(tmp_path):
    """Two sweeps whose newest forwards start at the same instant: by sweep name, then loop count;
    the frame has exactly the view's columns and rows numbered from 0."""
    from tests.dashboards.test_issue25_views import sweep_traces

    rng = np.random.default_rng(11)
    preds = {1: np.array([[1, 2]]), 2: np.array([[1, 3]])}
    store = Store(tmp_path / "tie.duckdb")
    try:
        store.write_traces(sweep_traces(rng, "zeta", preds, 0) + sweep_traces(rng, "alpha", preds, 0))
        df = Q.sweep_curves(store, Selection())
    finally:
        store.close()
    assert list(df.columns) == ["sweep", "loops", "model_id", "positions", "agreeing", "agreement", "correct",
                                "accuracy", "best", "newest"]
    assert df.index.tolist() == [0, 1, 2, 3]
    assert list(zip(df["sweep"], df["loops"])) == [("alpha", 1), ("alpha", 2), ("zeta", 1), ("zeta", 2)]
    assert df["agreeing"].tolist() == [1, 2, 1, 2] and df["agreement"].tolist() == [0.5, 1.0, 0.5, 1.0]
