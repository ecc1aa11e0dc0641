"""The trajectory probe in `ForwardReducer` on inputs tests/probes/test_trajectory.py does not build:
a model that updates its state tensor in place (the probe must keep a copy of each state, not
the one tensor the model keeps rewriting), and a loop whose state-sized bookkeeping must be gone
once its last iteration is seen (before the coda runs), with the trace still whole afterwards.
Every expected value is a numpy PCA of the states, or the states' own relative steps."""

from __future__ import annotations

import numpy as np
import torch

from mythos_probe.probes.adapters import ForwardContext, IterationTensors
from mythos_probe.probes.reductions import DEFAULT_PROBES, ForwardReducer
from tests.probes.test_trajectory import B, H, I, T, numpy_fixed, numpy_pca


def pcs(trace) -> tuple[np.ndarray, np.ndarray]:
    got = np.stack([trace.position_metrics[f"traj_pc{j}"] for j in (1, 2, 3)], -1)  # (B, T, I, 3)
    share = np.stack([trace.position_metrics[f"traj_pc{j}_share"] for j in (1, 2, 3)], -1)
    return got, share


def test_a_state_the_model_rewrites_in_place_is_copied_each_iteration():
    """One state tensor, overwritten by every iteration (as a model that runs `h.copy_(...)` or
    `h.add_(...)` does): the probe must have kept each iteration's values."""
    out = []
    red = ForwardReducer(("trajectory",), "positions", "last", 1, out.append, {}, "r", "m", lambda: None)
    red.begin(ForwardContext(token_ids=torch.zeros(B, T, dtype=torch.long), n_loops=I, exit_policy="fixed", cfg=None))
    h = torch.tensor(H[0], dtype=torch.float32)
    for i in range(I):
        before = h.clone()
        h.copy_(torch.tensor(H[i + 1], dtype=torch.float32))  # the model's own tensor, rewritten
        red.iteration(IterationTensors(state_in=before, state_out=h))
    h.zero_()  # and once more after the loop, before the trace is built
    red.end(None)
    tr = out[0].materialize()
    got, share = pcs(tr)
    for b, p in ((0, 0), (0, 1), (0, 2), (1, 3)):
        want, want_share = numpy_pca(H[1:, b, p])
        for j in range(3):
            sign = 1.0 if got[b, p, :, j] @ want[:, j] >= 0 else -1.0
            np.testing.assert_allclose(got[b, p, :, j], sign * want[:, j], atol=2e-5 * np.abs(want).max())
        np.testing.assert_allclose(share[b, p, 0], want_share, atol=1e-5)
    for b in range(B):
        for p in range(T):
            np.testing.assert_array_equal(tr.position_metrics["traj_fixed"][b, p], numpy_fixed(H, b, p))


def test_the_loops_states_are_released_at_its_last_iteration():
    """At the n_loops-th iteration every state-sized tensor the probes hold is dropped (the coda and
    head, where a forward peaks in memory, run next); the trace built afterwards is unchanged."""
    out = []
    probes = (*DEFAULT_PROBES, "trajectory")
    red = ForwardReducer(probes, "positions", "last", 1, out.append, {}, "r", "m", lambda: None)
    red.begin(ForwardContext(token_ids=torch.zeros(B, T, dtype=torch.long), n_loops=I, exit_policy="fixed", cfg=None))
    states = torch.tensor(H, dtype=torch.float32)
    for i in range(I):
        red.iteration(IterationTensors(state_in=states[i], state_out=states[i + 1]))
        f = red.fwd
        if i < I - 1:
            assert len(f.traj_states) == len(f.traj_steps) == len(f.trail) == i + 1 and f.prev is not None
    assert (f.traj_states, f.traj_steps, f.trail) == ([], [], [])
    assert (f.final, f.prev, f.prev_delta, f.prev_topk) == (None, None, None, None)
    assert f.traj_gram is not None and f.traj_fixed.shape == (I, B, T) and f.dist.shape == (I,)
    red.end(None)
    tr = out[0].materialize()
    got, share = pcs(tr)
    want, want_share = numpy_pca(H[1:, 0, 1])  # the orbit: two directions
    np.testing.assert_allclose(np.abs(got[0, 1, :, :2]), np.abs(want[:, :2]), atol=2e-5 * np.abs(want).max())
    np.testing.assert_allclose(share[0, 1, 0], want_share, atol=1e-5)
    assert tr.iteration_metrics["dist_to_final"][-1] == 0.0


