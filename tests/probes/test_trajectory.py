"""The trajectory probe against a PCA of the states collected by hand with numpy.

`ForwardReducer` is driven with states made up here, one kind of path per position: a slider (a
straight drift with a little noise), an ellipse (an orbit with two distinct radii, so that its two
principal directions are defined), positions that land on a fixed point at different iterations,
and random walks. Every number is recomputed from those states with numpy's SVD (projections up
to sign, then the sign convention checked on its own), the shares from the singular values, and
the fixed points from the relative steps. Then through a real forward of our model and of a preset
(`attach(spec=...)`), with the states collected by a hook independent of the probe."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import mythos_probe
from mythos_probe.metrics.trajectory import FIXED_POINT_TOL
from mythos_probe.probes.adapters import ForwardContext, IterationTensors
from mythos_probe.probes.reductions import DEFAULT_PROBES, ForwardReducer

B, T, D, I = 2, 6, 8, 10
SETTLE = {2: 4, 3: 7}  # position → the iteration whose state every later one repeats (batch row 0)


def made_up(seed: int = 0) -> np.ndarray:
    """(I + 1, B, T, D) float64: index 0 is the state entering iteration 0, then h_0 … h_{I−1}."""
    rng = np.random.default_rng(seed)
    h = np.zeros((I + 1, B, T, D))
    t = np.arange(I + 1)[:, None] - 1.0
    u, w, v = (rng.normal(size=D) for _ in range(3))
    h[:, 0, 0] = 3.0 + t * v + 0.05 * rng.normal(size=(I + 1, D))  # slider
    angle = 2 * np.pi * t / 7
    h[:, 0, 1] = 1.0 + 2.0 * np.cos(angle) * u + 0.7 * np.sin(angle) * w  # orbit, radii 2 and 0.7
    for pos, at in SETTLE.items():  # a random walk that stops at h_at (index at + 1)
        walk = 2.0 + np.cumsum(rng.normal(size=(I + 1, D)), axis=0)
        walk[at + 1 :] = walk[at + 1]
        h[:, 0, pos] = walk
    h[:, 0, 4] = 5.0  # never moves (after entering the loop): no variance to explain
    h[0, 0, 4] = 4.0
    h[:, 0, 5] = rng.normal(size=(I + 1, D)).cumsum(0)
    h[:, 1] = rng.normal(size=(I + 1, T, D)).cumsum(0) * rng.uniform(0.2, 3, size=(1, T, 1))
    return h


def run(h: np.ndarray, probes=("trajectory",), n_loops=I, dtype=torch.float32):
    out = []
    red = ForwardReducer(tuple(probes), "positions", "last", 1, out.append, {}, "r", "m", lambda: None)
    states = torch.tensor(h, dtype=dtype)
    ctx = ForwardContext(token_ids=torch.zeros(B, T, dtype=torch.long), n_loops=n_loops, exit_policy="fixed", cfg=None)
    assert red.begin(ctx)
    for i in range(h.shape[0] - 1):
        red.iteration(IterationTensors(state_in=states[i], state_out=states[i + 1]))
    red.end(None)
    (pending,) = out
    return pending.materialize()


def numpy_pca(x: np.ndarray, k: int = 3):
    """x (I, D) one position's states → projections (I, k), shares (k,)."""
    xc = x - x.mean(0)
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    proj = xc @ vt[:k].T
    total = (s**2).sum()
    return proj, (s[:k] ** 2 / total) if total > 0 else np.full(k, np.nan)


def numpy_fixed(h: np.ndarray, b: int, p: int) -> np.ndarray:
    x = h[:, b, p]
    step = np.linalg.norm(x[1:] - x[:-1], axis=-1) / np.linalg.norm(x[1:], axis=-1)  # into iteration t
    n = len(step)
    return np.array([all(step[u] <= FIXED_POINT_TOL for u in (range(t + 1, n) if t < n - 1 else [t]))
                     for t in range(n)], dtype=float)


H = made_up()


