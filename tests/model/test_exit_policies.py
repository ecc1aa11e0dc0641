"""Exit policies: fixed runs exactly n_loops; latent and kl stop a position when its criterion
falls below the threshold and keep its state frozen while others continue."""

import pytest
import torch

from mythos_probe.model import LoopedConfig, LoopedTransformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    m = LoopedTransformer(LoopedConfig.variant("tiny-mla")).eval()
    with torch.no_grad():
        m.recurrent.act.halt.bias.fill_(1.0)  # ACT alone would halt everything at iteration 2
    return m


ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))


def test_fixed_runs_exactly_n_loops_and_reads_out_the_last_state(model):
    logits, cache = model.run_with_cache(ids, n_loops=6, exit="fixed")
    assert model.last_forward["iterations"] == 6
    assert cache.iterations("recurrent.hook_state_out") == 6
    torch.testing.assert_close(cache["hook_coda_in"], cache["recurrent.hook_state_out", 5])
    lens = model.coda_lens(cache["recurrent.hook_state_out", 5])
    torch.testing.assert_close(logits.log_softmax(-1), lens)


def _relative_residuals(states):
    return (states[1:] - states[:-1]).norm(dim=-1) / states[1:].norm(dim=-1)  # (n-1, B, T)


def test_latent_exit_freezes_positions_below_the_threshold(model):
    _, free = model.run_with_cache(ids, n_loops=8, exit="fixed")
    residuals = _relative_residuals(torch.cat([free["recurrent.hook_state_in", 0][None],
                                               free.stack("recurrent.hook_state_out")]))
    threshold = float(residuals[3].median())  # about half the positions exit at iteration 3
    _, cache = model.run_with_cache(ids, n_loops=8, exit="latent", exit_threshold=threshold)
    states = cache.stack("recurrent.hook_state_out")
    halted = cache.stack("recurrent.hook_halted")
    assert 0 < halted[-1].float().mean() < 1 or model.last_forward["iterations"] < 8
    first = halted.float().argmax(0)  # first iteration each position was exited
    for b in range(2):
        for p in range(10):
            if halted[-1, b, p]:
                t = int(first[b, p])
                for later in range(t + 1, states.shape[0]):
                    assert torch.equal(states[later, b, p], states[t, b, p])  # frozen
    # the positions that exited first are exactly those under the threshold at that iteration
    in_and_out = torch.cat([cache["recurrent.hook_state_in", 0][None], states])
    r = _relative_residuals(in_and_out)
    assert torch.equal(halted[0], r[0] < threshold)


def test_kl_exit_uses_successive_coda_lens_distributions(model):
    _, cache = model.run_with_cache(ids, n_loops=5, exit="kl", exit_threshold=1e-2)
    states = cache.stack("recurrent.hook_state_out")
    halted = cache.stack("recurrent.hook_halted")
    assert not halted[0].any()  # no previous distribution at the first iteration
    lens = [model.coda_lens(states[t]) for t in range(2)]
    kl = (lens[1].exp() * (lens[1] - lens[0])).sum(-1)
    assert torch.equal(halted[1], kl < 1e-2)


def test_early_exit_does_not_break_with_a_kv_cache(model):
    model(ids, n_loops=6, exit="act", kv_cache={})
    assert model.last_forward["iterations"] == 6
    model(ids, n_loops=6, exit="act")
    assert model.last_forward["iterations"] == 2


