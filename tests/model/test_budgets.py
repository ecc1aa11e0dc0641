"""Per-request loop budgets in one batch: each row's logits equal those of the row run alone with
its own depth and threshold (within 1e-6 of the logits' scale), for every exit policy, GQA and
MLA, prefill, prefill on a cached prefix and KV-cached decode, compacted or not; a row past its
budget leaves the loop's work; and what a budget cannot mean is refused."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mythos_probe.model import LoopedConfig, LoopedTransformer
from mythos_probe.model.budgets import LoopBudget

TOL = 1e-6
SITES = ["recurrent.hook_state_in", "recurrent.hook_state_out", "recurrent.hook_cum_halt", "recurrent.hook_halted"]
_MODELS: dict = {}


def model(variant: str) -> LoopedTransformer:
    """A random model whose positions exit at different iterations: ACT's halting head set to
    halt some positions early, and token embeddings of norms spread over two decades (on a plain
    random model every position converges alike, so a threshold stops all or none)."""
    if variant not in _MODELS:
        torch.manual_seed(0)
        m = LoopedTransformer(LoopedConfig.variant(variant)).eval()
        with torch.no_grad():
            m.recurrent.injection.log_A.normal_(0, 1)
            std, bias = (0.3, -1.5) if variant == "tiny-gqa" else (0.09, -1.0)
            m.recurrent.act.halt.weight.normal_(0, std)
            m.recurrent.act.halt.bias.fill_(bias)
            g = torch.Generator().manual_seed(0)
            m.embed.weight.mul_(torch.exp(1.5 * torch.randn(m.cfg.vocab_size, 1, generator=g)))
        _MODELS[variant] = m
    return _MODELS[variant]


def criterion_values(m, cache, exit: str, prefix_cache) -> torch.Tensor:
    """(I, B, T): the value each position's exit test compared with its threshold after each
    iteration, recomputed from the states a hooked run recorded (NaN where undefined)."""
    out = cache.stack("recurrent.hook_state_out")
    if exit == "act":
        return cache.stack("recurrent.hook_cum_halt")
    if exit == "latent":
        inp = cache.stack("recurrent.hook_state_in")
        return (out - inp).norm(dim=-1) / out.norm(dim=-1).clamp_min(1e-12)
    m.last_forward["kv_cache"] = prefix_cache  # the lens reads the cache as it was before the coda
    logp = [m.coda_lens(out[t]) for t in range(out.shape[0])]
    kl = [torch.full(out.shape[1:3], float("nan"))]
    return torch.stack(kl + [(logp[t].exp() * (logp[t] - logp[t - 1])).sum(-1) for t in range(1, len(logp))])


def alone(m, tokens, prefix: int, exit: str, b: LoopBudget) -> torch.Tensor:
    """One row run by itself; with min_loops 1 through the per-call options (n_loops,
    exit_threshold), not budgets at all."""
    if b.min_loops == 1:
        run = dict(n_loops=b.max_loops, exit=exit, exit_threshold=b.exit_threshold)
    else:
        run = dict(exit=exit, budgets=[b])
    cache = None
    if prefix:
        cache = {}
        m(tokens[:, :prefix], kv_cache=cache, **run)
    return m(tokens[:, prefix:], kv_cache=cache, start_pos=prefix, **run)


@settings(max_examples=12, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(data=st.data())
def test_any_batch_of_budgets_equals_each_row_run_alone(data):
    """Property over variant, policy, batch, length, cached prefix, each row's max and min loops
    and threshold (a quantile of the values a full-depth run compares), and compaction share. An
    example whose exit decisions sit within 0.5 % of a row's threshold is skipped: a batch's
    GEMMs round differently from one row's and may flip such a decision. Everything is drawn
    before the model runs, so that a draw never depends on a computed value."""
    variant = data.draw(st.sampled_from(["tiny-gqa", "tiny-mla"]), label="variant")
    exit = data.draw(st.sampled_from(["fixed", "act", "latent", "kl"]), label="exit")
    B, T = data.draw(st.integers(1, 5), label="batch"), data.draw(st.integers(1, 8), label="length")
    prefix = data.draw(st.integers(0, 3), label="cached prefix")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    depths = [data.draw(st.integers(1, 6), label=f"max_loops[{i}]") for i in range(B)]
    thresholded = exit in ("latent", "kl")
    quantiles = [data.draw(st.floats(0.05, 0.95), label=f"quantile[{i}]") if thresholded else None for i in range(B)]
    lows = [data.draw(st.integers(1, d), label=f"min_loops[{i}]") if thresholded else 1 for i, d in enumerate(depths)]
    compact_below = data.draw(st.sampled_from([None, 0.3, 0.75, 2.0]), label="compact_below")

    m = model(variant)
    tokens = torch.randint(0, m.cfg.vocab_size, (B, prefix + T), generator=torch.Generator().manual_seed(seed))
    ids = tokens[:, prefix:]
    with torch.no_grad():
        thresholds = [None] * B
        if thresholded:  # thresholds among the values of a full-depth run
            cache = None
            if prefix:
                cache = {}
                m(tokens[:, :prefix], n_loops=6, exit="fixed", kv_cache=cache)
            before = None if cache is None else dict(cache)
            _, full = m.run_with_cache(ids, n_loops=6, exit="fixed", kv_cache=cache, start_pos=prefix,
                                       names_filter=SITES)
            values = criterion_values(m, full, exit, before)
            finite = values[torch.isfinite(values)]
            thresholds = [float(finite.quantile(q)) for q in quantiles]
        assume(all(th is None or th > 0 for th in thresholds))  # KLs of near-equal distributions can round below 0
        budgets = [LoopBudget(d, low, th) for d, low, th in zip(depths, lows, thresholds)]

        def batched(compact_below, check=False):
            m.recurrent.compact_below = compact_below
            try:
                cache = None
                if prefix:
                    cache = {}
                    m(tokens[:, :prefix], exit=exit, budgets=budgets, kv_cache=cache)
                if check and exit != "fixed":  # the masked run: no decision may sit on a threshold
                    before = None if cache is None else dict(cache)
                    _, hooked = m.run_with_cache(ids, exit=exit, budgets=budgets, start_pos=prefix,
                                                 kv_cache=None if cache is None else dict(cache), names_filter=SITES)
                    decided = criterion_values(m, hooked, exit, before)
                    limit = torch.tensor([m.cfg.act_threshold if b.exit_threshold is None else b.exit_threshold
                                          for b in budgets])[None, :, None]
                    halted = hooked.stack("recurrent.hook_halted")
                    running = torch.cat([torch.ones_like(halted[:1]), ~halted[:-1]])
                    near = (decided - limit).abs() <= 5e-3 * limit
                    if bool((near & running & torch.isfinite(decided)).any()):
                        return None
                return m(ids, exit=exit, budgets=budgets, kv_cache=cache, start_pos=prefix)
            finally:
                m.recurrent.compact_below = None

        masked = batched(0.0, check=True)
        assume(masked is not None)
        compact = batched(compact_below)
        rows = torch.cat([alone(m, tokens[i : i + 1], prefix, exit, b) for i, b in enumerate(budgets)])
    scale = TOL * max(1.0, float(rows.abs().max()))
    torch.testing.assert_close(masked, rows, atol=scale, rtol=0)
    torch.testing.assert_close(compact, rows, atol=scale, rtol=0)


@pytest.mark.parametrize("variant", ["tiny-gqa", "tiny-mla"])
@pytest.mark.parametrize("exit", ["fixed", "latent", "kl"])
def test_generate_with_budgets_equals_each_row_generated_alone(variant, exit):
    """KV-cached greedy decoding: prompt then one token per step, each row at its own depth (and
    threshold), the batch compacted from any share: the same tokens and the same logits as each
    row decoded by itself."""
    m = model(variant)
    prompts = torch.randint(0, m.cfg.vocab_size, (4, 5), generator=torch.Generator().manual_seed(3))
    th = {"fixed": None, "latent": 0.05, "kl": 1e-3}[exit]
    budgets = [LoopBudget(d, exit_threshold=th if i % 2 else None if exit == "fixed" else th / 10)
               for i, d in enumerate([1, 4, 2, 6])]
    m.recurrent.compact_below = 2.0  # every step after the first compacts: rows past their budget leave
    try:
        together = m.generate(prompts, max_new_tokens=6, temperature=0, exit=exit, budgets=budgets)
        rows = m.recurrent.row_iterations  # the last decode step's rows through the FFN
    finally:
        m.recurrent.compact_below = None
    for i, b in enumerate(budgets):
        one = m.generate(prompts[i : i + 1], max_new_tokens=6, temperature=0, exit=exit, n_loops=b.max_loops,
                         exit_threshold=b.exit_threshold)
        assert together[i].tolist() == one[0].tolist()
    if exit == "fixed":  # the last step: 4 rows at iteration 0, then only the rows whose budget allows
        assert rows == sum(b.max_loops for b in budgets)


def test_a_row_past_its_budget_leaves_the_loop():
    """Rows through the FFN, counted independently from the budgets: each row runs exactly its
    max_loops iterations once the loop compacts (exit='fixed': no other exit); masked (every row
    every iteration, exited ones frozen) or compacted, each row's logits are its own alone."""
    m = model("tiny-gqa")
    ids = torch.randint(0, 256, (4, 6), generator=torch.Generator().manual_seed(1))
    budgets = [LoopBudget(d) for d in (1, 3, 2, 5)]
    out = {}
    try:
        with torch.no_grad():
            for share in (0.0, 2.0):
                m.recurrent.compact_below = share
                out[share] = m(ids, exit="fixed", budgets=budgets)
            alone = torch.cat([m(ids[i : i + 1], n_loops=b.max_loops, exit="fixed") for i, b in enumerate(budgets)])
    finally:
        m.recurrent.compact_below = None
    for share in (0.0, 2.0):  # 1e-6 of the logits' scale (tens: the spread embeddings are tied to the head)
        torch.testing.assert_close(out[share], alone, atol=TOL * float(alone.abs().max()), rtol=0)


