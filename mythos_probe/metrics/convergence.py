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


# The loop keeps per-position norms and dot products (one pass over the state each); the ratios
# below combine them once per forward. Δ_t = h_t − h_{t−1} is computed exactly, never as
# ‖h‖² + ‖h_prev‖² − 2 h·h_prev, which cancels catastrophically once the state has converged.


def rel_residual(norm_delta: torch.Tensor, norm_h: torch.Tensor) -> torch.Tensor:
    """‖h_t − h_{t−1}‖ / ‖h_t‖ from per-position norms."""
    return norm_delta / norm_h.clamp_min(EPS)


def cos_step(dot_h_hprev: torch.Tensor, norm_h: torch.Tensor, norm_hprev: torch.Tensor) -> torch.Tensor:
    """1 − cos(h_t, h_{t−1}) from the per-position dot product and norms."""
    return 1.0 - dot_h_hprev / (norm_h * norm_hprev).clamp_min(EPS)


def step_orthogonality(dot_delta: torch.Tensor, norm_delta: torch.Tensor, norm_delta_prev: torch.Tensor) -> torch.Tensor:
    """cos(Δ_t, Δ_{t−1}) from the per-position dot product and norms of successive steps."""
    return dot_delta / (norm_delta * norm_delta_prev).clamp_min(EPS)


def dist_to_final(states: list[torch.Tensor]) -> torch.Tensor:
    """‖h_t − h_T‖ / ‖h_T‖ for every t: I states (B, T, D) → (I, B, T)."""
    final = states[-1]
    norm_final = final.norm(dim=-1).clamp_min(EPS)
    return torch.stack([(h - final).norm(dim=-1) / norm_final for h in states])


def token_correlation(samples: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine between the sampled positions of each sequence, averaged over the
    batch: (..., B, P, D) → (...). NaN for a single position."""
    P = samples.shape[-2]
    if P < 2:
        return torch.full(samples.shape[:-3], float("nan"), device=samples.device)
    x = torch.nn.functional.normalize(samples.float(), dim=-1, eps=EPS)
    gram = x @ x.transpose(-1, -2)  # (..., B, P, P)
    off = gram.sum(dim=(-2, -1)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    return off.mean(-1) / (P * (P - 1))
