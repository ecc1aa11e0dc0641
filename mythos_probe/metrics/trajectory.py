"""Latent trajectories: each position's states h_0 … h_{I−1} over the loop iterations, projected
onto their own first principal directions, and the iterations at which the state stops moving.

Geiping et al. 2025 (Huginn) §6 draws, per token, a PCA of h_t over the iterations: tokens that
settle on a fixed point, that orbit (a closed path, step orthogonality near 0) or that slide (a
steady drift along one direction). The PCA is over one position's own iterations, centred on its
mean state, so the paths of two tokens are each in their own coordinates.

Computed on the device without a state-sized copy to the host. The I × I Gram matrix of the centred
states, G = X_c X_cᵀ (X_c: the I states of a position, minus their mean), holds everything the
PCA needs: with G = U Λ Uᵀ, the projection of state t onto principal direction j is U_tj √λ_j
(= X_c v_j with v_j = X_cᵀ u_j / √λ_j), and λ_j / Σλ is the share of the trajectory's variance
that direction explains. Only G (B × T × I × I floats) and the projections leave this module.

Sign: an eigenvector's sign is arbitrary. Each component is oriented so that the path ends at or
above where it starts (p_j(I−1) ≥ p_j(0)): a token sliding along a direction reads as increasing.

Fixed point, one definition (`settled`): with s_t = ‖h_t − h_{t−1}‖ / ‖h_t‖ the relative step
into iteration t (the recorded `rel_residual`), iteration t is on the fixed point when the state
moves by at most `FIXED_POINT_TOL` of its norm in every later iteration of the loop (s_u ≤ tol for
every u > t; for the last iteration, s_{I−1} ≤ tol: it did not move into it). A position's fixed
point is its first such iteration, the state every later one repeats; a position with none was
still moving when the loop ended. A position an exit policy froze is on its fixed point from its
exit on (its state no longer moves).

This module is not: where the states come from (`probes/reductions.py`) or the figures
(`plots.py`, `dashboards/pages/trajectories.py`).
"""

from __future__ import annotations

import math

import torch

COMPONENTS = 3
"""Principal directions kept per position (`traj_pc1` … `traj_pc3`)."""

FIXED_POINT_TOL = 1e-3
"""A relative step ‖h_t − h_{t−1}‖ / ‖h_t‖ at most this counts as not moving (`settled`)."""


def centred_gram(states: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(I, B, T, D) states, held by the model as `dtype` → ((B, T, I, I) float64 Gram matrices of
    each position's centred states, (B, T) the eigenvalue below which a direction is rounding).

    Centred before the products, never as G − row means − column means + mean: near a fixed point
    the centred states are tiny next to the states and the second form would cancel them away. The
    products are summed in float64: a float32 sum errs by ~2⁻²⁴ λ₁, and a direction's projection
    is √λ, so a direction that holds no variance (the third of a planar orbit) would read
    √(2⁻²⁴ λ₁) ≈ 2⁻¹² of the path's size instead of 0.

    The rounding floor: each state is known to u ‖h_t‖ (u: the unit roundoff of `dtype`), so the
    centred states are known to a matrix E with ‖E‖ ≤ 2u ‖X‖_F (the mean adds as much again), and
    by Weyl's inequality a singular value √λ_j moves by at most that. A direction with
    √λ_j ≤ 4u ‖X‖_F is indistinguishable from rounding: its orientation and size are noise."""
    x = states.float()
    energy = x.square().sum(dim=(0, -1), dtype=torch.float64)  # ‖X‖_F² per position
    x = (x - x.mean(dim=0)).double()  # the (B, T, D) mean broadcasts over the I states
    unit = torch.finfo(dtype).eps / 2
    gram = torch.einsum("ibtd,jbtd->btij", x, x)  # pragma: no mutate (einsum reads its letters' case alike)
    return gram, (4 * unit) ** 2 * energy


def principal_paths(gram: torch.Tensor, floor: torch.Tensor, k: int = COMPONENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, I, I) centred Gram matrices and (B, T) rounding floors (`centred_gram`) →
    (projections (k, I, B, T), variance shares (k, B, T)).

    A direction at or below the floor, and one beyond the trajectory's rank (fewer than k + 1
    iterations), has projection 0 and share 0; a position whose state never moved beyond rounding
    has share NaN (no variance to explain) and projections 0. Batched eigh in float64 (I × I
    matrices: cheap, and the small eigenvalues of a settling path keep their digits)."""
    B, T, I, _ = gram.shape
    g = gram.double()
    g = (g + g.mT) / 2  # exactly symmetric, as eigh assumes
    lam, u = torch.linalg.eigh(g)  # ascending
    lam, u = lam.flip(-1), u.flip(-1)  # descending
    lam = torch.where(lam > floor[..., None], lam, 0.0)  # rounding (and negative rounding) removed
    total = lam.sum(-1, keepdim=True)
    m = min(k, I)
    proj = u[..., :m] * lam[..., None, :m].sqrt()  # (B, T, I, m)
    ends_higher = (proj[..., -1, :] >= proj[..., 0, :])[..., None, :]
    proj = torch.where(ends_higher, proj, -proj)  # end ≥ start
    share = lam[..., :m] / total  # NaN where total is 0
    # the k − m directions past the trajectory's rank (none when I ≥ k) hold nothing
    proj = torch.cat([proj, proj.new_zeros(B, T, I, k - m)], dim=-1)
    share = torch.cat([share, torch.where(total > 0, 0.0, math.nan).expand(B, T, k - m)], dim=-1)
    return proj.permute(3, 2, 0, 1).float(), share.permute(2, 0, 1).float()


def settled(steps: torch.Tensor, tol: float = FIXED_POINT_TOL) -> torch.Tensor:
    """(I, B, T) relative steps s_t → (I, B, T) 1.0 where iteration t is on the fixed point (every
    later step ≤ tol; the last iteration: its own step ≤ tol), else 0.0. NaN steps (a non-finite
    state) are never still."""
    still = steps <= tol  # NaN compares False
    after = still.flip(0).cumprod(0).flip(0)  # after[t] = 1 when s_u ≤ tol for every u ≥ t
    return torch.cat([after[1:], after[-1:]]).float()