def test_compacted_rows_count_their_budgets():
    m = model("tiny-gqa")
    ids = torch.randint(0, 256, (4, 6), generator=torch.Generator().manual_seed(1))
    budgets = [LoopBudget(d) for d in (1, 3, 2, 5)]
    m.recurrent.compact_below = 2.0
    try:
        with torch.no_grad():
            m(ids, exit="fixed", budgets=budgets)
    finally:
        m.recurrent.compact_below = None
    assert m.last_forward["iterations"] == 5
    assert m.last_forward["row_iterations"] == ids.shape[1] * (1 + 3 + 2 + 5)


def test_min_loops_holds_exits_back_and_equal_depths_run_fixed():
    m = model("tiny-mla")
    ids = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, cache = m.run_with_cache(ids, exit="latent", budgets=[LoopBudget(5, 3, 10.0)] * 3,
                                    names_filter="recurrent.hook_halted")
        halted = cache.stack("recurrent.hook_halted")
        assert not halted[:2].any() and halted[2].all()  # a huge threshold stops every position at its minimum
        pinned = m(ids, exit="kl", budgets=[LoopBudget(4, 4, 1.0)] * 3)
        fixed = m(ids, n_loops=4, exit="fixed")
    torch.testing.assert_close(pinned, fixed, atol=TOL, rtol=0)


