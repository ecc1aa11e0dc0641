"""Each formula of mythos_probe/metrics/ called directly on small hand-built tensors and compared
with the same quantity computed in numpy (or by hand), on inputs where the guards fire (zero
norms, empty loads, ties at a threshold) and where the defaults matter. Fast: no model is built.

These are the tests `scripts/mutation.sh mythos_probe/metrics/` runs first; tests/probes/
test_metrics.py checks the same metrics as the probes report them from a real forward."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mythos_probe.metrics import convergence, cost, experts, halting, lens, spectral

RNG = np.random.default_rng(0)


def t(x, dtype=torch.float64):
    return torch.tensor(np.asarray(x), dtype=dtype)


# --- convergence ---------------------------------------------------------------------------------

def test_constants_are_pinned():
    assert convergence.EPS == 1e-12
    assert convergence.DIST_SAMPLE_STRIDE == 16
    assert convergence.DIST_ROUNDOFF == 2.0**-8


def test_ratios_and_their_zero_guards():
    nd, nh, nhp = t([1.0, 2.0, 3.0]), t([2.0, 0.0, 4.0]), t([4.0, 1.0, 0.0])
    dot = t([1.5, -2.0, 6.0])
    eps = 1e-12
    np.testing.assert_allclose(convergence.rel_residual(nd, nh), [0.5, 2.0 / eps, 0.75])
    np.testing.assert_allclose(convergence.cos_step(dot, nh, nhp),
                               [1 - 1.5 / 8, 1 - (-2.0) / eps, 1 - 6.0 / eps])
    np.testing.assert_allclose(convergence.step_orthogonality(dot, nd, nhp), [1.5 / 4, -2.0 / 2, 6.0 / eps])
    # a norm just above the guard is used as it is
    assert convergence.rel_residual(t([1.0]), t([2e-12])).item() == pytest.approx(0.5e12)


@pytest.mark.parametrize("T, expected", [(1, 1), (3, 3), (4, 4), (10, 4), (64, 4), (65, 5), (100, 7), (160, 10), (161, 11)])
def test_sample_positions_defaults(T, expected):
    assert convergence.sample_positions(T) == expected == min(T, max(4, math.ceil(T / 16)))


def test_sample_positions_arguments():
    assert convergence.sample_positions(100, stride=10) == 10
    assert convergence.sample_positions(100, stride=10, at_least=12) == 12
    assert convergence.sample_positions(5, stride=1, at_least=2) == 5


def test_evenly_spaced():
    got = convergence.evenly_spaced(12, 4, "cpu")
    assert got.dtype == torch.int64
    assert got.tolist() == np.round(np.linspace(0, 11, 4)).astype(int).tolist() == [0, 4, 7, 11]
    assert convergence.evenly_spaced(5, 5, "cpu").tolist() == [0, 1, 2, 3, 4]
    # made on the device asked for (the meta device stands in for a GPU here)
    assert convergence.evenly_spaced(12, 4, "meta").device.type == "meta"


def test_dist_to_final_against_numpy():
    final = RNG.normal(size=(2, 3, 5)).astype(np.float32)
    trail = [RNG.normal(size=(2, 3, 5)) for _ in range(3)]
    got = convergence.dist_to_final([t(h, torch.bfloat16) for h in trail], t(final, torch.float32))
    norm_final = np.linalg.norm(final, axis=-1)
    want = [(np.linalg.norm(t(h, torch.bfloat16).double().numpy() - final, axis=-1) / norm_final).mean()
            for h in trail] + [0.0]
    assert got.shape == (4,)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    assert got[-1].item() == 0.0
    # a zero final state: divided by the 1e-12 guard, not by zero
    zero = convergence.dist_to_final([t(np.ones((1, 1, 4)), torch.bfloat16)], torch.zeros(1, 1, 4))
    assert zero.tolist() == [pytest.approx(2.0 / 1e-12), 0.0]
    # on the states' device (the meta device stands in for a GPU)
    meta = convergence.dist_to_final([torch.zeros(1, 2, 4, dtype=torch.bfloat16, device="meta")],
                                     torch.zeros(1, 2, 4, device="meta"))
    assert meta.device.type == "meta" and meta.shape == (2,)


def test_token_correlation_against_the_gram_matrix():
    x = RNG.normal(size=(3, 4, 6))
    x[2, 1] = 0.0  # a zero vector stays zero and adds nothing
    got = convergence.token_correlation(t(x))
    unit = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    gram = np.einsum("bpd,bqd->bpq", unit, unit)
    P = 4
    off = (gram.sum((1, 2)) - np.trace(gram, axis1=1, axis2=2)) / (P * (P - 1))
    assert got.item() == pytest.approx(off.mean(), rel=1e-6)  # computed in float32
    # leading dims are batch dims: (2, 3, P, D) averages the 6 sequences
    x4 = RNG.normal(size=(2, 3, 4, 6))
    u4 = x4 / np.linalg.norm(x4, axis=-1, keepdims=True)
    g4 = np.einsum("abpd,abqd->abpq", u4, u4)
    off4 = (g4.sum((2, 3)) - np.trace(g4, axis1=2, axis2=3)) / 12
    assert convergence.token_correlation(t(x4)).item() == pytest.approx(off4.mean(), rel=1e-4)  # float32
    # identical positions: correlation exactly 1
    same = np.repeat(RNG.normal(size=(1, 1, 6)), 5, axis=1)
    assert convergence.token_correlation(t(same)).item() == pytest.approx(1.0)


def test_token_correlation_of_one_position_is_nan():
    assert math.isnan(convergence.token_correlation(t(RNG.normal(size=(2, 1, 4)))).item())
    assert convergence.token_correlation(torch.zeros(2, 1, 4, device="meta")).device.type == "meta"
    assert not math.isnan(convergence.token_correlation(t(RNG.normal(size=(2, 2, 4)))).item())


# --- cost ----------------------------------------------------------------------------------------

def test_forward_cost_against_forward_flops():
    from mythos_probe.model.config import LoopedConfig
    from mythos_probe.model.variants import forward_flops, lens_flops_per_row

    cfg = LoopedConfig.variant("tiny-gqa")
    used = np.array([[1, 2, 3], [3, 3, 1]])
    got = cost.forward_cost(cfg, 2, 3, 3, 5, past_len=4, used=used)
    f = lambda n: forward_flops(cfg, 2, 3, n, 4)  # noqa: E731
    assert got["flops"] == f(2 * 3 * 3)
    assert got["loop_flops"] == f(18) - f(0)
    assert got["flops_saved"] == pytest.approx((f(30) - f(18)) / (f(30) - f(0)))
    assert got["flops_saved"] == pytest.approx(2 / 5)  # the loop's cost is linear in iterations
    assert got["lens_flops"] == 6 * lens_flops_per_row(cfg, 3, 4)
    assert got["useful_flops"] == f(13)
    # defaults: no past, no `used` → no useful_flops
    plain = cost.forward_cost(cfg, 2, 3, 3, 5)
    assert set(plain) == {"flops", "loop_flops", "flops_saved", "lens_flops"}
    assert plain["flops"] == forward_flops(cfg, 2, 3, 18, 0)
    assert plain["lens_flops"] == 6 * lens_flops_per_row(cfg, 3, 0)


def test_forward_cost_without_a_loop_budget_saves_nothing():
    from mythos_probe.model.config import LoopedConfig

    got = cost.forward_cost(LoopedConfig.variant("tiny-gqa"), 1, 2, 0, 0)
    assert got["flops_saved"] == 0.0 and got["loop_flops"] == 0.0


def test_param_cost_by_hand():
    got = cost.param_cost(tokens=10, iterations=3, loop_params=7, other_params=5, used=np.array([1, 2, 3, 3]))
    assert got == {"flops": 2.0 * 10 * (5 + 3 * 7), "loop_flops": 2.0 * 10 * 3 * 7,
                   "useful_flops": 2.0 * (10 * 5 + 9 * 7)}
    assert set(cost.param_cost(10, 3, 7, 5)) == {"flops", "loop_flops"}


# --- experts -------------------------------------------------------------------------------------

def test_load_counts_every_choice():
    idx = torch.tensor([[0, 2], [2, 3], [0, 2]])
    got = experts.load(idx, 5, torch.ones(6))
    assert got.tolist() == [2.0, 0.0, 3.0, 1.0, 0.0]
    assert got.dtype == torch.float32
    on = experts.load(idx.to("meta"), 5, torch.ones(6, device="meta"))  # on the ids' device
    assert on.device.type == "meta" and on.shape == (5,)


def test_balance_against_numpy():
    # 5 iterations × 4 experts (not square: an axis mix-up shows)
    loads = np.array([[3.0, 1.0, 0.0, 4.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0],
                      [9.0, 0.0, 1.0, 6.0]])
    got = {k: v.numpy() for k, v in experts.balance(t(loads, torch.float32)).items()}
    E = 4
    mean = loads.mean(1)
    share = loads / np.maximum(loads.sum(1, keepdims=True), 1)
    ent = -np.where(share > 0, share * np.log(np.where(share > 0, share, 1)), 0).sum(1) / np.log(E)
    dead = (loads == 0).sum(1)
    np.testing.assert_allclose(got["expert_max_vio"], loads.max(1) / np.maximum(mean, 1e-12) - 1, rtol=1e-6)
    np.testing.assert_allclose(got["expert_cv"], loads.std(1) / np.maximum(mean, 1e-12), rtol=1e-6)
    np.testing.assert_allclose(got["expert_load_entropy"], ent, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["expert_dead"], dead)
    np.testing.assert_allclose(got["expert_active_ratio"], 1 - dead / E)
    assert got["expert_dead"].dtype == np.float32
    # pinned by hand: the empty row, the uniform row
    assert got["expert_max_vio"][2] == -1.0 and got["expert_cv"][2] == 0.0 and got["expert_load_entropy"][2] == 0.0
    assert got["expert_load_entropy"][3] == pytest.approx(1.0) and got["expert_max_vio"][3] == 0.0
    assert set(got) == {"expert_max_vio", "expert_cv", "expert_load_entropy", "expert_dead", "expert_active_ratio"}
    # leading dims (runs, iterations, experts): every statistic over the last axis
    three = experts.balance(t(np.stack([loads[:3], loads[2:]]), torch.float32))
    for k, v in three.items():
        np.testing.assert_allclose(v.numpy(), np.stack([got[k][:3], got[k][2:]]), rtol=1e-6, atol=1e-7, err_msg=k)


def test_routing_entropy_against_numpy():
    logits = RNG.normal(size=(5, 4)) * 3
    got = experts.routing_entropy(t(logits, torch.float16))
    assert got.dtype == torch.float32 and got.shape == ()
    l16 = t(logits, torch.float16).double().numpy()
    p = np.exp(l16 - l16.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert got.item() == pytest.approx((-(p * np.log(p)).sum(1)).mean(), rel=1e-5)
    # leading dims (iterations, tokens, experts): one entropy per iteration, over the last axis
    stacked = experts.routing_entropy(t(np.stack([logits, logits[::-1] * 2])))
    assert stacked.shape == (2,) and stacked[0].item() == pytest.approx(got.item(), rel=1e-3)


def test_bias_changed_share_counts_only_strictly_lower_logits():
    # k = 2, unbiased top-2 of row 0 is {0, 1} or {0, 2} (a tie at the 2nd largest, 2.0)
    logits = t([[3.0, 2.0, 2.0, 0.0], [1.0, 5.0, 4.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    chosen = torch.tensor([[0, 2], [3, 1], [0, 1]])
    # row 0: expert 2 ties the k-th logit, not changed; row 1: expert 3 changed; row 2: both changed
    assert experts.bias_changed_share(logits, chosen).item() == pytest.approx(3 / 6)
    # the order of the chosen ids does not matter: each is compared with the k-th largest logit
    assert experts.bias_changed_share(t([[5.0, 4.0, 3.0, 0.0]]), torch.tensor([[1, 0]])).item() == 0.0
    # k = 3, and leading dims (iterations, tokens, experts)
    l3 = t([[[5.0, 4.0, 3.0, 0.0, 1.0], [0.0, 1.0, 2.0, 3.0, 4.0]], [[1.0, 1.0, 1.0, 2.0, 0.0], [9.0, 8.0, 7.0, 6.0, 5.0]]])
    c3 = torch.tensor([[[2, 0, 4], [4, 3, 2]], [[0, 1, 4], [4, 3, 2]]])
    # kth: 3, 2 | 1, 7 → changed: 1 (1<3), 0 | 1 (0<1), 2 (5, 6 < 7) → (1 + 0 + 1 + 2) / 12
    assert experts.bias_changed_share(l3, c3).item() == pytest.approx(4 / 12)


def test_topk_overlap_and_shared_routed_ratio():
    now = torch.tensor([[0, 1], [2, 3], [1, 0]])
    prev = torch.tensor([[1, 0], [3, 0], [2, 3]])
    assert experts.topk_overlap(now, prev).item() == pytest.approx((2 + 1 + 0) / 6)
    # leading dims: the overlap is per token, over the last axis
    now3 = torch.tensor([[[0, 1, 2], [3, 4, 5]], [[1, 0, 2], [0, 1, 2]]])
    prev3 = torch.tensor([[[3, 4, 5], [0, 1, 2]], [[0, 5, 4], [7, 6, 1]]])
    assert experts.topk_overlap(now3, prev3).item() == pytest.approx((0 + 0 + 1 + 1) / 12)
    shared = RNG.normal(size=(3, 4))
    routed = RNG.normal(size=(3, 4))
    routed[2] = 0.0
    want = (np.linalg.norm(shared, axis=1) / np.maximum(np.linalg.norm(routed, axis=1), 1e-12)).mean()
    got = experts.shared_routed_ratio(t(shared, torch.float16), t(routed, torch.float16))
    assert got.dtype == torch.float32
    s16, r16 = t(shared, torch.float16).double().numpy(), t(routed, torch.float16).double().numpy()
    want = (np.linalg.norm(s16, axis=1) / np.maximum(np.linalg.norm(r16, axis=1), 1e-12)).mean()
    assert got.item() == pytest.approx(want, rel=1e-5)
    # leading dims: norms over the last axis
    sh3, ro3 = np.stack([shared, 2 * shared]), np.stack([routed + 1, routed - 1])
    want3 = (np.linalg.norm(sh3, axis=-1) / np.maximum(np.linalg.norm(ro3, axis=-1), 1e-12)).mean()
    assert experts.shared_routed_ratio(t(sh3), t(ro3)).item() == pytest.approx(want3, rel=1e-5)


# --- halting -------------------------------------------------------------------------------------

def test_act_step_at_and_around_the_threshold():
    # exactly representable: cum + p == threshold on position 1
    p = t([0.25, 0.25, 0.5, 0.75, 0.5])
    cum = t([0.25, 0.5, 0.125, 1.5, 0.0])
    halted = torch.tensor([False, False, False, False, True])
    w, c, h = halting.act_step(p, cum, halted, 0.75)
    running = ~halted.numpy()
    cp, cc = p.numpy(), cum.numpy()
    want_w = np.where(cc + cp >= 0.75, np.clip(1 - cc, 0, None), cp) * running
    np.testing.assert_array_equal(w.numpy(), want_w)
    np.testing.assert_array_equal(w.numpy(), [0.25, 0.5, 0.5, 0.0, 0.0])
    np.testing.assert_array_equal(c.numpy(), [0.5, 0.75, 0.625, 2.25, 0.0])
    np.testing.assert_array_equal(h.numpy(), [False, True, False, True, True])
    assert w.dtype == c.dtype == torch.float64
    w16, c16, _ = halting.act_step(p.to(torch.bfloat16), cum.to(torch.bfloat16), halted, 0.75)
    assert w16.dtype == c16.dtype == torch.bfloat16


def test_saturation_boundaries():
    p = t([0.0, 0.005, 0.01, 0.5, 0.99, 0.995, 1.0])
    low, high = halting.saturation(p)
    assert low.tolist() == [True, True, False, False, False, False, False]
    assert high.tolist() == [False, False, False, False, False, True, True]


def test_first_halt_iterations_used_and_ponder():
    halted = torch.tensor([[True, False, True, True, True]])
    halt_iter = torch.tensor([[0, 0, 2, 0, 1]])
    newly, updated = halting.first_halt(halted, halt_iter, 4)
    assert newly.tolist() == [[True, False, False, True, False]]
    assert updated.tolist() == [[5, 0, 2, 5, 1]]
    assert halting.iterations_used(updated, 7).tolist() == [[5, 7, 2, 5, 1]]  # halted at t = 0: 1 used
    used = torch.tensor([[1, 3, 2]])
    before = t([[0.0, 0.75, 1.5]])
    total, rem = halting.ponder(used, before)
    assert rem.tolist() == [[1.0, 0.25, 0.0]]
    assert total.tolist() == [[2.0, 3.25, 2.0]]
    assert total.dtype == torch.float64


# --- lens ----------------------------------------------------------------------------------------

def test_lens_formulas_against_numpy():
    a, b = RNG.normal(size=(3, 6)), RNG.normal(size=(3, 6))
    logp = a - np.log(np.exp(a).sum(1, keepdims=True))
    logq = b - np.log(np.exp(b).sum(1, keepdims=True))
    np.testing.assert_allclose(lens.kl(t(logp), t(logq)).numpy(), (np.exp(logp) * (logp - logq)).sum(1))
    assert (lens.kl(t(logp), t(logq)) - lens.kl(t(logq), t(logp))).abs().max() > 1e-3  # direction matters
    np.testing.assert_allclose(lens.entropy(t(logp)).numpy(), -(np.exp(logp) * logp).sum(1))
    # leading dims (iterations, positions, vocab): over the last axis only
    p3, q3 = np.stack([logp, logq]), np.stack([logq, logp])
    np.testing.assert_allclose(lens.kl(t(p3), t(q3)).numpy(), (np.exp(p3) * (p3 - q3)).sum(-1))
    np.testing.assert_allclose(lens.entropy(t(p3)).numpy(), -(np.exp(p3) * p3).sum(-1))


def test_rank_of_counts_strictly_larger_and_ignores_ties():
    logp = t([[0.0, -1.0, -1.0, -3.0], [-2.0, -0.5, -0.1, -0.5]])
    got = lens.rank_of(logp, torch.tensor([2, 1]))
    assert got.tolist() == [1.0, 1.0]
    assert got.dtype == torch.float32
    assert lens.rank_of(logp, torch.tensor([0, 0])).tolist() == [0.0, 3.0]
    # any leading shape: (2, 2, V) ranks over the last axis only
    stacked = torch.stack([logp, logp.flip(0)])
    assert lens.rank_of(stacked, torch.tensor([[2, 1], [1, 2]])).tolist() == [[1.0, 1.0], [1.0, 1.0]]


# --- spectral ------------------------------------------------------------------------------------

def test_injection_spectrum_growth_and_nonfinite():
    rho, mean = spectral.injection_spectrum(t([0.25, 0.5, 0.125]))
    assert (rho.item(), mean.item()) == (0.5, pytest.approx(0.875 / 3))
    np.testing.assert_allclose(spectral.growth_ratio(t([2.0, 3.0]), t([4.0, 0.0])).numpy(), [0.5, 3.0 / 1e-12])
    flags = spectral.nonfinite(t([1.0, float("nan"), float("inf"), -float("inf"), 0.0]))
    assert flags.tolist() == [False, True, True, True, False]


def _power_iteration(J, v, n_iter):
    sigma = 0.0
    for _ in range(n_iter):
        jv = J @ v
        jtjv = J.T @ jv
        sigma = np.linalg.norm(jv)
        v = jtjv / max(np.linalg.norm(jtjv), 1e-30)
    return sigma


def test_jacobian_sigma_max_is_power_iteration_with_pinned_defaults():
    # singular values 1.0 and 0.97: power iteration converges slowly, so its count and its start
    # vector (seed) show in the estimate
    U, _ = np.linalg.qr(RNG.normal(size=(6, 6)))
    V, _ = np.linalg.qr(RNG.normal(size=(6, 6)))
    s = np.array([1.0, 0.97, 0.5, 0.3, 0.2, 0.1]) * 1e-3  # small: norms below the 1e-30 guard's neighbours
    J = U @ np.diag(s) @ V.T
    Jt = t(J)

    def step(h):
        return h @ Jt.T

    h = torch.zeros(6, dtype=torch.float64)

    def start(seed):
        v = torch.randn((6,), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return (v / v.norm()).numpy()

    zero = spectral.jacobian_sigma_max(step, h, n_iter=0)  # no round: σ starts at 0 of h's dtype
    assert zero.item() == 0.0 and zero.dtype == torch.float64 and zero.shape == ()
    with torch.no_grad():  # the estimate turns gradients on itself
        got = spectral.jacobian_sigma_max(step, h).item()
        assert got == pytest.approx(_power_iteration(J, start(0), 8), rel=1e-9)
        assert abs(got - _power_iteration(J, start(0), 9)) > 1e-9 * got
        assert abs(got - _power_iteration(J, start(1), 8)) > 1e-9 * got
        assert spectral.jacobian_sigma_max(step, h, n_iter=3, seed=1).item() == pytest.approx(
            _power_iteration(J, start(1), 3), rel=1e-9)
        # one round reads ‖J v̂‖ of the unit start vector: its length is 1, not that of the draw
        one = spectral.jacobian_sigma_max(step, h, n_iter=1).item()
        assert one == pytest.approx(np.linalg.norm(J @ start(0)), rel=1e-12)
    assert got <= 1e-3 * (1 + 1e-9)


def test_jacobian_sigma_max_through_attention():
    """The step may call scaled_dot_product_attention: the estimate picks the math kernel, the one
    with forward-mode AD."""
    torch.manual_seed(0)
    W = torch.randn(4, 4) * 0.1

    def step(h):
        q = h.reshape(1, 1, 2, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, q, q @ W).reshape(8)

    h = torch.randn(8)
    got = spectral.jacobian_sigma_max(step, h, n_iter=30).item()
    J = torch.autograd.functional.jacobian(step, h)
    assert got == pytest.approx(torch.linalg.matrix_norm(J, ord=2).item(), rel=1e-3)