@pytest.mark.parametrize("probes", [("trajectory",), (*DEFAULT_PROBES, "trajectory")])
def test_projections_and_shares_equal_a_numpy_pca_of_each_positions_states(probes):
    tr = run(H, probes)
    got = np.stack([tr.position_metrics[f"traj_pc{j}"] for j in (1, 2, 3)], -1)  # (B, T, I, 3)
    share = np.stack([tr.position_metrics[f"traj_pc{j}_share"] for j in (1, 2, 3)], -1)
    checked = 0
    for b in range(B):
        for p in range(T):
            want, want_share = numpy_pca(H[1:, b, p])
            if np.isnan(want_share).all():  # the position that never moves
                assert (got[b, p] == 0).all() and np.isnan(share[b, p]).all()
                continue
            scale = np.abs(want).max()
            for j in range(3):
                sign = 1.0 if got[b, p, :, j] @ want[:, j] >= 0 else -1.0
                np.testing.assert_allclose(got[b, p, :, j], sign * want[:, j], atol=2e-5 * scale, err_msg=f"{b} {p} {j}")
                # the orientation convention: each path ends at or above where it starts
                assert got[b, p, -1, j] >= got[b, p, 0, j] - 1e-6 * scale
            np.testing.assert_allclose(share[b, p], np.broadcast_to(want_share, (I, 3)), atol=1e-5)
            checked += 1
    assert checked == B * T - 1
    # the fixture's paths differ as intended: a slider is one direction, the ellipse two
    assert share[0, 0, 0, 0] > 0.99 and 0.5 < share[0, 1, 0, 0] < 0.95 and share[0, 1, 0, :2].sum() > 0.999


def test_fixed_points_mark_the_iteration_each_position_settles_at():
    tr = run(H)
    fixed = tr.position_metrics["traj_fixed"]
    for b in range(B):
        for p in range(T):
            np.testing.assert_array_equal(fixed[b, p], numpy_fixed(H, b, p), err_msg=f"{b} {p}")
    first = {p: int(np.argmax(fixed[0, p])) if fixed[0, p].any() else None for p in range(T)}
    assert first == {0: None, 1: None, 2: 4, 3: 7, 4: 0, 5: None}
    # the fixed point is the state every later iteration repeats: its projections repeat too
    for p, at in SETTLE.items():
        pcs = np.stack([tr.position_metrics[f"traj_pc{j}"][0, p] for j in (1, 2, 3)], -1)
        np.testing.assert_allclose(pcs[at:], np.broadcast_to(pcs[at], pcs[at:].shape), atol=1e-4)
        assert not np.allclose(pcs[at - 1], pcs[at], atol=1e-3)


def test_a_loop_shorter_than_three_iterations_pads_the_missing_directions():
    tr = run(H[:3])  # two iterations: one direction at most
    assert tr.iterations == 2
    x = H[1:3, 0, 5]
    half = np.linalg.norm(x[1] - x[0]) / 2  # two states: ±half their distance along the line joining them
    # a third direction does not exist (padded: exactly 0); the second holds rounding only
    np.testing.assert_array_equal(tr.position_metrics["traj_pc3"][0, 5], [0, 0])
    np.testing.assert_array_equal(tr.position_metrics["traj_pc3_share"][0, 5], [0, 0])
    np.testing.assert_allclose(tr.position_metrics["traj_pc2"][0, 5], [0, 0], atol=1e-5 * half)
    np.testing.assert_allclose(tr.position_metrics["traj_pc1_share"][0, 5], [1, 1], atol=1e-6)
    np.testing.assert_allclose(tr.position_metrics["traj_pc1"][0, 5], [-half, half], rtol=1e-5)


def test_the_trajectory_probe_asks_for_positions_detail():
    model = mythos_probe.model.LoopedTransformer(mythos_probe.model.LoopedConfig.variant("tiny-gqa"))
    with pytest.raises(ValueError, match=r"detail='positions'"):
        with mythos_probe.attach(model, probes=[*DEFAULT_PROBES, "trajectory"]):
            pass


