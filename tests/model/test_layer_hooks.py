"""Layer hook points (TransformerLens names) in prelude, loop and coda, for GQA and MLA: every
site against a hand computation from the weights and the other cached sites, at several
iterations; the cache keeps every iteration; outputs do not change when hooks read the pattern;
a lens or a compacted loop never fires them."""

import pytest
import torch
import torch.nn.functional as F

from mythos_probe.model import LoopedConfig, LoopedTransformer
from mythos_probe.model.looped import LAYER_SITES, apply_rope, loop_index_embeddings

N_LOOPS = 4


def _model(variant: str) -> LoopedTransformer:
    torch.manual_seed(0)
    m = LoopedTransformer(LoopedConfig.variant(variant).replace(prelude_layers=2, coda_layers=2)).eval()
    with torch.no_grad():
        m.recurrent.act.halt.bias.fill_(-30.0)  # never halt: every loop runs
    return m


@pytest.fixture(scope="module", params=["tiny-gqa", "tiny-mla"])
def model(request):
    return _model(request.param)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))


def _blocks(model):
    """(name, block module, iterations or None) of every transformer block of the model."""
    names = [(f"prelude.{i}", b, None) for i, b in enumerate(model.prelude)]
    names.append(("recurrent.block", model.recurrent.block, N_LOOPS))
    names += [(f"coda.{i}", b, None) for i, b in enumerate(model.coda)]
    return names


def _sites(model):
    mla = model.cfg.attn_type == "mla"
    return [s for s in LAYER_SITES if mla or s != "attn.hook_kv_latent"]


def _at(cache, name, t):
    return cache[name] if t is None else cache[name, t]


