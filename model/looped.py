"""The instrumented reference looped transformer, in reading order.

Numerically the OpenMythos architecture (open-mythos 0.5.0, `open_mythos/main.py`): Prelude →
recurrent block looped `n_loops` times with LTI injection `h = A⊙h + B⊙e + block(h, e)`, depth-wise
LoRA and ACT halting → Coda → RMSNorm → head tied to the embedding. Module and parameter names are
those of OpenMythos, so weights move between the two with a plain `load_state_dict`.

What differs, and why:
- every site a probe needs is a TransformerLens `HookPoint`; the ones inside the loop are
  `LoopHookPoint`s that know their iteration, and `run_with_cache` keeps every iteration;
- every block of prelude, loop and coda has TransformerLens's layer sites under its module path
  (`prelude.{i}.hook_resid_pre/mid/post`, `.hook_attn_out`, `.hook_mlp_out`, `.attn.hook_q/k/v`,
  `.attn.hook_attn_scores/pattern/z`, MLA's `.attn.hook_kv_latent`; in the loop
  `recurrent.block.…` per iteration; TransformerLens's `blocks.{i}` is `prelude.{i}`/`coda.{i}`
  here, the names OpenMythos's weights use). They are called only on a forward with a hook on one
  of them (`HookSwitch`, one look per forward), and the attention pattern is formed explicitly
  only while a hook reads it: the fused kernel stays the default path;
- the MoE dispatch sorts token→expert assignments once and runs each expert on a contiguous slice
  (OpenMythos builds a boolean mask per expert per top-k slot and syncs on `mask.any()`);
- attention uses `scaled_dot_product_attention` (fused kernel, native GQA, no K/V expansion);
- exit policies beyond ACT (`fixed`, `kl`, `latent`) chosen per forward; exited positions keep
  their state frozen while the others continue, and stop costing compute: at inference the loop
  gathers the rows still running, computes them and scatters them back (`RecurrentBlock`);
- bfloat16 runs (`model.to(torch.bfloat16)` or autocast): the RoPE tables stay complex64, the ACT
  sums float32.

This module is not: the config (`config.py`), parameter/FLOP counting (`variants.py`) or any
probe (`mythos_probe`). With no hook attached the forward does no tensor work beyond the model's.
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from mythos_probe.metrics.convergence import rel_residual  # the what-if replays `latent` as this metric
from mythos_probe.metrics.lens import kl as kl_divergence  # and `kl` as this one (the lens probe's lens_kl_prev)
from mythos_probe.probes.hooks import (HookSwitch, IterationCache, LoopClock, LoopHookPoint, has_hooks,
                                       watched_globally)
from mythos_probe.model.cache import LoopCache
from mythos_probe.model.budgets import LoopBudget, RowBudgets, check_budgets
from mythos_probe.model.config import LoopedConfig
from mythos_probe.model.queries import Queries, sdpa
from mythos_probe.model.variants import active_parameters

EXIT_POLICIES = ("act", "fixed", "kl", "latent")
DEFAULT_EXIT_THRESHOLDS = {"kl": 1e-3, "latent": 1e-2}  # kl: nats between successive lens dists


def _norm(x: torch.Tensor) -> torch.Tensor:
    """‖x‖ over the last dim: `Tensor.norm`'s kernel without its Python argument parsing, which
    costs more than the kernel at the exit test's sizes (one call per position per iteration)."""
    return torch.linalg.vector_norm(x, dim=-1)


def watched(module: nn.Module) -> bool:
    """Whether a forward hook can see `module`: on it or one of its submodules (probes, `hooks()`,
    `run_with_cache`), a global module hook (`register_module_forward_hook`), which fires on
    every module, or a tool that replaced a submodule's `forward` (nnsight)."""
    if watched_globally():
        return True
    # a plain walk: `modules()` (a generator keeping a memo set) cost more than the rest of the
    # check, once per forward
    stack = [module]
    while stack:
        m = stack.pop()
        if m is None:
            continue
        # a forward replaced on the instance: a tool wraps the module (nnsight's Envoy does) and counts its calls
        if m._forward_hooks or m._forward_pre_hooks or ("forward" in m.__dict__ and not isinstance(m, HookPoint)):
            return True
        stack.extend(m._modules.values())
    return False


# ---------------------------------------------------------------------------------------------
# Norm and RoPE
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fused kernel; same formula as OpenMythos: x * rsqrt(mean(x²) + eps) * weight
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def precompute_rope_freqs(dim: int, max_len: int, theta: float) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)  # (max_len, dim/2) complex64


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x (..., T, H, d) with freqs_cis (T, d/2), or x (N, H, d) with freqs_cis (N, d/2)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], x.shape[-1] // 2, 2))
    return torch.view_as_real(xc * freqs_cis.unsqueeze(-2)).flatten(-2).to(x.dtype)


def _attend(q, k, v, causal: bool, dropout_p: float, enable_gqa: bool = False) -> torch.Tensor:
    """Every query of a full sequence: q (B, H, T, d), k/v (B, Hkv, S, d), causal with the queries
    aligned to the end of k. Selected queries go through `Queries.attend` instead."""
    T, S = q.shape[2], k.shape[2]
    if not causal or T == 1:
        return sdpa(q, k, v, None, dropout_p, enable_gqa)
    if T == S:
        return sdpa(q, k, v, None, dropout_p, enable_gqa, is_causal=True)
    # prefill on top of a cache (OpenMythos cannot do this): query i sees keys ≤ S - T + i
    allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    return sdpa(q, k, v, allowed, dropout_p, enable_gqa)


def _attend_explicit(q, k, v, causal: bool, dropout_p: float, scores_hook: HookPoint,
                     pattern_hook: HookPoint) -> torch.Tensor:
    """`_attend` written out, for hooks on the scores or the pattern (the fused kernel never forms
    them): scores = QKᵀ/√d masked causally (B, H, T, S), pattern = softmax(scores), out = pattern·V.
    Runs only when such a hook is attached; equal to `_attend` up to float rounding."""
    H, T, S = q.shape[1], q.shape[2], k.shape[2]
    if k.shape[1] != H:  # GQA: each key/value head serves H / Hkv query heads
        k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal and T > 1:
        allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        scores = scores.masked_fill(~allowed, float("-inf"))
    pattern = pattern_hook(scores_hook(scores).float().softmax(-1).to(v.dtype))
    return F.dropout(pattern, dropout_p) @ v if dropout_p else pattern @ v


def _hook_point(clock: Optional[LoopClock]) -> HookPoint:
    """A site of a layer: iteration-aware inside the loop (`clock`), plain in prelude and coda."""
    return HookPoint() if clock is None else LoopHookPoint(clock)