def assert_pca(trace, states: np.ndarray, tol: float = 1e-4) -> None:
    """`trace`'s projections and first share against a numpy PCA of `states` (I, B, T, D)."""
    got = np.stack([trace.position_metrics[f"traj_pc{j}"] for j in (1, 2, 3)], -1)
    Bn, Tn = states.shape[1:3]
    for b in range(Bn):
        for p in range(Tn):
            want, want_share = numpy_pca(states[:, b, p].astype(np.float64))
            scale = np.abs(want).max()
            for j in range(3):
                sign = 1.0 if got[b, p, :, j] @ want[:, j] >= 0 else -1.0
                np.testing.assert_allclose(got[b, p, :, j], sign * want[:, j], atol=tol * scale, err_msg=f"{b} {p} {j}")
            np.testing.assert_allclose(trace.position_metrics["traj_pc1_share"][b, p], want_share[0], atol=tol)


@pytest.mark.parametrize("variant", ["tiny-gqa", "tiny-mla"])
def test_on_our_model_the_projections_equal_a_pca_of_the_states_its_hook_points_saw(variant):
    from mythos_probe.model import LoopedConfig, LoopedTransformer

    torch.manual_seed(0)
    model = LoopedTransformer(LoopedConfig.variant(variant)).eval()
    ids = torch.randint(0, 256, (2, 5))
    with torch.no_grad(), mythos_probe.attach(model, probes=["trajectory"], detail="positions") as rec:
        model(ids, n_loops=6, exit="fixed")
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, n_loops=6, exit="fixed")
    states = np.stack([cache[("recurrent.hook_state_out", t)].double().numpy() for t in range(6)])
    (trace,) = rec.traces
    assert trace.iterations == 6
    assert_pca(trace, states)


def test_on_the_huginn_preset_the_projections_equal_a_pca_of_its_core_block_outputs():
    """Huginn / Raven under `attach(model)` with no spec: the states are the last core block's outputs."""
    from tests.probes.looped_models import Capture, RavenForCausalLM

    torch.manual_seed(0)
    raven = RavenForCausalLM(num_steps=5).eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    t = raven.transformer
    torch.manual_seed(7)
    with torch.no_grad(), Capture(core=t.core_block[-1]) as cap:
        raven(ids)
    torch.manual_seed(7)  # the same random initial state
    with torch.no_grad(), mythos_probe.attach(raven, probes=["trajectory"], detail="positions") as rec:
        raven(ids)
    (trace,) = rec.traces
    states = np.stack([o.double().numpy() for o in cap.outputs["core"]])
    assert trace.iterations == states.shape[0] == 5
    assert_pca(trace, states)


def test_plot_draws_each_positions_path_and_marks_its_fixed_point():
    from mythos_probe.plots import Plots

    tr = run(H)
    fig = Plots([tr]).trajectories(batch_index=0, components=(1, 2))
    paths = [d for d in fig.data if d.mode == "lines+markers"]
    assert len(paths) == T
    stars = {int(d.legendgroup): d for d in fig.data if d.marker.symbol == "star"}
    assert sorted(stars) == [2, 3, 4]  # the settled positions (4 never moved)
    for p, path in enumerate(paths):
        np.testing.assert_array_equal(path.x, tr.position_metrics["traj_pc1"][0, p])
        np.testing.assert_array_equal(path.y, tr.position_metrics["traj_pc2"][0, p])
    for p, at in SETTLE.items():
        assert (stars[p].x[0], stars[p].y[0]) == (tr.position_metrics["traj_pc1"][0, p, at],
                                                  tr.position_metrics["traj_pc2"][0, p, at])
    s1, s2 = (tr.position_metrics[f"traj_pc{j}_share"][0, 1, 0] for j in (1, 2))
    assert paths[1].name == f"1: #0 ({s1:.0%} + {s2:.0%})"  # the orbit: its shares on the two directions
    fig13 = Plots([tr]).trajectories(positions=[1], components=(1, 3))
    np.testing.assert_array_equal(fig13.data[0].y, tr.position_metrics["traj_pc3"][0, 1])
    summary = dataclasses.replace(tr, detail="summary", position_metrics={})
    with pytest.raises(ValueError, match="'trajectory'"):
        Plots([summary]).trajectories()
    with pytest.raises(IndexError, match="positions"):
        Plots([tr]).trajectories(positions=[T])
