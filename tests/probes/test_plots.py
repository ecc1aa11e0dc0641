"""Notebook figures: each draws the trace arrays it names (checked value by value), carries axis
titles with units, and refuses with a hint on how to attach when its data was not recorded."""

import secrets

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from mythos_probe import whatif
from mythos_probe.plots import Plots
from mythos_probe.records import LoopTrace

B, T, I, E = 2, 3, 4, 5


def make_trace(step=0, iterations=I, detail="positions", **fields):
    rng = np.random.default_rng(step)
    defaults = dict(
        trace_id=secrets.token_hex(16), span_id=secrets.token_hex(8), run_id="run", model_id="m", step=step,
        start_ns=0, end_ns=1, batch=B, seq_len=T, n_loops=iterations, iterations=iterations, exit_policy="act",
        detail=detail,
        iteration_metrics={
            "rel_residual": rng.uniform(1e-3, 1, iterations), "state_norm": rng.uniform(1, 2, iterations),
            "growth_ratio": rng.uniform(0.5, 1.5, iterations), "cum_halt": np.linspace(0.2, 1.0, iterations),
            "exit_count": rng.integers(0, 3, iterations), "lens_kl_final": rng.uniform(0.01, 1, iterations),
            "lens_top1_agree": rng.uniform(0, 1, iterations),
        },
        forward_metrics={"rho_A": 0.5 + step / 10},
        expert_load=rng.integers(0, 9, (iterations, E)),
        position_iterations=rng.integers(1, iterations + 1, (B, T)),
        token_ids=np.arange(B * T).reshape(B, T),
    )
    if detail == "positions":
        defaults["position_metrics"] = {
            "rel_residual": 10.0 ** rng.uniform(-4, 0, (B, T, iterations)),
            "cum_halt": rng.uniform(0, 1, (B, T, iterations)),
        }
    return LoopTrace(**{**defaults, **fields})


def axis_titles(fig: go.Figure) -> list[str]:
    layout = fig.to_plotly_json()["layout"]
    return [layout[k].get("title", {}).get("text") for k in layout if k.startswith(("xaxis", "yaxis"))]


def test_an_empty_trace_list_is_refused():
    with pytest.raises(ValueError, match="no traces"):
        Plots([])


def test_convergence_heatmap_draws_log_residual_by_position_with_tokens_and_halting_steps():
    tr = make_trace(token_text=(("a", "b", "c"), ("d", "e", "f")))
    fig = Plots([make_trace(step=9), tr]).convergence_heatmap(batch_index=1)
    heat, marks = fig.data
    values = tr.position_metrics["rel_residual"][1]  # (T, I)
    np.testing.assert_allclose(heat.z, np.log10(values.astype(np.float64)))
    np.testing.assert_allclose(heat.customdata, values)
    assert list(heat.y) == ["0: 'd'", "1: 'e'", "2: 'f'"]
    assert "log" in heat.colorbar.title.text
    assert list(marks.x) == list(tr.position_iterations[1] - 1) and list(marks.y) == list(heat.y)
    assert all(axis_titles(fig))


def test_convergence_heatmap_needs_position_detail():
    plots = Plots([make_trace(detail="summary")])
    with pytest.raises(ValueError, match="detail='positions'"):
        plots.convergence_heatmap()
    with pytest.raises(ValueError, match="no position metric 'lens_entropy'"):
        Plots([make_trace()]).convergence_heatmap(metric="lens_entropy")


def test_non_residual_metrics_keep_a_linear_colour_scale():
    tr = make_trace()
    heat = Plots([tr]).convergence_heatmap(metric="cum_halt").data[0]
    np.testing.assert_allclose(heat.z, tr.position_metrics["cum_halt"][0])


def test_halting_curves_pool_exit_counts_over_forwards():
    short, long = make_trace(step=1, iterations=2), make_trace(step=2, iterations=4)
    fig = Plots([short, long]).halting_curves()
    finished, cum, hist = fig.data
    counts = np.array(list(short.iteration_metrics["exit_count"]) + [0, 0]) + long.iteration_metrics["exit_count"]
    np.testing.assert_allclose(finished.y, np.cumsum(counts) / counts.sum())
    np.testing.assert_allclose(hist.x, [1, 2, 3, 4])  # iterations used = t + 1
    np.testing.assert_allclose(hist.y, counts)
    # both forwards have the same shape: a plain mean where both ran
    expected = np.r_[(short.iteration_metrics["cum_halt"] + long.iteration_metrics["cum_halt"][:2]) / 2,
                     long.iteration_metrics["cum_halt"][2:]]
    np.testing.assert_allclose(cum.y, expected)
    assert all(axis_titles(fig))