class _AttentionSites(nn.Module):
    """The hook points every attention layer has (TransformerLens names). Called only on a
    forward that the model's `HookSwitch` marks hooked, and never for selected queries."""

    def __init__(self, clock: Optional[LoopClock], sites: HookSwitch):
        super().__init__()
        self.sites = sites
        self.hook_q = _hook_point(clock)  # (B, T, H, d) queries as attended (after RoPE)
        self.hook_k = _hook_point(clock)  # (B, S, Hkv, d) keys as attended: cached and new, after RoPE
        self.hook_v = _hook_point(clock)  # (B, S, Hkv, dv) values as attended
        self.hook_attn_scores = _hook_point(clock)  # (B, H, T, S) QKᵀ/√d, masked with -inf
        self.hook_pattern = _hook_point(clock)  # (B, H, T, S) softmax of the scores
        self.hook_z = _hook_point(clock)  # (B, T, H, dv) pattern·V, before the output projection

    def hooked(self, queries: Optional[Queries]) -> bool:
        return self.sites.on and queries is None

    def attend(self, q, k, v, causal: bool, dropout_p: float, enable_gqa: bool) -> torch.Tensor:
        """q (B, T, H, d), k/v (B, S, Hkv, ·) → z (B, T, H, dv), through the hook points; the fused
        kernel unless a hook reads the scores or the pattern."""
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if has_hooks(self.hook_pattern) or has_hooks(self.hook_attn_scores):
            z = _attend_explicit(q, k, v, causal, dropout_p, self.hook_attn_scores, self.hook_pattern)
        else:
            z = _attend(q, k, v, causal, dropout_p, enable_gqa)
        return self.hook_z(z.transpose(1, 2))


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


class GQAttention(_AttentionSites):
    def __init__(self, cfg: LoopedConfig, clock: Optional[LoopClock] = None, sites: Optional[HookSwitch] = None):
        super().__init__(clock, sites or HookSwitch())
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)  # pragma: no mutate (bias=None makes the same bias-free Linear)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)  # pragma: no mutate (bias=None makes the same bias-free Linear)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)  # pragma: no mutate (bias=None makes the same bias-free Linear)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)  # pragma: no mutate (bias=None makes the same bias-free Linear)
        self.dropout_p = cfg.dropout

    def forward(self, x, freqs_cis, causal, kv_cache=None, cache_key="default", queries: Optional[Queries] = None):
        """(B, T, D), or with `queries` only those (N, D): keys and values still cover every
        position and row of x (the loop skips exited positions but caches their keys; the coda lens
        reads a few positions of a full sequence)."""
        B, T, _ = x.shape
        H, d = self.n_heads, self.head_dim
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, d), freqs_cis)
        v = self.wv(x).view(B, T, self.n_kv_heads, d)
        if kv_cache is not None:  # same layout as OpenMythos: RoPE'd keys, (B, S, Hkv, d)
            if cache_key in kv_cache:
                k = torch.cat([kv_cache[cache_key]["k"], k], dim=1)
                v = torch.cat([kv_cache[cache_key]["v"], v], dim=1)
            kv_cache[cache_key] = {"k": k.detach(), "v": v.detach()}
        p, gqa = self.dropout_p if self.training else 0.0, self.n_kv_heads != self.n_heads
        plan = "full" if queries is None else queries.plan(T, k.shape[1])
        if self.hooked(queries):
            q = apply_rope(self.wq(x).view(B, T, H, d), freqs_cis)
            return self.wo(self.attend(q, k, v, causal, p, gqa).flatten(-2))
        if plan == "full":  # every position's query, causal attention, then the wanted ones
            xq = x if queries is None else queries.rows_of(x)
            q = apply_rope(self.wq(xq).view(*xq.shape[:2], H, d), freqs_cis)
            if queries is not None:
                k, v = queries.rows_of(k), queries.rows_of(v)
            out = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, p, gqa).transpose(1, 2)
            out = out if queries is None else out[queries.slot, queries.pos]  # (B, T, H, d) or (N, H, d)
        else:
            q = apply_rope(self.wq(queries.take(x)).view(-1, H, d), freqs_cis[queries.pos])
            out = queries.attend(q, k, v, k.shape[1] - T, causal, p, gqa, plan)  # (N, H, d)
        return self.wo(out.flatten(-2))


class MLAttention(_AttentionSites):
    """Multi-latent attention (DeepSeek-V2): caches the KV latent and the RoPE keys only."""

    def __init__(self, cfg: LoopedConfig, clock: Optional[LoopClock] = None, sites: Optional[HookSwitch] = None):
        super().__init__(clock, sites or HookSwitch())
        self.hook_kv_latent = _hook_point(clock)  # (B, T, kv_lora_rank) this call's KV latent, before the cache
        self.n_heads = cfg.n_heads
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_rope_dim, self.qk_nope_dim, self.v_dim = cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
        self.q_down = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)  # pragma: no mutate (bias=None makes the same bias-free Linear)
        self.q_norm = RMSNorm(cfg.q_lora_rank)
        self.q_up_nope = nn.Linear(cfg.q_lora_rank, cfg.n_heads * cfg.qk_nope_head_dim, bias=False)  # pragma: no mutate (bias=None makes the same bias-free Linear)
        self.q_up_rope = nn.Linear(cfg.q_lora_rank, cfg.n_heads * cfg.qk_rope_head_dim, bias=False)  # pragma: no mutate (bias=None makes the same bias-free Linear)
        self.kv_down = nn.Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)  # pragma: no mutate (bias=None makes the same bias-free Linear)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank)
        self.kv_up = nn.Linear(cfg.kv_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)  # pragma: no mutate (bias=None makes the same bias-free Linear)
        self.wo = nn.Linear(cfg.n_heads * cfg.v_head_dim, cfg.dim, bias=False)  # pragma: no mutate (bias=None makes the same bias-free Linear)
        self.attn_drop = nn.Dropout(cfg.dropout)  # kept for OpenMythos module parity

    def forward(self, x, freqs_cis, causal, kv_cache=None, cache_key="default", queries: Optional[Queries] = None):
        """As `GQAttention.forward`."""
        B, T, _ = x.shape
        H = self.n_heads
        cached = kv_cache[cache_key]["c_kv"].shape[1] if kv_cache is not None and cache_key in kv_cache else 0
        plan = "full" if queries is None else queries.plan(T, cached + T)  # full: every position's query
        if plan != "full":
            xq, fq = queries.take(x), freqs_cis[queries.pos]
        else:
            xq, fq = (x if queries is None else queries.rows_of(x)), freqs_cis
        lead = xq.shape[:-1]  # (B or L, T) or (N,)
        c_q = self.q_norm(self.q_down(xq))
        q_nope = self.q_up_nope(c_q).view(*lead, H, self.qk_nope_dim)
        q_rope = apply_rope(self.q_up_rope(c_q).view(*lead, H, self.qk_rope_dim), fq)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (..., H, nope + rope)

        kv_raw = self.kv_down(x)
        c_kv = kv_raw[..., : self.kv_lora_rank]  # (B, T, rank), cached
        hooked = self.hooked(queries)
        if hooked:
            c_kv = self.hook_kv_latent(c_kv)
        k_rope = kv_raw[..., self.kv_lora_rank :].unsqueeze(2).expand(B, T, H, self.qk_rope_dim)
        k_rope = apply_rope(k_rope.contiguous(), freqs_cis)  # (B, T, H, rope), cached
        if kv_cache is not None:
            if cache_key in kv_cache:
                c_kv = torch.cat([kv_cache[cache_key]["c_kv"], c_kv], dim=1)
                k_rope = torch.cat([kv_cache[cache_key]["k_rope"], k_rope], dim=1)
            kv_cache[cache_key] = {"c_kv": c_kv.detach(), "k_rope": k_rope.detach()}
        if queries is not None and not queries.every_row:  # up-project the latents of the live rows only
            c_kv, k_rope = c_kv[queries.live], k_rope[queries.live]
        Bk, S = c_kv.shape[:2]
        kv = self.kv_up(self.kv_norm(c_kv)).view(Bk, S, H, self.qk_nope_dim + self.v_dim)
        k = torch.cat([kv[..., : self.qk_nope_dim], k_rope], dim=-1)  # (Bk, S, H, nope + rope)
        v = kv[..., self.qk_nope_dim :]  # (Bk, S, H, v)
        p = self.attn_drop.p if self.training else 0.0
        if hooked:
            return self.wo(self.attend(q, k, v, causal, p, False).flatten(-2))
        if plan != "full":
            out = queries.attend(q, k, v, S - T, causal, p, False, plan)  # (N, H, v)
        else:
            out = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, p).transpose(1, 2)
            out = out if queries is None else out[queries.slot, queries.pos]  # (B, T, H, v) or (N, H, v)
        return self.wo(out.flatten(-2))


