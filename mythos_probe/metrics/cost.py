"""Compute cost of a forward: iterations actually run and estimated FLOPs.

FLOPs follow Kaplan et al. 2020 ("Scaling Laws for Neural Language Models") §2.1, computed from
the config by `mythos_probe.model.variants.forward_flops` (the one place that counts them).
"""

from __future__ import annotations

from mythos_probe.model.config import LoopedConfig
from mythos_probe.model.variants import forward_flops


def forward_cost(cfg: LoopedConfig, batch: int, seq_len: int, iterations: int, n_loops: int,
                 past_len: int = 0) -> tuple[float, float]:
    """(estimated FLOPs, share of loop FLOPs saved versus n_loops). Every position runs every
    executed iteration (halted positions keep computing so others can attend to them)."""
    flops = forward_flops(cfg, batch, seq_len, batch * seq_len * iterations, past_len)
    full = forward_flops(cfg, batch, seq_len, batch * seq_len * n_loops, past_len)
    once = forward_flops(cfg, batch, seq_len, 0, past_len)
    saved = 0.0 if full == once else (full - flops) / (full - once)
    return flops, saved


def param_cost(tokens: int, iterations: int, loop_params: int, other_params: int) -> tuple[float, float]:
    """(FLOPs, 0.0) for a model described by a `LoopSpec`, which has no config to count from:
    2 FLOPs per parameter per token (Kaplan et al. 2020 §2.1, attention over the context left
    out), the looped parameters once per iteration. The model declares no loop budget, so no
    share is saved against one."""
    return 2.0 * tokens * (other_params + iterations * loop_params), 0.0
