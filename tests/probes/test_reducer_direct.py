"""`ForwardReducer` driven by hand, without a model: the iteration tensors are made up here, so
every metric of the trace it builds is recomputed in numpy from the same tensors, on inputs where
positions halt at different iterations, some never halt, a halting probability sits on each side
of the saturation thresholds, the LoRA delta and the router bias are non-zero, and the states are
sampled (correlation, dist_to_final) at fewer positions than the sequence holds.
tests/probes/test_metrics.py checks the same metrics through a real forward of our model."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch

from mythos_probe.metrics.convergence import evenly_spaced, sample_positions
from mythos_probe.probes.adapters import ForwardContext, IterationTensors
from mythos_probe.probes.reductions import (
    DEFAULT_PROBES,
    OPT_IN_PROBES,
    PROBES,
    ForwardReducer,
    _columns,
    _known_zero,
)

B, T, D, I, E, K, V = 2, 40, 6, 4, 4, 2, 7
THR = 0.99


def n(x):
    return x.detach().double().numpy()


def made_up(seed=0, I=I, T=T):
    g = torch.Generator().manual_seed(seed)
    h = [torch.randn(B, T, D, generator=g)]
    for _ in range(I):
        h.append(0.6 * h[-1] + 0.4 * torch.randn(B, T, D, generator=g))
    # halting: p drawn so that positions halt at different iterations and one never halts
    p = torch.rand(I, B, T, generator=g) * 0.6
    p[0, 0, 0], p[0, 0, 1] = 0.005, 0.995  # either side of the saturation thresholds
    p[:, 1, 2] = 0.002  # never halts (4 × 0.002 < 0.99)
    cum, halted, weight = [], [], []
    c = torch.zeros(B, T)
    hd = torch.zeros(B, T, dtype=torch.bool)
    for t in range(I):
        running = (~hd).float()
        weight.append(torch.where(c + p[t] >= THR, (1 - c).clamp(min=0), p[t]) * running)
        c = c + p[t] * running
        hd = hd | (c >= THR)
        cum.append(c.clone())
        halted.append(hd.clone())
    block = [torch.randn(B, T, D, generator=g) for _ in range(I)]
    lora = [0.1 * torch.randn(B, T, D, generator=g) for _ in range(I)]
    logits = [torch.randn(B * T, E, generator=g) for _ in range(I)]
    bias = torch.tensor([0.0, 0.8, -0.5, 0.2])
    topk = [torch.topk(lg + bias, K, dim=-1).indices for lg in logits]
    shared = [torch.randn(B * T, D, generator=g) for _ in range(I)]
    routed = [torch.randn(B * T, D, generator=g) for _ in range(I)]
    return dict(h=h, p=p, cum=cum, halted=halted, weight=weight, block=block, lora=lora, logits=logits, bias=bias,
                topk=topk, shared=shared, routed=routed, e=torch.randn(B, T, D, generator=g),
                A=torch.rand(D, generator=g), Bv=torch.rand(D, generator=g),
                ids=torch.randint(0, 100, (B, T), generator=g))


def run(x, *, probes=DEFAULT_PROBES, detail="positions", exit_policy="act", n_loops=I, lens=None, logits=None,
        halting=True, experts=True, lora=True, reducer_kw=None, ctx_kw=None, forwards=1, I=I, used=None):
    out = []
    kw = dict(lens_positions="last", sample_every=1, emit=out.append, attributes={"user": "u"}, run_id="run-1",
              model_id="m-1", step_counter=lambda: None, correlation_positions=5)
    kw.update(reducer_kw or {})
    red = ForwardReducer(tuple(probes), detail, **kw)
    for _ in range(forwards):
        ctx = ForwardContext(token_ids=x["ids"], n_loops=n_loops, exit_policy=exit_policy, cfg=None,
                             injection_A=x["A"], injection_B=x["Bv"], router_bias=x["bias"], lens=lens,
                             **(ctx_kw or {}))
        if not red.begin(ctx):
            continue
        red.encoded(x["e"])
        for t in range(I):
            red.iteration(IterationTensors(
                state_in=x["h"][t], state_out=x["h"][t + 1], block_out=x["block"][t],
                lora_delta=x["lora"][t] if lora else None,
                halt_prob=x["p"][t] if halting else None, cum_halt=x["cum"][t] if halting else None,
                halted=x["halted"][t] if halting else None, act_weight=x["weight"][t] if halting else None,
                router_logits=x["logits"][t] if experts else None, topk_idx=x["topk"][t] if experts else None,
                shared_out=x["shared"][t] if experts else None, routed_out=x["routed"][t] if experts else None))
        red.end(logits, used=used)
    return [p.materialize() for p in out], red


X = made_up()


def used_of(x, I=I):
    halted = np.stack([n(h) for h in x["halted"]]).astype(bool)
    first = np.where(halted.any(0), halted.argmax(0) + 1, I)
    return first


def test_probe_lists():
    assert PROBES == ("convergence", "spectral", "halting", "experts", "lora", "cost", "lens", "jacobian", "trajectory")
    assert DEFAULT_PROBES == ("convergence", "spectral", "halting", "experts", "lora", "cost")
    assert OPT_IN_PROBES == ("lens", "jacobian", "trajectory")


def test_convergence_metrics_by_hand():
    (tr,), _ = run(X)
    h = np.stack([n(s) for s in X["h"]])  # (I+1, B, T, D)
    d = h[1:] - h[:-1]
    nh, nd = np.linalg.norm(h[1:], axis=-1), np.linalg.norm(d, axis=-1)
    rel = nd / nh
    cos = 1 - (h[1:] * h[:-1]).sum(-1) / (nh * np.linalg.norm(h[:-1], axis=-1))
    m = tr.iteration_metrics
    np.testing.assert_allclose(m["rel_residual"], rel.mean((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(m["cos_step"], cos.mean((1, 2)), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(tr.position_metrics["rel_residual"], rel.transpose(1, 2, 0), rtol=1e-5)
    np.testing.assert_allclose(tr.position_metrics["cos_step"], cos.transpose(1, 2, 0), rtol=1e-4, atol=1e-7)
    ortho = (d[1:] * d[:-1]).sum(-1) / (nd[1:] * nd[:-1])
    assert math.isnan(m["step_orthogonality"][0])
    np.testing.assert_allclose(m["step_orthogonality"][1:], ortho.mean((1, 2)), rtol=1e-4)
    # token correlation over 5 evenly spaced positions of the 40 (correlation_positions=5)
    idx = np.round(np.linspace(0, T - 1, 5)).astype(int)
    x = h[1:, :, idx] / np.linalg.norm(h[1:, :, idx], axis=-1, keepdims=True)
    gram = np.einsum("ibpd,ibqd->ibpq", x, x)
    corr = ((gram.sum((2, 3)) - np.trace(gram, axis1=2, axis2=3)) / 20).mean(1)
    np.testing.assert_allclose(m["token_correlation"], corr, rtol=1e-4)
    # dist_to_final at sample_positions(40) = 4 positions, from bfloat16 copies of h_0 … h_{I−2}
    sidx = n(evenly_spaced(T, sample_positions(T), "cpu")).astype(int)
    assert len(sidx) == 4
    final = h[-1][:, sidx]
    trail = [n(torch.tensor(h[t][:, sidx]).to(torch.bfloat16)) for t in range(1, I)]
    want = [(np.linalg.norm(s - final, axis=-1) / np.linalg.norm(final, axis=-1)).mean() for s in trail] + [0.0]
    np.testing.assert_allclose(m["dist_to_final"], want, rtol=1e-5)


def test_default_correlation_sample_is_32_positions():
    (tr,), _ = run(X, reducer_kw={"correlation_positions": 32})
    (default,), _ = run(X, reducer_kw={k: v for k, v in [("correlation_positions", 32)]})
    out = []
    red = ForwardReducer(DEFAULT_PROBES, "summary", "last", 1, out.append, {}, "r", "m", lambda: None)
    assert red.correlation_positions == 32 and red.token_text is None
    h = n(X["h"][1])
    idx = np.round(np.linspace(0, T - 1, 32)).astype(int)
    x = h[:, idx] / np.linalg.norm(h[:, idx], axis=-1, keepdims=True)
    gram = np.einsum("bpd,bqd->bpq", x, x)
    want = ((gram.sum((1, 2)) - np.trace(gram, axis1=1, axis2=2)) / (32 * 31)).mean()
    assert tr.iteration_metrics["token_correlation"][0] == pytest.approx(want, rel=1e-4)


def test_spectral_and_lora_metrics_by_hand():
    (tr,), _ = run(X)
    h = np.stack([n(s) for s in X["h"]])
    A, Bv, e = n(X["A"]), n(X["Bv"]), n(X["e"])
    block, lora = np.stack([n(b) for b in X["block"]]), np.stack([n(x) for x in X["lora"]])
    m, fm = tr.iteration_metrics, tr.forward_metrics
    nh = np.linalg.norm(h, axis=-1)
    np.testing.assert_allclose(m["state_norm"], nh[1:].mean((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(tr.position_metrics["state_norm"], nh[1:].transpose(1, 2, 0), rtol=1e-5)
    np.testing.assert_allclose(m["growth_ratio"], (nh[1:] / nh[:-1]).mean((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(m["norm_decay"], np.linalg.norm(A * h[:-1], axis=-1).mean((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(m["norm_inject"], np.full(I, np.linalg.norm(Bv * e, axis=-1).mean()), rtol=1e-5)
    np.testing.assert_allclose(m["norm_block"], np.linalg.norm(block + lora, axis=-1).mean((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(m["lora_rel_norm"],
                               (np.linalg.norm(lora, axis=-1) / np.linalg.norm(block, axis=-1)).mean((1, 2)), rtol=1e-5)
    assert (m["nonfinite_fraction"] == 0).all() and fm["diverged_at"] == -1.0
    assert fm["rho_A"] == pytest.approx(A.max(), rel=1e-6) and fm["mean_contraction"] == pytest.approx(A.mean(), rel=1e-6)


def test_norm_block_without_lora_and_lora_alone():
    (tr,), _ = run(X, lora=False)
    block = np.stack([n(b) for b in X["block"]])
    np.testing.assert_allclose(tr.iteration_metrics["norm_block"], np.linalg.norm(block, axis=-1).mean((1, 2)), rtol=1e-5)
    assert "lora_rel_norm" not in tr.iteration_metrics
    (tr,), _ = run(X, probes=("lora",), halting=False, experts=False)
    assert "norm_block" not in tr.iteration_metrics and "lora_rel_norm" in tr.iteration_metrics
    assert "state_norm" not in tr.iteration_metrics and "rho_A" not in tr.forward_metrics


def test_a_diverged_state_sets_diverged_at():
    x = dict(X, h=list(X["h"]))
    bad = x["h"][3].clone()
    bad[1, 5, 0] = float("inf")
    bad[0, 7, 2] = float("nan")
    x["h"][3] = bad
    (tr,), _ = run(x, probes=("spectral",), halting=False, experts=False)
    np.testing.assert_allclose(tr.iteration_metrics["nonfinite_fraction"], [0, 0, 2 / (B * T), 0])
    assert tr.forward_metrics["diverged_at"] == 2.0


def test_halting_metrics_by_hand():
    (tr,), _ = run(X)
    p = n(X["p"])
    cum = np.stack([n(c) for c in X["cum"]])
    halted = np.stack([n(h) for h in X["halted"]])
    weight = np.stack([n(w) for w in X["weight"]])
    used = used_of(X)
    assert 1 < len(np.unique(used)) and (used == I).any() and (used < I).any()
    m, fm = tr.iteration_metrics, tr.forward_metrics
    np.testing.assert_allclose(m["halt_prob"], p.mean((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(m["cum_halt"], cum.mean((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(m["act_weight"], weight.mean((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(m["halted_fraction"], halted.mean((1, 2)))
    np.testing.assert_allclose(m["halt_low_share"], (p < 0.01).mean((1, 2)))
    np.testing.assert_allclose(m["halt_high_share"], (p > 0.99).mean((1, 2)))
    assert m["halt_low_share"][0] > 0 and m["halt_high_share"][0] > 0
    for name, arr in (("halt_prob", p), ("cum_halt", cum), ("act_weight", weight)):
        np.testing.assert_allclose(tr.position_metrics[name], arr.transpose(1, 2, 0), rtol=1e-5)
    assert np.array_equal(tr.position_iterations, used)
    assert np.array_equal(m["exit_count"], np.bincount(used.ravel() - 1, minlength=I))
    assert fm["mean_iterations"] == pytest.approx(used.mean())
    assert fm["reached_last_share"] == pytest.approx((used == I).mean())
    assert fm["halted_first_share"] == pytest.approx(halted[0].mean())
    before = np.where(used >= 2, np.take_along_axis(cum, np.clip(used - 2, 0, None)[None], 0)[0], 0)
    R = np.clip(1 - before, 0, None)
    assert fm["ponder_cost"] == pytest.approx((used + R).mean(), rel=1e-6)
    assert fm["remainder_mass"] == pytest.approx(R.mean(), rel=1e-6)


@pytest.mark.parametrize("policy, ponders", [("act", True), ("unknown", True), ("fixed", False), ("kl", False)])
def test_ponder_cost_only_for_act(policy, ponders):
    (tr,), _ = run(X, exit_policy=policy)
    assert ("ponder_cost" in tr.forward_metrics) == ponders == ("remainder_mass" in tr.forward_metrics)
    assert tr.exit_policy == policy


def test_without_halting_every_position_uses_every_iteration():
    (tr,), _ = run(X, halting=False)
    assert (tr.position_iterations == I).all()
    assert tr.iteration_metrics["exit_count"].tolist() == [0, 0, 0, B * T]
    assert tr.forward_metrics["reached_last_share"] == 1.0 and tr.forward_metrics["mean_iterations"] == I
    assert "halted_first_share" not in tr.forward_metrics and "halt_prob" not in tr.iteration_metrics


def test_one_iteration_ponder_uses_zero_before_the_last():
    x = made_up(3, I=1)
    (tr,), _ = run(x, I=1, n_loops=1)
    used = used_of(x, I=1)
    assert (used == 1).all()
    assert tr.forward_metrics["ponder_cost"] == pytest.approx(2.0)  # N = 1, R = 1 − 0


def test_halting_probe_off_keeps_the_exit_bookkeeping():
    (tr,), _ = run(X, probes=("convergence",))
    assert np.array_equal(tr.position_iterations, used_of(X))
    assert "halt_prob" not in tr.iteration_metrics and "halted_first_share" in tr.forward_metrics


def test_expert_metrics_by_hand():
    (tr,), _ = run(X)
    logits = np.stack([n(lg) for lg in X["logits"]])
    chosen = np.stack([n(k) for k in X["topk"]]).astype(int)
    load = np.stack([np.bincount(chosen[t].ravel(), minlength=E) for t in range(I)])
    assert np.array_equal(tr.expert_load, load)
    m = tr.iteration_metrics
    np.testing.assert_allclose(m["expert_max_vio"], load.max(1) / load.mean(1) - 1, rtol=1e-5)
    np.testing.assert_allclose(m["expert_cv"], load.std(1) / load.mean(1), rtol=1e-5)
    np.testing.assert_allclose(m["expert_dead"], (load == 0).sum(1))
    pr = np.exp(logits - logits.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    np.testing.assert_allclose(m["routing_entropy"], (-(pr * np.log(pr)).sum(-1)).mean(1), rtol=1e-5)
    kth = np.sort(logits, -1)[..., -K][..., None]
    changed = (np.take_along_axis(logits, chosen, -1) < kth).mean((1, 2))
    assert changed.max() > 0
    np.testing.assert_allclose(m["bias_changed_share"], changed, rtol=1e-6)
    overlap = [np.mean([len(set(chosen[t, i]) & set(chosen[t - 1, i])) / K for i in range(B * T)]) for t in range(1, I)]
    assert math.isnan(m["topk_overlap"][0])
    np.testing.assert_allclose(m["topk_overlap"][1:], overlap, rtol=1e-6)
    sh, ro = np.stack([n(s) for s in X["shared"]]), np.stack([n(r) for r in X["routed"]])
    np.testing.assert_allclose(m["shared_routed_ratio"], (np.linalg.norm(sh, axis=-1) / np.linalg.norm(ro, axis=-1)).mean(1), rtol=1e-5)


def test_a_zero_cpu_router_bias_reports_no_changed_choice_without_a_topk():
    # the chosen ids are not the unbiased top-k here, yet a bias known to be zero means "unchanged"
    (tr,), _ = run(dict(X, bias=torch.zeros(E)))
    assert (tr.iteration_metrics["bias_changed_share"] == 0).all()
    assert _known_zero(torch.zeros(3)) and _known_zero(torch.zeros(3, dtype=torch.bfloat16))
    assert not _known_zero(torch.tensor([0.0, 1e-30])) and not _known_zero(None)
    assert not _known_zero(torch.zeros(3, device="meta"))


def test_expert_count_from_the_config_when_no_logits():
    from mythos_probe.model.config import LoopedConfig

    cfg = LoopedConfig.variant("tiny-gqa")
    x = dict(X, logits=[None] * I)
    out = []
    red = ForwardReducer(("experts",), "summary", "last", 1, out.append, {}, "r", "m", lambda: None)
    red.begin(ForwardContext(token_ids=x["ids"], n_loops=I, exit_policy="fixed", cfg=cfg))
    for t in range(I):
        red.iteration(IterationTensors(state_in=x["h"][t], state_out=x["h"][t + 1], topk_idx=x["topk"][t]))
    red.end(None)
    tr = out[0].materialize()
    assert tr.expert_load.shape == (I, cfg.n_experts)
    assert "routing_entropy" not in tr.iteration_metrics


def test_identity_meta_and_attributes():
    ids = []
    (tr,), red = run(X, reducer_kw={"token_text": lambda i: f"w{i}"}, ctx_kw={"loop_name": "think"})
    assert re.fullmatch(r"[0-9a-f]{32}", tr.trace_id) and re.fullmatch(r"[0-9a-f]{16}", tr.span_id)
    assert (tr.run_id, tr.model_id, tr.step, tr.batch, tr.seq_len, tr.n_loops, tr.iterations, tr.detail,
            tr.loop_name) == ("run-1", "m-1", 0, B, T, I, I, "positions", "think")
    assert tr.attributes == {"user": "u"}
    assert np.array_equal(tr.token_ids, n(X["ids"]).astype(int))
    assert tr.token_text[1][3] == f"w{int(X['ids'][1, 3])}"
    assert 0 < tr.start_ns <= tr.end_ns
    ids.append(tr.trace_id)
    traces, _ = run(X, forwards=3, reducer_kw={"step_counter": lambda: 41})
    assert [t.step for t in traces] == [41, 41, 41] and len({t.trace_id for t in traces}) == 3
    traces, _ = run(X, forwards=3)
    assert [t.step for t in traces] == [0, 1, 2]


def test_sample_every_keeps_one_forward_in_n():
    traces, red = run(X, forwards=5, reducer_kw={"sample_every": 2})
    assert [t.step for t in traces] == [0, 2, 4] and red.forwards_seen == 5


def test_n_loops_zero_is_recorded_as_the_iterations_run():
    (tr,), _ = run(X, n_loops=0)
    assert tr.n_loops == I and tr.iterations == I
    assert "dist_to_final" in tr.iteration_metrics


def test_more_iterations_than_n_loops_are_refused_by_the_record_naming_both():
    """A loop that ran past the n_loops it was given is a declaration that does not match what ran:
    the record refuses it (issue 22's one validation) rather than storing a trace of it."""
    from mythos_probe.records import InvalidRecord

    with pytest.raises(InvalidRecord, match=f"iterations = {I} is more than n_loops = 2"):
        run(X, n_loops=2)


def test_decode_steps_of_one_cache_share_a_trace():
    out = []
    red = ForwardReducer(("convergence",), "summary", "last", 1, out.append, {}, "r", "m", lambda: None)

    def forward(cache_id, past):
        red.begin(ForwardContext(token_ids=X["ids"], n_loops=1, exit_policy="fixed", cfg=None, cache_id=cache_id,
                                 past_len=past))
        red.iteration(IterationTensors(state_in=X["h"][0], state_out=X["h"][1]))
        red.end(None)
        return out[-1].materialize()

    a0, a1, b0, a2 = forward(1, 0), forward(1, 5), forward(2, 0), forward(1, 6)
    assert a0.trace_id == a1.trace_id == a2.trace_id != b0.trace_id
    assert (a0.step, a1.step, a2.step, b0.step) == (0, 1, 2, 0)
    again = forward(1, 0)  # past_len 0: a new request on the same cache
    assert again.trace_id != a0.trace_id and again.step == 0
    for i in range(4097):
        red.requests[1000 + i] = ("x" * 32, 1)
    forward(3, 0)
    assert len(red.requests) == 1  # past 4096 requests the map is cleared


def test_nested_loops_share_the_first_loops_identity():
    (tr,), _ = run(X, ctx_kw={"trace_id": "a" * 32, "step": 9})
    assert (tr.trace_id, tr.step) == ("a" * 32, 9)


def test_a_forward_without_iterations_warns_and_emits_nothing():
    out = []
    red = ForwardReducer(DEFAULT_PROBES, "summary", "last", 1, out.append, {}, "r", "m", lambda: None)
    red.begin(ForwardContext(token_ids=X["ids"], n_loops=I, exit_policy="act", cfg=None))
    with pytest.warns(UserWarning, match="ran no loop iteration the probes could see.*torch.compile") as caught:
        red.end(None)
    assert caught[0].filename == __file__  # the caller's line, not the reducer's
    assert out == [] and red.fwd is None
    red.end(None)  # no forward in progress: nothing happens
    red.iteration(IterationTensors(state_in=X["h"][0], state_out=X["h"][1]))  # ignored
    red.encoded(X["e"])
    red.abort()
    assert out == []


def test_summary_detail_keeps_no_position_maps():
    (tr,), _ = run(X, detail="summary")
    assert tr.position_metrics == {} and tr.detail == "summary"
    (full,), _ = run(X)
    assert set(full.position_metrics) == {"rel_residual", "cos_step", "state_norm", "halt_prob", "cum_halt", "act_weight"}
    for k in tr.iteration_metrics:
        np.testing.assert_array_equal(tr.iteration_metrics[k], full.iteration_metrics[k])


def test_cost_from_a_cost_fn_or_the_config():
    calls = []

    def cost_fn(iterations, used):
        calls.append((iterations, np.asarray(used).copy()))
        return {"flops": 7.0}

    (tr,), _ = run(X, ctx_kw={"cost_fn": cost_fn})
    assert tr.forward_metrics["flops"] == 7.0 and calls[0][0] == I and np.array_equal(calls[0][1], used_of(X))
    (tr,), _ = run(X, probes=("convergence",), ctx_kw={"cost_fn": cost_fn})
    assert "flops" not in tr.forward_metrics


def test_cost_from_the_config():
    from mythos_probe.metrics.cost import forward_cost
    from mythos_probe.model.config import LoopedConfig

    cfg = LoopedConfig.variant("tiny-gqa")
    out = []
    red = ForwardReducer(("cost",), "summary", "last", 1, out.append, {}, "r", "m", lambda: None)
    red.begin(ForwardContext(token_ids=X["ids"], n_loops=6, exit_policy="act", cfg=cfg, past_len=3))
    for t in range(I):
        red.iteration(IterationTensors(state_in=X["h"][t], state_out=X["h"][t + 1], halted=X["halted"][t]))
    red.end(None)
    tr = out[0].materialize()
    want = forward_cost(cfg, B, T, I, 6, 3, used_of(X))
    for k, v in want.items():
        assert tr.forward_metrics[k] == pytest.approx(v), k
    assert tr.n_loops == 6


def lens_fn(W):
    def lens(state, idx):
        return torch.log_softmax(state[:, idx] @ W, -1)
    return lens


@pytest.mark.parametrize("positions, idx", [("last", [T - 1]), ("all", list(range(T))), ([0, -1, 3], [0, T - 1, 3])])
def test_lens_metrics_by_hand(positions, idx):
    g = torch.Generator().manual_seed(5)
    W = torch.randn(D, V, generator=g)
    logits = torch.randn(B, T, V, generator=g)
    (tr,), _ = run(X, probes=DEFAULT_PROBES + ("lens",), lens=lens_fn(W), logits=logits,
                   reducer_kw={"lens_positions": positions})
    h = np.stack([n(s) for s in X["h"]])[1:][:, :, idx]  # (I, B, P, D)
    z = h @ n(W)
    lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    f = n(logits)[:, idx]
    final = f - np.log(np.exp(f).sum(-1, keepdims=True))
    top = final.argmax(-1)
    kl_final = (np.exp(final) * (final - lp)).sum(-1)
    kl_prev = (np.exp(lp[1:]) * (lp[1:] - lp[:-1])).sum(-1)
    ent = -(np.exp(lp) * lp).sum(-1)
    agree = lp.argmax(-1) == top
    rank = (lp > np.take_along_axis(lp, np.broadcast_to(top, lp.shape[:-1])[..., None], -1)).sum(-1)
    m = tr.iteration_metrics
    np.testing.assert_allclose(m["lens_kl_final"], kl_final.mean((1, 2)), rtol=1e-4, atol=1e-6)
    assert math.isnan(m["lens_kl_prev"][0])
    np.testing.assert_allclose(m["lens_kl_prev"][1:], kl_prev.mean((1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m["lens_entropy"], ent.mean((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(m["lens_top1_agree"], agree.mean((1, 2)))
    np.testing.assert_allclose(m["lens_final_rank"], rank.mean((1, 2)))
    pm = tr.position_metrics
    off = np.setdiff1d(np.arange(T), idx)
    assert np.isnan(pm["lens_entropy"][:, off]).all()
    np.testing.assert_allclose(pm["lens_entropy"][:, idx], ent.transpose(1, 2, 0), rtol=1e-5)
    np.testing.assert_allclose(pm["lens_argmax"][:, idx], lp.argmax(-1).transpose(1, 2, 0))
    np.testing.assert_allclose(pm["lens_kl_final"][:, idx], kl_final.transpose(1, 2, 0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(pm["lens_top1_agree"][:, idx], agree.transpose(1, 2, 0))
    assert np.isnan(pm["lens_kl_prev"][:, :, 0]).all()
    np.testing.assert_allclose(pm["lens_kl_prev"][:, idx, 1:], kl_prev.transpose(1, 2, 0), rtol=1e-4, atol=1e-6)
    (summary,), _ = run(X, probes=("lens",), lens=lens_fn(W), logits=logits, detail="summary")
    assert summary.position_metrics == {} and "lens_entropy" in summary.iteration_metrics
    (nolog,), _ = run(X, probes=("lens",), lens=lens_fn(W), logits=None)
    assert "lens_entropy" not in nolog.iteration_metrics  # no output logits: no lens summary
    (nolens,), _ = run(X, probes=("convergence",), lens=lens_fn(W), logits=logits)
    assert "lens_entropy" not in nolens.iteration_metrics


def test_lens_positions_out_of_range_name_the_fix():
    with pytest.raises(ValueError, match=r"lens_positions \[40, -41\] are out of range for a sequence of 40 tokens: "
                                         r"give indices in \[-40, 39\], or lens_positions='all' or 'last'"):
        run(X, probes=("lens",), lens=lens_fn(torch.zeros(D, V)), reducer_kw={"lens_positions": [0, 40, -40, -41]})


def test_jacobian_probe_on_a_linear_step():
    M = torch.diag(torch.tensor([3.0, 1.0, 0.5, 0.2, 0.1, 0.05]))

    def step_fn(e, t):
        return lambda h: h @ M + e

    (tr,), _ = run(X, probes=("jacobian",), ctx_kw={"step_fn": step_fn})
    np.testing.assert_allclose(tr.iteration_metrics["jacobian_sigma_max"], np.full(I, 3.0), rtol=1e-3)
    (none,), _ = run(X, probes=("convergence",), ctx_kw={"step_fn": step_fn})
    assert "jacobian_sigma_max" not in none.iteration_metrics


def test_columns_drop_a_name_missing_from_some_iteration():
    rows = [(("a", "b"), torch.tensor([1.0, 2.0])), (("b",), torch.tensor([3.0])), (("b", "a"), torch.tensor([4.0, 5.0]))]
    got = _columns(rows)
    assert list(got) == ["b"] and got["b"].tolist() == [2.0, 3.0, 4.0]
    same = _columns([(("a", "b"), torch.tensor([1.0, 2.0])), (("a", "b"), torch.tensor([3.0, 4.0]))])
    assert {k: v.tolist() for k, v in same.items()} == {"a": [1.0, 3.0], "b": [2.0, 4.0]}
    assert _columns([]) == {}


def test_bfloat16_states_are_reduced_in_float32():
    x = dict(X, h=[s.to(torch.bfloat16) for s in X["h"]])
    (tr,), _ = run(x, probes=("convergence", "spectral"), halting=False, experts=False)
    h = np.stack([n(s) for s in x["h"]])
    np.testing.assert_allclose(tr.iteration_metrics["state_norm"], np.linalg.norm(h[1:], axis=-1).mean((1, 2)), rtol=1e-5)


@pytest.mark.parametrize("wrong, said", [(I + 1, f"2 to {I + 1}"), (0, "0 to 2")])
def test_iterations_used_outside_the_loop_are_refused_when_the_trace_is_read(wrong, said):
    """A model's own exits outside the iterations it ran (unchecked forwards read them only here,
    where the numbers reach the host): refused naming the fix, not an IndexError from the exit
    count's index_add_ (a device-side assert on a GPU). One side out of range is enough."""
    used = torch.full((B, T), 2)
    used[1, 2] = wrong
    with pytest.raises(ValueError) as raised:
        run(X, used=used)
    assert str(raised.value) == (
        f"mythos_probe: loop 'loop' reports positions that used {said} iterations, outside the {I} it ran, so this "
        "forward's halting metrics would be wrong. Where the model gives its own exits (Halting(..., exits=...)), "
        "the selector must pick each position's 0-based exit iteration; attach(..., check_every=1) checks them in "
        "every forward.")
    (tr,), _ = run(X, used=torch.full((B, T), I))  # the last iteration itself is in range
    assert tr.iteration_metrics["exit_count"].tolist() == [0] * (I - 1) + [B * T]