# ---------------------------------------------------------------------------------------------
# Feed-forward: dense SwiGLU expert and the fine-grained MoE
# ---------------------------------------------------------------------------------------------


class Expert(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)  # pragma: no mutate (bias=None makes the same bias-free Linear)
        self.up = nn.Linear(dim, hidden, bias=False)  # pragma: no mutate (bias=None makes the same bias-free Linear)
        self.down = nn.Linear(hidden, dim, bias=False)  # pragma: no mutate (bias=None makes the same bias-free Linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MoEFFN(nn.Module):
    """DeepSeekMoE FFN: top-k routed experts chosen on `logits + router_bias`, gates from the
    unbiased softmax renormalised over the chosen k (aux-loss-free balancing), plus shared
    experts that always fire."""

    def __init__(self, cfg: LoopedConfig, clock: LoopClock):
        super().__init__()
        self.n_experts, self.n_shared, self.topk = cfg.n_experts, cfg.n_shared_experts, cfg.n_experts_per_tok
        self.router = nn.Linear(cfg.dim, cfg.n_experts, bias=False)  # pragma: no mutate (bias=None makes the same bias-free Linear)
        self.register_buffer("router_bias", torch.zeros(cfg.n_experts))  # moved outside autograd
        self.routed_experts = nn.ModuleList(Expert(cfg.dim, cfg.expert_dim) for _ in range(cfg.n_experts))
        self.shared_experts = nn.ModuleList(
            Expert(cfg.dim, cfg.expert_dim * cfg.n_experts_per_tok) for _ in range(cfg.n_shared_experts)
        )
        self.hook_router_logits = LoopHookPoint(clock)  # (N, E) unbiased, N = B*T
        self.hook_topk_idx = LoopHookPoint(clock)  # (N, k) chosen experts
        self.hook_gates = LoopHookPoint(clock)  # (N, k) renormalised gates
        self.hook_routed_out = LoopHookPoint(clock)  # (N, D)
        self.hook_shared_out = LoopHookPoint(clock)  # (N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D): (B, T, D) or the compacted loop's running positions (N, D)."""
        D = x.shape[-1]
        flat = x.reshape(-1, D)
        logits = self.hook_router_logits(self.router(flat))  # (N, E)
        topk_idx = self.hook_topk_idx((logits + self.router_bias).topk(self.topk, dim=-1).indices)
        gates = logits.softmax(dim=-1).gather(-1, topk_idx)
        gates = self.hook_gates(gates / gates.sum(dim=-1, keepdim=True))  # (N, k)

        # Sorted dispatch: one argsort and one host read of the per-expert counts, then each
        # expert runs on a contiguous slice (no per-expert boolean masks), and the gated results
        # are added back onto their tokens (k = 2, OpenMythos's default: the sum of two is the
        # same in either order; a larger k may round differently in the last bit).
        slots = topk_idx.reshape(-1)  # (N*k,)
        order = slots.argsort(stable=True)
        counts = torch.bincount(slots, minlength=self.n_experts).tolist()
        token = order // self.topk  # the token of each sorted slot
        chunks = flat[token].split(counts)  # tokens grouped by expert
        outs = [expert(chunk) for expert, chunk, n in zip(self.routed_experts, chunks, counts) if n]
        expert_out = torch.cat(outs) * gates.reshape(-1, 1)[order]
        # the experts' dtype, not the input's: under autocast they compute in bf16 from fp32 inputs
        routed = flat.new_zeros(flat.shape[0], D, dtype=expert_out.dtype).index_add_(0, token, expert_out)
        routed = self.hook_routed_out(routed)  # (N, D)
        out = routed
        if self.n_shared:
            shared = self.shared_experts[0](flat)
            for expert in self.shared_experts[1:]:
                shared = shared + expert(flat)
            out = out + self.hook_shared_out(shared)
        return out.view(x.shape)


# ---------------------------------------------------------------------------------------------
# Transformer block, depth-wise LoRA, injection, halting
# ---------------------------------------------------------------------------------------------


