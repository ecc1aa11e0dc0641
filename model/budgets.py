"""Per-request loop budgets: how deep each row of a batch may loop, and when it may stop.

A `LoopBudget` is one request's: at most `max_loops` iterations, at least `min_loops` before its
exit policy may stop a position, and its own `exit_threshold` (None: the policy's default). The
exit policy itself is chosen per call (`LoopedTransformer.forward(..., exit=...)`): one policy
per batch, a budget per row. `reason` says where the budget came from (a profile, a governor
lowering it for an over-budget key) and travels onto the trace.

`RowBudgets` is the per-row tensor form one forward uses: the loop asks it, after iteration t,
which positions must stop (`gate`). A row past its `max_loops` is exited like a position the
policy stopped, so it leaves the iteration through the same compaction (`RecurrentBlock`), and
its output is the one running that row alone with `n_loops=max_loops` would give.

This module is not: the loop (`looped.RecurrentBlock`), the profiles that choose budgets
(`mythos_probe.profiles`) or the governor that lowers them (`mythos_probe.governor`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class LoopBudget:
    """One request's loop budget (see the module docstring)."""

    max_loops: int
    min_loops: int = 1
    exit_threshold: Optional[float] = None
    reason: str = ""

    def __post_init__(self) -> None:
        for name in ("max_loops", "min_loops"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"LoopBudget.{name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.min_loops > self.max_loops:
            raise ValueError(f"LoopBudget.min_loops={self.min_loops} exceeds max_loops={self.max_loops}: "
                             "lower min_loops or raise max_loops")
        th = self.exit_threshold
        if th is not None:
            if isinstance(th, bool) or not isinstance(th, numbers.Real) or math.isnan(th) or th < 0:
                raise ValueError(f"LoopBudget.exit_threshold must be a non-negative number or None (the "
                                 f"policy's default), got {th!r}")
            object.__setattr__(self, "exit_threshold", float(th))
        if not isinstance(self.reason, str):
            raise TypeError(f"LoopBudget.reason must be a string, got {type(self.reason).__name__}")

    def to_dict(self) -> dict:
        return {"max_loops": self.max_loops, "min_loops": self.min_loops, "exit_threshold": self.exit_threshold,
                "reason": self.reason}


def check_budgets(budgets: Sequence[LoopBudget], batch: int, exit: str) -> list[LoopBudget]:
    """The budgets of a (batch, seq) forward under `exit`, validated: one per row, and only what
    the policy can honour (`fixed` and `act` have no threshold to set; ACT cannot be held to a
    minimum depth: it weights every iteration by its halting probability)."""
    budgets = list(budgets)
    if len(budgets) != batch:
        raise ValueError(f"budgets has {len(budgets)} entries for a batch of {batch} rows: give one LoopBudget per row")
    for i, b in enumerate(budgets):
        if not isinstance(b, LoopBudget):
            raise TypeError(f"budgets[{i}] is a {type(b).__name__}, not a LoopBudget")
        if exit in ("fixed", "act") and b.exit_threshold is not None:
            raise ValueError(f"budgets[{i}] sets exit_threshold={b.exit_threshold}, but exit={exit!r} takes none: "
                             "drop it, or choose exit='kl' or exit='latent'")
        if exit in ("fixed", "act") and b.min_loops > 1:
            raise ValueError(f"budgets[{i}] sets min_loops={b.min_loops}, but exit={exit!r} "
                             + ("runs exactly max_loops" if exit == "fixed" else "halts by its halting probability")
                             + ": drop min_loops, or choose exit='kl' or exit='latent'")
    return budgets


class RowBudgets:
    """The budgets of one forward's rows as tensors on the model's device (and the depths on the
    host, where the loop decides which rows still run without reading the device)."""

    def __init__(self, budgets: Sequence[LoopBudget], default_threshold: Optional[float], device) -> None:
        self.budgets = tuple(budgets)
        self.max_host = np.array([b.max_loops for b in budgets], dtype=np.int64)
        self.min_host = np.array([b.min_loops for b in budgets], dtype=np.int64)
        thresholds = [default_threshold if b.exit_threshold is None else b.exit_threshold for b in budgets]
        self.threshold_host = np.array([math.nan if t is None else t for t in thresholds], dtype=np.float64)
        self.max_loops = torch.as_tensor(self.max_host, device=device)
        self.min_loops = torch.as_tensor(self.min_host, device=device)
        # float32 as the scalar threshold of a per-call forward: a criterion compares in its own dtype
        self.threshold = torch.as_tensor(self.threshold_host, dtype=torch.float32, device=device)

    @property
    def n_loops(self) -> int:
        return int(self.max_host.max())

    @property
    def varied(self) -> bool:
        """Whether some row stops before the last iteration of the forward."""
        return bool((self.max_host < self.n_loops).any())

    def select(self, rows: torch.Tensor) -> "RowBudgets":
        """The budgets of `rows` only (a compacted ACT step runs a subset of rows)."""
        sub = RowBudgets.__new__(RowBudgets)
        idx = rows.cpu().numpy()
        sub.budgets = tuple(self.budgets[i] for i in idx)
        sub.max_host, sub.min_host, sub.threshold_host = self.max_host[idx], self.min_host[idx], self.threshold_host[idx]
        sub.max_loops, sub.min_loops, sub.threshold = self.max_loops[rows], self.min_loops[rows], self.threshold[rows]
        return sub

    def thresholds(self, like: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Each row's threshold in the criterion's dtype, shaped to compare with `like` ((B, T), or
        (N,) with `rows` the row of each entry)."""
        th = self.threshold if rows is None else self.threshold[rows]
        th = th.to(like.dtype)
        return th if rows is not None else th[:, None]

    def gate(self, stop: Optional[torch.Tensor], t: int, rows: Optional[torch.Tensor] = None,
             shape=None) -> torch.Tensor:
        """After iteration t (0-based): the policy's `stop` where the row's min_loops allows it, or
        the row's max_loops reached. `stop` (B, T) or (N,) with `rows`; None: the policy has no
        decision yet (then `shape` gives the (B, T) result shape)."""
        mx, mn = (self.max_loops, self.min_loops) if rows is None else (self.max_loops[rows], self.min_loops[rows])
        cut, allowed = mx <= t + 1, mn <= t + 1
        if rows is None:
            cut, allowed = cut[:, None], allowed[:, None]
        if stop is None:
            return cut.expand(shape) if rows is None else cut
        return (stop & allowed) | cut

    def running_rows(self, t: int) -> np.ndarray:
        """(B,) host bool: rows whose budget allows an iteration after iteration t."""
        return self.max_host > t + 1
