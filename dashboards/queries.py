"""The dashboard's SQL: every aggregation a view shows, run in DuckDB against the store.

Each function takes the store and a `Selection` (the filter bar) and returns a small pandas
DataFrame that is already aggregated; pandas only carries the result to plotly. Values always
travel as parameters; the only identifiers spliced into SQL are metric names checked against the
vocabulary in `mythos_probe.records`.

This module is not: the filter widgets (`filters.py`), the figures (the pages) or the early-exit
what-if (`whatif.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pandas as pd

from mythos_probe.collectors import rollups
from mythos_probe.collectors.ranks import CROSS_RANK
from mythos_probe.records import ITERATION_METRIC_NAMES, POSITION_METRIC_NAMES

# Time windows are relative to the newest forward in the store, not to the wall clock, so that an
# old file opened with `mythos-probe dashboard` shows its last hour rather than nothing.
WINDOWS = {"all": None, "5m": 300, "1h": 3600, "24h": 86400, "7d": 7 * 86400}

# Group-by choices on forward columns; "attr:<key>" groups by a user attribute.
GROUP_COLUMNS = {"model": "f.model_id", "run": "f.run_id", "kind": "f.kind", "loop": "f.loop_name",
                 "rank": "CAST(f.rank AS VARCHAR)", "policy": "f.exit_policy"}


@dataclass(frozen=True)
class Selection:
    """Which forwards a view aggregates, and how it groups them. By default served forwards
    only: full-depth shadows and training forwards would skew every serving figure."""

    models: tuple[str, ...] = ()
    runs: tuple[str, ...] = ()
    window: str = "all"
    attribute: str | None = None  # user attribute key filtered on
    values: tuple[str, ...] = ()  # accepted values of `attribute`
    group: str = "none"  # "none" | a GROUP_COLUMNS key | "attr:<key>"
    kinds: tuple[str, ...] = ("served",)  # () for every kind
    loops: tuple[str, ...] = ()
    ranks: tuple[int, ...] = ()
    policies: tuple[str, ...] = ()
    min_iterations: int | None = None  # iterations executed by the forward, inclusive
    max_iterations: int | None = None
    start: pd.Timestamp | None = None  # absolute range on start_time (UTC), inclusive
    end: pd.Timestamp | None = None

    def _group(self) -> tuple[str, list]:
        if self.group in GROUP_COLUMNS:
            return GROUP_COLUMNS[self.group], []
        if self.group.startswith("attr:"):
            return "coalesce(json_extract_string(f.attributes, ?), '(unset)')", [_json_path(self.group[5:])]
        if self.group == "none":
            return "'all'", []
        raise ValueError(f"cannot group by {self.group!r}; choose none, {', '.join(GROUP_COLUMNS)} or attr:<key>")

    def _labels(self) -> tuple[list[str], list]:
        """Conditions on the forward labels a rollup keeps (`collectors.rollups.KEY`), over `f`."""
        where, params = [], []
        for column, accepted in (("model_id", self.models), ("run_id", self.runs), ("kind", self.kinds),
                                 ("loop_name", self.loops), ("rank", self.ranks), ("exit_policy", self.policies)):
            if accepted:
                where.append(f"list_contains(?, f.{column})")
                params.append(list(accepted))
        if self.min_iterations is not None:
            where.append("f.iterations >= ?")
            params.append(int(self.min_iterations))
        if self.max_iterations is not None:
            where.append("f.iterations <= ?")
            params.append(int(self.max_iterations))
        return where, params

    def _bounds(self) -> tuple[list[tuple[str, str, list]], list[tuple[str, str, list]]]:
        """(lower, upper) bounds on start_time as (operator, SQL value, its parameters)."""
        lower, upper = [], []
        if self.start is not None:
            lower.append((">=", "?", [self.start.to_pydatetime()]))
        if self.end is not None:
            upper.append(("<=", "?", [self.end.to_pydatetime()]))
        seconds = WINDOWS.get(self.window)
        if seconds is not None:
            lower.append((">=", "(SELECT max(start_time) FROM forwards) - to_seconds(?)", [float(seconds)]))
        return lower, upper

    def _attributes(self) -> tuple[list[str], list]:
        if self.attribute and self.values:
            return ["list_contains(?, json_extract_string(f.attributes, ?))"], [list(self.values), _json_path(self.attribute)]
        return [], []

    def cte(self) -> tuple[str, list]:
        """`sel` CTE: filtered forwards plus a `grp` column; with its parameters in order."""
        grp, params = self._group()
        where, label_params = self._labels()
        params += label_params
        lower, upper = self._bounds()
        for op, value, value_params in lower + upper:
            where.append(f"f.start_time {op} {value}")
            params += value_params
        attrs, attr_params = self._attributes()
        where += attrs
        params += attr_params
        sql = f"sel AS (SELECT f.*, {grp} AS grp FROM forwards f WHERE {' AND '.join(['TRUE', *where])})"
        return sql, params

    def scoped(self, store):
        """`store` as this selection reads it: a store that can skip files (a Parquet folder,
        by its manifest: `ParquetStore.pruned`) opens only those that may hold a selected forward."""
        prune = getattr(store, "pruned", None)
        if prune is None:
            return store
        return prune(start=self.start, end=self.end, window_s=WINDOWS.get(self.window), models=self.models, runs=self.runs)

    def rolls_up(self, store) -> bool:
        """Whether the views may read this selection from the store's rollups: the store keeps
        them (a DuckDB store does, a Parquet folder not) and every filter and the grouping are on
        labels they key (not on a user attribute)."""
        return bool(getattr(store, "has_rollups", False)) and not self._attributes()[0] and not self.group.startswith("attr:")

    def rollup_cte(self, table: str) -> tuple[str, list]:
        """`sel` CTE over rollup `table` (`collectors.rollups`) instead of raw rows: its rows in the
        hours the time range covers entirely, plus the rows of the hours the range cuts
        aggregated from raw rows, with `grp`; the same sums as the raw rows of the selection."""
        grp, grp_params = self._group()
        where, label_params = self._labels()
        lower, upper = self._bounds()
        bound_params = [p for _, _, ps in lower + upper for p in ps]

        def inside(hour: str) -> list[str]:  # every instant of the hour starting at `hour` is in the range
            return ([f"{hour} {op} {value}" for op, value, _ in lower]
                    + [f"{hour} + INTERVAL 1 HOUR - INTERVAL 1 MICROSECOND {op} {value}" for op, value, _ in upper])

        full = f"SELECT f.*, {grp} AS grp FROM {table} f WHERE {' AND '.join(['TRUE', *where, *inside('f.hour')])}"
        params = [*grp_params, *label_params, *bound_params]
        if not lower and not upper:
            return f"sel AS ({full})", params
        # the hours the range cuts: their forwards' raw rows, rolled up as ingest does
        cut = [f"f.start_time {op} {value}" for op, value, _ in lower + upper]
        covered = " AND ".join(inside("date_trunc('hour', f.start_time)"))
        edge = f"(SELECT * FROM forwards f WHERE {' AND '.join([*where, *cut, f'NOT coalesce({covered}, FALSE)'])})"
        sql = f"sel AS ({full} UNION ALL BY NAME SELECT f.*, {grp} AS grp FROM ({rollups.aggregate(table, edge)}) f)"
        return sql, [*params, *grp_params, *label_params, *bound_params, *bound_params]


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
    return sel.scoped(store).query(f"WITH {cte} {body}", [*cte_params, *params])


def _select_rolled(store, sel: Selection, table: str, body: str, params: list | tuple = ()) -> pd.DataFrame:
    """As `select`, with `sel` the selection's rows of rollup `table` (`Selection.rollup_cte`)."""
    cte, cte_params = sel.rollup_cte(table)
    return store.query(f"WITH {cte} {body}", [*cte_params, *params])