class TransformerBlock(nn.Module):
    """Pre-norm attention then FFN, each added to the residual stream. `clock`: the block inside
    the loop (MoE FFN, iteration-aware hook points); `sites`: the model's `HookSwitch`."""

    def __init__(self, cfg: LoopedConfig, clock: LoopClock | None = None, sites: Optional[HookSwitch] = None):
        super().__init__()
        self.sites = sites or HookSwitch()
        self.attn_norm = RMSNorm(cfg.dim)
        self.ffn_norm = RMSNorm(cfg.dim)
        attention = MLAttention if cfg.attn_type == "mla" else GQAttention
        self.attn = attention(cfg, clock, self.sites)
        self.ffn = MoEFFN(cfg, clock) if clock is not None else Expert(cfg.dim, cfg.dense_hidden)
        self.resid_drop = nn.Dropout(cfg.dropout)
        # TransformerLens's residual sites; in the loop the block's stream starts at its normed input
        self.hook_resid_pre = _hook_point(clock)  # (B, T, D)
        self.hook_attn_out = _hook_point(clock)  # (B, T, D) attention output added to the stream
        self.hook_resid_mid = _hook_point(clock)  # (B, T, D)
        self.hook_mlp_out = _hook_point(clock)  # (B, T, D) FFN output added to the stream
        self.hook_resid_post = _hook_point(clock)  # (B, T, D)

    def forward(self, x, freqs_cis, causal, kv_cache=None, cache_key="default", queries: Optional[Queries] = None):
        """(B, T, D), or with `queries` the output at those positions only (N, D)."""
        if self.sites.on and queries is None:
            return self._hooked(x, freqs_cis, causal, kv_cache, cache_key)
        attn = self.attn(self.attn_norm(x), freqs_cis, causal, kv_cache, cache_key, queries)
        x = (x if queries is None else queries.take(x)) + self.resid_drop(attn)
        return x + self.resid_drop(self.ffn(self.ffn_norm(x)))

    def _hooked(self, x, freqs_cis, causal, kv_cache, cache_key):
        """`forward` through the residual hook points (the same sums)."""
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.hook_attn_out(
            self.resid_drop(self.attn(self.attn_norm(x), freqs_cis, causal, kv_cache, cache_key))))
        return self.hook_resid_post(x + self.hook_mlp_out(self.resid_drop(self.ffn(self.ffn_norm(x)))))


class LoRAAdapter(nn.Module):
    """Depth-wise LoRA (Bae et al. 2024): delta(x, t) = (down(x) ⊙ scale[t]) @ B; loops past the
    trained range reuse the last scale."""

    def __init__(self, dim: int, rank: int, max_loops: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)  # pragma: no mutate (bias=None makes the same bias-free Linear)
        self.B = nn.Parameter(torch.randn(rank, dim) * 0.02)
        self.scale = nn.Embedding(max_loops, rank)

    def forward(self, x: torch.Tensor, loop_t: int) -> torch.Tensor:
        s = self.scale.weight[min(loop_t, self.scale.num_embeddings - 1)]  # (rank,)
        return (self.down(x) * s) @ self.B


class LTIInjection(nn.Module):
    """h_{t+1} = A⊙h_t + B⊙e + out with A = exp(-exp(log_dt + log_A)) ∈ (0, 1): ρ(A) < 1 by
    construction (Parcae, Prairie et al. 2026)."""

    def __init__(self, dim: int):
        super().__init__()
        self.log_A = nn.Parameter(torch.zeros(dim))
        self.log_dt = nn.Parameter(torch.zeros(1))
        self.B = nn.Parameter(torch.ones(dim) * 0.1)

    def get_A(self) -> torch.Tensor:
        return torch.exp(-torch.exp((self.log_dt + self.log_A).clamp(-20, 20)))

    def forward(self, h, e, transformer_out):
        return self.inject(self.get_A(), h, e, transformer_out)

    def inject(self, A, h, e, transformer_out):
        """The update with a decay computed beforehand (the loop computes A once per forward)."""
        return A * h + self.B * e + transformer_out