@pytest.mark.parametrize("variant", ["tiny-gqa", "tiny-mla"])
@pytest.mark.parametrize("exit", ["fixed", "act", "latent"])
def test_a_prefill_in_chunks_on_a_kv_cache_gives_the_logits_of_one_prefill(variant, exit):
    """Causal: a position's output depends on the positions before it only, so prefilling the
    sequence in two chunks, the second on the first's KV cache, must give the one-shot logits; the
    second chunk's queries see the cached keys and their own up to themselves. Embedding norms
    spread over ~two decades and a random halting head make positions exit at different
    iterations. (`kl` is left out: its lens reads the coda cache of earlier chunks as their final
    states, where one prefill reads their states at the same iteration, a different criterion by
    design.)"""
    torch.manual_seed(0)
    m = LoopedTransformer(LoopedConfig.variant(variant)).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        m.embed.weight.mul_(torch.exp(1.5 * torch.randn(m.cfg.vocab_size, 1, generator=g)))
        m.recurrent.act.halt.weight.normal_(0, 0.3, generator=g)
        m.recurrent.act.halt.bias.fill_(-1.5)
        threshold = None
        if exit == "latent":  # between the two middle residuals of iteration 2: about half exit there
            _, free = m.run_with_cache(ids, n_loops=6, exit="fixed")
            residuals = _relative_residuals(torch.cat([free["recurrent.hook_state_in", 0][None],
                                                       free.stack("recurrent.hook_state_out")]))
            threshold = float(residuals[2].quantile(0.5))
        _, hooked = m.run_with_cache(ids, n_loops=6, exit=exit, exit_threshold=threshold,
                                     names_filter="recurrent.hook_halted")
        whole = m(ids, n_loops=6, exit=exit, exit_threshold=threshold)
        kv: dict = {}
        first = m(ids[:, :4], n_loops=6, exit=exit, exit_threshold=threshold, kv_cache=kv)
        second = m(ids[:, 4:], n_loops=6, exit=exit, exit_threshold=threshold, kv_cache=kv, start_pos=4)
    if exit != "fixed":
        halted = hooked.stack("recurrent.hook_halted")
        assert len(set(halted.sum(0).flatten().tolist())) > 1  # positions exit at different iterations
    # 1e-6 of the logits' scale (~20 here): one float32 rounding step of the chunks' smaller GEMMs
    scale = max(1.0, float(whole.abs().max()))
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, atol=1e-6 * scale, rtol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(exit="sometimes"), "exit must be one of"),
        (dict(n_loops=0), "n_loops must be a positive integer"),
        (dict(n_loops=2.5), "n_loops must be a positive integer"),
        (dict(start_pos=200), "max_seq_len"),
        (dict(exit="latent", exit_threshold=-0.1), "non-negative number"),
        (dict(exit="kl", exit_threshold=float("nan")), "non-negative number"),
        (dict(exit="kl", exit_threshold="1e-3"), "must be a number"),
        (dict(exit="latent", exit_threshold=True), "must be a number"),
        (dict(exit="fixed", exit_threshold=1e-3), "takes no exit_threshold"),
        (dict(exit="act", exit_threshold=0.5), "act_threshold"),
    ],
)
def test_bad_forward_arguments_get_clear_errors(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model(ids, **kwargs)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.tensor([[1, 2, 300]]), "vocab_size=256"),
        (torch.tensor([[-1, 2]]), "vocab_size"),
        (torch.zeros(1, 0, dtype=torch.long), "empty"),
        (torch.zeros(0, 4, dtype=torch.long), "empty batch"),
        (torch.tensor([1, 2, 3]), r"\(batch, seq\)"),
        (torch.tensor([[1.0, 2.0]]), "integer token ids"),
    ],
)
def test_bad_token_ids_get_clear_errors(model, bad, message):
    with pytest.raises(ValueError, match=message):
        model(bad)


def test_generate_refuses_to_run_past_max_seq_len(model):
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(ids, max_new_tokens=200)


@pytest.mark.parametrize("new_tokens", [0, 3])
def test_generate_returns_ids_a_caller_can_edit_and_train_on(model, new_tokens):
    """generate decodes under torch.inference_mode; what it returns must be an ordinary tensor
    (an inference tensor refuses in-place edits and autograd outside that mode)."""
    out = model.generate(ids[:, :4], max_new_tokens=new_tokens, temperature=0)
    assert out.shape == (ids.shape[0], 4 + new_tokens) and not out.is_inference()
    out[:, 0] = 0  # an inference tensor would raise here
    logits = model(out, n_loops=2)
    logits.sum().backward()  # and a forward on it trains
    assert model.embed.weight.grad is not None
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("variant", ["tiny-gqa", "tiny-mla"])
def test_coda_lens_on_a_few_positions_equals_the_full_lens_there(variant):
    torch.manual_seed(0)
    m = LoopedTransformer(LoopedConfig.variant(variant).replace(coda_layers=2)).eval()
    positions = torch.tensor([0, 3, 9])
    with torch.no_grad():
        _, cache = m.run_with_cache(ids, n_loops=3, names_filter="recurrent.hook_state_out")
        h = cache["recurrent.hook_state_out", 1]
        torch.testing.assert_close(m.coda_lens(h, positions), m.coda_lens(h)[:, positions], atol=1e-5, rtol=1e-5)
        kv: dict = {}
        m(ids, n_loops=3, kv_cache=kv)  # then one decode step: the lens reads the cache, never writes it
        keys = {k: v["k"].shape if "k" in v else v["c_kv"].shape for k, v in kv.items()}
        _, cache = m.run_with_cache(ids[:, :1], n_loops=3, kv_cache=kv, start_pos=10,
                                    names_filter="recurrent.hook_state_out")
        h = cache["recurrent.hook_state_out", 2]
        torch.testing.assert_close(m.coda_lens(h, torch.tensor([0])), m.coda_lens(h), atol=1e-5, rtol=1e-5)
        assert kv["coda_0"][next(iter(kv["coda_0"]))].shape[1] == 11 == next(iter(keys.values()))[1] + 1


@pytest.mark.parametrize("positions", [[10], [-11], [0, 12]])
def test_lens_positions_out_of_range_are_refused_not_wrapped(model, positions):
    import mythos_probe

    with pytest.raises(ValueError, match="out of range for a sequence of 10 tokens"):
        with mythos_probe.attach(model, probes=["lens"], lens_positions=positions):
            model(ids, n_loops=2)
