"""`sweep(model, inputs, loops=range(1, 17))`: accuracy and agreement with full depth against the
number of loops, from one call: the "overthinking" curve (Loop, Think & Generalize; Ouro's
step-to-step answer agreement) of a model whose forward takes `n_loops`.

Each loop count runs the same inputs once at a fixed depth (`exit="fixed"` on our model, so the
count is the depth). Agreement compares each position's argmax with that of the deepest run;
accuracy (with `targets`) compares it with the target, over positions whose target is not
`ignore_index`. Rows come back in loop order with the counts behind each share.

This module is not: a probe (nothing is recorded per iteration) nor the what-if replay.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch


def sweep(model: torch.nn.Module, inputs: torch.Tensor, loops: Iterable[int] = range(1, 17),
          targets: Optional[torch.Tensor] = None, ignore_index: int = -100, **forward_kwargs: Any):
    """pandas DataFrame, one row per loop count: `loops`, `positions` (compared), `agreement`
    (share whose argmax equals the deepest run's), and with `targets` (same shape as `inputs`)
    `correct` and `accuracy`; `best` marks the loop counts of the highest accuracy (else agreement)."""
    import pandas as pd
    from mythos_probe.model.looped import LoopedTransformer

    counts = sorted(set(int(n) for n in loops))
    if not counts or counts[0] < 1:
        raise ValueError(f"loops must hold positive loop counts, got {list(loops)!r}")
    if targets is not None and targets.shape != inputs.shape:
        raise ValueError(f"targets must have the shape of inputs {tuple(inputs.shape)}, got {tuple(targets.shape)}")
    if isinstance(model, LoopedTransformer):
        forward_kwargs.setdefault("exit", "fixed")
    predictions = {}
    with torch.no_grad():
        for n in counts:
            out = model(inputs, n_loops=n, **forward_kwargs)
            logits = out if isinstance(out, torch.Tensor) else out.logits
            predictions[n] = logits.argmax(-1)
    keep = torch.ones_like(inputs, dtype=torch.bool) if targets is None else targets != ignore_index
    deepest = predictions[counts[-1]]
    rows = []
    for n in counts:
        pred = predictions[n]
        row = {"loops": n, "positions": int(keep.sum()),
               "agreement": float((pred == deepest)[keep].float().mean())}
        if targets is not None:
            row["correct"] = int((pred == targets)[keep].sum())
            row["accuracy"] = row["correct"] / max(row["positions"], 1)
        rows.append(row)
    frame = pd.DataFrame(rows)
    score = frame["accuracy"] if targets is not None else frame["agreement"]
    frame["best"] = score == score.max()
    return frame
