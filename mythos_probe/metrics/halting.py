"""ACT halting statistics.

Halting probability p_t, its cumulative sum, the remainder R and the ponder cost N + R follow
Graves 2016 ("Adaptive Computation Time for Recurrent Neural Networks") §2–3, with OpenMythos's
gating of halted positions (`RecurrentBlock.forward`). Saturation shares (p < 0.01, p > 0.99,
halting at the first step, never halting) are the failure modes discussed by Banino et al. 2021
("PonderNet") §4.
"""

from __future__ import annotations

import torch


def act_step(p: torch.Tensor, cumulative: torch.Tensor, halted: torch.Tensor, threshold: float):
    """One ACT step exactly as OpenMythos: returns (weight, new cumulative, new halted)."""
    running = (~halted).to(p.dtype)
    remainder = (1.0 - cumulative).clamp(min=0)
    weight = torch.where(cumulative + p >= threshold, remainder, p) * running
    cumulative = cumulative + p * running
    return weight, cumulative, halted | (cumulative >= threshold)


def saturation(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position flags (p < 0.01, p > 0.99); their means are the saturation shares."""
    return p < 0.01, p > 0.99


def iterations_used(halted: torch.Tensor) -> torch.Tensor:
    """(I, B, T) halted-after-iteration masks → (B, T) iterations each position used: its first
    halting iteration + 1, or I when it never halted."""
    I = halted.shape[0]
    ever = halted.any(0)
    first = halted.float().argmax(0)  # first True, 0 when none
    return torch.where(ever, first + 1, torch.full_like(first, I)).long()


def ponder(cum_halt: torch.Tensor, used: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position (N + R, R): N iterations used, R = 1 − Σ_{t<N−1} p_t, the remainder given
    to the last state (Graves 2016 eq. 9–10). cum_halt: (I, B, T); used: (B, T)."""
    before_last = torch.where(
        used >= 2,
        cum_halt.gather(0, (used - 2).clamp(min=0)[None]).squeeze(0),
        torch.zeros_like(cum_halt[0]),
    )
    remainder = (1.0 - before_last).clamp(min=0)
    return used.to(remainder.dtype) + remainder, remainder