def test_expert_heatmap_is_expert_by_iteration():
    tr = make_trace()
    fig = Plots([tr]).expert_heatmap()
    np.testing.assert_array_equal(fig.data[0].z, tr.expert_load.T)
    assert all(axis_titles(fig))
    with pytest.raises(ValueError, match="'experts'"):
        Plots([make_trace(expert_load=None)]).expert_heatmap()


def test_spectral_adds_a_row_over_steps_when_several_forwards():
    one = Plots([make_trace()]).spectral()
    assert len(one.data) == 2
    traces = [make_trace(step=s) for s in (3, 5, 8)]
    fig = Plots(traces).spectral()
    rho, growth, last_norm = fig.data[2:]
    assert list(rho.x) == [3, 5, 8]
    np.testing.assert_allclose(rho.y, [0.8, 1.0, 1.3])
    np.testing.assert_allclose(growth.y, [t.iteration_metrics["growth_ratio"].max() for t in traces])
    np.testing.assert_allclose(last_norm.y, [t.iteration_metrics["state_norm"][-1] for t in traces])
    np.testing.assert_allclose(fig.data[1].y, traces[-1].iteration_metrics["growth_ratio"])
    assert all(axis_titles(fig))


def test_coda_lens_draws_kl_and_agreement_or_asks_for_the_lens_probe():
    tr = make_trace()
    fig = Plots([tr]).coda_lens()
    np.testing.assert_allclose(fig.data[0].y, tr.iteration_metrics["lens_kl_final"])
    np.testing.assert_allclose(fig.data[1].y, tr.iteration_metrics["lens_top1_agree"])
    assert fig.layout.yaxis.type == "log" and all(axis_titles(fig))
    without = {k: v for k, v in tr.iteration_metrics.items() if not k.startswith("lens")}
    with pytest.raises(ValueError, match="probes including 'lens'"):
        Plots([make_trace(iteration_metrics=without)]).coda_lens()


def test_convergence_overlays_one_line_per_forward():
    traces = [make_trace(step=s, iterations=n) for s, n in ((0, 2), (1, 4))]
    fig = Plots(traces).convergence()
    assert len(fig.data) == 2
    for line, tr in zip(fig.data, traces):
        np.testing.assert_allclose(line.y, tr.iteration_metrics["rel_residual"])
        assert list(line.x) == list(range(tr.iterations))
    assert fig.layout.yaxis.type == "log" and all(axis_titles(fig))


def test_whatif_is_the_pareto_figure_of_the_whatif_module():
    rng = np.random.default_rng(0)
    lens = {"lens_argmax": rng.integers(0, 3, (B, T, I)), "lens_top1_agree": rng.integers(0, 2, (B, T, I)),
            "lens_kl_prev": rng.uniform(0, 0.1, (B, T, I)), "lens_entropy": rng.uniform(0, 1, (B, T, I))}
    base = make_trace()
    tr = make_trace(position_metrics={**base.position_metrics, **lens})
    fig = Plots([tr]).whatif(min_agreement=0.5)
    expected = whatif.pareto_figure(whatif.evaluate([tr]), 0.5)
    assert [(t.name, tuple(t.x), tuple(t.y)) for t in fig.data] == [(t.name, tuple(t.x), tuple(t.y)) for t in expected.data]


def test_recorder_plot_draws_a_recorded_forward():
    from mythos_probe import attach
    from mythos_probe.model import LoopedConfig, LoopedTransformer

    torch.manual_seed(0)
    model = LoopedTransformer(LoopedConfig.variant("tiny-gqa")).eval()
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), attach(model, detail="positions", token_text=lambda i: f"t{i}") as rec:
        model(ids, n_loops=3, exit="fixed")
    fig = rec.plot.convergence_heatmap()
    assert fig.data[0].y[0] == f"0: 't{int(ids[0, 0])}'"
    np.testing.assert_allclose(fig.data[0].customdata, rec.traces[0].position_metrics["rel_residual"][0])
    assert list(fig.data[1].x) == [2] * 6  # fixed exit: every position ran all 3 iterations
