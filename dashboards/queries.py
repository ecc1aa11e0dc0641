"""The dashboard's SQL: every aggregation a view shows, run in DuckDB against the store.

Each function takes the store and a `Selection` (the filter bar) and returns a small pandas
DataFrame that is already aggregated; pandas only carries the result to plotly. Values always
travel as parameters; the only identifiers spliced into SQL are metric names checked against the
vocabulary in `mythos_probe.records`.

This module is not: the filter widgets (`filters.py`), the figures (the pages) or the early-exit
what-if (`whatif.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from mythos_probe.collectors.ranks import CROSS_RANK
from mythos_probe.records import ITERATION_METRIC_NAMES, POSITION_METRIC_NAMES

# Time windows are relative to the newest forward in the store, not to the wall clock, so that an
# old file opened with `mythos-probe dashboard` shows its last hour rather than nothing.
WINDOWS = {"all": None, "5m": 300, "1h": 3600, "24h": 86400, "7d": 7 * 86400}

@dataclass(frozen=True)
class Selection:
    """Which forwards a view aggregates, and how it groups them."""

    models: tuple[str, ...] = ()
    runs: tuple[str, ...] = ()
    window: str = "all"
    attribute: str | None = None  # user attribute key filtered on
    values: tuple[str, ...] = ()  # accepted values of `attribute`
    group: str = "none"  # "none" | "model" | "run" | "attr:<key>"

    def cte(self) -> tuple[str, list]:
        """`sel` CTE: filtered forwards plus a `grp` column; with its parameters in order."""
        params: list = []
        if self.group == "model":
            grp = "f.model_id"
        elif self.group == "run":
            grp = "f.run_id"
        elif self.group.startswith("attr:"):
            grp = "coalesce(json_extract_string(f.attributes, ?), '(unset)')"
            params.append(_json_path(self.group[5:]))
        else:
            grp = "'all'"
        where = ["TRUE"]
        if self.models:
            where.append("list_contains(?, f.model_id)")
            params.append(list(self.models))
        if self.runs:
            where.append("list_contains(?, f.run_id)")
            params.append(list(self.runs))
        seconds = WINDOWS.get(self.window)
        if seconds is not None:
            where.append("f.start_time >= (SELECT max(start_time) FROM forwards) - to_seconds(?)")
            params.append(float(seconds))
        if self.attribute and self.values:
            where.append("list_contains(?, json_extract_string(f.attributes, ?))")
            params += [list(self.values), _json_path(self.attribute)]
        sql = f"sel AS (SELECT f.*, {grp} AS grp FROM forwards f WHERE {' AND '.join(where)})"
        return sql, params


def _json_path(key: str) -> str:
    return '$."' + key.replace('"', '\\"') + '"'


def metric_column(name: str, vocabulary: tuple[str, ...]) -> str:
    if name not in vocabulary:
        raise ValueError(f"unknown metric {name!r}")
    return f'"{name}"'


def finite(column: str) -> str:
    """`column` with NaN and ±Inf as NULL, so that aggregates skip them (DuckDB's max treats NaN as
    the largest value and avg propagates it). Divergences are shown separately, from `diverged_at`."""
    return f"CASE WHEN isfinite({column}) THEN {column} END"


def select(store, sel: Selection, body: str, params: list | tuple = ()) -> pd.DataFrame:
    """Run `body` (a SELECT, or further CTEs starting with a comma) after the `sel` CTE."""
    cte, cte_params = sel.cte()
    return store.query(f"WITH {cte} {body}", [*cte_params, *params])


# --- store-wide lists for the filter bar -------------------------------------------------------


def distinct_values(store, column: str) -> list[str]:
    if column not in ("model_id", "run_id"):
        raise ValueError(f"not a filter column: {column!r}")
    return store.query(f"SELECT DISTINCT {column} AS v FROM forwards ORDER BY v")["v"].tolist()


def attribute_keys(store) -> list[str]:
    df = store.query("SELECT DISTINCT unnest(json_keys(attributes)) AS k FROM forwards ORDER BY k")
    return df["k"].tolist()


def attribute_values(store, key: str, limit: int = 200) -> list[str]:
    df = store.query(
        "SELECT DISTINCT json_extract_string(attributes, ?) AS v FROM forwards WHERE v IS NOT NULL ORDER BY v LIMIT ?",
        [_json_path(key), limit],
    )
    return df["v"].tolist()


def forward_count(store) -> int:
    return int(store.query("SELECT count(*) AS n FROM forwards")["n"].iloc[0])


# --- runs and forwards --------------------------------------------------------------------------


def totals(store, sel: Selection) -> pd.DataFrame:
    return select(
        store,
        sel,
        "SELECT count(*) AS forwards, count(DISTINCT run_id) AS runs, coalesce(sum(tokens), 0) AS tokens,"
        " avg(duration_ms) AS mean_ms, quantile_cont(duration_ms, 0.95) AS p95_ms,"
        " avg(iterations) AS mean_iterations, sum(mean_iterations * batch * seq_len) / sum(batch * seq_len)"
        " AS iterations_per_token FROM sel",
    )


def runs(store, sel: Selection) -> pd.DataFrame:
    return select(
        store,
        sel,
        "SELECT run_id, model_id, count(*) AS forwards, sum(tokens) AS tokens, avg(duration_ms) AS mean_ms,"
        " quantile_cont(duration_ms, 0.95) AS p95_ms, avg(iterations) AS mean_iterations,"
        " sum(mean_iterations * batch * seq_len) / sum(batch * seq_len) AS iterations_per_token,"
        " min(start_time) AS first, max(start_time) AS last FROM sel GROUP BY run_id, model_id ORDER BY last DESC",
    )


def forwards(store, sel: Selection, limit: int = 100) -> pd.DataFrame:
    return select(
        store,
        sel,
        "SELECT start_time, trace_id, run_id, model_id, step, tokens, duration_ms, iterations, n_loops,"
        " mean_iterations, CAST(attributes AS VARCHAR) AS attributes FROM sel"
        " ORDER BY start_time DESC, trace_id LIMIT ?",
        [limit],
    )


def forward(store, trace_id: str) -> pd.DataFrame:
    """The forward(s) of one trace id (a trace normally holds one forward span)."""
    return store.query(
        "SELECT *, CAST(attributes AS VARCHAR) AS attributes_text FROM forwards WHERE trace_id = ?"
        " ORDER BY start_time LIMIT 1",
        [trace_id],
    )


def newest_trace(store, sel: Selection) -> str | None:
    df = select(store, sel, "SELECT trace_id FROM sel ORDER BY start_time DESC LIMIT 1")
    return None if df.empty else str(df["trace_id"].iloc[0])


# The forward `forward` shows, as its store-local integer key: a join on it lets DuckDB skip every
# row group of the child table whose forward_id range misses it, instead of scanning the table.
_ONE_FORWARD = "one AS (SELECT forward_id FROM forwards WHERE trace_id = ? ORDER BY start_time LIMIT 1)"


def position_grid(store, trace_id: str, batch_index: int, metric: str) -> pd.DataFrame:
    """Long-form position × iteration values of one forward's batch row, with token text."""
    col = metric_column(metric, POSITION_METRIC_NAMES)
    return store.query(
        f"WITH {_ONE_FORWARD} SELECT position, iteration, {col} AS value, token_text, iterations_used"
        " FROM positions p JOIN one USING (forward_id) WHERE p.batch_index = ? ORDER BY position, iteration",
        [trace_id, batch_index],
    )


