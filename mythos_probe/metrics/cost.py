"""Compute cost of a forward: FLOPs executed, the loop's share of them, and the FLOPs the
positions needed (useful).

FLOPs follow Kaplan et al. 2020 ("Scaling Laws for Neural Language Models") §2.1, computed from
the config by `mythos_probe.model.variants.forward_flops` (the one place that counts them).

Executed: a probed forward runs the masked loop (hooks see every position at full shape, see
`model.looped.RecurrentBlock`), so every position runs every executed iteration. Useful: each
position runs only the iterations it used (its exit iteration + 1), what a compacted forward runs
at best. What an unprobed (compacted) forward really executes is counted at the dispatcher, not
modeled: `mythos_probe.executed_flops.ExecutedFlops`, as `mythos_probe.whatif.verify` does.
Lens: the FLOPs of one coda-lens readout of every position
(`lens_flops_per_row`), what an exit policy that reads the lens (`kl`; the what-if's `entropy`
and `argmax_stable`) pays per running position per iteration on top of the loop; the what-if
subtracts it from what such a policy saves. `flops` itself is the loop and the one coda pass,
lens readouts not included.

A model described by a `LoopSpec` (`param_cost`) has no config that says which parameters its
readout uses, so it records no `lens_flops` (the store reads NULL): the what-if then gives NaN
FLOPs saved for the lens criteria rather than a saving that ignores their cost.

This module is not: the FLOP formula (`variants.py`) or the what-if's prediction (`whatif.py`).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from mythos_probe.model.config import LoopedConfig
from mythos_probe.model.variants import forward_flops, lens_flops_per_row


def forward_cost(cfg: LoopedConfig, batch: int, seq_len: int, iterations: int, n_loops: int,
                 past_len: int = 0, used: Optional[np.ndarray] = None) -> dict[str, float]:
    """Forward metrics `flops` (executed), `loop_flops` (the loop's part), `flops_saved` (share of
    loop FLOPs saved versus n_loops on every position), `lens_flops` (one coda-lens readout of
    every position) and, given `used` (B, T) iterations per position, `useful_flops`."""
    flops = forward_flops(cfg, batch, seq_len, batch * seq_len * iterations, past_len)
    full = forward_flops(cfg, batch, seq_len, batch * seq_len * n_loops, past_len)
    once = forward_flops(cfg, batch, seq_len, 0, past_len)
    out = {
        "flops": flops,
        "loop_flops": flops - once,
        "flops_saved": 0.0 if full == once else (full - flops) / (full - once),
        "lens_flops": batch * seq_len * lens_flops_per_row(cfg, seq_len, past_len),
    }
    if used is not None:
        out["useful_flops"] = forward_flops(cfg, batch, seq_len, float(np.sum(used)), past_len)
    return out


def param_cost(tokens: int, iterations: int, loop_params: int, other_params: int, used=None) -> dict[str, float]:
    """FLOPs of a model described by a `LoopSpec`, which has no config to count from: 2 FLOPs per
    parameter per token (Kaplan et al. 2020 §2.1, attention over the context left out), the looped
    parameters once per iteration. The model declares no loop budget, so no share saved is given,
    nor which parameters a lens readout uses, so no `lens_flops` (see the module docstring)."""
    out = {"flops": 2.0 * tokens * (other_params + iterations * loop_params),
           "loop_flops": 2.0 * tokens * iterations * loop_params}
    if used is not None:
        out["useful_flops"] = 2.0 * (tokens * other_params + float(np.sum(used)) * loop_params)
    return out
