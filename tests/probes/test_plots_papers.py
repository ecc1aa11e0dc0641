"""The papers' notebook figures (`rec.plot.exit_steps`, `depth_profile`, `sweep`, `compare`)
against numpy on the traces: groups of different sizes and depths, positions exiting at
different steps, a sweep whose score drops after its best loop count."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mythos_probe.plots import Plots
from tests.dashboards.factory import synthetic_trace
from tests.dashboards.test_issue25_views import sweep_traces


@pytest.fixture(scope="module")
def traces():
    rng = np.random.default_rng(4)
    return [synthetic_trace(rng, n_loops=4 + k % 3, batch=1 + k % 2, seq_len=5 + k % 4, model_id=("m1", "m2")[k % 2],
                            attributes={"task": "ab"[k % 3 == 0]}) for k in range(9)]


def test_exit_steps_by_attribute_with_counts(traces):
    fig = Plots(traces).exit_steps(by="task")
    for task in "ab":
        mine = [t for t in traces if t.attributes["task"] == task]
        counts = sum(np.bincount(t.position_iterations.ravel(), minlength=8) for t in mine)
        used = np.flatnonzero(counts)
        bar = next(b for b in fig.data if b.name.startswith(task + " "))
        assert bar.name == f"{task} ({counts.sum():,} tokens, {len(mine)} forwards)"
        assert list(bar.x) == used.tolist()
        np.testing.assert_allclose(bar.y, counts[used])
        assert list(bar.text) == [f"{c:,}" for c in counts[used]]
    shares = Plots(traces).exit_steps(by="model_id", share=True)
    for bar in shares.data:
        assert sum(bar.y) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no trace has attribute 'nope'"):
        Plots(traces).exit_steps(by="nope")


def test_depth_profile_counts_positions_still_running(traces):
    fig = Plots(traces).depth_profile(by="task")
    for task in "ab":
        mine = [t for t in traces if t.attributes["task"] == task]
        width = max(t.iterations for t in mine)
        active = np.zeros(width)
        for t in mine:
            for u in t.position_iterations.ravel():
                active[:u] += 1  # a position that used u iterations runs at t = 0 … u − 1
        bar = next(b for b in fig.data if b.type == "bar" and b.name == task)
        np.testing.assert_allclose(bar.y, active)
        line = next(b for b in fig.data if b.type == "scatter" and b.name.startswith(task + " "))
        np.testing.assert_allclose(line.y, active / sum(t.position_iterations.size for t in mine))


def test_sweep_figure_marks_the_best_and_where_loops_hurt():
    rng = np.random.default_rng(1)
    deepest = rng.integers(0, 5, size=(1, 8))
    preds = {n: deepest.copy() for n in (1, 2, 3, 4)}
    preds[1].ravel()[:4] += 1
    preds[3].ravel()[:2] += 1
    targets = preds[2]
    recorded = sweep_traces(rng, "s", preds, 0, targets)
    fig = Plots(recorded).sweep()
    score = next(t for t in fig.data if t.name == "s")
    np.testing.assert_allclose(score.y, [(preds[n] == targets).mean() for n in (1, 2, 3, 4)])
    agree = next(t for t in fig.data if t.name.startswith("s: agreement"))
    np.testing.assert_allclose(agree.y, [(preds[n] == deepest).mean() for n in (1, 2, 3, 4)])
    best = next(t for t in fig.data if t.name.startswith("s: best"))
    assert list(best.x) == [2, 4]  # preds[4] == preds[2] == targets
    hurt = next(t for t in fig.data if "hurt" in t.name)
    assert list(hurt.x) == [3]
    frame = pd.DataFrame({"loops": [1, 2, 3], "positions": 4, "agreement": [0.5, 1.0, 1.0]})  # a `sweep` result
    assert [t.name for t in Plots(recorded).sweep(frame).data] == ["sweep", "sweep: best (100.0%)"]


def test_compare_two_forwards(traces):
    fig = Plots(traces).compare(0, 4, metrics=("state_norm", "exit_count"))
    a, b = traces[0], traces[4]
    lines = [t for t in fig.data if t.type == "scatter"]
    np.testing.assert_allclose(lines[0].y, a.iteration_metrics["state_norm"])
    np.testing.assert_allclose(lines[2].y, b.iteration_metrics["state_norm"])
    table = next(t for t in fig.data if t.type == "table")
    names, va, vb, diff = table.cells.values
    k = list(names).index("flops")
    assert diff[k] == pytest.approx(b.forward_metrics["flops"] - a.forward_metrics["flops"])
    assert va[k] == pytest.approx(a.forward_metrics["flops"]) and vb[k] == pytest.approx(b.forward_metrics["flops"])