def _ratio(total: str, count: str) -> str:
    """A mean from a rollup's sum and count columns: what `avg` gives over the rows they sum."""
    return f"sum({total}) / nullif(sum({count}), 0)"


# --- store-wide lists for the filter bar -------------------------------------------------------


FILTER_COLUMNS = ("model_id", "run_id", "kind", "loop_name", "rank", "exit_policy")


def distinct_values(store, column: str) -> list:
    if column not in FILTER_COLUMNS:
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
        " AS iterations_per_token, max(start_time) AS last FROM sel",
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


# The forwards list: forward columns a user sorts and filters on, then one column per user
# attribute ("attr__<key>"); ag-grid's text and number filter types map to SQL conditions.
LIST_COLUMNS = ("start_time", "trace_id", "run_id", "model_id", "kind", "loop_name", "rank", "step", "tokens",
                "duration_ms", "iterations", "n_loops", "exit_policy", "mean_iterations")
ATTRIBUTE_PREFIX = "attr__"
_TEXT_FILTERS = {"contains": ("contains({c}, ?)", "{v}"), "notContains": ("NOT contains({c}, ?)", "{v}"),
                 "equals": ("{c} = ?", "{v}"), "notEqual": ("{c} <> ?", "{v}"),
                 "startsWith": ("starts_with({c}, ?)", "{v}"), "endsWith": ("ends_with({c}, ?)", "{v}")}
