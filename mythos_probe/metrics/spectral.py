"""Spectral stability of the recurrence h_{t+1} = A⊙h_t + B⊙e + block(h_t, e).

The diagonal injection Ā = exp(−exp(log_dt + log_A)) has spectral radius ρ(Ā) = max_i A_i < 1
by construction (Prairie et al. 2026, "Parcae", §3); the mean contraction is mean_i A_i. State
norm, growth ratio and the split of the update into ‖A⊙h‖, ‖B⊙e‖ and ‖block‖ show whether the
block or the injection drives the state (Parcae §3, OpenMythos `LTIInjection`). The Jacobian
spectral norm σ_max(∂h_{t+1}/∂h_t) is estimated by power iteration on JᵀJ with one JVP and one
VJP per step (Golub & Van Loan §8.2 power method; opt-in, it re-runs the step with autograd).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def injection_spectrum(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ρ(Ā), mean contraction) of the diagonal injection matrix given as its diagonal A."""
    return A.max(), A.mean()


def growth_ratio(norm_h: torch.Tensor, norm_hprev: torch.Tensor) -> torch.Tensor:
    """‖h_t‖ / ‖h_{t−1}‖ from per-position norms."""
    return norm_h / norm_hprev.clamp_min(1e-12)


def nonfinite(norm_h: torch.Tensor) -> torch.Tensor:
    """Positions whose state holds a NaN or ±Inf: exactly those whose norm is not finite."""
    return ~torch.isfinite(norm_h)


def jacobian_sigma_max(step: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor,
                       n_iter: int = 8, seed: int = 0) -> torch.Tensor:
    """σ_max of ∂step/∂h at h by power iteration on JᵀJ (JVP then VJP each round)."""
    g = torch.Generator(device=h.device).manual_seed(seed)
    v = torch.randn(h.shape, generator=g, device=h.device, dtype=h.dtype)
    v = v / v.norm()
    sigma = torch.zeros((), device=h.device, dtype=h.dtype)
    # the math SDPA kernel: fused attention kernels implement no forward-mode AD
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        for _ in range(n_iter):
            _, jv = torch.func.jvp(step, (h,), (v,))
            _, vjp = torch.func.vjp(step, h)
            (jtjv,) = vjp(jv)
            sigma = jv.norm()
            v = jtjv / jtjv.norm().clamp_min(1e-30)
    return sigma.detach()
