"""Rollups (`collectors.rollups`) against numpy over the traces, and against the raw-row SQL.

The fixture is built so that every aggregate can show a mistake: forwards of 6 and 8 iterations
(rows differ per iteration), a NaN that a plain mean propagates and a finite mean skips, ±Inf from a
diverged forward, metrics some forwards lack (NULL), times every 17 minutes so that ranges cut
hours, and ingest in shuffled batches of four so that later batches merge into hours already rolled.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest

from mythos_probe.collectors import rollups
from mythos_probe.collectors.store import Store
from mythos_probe.dashboards import queries, whatif
from mythos_probe.dashboards.queries import Selection
from tests.dashboards.factory import BASE_NS, synthetic_trace

MIN_NS = 60 * 10**9
HOUR_NS = 60 * MIN_NS
MEANS = ("rel_residual", "state_norm", "growth_ratio", "halt_prob", "expert_max_vio", "routing_entropy", "topk_overlap",
         "lens_kl_final", "lens_top1_agree", "jacobian_sigma_max")
DIVERGED = (5, 14, 33)
NEWEST = BASE_NS + 35 * 17 * MIN_NS + 2 * 61 * 10**9  # trace 35's start
PLAIN = ("halted_fraction", "cum_halt", "halt_low_share", "halt_high_share")


def _traces() -> list:
    rng = np.random.default_rng(27)
    out = []
    for i in range(37):  # the 37th lands in the hour the last-hour window cuts, after its start
        start = BASE_NS + i * 17 * MIN_NS + (i % 3) * 61 * 10**9 if i < 36 else NEWEST - 59 * MIN_NS
        t = synthetic_trace(rng, run_id=("run-a", "run-b", "run-c")[i % 3], model_id=("m-1", "m-2")[i % 2],
                            n_loops=(6, 8)[(i // 3) % 2], batch=1, seq_len=6, n_experts=3, start_ns=start,
                            diverged_at=2 if i in DIVERGED else -1)
        metrics = dict(t.iteration_metrics)
        if i % 4 == 1:  # a metric only some forwards carry: NULL elsewhere
            metrics["jacobian_sigma_max"] = rng.uniform(0.5, 2.0, t.iterations)
        if i in DIVERGED:  # diverged: growth blows up, a plain mean of halting turns NaN
            metrics["growth_ratio"] = np.r_[metrics["growth_ratio"][:3], np.inf, -np.inf, metrics["growth_ratio"][5:]]
            metrics["halted_fraction"] = np.r_[metrics["halted_fraction"][:2], np.nan, metrics["halted_fraction"][3:]]
        out.append(dataclasses.replace(
            t, iteration_metrics=metrics, kind=("served", "served", "shadow", "training")[i % 4], rank=i % 3, world_size=3,
            exit_policy=("act", "fixed")[i % 5 == 0],
        ))
    return out


@pytest.fixture(scope="module")
def traces():
    return _traces()


@pytest.fixture(scope="module")
def store(traces, tmp_path_factory):
    s = Store(tmp_path_factory.mktemp("rollups") / "r.duckdb")
    order = np.random.default_rng(1).permutation(len(traces))
    for k in range(0, len(order), 4):  # out of time order: later batches merge into rolled hours
        s.write_traces([traces[j] for j in order[k:k + 4]])
    yield s
    s.close()


class Raw:
    """The store seen without rollups: the views read raw rows (as on a Parquet folder)."""

    has_rollups = False

    def __init__(self, store):
        self.query = store.query


START, END = BASE_NS + 2 * HOUR_NS + 10 * MIN_NS, BASE_NS + 6 * HOUR_NS + 5 * MIN_NS + 7 * 10**9
GROUPS = {"none": lambda t: "all", "run": lambda t: t.run_id, "rank": lambda t: str(t.rank), "kind": lambda t: t.kind,
          "policy": lambda t: t.exit_policy, "model": lambda t: t.model_id}
CASES = {
    "every kind": (Selection(kinds=()), lambda t: True),
    "served, default": (Selection(), lambda t: t.kind == "served"),
    "runs a and c by run": (Selection(kinds=(), runs=("run-a", "run-c"), group="run"), lambda t: t.run_id != "run-b"),
    "8 iterations by rank": (Selection(kinds=(), min_iterations=7, group="rank"), lambda t: t.iterations >= 7),
    "≤ 6 iterations by policy": (Selection(kinds=(), max_iterations=6, group="policy"), lambda t: t.iterations <= 6),
    "range cutting hours by kind": (
        Selection(kinds=(), start=pd.Timestamp(START, unit="ns"), end=pd.Timestamp(END, unit="ns"), group="kind"),
        lambda t: START <= t.start_ns <= END),
    "last hour by model, ranks 0 and 2": (Selection(kinds=(), window="1h", ranks=(0, 2), group="model"),
                                          lambda t: t.start_ns >= NEWEST - HOUR_NS and t.rank in (0, 2)),
}


def _expected(traces, sel: Selection, keep) -> dict:
    """Per (group, iteration): numpy sums and means over the selected traces' iterations."""
    chosen = [t for t in traces if keep(t)]
    assert chosen, "a case that selects nothing cannot show a mistake"
    cells: dict = {}
    for t in chosen:
        for it in range(t.iterations):
            cells.setdefault((GROUPS[sel.group](t), it), []).append(t)
    return {"chosen": chosen, "cells": cells}


