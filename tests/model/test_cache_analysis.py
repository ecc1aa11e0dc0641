"""`LoopCache` residual analysis across iterations, against hand computations from the cached
sites and the model's weights: components sum to the residual at every iteration and at the end
(ACT's weighted output, positions frozen by a latent exit), normed parts sum to the normed
residual, logit attributions sum to the logit difference, accumulated residuals are the states."""

import pytest
import torch

from mythos_probe.model import LoopedConfig, LoopedTransformer
from mythos_probe.metrics.convergence import rel_residual

N_LOOPS = 5


def _model(variant: str) -> LoopedTransformer:
    torch.manual_seed(0)
    m = LoopedTransformer(LoopedConfig.variant(variant).replace(prelude_layers=2, coda_layers=2,
                                                                  max_loop_iters=N_LOOPS)).eval()
    with torch.no_grad():
        m.recurrent.act.halt.bias.fill_(-1.0)  # ACT: positions halt at different iterations
    return m


@pytest.fixture(scope="module", params=["tiny-gqa", "tiny-mla"])
def model(request):
    return _model(request.param)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(4))


def _latent_threshold(model, ids):
    """A latent threshold at which some positions freeze after iteration 1 and others run on."""
    _, full = model.run_with_cache(ids, n_loops=N_LOOPS, exit="fixed")
    h1, h0 = full["recurrent.hook_state_out", 1], full["recurrent.hook_state_out", 0]
    r = rel_residual((h1 - h0).norm(dim=-1), h1.norm(dim=-1))
    return float(r.flatten().median())


def _runs(model, ids):
    yield "act", model.run_with_cache(ids, n_loops=N_LOOPS, exit="act")
    yield "fixed", model.run_with_cache(ids, n_loops=N_LOOPS, exit="fixed")
    yield "latent", model.run_with_cache(ids, n_loops=N_LOOPS, exit="latent",
                                         exit_threshold=_latent_threshold(model, ids))


def test_components_sum_to_the_residual_at_every_iteration(model, ids):
    for exit, (logits, cache) in _runs(model, ids):
        n = cache.n_iterations()
        assert n == N_LOOPS or (exit == "latent" and n >= 3), exit  # latent: may stop once every position froze
        if exit == "latent":  # the property must be able to show: some frozen, some running
            halted = cache["recurrent.hook_halted", 1]
            assert halted.any() and not halted.all()
        if exit == "act":
            weights = cache.stack("recurrent.hook_act_weight")
            assert (weights[1:] > 0).any() and not torch.allclose(weights[-1], weights[0])
        for t in range(n):
            stack, labels = cache.decompose_resid(iteration=t, return_labels=True)
            assert len(labels) == 1 + 2 * 2 + 5 * (t + 1)
            torch.testing.assert_close(stack.sum(0), cache["recurrent.hook_state_out", t], atol=2e-5, rtol=1e-5)
        stack, labels = cache.decompose_resid(return_labels=True)
        assert labels[0] == "embed" and labels[-1] == "coda.1.mlp_out" and f"loop.{n - 1}.lora" in labels
        torch.testing.assert_close(stack.sum(0), cache["coda.1.hook_resid_post"], atol=2e-5, rtol=1e-5)
        # normed parts sum to the normed residual
        normed = cache.decompose_resid(apply_ln=True)
        torch.testing.assert_close(normed.sum(0), model.norm(cache["coda.1.hook_resid_post"]), atol=2e-5, rtol=1e-5)


def test_decompose_modes_select_components(model, ids):
    _, cache = model.run_with_cache(ids, n_loops=3, exit="fixed")
    full, labels = cache.decompose_resid(return_labels=True)
    for mode in ("attn", "mlp"):
        part, kept = cache.decompose_resid(mode=mode, incl_embeds=False, return_labels=True)
        assert kept == [k for k in labels if k.endswith(f".{mode}_out")] and len(kept) == 2 + 3 + 2
        torch.testing.assert_close(part, full[[labels.index(k) for k in kept]])
    with pytest.raises(ValueError, match="mode must be"):
        cache.decompose_resid(mode="heads")
    with pytest.raises(ValueError, match="in 0..2"):
        cache.decompose_resid(iteration=3)


def test_logit_attrs_sum_to_the_logit_difference(model, ids):
    logits, cache = model.run_with_cache(ids, n_loops=N_LOOPS, exit="act")
    top2 = logits.topk(2, dim=-1).indices
    right, wrong = top2[..., 0], top2[..., 1]  # (B, T)
    stack = cache.decompose_resid()
    attrs = cache.logit_attrs(stack, right, wrong)
    assert attrs.shape == (stack.shape[0], 2, 7)
    diff = logits.gather(-1, right[..., None]) - logits.gather(-1, wrong[..., None])
    torch.testing.assert_close(attrs.sum(0), diff[..., 0], atol=1e-4, rtol=1e-4)
    # one token per example, every position
    tok = torch.tensor([3, 17])
    attrs = cache.logit_attrs(stack, tok)
    torch.testing.assert_close(attrs.sum(0), logits[..., [3, 17]].diagonal(dim1=0, dim2=2).T, atol=1e-4, rtol=1e-4)
    # at an iteration: the direct path norm(h_t)·W_U
    W = model.head.weight
    for t in (0, 3):
        h = cache["recurrent.hook_state_out", t]
        direct = model.norm(h) @ W.T
        attrs = cache.logit_attrs(cache.decompose_resid(iteration=t), 5, 9, iteration=t)
        torch.testing.assert_close(attrs.sum(0), direct[..., 5] - direct[..., 9], atol=1e-4, rtol=1e-4)
    # a position slice: the last position only
    attrs = cache.logit_attrs(cache.decompose_resid(pos_slice=-1), right[:, -1], wrong[:, -1], pos_slice=-1)
    torch.testing.assert_close(attrs.sum(0), diff[:, -1, 0], atol=1e-4, rtol=1e-4)


def test_accumulated_resid_is_the_stream_at_each_point(model, ids):
    _, cache = model.run_with_cache(ids, n_loops=N_LOOPS, exit="act")
    stack, labels = cache.accumulated_resid(return_labels=True)
    assert labels == ["embed", "prelude.0", "prelude.1"] + [f"loop.{t}" for t in range(N_LOOPS)] + [
        "coda_in", "coda.0", "coda.1"]
    torch.testing.assert_close(stack[2], cache["hook_encoded"])
    torch.testing.assert_close(stack[3 + 2], cache["recurrent.hook_state_out", 2])
    torch.testing.assert_close(stack[-1], cache["coda.1.hook_resid_post"])
    mid, mid_labels = cache.accumulated_resid(iteration=1, incl_mid=True, return_labels=True)
    assert mid_labels == ["embed", "prelude.0.mid", "prelude.0", "prelude.1.mid", "prelude.1", "loop.0", "loop.1"]
    torch.testing.assert_close(mid[1], cache["prelude.0.hook_resid_mid"])
    lens = cache.accumulated_resid(apply_ln=True, pos_slice=[0, 6])
    assert lens.shape == (len(labels), 2, 2, 64)
    torch.testing.assert_close(lens[4], model.norm(cache["recurrent.hook_state_out", 1][:, [0, 6]]))
    # the final entry through the head is the model's output
    torch.testing.assert_close(model.head(cache.accumulated_resid(apply_ln=True)[-1]), cache["hook_logits"])


def test_analysis_names_the_missing_site(model, ids):
    _, cache = model.run_with_cache(ids, n_loops=2, names_filter=["recurrent.hook_state_out"])
    with pytest.raises(KeyError, match="hook_embed.*names_filter"):
        cache.accumulated_resid()
