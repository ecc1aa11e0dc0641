"""Mixture-of-experts routing statistics per loop iteration.

Load per expert and MaxVio = max load / mean load − 1 follow Wang et al. 2024 ("Auxiliary-Loss-
Free Load Balancing Strategy for Mixture-of-Experts") §4; the share of top-k choices changed by
the router bias measures that strategy's effect (§3). Coefficient of variation of loads and
routing entropy follow Shazeer et al. 2017 ("Outrageously Large Neural Networks") §4. The
shared-to-routed output ratio is the DeepSeekMoE split (Dai et al. 2024). Top-k overlap between
successive iterations measures whether the loop re-uses the same experts for a token.
Per-iteration functions take one iteration's (N, k) ids and (N, E) logits and return a scalar
tensor; `balance` takes the loads of all iterations (I, E) at once, after the loop.
"""

from __future__ import annotations

import torch


def load(topk_idx: torch.Tensor, n_experts: int, ones: torch.Tensor) -> torch.Tensor:
    """Tokens routed to each expert: (N, k) expert ids → (E,) float. `ones` holds N·k ones (made
    once per forward); a scatter-add, not bincount, which syncs with the host on CUDA."""
    return torch.zeros(n_experts, device=topk_idx.device).scatter_add_(0, topk_idx.reshape(-1), ones)


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
    """Mean entropy of the router softmax over tokens: (N, E) → () nats."""
    logp = router_logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean(-1)


def bias_changed_share(router_logits: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """Share of chosen (biased) top-k slots that the unbiased top-k would not have picked:
    (N, E) unbiased logits and (N, k) chosen ids → (). A chosen expert is outside the unbiased
    top-k exactly when its logit is below the k-th largest: one top-k of values, no (N, E) masks."""
    k = topk_idx.shape[-1]
    kth = router_logits.topk(k).values[..., -1:]  # (N, 1): topk is over the last axis
    return (router_logits.gather(-1, topk_idx) < kth).float().mean()


def topk_overlap(topk_idx: torch.Tensor, topk_prev: torch.Tensor) -> torch.Tensor:
    """|topk_t ∩ topk_{t−1}| / k averaged over tokens, from (N, k) expert ids (distinct per row)."""
    # the mean over (N, k) of "slot j was also chosen before" is Σ_n |∩_n| / (N·k)
    same = topk_idx[..., :, None] == topk_prev[..., None, :]  # (…, k, k)
    return same.any(-1).float().mean()  # pragma: no mutate (any(-2) counts the same intersection from the other side)


def shared_routed_ratio(shared_out: torch.Tensor, routed_out: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ‖shared output‖ / ‖routed output‖: (N, D) outputs → ()."""
    norm_shared = torch.linalg.vector_norm(shared_out.float(), dim=-1)
    return (norm_shared / torch.linalg.vector_norm(routed_out.float(), dim=-1).clamp_min(1e-12)).mean()
