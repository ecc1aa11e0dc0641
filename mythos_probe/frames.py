"""pandas DataFrames of `LoopTrace`s for notebooks: one function per kind, long format, keyed like
the DuckDB tables (trace_id, span_id) so a frame and a SQL query over the store line up.

This module is not: the store (`collectors`) or the figures (`plots.py`). It builds frames with
numpy in bulk (no per-row Python loops over iterations or positions).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from mythos_probe.records import (
    FORWARD_METRIC_NAMES,
    ITERATION_METRIC_NAMES,
    POSITION_METRIC_NAMES,
    LoopTrace,
)

_KEYS = ["trace_id", "span_id", "run_id", "model_id", "loop_name", "kind", "step", "rank"]


def forwards(traces: Sequence[LoopTrace]) -> pd.DataFrame:
    """One row per forward: identity, shape, budget, forward metrics and user attributes."""
    rows = []
    for t in traces:
        row = {k: getattr(t, k) for k in _KEYS}
        row.update(
            start_time=pd.Timestamp(t.start_ns, unit="ns", tz="UTC"), duration_ms=t.duration_ms,
            batch=t.batch, seq_len=t.seq_len, tokens=t.batch * t.seq_len, n_loops=t.n_loops,
            iterations=t.iterations, exit_policy=t.exit_policy, detail=t.detail, n_experts=t.n_experts,
        )
        row.update(local_rank=t.local_rank, world_size=t.world_size, host=t.host, pid=t.pid, job_id=t.job_id)
        row.update({m: t.forward_metrics.get(m, np.nan) for m in FORWARD_METRIC_NAMES})
        row.update({f"attr.{k}": v for k, v in t.attributes.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def iterations(traces: Sequence[LoopTrace]) -> pd.DataFrame:
    """One row per (forward, iteration) with every per-iteration metric (NaN where not measured)."""
    parts = []
    for t in traces:
        n = t.iterations
        cols = {k: np.repeat(getattr(t, k), n) for k in _KEYS}
        cols["iteration"] = np.arange(n)
        for m in ITERATION_METRIC_NAMES:
            cols[m] = t.iteration_metrics.get(m, np.full(n, np.nan))
        parts.append(pd.DataFrame(cols))
    return _concat(parts, _KEYS + ["iteration", *ITERATION_METRIC_NAMES])


def positions(traces: Sequence[LoopTrace]) -> pd.DataFrame:
    """One row per (forward, batch index, position, iteration); only traces recorded with
    detail="positions" contribute."""
    parts = []
    for t in traces:
        if t.detail != "positions":
            continue
        B, T, n = t.batch, t.seq_len, t.iterations
        b, p, i = (a.reshape(-1) for a in np.meshgrid(np.arange(B), np.arange(T), np.arange(n), indexing="ij"))
        cols = {k: np.repeat(getattr(t, k), b.size) for k in _KEYS}
        cols.update(batch_index=b, position=p, iteration=i)
        cols["token_id"] = t.token_ids[b, p] if t.token_ids is not None else np.full(b.size, -1)
        if t.token_text is not None:
            cols["token_text"] = np.asarray(t.token_text, dtype=object)[b, p]
        if t.position_iterations is not None:
            cols["iterations_used"] = t.position_iterations[b, p]
        for m in POSITION_METRIC_NAMES:
            arr = t.position_metrics.get(m)
            cols[m] = arr.reshape(-1) if arr is not None else np.full(b.size, np.nan, dtype=np.float32)
        parts.append(pd.DataFrame(cols))
    return _concat(parts, _KEYS + ["batch_index", "position", "iteration", "token_id", *POSITION_METRIC_NAMES])


def experts(traces: Sequence[LoopTrace]) -> pd.DataFrame:
    """One row per (forward, iteration, expert) with the number of tokens routed to it."""
    parts = []
    for t in traces:
        if t.expert_load is None:
            continue
        n, E = t.expert_load.shape
        it, ex = (a.reshape(-1) for a in np.meshgrid(np.arange(n), np.arange(E), indexing="ij"))
        cols = {k: np.repeat(getattr(t, k), it.size) for k in _KEYS}
        cols.update(iteration=it, expert=ex, load=t.expert_load.reshape(-1))
        parts.append(pd.DataFrame(cols))
    return _concat(parts, _KEYS + ["iteration", "expert", "load"])


def _concat(parts: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


def cross_rank(source) -> pd.DataFrame:
    """The cross-rank join by (run_id, loop_name, step): expert loads summed over ranks, the
    slowest rank's iterations and time (`collectors.ranks.CROSS_RANK` documents the columns), run
    in SQL on `source`: a store (`Store`, `ParquetStore`) or `LoopTrace`s, loaded into an
    in-memory store first."""
    from mythos_probe.collectors.ranks import CROSS_RANK

    if hasattr(source, "query"):
        return source.query("WITH sel AS (SELECT * FROM forwards) " + CROSS_RANK)
    from mythos_probe.collectors.store import Store

    with Store(":memory:") as store:
        store.write_traces(source)
        return store.query("WITH sel AS (SELECT * FROM forwards) " + CROSS_RANK)
