"""Compute cost of a forward: FLOPs executed, the loop's share of them, and the FLOPs the
positions needed (useful).

FLOPs follow Kaplan et al. 2020 ("Scaling Laws for Neural Language Models") §2.1, computed from
the config by `mythos_probe.model.variants.forward_flops` (the one place that counts them).

Executed: a probed forward runs the masked loop (hooks see every position at full shape, see
`model.looped.RecurrentBlock`), so every position runs every executed iteration. Useful: each
position runs only the iterations it used (its exit iteration + 1), what a compacted forward runs
at best. An unprobed forward's executed count is `last_forward["row_iterations"]` (see
`mythos_probe.whatif.verify`).

This module is not: the FLOP formula (`variants.py`) or the what-if's prediction (`whatif.py`).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from mythos_probe.model.config import LoopedConfig
from mythos_probe.model.variants import forward_flops


def forward_cost(cfg: LoopedConfig, batch: int, seq_len: int, iterations: int, n_loops: int,
                 past_len: int = 0, used: Optional[np.ndarray] = None) -> dict[str, float]:
    """Forward metrics `flops` (executed), `loop_flops` (the loop's part), `flops_saved` (share of
    loop FLOPs saved versus n_loops on every position) and, given `used` (B, T) iterations per
    position, `useful_flops`."""
    flops = forward_flops(cfg, batch, seq_len, batch * seq_len * iterations, past_len)
    full = forward_flops(cfg, batch, seq_len, batch * seq_len * n_loops, past_len)
    once = forward_flops(cfg, batch, seq_len, 0, past_len)
    out = {
        "flops": flops,
        "loop_flops": flops - once,
        "flops_saved": 0.0 if full == once else (full - flops) / (full - once),
    }
    if used is not None:
        out["useful_flops"] = forward_flops(cfg, batch, seq_len, float(np.sum(used)), past_len)
    return out


def param_cost(tokens: int, iterations: int, loop_params: int, other_params: int, used=None) -> dict[str, float]:
    """FLOPs of a model described by a `LoopSpec`, which has no config to count from: 2 FLOPs per
    parameter per token (Kaplan et al. 2020 §2.1, attention over the context left out), the looped
    parameters once per iteration. The model declares no loop budget, so no share saved is given."""
    out = {"flops": 2.0 * tokens * (other_params + iterations * loop_params),
           "loop_flops": 2.0 * tokens * iterations * loop_params}
    if used is not None:
        out["useful_flops"] = 2.0 * (tokens * other_params + float(np.sum(used)) * loop_params)
    return out