def _value(t, metric: str, it: int) -> float:
    values = t.iteration_metrics.get(metric)
    return math.nan if values is None else float(values[it])


@pytest.mark.parametrize("case", list(CASES))
def test_rolled_views_equal_numpy_over_the_traces(store, traces, case):
    sel, keep = CASES[case]
    assert sel.rolls_up(store)
    exp = _expected(traces, sel, keep)
    cells = sorted(exp["cells"])

    halting = queries.halting_by_iteration(store, sel)
    assert list(zip(halting["grp"], halting["iteration"])) == cells
    exits = {c: sum(_value(t, "exit_count", c[1]) for t in exp["cells"][c]) for c in cells}
    np.testing.assert_allclose(halting["exits"], [exits[c] for c in cells], rtol=1e-12)
    for g in {c[0] for c in cells}:
        mine = [exits[c] for c in cells if c[0] == g]
        got = halting.loc[halting["grp"] == g, "cumulative_halted"]
        np.testing.assert_allclose(got, np.cumsum(mine) / np.sum(mine), rtol=1e-12)
    for m in PLAIN:  # SQL avg: NaN propagates
        want = [np.mean([_value(t, m, c[1]) for t in exp["cells"][c]]) for c in cells]
        np.testing.assert_allclose(halting[m], want, rtol=1e-12, err_msg=m)

    means = queries.iteration_means(store, sel, MEANS)
    assert list(zip(means["grp"], means["iteration"])) == cells
    for m in MEANS:  # the dashboard's finite mean: NaN, ±Inf and absent values skipped
        want = []
        for c in cells:
            v = np.array([_value(t, m, c[1]) for t in exp["cells"][c]])
            v = v[np.isfinite(v)]
            want.append(v.mean() if v.size else np.nan)
        np.testing.assert_allclose(means[m].astype(float), want, rtol=1e-12, err_msg=m)

    tokens = queries.tokens_by_iterations_used(store, sel)
    want = [(g, it + 1, exits[(g, it)]) for g, it in cells if exits[(g, it)] > 0]
    assert list(zip(tokens["grp"], tokens["used"], tokens["tokens"])) == want

    load = queries.expert_load(store, sel)
    sums = {}
    for t in exp["chosen"]:
        for it in range(t.iterations):
            for e in range(t.expert_load.shape[1]):
                sums[(it, e)] = sums.get((it, e), 0) + int(t.expert_load[it, e])
    keys = sorted(sums)
    assert list(zip(load["iteration"], load["expert"])) == keys
    assert load["load"].tolist() == [sums[k] for k in keys]
    totals = {it: sum(v for (i, _), v in sums.items() if i == it) for it, _ in keys}
    np.testing.assert_allclose(load["share"], [sums[k] / totals[k[0]] for k in keys], rtol=1e-12)


