"""Mixture-of-experts routing statistics per loop iteration.

Load per expert and MaxVio = max load / mean load − 1 follow Wang et al. 2024 ("Auxiliary-Loss-
Free Load Balancing Strategy for Mixture-of-Experts") §4; the share of top-k choices changed by
the router bias measures that strategy's effect (§3). Coefficient of variation of loads and
routing entropy follow Shazeer et al. 2017 ("Outrageously Large Neural Networks") §4. The
shared-to-routed output ratio is the DeepSeekMoE split (Dai et al. 2024). Top-k overlap between
successive iterations measures whether the loop re-uses the same experts for a token.
All counts use index_add/one-hot sums, not bincount, which syncs with the host on CUDA.
"""

from __future__ import annotations

import torch


def choice_mask(topk_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(N, k) expert ids → (N, E) bool mask of chosen experts."""
    mask = torch.zeros(topk_idx.shape[0], n_experts, dtype=torch.bool, device=topk_idx.device)
    return mask.scatter_(1, topk_idx, True)


def load(topk_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert: (N, k) → (E,) float."""
    flat = topk_idx.reshape(-1)
    return torch.zeros(n_experts, device=flat.device).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))


def balance(load_: torch.Tensor) -> dict[str, torch.Tensor]:
    """MaxVio, CV, normalised load entropy, dead experts and active ratio from loads (E,)."""
    mean = load_.mean()
    share = load_ / load_.sum().clamp_min(1)
    entropy = -(share * share.clamp_min(1e-30).log()).sum() / torch.log(torch.tensor(float(load_.numel())))
    dead = (load_ == 0).float().sum()
    return {
        "expert_max_vio": load_.max() / mean.clamp_min(1e-12) - 1.0,
        "expert_cv": load_.std(unbiased=False) / mean.clamp_min(1e-12),
        "expert_load_entropy": entropy,
        "expert_dead": dead,
        "expert_active_ratio": 1.0 - dead / load_.numel(),
    }


def routing_entropy(router_logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the router softmax over tokens: (N, E) → scalar (nats)."""
    logp = router_logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean()


def bias_changed_share(router_logits: torch.Tensor, chosen: torch.Tensor, k: int) -> torch.Tensor:
    """Share of chosen (biased) top-k slots that the unbiased top-k would not have picked."""
    unbiased = choice_mask(router_logits.topk(k, dim=-1).indices, router_logits.shape[-1])
    return (chosen & ~unbiased).float().sum() / (chosen.shape[0] * k)


def topk_overlap(chosen: torch.Tensor, chosen_prev: torch.Tensor, k: int) -> torch.Tensor:
    """|topk_t ∩ topk_{t−1}| / k averaged over tokens."""
    return (chosen & chosen_prev).float().sum(-1).mean() / k


def shared_routed_ratio(shared_out: torch.Tensor, routed_out: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ‖shared output‖ / ‖routed output‖."""
    return (shared_out.norm(dim=-1) / routed_out.norm(dim=-1).clamp_min(1e-12)).mean()
