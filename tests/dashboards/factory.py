"""Synthetic `LoopTrace`s for the dashboard tests and benchmark, built with numpy only.

Each trace is internally consistent (exit counts, halted fractions and iteration means all follow
from the per-position iterations used), so tests can recompute what a view should show from the
traces alone. This is not a model simulation: the values only have plausible shapes.
"""

from __future__ import annotations

import numpy as np

from mythos_probe.records import LoopTrace

WORDS = ("the", "loop", "halts", "when", "state", "stops", "moving", "and", "coda", "reads", "it", "out")
BASE_NS = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z


def _hex(rng: np.random.Generator, n_chars: int) -> str:
    return "".join(f"{b:02x}" for b in rng.integers(0, 256, n_chars // 2))


def synthetic_trace(
    rng: np.random.Generator,
    *,
    run_id: str = "run-a",
    model_id: str = "mythos-tiny",
    step: int = 0,
    start_ns: int = BASE_NS,
    attributes: dict | None = None,
    n_loops: int = 8,
    batch: int = 1,
    seq_len: int = 12,
    n_experts: int = 4,
    diverged_at: int = -1,
) -> LoopTrace:
    used = rng.integers(1, n_loops + 1, size=(batch, seq_len))  # iterations used per position
    used[0, 0] = n_loops  # some position always runs the full budget, so iterations == n_loops
    iterations = n_loops
    t = np.arange(iterations)
    running = t < used[..., None]  # (B, S, T)
    rate = rng.uniform(0.3, 0.7, size=(batch, seq_len, 1))
    rel = rate ** (t + 1.0)  # (B, S, T) geometric convergence
    state = 1.0 + 0.05 * t + 0.01 * rng.standard_normal((batch, seq_len, iterations))
    halt = np.clip(1.0 / (1.0 + np.exp(used[..., None] - 1.0 - t)), 0, 1)
    cum_halt = np.minimum(np.cumsum(halt, axis=-1), 1.0)
    kl_final = rel * 4.0
    kl_final[..., -1] = 0.0
    # The coda lens samples the last position of each row (attach's default lens_positions="last").
    lens = np.full((batch, seq_len, 1), np.nan)
    lens[:, -1] = 1.0
    lens_agree = (kl_final < 0.05) * lens  # (B, S, T)
    agree = (kl_final < 0.05).mean(axis=(0, 1))
    agree[-1] = 1.0

    def running_mean(a: np.ndarray) -> np.ndarray:
        return np.where(running, a, 0).sum(axis=(0, 1)) / np.maximum(running.sum(axis=(0, 1)), 1)

    tokens = batch * seq_len
    token_ids = rng.integers(0, len(WORDS), size=(batch, seq_len))
    exit_count = np.array([(used == k + 1).sum() for k in t], dtype=float)
    load = np.stack([rng.multinomial(2 * int(running[..., k].sum()), np.full(n_experts, 1 / n_experts)) for k in t])
    mean_load = load.mean(axis=1, keepdims=True)
    kl_prev = np.r_[np.nan, np.abs(np.diff(running_mean(kl_final)))]
    rel_mean = running_mean(rel)
    rel_mean[0] = np.nan  # a step metric is undefined at t = 0
    norm = running_mean(state)
    iteration_metrics = {
        "rel_residual": rel_mean,
        "state_norm": norm,
        "growth_ratio": np.r_[np.nan, norm[1:] / norm[:-1]],
        "halt_prob": running_mean(halt),
        "cum_halt": running_mean(cum_halt),
        "halted_fraction": (used <= t[:, None, None] + 1).mean(axis=(1, 2)),
        "halt_low_share": (halt < 0.01).mean(axis=(0, 1)),
        "halt_high_share": (halt > 0.99).mean(axis=(0, 1)),
        "exit_count": exit_count,
        "expert_max_vio": (load.max(axis=1) / np.maximum(mean_load[:, 0], 1e-9)) - 1,
        "routing_entropy": rng.uniform(0.5, 1.0, iterations),
        "topk_overlap": np.r_[np.nan, rng.uniform(0.4, 1.0, iterations - 1)],
        "lens_kl_final": running_mean(kl_final),
        "lens_kl_prev": kl_prev,
        "lens_top1_agree": agree,
    }
    if diverged_at >= 0:
        iteration_metrics["state_norm"] = norm.copy()
        iteration_metrics["state_norm"][diverged_at:] = np.inf
    forward_metrics = {
        "rho_A": rng.uniform(0.8, 0.99),
        "mean_iterations": used.mean(),
        "halted_first_share": (used == 1).mean(),
        "reached_last_share": (used == n_loops).mean(),
        "diverged_at": diverged_at,
        "flops": 1e6 * used.sum(),
        "flops_saved": 1 - used.sum() / (tokens * n_loops),
    }
    return LoopTrace(
        trace_id=_hex(rng, 32),
        span_id=_hex(rng, 16),
        run_id=run_id,
        model_id=model_id,
        step=step,
        start_ns=start_ns,
        end_ns=start_ns + int(rng.integers(5, 50) * 1_000_000),
        batch=batch,
        seq_len=seq_len,
        n_loops=n_loops,
        iterations=iterations,
        exit_policy="act",
        detail="positions",
        iteration_metrics=iteration_metrics,
        position_metrics={
            "rel_residual": rel,
            "state_norm": state,
            "halt_prob": halt,
            "cum_halt": cum_halt,
            "lens_kl_final": kl_final,
            "lens_kl_prev": np.concatenate([np.full((batch, seq_len, 1), np.nan), np.abs(np.diff(kl_final, axis=-1))], -1) * lens,
            "lens_entropy": (1.0 + kl_final) * lens,
            "lens_argmax": np.where(lens_agree == 1, token_ids[..., None], -1) * lens,
            "lens_top1_agree": lens_agree,
        },
        forward_metrics=forward_metrics,
        expert_load=load,
        position_iterations=used,
        token_ids=token_ids,
        token_text=tuple(tuple(WORDS[i] for i in row) for row in token_ids),
        attributes=dict(attributes or {}),
    )