class ACTHalting(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.halt = nn.Linear(dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.halt(h)).squeeze(-1)  # (B, T)


def loop_index_embeddings(n_loops: int, loop_dim: int, dim: int, device, dtype, theta: float = 10000.0):
    """(n_loops, dim): sinusoidal loop-index signal on the first loop_dim channels, all loops at
    once (OpenMythos recomputes it every iteration; the values are the same). Computed in float32
    and cast: in bf16 the angles themselves would round (steps of 1/16 near loop 16)."""
    freqs = 1.0 / (theta ** (torch.arange(0, loop_dim, 2, device=device, dtype=torch.float32) / loop_dim))
    angles = torch.arange(n_loops, device=device, dtype=torch.float32)[:, None] * freqs  # (n, loop_dim/2)
    emb = torch.zeros(n_loops, dim, device=device, dtype=torch.float32)
    emb[:, :loop_dim] = torch.cat([angles.sin(), angles.cos()], dim=-1)[:, :loop_dim]
    return emb.to(dtype)


# ---------------------------------------------------------------------------------------------
# The recurrent block
# ---------------------------------------------------------------------------------------------


class RecurrentBlock(nn.Module):
    """The loop. Exited positions stop costing compute: at an iteration where few enough positions
    still run (`compact_share`), the heavy work runs on those only (`model.queries.Queries`).

    - `kl` / `latent`: an exited position is frozen, so it only needs its keys and values (later
      running positions attend to it, and a KV cache stores them): its Q projection, attention,
      MoE, shared experts, LoRA, halting head and lens are skipped, and positions past the last
      running one of their row are not touched at all (causal; without a KV cache). A row with no
      running position leaves the iteration (in decode: a batch row whose token exited). The
      halting head, read only by hooks under these policies, is not run at all. (Running these
      policies ACT's way, whole rows up to their last running position, was measured slower in
      every case: README, "Measured figures".)
    - `act`: a halted position keeps updating (OpenMythos: its state still feeds the others'
      attention and the cache), so only the rows with a running position run, up to their last
      running position, and only without a KV cache (a cache needs every later loop depth of every
      row and position).

    Outputs equal the masked loop (`compact_below=0`) up to float rounding of the smaller GEMMs.
    Compaction needs an unhooked loop (hooks and probes see every position at full shape, so a
    probed forward runs masked) and runs at inference only (no autograd graph, eval mode).
    """

    # Measured (benchmarks/bench_early_exit.py --rule: one thread, CPU time, the host read and index
    # building included, against the unhooked masked step on the model's own state, median of
    # paired runs): the share of running positions below which the compacted iteration is the
    # faster one grows with the work of a masked step in FLOPs (B·T·2·active parameters), alike
    # for the dim-64 and dim-256 chains models and a random dim-256 one at T=64: 18 MFLOP/step
    # ~40 %, 36M ~47 %, 73M ~63 %, 146M ~75 %, 290M ~83 % (dim 64 at batch 256 and dim 256 at
    # batch 16 alike), 1.1-1.2G ~90 %. The compacted step has a fixed cost (host read, indices,
    # gathers, ~0.5 ms on this CPU) that a larger step wins back sooner, and a smaller one never:
    # whole kl and latent forwards of the dim-64 model at batch 1-8 (1-9 MFLOP/step) ran 5-15 %
    # slower compacting from any share between 20 and 80 % than not compacting at all (`--rule`
    # prints them), and at 18 MFLOP/step (batch 16; dim 256 at batch 1) the two were even.
    # Whole latent and kl forwards at B=256 on the dim-64 model ran 1-2 % slower compacting from
    # 90 or 95 % than at the rule's 82 %.
    MIN_COMPACT_FLOPS = 16e6

    @classmethod
    def compact_share(cls, step_flops: float) -> float:
        """Compact an iteration when fewer than this share of positions run, given the FLOPs of a
        masked step: never below 16 MFLOP, then 0.4, +0.1 per doubling, at most 0.9."""
        if step_flops < cls.MIN_COMPACT_FLOPS:
            return 0.0
        return min(0.9, 0.4 + 0.1 * math.log2(step_flops / cls.MIN_COMPACT_FLOPS))

    def __init__(self, cfg: LoopedConfig, sites: Optional[HookSwitch] = None):
        super().__init__()
        self.cfg = cfg
        self.clock = LoopClock()
        self.block = TransformerBlock(cfg, self.clock, sites)
        self.injection = LTIInjection(cfg.dim)
        self.act = ACTHalting(cfg.dim)
        self.lora = LoRAAdapter(cfg.dim, cfg.lora_rank, cfg.max_loop_iters)
        self.norm = RMSNorm(cfg.dim)
        self.loop_dim = cfg.loop_dim
        self.compact_below: Optional[float] = None  # override of `compact_share` (0: never, > 1: always)
        self.position_flops = 2 * active_parameters(self)  # one position through one iteration (Kaplan)
        self.row_iterations = 0  # rows that ran the block's FFN, summed over the last forward's iterations
        c = self.clock
        self.hook_state_in = LoopHookPoint(c)  # (B, T, D) h entering iteration t
        self.hook_block_out = LoopHookPoint(c)  # (B, T, D) transformer block output
        self.hook_lora_delta = LoopHookPoint(c)  # (B, T, D) depth-wise LoRA delta
        self.hook_state_out = LoopHookPoint(c)  # (B, T, D) h after injection (exited: frozen)
        self.hook_halt_prob = LoopHookPoint(c)  # (B, T) p_t
        self.hook_cum_halt = LoopHookPoint(c)  # (B, T) cumulative p after t
        self.hook_halted = LoopHookPoint(c)  # (B, T) bool, exited after t (any policy)
        self.hook_act_weight = LoopHookPoint(c)  # (B, T) ACT weight of h_t in the output

    def forward(self, h, e, freqs_cis, causal, n_loops, kv_cache=None, exit="act", threshold=None, lens=None,
                budgets: Optional[RowBudgets] = None):
        """Returns (output state (B, T, D), iterations executed). `lens(h, queries=None) ->
        log-probs` (the model's `coda_lens`) is required by the `kl` policy. `budgets`: per-row
        depths and thresholds (`model.budgets`); a row past its max_loops exits like a position the
        policy stopped (and `threshold` is unused)."""
        B, T, D = h.shape
        s = _LoopState(
            h=h, halted=torch.zeros(B, T, device=h.device, dtype=torch.bool),
            # float32 whatever the model's dtype: a bf16 sum of probabilities cannot reach 0.99 exactly
            cumulative_p=torch.zeros(B, T, device=h.device, dtype=torch.float32),
            h_out=torch.zeros_like(h) if exit == "act" else None,
            budgets=budgets,
        )
        # fixed with rows of different depths: a row past its budget exits and can leave the loop
        cut_fixed = exit == "fixed" and budgets is not None and budgets.varied
        loop_emb = loop_index_embeddings(n_loops, self.loop_dim, D, h.device, h.dtype)
        compact_below = self.compact_share(B * T * self.position_flops) if self.compact_below is None else self.compact_below
        hooked = watched(self)  # then masked and with the halting head: hooks see every position and site
        halting = exit == "act" or hooked
        may_compact = (
            (exit != "fixed" or cut_fixed) and compact_below > 0 and not torch.is_grad_enabled() and not self.training
            and (exit != "act" or kv_cache is None) and not hooked
        )
        # nothing has halted before the first iteration; later the host read below keeps track
        # (without it, the freeze always runs)
        s.some_halted = not may_compact
        # the injection's decay, once per forward at inference (OpenMythos recomputes it every
        # iteration; the values are the same). Under autograd the module runs every iteration, so
        # gradients sum as in OpenMythos and as in a probed run, bit for bit; a hooked loop calls
        # the module too, so that its hooks fire.
        s.A = None if hooked or torch.is_grad_enabled() else self.injection.get_A()
        self.row_iterations = 0
        t = 0
        # What is still running, read to the host once per iteration after its step: it decides
        # whether the loop can stop, whether the next step compacts and, if so, on which rows.
        queries = None  # set when the next step compacts
        try:
            for t in range(n_loops):
                self.clock.t = t
                args = (t, loop_emb[t], e, freqs_cis, causal, kv_cache, exit, threshold, lens)
                if queries is not None:
                    if exit == "act":
                        self._act_rows_step(s, queries, *args)
                    else:
                        self._sparse_step(s, queries, *args)
                else:
                    self._dense_step(s, *args, halting=halting)
                    self.row_iterations += B * T
                if (exit == "fixed" and not cut_fixed) or t == n_loops - 1:
                    continue
                if may_compact and exit == "fixed":  # the rows still running are known on the host
                    running = np.repeat(budgets.running_rows(t)[:, None], T, 1)
                    s.some_halted = not running.all()
                    queries = Queries.from_mask(running, h.device) if running.mean() < compact_below else None
                    continue
                if may_compact:
                    # copy=True: on the CPU too, so that the read shows as one op (tests count them)
                    running = (~s.halted).to("cpu", copy=True).numpy()
                    done, s.some_halted = not running.any(), not running.all()
                    if exit == "act":  # the rows still running, up to their last running position
                        cols = running.any(0)
                        extent = T - int(cols[::-1].argmax()) if cols.any() else 0
                        share = running.any(1).sum() * extent / (B * T)
                    else:
                        share = running.mean()
                    queries = Queries.from_mask(running, h.device) if share < compact_below else None
                else:
                    done = kv_cache is None and bool(s.halted.all())
                # With a KV cache every loop depth must run so later steps find their keys.
                if done and kv_cache is None:
                    break
        finally:
            self.clock.t = None
        return (s.h_out if exit == "act" else s.h), t + 1

    def _dense_step(self, s: "_LoopState", t, emb, e, freqs_cis, causal, kv_cache, exit, threshold, lens,
                    halting: bool = True) -> None:
        """One iteration on every row of `s` (exited positions frozen by `torch.where`). `halting`:
        run the halting head, which only ACT and hooks read (an unhooked fixed/kl/latent loop skips it)."""
        cfg = self.cfg
        h = self.hook_state_in(s.h)
        combined = self.norm(h + emb + e)
        trans_out = self.hook_block_out(self.block(combined, freqs_cis, causal, kv_cache, f"recurrent_loop_{t}"))
        trans_out = trans_out + self.hook_lora_delta(self.lora(trans_out, t))
        # the module when something may watch it, else its update with A computed once per forward
        h_new = self.injection(h, e, trans_out) if s.A is None else self.injection.inject(s.A, h, e, trans_out)
        if (exit in ("kl", "latent") or (exit == "fixed" and s.budgets is not None)) and s.some_halted:
            h_new = torch.where(s.halted[..., None], h, h_new)  # exited positions stay frozen
        h_prev, h = h, self.hook_state_out(h_new)

        if halting:
            p = self.hook_halt_prob(self.act(h))
            running = (~s.halted).to(p.dtype)
            if exit == "act":
                # ACT remainder trick, gated so a position contributes once, on its halting step
                remainder = (1.0 - s.cumulative_p).clamp(min=0)
                weight = torch.where(s.cumulative_p + p >= cfg.act_threshold, remainder, p) * running
                s.h_out = s.h_out + weight.unsqueeze(-1).to(h.dtype) * h
            else:
                weight = torch.zeros_like(p)
            s.cumulative_p = self.hook_cum_halt(s.cumulative_p + p * running)
        stop = None  # the policy's decision after this iteration (None: it has none)
        if exit == "act":
            stop = s.cumulative_p >= cfg.act_threshold
        elif exit == "latent":
            value = rel_residual(_norm(h - h_prev), _norm(h))
            stop = value < (threshold if s.budgets is None else s.budgets.thresholds(value))
        elif exit == "kl":
            logp = lens(h)  # (B, T, V)
            if s.prev_logp is not None:
                value = kl_divergence(logp, s.prev_logp)
                stop = value < (threshold if s.budgets is None else s.budgets.thresholds(value))
            s.prev_logp = logp
        if s.budgets is not None:  # min_loops holds the policy back, max_loops stops the row
            stop = s.budgets.gate(stop, t, shape=s.halted.shape)
        halted = s.halted if stop is None else s.halted | stop
        s.halted = self.hook_halted(halted)
        if halting:
            self.hook_act_weight(weight)  # the iteration's last site: probes close the iteration here
        s.h = h

    def _act_rows_step(self, s: "_LoopState", queries: Queries, t, emb, e, freqs_cis, *rest) -> None:
        """ACT on the rows with a running position, up to the last one (`queries.extent`). A halted
        position keeps updating only because later positions of its row attend to it: past the
        last running position nothing reads it again (no KV cache, causal attention), and its
        weighted output is final."""
        live, n = queries.live, queries.extent
        if n == 0:
            return
        if queries.every_row and n == s.h.shape[1]:
            sub = s
        else:
            sub = _LoopState(h=s.h[live, :n], halted=s.halted[live, :n], cumulative_p=s.cumulative_p[live, :n],
                             h_out=s.h_out[live, :n], A=s.A,
                             budgets=None if s.budgets is None else s.budgets.select(live))
        self._dense_step(sub, t, emb, e[live, :n], freqs_cis[:n], *rest)
        self.row_iterations += sub.h.shape[0] * sub.h.shape[1]
        if sub is not s:  # in place: every state tensor is the loop's own after the first (dense) step
            s.h[live, :n], s.h_out[live, :n] = sub.h, sub.h_out
            s.cumulative_p[live, :n], s.halted[live, :n] = sub.cumulative_p, sub.halted

    def _sparse_step(self, s: "_LoopState", queries: Queries, t, emb, e, freqs_cis, causal, kv_cache, exit,
                     threshold, lens) -> None:
        """`kl` / `latent` on the running positions `queries` only (gather, compute, scatter back,
        in place). Keys and values still come from every position of the rows with a running
        position up to the last one, and from every row and position when a KV cache must be filled."""
        if kv_cache is not None:
            h_kv, e_kv, local = s.h, e, queries
        else:
            n = queries.extent
            h_kv, e_kv, freqs_cis = s.h[queries.live, :n], e[queries.live, :n], freqs_cis[:n]
            local = queries.within_live()
        combined = self.norm(h_kv + emb + e_kv)
        blk = self.block  # its forward inlined: compaction runs in eval mode, where its dropouts are identities
        attn = blk.attn(blk.attn_norm(combined), freqs_cis, causal, kv_cache, f"recurrent_loop_{t}", local)  # (N, D)
        if queries.n == 0:
            return  # decode with every token exited: only the cache was written
        x = local.take(combined) + attn
        x = x + blk.ffn(blk.ffn_norm(x))
        self.row_iterations += queries.n
        x = x + self.lora(x, t)
        h_act = queries.take(s.h)
        h_new = self.injection.inject(s.A, h_act, queries.take(e), x)
        s.h[queries.rows, queries.pos] = h_new  # in place: s.h is the loop's own after the first (dense) step
        # no halting head: under kl/latent only hooks read it, and a hooked loop runs masked
        budgets, rows = s.budgets, queries.rows
        if exit == "fixed":  # only a budget stops a row
            stop = budgets.gate(None, t, rows)
        else:
            if exit == "latent":
                value = rel_residual(_norm(h_new - h_act), _norm(h_new))
            else:
                logp = lens(s.h, queries=queries)  # (N, V)
                value = kl_divergence(logp, queries.take(s.prev_logp))
                s.prev_logp[queries.rows, queries.pos] = logp
            stop = value < (threshold if budgets is None else budgets.thresholds(value, rows))
            if budgets is not None:
                stop = budgets.gate(stop, t, rows)
        s.halted[queries.rows, queries.pos] = stop


@dataclass
class _LoopState:
    """What the loop carries from one iteration to the next."""

    h: torch.Tensor  # (B, T, D)
    halted: torch.Tensor  # (B, T) bool
    cumulative_p: torch.Tensor  # (B, T) float32
    h_out: Optional[torch.Tensor] = None  # (B, T, D) ACT's weighted output
    prev_logp: Optional[torch.Tensor] = None  # (B, T, V) kl: the previous lens distribution
    some_halted: bool = True  # False only when the host read says none has: nothing to freeze
    A: Optional[torch.Tensor] = None  # (D,) the injection's decay, once per forward at inference (None: call the module)
    budgets: Optional[RowBudgets] = None  # per-row depths and thresholds (None: the call's n_loops and threshold)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

LAYER_SITES = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post",
               "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores", "attn.hook_pattern",
               "attn.hook_z", "attn.hook_kv_latent")