def test_a_loop_that_ends_before_n_loops_is_reduced_when_the_forward_ends():
    """An exit policy stopped the loop before n_loops: no iteration was the last, so the states are
    reduced at `end`, over the iterations that ran."""
    out = []
    red = ForwardReducer(("trajectory",), "positions", "last", 1, out.append, {}, "r", "m", lambda: None)
    red.begin(ForwardContext(token_ids=torch.zeros(B, T, dtype=torch.long), n_loops=I + 5, exit_policy="kl", cfg=None))
    states = torch.tensor(H, dtype=torch.float32)
    for i in range(I):
        red.iteration(IterationTensors(state_in=states[i], state_out=states[i + 1]))
    assert len(red.fwd.traj_states) == I and red.fwd.traj_gram is None
    red.end(None)
    tr = out[0].materialize()
    assert (tr.iterations, tr.n_loops) == (I, I + 5)
    got, share = pcs(tr)
    want, want_share = numpy_pca(H[1:, 0, 0])
    sign = 1.0 if got[0, 0, :, 0] @ want[:, 0] >= 0 else -1.0
    np.testing.assert_allclose(got[0, 0, :, 0], sign * want[:, 0], atol=2e-5 * np.abs(want).max())
    np.testing.assert_array_equal(tr.position_metrics["traj_fixed"][0, 2], numpy_fixed(H, 0, 2))


def test_bfloat16_rounding_of_a_straight_path_is_no_second_direction():
    """States held in bfloat16 (the model's dtype, not float32) are known to 2⁻⁸ of their size: a
    straight slide, once rounded, wobbles off its line by that much, and the probe must read the
    wobble as rounding (one direction, share 1) by the bfloat16 floor. The fixture shows the
    property: the wobble's singular value is far above float32's floor and below bfloat16's."""
    g = torch.Generator().manual_seed(3)
    c, v = 10 * torch.randn(8, generator=g), torch.randn(8, generator=g)
    n = 6
    h = torch.stack([c + t * v for t in range(n + 1)])[:, None, None].to(torch.bfloat16)  # (I + 1, 1, 1, D)
    out = []
    red = ForwardReducer(("trajectory",), "positions", "last", 1, out.append, {}, "r", "m", lambda: None)
    red.begin(ForwardContext(token_ids=torch.zeros(1, 1, dtype=torch.long), n_loops=n, exit_policy="fixed", cfg=None))
    for i in range(n):
        red.iteration(IterationTensors(state_in=h[i], state_out=h[i + 1]))
    red.end(None)
    tr = out[0].materialize()
    x = h[1:, 0, 0].double().numpy()
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    frobenius = np.linalg.norm(x)
    assert 4 * 2**-24 * frobenius < s[1] <= 4 * 2**-8 * frobenius  # rounding, by bfloat16's measure only
    assert tr.position_metrics["traj_pc1_share"][0, 0].tolist() == [1.0] * n
    for j in (2, 3):
        assert (tr.position_metrics[f"traj_pc{j}"][0, 0] == 0).all()
        assert (tr.position_metrics[f"traj_pc{j}_share"][0, 0] == 0).all()
    want, _ = numpy_pca(x)
    np.testing.assert_allclose(np.abs(tr.position_metrics["traj_pc1"][0, 0]), np.abs(want[:, 0]), rtol=1e-3)
