"""Parameter and FLOP counts of a `LoopedConfig`, and the `mythos-probe variants` command.

Counts come from the real module tree built on the meta device (no weights allocated), so they
stay true when the model changes. FLOPs follow Kaplan et al. 2020 §2.1: 2 FLOPs per active
parameter per token for the matmuls, plus 2·n_heads·(d_qk + d_v) per token per attended key.

This module is not: the model or the probes; the probes call `forward_flops` for their cost metric.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import lru_cache

from mythos_probe.model.config import VARIANTS, LoopedConfig

HELP = "list model presets with total/active parameters and FLOPs per token per loop"


@dataclass(frozen=True)
class ParamCounts:
    total: int  # every parameter, the tied head once
    active_per_token: int  # with n_experts_per_tok of n_experts routed experts
    once_active: int  # run once per token: embeddings are lookups, so prelude + coda + norm + head
    loop_active: int  # run once per token per loop iteration


def active_parameters(recurrent) -> int:
    """Parameters one position runs through in one iteration of a `RecurrentBlock`: all of them
    but the routed experts, of which it runs n_experts_per_tok of n_experts."""
    cfg = recurrent.cfg
    routed = sum(p.numel() for p in recurrent.block.ffn.routed_experts.parameters())
    return sum(p.numel() for p in recurrent.parameters()) - routed + routed * cfg.n_experts_per_tok // cfg.n_experts


@lru_cache(maxsize=64)
def count_parameters(cfg: LoopedConfig) -> ParamCounts:
    import torch

    from mythos_probe.model.looped import LoopedTransformer

    with torch.device("meta"):
        model = LoopedTransformer(cfg)

    def n(module) -> int:
        return sum(p.numel() for p in module.parameters())

    total = n(model)
    routed = n(model.recurrent.block.ffn.routed_experts)
    routed_active = routed * cfg.n_experts_per_tok // cfg.n_experts
    loop_active = active_parameters(model.recurrent)
    head = model.head.weight.numel()  # tied to the embedding, but a matmul per token
    once_active = n(model.prelude) + n(model.coda) + n(model.norm) + head
    return ParamCounts(
        total=total,
        active_per_token=total - routed + routed_active,
        once_active=once_active,
        loop_active=loop_active,
    )


def _attention_flops_per_key(cfg: LoopedConfig) -> int:
    if cfg.attn_type == "mla":
        return 2 * cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    return 2 * cfg.n_heads * 2 * cfg.head_dim


def flops_per_token_per_loop(cfg: LoopedConfig, context: int = 1) -> int:
    """FLOPs of one loop iteration for one token attending to `context` keys."""
    return 2 * count_parameters(cfg).loop_active + _attention_flops_per_key(cfg) * context


def forward_flops(cfg: LoopedConfig, batch: int, seq_len: int, loop_token_iterations: float,
                  past_len: int = 0) -> float:
    """Estimated FLOPs of one forward: every token through prelude, coda and head once, and
    `loop_token_iterations` (Σ over positions of iterations run) through the loop. Attention
    keys: a causal prefill sees (past_len + (seq_len + 1) / 2) keys on average."""
    p = count_parameters(cfg)
    mean_keys = past_len + (seq_len + 1) / 2
    per_key = _attention_flops_per_key(cfg)
    once_layers = cfg.prelude_layers + cfg.coda_layers
    once = batch * seq_len * (2 * p.once_active + per_key * mean_keys * once_layers)
    loop = loop_token_iterations * (2 * p.loop_active + per_key * mean_keys)
    return float(once + loop)


def lens_flops_per_row(cfg: LoopedConfig, seq_len: int, past_len: int = 0) -> float:
    """FLOPs of one coda-lens readout of one position (coda → norm → head, attending to the mean
    causal context), the price the `kl` exit policy pays per running position per iteration."""
    once = lambda **layers: count_parameters(cfg.replace(**layers)).once_active  # noqa: E731
    coda = once() - once(coda_layers=0)
    norm_head = once(prelude_layers=0, coda_layers=0)
    mean_keys = past_len + (seq_len + 1) / 2
    return float(2 * (coda + norm_head) + _attention_flops_per_key(cfg) * mean_keys * cfg.coda_layers)


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", help="presets to show (default: all)")
    parser.add_argument("--context", type=int, default=1, help="attended keys for the FLOP figure (default 1)")


def run(args: argparse.Namespace) -> int:
    names = args.names or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"unknown variant(s): {', '.join(unknown)}; choose from: {', '.join(VARIANTS)}")
        return 2
    print(f"{'variant':<10}{'attn':>5}{'dim':>7}{'experts':>9}{'loops':>7}{'total':>10}{'active/tok':>12}"
          f"{'FLOPs/tok/loop':>16}")
    for name in names:
        cfg = LoopedConfig.variant(name)
        p = count_parameters(cfg)
        print(f"{name:<10}{cfg.attn_type:>5}{cfg.dim:>7}{cfg.n_experts:>5}/{cfg.n_experts_per_tok:<3}"
              f"{cfg.max_loop_iters:>7}{_human(p.total):>10}{_human(p.active_per_token):>12}"
              f"{_human(flops_per_token_per_loop(cfg, args.context)):>16}")
    return 0
