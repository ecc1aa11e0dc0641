"""The looped model against the recurrence written out by hand, on a model small enough that each
test takes a fraction of a second (this file is the fast mutation-testing selection of
`model/looped.py`, see pyproject's [tool.mythos-probe.mutation.tests]).

h_{t+1} = A⊙h_t + B⊙e + Block(norm(h_t + loop_emb_t + e)) + LoRA_t, A = exp(-exp(log_dt + log_A)),
every piece computed here from the parameters, not through the model's loop; then the exit
policies' exact steps on inputs where positions stop at different iterations, ACT's weighted
output, the MoE's routing, the defaults (by calls that omit them) and the guards."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mythos_probe.model import LoopedConfig, LoopedTransformer
from mythos_probe.model.looped import (RecurrentBlock, RMSNorm, apply_rope, loop_index_embeddings,
                                       precompute_rope_freqs, watched)

MICRO = dict(vocab_size=64, dim=32, n_heads=2, n_kv_heads=1, max_seq_len=80, max_loop_iters=4, prelude_layers=1,
             coda_layers=1, attn_type="gqa", kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4,
             v_head_dim=4, n_experts=4, n_shared_experts=2, n_experts_per_tok=2, expert_dim=16, lora_rank=4,
             max_output_tokens=80)
IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(5))


def _model(seed=0, **changes) -> LoopedTransformer:
    """A micro model whose loop pieces all matter: per-channel decay and injection, a LoRA scale
    per iteration far from zero, a halting head that stops positions at different iterations."""
    torch.manual_seed(seed)
    m = LoopedTransformer(LoopedConfig(**{**MICRO, **changes})).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        inj, lora = m.recurrent.injection, m.recurrent.lora
        inj.log_A.copy_(torch.randn(m.cfg.dim, generator=g))
        inj.log_dt.fill_(-0.3)
        inj.B.copy_(torch.rand(m.cfg.dim, generator=g) * 0.5)
        lora.scale.weight.copy_(torch.randn(lora.scale.weight.shape, generator=g) * 3)
        lora.B.mul_(20)
        m.recurrent.act.halt.weight.copy_(torch.randn(1, m.cfg.dim, generator=g))
        m.recurrent.act.halt.bias.fill_(-2.5)
        m.recurrent.block.ffn.router_bias.copy_(torch.randn(m.cfg.n_experts, generator=g) * 0.05)
    return m


def _converging(embed_scale: float, **changes) -> LoopedTransformer:
    """A micro model whose loop settles (a large, constant injection B⊙e against a small block
    output), so that the latent and kl criteria cross their default thresholds part-way, at
    different iterations for different positions."""
    m = _model(act_threshold=50.0, **changes)
    with torch.no_grad():
        m.recurrent.injection.log_A.zero_()
        m.recurrent.injection.log_dt.fill_(0.2)
        m.recurrent.lora.B.div_(20)
        m.recurrent.norm.weight.mul_(0.03)
        m.embed.weight.mul_(embed_scale)
    return m


def _rms(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _loop_emb(t: int, loop_dim: int, dim: int) -> torch.Tensor:
    freqs = 1.0 / 10000.0 ** (np.arange(0, loop_dim, 2) / loop_dim)
    emb = np.zeros(dim)
    emb[:loop_dim] = np.concatenate([np.sin(t * freqs), np.cos(t * freqs)])[:loop_dim]
    return torch.tensor(emb, dtype=torch.float32)


def _hand(m: LoopedTransformer, ids, n_loops, policy="fixed", threshold=None, min_loops=1):
    """(logits, iterations run, per-position exit iteration (-1: never)) by the recurrence
    written out, with the exit policies' rules: latent/kl freeze a position whose criterion fell
    below the threshold, ACT weights each state by its halting probability, remainder on the
    halting step, and keeps updating halted positions. `min_loops`: the policy may stop a position
    only from iteration min_loops - 1 on (a `LoopBudget`'s; its max_loops is `n_loops` run alone)."""
    r, cfg = m.recurrent, m.cfg
    T = ids.shape[1]
    freqs = (m.freqs_cis_mla if cfg.attn_type == "mla" else m.freqs_cis)[:T]  # MLA rotates its rope dims only
    with torch.no_grad():
        x = m.embed(ids)
        for layer in m.prelude:
            x = layer(x, freqs, T > 1)
        e = h = x
        A = torch.exp(-torch.exp(r.injection.log_dt + r.injection.log_A))
        halted = torch.zeros(ids.shape, dtype=torch.bool)
        exit_at = torch.full(ids.shape, -1)
        cum = torch.zeros(ids.shape)
        h_out = torch.zeros_like(h)
        prev_logp = None
        t = 0
        for t in range(n_loops):
            combined = _rms(h + _loop_emb(t, cfg.dim // 8, cfg.dim) + e, r.norm.weight)
            out = r.block(combined, freqs, T > 1)
            scale = r.lora.scale.weight[min(t, cfg.max_loop_iters - 1)]
            out = out + (out @ r.lora.down.weight.T * scale) @ r.lora.B
            h_new = A * h + r.injection.B * e + out
            if policy in ("latent", "kl"):
                h_new = torch.where(halted[..., None], h, h_new)
            stop = None
            if policy == "act":
                p = torch.sigmoid(h_new @ r.act.halt.weight.T + r.act.halt.bias).squeeze(-1)
                running = (~halted).float()
                weight = torch.where(cum + p >= cfg.act_threshold, (1 - cum).clamp(min=0), p) * running
                h_out = h_out + weight[..., None] * h_new
                cum = cum + p * running
                stop = cum >= cfg.act_threshold
            elif policy == "latent":
                stop = (h_new - h).norm(dim=-1) / h_new.norm(dim=-1) < threshold
            elif policy == "kl":
                logp = _coda(m, h_new, freqs).log_softmax(-1)
                if prev_logp is not None:
                    stop = (logp.exp() * (logp - prev_logp)).sum(-1) < threshold
                prev_logp = logp
            if stop is not None:
                stop = stop & (t + 1 >= min_loops)
                exit_at = torch.where(stop & ~halted, torch.tensor(t), exit_at)
                halted = halted | stop
            h = h_new
            if policy != "fixed" and bool(halted.all()):
                break
        return _coda(m, h_out if policy == "act" else h, freqs), t + 1, exit_at


def _coda(m, h, freqs):
    for layer in m.coda:
        h = layer(h, freqs, h.shape[1] > 1)
    return m.head(_rms(h, m.norm.weight))


def _between(values: torch.Tensor) -> float:
    """A threshold halfway between the two middle values: no value sits on it, so float rounding
    in the model cannot flip a decision the hand computation makes."""
    v = values.flatten().sort().values
    return float(v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def _row_iterations(exit_at, iterations: int, compact) -> int:
    """Positions that ran the block, summed over iterations: all of them masked; compacted, those
    still running (a position exiting at t ran iterations 0..t)."""
    if compact is None:
        return exit_at.numel() * iterations
    return sum(int(((exit_at < 0) | (exit_at >= t)).sum()) for t in range(iterations))


def _halted_at(cache) -> torch.Tensor:
    halted = cache.stack("recurrent.hook_halted")  # (n, B, T)
    return torch.where(halted.any(0), halted.float().argmax(0), torch.tensor(-1))


@pytest.mark.parametrize("n_loops", [3, 6])  # 6: past max_loop_iters=4 the LoRA reuses its last scale
def test_a_fixed_forward_is_the_recurrence(n_loops):
    m = _model()
    want, _, _ = _hand(m, IDS, n_loops)
    with torch.no_grad():
        got = m(IDS, n_loops=n_loops, exit="fixed")  # A computed once per forward
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert m.last_forward["iterations"] == n_loops and m.last_forward["row_iterations"] == IDS.numel() * n_loops
    got_grad = m(IDS, n_loops=n_loops, exit="fixed")  # under autograd the injection module runs each iteration
    torch.testing.assert_close(got_grad.detach(), want, atol=1e-5, rtol=1e-5)
    hooked, cache = m.run_with_cache(IDS, n_loops=n_loops, exit="fixed")
    torch.testing.assert_close(hooked.detach(), want, atol=1e-5, rtol=1e-5)
    assert cache.iterations("recurrent.hook_state_out") == n_loops


def _stops_as_by_hand(m, n_loops: int, policy: str, threshold: float, compact) -> None:
    """The model at `policy` (masked, or compacted below `compact`) against the hand recurrence on
    IDS: its logits, iterations, rows run and each position's exit iteration."""
    want, iterations, exit_at = _hand(m, IDS, n_loops, policy, threshold)
    assert len(set(exit_at.flatten().tolist())) >= 2  # positions stop at different iterations
    m.recurrent.compact_below = compact
    with torch.no_grad():
        got = m(IDS, n_loops=n_loops, exit=policy, exit_threshold=threshold)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert m.last_forward["iterations"] == iterations
    assert m.last_forward["row_iterations"] == _row_iterations(exit_at, iterations, compact)
    _, cache = m.run_with_cache(IDS, n_loops=n_loops, exit=policy, exit_threshold=threshold)
    assert torch.equal(_halted_at(cache), exit_at)


# compact_below 2.0: every iteration after the first runs compacted (the running positions gathered,
# computed and scattered back), which must give what the masked loop gives
COMPACT = pytest.mark.parametrize("compact", [None, 2.0], ids=["masked", "compacted"])


@COMPACT
def test_latent_positions_stop_where_the_rule_says_and_stay_frozen(compact):
    m = _model()
    # a threshold between the relative residuals of different positions at iteration 2
    with torch.no_grad():
        _, cache = m.run_with_cache(IDS, n_loops=6, exit="fixed")
    states = torch.cat([cache["recurrent.hook_state_in", 0][None], cache.stack("recurrent.hook_state_out")])
    residual = (states[1:] - states[:-1]).norm(dim=-1) / states[1:].norm(dim=-1)
    threshold = _between(residual[2])
    _stops_as_by_hand(m, 6, "latent", threshold, compact)


@COMPACT
def test_kl_positions_stop_where_successive_lens_distributions_agree(compact):
    m = _model()
    with torch.no_grad():
        _, cache = m.run_with_cache(IDS, n_loops=5, exit="fixed")
        logp = [m.coda_lens(cache["recurrent.hook_state_out", t]) for t in range(5)]
    kls = torch.stack([(logp[t].exp() * (logp[t] - logp[t - 1])).sum(-1) for t in range(1, 5)])
    threshold = _between(kls[1])
    _stops_as_by_hand(m, 5, "kl", threshold, compact)


@COMPACT
def test_act_weights_each_state_by_its_halting_probability(compact):
    m = _model(act_threshold=0.9)
    want, iterations, exit_at = _hand(m, IDS, 6, "act")
    assert len(set(exit_at.flatten().tolist())) >= 2 and iterations <= 6
    m.recurrent.compact_below = compact
    with torch.no_grad():
        got = m(IDS, n_loops=6)  # exit="act" by default
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert m.last_forward["iterations"] == iterations and m.last_forward["exit"] == "act"
    full = IDS.numel() * iterations
    assert m.last_forward["row_iterations"] == full if compact is None else m.last_forward["row_iterations"] <= full
    _, cache = m.run_with_cache(IDS, n_loops=6, exit="act")
    assert torch.equal(_halted_at(cache), exit_at)
    # the cumulative probability sums p_t over the iterations a position ran (through its halting one)
    p = cache.stack("recurrent.hook_halt_prob")
    t = torch.arange(p.shape[0])[:, None, None]
    ran = (exit_at < 0) | (t <= exit_at)
    torch.testing.assert_close(cache.stack("recurrent.hook_cum_halt")[-1], (p * ran).sum(0))


IDS3 = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("seed, ids, shape", [(0, IDS, "the last positions halt first"), (1, IDS3, "a row halts whole")])
def test_act_on_the_rows_still_running_equals_the_masked_loop(seed, ids, shape):
    """Compacted ACT runs only the rows with a running position, up to their last running one:
    on inputs where that cuts rows or positions, the output is the masked loop's and the rows run
    are exactly those."""
    m = _model(seed=seed, act_threshold=1.5)
    want, iterations, exit_at = _hand(m, ids, 8, "act")
    m.recurrent.compact_below = 2.0
    with torch.no_grad():
        got = m(ids, n_loops=8)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert m.last_forward["iterations"] == iterations
    B, T = ids.shape
    ran = B * T  # the first iteration runs dense
    for t in range(1, iterations):
        running = (exit_at < 0) | (exit_at >= t)  # not halted after iteration t - 1
        cols = running.any(0)
        extent = T - int(cols.flip(0).int().argmax()) if cols.any() else 0
        ran += int(running.any(1).sum()) * extent
    assert ran < B * T * iterations, shape  # the fixture cuts something
    assert m.last_forward["row_iterations"] == ran


@pytest.mark.parametrize("policy", ["latent", "kl"])
def test_compacted_steps_on_a_kv_cache_equal_the_masked_ones(policy):
    """With a KV cache the compacted kl/latent step still writes every position's keys (later
    chunks attend to them): a prefill in two chunks gives the masked loop's logits and cache."""
    out, caches = {}, {}
    for compact in (0.0, 2.0):  # 0: never compact
        m = _converging(50.0 if policy == "latent" else 20.0)
        m.recurrent.compact_below = compact
        cache: dict = {}
        threshold = 1e-2 if policy == "latent" else 1e-3
        with torch.no_grad():
            first = m(IDS[:, :4], n_loops=8, exit=policy, exit_threshold=threshold, kv_cache=cache)
            second = m(IDS[:, 4:], n_loops=8, exit=policy, exit_threshold=threshold, kv_cache=cache, start_pos=4)
        out[compact], caches[compact] = torch.cat([first, second], 1), cache
        rows = m.last_forward["row_iterations"]
    torch.testing.assert_close(out[2.0], out[0.0], atol=1e-5, rtol=1e-5)
    assert caches[2.0].keys() == caches[0.0].keys() and len(caches[0.0]) > 2
    for key in caches[0.0]:
        for name, t in caches[0.0][key].items():
            torch.testing.assert_close(caches[2.0][key][name], t, atol=1e-5, rtol=1e-5)
    assert rows < IDS[:, 4:].numel() * 8  # the compacted run skipped exited positions


def test_act_halts_on_reaching_the_threshold_exactly():
    """p ≡ 0.5 exactly (a zero halting head) and act_threshold 0.5: the first iteration reaches the
    threshold exactly, so ACT halts there with the remainder 1 as its weight (`>=`, not `>`)."""
    m = _model(act_threshold=0.5)
    with torch.no_grad():
        m.recurrent.act.halt.weight.zero_()
        m.recurrent.act.halt.bias.zero_()
        want, iterations, exit_at = _hand(m, IDS, 4, "act")
        got = m(IDS, n_loops=4, exit="act")
        first, _, _ = _hand(m, IDS, 1, "fixed")  # weight 1 on the first state: the one-iteration output
    assert iterations == 1 and bool((exit_at == 0).all())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, first, atol=1e-5, rtol=1e-5)
    assert m.last_forward["iterations"] == 1


def test_defaults_n_loops_is_the_configs_depth_and_thresholds_are_the_documented_ones():
    m = _model(act_threshold=50.0)  # ACT never halts: the default depth shows
    with torch.no_grad():
        default = m(IDS)
        assert m.last_forward["iterations"] == 4 == m.cfg.max_loop_iters
        torch.testing.assert_close(default, m(IDS, n_loops=4, exit="act"), atol=0, rtol=0)
    for policy, documented, embed_scale in (("latent", 1e-2, 50.0), ("kl", 1e-3, 20.0)):
        m = _converging(embed_scale)
        with torch.no_grad():
            implicit = m(IDS, n_loops=12, exit=policy)
            used = m.last_forward["iterations"]
            explicit = m(IDS, n_loops=12, exit=policy, exit_threshold=documented)
            assert m.last_forward["iterations"] == used
            torch.testing.assert_close(implicit, explicit, atol=0, rtol=0)
            _, _, exit_at = _hand(m, IDS, 12, policy, documented)
            assert 1 < used and len(set(exit_at.flatten().tolist())) >= 2  # the default decides something here


def test_the_moe_routes_on_biased_logits_and_gates_on_the_unbiased_softmax():
    m = _model()
    ffn = m.recurrent.block.ffn
    x = torch.randn(2, 5, m.cfg.dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = ffn(x)
        flat = x.reshape(-1, m.cfg.dim)
        logits = flat @ ffn.router.weight.T
        want = torch.zeros_like(flat)
        for n in range(flat.shape[0]):
            chosen = (logits[n] + ffn.router_bias).topk(2).indices
            gates = logits[n].softmax(-1)[chosen]
            gates = gates / gates.sum()
            for g, i in zip(gates, chosen):
                want[n] += g * ffn.routed_experts[int(i)](flat[n])
            want[n] += sum(expert(flat[n]) for expert in ffn.shared_experts)
    torch.testing.assert_close(got, want.view(x.shape), atol=1e-6, rtol=1e-5)
    # the bias changes the choice somewhere here, else the test could not tell biased from unbiased
    assert not torch.equal(logits.topk(2).indices, (logits + ffn.router_bias).topk(2).indices)


def test_compact_share_follows_the_measured_rule():
    assert RecurrentBlock.compact_share(15.9e6) == 0.0
    assert RecurrentBlock.compact_share(16e6) == pytest.approx(0.4)
    assert RecurrentBlock.compact_share(64e6) == pytest.approx(0.6)
    assert RecurrentBlock.compact_share(16e6 * 2**4) == pytest.approx(0.8)
    assert RecurrentBlock.compact_share(16e6 * 2**20) == pytest.approx(0.9)


def test_loop_index_embedding_rope_and_rmsnorm_by_their_formulas():
    emb = loop_index_embeddings(5, 4, 8, "cpu", torch.float32)  # theta 10000 by default
    torch.testing.assert_close(emb, torch.stack([_loop_emb(t, 4, 8) for t in range(5)]))
    assert loop_index_embeddings(3, 4, 8, "cpu", torch.bfloat16).dtype == torch.bfloat16
    freqs = precompute_rope_freqs(4, 6, 100.0)
    angles = np.arange(6)[:, None] * (1.0 / 100.0 ** (np.arange(0, 4, 2) / 4))
    torch.testing.assert_close(freqs, torch.polar(torch.ones(6, 2), torch.tensor(angles, dtype=torch.float32)))
    x = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(0))  # (T, H, d)
    got = apply_rope(x, freqs)
    c, s = torch.tensor(np.cos(angles), dtype=torch.float32), torch.tensor(np.sin(angles), dtype=torch.float32)
    even, odd = x[..., 0::2], x[..., 1::2]
    want = torch.stack([even * c[:, None] - odd * s[:, None], even * s[:, None] + odd * c[:, None]], -1).flatten(-2)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    small = torch.full((2, 8), 1e-4)  # eps (1e-6 by default) dominates mean(x²) = 1e-8
    norm = RMSNorm(8)
    torch.testing.assert_close(norm(small), _rms(small, norm.weight, 1e-6))


def test_watched_sees_hooks_and_replaced_forwards():
    m = _model()
    assert not watched(m.recurrent)
    handle = m.recurrent.block.ffn.register_forward_hook(lambda *a: None)
    assert watched(m.recurrent)
    handle.remove()
    handle = m.recurrent.lora.register_forward_pre_hook(lambda *a: None)
    assert watched(m.recurrent)
    handle.remove()
    m.recurrent.norm.forward = m.recurrent.norm.forward  # a tool wrapping the module on the instance
    assert watched(m.recurrent)
    del m.recurrent.norm.forward
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert watched(m.recurrent)
    finally:
        handle.remove()
    assert not watched(m.recurrent)


def test_generate_defaults_and_sampling():
    m = _model(act_threshold=0.01)  # every position halts at the first iteration: 64 cheap steps
    prompt = IDS[:, :3]
    out = m.generate(prompt, generator=torch.Generator().manual_seed(7))
    same = m.generate(prompt, max_new_tokens=64, n_loops=8, temperature=1.0, top_k=50, exit="act",
                      generator=torch.Generator().manual_seed(7))
    assert out.shape == (2, 3 + 64) and torch.equal(out, same) and torch.equal(out[:, :3], prompt)
    assert m.last_forward["n_loops"] == 8 and m.last_forward["exit"] == "act"
    greedy = m.generate(prompt, max_new_tokens=3, temperature=0, n_loops=2)
    top1 = m.generate(prompt, max_new_tokens=3, top_k=1, n_loops=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(greedy, top1)  # top-1 sampling is greedy
    with torch.no_grad():
        first = m(prompt, n_loops=2)[:, -1].argmax(-1)
    assert torch.equal(greedy[:, 3], first)
    cold = [m.generate(prompt, max_new_tokens=4, temperature=1e-4, top_k=0, n_loops=2,
                       generator=torch.Generator().manual_seed(s)) for s in range(2)]
    assert torch.equal(cold[0], greedy[:, :3].new_tensor(cold[1])) and torch.equal(cold[0][:, :6], greedy)


@pytest.mark.parametrize("call, message", [
    (lambda m: m(IDS, n_loops=2, budgets=[None, None]), "drop n_loops and exit_threshold"),
    (lambda m: m(IDS, exit_threshold=0.1, exit="latent", budgets=[None, None]), "drop n_loops and exit_threshold"),
    (lambda m: m(IDS[0], budgets=[None]), r"\(batch, seq\)"),
    (lambda m: m(IDS, exit="never", budgets=[None, None]), "exit must be one of"),
    (lambda m: m(IDS, start_pos=-1), "exceed max_seq_len=80"),
    (lambda m: m(IDS, start_pos=75), r"positions 75\.\.80 exceed max_seq_len=80"),
    (lambda m: m.generate(IDS, exit_threshold=0.1, exit="latent", budgets=[None, None]), "drop exit_threshold"),
    (lambda m: m.generate(IDS, max_new_tokens=-1), "max_new_tokens must be >= 0"),
    (lambda m: m.generate(IDS, max_new_tokens=75), r"prompt \(6\) \+ max_new_tokens \(75\) exceeds max_seq_len=80"),
    (lambda m: m(IDS, exit="latent", exit_threshold=-1.0), "default 0.01"),
])
def test_guards_name_the_fix(call, message):
    with pytest.raises(ValueError, match=message):
        call(_model())


def test_the_model_refuses_other_configs_and_open_mythos_lookalikes():
    with pytest.raises(TypeError, match="from_mythos_config"):
        LoopedTransformer(dict(MICRO))
    with pytest.raises(TypeError, match="OpenMythos model"):
        LoopedTransformer.from_open_mythos(torch.nn.Linear(2, 2))


def test_a_dtype_cast_keeps_the_rope_tables_complex_and_the_state_dict_is_a_copy():
    m = _model()
    table = m.freqs_cis.clone()
    m.to(torch.float64)
    assert m.freqs_cis.dtype == torch.complex64 and torch.equal(m.freqs_cis, table)
    assert m.embed.weight.dtype == torch.float64
    state = m.to_open_mythos_state_dict()
    assert state.keys() == m.state_dict().keys()
    state["embed.weight"].zero_()
    assert m.embed.weight.abs().sum() > 0  # a copy, not the model's tensors


def test_the_coda_lens_of_the_last_state_is_the_forwards_output():
    m = _model()
    with torch.no_grad():
        logits, cache = m.run_with_cache(IDS, n_loops=3, exit="fixed")
        lens = m.coda_lens(cache["recurrent.hook_state_out", 2])
        few = m.coda_lens(cache["recurrent.hook_state_out", 2], positions=torch.tensor([1, 4]))
    torch.testing.assert_close(lens, F.log_softmax(logits, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(few, lens[:, [1, 4]], atol=1e-5, rtol=1e-5)
    assert math.isclose(float(lens.exp().sum(-1).mean()), 1.0, rel_tol=1e-5)


def test_the_decay_is_clamped_so_its_gradient_stays_finite():
    """A = exp(-exp(log_dt + log_A)) with the exponent clamped to [-20, 20]: unclamped, a channel at
    100 gives exp(100) = inf in float32 and a NaN gradient (inf · 0); clamped, A is 0 there with a
    zero gradient, and 1 at the other end. Below -20 the clamp passes no gradient: at -30 and -20.5
    exactly 0, where the unclamped dA/dx = -exp(x)·A is -9.4e-14 and -1.3e-9 (normal float32s).
    (Above 20 nothing tells a wider clamp apart: A = exp(-exp(x)) is 0 in float32 from x ≈ 4.5.)"""
    from mythos_probe.model.looped import LTIInjection

    inj = LTIInjection(6)
    with torch.no_grad():
        inj.log_A.copy_(torch.tensor([100.0, -100.0, 0.0, 19.0, -30.0, -20.5]))
        inj.log_dt.zero_()
    A = inj.get_A()
    A.sum().backward()
    assert torch.isfinite(inj.log_A.grad).all() and torch.isfinite(inj.log_dt.grad).all()
    torch.testing.assert_close(A, torch.exp(-torch.exp(torch.tensor([20.0, -20.0, 0.0, 19.0, -20.0, -20.0]))))
    grad = inj.log_A.grad
    assert grad[0] == 0 and grad[1] == 0 and grad[4] == 0 and grad[5] == 0
    torch.testing.assert_close(grad[2:4], -torch.exp(torch.tensor([0.0, 19.0])) * A[2:4].detach())


# -- per-row budgets (model/budgets.py): each row's output is the one it gets run alone with its budget --------


def _criterion(m, ids, policy, n_loops=6) -> torch.Tensor:
    """(n_loops, B, T) the latent relative residual, or the kl between successive coda-lens
    distributions (row 0 is iteration 1's), of a fixed run."""
    with torch.no_grad():
        _, cache = m.run_with_cache(ids, n_loops=n_loops, exit="fixed")
        states = torch.cat([cache["recurrent.hook_state_in", 0][None], cache.stack("recurrent.hook_state_out")])
        if policy == "latent":
            return (states[1:] - states[:-1]).norm(dim=-1) / states[1:].norm(dim=-1)
        logp = [m.coda_lens(states[t]) for t in range(1, n_loops + 1)]
    return torch.stack([(logp[t].exp() * (logp[t] - logp[t - 1])).sum(-1) for t in range(1, n_loops)])


@COMPACT
@pytest.mark.parametrize("policy", ["latent", "kl"])
def test_budgets_give_each_row_its_own_depth_minimum_and_threshold(policy, compact):
    """Row 0: at most 6 iterations and its own threshold; row 1: at least 3 iterations, at most 4,
    another threshold; row 2: 3 iterations at most, a threshold it never reaches. Each row's logits
    are its own run alone by the recurrence (the policy held back before min_loops, cut at
    max_loops), on a fixture where the minimum and each row's threshold change some exit;
    compacted, only the running positions of rows within their budget are computed."""
    from mythos_probe.model.budgets import LoopBudget

    m = _model()
    ids = IDS3
    crit = _criterion(m, ids, policy)
    k = 2 if policy == "latent" else 1  # kl's row 0 is iteration 1's
    th = [_between(crit[k, 0]), _between(crit[k - 1, 1]), float(crit[:3, 2].min()) / 2]
    budgets = [LoopBudget(6, exit_threshold=th[0]), LoopBudget(4, min_loops=3, exit_threshold=th[1]),
               LoopBudget(3, exit_threshold=th[2])]
    want, exits = [], []
    for i, b in enumerate(budgets):
        logits, _, exit_at = _hand(m, ids[i:i + 1], b.max_loops, policy, b.exit_threshold, b.min_loops)
        want.append(logits)
        exits.append(exit_at)
    assert len(set(exits[0].flatten().tolist())) >= 2  # row 0's positions stop at different iterations
    assert not torch.equal(_hand(m, ids[1:2], 4, policy, th[1])[2], exits[1])  # min_loops=3 holds some back
    assert bool((exits[2] < 0).all())  # row 2 runs to its max_loops
    for i in (0, 1):  # the other row's threshold, or the policy's default, would stop the row elsewhere
        for other in (th[1 - i], 1e-2 if policy == "latent" else 1e-3):
            assert not torch.equal(_hand(m, ids[i:i + 1], budgets[i].max_loops, policy, other, budgets[i].min_loops)[2],
                                   exits[i])
    m.recurrent.compact_below = compact
    with torch.no_grad():
        got = m(ids, exit=policy, budgets=budgets)
    torch.testing.assert_close(got, torch.cat(want), atol=1e-5, rtol=1e-5)
    assert m.last_forward["budgets"] == tuple(budgets) and m.last_forward["n_loops"] == 6


@COMPACT
def test_fixed_budgets_run_each_row_to_its_max_loops(compact):
    """exit='fixed' with rows of different depths: each row is the fixed recurrence run to its
    max_loops; compacted, a row past its budget leaves the loop (the rows run are exactly those)."""
    from mythos_probe.model.budgets import LoopBudget

    m = _model()
    ids = IDS3
    depths = [5, 2, 3]
    want = torch.cat([_hand(m, ids[i:i + 1], d)[0] for i, d in enumerate(depths)])
    m.recurrent.compact_below = compact
    with torch.no_grad():
        got = m(ids, exit="fixed", budgets=[LoopBudget(d) for d in depths])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    T = ids.shape[1]
    ran = sum(depths) * T if compact else ids.numel() * max(depths)
    assert m.last_forward["iterations"] == max(depths) and m.last_forward["row_iterations"] == ran


def test_act_budgets_on_single_token_rows_compacted():
    """ACT with rows of one token each (decode): compacted, a step runs the rows still within
    their budget and not halted, each one position wide (the extent 1); a row past its max_loops
    stops adding weighted states, so its output is the one ACT gives it run alone to that depth."""
    from mythos_probe.model.budgets import LoopBudget

    m = _model(act_threshold=0.45)
    ids = torch.tensor([[3], [17], [40], [59]])
    depths = [6, 3, 4, 2]  # row 1's cut comes at iteration 2, where rows 2 and 3 have left: a step on a subset of rows
    runs = [_hand(m, ids[i:i + 1], d, "act") for i, d in enumerate(depths)]
    halted = [int(r[2].item()) for r in runs]
    # ACT halts rows 0 and 2 within their budgets; rows 1 and 3 would halt later, their budget cuts them first
    assert halted[0] >= 0 and halted[2] >= 0 and halted[1] < 0 and halted[3] < 0
    assert int(_hand(m, ids[1:2], 6, "act")[2].item()) >= 3 and int(_hand(m, ids[3:], 6, "act")[2].item()) >= 2
    m.recurrent.compact_below = 2.0
    with torch.no_grad():
        got = m(ids, budgets=[LoopBudget(d) for d in depths])
    torch.testing.assert_close(got, torch.cat([r[0] for r in runs]), atol=1e-5, rtol=1e-5)
    # the first iteration runs dense; after it, the rows neither halted nor past their budget
    ran = [4] + [sum(1 for h, d in zip(halted, depths) if t < d and (h < 0 or h >= t)) for t in range(1, 6)]
    assert m.last_forward["row_iterations"] == sum(ran)


# -- attention: a prefill in chunks on a KV cache, the attention written out for hooks, the lens of a few positions --


ATTN = pytest.mark.parametrize("attn_type", ["gqa", "mla"])


@ATTN
def test_a_prefill_in_chunks_on_a_kv_cache_gives_the_one_prefills_logits(attn_type):
    """Chunks of 4 and 2 tokens on one cache (the second chunk's queries see the 4 cached keys and
    their own, causally): the logits of one prefill of all 6, and a cache of every layer holding
    6 positions."""
    m = _model(attn_type=attn_type)
    with torch.no_grad():
        want = m(IDS, n_loops=3, exit="fixed")
        cache: dict = {}
        first = m(IDS[:, :4], n_loops=3, exit="fixed", kv_cache=cache)
        second = m(IDS[:, 4:], n_loops=3, exit="fixed", kv_cache=cache, start_pos=4)
    torch.testing.assert_close(torch.cat([first, second], 1), want, atol=1e-5, rtol=1e-5)
    assert sorted(cache) == ["coda_0", "prelude_0"] + [f"recurrent_loop_{t}" for t in range(3)]
    assert all(t.shape[1] == 6 for layer in cache.values() for t in layer.values())
    assert set(cache["coda_0"]) == ({"k", "v"} if attn_type == "gqa" else {"c_kv", "k_rope"})


@ATTN
def test_compacted_mla_steps_equal_the_recurrence_with_and_without_a_kv_cache(attn_type):
    m = _model(attn_type=attn_type)
    with torch.no_grad():
        _, cache = m.run_with_cache(IDS, n_loops=6, exit="fixed")
    states = torch.cat([cache["recurrent.hook_state_in", 0][None], cache.stack("recurrent.hook_state_out")])
    threshold = _between(((states[1:] - states[:-1]).norm(dim=-1) / states[1:].norm(dim=-1))[2])
    want, iterations, exit_at = _hand(m, IDS, 6, "latent", threshold)
    assert len(set(exit_at.flatten().tolist())) >= 2
    m.recurrent.compact_below = 2.0
    with torch.no_grad():
        got = m(IDS, n_loops=6, exit="latent", exit_threshold=threshold)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert m.last_forward["row_iterations"] == _row_iterations(exit_at, iterations, 2.0)
    out = {}
    for compact in (0.0, 2.0):  # on a cache, in two chunks: compacted as masked
        m = _converging(50.0, attn_type=attn_type)
        m.recurrent.compact_below = compact
        kv: dict = {}
        with torch.no_grad():
            first = m(IDS[:, :4], n_loops=8, exit="latent", exit_threshold=1e-2, kv_cache=kv)
            second = m(IDS[:, 4:5], n_loops=8, exit="latent", exit_threshold=1e-2, kv_cache=kv, start_pos=4)
            # a decode step: one token a row, whose rows exit at different iterations (a row leaves whole)
            third = m(IDS[:, 5:], n_loops=8, exit="latent", exit_threshold=1e-2, kv_cache=kv, start_pos=5)
        out[compact] = (torch.cat([first, second, third], 1), kv, m.last_forward["row_iterations"])
    torch.testing.assert_close(out[2.0][0], out[0.0][0], atol=1e-5, rtol=1e-5)
    for key, layer in out[0.0][1].items():
        for name, t in layer.items():
            torch.testing.assert_close(out[2.0][1][key][name], t, atol=1e-5, rtol=1e-5)
    assert out[2.0][2] < out[0.0][2]  # the compacted run skipped exited positions


@ATTN
@pytest.mark.parametrize("chunk", [False, True])
def test_hooks_on_the_scores_see_the_attention_written_out(attn_type, chunk):
    """A hook on the scores runs the attention written out: scores = q·kᵀ/√d (each key head
    serving H/Hkv query heads), -inf above the causal diagonal (shifted by the cached keys on a
    second chunk), pattern = their softmax, z = pattern·v, each against the hooked q, k, v; the
    logits are the unhooked forward's."""
    m = _model(attn_type=attn_type)
    kv: dict = {}
    ids, start = IDS, 0
    with torch.no_grad():
        if chunk:
            m(IDS[:, :4], n_loops=2, exit="fixed", kv_cache=kv)
            ids, start = IDS[:, 4:], 4
        plain_kv = {k: dict(v) for k, v in kv.items()}
        want = m(ids, n_loops=2, exit="fixed", kv_cache=plain_kv if chunk else None, start_pos=start)
        logits, cache = m.run_with_cache(ids, n_loops=2, exit="fixed", kv_cache=kv if chunk else None, start_pos=start,
                                         names_filter=lambda name: name.startswith("prelude.0.attn.hook_"))
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    site = lambda name: cache[f"prelude.0.attn.hook_{name}"]  # noqa: E731
    q, k, v = (site(n).transpose(1, 2) for n in ("q", "k", "v"))  # (B, heads, ·, d)
    H = q.shape[1]
    k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
    T, S = q.shape[2], k.shape[2]
    assert (T, S) == ((2, 6) if chunk else (6, 6))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    allowed = torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T)
    scores = scores.masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(site("attn_scores"), scores, atol=1e-5, rtol=1e-5)
    pattern = scores.softmax(-1)
    torch.testing.assert_close(site("pattern"), pattern, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(site("z"), (pattern @ v).transpose(1, 2), atol=1e-5, rtol=1e-5)


LONG = torch.randint(0, 64, (2, 60), generator=torch.Generator().manual_seed(9))


@ATTN
def test_the_coda_lens_of_a_few_positions_is_the_full_lens_there(attn_type):
    """Two coda layers (the last one runs the wanted queries only). The positions' queries are
    attended each of the three ways the cost model picks by size (all the same values): all
    positions then the wanted ones (6 tokens), packed per row (2 of 60), gathered (1 of 10), and
    packed on top of a KV cache (1 of a 20-token chunk after 40 cached)."""
    m = _model(attn_type=attn_type, coda_layers=2)
    table = m.freqs_cis_mla if attn_type == "mla" else m.freqs_cis
    with torch.no_grad():
        for ids, positions in ((IDS, [0, 2, 5]), (LONG, [3, 50]), (LONG[:, :10], [7])):
            _, cache = m.run_with_cache(ids, n_loops=2, exit="fixed", names_filter="recurrent.hook_state_out")
            h = cache["recurrent.hook_state_out", 1]
            full = m.coda_lens(h)
            torch.testing.assert_close(full, F.log_softmax(_coda(m, h, table[:ids.shape[1]]), -1), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(m.coda_lens(h, torch.tensor(positions)), full[:, positions], atol=1e-5, rtol=1e-5)
        kv: dict = {}
        m(LONG[:, :40], n_loops=2, exit="fixed", kv_cache=kv)
        _, cache = m.run_with_cache(LONG[:, 40:], n_loops=2, exit="fixed", kv_cache=kv, start_pos=40,
                                    names_filter="recurrent.hook_state_out")
        h = cache["recurrent.hook_state_out", 1]
        torch.testing.assert_close(m.coda_lens(h, torch.tensor([5])), m.coda_lens(h)[:, [5]], atol=1e-5, rtol=1e-5)
        assert all(t.shape[1] == 60 for t in kv["coda_1"].values())  # the lens read the cache, never wrote it


@ATTN
def test_a_layer_called_alone_caches_under_the_default_key(attn_type):
    m = _model(attn_type=attn_type)
    table = m.freqs_cis_mla if attn_type == "mla" else m.freqs_cis
    kv: dict = {}
    with torch.no_grad():
        m.prelude[0].attn(m.embed(IDS), table[:6], True, kv)
        assert list(kv) == ["default"]
        kv.clear()
        m.prelude[0](m.embed(IDS), table[:6], True, kv)  # the whole block
    assert list(kv) == ["default"]


@pytest.mark.parametrize("policy", ["latent", "kl"])
def test_a_loop_compacts_only_the_iterations_below_its_share(policy):
    """compact_below at exactly the share of positions running at an iteration where some have
    exited: that iteration runs masked (every position, the exited ones frozen), any later one with
    fewer running compacted; the logits are the recurrence's and the rows run exactly those."""
    m = _model()
    crit = _criterion(m, IDS, policy)
    threshold = _between(crit[2 if policy == "latent" else 1])
    want, iterations, exit_at = _hand(m, IDS, 6, policy, threshold)
    running = [int(((exit_at < 0) | (exit_at >= t)).sum()) for t in range(iterations)]  # before iteration t
    shares = sorted({r / IDS.numel() for r in running[1:] if 0 < r < IDS.numel()})
    assert shares  # an iteration where some positions have exited and some run
    m.recurrent.compact_below = shares[-1]
    with torch.no_grad():
        got = m(IDS, n_loops=6, exit=policy, exit_threshold=threshold)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    ran = IDS.numel() + sum(r if r / IDS.numel() < shares[-1] else IDS.numel() for r in running[1:])
    assert m.last_forward["row_iterations"] == ran


@ATTN
def test_hooks_on_the_attention_output_only_keep_the_fused_kernel_and_the_cache_knows_its_forward(attn_type):
    """A hook on z alone (not on the scores or pattern) keeps the fused attention: z is the
    attention written out from the hooked q, k, v all the same, the logits the unhooked ones; the
    cache records the call (its arguments, the iterations run)."""
    m = _model(attn_type=attn_type)
    with torch.no_grad():
        want = m(IDS, n_loops=3, exit="fixed")
        logits, cache = m.run_with_cache(IDS, n_loops=3, exit="fixed",
                                         names_filter=["prelude.0.attn.hook_q", "prelude.0.attn.hook_k",
                                                       "prelude.0.attn.hook_v", "prelude.0.attn.hook_z"])
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    q, k, v = (cache[f"prelude.0.attn.hook_{n}"].transpose(1, 2) for n in ("q", "k", "v"))
    H = q.shape[1]
    k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
    scores = ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).masked_fill(~torch.ones(6, 6).tril().bool(), -math.inf)
    torch.testing.assert_close(cache["prelude.0.attn.hook_z"], (scores.softmax(-1) @ v).transpose(1, 2),
                               atol=1e-5, rtol=1e-5)
    assert cache.n_iterations() == 3 and cache.forward["n_loops"] == 3 and cache.forward["exit"] == "fixed"


def test_a_bf16_model_hooked_on_its_scores_attends_in_bf16():
    m = _model().to(torch.bfloat16)
    with torch.no_grad():
        want = m(IDS, n_loops=2, exit="fixed")
        logits, cache = m.run_with_cache(IDS, n_loops=2, exit="fixed", names_filter="prelude.0.attn.hook_pattern")
    assert cache["prelude.0.attn.hook_pattern"].dtype == torch.bfloat16 and logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), want.float(), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("call, message", [
    (lambda m: m(IDS[0]), "input_ids must be a (batch, seq) tensor of token ids"),
    (lambda m: m(IDS.float()), "input_ids must hold integer token ids, got dtype torch.float32"),
    (lambda m: m(IDS[:0]), "input_ids is an empty batch (0 sequences): give at least one sequence"),
    (lambda m: m(IDS[:, :0]), "input_ids is empty: give at least one token"),
    (lambda m: m(IDS, start_pos=76), "positions 76..81 exceed max_seq_len=80"),
    (lambda m: m(IDS + 64), "token ids must lie in [0, vocab_size=64)"),
    (lambda m: m(IDS - 64), "token ids must lie in [0, vocab_size=64)"),
    (lambda m: m(IDS, exit="never"), "exit must be one of ('act', 'fixed', 'kl', 'latent'), got 'never'"),
    (lambda m: m(IDS, exit="fixed", exit_threshold=0.1),
     "exit='fixed' runs every loop and takes no exit_threshold: drop it, or choose exit='kl' or exit='latent'"),
    (lambda m: m(IDS, exit="act", exit_threshold=0.1),
     "exit='act' halts at the config's act_threshold and takes no exit_threshold: drop it, or set it with "
     "model.cfg.replace(act_threshold=...)"),
    (lambda m: m(IDS, exit="kl", exit_threshold="0.1"), "exit_threshold must be a number, got str '0.1'"),
    (lambda m: m(IDS, exit="latent", exit_threshold=-0.5),
     "exit_threshold must be a non-negative number (the latent criterion stops a position below it), got -0.5; "
     "default 0.01"),
    (lambda m: m(IDS, n_loops=0), "n_loops must be a positive integer, got 0"),
    (lambda m: m(IDS, n_loops=True), "n_loops must be a positive integer, got True"),
])
def test_each_input_guard_says_what_to_do_in_full(call, message):
    m = _model()
    with pytest.raises(ValueError) as err:
        call(m)
    assert str(err.value) == message


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_every_site_inside_the_loop_is_iteration_aware_and_none_outside(attn_type):
    """The recurrent block's sites, its attention's included, are `LoopHookPoint`s (a cache keeps
    one value per iteration); the prelude's and coda's are plain hook points (one call each)."""
    from transformer_lens.hook_points import HookPoint

    from mythos_probe.probes.hooks import LoopHookPoint

    m = LoopedTransformer(LoopedConfig(**{**MICRO, "attn_type": attn_type}))
    sites = {name: type(mod) for name, mod in m.named_modules() if isinstance(mod, HookPoint)}
    inside = {n for n in sites if n.startswith("recurrent.")}
    assert any(".attn." in n for n in inside) and any(".attn." in n for n in set(sites) - inside)
    assert {n for n in inside if sites[n] is not LoopHookPoint} == set()
    assert {n for n in set(sites) - inside if sites[n] is not HookPoint} == set()


def test_a_fresh_injection_starts_at_its_documented_values():
    """A = exp(-exp(0)) = 1/e on every channel, B = 0.1: the initialisation a fresh model trains from."""
    inj = LoopedTransformer(LoopedConfig(**MICRO)).recurrent.injection
    assert torch.equal(inj.B.detach(), torch.full((MICRO["dim"],), 0.1))
    torch.testing.assert_close(inj.get_A().detach(), torch.full((MICRO["dim"],), math.exp(-1.0)))
