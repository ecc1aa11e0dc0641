"""The dashboard's SQL against a real store, checked with independent numpy on the same traces."""

from __future__ import annotations

import numpy as np
import pytest

from mythos_probe.dashboards import queries
from mythos_probe.dashboards.queries import Selection
from tests.dashboards.conftest import DIVERGED


def _used(traces):
    return np.concatenate([t.position_iterations.ravel() for t in traces])


def test_tokens_by_iterations_used_matches_position_counts(store, traces):
    df = queries.tokens_by_iterations_used(store, Selection())
    expected = np.bincount(_used(traces))
    assert df["used"].tolist() == [k for k in range(len(expected)) if expected[k]]
    assert df["tokens"].tolist() == [float(expected[k]) for k in df["used"]]


def test_filters_select_models_runs_windows_and_attributes(store, traces):
    def count(sel):
        return int(queries.totals(store, sel)["forwards"].iloc[0])

    assert count(Selection()) == len(traces)
    assert count(Selection(models=("mythos-small",))) == sum(t.model_id == "mythos-small" for t in traces)
    assert count(Selection(runs=("run-a", "run-b"))) == sum(t.run_id in ("run-a", "run-b") for t in traces)
    newest = max(t.start_ns for t in traces)
    assert count(Selection(window="1h")) == sum(newest - t.start_ns <= 3600 * 10**9 for t in traces)
    assert count(Selection(attribute="endpoint", values=("/chat",))) == sum(
        t.attributes["endpoint"] == "/chat" for t in traces
    )
    # Values travel as parameters: a quote in a value is data, not SQL.
    assert count(Selection(attribute="endpoint", values=("x' OR '1'='1",))) == 0


def test_compute_saved_is_relative_to_the_requested_maximum(store, traces):
    df = queries.compute_saved(store, Selection(group="model")).set_index("grp")
    for model in ("mythos-tiny", "mythos-small"):
        mine = [t for t in traces if t.model_id == model]
        used = sum(t.position_iterations.sum() for t in mine)
        budget = sum(t.n_loops * t.position_iterations.size for t in mine)
        assert df.loc[model, "saved_share"] == pytest.approx(1 - used / budget)
        assert df.loc[model, "iterations_per_token"] == pytest.approx(used / sum(t.position_iterations.size for t in mine))


def test_grouping_by_a_user_attribute(store, traces):
    df = queries.cost_by_group(store, Selection(group="attr:user")).set_index("grp")
    assert sorted(df.index) == sorted({t.attributes["user"] for t in traces})
    for user in df.index:
        flops = sum(t.forward_metrics["flops"] for t in traces if t.attributes["user"] == user)
        assert df.loc[user, "flops"] == pytest.approx(flops)


def test_cumulative_halting_reaches_one_and_matches_exit_counts(store, traces):
    df = queries.halting_by_iteration(store, Selection(runs=("run-a",)))
    mine = [t for t in traces if t.run_id == "run-a"]
    exits = np.sum([t.iteration_metrics["exit_count"] for t in mine], axis=0)
    np.testing.assert_allclose(df["exits"], exits)
    np.testing.assert_allclose(df["cumulative_halted"], np.cumsum(exits) / exits.sum())


def test_expert_load_share_per_iteration(store, traces):
    df = queries.expert_load(store, Selection())
    load = np.zeros((8, 4))
    for t in traces:
        load[: t.iterations] += t.expert_load
    share = load / load.sum(axis=1, keepdims=True)
    got = df.pivot(index="iteration", columns="expert", values="share").to_numpy()
    np.testing.assert_allclose(got, share)


def test_iteration_means_skip_undefined_values(store, traces):
    df = queries.iteration_means(store, Selection(runs=("run-c",)), ("rel_residual",))
    mine = np.array([t.iteration_metrics["rel_residual"] for t in traces if t.run_id == "run-c"])
    assert np.isnan(df["rel_residual"].iloc[0])  # t = 0 is undefined for every forward
    np.testing.assert_allclose(df["rel_residual"].iloc[1:], mine[:, 1:].mean(axis=0))