def test_per_forward_peak_growth_is_the_largest_finite_ratio(store, traces):
    points = queries.diverged_points(store, Selection(kinds=()), "step").set_index("trace_id")
    diverged = [t for t in traces if t.forward_metrics["diverged_at"] >= 0]
    assert sorted(points.index) == sorted(t.trace_id for t in diverged)
    for t in diverged:
        g = t.iteration_metrics["growth_ratio"]
        assert points.loc[t.trace_id, "growth"] == pytest.approx(g[np.isfinite(g)].max(), rel=1e-12)
        assert np.isinf(g).any()  # so a max that kept ±Inf would show


VIEWS = {
    "halting": queries.halting_by_iteration,
    "tokens": queries.tokens_by_iterations_used,
    "means": lambda s, sel: queries.iteration_means(s, sel, MEANS),
    "experts": queries.expert_load,
    "bands by step": lambda s, sel: queries.spectral_bands(s, sel, "step"),
    "bands by time": lambda s, sel: queries.spectral_bands(s, sel, "time"),
    "diverged": lambda s, sel: queries.diverged_points(s, sel, "time"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rolled_views_equal_the_raw_row_sql(store, case):
    sel = CASES[case][0]
    for name, view in VIEWS.items():
        rolled, raw = view(store, sel), view(Raw(store), sel)
        assert len(raw), (name, case)
        pd.testing.assert_frame_equal(rolled, raw, check_dtype=False, rtol=1e-12, obj=f"{name} / {case}")


def test_migration_backfill_equals_the_rollups_kept_at_ingest(traces, tmp_path):
    """The migration rolls up an existing store in SQL; ingest merges batches in Arrow: one result."""
    with Store(tmp_path / "s.duckdb") as s:
        s.write_traces(traces[:20])
        s.write_traces(traces[20:])
        sels = [CASES[c][0] for c in CASES]
        before = [view(s, sel) for view in VIEWS.values() for sel in sels]
        with s._cursors.cursor(read=False) as cur:
            cur.execute("DELETE FROM rollup_iterations")
            assert queries.halting_by_iteration(s, Selection(kinds=())).empty  # the views do read the rollups
            for statement in rollups.MIGRATION:
                cur.execute(statement)
        after = [view(s, sel) for view in VIEWS.values() for sel in sels]
    for a, b in zip(before, after):
        pd.testing.assert_frame_equal(a, b, check_dtype=False, rtol=1e-12)


def test_a_selection_on_a_user_attribute_reads_raw_rows(store, traces):
    sel = Selection(kinds=(), attribute="endpoint", values=("/chat",))
    assert not sel.rolls_up(store) and not Selection(group="attr:user").rolls_up(store)
    assert not Selection().rolls_up(Raw(store))


def test_the_lens_rows_kept_at_ingest_are_the_lens_sampled_positions(store, traces):
    """`rollup_lens`, written batch by batch (out of time order) and by the migration, holds every
    position row with a finite lens argmax and no other; the what-if reads the same from it as
    from every position row."""
    sampled = sum(int(np.isfinite(t.position_metrics["lens_argmax"]).sum()) for t in traces if t.position_metrics)
    cols = ", ".join(rollups.LENS_COLUMNS)
    kept = store.query(f"SELECT {cols} FROM {rollups.LENS_TABLE} ORDER BY ALL")
    assert len(kept) == sampled > 0
    raw = store.query(f"SELECT {cols} FROM positions WHERE isfinite(lens_argmax) ORDER BY ALL")
    pd.testing.assert_frame_equal(kept, raw)
    sel = Selection(kinds=())
    for sample in (None, 3):
        got = whatif.evaluate(store, sel, sample=sample)
        assert len(got) and (sample is None or (got["forwards_replayed"] < got["forwards_selected"]).all())
        pd.testing.assert_frame_equal(got, whatif.evaluate(Raw(store), sel, sample=sample))
    with store._cursors.cursor(read=False) as cur:
        cur.execute(f"DELETE FROM {rollups.LENS_TABLE}")
        assert whatif.evaluate(store, sel).empty  # the what-if does read it
        for statement in rollups.LENS_MIGRATION:
            cur.execute(statement)
    pd.testing.assert_frame_equal(store.query(f"SELECT {cols} FROM {rollups.LENS_TABLE} ORDER BY ALL"), raw)
