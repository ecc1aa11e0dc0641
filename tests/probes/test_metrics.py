"""Every metric the probes report equals an independent recomputation (numpy, from tensors
captured with run_with_cache) on our LoopedTransformer."""

import copy

import numpy as np
import pytest
import torch

import mythos_probe
from mythos_probe.probes.reductions import PROBES
from mythos_probe.model import LoopedConfig, LoopedTransformer


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = LoopedTransformer(LoopedConfig.variant("tiny-gqa")).eval()
    with torch.no_grad():
        model.recurrent.act.halt.bias.fill_(-1.5)  # p ≈ 0.2: some positions halt within 6 loops
        model.recurrent.act.halt.weight.normal_(0, 0.3)
        model.recurrent.injection.log_A.normal_(0, 1)
        model.recurrent.lora.scale.weight.normal_(0, 1)
        model.recurrent.block.ffn.router_bias.normal_(0, 0.05)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    probes = [p for p in PROBES if p != "jacobian"]  # the Jacobian has its own, smaller test
    with mythos_probe.attach(model, probes=probes, detail="positions", lens_positions="all") as rec:
        logits = model(ids, n_loops=6)
    _, cache = model.run_with_cache(ids, n_loops=6)
    return model, ids, logits, cache, rec.traces[0]


def np_(x):
    return x.detach().double().numpy()


def test_trace_shape_and_budget(setup):
    model, ids, logits, cache, trace = setup
    I = cache.iterations("recurrent.hook_state_out")
    assert trace.iterations == I == model.last_forward["iterations"]
    assert (trace.batch, trace.seq_len, trace.n_loops, trace.exit_policy) == (2, 12, 6, "act")
    assert np.array_equal(trace.token_ids, ids.numpy())