_NUMBER_FILTERS = {"equals": "=", "notEqual": "<>", "greaterThan": ">", "greaterThanOrEqual": ">=",
                   "lessThan": "<", "lessThanOrEqual": "<="}


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _list_sql(sel: Selection, keys: list[str], sort: list[dict], filters: dict, count: bool = False) -> tuple[str, list]:
    """The selected forwards as list rows, filtered and sorted as the grid asks; (body, params).
    `count`: unsorted, with only the attribute columns a filter reads (what counting them needs:
    at a million forwards, parsing every forward's attributes and sorting them takes most of a
    second that the count does not need)."""
    known = set(LIST_COLUMNS) | {ATTRIBUTE_PREFIX + k for k in keys}
    if count:
        keys = [k for k in keys if ATTRIBUTE_PREFIX + k in (filters or {})]
        sort = []
    attrs = [f"json_extract_string(attributes, ?) AS {_quote(ATTRIBUTE_PREFIX + k)}" for k in keys]
    params: list = [_json_path(k) for k in keys]
    where = ["TRUE"]
    for column, spec in (filters or {}).items():
        if column not in known:
            raise ValueError(f"cannot filter the forwards list on {column!r}")
        c, kind, op = _quote(column), spec.get("filterType"), spec.get("type")
        if kind == "text" and op in _TEXT_FILTERS:
            where.append(_TEXT_FILTERS[op][0].format(c=f"CAST({c} AS VARCHAR)"))
            params.append(str(spec.get("filter", "")))
        elif kind == "number" and op in _NUMBER_FILTERS:
            where.append(f"{c} {_NUMBER_FILTERS[op]} ?")
            params.append(float(spec["filter"]))
        elif kind == "number" and op == "inRange":
            where.append(f"{c} BETWEEN ? AND ?")
            params += [float(spec["filter"]), float(spec["filterTo"])]
        else:
            raise ValueError(f"unsupported filter {kind}/{op} on {column!r}")
    order = []
    for item in sort or ():
        if item.get("colId") not in known or item.get("sort") not in ("asc", "desc"):
            raise ValueError(f"cannot sort the forwards list by {item!r}")
        order.append(f"{_quote(item['colId'])} {item['sort'].upper()} NULLS LAST")
    order += ["start_time DESC", "trace_id"]  # a stable order under paging
    cols = ", ".join(LIST_COLUMNS + tuple(attrs))
    body = f"SELECT * FROM (SELECT {cols} FROM sel) t WHERE {' AND '.join(where)}"
    return (body if count else f"{body} ORDER BY {', '.join(order)}"), params


def forward_list(store, sel: Selection, keys: list[str], sort: list[dict] | None = None, filters: dict | None = None,
                 offset: int = 0, limit: int | None = 100) -> tuple[pd.DataFrame, int]:
    """(one page of list rows, rows matching in all): the forwards list paged on the server.
    `limit=None` returns every matching row (the CSV download)."""
    body, params = _list_sql(sel, keys, sort or [], filters or {})
    counted, count_params = _list_sql(sel, keys, sort or [], filters or {}, count=True)
    total = int(select(store, sel, f"SELECT count(*) AS n FROM ({counted})", count_params)["n"].iloc[0])
    if limit is None:
        return select(store, sel, body, params), total
    return select(store, sel, body + " LIMIT ? OFFSET ?", [*params, int(limit), int(offset)]), total


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


