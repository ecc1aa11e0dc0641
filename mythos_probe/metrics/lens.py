"""Coda lens: the state at iteration t decoded through coda, final norm and head.

The logit lens (nostalgebraist 2020, "interpreting GPT: the logit lens") applied over loop depth
instead of layers, as in Geiping et al. 2025 §7, where KL between successive iterations is also
the early-exit criterion. Entropy, top-1 agreement with the final prediction and the rank of the
final token follow Belrose et al. 2023 ("Eliciting Latent Predictions with the Tuned Lens") §3.
Inputs are log-probabilities (…, V) in float32.
"""

from __future__ import annotations

import torch


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last axis."""
    return (logp.exp() * (logp - logq)).sum(-1)


def entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)


def rank_of(logp: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Rank (0 = top) of `token` (…,) under logp (…, V)."""
    chosen = logp.gather(-1, token[..., None])
    return (logp > chosen).sum(-1).float()