def forward_iterations(store, trace_id: str, metrics: tuple[str, ...]) -> pd.DataFrame:
    cols = ", ".join(metric_column(m, ITERATION_METRIC_NAMES) for m in metrics)
    return store.query(
        f"WITH {_ONE_FORWARD} SELECT iteration, {cols} FROM iterations JOIN one USING (forward_id) ORDER BY iteration",
        [trace_id],
    )


# --- loops and halting ----------------------------------------------------------------------------

_ITER_JOIN = "FROM iterations i JOIN sel f ON i.forward_id = f.forward_id"


def tokens_by_iterations_used(store, sel: Selection) -> pd.DataFrame:
    """Tokens per number of iterations used (exit_count at iteration t counts tokens using t + 1)."""
    return select(
        store,
        sel,
        f"SELECT f.grp, i.iteration + 1 AS used, sum(i.exit_count) AS tokens {_ITER_JOIN}"
        " GROUP BY ALL HAVING sum(i.exit_count) > 0 ORDER BY f.grp, used",
    )


def forwards_by_iterations(store, sel: Selection) -> pd.DataFrame:
    return select(store, sel, "SELECT grp, iterations, count(*) AS forwards FROM sel GROUP BY ALL ORDER BY grp, iterations")


def compute_saved(store, sel: Selection) -> pd.DataFrame:
    """Per group: iterations used per token versus the requested maximum, and the loop share saved."""
    return select(
        store,
        sel,
        "SELECT grp, count(*) AS forwards, sum(batch * seq_len) AS tokens,"
        " sum(mean_iterations * batch * seq_len) / sum(batch * seq_len) AS iterations_per_token,"
        " sum(n_loops * batch * seq_len) / sum(batch * seq_len) AS max_per_token,"
        " 1 - sum(mean_iterations * batch * seq_len) / sum(n_loops * batch * seq_len) AS saved_share"
        " FROM sel GROUP BY grp ORDER BY grp",
    )


