"""The issue-25 views against numpy on the traces: exit steps per group (groups of different
sizes), the depth profile (forwards of different sizes and depths, so pooled and mean shares
differ), stored loop sweeps (agreement with the deepest forward not monotone in the loop count,
two sweeps and other forwards in one store) and the compare view (two runs, a run against a
forward). Each query is also read through its page's `update`, as the dashboard draws it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from mythos_probe.collectors.store import Store
from mythos_probe.dashboards import queries
from mythos_probe.dashboards.pages import compare, depth, loops, sweep
from mythos_probe.dashboards.queries import Selection
from tests.dashboards.factory import BASE_NS, synthetic_trace

TASKS = {"add": 3, "copy": 7}  # forwards per task: the groups differ in size


def grouped_traces() -> list:
    rng = np.random.default_rng(25)
    traces = []
    i = 0
    for task, n in TASKS.items():
        for k in range(n):
            traces.append(synthetic_trace(rng, run_id=f"run-{k % 2}", start_ns=BASE_NS + i * 10**9, n_loops=4 + k % 3,
                                          batch=1 + k % 2, seq_len=5 + 3 * (k % 3), attributes={"task": task}))
            i += 1
    return traces


def sweep_traces(rng, name: str, preds: dict[int, np.ndarray], start: int, targets=None) -> list:
    """One forward per loop count, as `mythos_probe.sweep` stores them: the prediction is the lens
    argmax at each position's last iteration; earlier iterations hold other tokens."""
    out = []
    for k, (n, pred) in enumerate(sorted(preds.items())):
        t = synthetic_trace(rng, start_ns=BASE_NS + (start + k) * 10**9, n_loops=n, batch=pred.shape[0],
                            seq_len=pred.shape[1])
        argmax = rng.integers(100, 200, size=(*pred.shape, n)).astype(np.float32)
        argmax[..., -1] = pred
        attrs = {"sweep": name, "sweep_loops": n}
        if targets is not None:
            attrs |= {"sweep_correct": int((pred == targets).sum()), "sweep_positions": int(targets.size)}
        out.append(dataclasses.replace(
            t, kind="shadow", attributes=attrs, position_iterations=np.full(pred.shape, n),
            position_metrics={**t.position_metrics, "lens_argmax": argmax}))
    return out


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    rng = np.random.default_rng(5)
    deepest = rng.integers(0, 9, size=(2, 6))
    preds = {}
    for n, wrong in ((1, 8), (2, 2), (3, 6), (4, 1), (5, 3), (6, 0)):  # agreement rises, falls, rises
        pred = deepest.copy()
        pred.ravel()[:wrong] = (pred.ravel()[:wrong] + 1) % 9
        preds[n] = pred
    targets = preds[4].copy()
    targets.ravel()[-3:] = 50  # no loop count predicts these: accuracy peaks at 4 loops, then drops
    other = {n: rng.integers(0, 3, size=(1, 5)) for n in (2, 3, 4)}
    traces = grouped_traces()
    sweeps = sweep_traces(rng, "s-acc", preds, 100, targets) + sweep_traces(rng, "s-agree", other, 200)
    store = Store(tmp_path_factory.mktemp("issue25") / "s.duckdb")
    store.write_traces(traces + sweeps)
    yield store, traces, {"s-acc": (preds, targets), "s-agree": (other, None)}
    store.close()


def _group_exits(traces, by):
    groups = {}
    for t in traces:
        key = t.attributes[by]
        counts = np.bincount(t.position_iterations.ravel(), minlength=8)
        groups.setdefault(key, [np.zeros(8), 0])
        groups[key][0][: len(counts)] += counts
        groups[key][1] += 1
    return groups


def test_exit_steps_per_attribute_count_tokens_and_shares(stored):
    store, traces, _ = stored
    sel = Selection(group="attr:task")
    df = queries.exit_steps(store, sel)
    expected = _group_exits(traces, "task")
    assert sorted(df["grp"].unique()) == sorted(TASKS)
    for task, (counts, forwards) in expected.items():
        part = df[df["grp"] == task]
        used = np.flatnonzero(counts)
        assert part["used"].tolist() == used.tolist()  # 1-based: a token using k iterations exits at k
        np.testing.assert_allclose(part["tokens"], counts[used])
        np.testing.assert_allclose(part["share"], counts[used] / counts.sum())
        assert (part["forwards"] == forwards).all() and (part["group_tokens"] == counts.sum()).all()
    assert df.groupby("grp")["group_tokens"].first().nunique() == 2  # groups differ in size
    groups = queries.exit_step_groups(store, sel).set_index("grp")
    for task, (counts, forwards) in expected.items():
        steps = np.arange(len(counts))
        assert groups.loc[task, "forwards"] == forwards == TASKS[task]
        assert groups.loc[task, "mean_used"] == pytest.approx((steps * counts).sum() / counts.sum())
        deepest = np.flatnonzero(counts).max()
        assert groups.loc[task, "max_used"] == deepest
        assert groups.loc[task, "deepest_share"] == pytest.approx(counts[deepest] / counts.sum())
    # the page: bars labelled with their counts, shares per group with its token count in the legend
    out = loops.update(store, sel, "")
    per_token, shares = out[1], out[3]
    for bar in per_token.data:
        assert [int(v) for v in bar.text] == [int(v) for v in bar.y]
    names = sorted(b.name for b in shares.data)
    assert names == sorted(f"{k} ({int(c.sum()):,} tokens)" for k, (c, _) in expected.items())


