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
    running = ~halted  # bool: p * running keeps p's dtype
    remainder = (1.0 - cumulative).clamp(min=0)
    weight = torch.where(cumulative + p >= threshold, remainder, p) * running
    cumulative = cumulative + p * running
    return weight, cumulative, halted | (cumulative >= threshold)


def saturation(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position flags (p < 0.01, p > 0.99); their means are the saturation shares."""
    return p < 0.01, p > 0.99


def first_halt(halted: torch.Tensor, halt_iter: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Streaming form of "the iteration each position halted": given the halted mask after
    iteration t and halt_iter (B, T) (t' + 1 where the position first halted at t', 0 while it
    runs), returns (newly halted at t, updated halt_iter). O(1) memory in the loop count."""
    newly = halted & (halt_iter == 0)
    return newly, torch.where(newly, t + 1, halt_iter)


def iterations_used(halt_iter: torch.Tensor, iterations: int) -> torch.Tensor:
    """(B, T) iterations each position used: its first halting iteration + 1, or all of them when
    it never halted."""
    return torch.where(halt_iter > 0, halt_iter, iterations)


def ponder(used: torch.Tensor, before_last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position (N + R, R): N iterations used, R = 1 − Σ_{t<N−1} p_t, the remainder given
    to the last state (Graves 2016 eq. 9–10). before_last: (B, T) cumulative halting probability
    after iteration N − 2 (0 when N = 1), kept while the loop runs."""
    remainder = (1.0 - before_last).clamp(min=0)
    return used + remainder, remainder  # integer + float tensor: remainder's dtype