def test_convergence_metrics(setup):
    _, _, _, cache, trace = setup
    h = np_(cache.stack("recurrent.hook_state_out"))  # (I, B, T, D)
    h0 = np_(cache["recurrent.hook_state_in", 0])[None]
    prev = np.concatenate([h0, h[:-1]])
    d = h - prev
    rel = np.linalg.norm(d, axis=-1) / np.linalg.norm(h, axis=-1)
    cos = 1 - (h * prev).sum(-1) / (np.linalg.norm(h, axis=-1) * np.linalg.norm(prev, axis=-1))
    m = trace.iteration_metrics
    np.testing.assert_allclose(m["rel_residual"], rel.mean((1, 2)), rtol=1e-4)
    np.testing.assert_allclose(m["cos_step"], cos.mean((1, 2)), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(trace.position_metrics["rel_residual"], rel.transpose(1, 2, 0), rtol=1e-4)
    # dist_to_final: at 4 evenly spaced positions of the 12, within the stated bfloat16 bound
    sample = np.round(np.linspace(0, 11, 4)).astype(int)
    hs = h[:, :, sample]
    norm_final = np.linalg.norm(hs[-1], axis=-1)
    dist = (np.linalg.norm(hs - hs[-1], axis=-1) / norm_final).mean((1, 2))
    bound = 2.0**-8 * (np.linalg.norm(hs, axis=-1) / norm_final).mean((1, 2))
    assert (np.abs(m["dist_to_final"] - dist) <= bound + 1e-6).all()
    assert m["dist_to_final"][-1] == 0
    ortho = (d[1:] * d[:-1]).sum(-1) / (np.linalg.norm(d[1:], axis=-1) * np.linalg.norm(d[:-1], axis=-1))
    assert np.isnan(m["step_orthogonality"][0])
    np.testing.assert_allclose(m["step_orthogonality"][1:], ortho.mean((1, 2)), rtol=1e-4)
    # token correlation: every position (T=12 < 32), mean off-diagonal cosine
    x = h / np.linalg.norm(h, axis=-1, keepdims=True)
    gram = np.einsum("ibtd,ibsd->ibts", x, x)
    off = (gram.sum((2, 3)) - np.trace(gram, axis1=2, axis2=3)) / (12 * 11)
    np.testing.assert_allclose(m["token_correlation"], off.mean(1), rtol=1e-4)


def test_spectral_metrics(setup):
    model, _, _, cache, trace = setup
    A = np_(model.recurrent.injection.get_A())
    Bv = np_(model.recurrent.injection.B)
    h = np_(cache.stack("recurrent.hook_state_out"))
    h_in = np_(cache.stack("recurrent.hook_state_in"))
    e = np_(cache["hook_encoded"])
    block = np_(cache.stack("recurrent.hook_block_out")) + np_(cache.stack("recurrent.hook_lora_delta"))
    m = trace.iteration_metrics
    assert trace.forward_metrics["rho_A"] == pytest.approx(A.max(), rel=1e-6)
    assert trace.forward_metrics["mean_contraction"] == pytest.approx(A.mean(), rel=1e-5)
    np.testing.assert_allclose(m["state_norm"], np.linalg.norm(h, axis=-1).mean((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(m["growth_ratio"], (np.linalg.norm(h, axis=-1) / np.linalg.norm(h_in, axis=-1)).mean((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(m["norm_decay"], np.linalg.norm(A * h_in, axis=-1).mean((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(m["norm_inject"], np.full(trace.iterations, np.linalg.norm(Bv * e, axis=-1).mean()), rtol=1e-5)
    np.testing.assert_allclose(m["norm_block"], np.linalg.norm(block, axis=-1).mean((1, 2)), rtol=1e-5)
    assert (m["nonfinite_fraction"] == 0).all() and trace.forward_metrics["diverged_at"] == -1
    lora = np_(cache.stack("recurrent.hook_lora_delta"))
    raw = np_(cache.stack("recurrent.hook_block_out"))
    np.testing.assert_allclose(m["lora_rel_norm"], (np.linalg.norm(lora, axis=-1) / np.linalg.norm(raw, axis=-1)).mean((1, 2)), rtol=1e-4)


def test_jacobian_sigma_max_matches_the_full_jacobian(setup):
    # a copy: the forwards below would replace the shared model's last_forward, which
    # test_trace_shape_and_budget reads (the tests must pass in any order, as mutmut runs them)
    model = copy.deepcopy(setup[0])
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(2))
    with mythos_probe.attach(model, probes=["jacobian"]) as rec:
        model(ids, n_loops=3, exit="fixed")
    _, cache = model.run_with_cache(ids, n_loops=3, exit="fixed")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mythos_probe.model.looped import loop_index_embeddings

    rec_block = model.recurrent
    e = cache["hook_encoded"][:1]  # the probe works on a sub-batch: the first sequence
    t = 1
    emb = loop_index_embeddings(t + 1, rec_block.loop_dim, 64, e.device, e.dtype)[t]

    def step(h):
        out = rec_block.block(rec_block.norm(h + emb + e), model.freqs_cis[:5], True, None)
        return rec_block.injection(h, e, out + rec_block.lora(out, t))

    h = cache["recurrent.hook_state_in", t][:1]
    with sdpa_kernel(SDPBackend.MATH):
        J = torch.autograd.functional.jacobian(step, h, vectorize=True).reshape(h.numel(), h.numel())
    sigma = torch.linalg.matrix_norm(J, ord=2).item()
    assert rec.traces[0].iteration_metrics["jacobian_sigma_max"][t] == pytest.approx(sigma, rel=0.05)


def test_halting_metrics(setup):
    model, _, _, cache, trace = setup
    p = np_(cache.stack("recurrent.hook_halt_prob"))  # (I, B, T)
    I = p.shape[0]
    thr = model.cfg.act_threshold
    cum = np.zeros(p.shape[1:])
    halted = np.zeros(p.shape[1:], bool)
    used = np.full(p.shape[1:], I)
    weights, cums, hs = [], [], []
    for t in range(I):
        running = ~halted
        w = np.where(cum + p[t] >= thr, np.clip(1 - cum, 0, None), p[t]) * running
        cum = cum + p[t] * running
        newly = (~halted) & (cum >= thr)
        used[newly] = t + 1
        halted = halted | (cum >= thr)
        weights.append(w); cums.append(cum.copy()); hs.append(halted.copy())
    m = trace.iteration_metrics
    np.testing.assert_allclose(m["halt_prob"], p.mean((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(m["cum_halt"], np.mean(cums, axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(m["act_weight"], np.mean(weights, axis=(1, 2)), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(m["halted_fraction"], np.mean(hs, axis=(1, 2)))
    np.testing.assert_allclose(m["halt_low_share"], (p < 0.01).mean((1, 2)))
    np.testing.assert_allclose(m["halt_high_share"], (p > 0.99).mean((1, 2)))
    assert np.array_equal(trace.position_iterations, used)
    assert np.array_equal(m["exit_count"], np.bincount(used.reshape(-1) - 1, minlength=I))
    assert 0 < halted.mean() < 1  # the fixture exercises both halted and running positions
    # ponder cost N + R with R = 1 − cumulative probability before the last used step
    before = np.where(used >= 2, np.take_along_axis(np.array(cums), np.clip(used - 2, 0, None)[None], 0)[0], 0)
    R = np.clip(1 - before, 0, None)
    assert trace.forward_metrics["ponder_cost"] == pytest.approx((used + R).mean(), rel=1e-5)
    assert trace.forward_metrics["remainder_mass"] == pytest.approx(R.mean(), rel=1e-5)
    assert trace.forward_metrics["mean_iterations"] == pytest.approx(used.mean())
    assert trace.forward_metrics["reached_last_share"] == pytest.approx((used == I).mean())


def test_expert_metrics(setup):
    model, _, _, cache, trace = setup
    cfg = model.cfg
    E, k = cfg.n_experts, cfg.n_experts_per_tok
    logits = np_(cache.stack("recurrent.block.ffn.hook_router_logits"))  # (I, N, E)
    bias = np_(model.recurrent.block.ffn.router_bias)
    chosen = np.argsort(-(logits + bias), axis=-1)[..., :k]
    unbiased = np.argsort(-logits, axis=-1)[..., :k]
    I, N = logits.shape[:2]
    load = np.stack([np.bincount(chosen[t].reshape(-1), minlength=E) for t in range(I)])
    assert np.array_equal(trace.expert_load, load)
    assert (trace.expert_load.sum(1) == N * k).all()
    m = trace.iteration_metrics
    np.testing.assert_allclose(m["expert_max_vio"], load.max(1) / load.mean(1) - 1, rtol=1e-5)
    np.testing.assert_allclose(m["expert_cv"], load.std(1) / load.mean(1), rtol=1e-5)
    share = load / load.sum(1, keepdims=True)
    ent = -(np.where(share > 0, share * np.log(np.where(share > 0, share, 1)), 0)).sum(1) / np.log(E)
    np.testing.assert_allclose(m["expert_load_entropy"], ent, rtol=1e-5)
    np.testing.assert_allclose(m["expert_dead"], (load == 0).sum(1))
    np.testing.assert_allclose(m["expert_active_ratio"], (load > 0).mean(1))
    probs = np.exp(logits - logits.max(-1, keepdims=True)); probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(m["routing_entropy"], (-(probs * np.log(probs)).sum(-1)).mean(1), rtol=1e-4)
    changed = np.array([np.mean([len(set(chosen[t, n]) - set(unbiased[t, n])) for n in range(N)]) / k for t in range(I)])
    np.testing.assert_allclose(m["bias_changed_share"], changed, atol=1e-6)
    overlap = [np.mean([len(set(chosen[t, n]) & set(chosen[t - 1, n])) / k for n in range(N)]) for t in range(1, I)]
    np.testing.assert_allclose(m["topk_overlap"][1:], overlap, rtol=1e-5)
    shared = np_(cache.stack("recurrent.block.ffn.hook_shared_out"))
    routed = np_(cache.stack("recurrent.block.ffn.hook_routed_out"))
    np.testing.assert_allclose(m["shared_routed_ratio"], (np.linalg.norm(shared, axis=-1) / np.linalg.norm(routed, axis=-1)).mean(1), rtol=1e-4)


def test_coda_lens_metrics(setup):
    model, ids, logits, cache, trace = setup
    model(ids, n_loops=6)  # coda_lens decodes in the context (positions, cache) of the last forward
    final = torch.log_softmax(logits.detach().double(), -1)
    with torch.no_grad():
        lens = torch.stack([model.coda_lens(cache["recurrent.hook_state_out", t]).double()
                            for t in range(trace.iterations)])  # (I, B, T, V)
    kl_final = (final.exp() * (final - lens)).sum(-1)
    kl_prev = (lens[1:].exp() * (lens[1:] - lens[:-1])).sum(-1)
    top = final.argmax(-1)
    m = trace.iteration_metrics
    np.testing.assert_allclose(m["lens_kl_final"], kl_final.mean((1, 2)).numpy(), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(m["lens_kl_prev"][1:], kl_prev.mean((1, 2)).numpy(), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(m["lens_top1_agree"], (lens.argmax(-1) == top).double().mean((1, 2)).numpy())
    ranks = (lens > lens.gather(-1, top.expand(lens.shape[:-1])[..., None])).sum(-1).double()
    np.testing.assert_allclose(m["lens_final_rank"], ranks.mean((1, 2)).numpy())
    np.testing.assert_allclose(trace.position_metrics["lens_argmax"], lens.argmax(-1).permute(1, 2, 0).numpy())


def test_cost_counts_iterations_actually_run(setup):
    model, _, _, _, trace = setup
    from mythos_probe.model.variants import count_parameters

    p = count_parameters(model.cfg)
    # our own arithmetic: matmul FLOPs dominate; attention adds 2·H·2·d per key per token
    tokens = 24
    per_key = 2 * 4 * 2 * 16
    mean_keys = (12 + 1) / 2
    expected = tokens * (2 * p.once_active + per_key * mean_keys * 2) + tokens * trace.iterations * (2 * p.loop_active + per_key * mean_keys)
    assert trace.forward_metrics["flops"] == pytest.approx(expected)
    assert trace.forward_metrics["flops_saved"] == pytest.approx((6 - trace.iterations) / 6)


def _lens_flops_by_hand(model, positions, mean_keys):
    """One coda-lens readout counted from the modules: 2 FLOPs per weight of the coda layers, the
    final norm and the head, and 2·H·(d_qk + d_v) per attended key in each coda layer."""
    weights = sum(p.numel() for p in [*model.coda.parameters(), *model.norm.parameters()]) + model.head.weight.numel()
    per_key = 2 * 4 * 2 * 16  # tiny-gqa: 4 heads of 16
    return positions * (2 * weights + per_key * mean_keys * len(model.coda))


def test_cost_counts_one_coda_lens_readout_of_every_position(setup):
    model, _, _, _, trace = setup
    from mythos_probe.metrics.cost import forward_cost

    assert trace.forward_metrics["lens_flops"] == pytest.approx(_lens_flops_by_hand(model, 24, (12 + 1) / 2))
    decode = forward_cost(model.cfg, 2, 1, 3, 6, past_len=12)  # one new token attending to 12 cached ones
    assert decode["lens_flops"] == pytest.approx(_lens_flops_by_hand(model, 2, 12 + 1))


def test_zero_router_bias_changes_no_choice():
    """A zero bias leaves the top-k as the unbiased one: the share is 0 (known without a top-k)."""
    torch.manual_seed(3)
    model = LoopedTransformer(LoopedConfig.variant("tiny-gqa")).eval()
    assert not model.recurrent.block.ffn.router_bias.any()
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), mythos_probe.attach(model) as rec:
        model(ids, n_loops=3, exit="fixed")
    _, cache = model.run_with_cache(ids, n_loops=3, exit="fixed")
    logits = np_(cache.stack("recurrent.block.ffn.hook_router_logits"))
    chosen = np.sort(np_(cache.stack("recurrent.block.ffn.hook_topk_idx")), -1)
    assert np.array_equal(chosen, np.sort(np.argsort(-logits, -1)[..., :2], -1))  # independent: unbiased top-2
    assert (rec.traces[0].iteration_metrics["bias_changed_share"] == 0).all()
