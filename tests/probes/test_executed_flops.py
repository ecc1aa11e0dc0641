"""ExecutedFlops against FLOPs counted by hand: single operators, then a whole forward of the
model's true recurrence from its config's dimensions, and that counting leaves the forward as it
runs unobserved (compacted)."""

import pytest
import torch
import torch.nn.functional as F

from mythos_probe.executed_flops import ExecutedFlops
from mythos_probe.model import LoopedConfig, LoopedTransformer


def counted(fn):
    with torch.no_grad(), ExecutedFlops() as c:
        fn()
    return c


def test_matmuls_count_two_flops_per_multiply_add():
    x = torch.randn(2, 5, 16)
    assert counted(lambda: F.linear(x, torch.randn(8, 16))).by_op == {"mm": 2 * 10 * 16 * 8}
    assert counted(lambda: torch.nn.Linear(16, 3)(x)).by_op == {"addmm": 2 * 10 * 16 * 3}
    assert counted(lambda: torch.randn(4, 5, 6) @ torch.randn(4, 6, 7)).total == 2 * 4 * 5 * 6 * 7
    assert counted(lambda: (x * 2).relu().softmax(-1)).total == 0  # elementwise: not counted (Kaplan)


def test_an_operator_without_a_formula_is_named_not_silently_left_out():
    with pytest.warns(UserWarning, match=r"no FLOP formula for convolution ×1, mv ×1.*undercounts") as caught:
        c = counted(lambda: (F.conv1d(torch.randn(1, 2, 5), torch.randn(3, 2, 2)), torch.randn(3, 4) @ torch.randn(4)))
    assert caught[0].filename == __file__  # the `with` that counted, not executed_flops.py
    assert c.total == 0 and c.not_counted == {"convolution": 1, "mv": 1}


@pytest.mark.parametrize("gqa", [False, True])
def test_attention_counts_the_attended_pairs(gqa):
    B, H, T, d = 2, 4, 6, 8
    q = torch.randn(B, H, T, d)
    k = v = torch.randn(B, 2 if gqa else H, T, d)
    per_pair = 2 * (d + d)
    full = counted(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa))
    assert full.by_op == {"attention": B * H * T * T * per_pair}
    causal = counted(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa))
    assert causal.by_op == {"attention": B * H * (T * (T + 1) // 2) * per_pair}
    longer = torch.randn(B, k.shape[1], T + 3, d)  # 3 more keys than queries: torch aligns is_causal top-left
    assert counted(lambda: F.scaled_dot_product_attention(q, longer, longer, is_causal=True, enable_gqa=gqa)).by_op == {
        "attention": B * H * (T * (T + 1) // 2) * per_pair}
    mask = torch.rand(B, 1, T, T) < 0.5
    mask[..., 0] = True  # every query sees a key
    masked = counted(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa))
    assert masked.by_op == {"attention": int(mask.sum()) * H * per_pair}
    shorter = torch.randn(B, k.shape[1], T - 2, d)  # 2 fewer keys: the last queries see all of them
    assert counted(lambda: F.scaled_dot_product_attention(q, shorter, shorter, is_causal=True, enable_gqa=gqa)).by_op == {
        "attention": B * H * sum(min(i + 1, T - 2) for i in range(T)) * per_pair}
    # an additive float mask: every finite entry is attended, however negative (a bias such as ALiBi)
    bias = torch.randn(B, 1, T, T).masked_fill(~mask, float("-inf")) - 5.0
    biased = counted(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=gqa))
    assert biased.by_op == {"attention": int(mask.sum()) * H * per_pair}


def test_a_causal_prefill_on_top_of_a_cache_counts_the_keys_each_query_sees():
    from mythos_probe.model.looped import _attend

    q, kv = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 7, 8)  # 3 new queries after 4 cached keys
    c = counted(lambda: _attend(q, kv, kv, causal=True, dropout_p=0.0))
    assert c.total == 2 * (5 + 6 + 7) * 2 * (8 + 8)


def hand_count(cfg: LoopedConfig, B: int, T: int, loops: int) -> int:
    """Matmul and attention FLOPs of an unhooked `exit="fixed"` forward, from the dimensions, per
    token: every block's attention projections; the prelude and coda blocks' dense SwiGLU; the
    loop's router, k routed experts, shared expert (k experts wide) and depth-wise LoRA (the
    halting head is not run); the head once. Attention: the causal pairs of every block, at
    2·(d_qk + d_v) per pair and head (MLA's values are zero-padded to d_qk for the fused kernel)."""
    D, H = cfg.dim, cfg.n_heads
    if cfg.attn_type == "mla":
        d_qk = d_v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        attention = D * cfg.q_lora_rank + cfg.q_lora_rank * H * d_qk + D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        attention += cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim) + H * cfg.v_head_dim * D
    else:
        d_qk = d_v = cfg.head_dim
        attention = D * H * d_qk + 2 * D * cfg.n_kv_heads * d_qk + H * d_v * D
    moe = D * cfg.n_experts + 3 * D * cfg.expert_dim * cfg.n_experts_per_tok * (1 + cfg.n_shared_experts)
    dense = 3 * D * cfg.dense_hidden  # prelude and coda blocks have a dense SwiGLU, not the MoE
    lora = 2 * D * cfg.lora_rank
    layers = cfg.prelude_layers + cfg.coda_layers
    per_token = layers * (attention + dense) + loops * (attention + moe + lora) + D * cfg.vocab_size
    pairs = B * H * T * (T + 1) // 2 * (layers + loops)
    return 2 * B * T * per_token + pairs * 2 * (d_qk + d_v)


@pytest.mark.parametrize("variant", ["tiny-gqa", "tiny-mla"])
def test_a_full_depth_forward_counts_what_the_recurrence_runs(variant):
    cfg = LoopedConfig.variant(variant)
    torch.manual_seed(0)
    model = LoopedTransformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 10))
    assert counted(lambda: model(ids, n_loops=5, exit="fixed")).total == hand_count(cfg, 3, 10, 5)


def test_counting_leaves_the_compacted_forward_as_it_runs_unobserved():
    # torch's FlopCounterMode installs global module hooks, which make the loop run masked (hooks
    # see every position): it would count another forward than the one timed
    cfg = LoopedConfig.variant("tiny-gqa")
    torch.manual_seed(0)
    model = LoopedTransformer(cfg).eval()
    with torch.no_grad():  # positions settle at different iterations
        model.recurrent.injection.log_A.normal_(0, 1)
        model.recurrent.lora.scale.weight.normal_(0, 1)
    model.recurrent.compact_below = 2.0
    ids = torch.randint(0, cfg.vocab_size, (3, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(ids, n_loops=8, exit="latent", exit_threshold=0.1)
        rows = model.last_forward["row_iterations"]
        c = counted(lambda: model(ids, n_loops=8, exit="latent", exit_threshold=0.1))
        assert model.last_forward["row_iterations"] == rows < 30 * model.last_forward["iterations"]
        assert torch.equal(model(ids, n_loops=8, exit="latent", exit_threshold=0.1), plain)
    assert 0 < c.total < hand_count(cfg, 3, 10, model.last_forward["iterations"])
