"""Hidden-state convergence across loop iterations.

Relative residual, cosine step and distance to the final state follow Geiping et al. 2025
("Scaling up Test-Time Compute with Latent Reasoning", Huginn) §6, where the latent trajectory of
each token is inspected for convergence and orbits; step orthogonality cos(Δ_t, Δ_{t−1}) is
their orbit diagnostic (≈ −1 oscillation, ≈ +1 drift, ≈ 0 rotation). Token correlation is the
rank-collapse measure of Dong et al. 2021 ("Attention is not all you need: pure attention loses
rank doubly exponentially"): mean pairwise cosine between positions.
"""

from __future__ import annotations

import torch

EPS = 1e-12


def rel_residual(h: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
    """‖h_t − h_{t−1}‖ / ‖h_t‖ per position: (B, T, D) → (B, T)."""
    return (h - h_prev).norm(dim=-1) / h.norm(dim=-1).clamp_min(EPS)


def cos_step(h: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
    """1 − cos(h_t, h_{t−1}) per position: (B, T)."""
    return 1.0 - torch.nn.functional.cosine_similarity(h, h_prev, dim=-1, eps=EPS)


def dist_to_final(states: torch.Tensor) -> torch.Tensor:
    """‖h_t − h_T‖ / ‖h_T‖ for every t: (I, B, T, D) → (I, B, T)."""
    final = states[-1]
    return (states - final).norm(dim=-1) / final.norm(dim=-1).clamp_min(EPS)


def step_orthogonality(delta: torch.Tensor, delta_prev: torch.Tensor) -> torch.Tensor:
    """cos(Δ_t, Δ_{t−1}) per position with Δ_t = h_t − h_{t−1}: (B, T)."""
    return torch.nn.functional.cosine_similarity(delta, delta_prev, dim=-1, eps=EPS)


def token_correlation(h: torch.Tensor, max_positions: int = 32) -> torch.Tensor:
    """Mean pairwise cosine between (up to `max_positions`, evenly spaced) positions of each
    sequence, averaged over the batch: (B, T, D) → scalar. NaN for a single position."""
    T = h.shape[1]
    if T < 2:
        return torch.full((), float("nan"), device=h.device)
    idx = torch.linspace(0, T - 1, min(T, max_positions), device=h.device).round().long().unique()
    x = torch.nn.functional.normalize(h[:, idx].float(), dim=-1, eps=EPS)  # (B, P, D)
    gram = x @ x.transpose(1, 2)  # (B, P, P)
    P = x.shape[1]
    return (gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)).mean() / (P * (P - 1))