def position_means(store, sel: Selection, metric: str, per_group: int = 500, groups: int = 2) -> pd.DataFrame:
    """Position × iteration mean of a position metric over the newest `per_group` selected
    forwards of each of the first `groups` groups (batch rows pooled), with the mean iterations
    used per position and how many forwards each cell averages."""
    col = metric_column(metric, POSITION_METRIC_NAMES)
    picked = select(
        store,
        sel,
        ", ranked AS (SELECT forward_id, grp, row_number() OVER (PARTITION BY grp ORDER BY start_time DESC) AS k,"
        " dense_rank() OVER (ORDER BY grp) AS g FROM sel WHERE detail = 'positions')"
        " SELECT forward_id, grp FROM ranked WHERE k <= ? AND g <= ?",
        [per_group, groups],
    )
    if picked.empty:
        return pd.DataFrame(columns=["grp", "position", "iteration", "value", "used", "forwards"])
    # The ids as constants: DuckDB then reads only the row groups of positions holding them
    # (forwards are stored in arrival order, so the newest ones sit together).
    ids = picked["forward_id"].to_numpy()
    df = store.query(
        f"SELECT pick.grp, p.position, p.iteration, avg({finite('p.' + col)}) AS value,"
        " avg(p.iterations_used) AS used"
        " FROM positions p JOIN (SELECT unnest(?) AS forward_id, unnest(?) AS grp) pick USING (forward_id)"
        " WHERE p.forward_id BETWEEN ? AND ? GROUP BY ALL ORDER BY pick.grp, p.position, p.iteration",
        [ids.tolist(), picked["grp"].tolist(), int(ids.min()), int(ids.max())],
    )
    return df.assign(forwards=df["grp"].map(picked["grp"].value_counts()))


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
    if sel.rolls_up(store):
        return _select_rolled(
            store, sel, "rollup_iterations",
            "SELECT f.grp, f.iteration + 1 AS used, sum(f.sum__exit_count) AS tokens FROM sel f"
            " GROUP BY ALL HAVING sum(f.sum__exit_count) > 0 ORDER BY f.grp, used",
        )
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
        " sum(n_loops * batch * seq_len) / sum(batch * seq_len) AS max_per_token, max(n_loops) AS max_n_loops,"
        " 1 - sum(mean_iterations * batch * seq_len) / sum(n_loops * batch * seq_len) AS saved_share"
        " FROM sel GROUP BY grp ORDER BY grp",
    )


def halting_by_iteration(store, sel: Selection) -> pd.DataFrame:
    if sel.rolls_up(store):
        means = ", ".join(f"{_ratio(f'f.sum__{m}', f'f.n__{m}')} AS {m}"
                          for m in ("halted_fraction", "cum_halt", "halt_low_share", "halt_high_share"))
        return _select_rolled(
            store, sel, "rollup_iterations",
            "SELECT f.grp, f.iteration, sum(f.sum__exit_count) AS exits,"
            " sum(sum(f.sum__exit_count)) OVER (PARTITION BY f.grp ORDER BY f.iteration)"
            "   / sum(sum(f.sum__exit_count)) OVER (PARTITION BY f.grp) AS cumulative_halted,"
            f" {means} FROM sel f GROUP BY f.grp, f.iteration ORDER BY f.grp, f.iteration",
        )
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
    if sel.rolls_up(store) and all(m in rollups.ROLLED_METRICS for m in metrics):
        cols = ", ".join(f"{_ratio(f'f.fsum__{m}', f'f.fn__{m}')} AS {metric_column(m, ITERATION_METRIC_NAMES)}"
                         for m in metrics)
        return _select_rolled(store, sel, "rollup_iterations",
                             f"SELECT f.grp, f.iteration, {cols} FROM sel f GROUP BY ALL ORDER BY f.grp, f.iteration")
    cols = ", ".join(f"avg({finite('i.' + c)}) AS {c}" for c in (metric_column(n, ITERATION_METRIC_NAMES) for n in metrics))
    return select(store, sel, f"SELECT f.grp, i.iteration, {cols} {_ITER_JOIN} GROUP BY ALL ORDER BY f.grp, i.iteration")


def _per_forward_peaks(store, columns: str, where: str = "TRUE") -> str:
    """One row per selected forward holding iteration rows: `columns` (over `f`, the forward) and
    `growth`, its largest finite growth ratio; from `rollup_peaks` where the store keeps it."""
    if getattr(store, "has_rollups", False):
        return (f"SELECT {columns}, p.growth_peak AS growth FROM sel f JOIN rollup_peaks p USING (forward_id)"
                f" WHERE {where}")
    peaks = (f"SELECT i.forward_id, max({finite('i.growth_ratio')}) AS growth FROM iterations i"
             f" WHERE i.forward_id IN (SELECT f.forward_id FROM sel f WHERE {where}) GROUP BY i.forward_id")
    return f"SELECT {columns}, p.growth FROM sel f JOIN ({peaks}) p USING (forward_id) WHERE {where}"