def halting_by_iteration(store, sel: Selection) -> pd.DataFrame:
    return select(
        store,
        sel,
        "SELECT f.grp, i.iteration, sum(i.exit_count) AS exits,"
        " sum(sum(i.exit_count)) OVER (PARTITION BY f.grp ORDER BY i.iteration)"
        "   / sum(sum(i.exit_count)) OVER (PARTITION BY f.grp) AS cumulative_halted,"
        " avg(i.halted_fraction) AS halted_fraction, avg(i.cum_halt) AS cum_halt,"
        " avg(i.halt_low_share) AS halt_low_share, avg(i.halt_high_share) AS halt_high_share"
        f" {_ITER_JOIN} GROUP BY f.grp, i.iteration ORDER BY f.grp, i.iteration",
    )


def saturation(store, sel: Selection) -> pd.DataFrame:
    return select(
        store,
        sel,
        "SELECT grp, avg(halted_first_share) AS halted_first_share, avg(reached_last_share) AS reached_last_share,"
        " avg(remainder_mass) AS remainder_mass, avg(ponder_cost) AS ponder_cost FROM sel GROUP BY grp ORDER BY grp",
    )


# --- spectral, experts, lens ------------------------------------------------------------------


def iteration_means(store, sel: Selection, metrics: tuple[str, ...]) -> pd.DataFrame:
    """Mean of each iteration metric per group and iteration, over its finite values."""
    cols = ", ".join(f"avg({finite('i.' + c)}) AS {c}" for c in (metric_column(n, ITERATION_METRIC_NAMES) for n in metrics))
    return select(store, sel, f"SELECT f.grp, i.iteration, {cols} {_ITER_JOIN} GROUP BY ALL ORDER BY f.grp, i.iteration")


def spectral_over_steps(store, sel: Selection, x: str) -> pd.DataFrame:
    """Per run and step (or second of wall clock): ρ(Ā), peak state norm and growth, divergences."""
    xcol = {"step": "f.step", "time": "date_trunc('second', f.start_time)"}[x]
    return select(
        store,
        sel,
        f"SELECT f.run_id, {xcol} AS x, avg({finite('f.rho_A')}) AS rho_A, max({finite('i.state_norm')}) AS state_norm,"
        f" max({finite('i.growth_ratio')}) AS growth_ratio, count(DISTINCT f.trace_id) AS forwards,"
        " count(DISTINCT CASE WHEN f.diverged_at >= 0 THEN f.trace_id END) AS diverged"
        f" {_ITER_JOIN} GROUP BY ALL ORDER BY f.run_id, x",
    )


def divergences(store, sel: Selection, limit: int = 50) -> pd.DataFrame:
    return select(
        store,
        sel,
        "SELECT start_time, trace_id, run_id, step, CAST(diverged_at AS INTEGER) AS diverged_at, rho_A FROM sel"
        " WHERE diverged_at >= 0 ORDER BY start_time DESC LIMIT ?",
        [limit],
    )


def expert_load(store, sel: Selection) -> pd.DataFrame:
    """Share of routed tokens per expert at each iteration, summed over the selected forwards."""
    return select(
        store,
        sel,
        "SELECT e.iteration, e.expert, sum(e.load) AS load,"
        " sum(e.load) / sum(sum(e.load)) OVER (PARTITION BY e.iteration) AS share"
        " FROM experts e JOIN sel f ON e.forward_id = f.forward_id"
        " GROUP BY e.iteration, e.expert ORDER BY e.iteration, e.expert",
    )


# --- cost ------------------------------------------------------------------------------------------


def cost_by_group(store, sel: Selection) -> pd.DataFrame:
    return select(
        store,
        sel,
        "SELECT grp, count(*) AS forwards, sum(tokens) AS tokens,"
        " sum(mean_iterations * batch * seq_len) AS token_iterations, sum(flops) AS flops,"
        " avg(flops_saved) AS flops_saved, avg(duration_ms) AS mean_ms FROM sel GROUP BY grp ORDER BY flops DESC",
    )


def cost_over_time(store, sel: Selection, buckets: int = 60) -> pd.DataFrame:
    """FLOPs and token-iterations per time bucket; the bucket width spreads the range over ~`buckets`."""
    return select(
        store,
        sel,
        ", span AS (SELECT greatest(epoch_us(max(start_time)) - epoch_us(min(start_time)), 1) AS us FROM sel)"
        " SELECT time_bucket(to_microseconds(CAST(ceil((SELECT us FROM span) / ?) AS BIGINT)), start_time) AS t,"
        " grp, sum(flops) AS flops, sum(mean_iterations * batch * seq_len) AS token_iterations"
        " FROM sel GROUP BY ALL ORDER BY t, grp",
        [buckets],
    )


def cross_rank(store, sel: Selection) -> pd.DataFrame:
    """Per (run_id, loop_name, step, expert): expert load summed over ranks, and the step's slowest
    rank in iterations and time (columns in `collectors.ranks`)."""
    return select(store, sel, CROSS_RANK)
