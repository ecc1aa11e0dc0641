"""Synthetic `LoopTrace`s made with numpy, shaped like what the probes produce (no torch).

`make_trace` gives a forward whose positions halt at different iterations, step metrics NaN at
t = 0, expert loads summing to the tokens routed, token text, and user attributes.
"""

from __future__ import annotations

import numpy as np

from mythos_probe.records import (
    FORWARD_METRIC_NAMES,
    ITERATION_METRIC_NAMES,
    POSITION_METRIC_NAMES,
    LoopTrace,
)

STEP_METRICS = {"rel_residual", "cos_step", "growth_ratio", "step_orthogonality", "lens_kl_prev", "topk_overlap"}


def make_trace(
    seed: int = 0,
    *,
    detail: str = "positions",
    batch: int = 2,
    seq_len: int = 5,
    n_loops: int = 6,
    n_experts: int = 4,
    all_metrics: bool = True,
    with_text: bool = True,
    step: int | None = None,
    run_id: str = "run-a",
    model_id: str = "mythos-tiny",
    start_ns: int = 1_760_000_000_000_000_000,
) -> LoopTrace:
    rng = np.random.default_rng(seed)
    used = rng.integers(1, n_loops + 1, size=(batch, seq_len))
    iterations = int(used.max())
    t = np.arange(iterations)
    residual = np.exp(-t / 2.0)[None, None, :] * rng.uniform(0.5, 1.5, size=(batch, seq_len, 1))
    running = t[None, None, :] < used[..., None]
    names = ITERATION_METRIC_NAMES if all_metrics else ITERATION_METRIC_NAMES[:5]
    iteration_metrics = {}
    for name in names:
        values = rng.uniform(0.0, 2.0, size=iterations)
        if name in STEP_METRICS:
            values[0] = np.nan
        iteration_metrics[name] = values
    iteration_metrics["rel_residual"] = np.where(
        t == 0, np.nan, (residual * running).sum((0, 1)) / np.maximum(running.sum((0, 1)), 1)
    )
    iteration_metrics["exit_count"] = np.array([(used == i + 1).sum() for i in t], dtype=float)
    position_metrics = {}
    if detail == "positions":
        pnames = POSITION_METRIC_NAMES if all_metrics else POSITION_METRIC_NAMES[:2]
        for name in pnames:
            position_metrics[name] = rng.uniform(0, 1, size=(batch, seq_len, iterations)).astype(np.float32)
        pos_res = residual.astype(np.float32).copy()
        pos_res[..., 0] = np.nan
        position_metrics["rel_residual"] = pos_res
    forward_names = FORWARD_METRIC_NAMES if all_metrics else FORWARD_METRIC_NAMES[:3]
    forward_metrics = {name: float(rng.normal()) for name in forward_names}
    forward_metrics["mean_iterations"] = float(used.mean())
    forward_metrics["diverged_at"] = -1.0
    expert_load = None
    if n_experts:
        # top-2 routing: each running position sends 2 tokens to experts
        expert_load = np.stack([rng.multinomial(2 * int(running[..., i].sum()), np.ones(n_experts) / n_experts) for i in t])
    token_ids = rng.integers(0, 50_000, size=(batch, seq_len))
    token_text = tuple(tuple(f"tok{int(x)}" + ("é" if x % 2 else "") for x in row) for row in token_ids) if with_text else None
    return LoopTrace(
        trace_id=f"{rng.integers(1, 2**63):016x}{seed:016x}",
        span_id=f"{seed + 1:016x}",
        run_id=run_id,
        model_id=model_id,
        step=seed if step is None else step,
        start_ns=start_ns + seed * 1_000_000,
        end_ns=start_ns + seed * 1_000_000 + int(rng.integers(100_000, 900_000)),
        batch=batch,
        seq_len=seq_len,
        n_loops=n_loops,
        iterations=iterations,
        exit_policy="act",
        detail=detail,
        iteration_metrics=iteration_metrics,
        position_metrics=position_metrics,
        forward_metrics=forward_metrics,
        expert_load=expert_load,
        position_iterations=used,
        token_ids=token_ids,
        token_text=token_text,
        attributes={"request_id": f"req-{seed}", "endpoint": "/v1/generate", "priority": 3, "cached": False, "temp": 0.7},
    )


def traces_equal(a: LoopTrace, b: LoopTrace) -> bool:
    """Field-by-field equality with NaN == NaN and exact dtypes/shapes."""
    da, db = a.to_dict(), b.to_dict()
    return da == db and all(
        np.array_equal(a.position_metrics[k], b.position_metrics[k], equal_nan=True)
        and a.position_metrics[k].dtype == b.position_metrics[k].dtype
        for k in a.position_metrics
    ) and set(a.position_metrics) == set(b.position_metrics)