def spectral_bands(store, sel: Selection, x: str, buckets: int = 80) -> pd.DataFrame:
    """ρ(Ā) and each forward's peak growth ratio per run, over training step or time cut into
    about `buckets` equal buckets: p10 / p50 / p90 over the forwards in each bucket, their count
    and time span (`t_lo`, `t_hi`), and where the bucket's forwards lie on x (their mean). A
    chart then draws a few hundred points per run however many forwards there are."""
    xcol = {"step": "CAST(f.step AS DOUBLE)", "time": "CAST(epoch_us(f.start_time) AS DOUBLE)"}[x]
    min_width = 1.0 if x == "step" else 1e6  # a step, a second
    return select(
        store,
        sel,
        f""", per AS ({_per_forward_peaks(store, f"f.run_id, {xcol} AS x, f.start_time, {finite('f.rho_A')} AS rho")}),
        span AS (SELECT min(x) AS lo, greatest((max(x) - min(x)) / ?, ?) AS width FROM per),
        b AS (SELECT per.*, floor((x - lo) / width) AS bucket FROM per, span),
        -- one list quantile per column: one sort of the bucket's values, not three
        q AS (SELECT run_id, bucket, avg(x) AS x, count(*) AS forwards, min(start_time) AS t_lo, max(start_time) AS t_hi,
          quantile_cont(rho, [0.1, 0.5, 0.9]) AS rho_q, quantile_cont(growth, [0.1, 0.5, 0.9]) AS growth_q
          FROM b GROUP BY run_id, bucket)
        SELECT run_id, bucket, x, forwards, t_lo, t_hi, rho_q[1] AS rho_p10, rho_q[2] AS rho_p50, rho_q[3] AS rho_p90,
          growth_q[1] AS growth_p10, growth_q[2] AS growth_p50, growth_q[3] AS growth_p90
        FROM q ORDER BY run_id, bucket""",
        [buckets, min_width],
    )