def test_divergences_list_the_diverged_forward(store, traces):
    df = queries.divergences(store, Selection())
    assert df["trace_id"].tolist() == [traces[DIVERGED].trace_id]
    points = queries.diverged_points(store, Selection(), "step")
    bad = traces[DIVERGED]
    assert points[["trace_id", "run_id", "x", "endpoint"]].values.tolist() == [
        [bad.trace_id, bad.run_id, bad.step, bad.attributes["endpoint"]]]


def test_spectral_bands_are_quantiles_over_equal_step_buckets(store, traces):
    bands = queries.spectral_bands(store, Selection(), "step", buckets=2)
    steps = np.array([t.step for t in traces])
    width = (steps.max() - steps.min()) / 2
    for run in ("run-a", "run-b", "run-c"):
        mine = [t for t in traces if t.run_id == run]
        bucket = np.floor((np.array([t.step for t in mine]) - steps.min()) / width)
        rho = np.array([t.forward_metrics["rho_A"] for t in mine])
        growth = np.array([np.nanmax(t.iteration_metrics["growth_ratio"]) for t in mine])
        got = bands[bands["run_id"] == run]
        assert got["bucket"].tolist() == sorted(set(bucket))
        for q, name in ((0.1, "p10"), (0.5, "p50"), (0.9, "p90")):
            np.testing.assert_allclose(got[f"rho_{name}"], [np.quantile(rho[bucket == b], q) for b in got["bucket"]])
            np.testing.assert_allclose(got[f"growth_{name}"], [np.quantile(growth[bucket == b], q) for b in got["bucket"]])
        assert got["forwards"].tolist() == [int((bucket == b).sum()) for b in got["bucket"]]


def test_position_grid_of_one_forward(store, traces):
    t = traces[3]
    df = queries.position_grid(store, t.trace_id, 1, "rel_residual")
    assert len(df) == t.seq_len * t.iterations
    got = df.pivot(index="position", columns="iteration", values="value").to_numpy()
    np.testing.assert_allclose(got, t.position_metrics["rel_residual"][1], rtol=1e-6)
    with pytest.raises(ValueError, match="unknown metric"):
        queries.position_grid(store, t.trace_id, 0, "rel_residual; DROP TABLE forwards")


def test_non_finite_values_do_not_hide_the_finite_ones(store, traces):
    # The diverged forward's state norm is +Inf from its divergence on; the curves keep the rest.
    df = queries.iteration_means(store, Selection(runs=(traces[DIVERGED].run_id,)), ("state_norm",))
    mine = np.array([t.iteration_metrics["state_norm"] for t in traces if t.run_id == traces[DIVERGED].run_id])
    expected = [col[np.isfinite(col)].mean() for col in mine.T]
    np.testing.assert_allclose(df["state_norm"], expected)
    bands = queries.spectral_bands(store, Selection(), "step")
    assert np.isfinite(bands["growth_p90"]).all()  # NaN at t = 0 would otherwise win max()


def test_position_means_average_every_selected_forward_per_group(store, traces):
    df = queries.position_means(store, Selection(group="model"), "rel_residual")
    for model in ("mythos-small", "mythos-tiny"):
        mine = np.concatenate([t.position_metrics["rel_residual"] for t in traces if t.model_id == model])  # (B·n, S, T)
        got = df[df["grp"] == model].pivot(index="position", columns="iteration", values="value").to_numpy()
        np.testing.assert_allclose(got, mine.mean(axis=0), rtol=1e-5)
        used = np.concatenate([t.position_iterations for t in traces if t.model_id == model]).mean(axis=0)
        np.testing.assert_allclose(df[df["grp"] == model].groupby("position")["used"].first(), used)
    newest = queries.position_means(store, Selection(), "rel_residual", per_group=3)
    assert newest["forwards"].max() == 3