def _is_layer_site(name: str) -> bool:
    """A site of a prelude, coda or loop block (`prelude.0.attn.hook_q`), guarded by `HookSwitch`."""
    return name.startswith(("prelude.", "coda.", "recurrent.block.")) and name.split(".", 2)[-1] in LAYER_SITES


class LoopedTransformer(HookedRootModule):
    """Prelude → recurrent block × n_loops → Coda → norm → tied head, with hook points at every
    site a probe needs. Same module tree and parameter names as `open_mythos.main.OpenMythos`."""

    def __init__(self, cfg: LoopedConfig):
        super().__init__()
        if not isinstance(cfg, LoopedConfig):
            raise TypeError(
                f"LoopedTransformer takes a LoopedConfig, got {type(cfg).__name__}; "
                "convert a MythosConfig with LoopedConfig.from_mythos_config(cfg)"
            )
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.register_buffer("freqs_cis", precompute_rope_freqs(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta))
        self.register_buffer(
            "freqs_cis_mla", precompute_rope_freqs(cfg.qk_rope_head_dim, cfg.max_seq_len, cfg.rope_theta)
        )
        self.sites = HookSwitch()  # on for a forward with a hook on a layer site (below)
        self.prelude = nn.ModuleList(TransformerBlock(cfg, sites=self.sites) for _ in range(cfg.prelude_layers))
        self.recurrent = RecurrentBlock(cfg, self.sites)
        self.coda = nn.ModuleList(TransformerBlock(cfg, sites=self.sites) for _ in range(cfg.coda_layers))
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)  # pragma: no mutate (bias=None makes the same bias-free Linear)
        self.head.weight = self.embed.weight  # weight tying
        self.hook_embed = HookPoint()  # (B, T, D) token embeddings
        self.hook_encoded = HookPoint()  # (B, T, D) prelude output e, injected every iteration
        self.hook_coda_in = HookPoint()  # (B, T, D) loop output entering the coda
        self.hook_logits = HookPoint()  # (B, T, V)
        self._init_weights()
        self.setup()  # TransformerLens: names every HookPoint after its module path
        # the layer sites the switch guards: hooks on them turn it on for a forward
        self._layer_sites = [hp for name, hp in self.hook_dict.items() if _is_layer_site(name)]

    def _apply(self, fn, recurse=True):
        # The RoPE tables stay complex64 on the model's device: a dtype cast such as
        # model.to(torch.bfloat16) would drop their imaginary part (torch casts complex buffers too).
        tables = {name: self._buffers.pop(name) for name in ("freqs_cis", "freqs_cis_mla")}
        try:
            super()._apply(fn, recurse)
        finally:
            device = self.embed.weight.device
            for name, table in tables.items():
                self._buffers[name] = table.to(device)
        return self

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    # -- forward ----------------------------------------------------------------------------

    def _check_inputs(self, input_ids: torch.Tensor, n_loops, start_pos: int, exit: str, exit_threshold) -> int:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a (batch, seq) tensor of token ids")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids is an empty batch (0 sequences): give at least one sequence")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty: give at least one token")
        if start_pos < 0 or start_pos + input_ids.shape[1] > self.cfg.max_seq_len:
            raise ValueError(
                f"positions {start_pos}..{start_pos + input_ids.shape[1] - 1} exceed max_seq_len={self.cfg.max_seq_len}"
            )
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, vocab_size={self.cfg.vocab_size})")
        if exit not in EXIT_POLICIES:
            raise ValueError(f"exit must be one of {EXIT_POLICIES}, got {exit!r}")
        if exit_threshold is not None:
            if exit == "fixed":
                raise ValueError("exit='fixed' runs every loop and takes no exit_threshold: drop it, or choose "
                                 "exit='kl' or exit='latent'")
            if exit == "act":
                raise ValueError("exit='act' halts at the config's act_threshold and takes no exit_threshold: "
                                 "drop it, or set it with model.cfg.replace(act_threshold=...)")
            if isinstance(exit_threshold, bool) or not isinstance(exit_threshold, numbers.Real):
                raise ValueError(f"exit_threshold must be a number, got {type(exit_threshold).__name__} "
                                 f"{exit_threshold!r}")
            if math.isnan(exit_threshold) or exit_threshold < 0:
                raise ValueError(f"exit_threshold must be a non-negative number (the {exit} criterion stops a "
                                 f"position below it), got {exit_threshold!r}; default {DEFAULT_EXIT_THRESHOLDS[exit]}")
        n_loops = self.cfg.max_loop_iters if n_loops is None else n_loops
        if isinstance(n_loops, bool) or not isinstance(n_loops, int) or n_loops < 1:
            raise ValueError(f"n_loops must be a positive integer, got {n_loops!r}")
        return n_loops

    def _rope(self, start_pos: int, T: int) -> torch.Tensor:
        table = self.freqs_cis_mla if self.cfg.attn_type == "mla" else self.freqs_cis
        return table[start_pos : start_pos + T]

    def coda_lens(self, h: torch.Tensor, positions: Optional[torch.Tensor] = None,
                  queries: Optional[Queries] = None) -> torch.Tensor:
        """Log-probabilities if the loop of the current (or last) forward stopped with state h:
        coda → norm → head. Of every position (B, T, V), of `positions` (seq indices) of every row
        (B, P, V), or of the `queries` (N, V). Reads the forward's KV cache without writing it."""
        ctx = self.last_forward
        B = h.shape[0]
        if positions is not None:
            queries = Queries.grid(B, positions)
        x, cache, freqs = h, ctx["kv_cache"], ctx["freqs_cis"]
        if cache is not None:
            # what the forward found cached: once it has run, the coda's cache also holds this
            # forward's own positions, which the lens would see twice, and later ones before their time
            past = ctx["start_pos"]
            cache = {key: {name: t[:, :past] for name, t in cache[key].items()}
                     for key in (f"coda_{i}" for i in range(len(self.coda))) if key in cache} if past else None
        if queries is not None and not queries.every_row:
            x = h[queries.live]
            if cache is not None:
                cache = {key: {name: t[queries.live] for name, t in cache[key].items()}
                         for key in (f"coda_{i}" for i in range(len(self.coda))) if key in cache}
            if cache is None and queries.extent is not None and queries.extent < h.shape[1]:  # later positions feed no query (causal)
                x, freqs = x[:, : queries.extent], freqs[: queries.extent]
            queries = queries.within_live()
        scratch = dict(cache) if cache is not None else None  # writes go to the copy
        last = len(self.coda) - 1
        sites_on, self.sites.on = self.sites.on, False  # a lens is no forward: the coda's hooks stay quiet
        try:
            for i, layer in enumerate(self.coda):
                # the last layer only needs the wanted queries: their keys see every earlier position
                x = layer(x, freqs, ctx["causal"], scratch, f"coda_{i}", queries if i == last else None)
        finally:
            self.sites.on = sites_on
        if queries is not None and last < 0:
            x = queries.take(x)
        logp = F.log_softmax(self.head(self.norm(x)).float(), dim=-1)
        return logp if positions is None else logp.view(B, positions.numel(), -1)

    def forward(
        self,
        input_ids: torch.Tensor,
        n_loops: Optional[int] = None,
        kv_cache: Optional[dict] = None,
        start_pos: int = 0,
        exit: str = "act",
        exit_threshold: Optional[float] = None,
        budgets: Optional[Sequence[LoopBudget]] = None,
    ) -> torch.Tensor:
        """Logits (B, T, V). `exit`: "act" (OpenMythos behaviour), "fixed" (exactly n_loops,
        output the last state), "kl" (a position stops when KL between successive coda-lens
        distributions < threshold), "latent" (relative residual < threshold).

        `budgets`: one `LoopBudget` per row (max_loops, min_loops, exit_threshold) in place of
        `n_loops` and `exit_threshold`; each row's output is the one it gets run alone with its
        budget, and a row past its max_loops leaves the loop's work (the compaction of exited
        positions). A KV cache built with budgets is read with the same budgets."""
        row_budgets = None
        if budgets is not None:
            if n_loops is not None or exit_threshold is not None:
                raise ValueError("budgets set each row's depth and threshold: drop n_loops and exit_threshold "
                                 "(or pass them and no budgets)")
            if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
                raise ValueError("input_ids must be a (batch, seq) tensor of token ids")
            if exit not in EXIT_POLICIES:
                raise ValueError(f"exit must be one of {EXIT_POLICIES}, got {exit!r}")
            row_budgets = RowBudgets(check_budgets(budgets, input_ids.shape[0], exit),
                                     DEFAULT_EXIT_THRESHOLDS.get(exit), input_ids.device)
            n_loops = row_budgets.n_loops
        n_loops = self._check_inputs(input_ids, n_loops, start_pos, exit, exit_threshold)
        threshold = DEFAULT_EXIT_THRESHOLDS.get(exit) if exit_threshold is None else exit_threshold
        T = input_ids.shape[1]
        freqs_cis = self._rope(start_pos, T)
        causal = T > 1
        self.last_forward = dict(freqs_cis=freqs_cis, causal=causal, kv_cache=kv_cache, start_pos=start_pos,
                                 n_loops=n_loops, exit=exit,
                                 budgets=None if row_budgets is None else row_budgets.budgets)
        # one look per forward at the layer sites' hooks (none: the layers call no hook point)
        self.sites.on = watched_globally() or any(hp._forward_hooks or hp._forward_pre_hooks for hp in self._layer_sites)
        try:
            x = self.hook_embed(self.embed(input_ids))
            for i, layer in enumerate(self.prelude):
                x = layer(x, freqs_cis, causal, kv_cache, f"prelude_{i}")
            e = self.hook_encoded(x)
            lens = self.coda_lens if exit == "kl" else None
            x, iterations = self.recurrent(x, e, freqs_cis, causal, n_loops, kv_cache, exit, threshold, lens, row_budgets)
            self.last_forward["iterations"] = iterations
            self.last_forward["row_iterations"] = self.recurrent.row_iterations  # rows that ran the FFN, Σ over iterations
            x = self.hook_coda_in(x)
            for i, layer in enumerate(self.coda):
                x = layer(x, freqs_cis, causal, kv_cache, f"coda_{i}")
            return self.hook_logits(self.head(self.norm(x)))
        finally:
            self.sites.on = False

    # -- caching every iteration ---------------------------------------------------------

    def run_with_cache(self, *args, names_filter=None, **kwargs):
        """(logits, LoopCache): `cache["site", t]` for every loop iteration t of a loop site,
        `cache["site"]` for the others, and TransformerLens's residual analysis across iterations
        (`model/cache.py`). `names_filter`: a name, a list of names or a predicate on names."""
        if names_filter is None:
            keep = lambda name: True  # noqa: E731
        elif isinstance(names_filter, str):
            keep = lambda name: name == names_filter  # noqa: E731
        elif callable(names_filter):
            keep = names_filter
        else:
            wanted = set(names_filter)
            keep = lambda name: name in wanted  # noqa: E731
        cache = IterationCache()
        hook = cache.caching_hook()
        with self.hooks(fwd_hooks=[(name, hook) for name in self.hook_dict if keep(name)]):
            logits = self(*args, **kwargs)
        call = inspect.signature(self.forward).bind(*args, **kwargs)
        call.apply_defaults()
        # what the analysis and `mythos_probe.from_cache` need to know of the forward
        forward = {**call.arguments, **self.last_forward, "logits": logits.detach()}
        return logits, LoopCache(self, forward, cache._store)

    # -- generation ------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 64,
        n_loops: int = 8,
        temperature: float = 1.0,
        top_k: int = 50,
        exit: str = "act",
        exit_threshold: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        budgets: Optional[Sequence[LoopBudget]] = None,
    ) -> torch.Tensor:
        """KV-cached decoding as OpenMythos: the prompt once, then one token per step.
        temperature=0 decodes greedily. `budgets`: one `LoopBudget` per row for every step, in
        place of n_loops and exit_threshold (see `forward`): a row that reaches its budget leaves
        the step's loop."""
        if budgets is not None:
            if exit_threshold is not None:
                raise ValueError("budgets set each row's threshold: drop exit_threshold (or pass no budgets)")
            n_loops = None
        if max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if input_ids.shape[1] + max_new_tokens > self.cfg.max_seq_len:
            raise ValueError(
                f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={self.cfg.max_seq_len}"
            )
        kv_cache: dict = {}
        prompt_len = input_ids.shape[1]
        # Inference mode skips autograd's per-operator bookkeeping (version counters, view
        # tracking): decoding the shipped model ran ~16 % faster than under no_grad (measured,
        # batch 4, one thread). Its tensors cannot be edited in place outside it, so the ids go
        # back as a normal tensor.
        with torch.inference_mode():
            for step in range(max_new_tokens):
                cur, start = (input_ids, 0) if step == 0 else (input_ids[:, -1:], prompt_len + step - 1)
                logits = self(cur, n_loops=n_loops, kv_cache=kv_cache, start_pos=start, exit=exit,
                              exit_threshold=exit_threshold, budgets=budgets)[:, -1, :]
                if temperature == 0:
                    next_tok = logits.argmax(-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k > 0:
                        v, _ = logits.topk(min(top_k, logits.shape[-1]))
                        logits = logits.masked_fill(logits < v[:, -1:], float("-inf"))
                    next_tok = torch.multinomial(logits.softmax(-1), 1, generator=generator)
                input_ids = torch.cat([input_ids, next_tok], dim=1)
        return input_ids.clone()

    # -- interop with OpenMythos -----------------------------------------------------------

    @classmethod
    def from_open_mythos(cls, om_model: nn.Module) -> "LoopedTransformer":
        """Our model with the same weights (and device and dtype) as an `OpenMythos` model."""
        if not hasattr(om_model, "cfg") or not hasattr(om_model, "recurrent"):
            raise TypeError("from_open_mythos expects an open_mythos.main.OpenMythos model")
        ref = next(om_model.parameters())
        model = cls(LoopedConfig.from_mythos_config(om_model.cfg)).to(ref.device, ref.dtype)  # RoPE tables stay complex
        model.load_state_dict(om_model.state_dict())
        return model.train(om_model.training)

    def to_open_mythos_state_dict(self) -> dict[str, torch.Tensor]:
        """A state dict `OpenMythos(cfg.to_mythos_config()).load_state_dict` accepts as is."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