def diverged_points(store, sel: Selection, x: str, limit: int = 2000) -> pd.DataFrame:
    """The diverged forwards (`diverged_at` ≥ 0) as points: x, ρ(Ā), peak growth and what their
    tooltip names (trace id, model, endpoint). The newest `limit` of them, so the chart stays small."""
    xcol = {"step": "f.step", "time": "f.start_time"}[x]
    return select(
        store,
        sel,
        f", per AS ({_per_forward_peaks(store, 'f.*', 'f.diverged_at >= 0')})"
        f" SELECT f.trace_id, f.run_id, f.model_id, coalesce(json_extract_string(f.attributes, '$.endpoint'), '–') AS endpoint,"
        f" {xcol} AS x, {finite('f.rho_A')} AS rho, f.growth FROM per f ORDER BY f.start_time DESC LIMIT ?",
        [limit],
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
    if sel.rolls_up(store):
        return _select_rolled(
            store, sel, "rollup_experts",
            "SELECT f.iteration, f.expert, sum(f.load) AS load,"
            " sum(f.load) / sum(sum(f.load)) OVER (PARTITION BY f.iteration) AS share"
            " FROM sel f GROUP BY f.iteration, f.expert ORDER BY f.iteration, f.expert",
        )
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


# --- why a view is empty ------------------------------------------------------------------------


def matching_count(store, sel: Selection) -> int:
    """How many stored forwards `sel` keeps."""
    return int(select(store, sel, "SELECT count(*) AS n FROM sel")["n"].iloc[0])


def kind_counts(store, sel: Selection) -> dict[str, int]:
    """Forwards `sel` keeps, by forward kind (every kind, whatever `sel.kinds` says)."""
    df = select(store, dataclasses.replace(sel, kinds=()), "SELECT kind, count(*) AS n FROM sel GROUP BY kind ORDER BY kind")
    return dict(zip(df["kind"], df["n"].astype(int)))


def shapes(store, sel: Selection) -> pd.DataFrame:
    """The (model, loop) pairs `sel` keeps, newest first, with their forward counts: forwards of
    different pairs have different iterations, positions and experts, so views that average per
    iteration or position show one pair at a time."""
    return select(store, sel, "SELECT model_id, loop_name, count(*) AS forwards, max(start_time) AS newest"
                              " FROM sel GROUP BY model_id, loop_name ORDER BY newest DESC, model_id, loop_name")


# --- issue 25: exit steps by group, the depth profile, loop sweeps, two forwards or runs side by side


def _exit_steps_sql() -> str:
    """`steps`: per group and exit step (iterations used, 1-based) the tokens that stopped there;
    `groups`: each group's forward count."""
    return (f", steps AS (SELECT f.grp, i.iteration + 1 AS used, sum(i.exit_count) AS tokens {_ITER_JOIN}"
            " WHERE isfinite(i.exit_count) GROUP BY ALL HAVING sum(i.exit_count) > 0),"
            " groups AS (SELECT grp, count(*) AS forwards FROM sel GROUP BY grp)")


def exit_steps(store, sel: Selection) -> pd.DataFrame:
    """Per group and exit step `used` (iterations a token ran, 1-based): `tokens` that stopped
    there, their `share` of the group's tokens (so groups of different sizes compare), the
    group's `group_tokens` and `forwards`."""
    return select(
        store, sel,
        _exit_steps_sql() + " SELECT s.grp, s.used, s.tokens, s.tokens / sum(s.tokens) OVER (PARTITION BY s.grp) AS share,"
        " sum(s.tokens) OVER (PARTITION BY s.grp) AS group_tokens, g.forwards"
        " FROM steps s JOIN groups g USING (grp) ORDER BY s.grp, s.used",
    )


def exit_step_groups(store, sel: Selection) -> pd.DataFrame:
    """Per group: `forwards`, `tokens`, the mean exit step and the largest, and the share of the
    group's tokens that ran the group's deepest step."""
    return select(
        store, sel,
        _exit_steps_sql() + " SELECT s.grp, any_value(g.forwards) AS forwards, sum(s.tokens) AS tokens,"
        " sum(s.used * s.tokens) / sum(s.tokens) AS mean_used, max(s.used) AS max_used,"
        " arg_max(s.tokens, s.used) / sum(s.tokens) AS deepest_share"
        " FROM steps s JOIN groups g USING (grp) GROUP BY s.grp ORDER BY s.grp",
    )


def depth_profile(store, sel: Selection) -> pd.DataFrame:
    """Active positions per iteration (Mixture-of-Recursions' tokens per recursion depth): per
    group and iteration t (0-based), `active` = positions whose last iteration is t or later,
    summed over forwards (from `exit_count`); `pooled_share` = active / the group's positions;
    `mean_share` = the mean over forwards of each forward's active share, a forward that had
    stopped by t counting 0; `forwards` and `positions` of the group."""
    # Per (group, iteration) sums, then one window over those few rows: a position exiting at k
    # is active at every t ≤ k, so active(t) = Σ_{k ≥ t} exits(k), and a forward's share likewise
    # (Σ_{k ≥ t} exits_f(k) / n_f); every forward has an iteration-0 row, which counts the group.
    return select(
        store, sel,
        ", per AS (SELECT f.grp, i.iteration, sum(i.exit_count) AS exits,"
        "  sum(i.exit_count / (f.batch * f.seq_len)) AS exit_share, count(*) AS rows, sum(f.batch * f.seq_len) AS n"
        f"  {_ITER_JOIN} WHERE isfinite(i.exit_count) GROUP BY ALL),"
        " g AS (SELECT grp, rows AS forwards, n AS positions FROM per WHERE iteration = 0)"
        " SELECT per.grp, per.iteration, sum(per.exits) OVER w AS active,"
        " sum(per.exits) OVER w / g.positions AS pooled_share, sum(per.exit_share) OVER w / g.forwards AS mean_share,"
        " g.forwards, g.positions FROM per JOIN g USING (grp)"
        " WINDOW w AS (PARTITION BY per.grp ORDER BY per.iteration DESC ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)"
        " ORDER BY per.grp, per.iteration",
    )


# A loop sweep (`mythos_probe.sweep(..., on_trace=...)`) stores one forward per loop count, each
# with attributes `sweep` (the sweep's id, one per call) and `sweep_loops` (its loop count), and
# with targets `sweep_correct` / `sweep_positions`; the lens argmax of each position at its last
# iteration is the forward's prediction (the sweep checks this when it records).
SWEEP_KEYS = ("sweep", "sweep_loops", "sweep_correct", "sweep_positions")


def sweep_forwards(store, sel: Selection, sweeps: int = 12) -> pd.DataFrame:
    """The sweep forwards of the newest `sweeps` sweeps `sel` keeps (any forward kind): forward id,
    sweep, loops, model, the sweep's counts (NULL without targets) and its start time."""
    sel = dataclasses.replace(sel, kinds=(), group="none")
    return select(
        store, sel,
        ", sw AS (SELECT forward_id, json_extract_string(attributes, '$.sweep') AS sweep,"
        "  TRY_CAST(json_extract_string(attributes, '$.sweep_loops') AS INTEGER) AS loops,"
        "  TRY_CAST(json_extract_string(attributes, '$.sweep_correct') AS BIGINT) AS correct,"
        "  TRY_CAST(json_extract_string(attributes, '$.sweep_positions') AS BIGINT) AS compared,"
        "  model_id, start_time FROM sel WHERE json_extract_string(attributes, '$.sweep') IS NOT NULL),"
        " newest AS (SELECT sweep, max(start_time) AS t FROM sw WHERE loops IS NOT NULL GROUP BY sweep ORDER BY t DESC LIMIT ?)"
        " SELECT sw.* FROM sw JOIN newest USING (sweep) WHERE sw.loops IS NOT NULL ORDER BY newest.t DESC, sw.sweep, sw.loops",
        [sweeps],
    )


def sweep_curves(store, sel: Selection, sweeps: int = 12) -> pd.DataFrame:
    """Per sweep and loop count: `positions` compared, `agreeing` and `agreement` (the share of
    positions whose final prediction equals that of the sweep's deepest forward, by batch row and
    position), `correct` / `accuracy` where the sweep had targets, and `best` (the loop counts of
    the highest accuracy, else agreement)."""
    picked = sweep_forwards(store, sel, sweeps)
    columns = ["sweep", "loops", "model_id", "positions", "agreeing", "agreement", "correct", "accuracy", "best", "newest"]
    if picked.empty:
        return pd.DataFrame(columns=columns)
    ids = picked["forward_id"].to_numpy()
    deepest = picked.loc[picked.groupby("sweep")["loops"].idxmax(), ["sweep", "forward_id"]]
    # The ids as constants with their range, so DuckDB reads only the row groups holding them.
    agree = store.query(
        "WITH pick AS (SELECT unnest(?) AS forward_id, unnest(?) AS sweep),"
        " deep AS (SELECT unnest(?) AS sweep, unnest(?) AS deep_id),"
        " final AS (SELECT p.forward_id, p.batch_index, p.position, p.lens_argmax FROM positions p"
        "  WHERE p.forward_id BETWEEN ? AND ? AND p.forward_id IN (SELECT forward_id FROM pick)"
        "  AND p.iteration = p.iterations_used - 1 AND isfinite(p.lens_argmax) AND p.lens_argmax >= 0)"
        " SELECT a.forward_id, count(d.lens_argmax) AS positions, count_if(a.lens_argmax = d.lens_argmax) AS agreeing"
        " FROM final a JOIN pick USING (forward_id) JOIN deep USING (sweep)"
        " JOIN final d ON d.forward_id = deep.deep_id AND d.batch_index = a.batch_index AND d.position = a.position"
        " GROUP BY a.forward_id",
        [ids.tolist(), picked["sweep"].tolist(), deepest["sweep"].tolist(), deepest["forward_id"].tolist(),
         int(ids.min()), int(ids.max())],
    )
    df = picked.merge(agree, on="forward_id", how="left")
    df["positions"] = df["positions"].fillna(0).astype(int)
    df["agreeing"] = df["agreeing"].fillna(0).astype(int)
    df["agreement"] = df["agreeing"] / df["positions"].where(df["positions"] > 0)
    df["accuracy"] = df["correct"] / df["compared"].where(df["compared"] > 0)
    score = df["accuracy"].where(df["accuracy"].notna(), df["agreement"])
    df["best"] = score == score.groupby(df["sweep"]).transform("max")
    df["newest"] = df.groupby("sweep")["start_time"].transform("max")
    return df.sort_values(["newest", "sweep", "loops"], ascending=[False, True, True])[columns].reset_index(drop=True)


# Per-forward columns the compare view lists, with the forward metrics after them.
COMPARE_FORWARD_COLUMNS = ("iterations", "n_loops", "tokens", "duration_ms")


def resolve(store, text: str | None) -> tuple[str, str] | None:
    """What the compare view's A or B box names: ("forward", trace id) or ("run", run id), or None."""
    text = (text or "").strip()
    if not text:
        return None
    lowered = text.lower()  # "0X…" and upper-case digits as pasted from anywhere
    trace = lowered.removeprefix("0x").zfill(32) if all(c in "0123456789abcdefx" for c in lowered) else None
    if trace and not store.query("SELECT 1 FROM forwards WHERE trace_id = ? LIMIT 1", [trace]).empty:
        return "forward", trace
    if not store.query("SELECT 1 FROM forwards WHERE run_id = ? LIMIT 1", [text]).empty:
        return "run", text
    return None


def compare_defaults(store, sel: Selection) -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
    """When the compare view is given nothing: the two newest runs `sel` keeps (older as A), else
    its two newest forwards."""
    runs_df = select(store, dataclasses.replace(sel, group="none"),
                     "SELECT run_id, max(start_time) AS t FROM sel GROUP BY run_id ORDER BY t DESC LIMIT 2")
    if len(runs_df) == 2:
        return ("run", str(runs_df["run_id"].iloc[1])), ("run", str(runs_df["run_id"].iloc[0]))
    fw = select(store, sel, "SELECT trace_id FROM sel ORDER BY start_time DESC LIMIT 2")
    padded = [("forward", str(t)) for t in fw["trace_id"]][::-1] + [None, None]
    return padded[0], padded[1]


def _side_selection(sel: Selection, side: tuple[str, str]) -> Selection:
    """A run side: the filter bar's selection narrowed to the run (its other filters kept)."""
    return dataclasses.replace(sel, runs=(side[1],), group="none")


def compare_iterations(store, sel: Selection, side: tuple[str, str], metrics: tuple[str, ...]) -> pd.DataFrame:
    """Per iteration, `metrics` of one forward, or their means over the run's selected forwards."""
    if side[0] == "forward":
        return forward_iterations(store, side[1], metrics)
    return iteration_means(store, _side_selection(sel, side), metrics).drop(columns="grp")


def compare_forward_metrics(store, sel: Selection, side: tuple[str, str]) -> pd.DataFrame:
    """One row: the forward's per-forward columns and metrics, or their means over the run's
    selected forwards (finite values only), with `forwards`, how many it covers."""
    from mythos_probe.records import FORWARD_METRIC_NAMES

    names = (*COMPARE_FORWARD_COLUMNS, *FORWARD_METRIC_NAMES)
    cols = ", ".join(f"avg({finite('CAST(f.' + _quote(n) + ' AS DOUBLE)')}) AS {_quote(n)}" for n in names)
    if side[0] == "forward":
        return store.query(f"SELECT count(*) AS forwards, {cols} FROM forwards f WHERE f.trace_id = ?", [side[1]])
    return select(store, _side_selection(sel, side), f"SELECT count(*) AS forwards, {cols} FROM sel f")


# the trajectory probe's position metrics, as records.py defines them (one list, not a copy)
TRAJECTORY_COLUMNS = tuple(n for n in POSITION_METRIC_NAMES if n.startswith("traj_"))


def trajectories(store, trace_id: str, batch_index: int) -> pd.DataFrame:
    """One forward's latent trajectories (the trajectory probe's position metrics,
    `mythos_probe.metrics.trajectory`) for one batch row: a row per position and iteration, with
    token text; empty when the forward was recorded without the probe."""
    cols = ", ".join(TRAJECTORY_COLUMNS)
    return store.query(
        f"WITH {_ONE_FORWARD} SELECT position, iteration, {cols}, token_text"
        " FROM positions p JOIN one USING (forward_id) WHERE p.batch_index = ? AND p.traj_pc1 IS NOT NULL"
        " ORDER BY position, iteration",
        [trace_id, batch_index],
    )


def newest_trajectory_trace(store, sel: Selection) -> str | None:
    """The newest selected forward recorded with the trajectory probe (None when there is none)."""
    df = select(store, sel, "SELECT trace_id FROM sel f WHERE f.detail = 'positions' AND EXISTS (SELECT 1 FROM"
                            " positions p WHERE p.forward_id = f.forward_id AND p.traj_pc1 IS NOT NULL)"
                            " ORDER BY start_time DESC LIMIT 1")
    return None if df.empty else str(df["trace_id"].iloc[0])
