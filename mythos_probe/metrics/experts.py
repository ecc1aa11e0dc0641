"""Mixture-of-experts routing statistics per loop iteration.

Load per expert and MaxVio = max load / mean load − 1 follow Wang et al. 2024 ("Auxiliary-Loss-
Free Load Balancing Strategy for Mixture-of-Experts") §4; the share of top-k choices changed by
the router bias measures that strategy's effect (§3). Coefficient of variation of loads and
routing entropy follow Shazeer et al. 2017 ("Outrageously Large Neural Networks") §4. The
shared-to-routed output ratio is the DeepSeekMoE split (Dai et al. 2024). Top-k overlap between
successive iterations measures whether the loop re-uses the same experts for a token.
All counts are one-hot sums, not bincount, which syncs with the host on CUDA; every function
takes leading batch dimensions, so all iterations of a forward reduce in one call.
"""

from __future__ import annotations

import torch


def choice_mask(topk_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(..., k) expert ids → (..., E) bool mask of chosen experts."""
    mask = torch.zeros(*topk_idx.shape[:-1], n_experts, dtype=torch.bool, device=topk_idx.device)
    return mask.scatter_(-1, topk_idx, True)


def load(chosen: torch.Tensor) -> torch.Tensor:
    """Tokens routed to each expert: chosen masks (..., N, E) → (..., E) float."""
    return chosen.sum(dim=-2, dtype=torch.float32)


def balance(load_: torch.Tensor) -> dict[str, torch.Tensor]:
    """MaxVio, CV, normalised load entropy, dead experts and active ratio from loads (..., E)."""
    E = load_.shape[-1]
    mean = load_.mean(-1)
    share = load_ / load_.sum(-1, keepdim=True).clamp_min(1)
    entropy = -(share * share.clamp_min(1e-30).log()).sum(-1) / torch.log(torch.tensor(float(E)))
    dead = (load_ == 0).sum(-1, dtype=torch.float32)
    return {
        "expert_max_vio": load_.amax(-1) / mean.clamp_min(1e-12) - 1.0,
        "expert_cv": load_.std(-1, unbiased=False) / mean.clamp_min(1e-12),
        "expert_load_entropy": entropy,
        "expert_dead": dead,
        "expert_active_ratio": 1.0 - dead / E,
    }


def routing_entropy(router_logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the router softmax over tokens: (..., N, E) → (...) nats."""
    logp = router_logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean(-1)


def bias_changed_share(router_logits: torch.Tensor, chosen: torch.Tensor, k: int) -> torch.Tensor:
    """Share of chosen (biased) top-k slots that the unbiased top-k would not have picked:
    (..., N, E) logits and masks → (...)."""
    unbiased = choice_mask(router_logits.topk(k, dim=-1).indices, router_logits.shape[-1])
    return (chosen & ~unbiased).sum(dim=(-2, -1), dtype=torch.float32) / (chosen.shape[-2] * k)


def topk_overlap(chosen: torch.Tensor, chosen_prev: torch.Tensor, k: int) -> torch.Tensor:
    """|topk_t ∩ topk_{t−1}| / k averaged over tokens: (..., N, E) masks → (...)."""
    return (chosen & chosen_prev).sum(-1, dtype=torch.float32).mean(-1) / k


def shared_routed_ratio(norm_shared: torch.Tensor, norm_routed: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ‖shared output‖ / ‖routed output‖, from per-token norms (..., N)."""
    return (norm_shared / norm_routed.clamp_min(1e-12)).mean(-1)
