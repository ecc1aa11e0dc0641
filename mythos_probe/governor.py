"""The cost governor: applies the cost limits of a profiles file in-process, request by request.

`Governor(profiles).admit(attributes)` returns the request's `LoopBudget`: its group's profile
(`LoopProfiles.budget_for`), with max loops lowered to the limit's `degraded_max_loops` while a
key it belongs to (an endpoint, a user, any attribute the limit names) has spent its FLOPs for
the current window, and the reason in `LoopBudget.reason` (the loop carries it onto the trace,
`LoopTrace.row_budget_reason`). A request is refused (`BudgetExceeded`) only where the limit says
`refuse=True`. Spending is charged after each forward (`charge`, or the governor as an
`attach(on_trace=[governor])` sink charging each served trace's `flops`), over a sliding window
per key: entries older than `window_s` seconds fall out.

A limit whose `value` is "*" applies to every value of its key separately (a per-user budget for
every user). `counts()` gives, per key, the requests admitted, degraded and refused.

The clock is injectable (`clock=`) so tests drive time exactly; the default is
`time.monotonic`. Thread-safe: one lock around the ledger.

This module is not: the choice of profiles (`loop_profiles`), the loop (`model`), nor alerting
(`budget_rules` turns the same limits into Prometheus rules).
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from typing import Any, Callable, Mapping

from mythos_probe.loop_profiles import CostLimit, LoopProfiles

ANY = "*"


class BudgetExceeded(RuntimeError):
    """A request refused because a limit with `refuse=True` is spent."""


class Governor:
    def __init__(self, profiles: LoopProfiles, clock: Callable[[], float] = time.monotonic) -> None:
        self.profiles = profiles
        self.clock = clock
        self._lock = threading.Lock()
        self._ledger: dict[tuple[int, str], deque[tuple[float, float]]] = {}  # (limit index, value) → (t, flops)
        self._admitted: Counter = Counter()
        self._degraded: Counter = Counter()
        self._refused: Counter = Counter()

    def _keys(self, attributes: Mapping[str, Any]) -> list[tuple[int, CostLimit, str]]:
        out = []
        for i, limit in enumerate(self.profiles.limits):
            if limit.key not in attributes:
                continue
            value = str(attributes[limit.key])
            if limit.value in (ANY, value):
                out.append((i, limit, value))
        return out

    def _spent(self, index: int, limit: CostLimit, value: str, now: float) -> float:
        entries = self._ledger.get((index, value))
        if not entries:
            return 0.0
        while entries and entries[0][0] <= now - limit.window_s:
            entries.popleft()
        return sum(f for _, f in entries)

    def spent(self, key: str, value: str) -> float:
        """FLOPs charged to `key=value` in the current window of the first limit naming it."""
        with self._lock:
            now = self.clock()
            for index, limit, v in self._keys({key: value}):
                return self._spent(index, limit, v, now)
        return 0.0

    def admit(self, attributes: Mapping[str, Any]):
        """The `LoopBudget` for a request with these attributes (module docstring)."""
        budget = self.profiles.budget_for(attributes)
        with self._lock:
            now = self.clock()
            over = []
            for index, limit, value in self._keys(attributes):
                spent = self._spent(index, limit, value, now)
                if spent >= limit.flops:
                    over.append((limit, value, spent))
            names = [f"{limit.key}={value}" for limit, value, _ in over]
            refusing = [(limit, value, spent) for limit, value, spent in over if limit.refuse]
            if refusing:
                limit, value, spent = refusing[0]
                self._refused.update(names)
                raise BudgetExceeded(
                    f"{limit.key}={value} spent {spent:.3g} FLOPs in the last {limit.window_s:g} s, over its limit "
                    f"{limit.flops:.3g}: refused (the limit says refuse=true; set it false to degrade instead)")
            key_names = [f"{limit.key}={value}" for _, limit, value in self._keys(attributes)]
            self._admitted.update(key_names)
            if not over:
                return budget
            self._degraded.update(names)
        from mythos_probe.model.budgets import LoopBudget

        limit, value, spent = min(over, key=lambda o: o[0].degraded_max_loops)
        depth = min(budget.max_loops, limit.degraded_max_loops)
        reason = (f"over budget: {limit.key}={value} spent {spent:.3g} FLOPs in the last {limit.window_s:g} s "
                  f"(limit {limit.flops:.3g}): max_loops {budget.max_loops} → {depth}")
        return LoopBudget(depth, min(budget.min_loops, depth), budget.exit_threshold, reason)

    def charge(self, attributes: Mapping[str, Any], flops: float) -> None:
        """Add a finished request's FLOPs to every key it belongs to."""
        if not (isinstance(flops, (int, float)) and math.isfinite(flops) and flops >= 0):
            raise ValueError(f"flops must be a finite non-negative number, got {flops!r}")
        with self._lock:
            now = self.clock()
            for index, _, value in self._keys(attributes):
                self._ledger.setdefault((index, value), deque()).append((now, float(flops)))

    def __call__(self, trace) -> None:
        """An `attach(on_trace=[...])` sink: charges each served forward's `flops` (cost probe)."""
        if trace.kind != "served":
            return
        flops = trace.forward_metrics.get("flops")
        if flops is None or not math.isfinite(flops):
            raise ValueError("the governor charges each forward's `flops`: attach with the 'cost' probe")
        self.charge(trace.attributes, flops)

    def counts(self) -> dict[str, dict[str, int]]:
        """Per key ("endpoint=/hard"): requests admitted (degraded ones included), degraded, refused."""
        with self._lock:
            keys = set(self._admitted) | set(self._refused)
            return {k: {"admitted": self._admitted[k], "degraded": self._degraded[k], "refused": self._refused[k]}
                    for k in sorted(keys)}