def test_what_a_budget_cannot_mean_is_refused():
    m = model("tiny-gqa")
    ids = torch.randint(0, 256, (2, 3))
    with pytest.raises(ValueError, match="one LoopBudget per row"):
        m(ids, budgets=[LoopBudget(2)])
    with pytest.raises(ValueError, match="drop n_loops"):
        m(ids, n_loops=3, budgets=[LoopBudget(2)] * 2)
    with pytest.raises(ValueError, match="exit='fixed' takes none"):
        m(ids, exit="fixed", budgets=[LoopBudget(2, exit_threshold=0.1)] * 2)
    with pytest.raises(ValueError, match="min_loops"):
        m(ids, exit="act", budgets=[LoopBudget(3, 2)] * 2)
    with pytest.raises(ValueError, match="exceeds max_loops"):
        LoopBudget(2, 3)
    with pytest.raises(ValueError, match="positive integer"):
        LoopBudget(0)
    with pytest.raises(ValueError, match="non-negative"):
        LoopBudget(2, exit_threshold=float("nan"))


def test_traces_carry_each_rows_budget_and_exit_depth_through_otlp_attributes():
    """Under `latent` with a threshold every position passes, a row exits at its min_loops: the
    exit depths are known without the model; the span encoding keeps every budget field."""
    import mythos_probe
    from mythos_probe.collectors import spans

    m = model("tiny-gqa")
    ids = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(4))
    budgets = [LoopBudget(2, reason="profile endpoint=/easy"), LoopBudget(5, 3, 1e9), LoopBudget(4, 4)]
    with torch.no_grad(), mythos_probe.attach(m, detail="positions") as rec:
        m(ids, exit="latent", budgets=budgets)
    trace = rec.traces[0]
    assert trace.n_loops == 5 and trace.row_max_loops.tolist() == [2, 5, 4]
    assert trace.row_min_loops.tolist() == [1, 3, 4]
    np.testing.assert_array_equal(trace.row_exit_threshold, [np.nan, 1e9, np.nan])  # NaN: the policy's default
    assert trace.row_budget_reason == ("profile endpoint=/easy", "", "")
    assert trace.row_exit_depths.tolist()[1:] == [3, 4] and trace.row_exit_depths[0] <= 2
    back = spans.attributes_to_trace(spans.trace_to_attributes(trace), trace.trace_id, trace.span_id,
                                     trace.start_ns, trace.end_ns)
    assert back.to_dict() == trace.to_dict()