def _causal_softmax(q, k):
    """softmax(QKᵀ/√d + causal mask) by hand, q (B, T, H, d), k (B, S, Hk, d): (B, H, T, S)."""
    H, Hk = q.shape[2], k.shape[2]
    k = k.repeat_interleave(H // Hk, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / q.shape[-1] ** 0.5
    T, S = q.shape[1], k.shape[1]
    mask = torch.full((T, S), float("-inf")).triu(diagonal=S - T + 1)
    return (scores + mask).softmax(-1)


def test_every_block_has_every_site(model):
    names = set(model.hook_dict)
    for block, _, _ in _blocks(model):
        for site in _sites(model):
            assert f"{block}.{site}" in names
    assert ("prelude.0.attn.hook_kv_latent" in names) == (model.cfg.attn_type == "mla")


def test_sites_match_a_hand_computation_at_every_iteration(model, ids):
    logits_plain = model(ids, n_loops=N_LOOPS, exit="fixed")
    logits, cache = model.run_with_cache(ids, n_loops=N_LOOPS, exit="fixed")
    # the explicit softmax path (hooks on the pattern) gives the fused path's outputs
    torch.testing.assert_close(logits, logits_plain, atol=1e-5, rtol=1e-5)
    rec = model.recurrent
    e = cache["hook_encoded"]
    emb = loop_index_embeddings(N_LOOPS, rec.loop_dim, model.cfg.dim, e.device, e.dtype)
    B, T = ids.shape
    for name, block, iterations in _blocks(model):
        for t in ([None] if iterations is None else [0, 2, 3]):
            c = lambda site: _at(cache, f"{name}.{site}", t)  # noqa: E731
            q, k, v, pattern = c("attn.hook_q"), c("attn.hook_k"), c("attn.hook_v"), c("attn.hook_pattern")
            torch.testing.assert_close(pattern.sum(-1), torch.ones(B, q.shape[2], T))
            torch.testing.assert_close(pattern, _causal_softmax(q, k), atol=1e-6, rtol=1e-5)
            assert (pattern.triu(diagonal=1) == 0).all()  # causal: no weight on a later position
            vv = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
            z = torch.einsum("bhts,bshd->bthd", pattern, vv)
            torch.testing.assert_close(c("attn.hook_z"), z, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(c("hook_attn_out"), block.attn.wo(z.flatten(-2)), atol=1e-6, rtol=1e-5)
            pre = c("hook_resid_pre")
            torch.testing.assert_close(c("hook_resid_mid"), pre + c("hook_attn_out"))
            torch.testing.assert_close(c("hook_mlp_out"), block.ffn(block.ffn_norm(c("hook_resid_mid"))))
            torch.testing.assert_close(c("hook_resid_post"), c("hook_resid_mid") + c("hook_mlp_out"))
            x = block.attn_norm(pre)
            if model.cfg.attn_type == "gqa":
                freqs = model.freqs_cis[:T]
                d = block.attn.head_dim
                torch.testing.assert_close(q, apply_rope(block.attn.wq(x).view(B, T, -1, d), freqs))
                torch.testing.assert_close(k, apply_rope(block.attn.wk(x).view(B, T, -1, d), freqs))
                torch.testing.assert_close(v, block.attn.wv(x).view(B, T, -1, d))
            else:
                a = block.attn
                latent = c("attn.hook_kv_latent")
                torch.testing.assert_close(latent, a.kv_down(x)[..., : a.kv_lora_rank])
                kv = a.kv_up(a.kv_norm(latent)).view(B, T, a.n_heads, -1)
                torch.testing.assert_close(v, kv[..., a.qk_nope_dim:])
                torch.testing.assert_close(k[..., : a.qk_nope_dim], kv[..., : a.qk_nope_dim])
            if name == "recurrent.block":
                # the loop's block stream starts at the normed input and ends at the block output
                h_in = cache["recurrent.hook_state_in", t]
                torch.testing.assert_close(pre, rec.norm(h_in + emb[t] + e))
                torch.testing.assert_close(c("hook_resid_post"), cache["recurrent.hook_block_out", t])
    # the stream runs through the layers: each block's output is the next one's input
    torch.testing.assert_close(cache["prelude.0.hook_resid_pre"], cache["hook_embed"])
    torch.testing.assert_close(cache["prelude.1.hook_resid_pre"], cache["prelude.0.hook_resid_post"])
    torch.testing.assert_close(cache["hook_encoded"], cache["prelude.1.hook_resid_post"])
    torch.testing.assert_close(cache["coda.0.hook_resid_pre"], cache["hook_coda_in"])
    final = model.head(model.norm(cache["coda.1.hook_resid_post"]))
    torch.testing.assert_close(final, logits)


def test_cache_keeps_every_iteration_of_every_layer_site(model, ids):
    wanted = [f"recurrent.block.{s}" for s in _sites(model)] + ["coda.0.attn.hook_pattern"]
    _, cache = model.run_with_cache(ids, n_loops=N_LOOPS, exit="fixed", names_filter=wanted)
    assert cache.sites() == set(wanted)
    for site in wanted[:-1]:
        assert cache.iterations(site) == N_LOOPS, site
    patterns = cache.stack("recurrent.block.attn.hook_pattern")
    assert not torch.equal(patterns[0], patterns[-1])  # distinct iterations, not one call kept four times


def test_pattern_with_a_kv_cache_covers_cached_keys():
    model = _model("tiny-gqa")
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    more = torch.randint(0, 256, (1, 3), generator=torch.Generator().manual_seed(3))
    kv = {}
    model(prompt, n_loops=2, kv_cache=kv, exit="fixed")
    expected = model(more, n_loops=2, kv_cache=dict(kv), start_pos=5, exit="fixed")
    logits, cache = model.run_with_cache(more, n_loops=2, kv_cache=kv, start_pos=5, exit="fixed",
                                         names_filter=lambda n: n.startswith("coda.0.attn"))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    q, k, pattern = cache["coda.0.attn.hook_q"], cache["coda.0.attn.hook_k"], cache["coda.0.attn.hook_pattern"]
    assert pattern.shape == (1, 4, 3, 8) and k.shape[1] == 8
    torch.testing.assert_close(pattern, _causal_softmax(q, k), atol=1e-6, rtol=1e-5)
    assert (pattern[0, :, 0, 6:] == 0).all() and (pattern[0, :, 0, :6] > 0).all()  # query 5 sees keys 0..5


def test_lens_calls_never_fire_the_coda_sites(ids):
    model = _model("tiny-gqa")
    seen = []
    model.run_with_hooks(ids, n_loops=3, exit="kl", exit_threshold=0.0,
                         fwd_hooks=[("coda.0.hook_resid_pre", lambda x, hook: seen.append(x.shape))])
    # the kl policy runs the coda lens every iteration; only the forward's own coda call fires
    assert seen == [torch.Size([2, 7, 64])]
    assert model.sites.on is False


def test_hooks_on_layer_sites_can_patch(ids):
    model = _model("tiny-mla")
    clean = model(ids, n_loops=3, exit="fixed")

    def zero_head_0(z, hook):
        if hook.iteration == 1:
            z = z.clone()
            z[:, :, 0] = 0
            return z

    patched = model.run_with_hooks(ids, n_loops=3, exit="fixed",
                                   fwd_hooks=[("recurrent.block.attn.hook_z", zero_head_0)])
    assert not torch.allclose(patched, clean)
    again = model.run_with_hooks(ids, n_loops=3, exit="fixed",
                                 fwd_hooks=[("recurrent.block.attn.hook_z", lambda z, hook: None)])
    torch.testing.assert_close(again, clean, atol=1e-5, rtol=1e-5)
