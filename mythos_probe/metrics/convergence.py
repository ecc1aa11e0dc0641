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
_NAN = float("nan")  # pragma: no mutate (float() reads "NAN" as the same NaN)


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


# dist_to_final needs h_T, known only after the loop, so every h_t has to be kept until then.
# Keeping them whole costs one state per iteration (memory linear in the loop count); instead the
# loop keeps a bfloat16 copy of a fixed sample of positions (DIST_SAMPLE_STRIDE), a 1/32 of a
# float32 state per iteration. Rounding to bfloat16 moves each coordinate by at most 2⁻⁸ of itself
# (unit roundoff, 8 significant bits), so ‖ĥ_t − h_t‖ ≤ 2⁻⁸‖h_t‖ and, by the triangle inequality,
# |d̂_t − d_t| ≤ 2⁻⁸ ‖h_t‖ / ‖h_T‖ at every sampled position (h_T is kept in float32).
DIST_SAMPLE_STRIDE = 16
DIST_ROUNDOFF = 2.0**-8


def sample_positions(T: int, stride: int = DIST_SAMPLE_STRIDE, at_least: int = 4) -> int:
    """How many evenly spaced positions, first and last included, a sample of T takes: one in
    `stride`, at least `at_least` (all of them when T is smaller)."""
    return min(T, max(at_least, -(-T // stride)))


def evenly_spaced(T: int, count: int, device) -> torch.Tensor:
    """`count` positions round(linspace(0, T − 1, count)), distinct when count ≤ T."""
    return torch.linspace(0, T - 1, count, device=device).round().long()


def dist_to_final(trail: list[torch.Tensor], final: torch.Tensor) -> torch.Tensor:
    """Mean over the sampled positions of ‖h_t − h_T‖ / ‖h_T‖ for every t: the low-precision
    copies (B, P, D) of h_0 … h_{T−1} and the exact final sample h_T (B, P, D) → (I,), whose
    last entry is the final state's own distance, 0."""
    norm_final = final.norm(dim=-1).clamp_min(EPS)
    dist = [((h.float() - final).norm(dim=-1) / norm_final).mean() for h in trail]
    return torch.stack([*dist, torch.zeros((), device=final.device)])


def token_correlation(samples: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine between the sampled positions of each sequence, averaged over the
    batch: (B, P, D) → (). NaN for a single position. With unit vectors x̂_i the sum of all
    pairwise cosines is ‖Σ_i x̂_i‖² − Σ_i ‖x̂_i‖²: O(P·D) work, no (P, P) Gram matrix."""
    P = samples.shape[-2]
    if P < 2:
        return torch.full((), _NAN, device=samples.device)
    x = torch.nn.functional.normalize(
        samples.float(), dim=-1,
        eps=EPS,  # pragma: no mutate (torch's default eps is this 1e-12 too) zero vectors stay 0
    )
    total = torch.linalg.vector_norm(x.sum(-2), dim=-1).square()  # (B,)
    diagonal = torch.linalg.vecdot(x, x).sum(-1)  # (B,) P, less any zero vectors
    return ((total - diagonal) / (P * (P - 1))).mean()