def test_depth_profile_sums_pooled_and_mean_shares(stored):
    store, traces, _ = stored
    df = queries.depth_profile(store, Selection(group="attr:task"))
    for task in TASKS:
        mine = [t for t in traces if t.attributes["task"] == task]
        width = max(t.iterations for t in mine)
        active = np.zeros(width)
        shares = np.zeros(width)
        for t in mine:
            running = (t.position_iterations.ravel()[:, None] > np.arange(width)).sum(axis=0)
            active += running
            shares += running / t.position_iterations.size
        positions = sum(t.position_iterations.size for t in mine)
        part = df[df["grp"] == task]
        assert part["iteration"].tolist() == list(range(width))
        np.testing.assert_allclose(part["active"], active)
        np.testing.assert_allclose(part["pooled_share"], active / positions)
        np.testing.assert_allclose(part["mean_share"], shares / len(mine))
        assert not np.allclose(active / positions, shares / len(mine))  # the fixture can tell them apart
    out = depth.update(store, Selection(group="attr:task"), "")
    assert {tr.name for tr in out[2].data} == {f"{t} · {kind}" for t in TASKS for kind in ("pooled", "mean over forwards")}


def test_stored_sweeps_agreement_accuracy_and_the_drop(stored):
    store, _, sweeps = stored
    df = queries.sweep_curves(store, Selection())  # sweep forwards are shadows: read whatever the kind filter
    assert list(df["sweep"].unique()) == ["s-agree", "s-acc"]  # newest sweep first
    for name, (preds, targets) in sweeps.items():
        part = df[df["sweep"] == name].set_index("loops")
        deepest = preds[max(preds)]
        assert part.index.tolist() == sorted(preds)
        for n, pred in preds.items():
            assert part.loc[n, "positions"] == pred.size
            assert part.loc[n, "agreement"] == pytest.approx((pred == deepest).mean())
            if targets is not None:
                assert part.loc[n, "accuracy"] == pytest.approx((pred == targets).mean())
            else:
                assert pd.isna(part.loc[n, "accuracy"])
    acc = df[df["sweep"] == "s-acc"].set_index("loops")
    assert not acc["agreement"].is_monotonic_increasing  # the fixture's curve turns
    assert acc.index[acc["best"]].tolist() == [4]
    drawn = sweep.overthinking(df[df["sweep"] == "s-acc"]).set_index("loops")
    assert drawn.index[drawn["hurts"]].tolist() == [5, 6]  # past the best, lower
    assert drawn.loc[5, "drop"] == pytest.approx(acc.loc[4, "accuracy"] - acc.loc[5, "accuracy"])
    out = sweep.update(store, Selection(), "")
    hurt = next(tr for tr in out[1].data if tr.name.startswith("s-acc") and "hurt" in tr.name)
    assert list(hurt.x) == [5, 6]
    assert sweep.update(store, Selection(models=("none",)), "")[0] != ""  # no sweep: a message, not a blank


def test_compare_two_runs_and_a_run_against_a_forward(stored):
    store, traces, _ = stored
    sel = Selection()
    a, b = queries.compare_defaults(store, sel)
    assert (a, b) == (("run", "run-1"), ("run", "run-0"))  # the newest traces belong to run-0
    runs = {r: [t for t in traces if t.run_id == r] for r in ("run-0", "run-1")}
    for run, mine in runs.items():
        per = queries.compare_iterations(store, sel, ("run", run), ("state_norm",))
        width = max(t.iterations for t in mine)
        sums, counts = np.zeros(width), np.zeros(width)
        for t in mine:
            sums[: t.iterations] += t.iteration_metrics["state_norm"]
            counts[: t.iterations] += 1
        np.testing.assert_allclose(per["state_norm"], sums / counts)
    one = traces[3]
    table = compare.metric_table(queries.compare_forward_metrics(store, sel, ("run", "run-1")),
                                 queries.compare_forward_metrics(store, sel, ("forward", one.trace_id))).set_index("metric")
    mine = runs["run-1"]
    assert table.loc["forwards", "a"] == len(mine) and table.loc["forwards", "b"] == 1
    for name in ("mean_iterations", "flops", "rho_A"):
        a_value = np.mean([t.forward_metrics[name] for t in mine])
        assert table.loc[name, "a"] == pytest.approx(a_value)
        assert table.loc[name, "b"] == pytest.approx(one.forward_metrics[name])
        assert table.loc[name, "diff"] == pytest.approx(one.forward_metrics[name] - a_value)
        assert table.loc[name, "ratio"] == pytest.approx(one.forward_metrics[name] / a_value)
    assert table.loc["tokens", "b"] == one.batch * one.seq_len
    out = compare.update(store, sel, "", "run-1", one.trace_id.lstrip("0"), ("state_norm", "rel_residual"))
    assert out[0] == "" and len(out[1]["data"]) == 4  # two metrics, A and B each
    b_norm = out[1]["data"][2]  # B's first panel
    assert b_norm["yaxis"] == "y" and out[1]["data"][3]["yaxis"] == "y2"
    np.testing.assert_allclose(b_norm["y"], one.iteration_metrics["state_norm"])
    assert "neither a stored trace id nor a run id" in str(compare.update(store, sel, "", "nope", None, ())[0])
