"""Rollups: the per-iteration tables pre-aggregated by hour and forward labels, kept at ingest.

At a million forwards the dashboard's per-iteration views would read every iteration and expert
row (tens of millions) on each update. A rollup row sums the rows of every forward that shares
its key: the hour of `start_time` and the labels a selection filters or groups on (model, run,
kind, loop, rank, exit policy, iterations executed). A view over the rollup reads hundreds of
thousands of rows instead, and its figures equal the raw ones because only decomposable
aggregates are kept (sums and counts; a mean is a sum over a count):

- `rollup_iterations`: per key and iteration, for every metric in `ROLLED_METRICS`,
  `sum__m` / `n__m` (sum and count of the non-NULL values, NaN propagating as in SQL `avg`) and
  `fsum__m` / `fn__m` (the same over the finite values only, as the dashboard's `finite` means);
- `rollup_experts`: per key, iteration and expert, the summed load;
- `rollup_peaks`: per forward, its largest finite growth ratio (the spectral page's per-forward
  peak; a maximum is not decomposable across forwards, so this one stays per forward);
- `rollup_lens` (migration `LENS_MIGRATION`): the position rows the coda lens sampled (finite
  `lens_argmax`), with the columns the early-exit what-if replays (`LENS_COLUMNS`): at a million
  forwards about 1 position row in 64, so the replay scans that instead of every position row.

A selection with a time range reads the rollup rows of the hours it covers entirely and
aggregates the raw rows of the hours it cuts (`sources`), so a range that starts at 10:17 is exact.
A selection on a user attribute or grouped by one is not in the key: the views read raw rows.

Ingest (`update`) aggregates the batch's new forwards and merges them into the rows of the hours
they touch, inside the batch's transaction: a reader never sees a forward in the raw tables and
not in the rollups. Sums merged in another order than a raw query adds them may differ in the
last bits of a double (as two runs of the same parallel SQL sum may); counts are exact.

This module is not: the migration list (`migrations` appends `MIGRATION`) or the views
(`mythos_probe.dashboards.queries`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mythos_probe.collectors.schema import quote

# The metrics rolled up, written out and frozen with the migration that creates the columns: an
# iteration metric added to records.py later is read from raw rows (queries check this list).
ROLLED_METRICS: tuple[str, ...] = (
    "rel_residual", "cos_step", "dist_to_final", "step_orthogonality", "token_correlation", "state_norm",
    "growth_ratio", "norm_decay", "norm_inject", "norm_block", "jacobian_sigma_max", "nonfinite_fraction",
    "halt_prob", "cum_halt", "halted_fraction", "act_weight", "halt_low_share", "halt_high_share", "exit_count",
    "expert_max_vio", "expert_cv", "expert_load_entropy", "expert_dead", "expert_active_ratio", "routing_entropy",
    "bias_changed_share", "shared_routed_ratio", "topk_overlap", "lens_kl_final", "lens_kl_prev", "lens_entropy",
    "lens_top1_agree", "lens_final_rank", "lora_rel_norm",
)

# The forward labels in the key, as columns of both `forwards` and the rollups; a selection's
# filters and groupings on them read the same in either.
KEY: tuple[tuple[str, str], ...] = (
    ("model_id", "VARCHAR"), ("run_id", "VARCHAR"), ("kind", "VARCHAR"), ("loop_name", "VARCHAR"),
    ("rank", "INTEGER"), ("exit_policy", "VARCHAR"), ("iterations", "INTEGER"),
)
HOUR = "date_trunc('hour', f.start_time)"
TABLES = ("rollup_iterations", "rollup_experts", "rollup_peaks")


def _finite(column: str) -> str:
    return f"CASE WHEN isfinite({column}) THEN {column} END"


def _sums(m: str) -> tuple[tuple[str, str, str], ...]:
    """(column, type, aggregate over raw iteration rows `i`) of metric `m`."""
    c = f"i.{quote(m)}"
    return (
        (f"sum__{m}", "DOUBLE", f"sum({c})"),
        (f"n__{m}", "BIGINT", f"count({c})"),
        (f"fsum__{m}", "DOUBLE", f"sum({_finite(c)})"),
        (f"fn__{m}", "BIGINT", f"count({_finite(c)})"),
    )


_KEY_COLS = (("hour", "TIMESTAMP"), *KEY)
_VALUES = {
    "rollup_iterations": (("iteration", "INTEGER", None), ("rows", "BIGINT", "count(*)"),
                          *(s for m in ROLLED_METRICS for s in _sums(m))),
    "rollup_experts": (("iteration", "INTEGER", None), ("expert", "INTEGER", None), ("load", "BIGINT", "sum(i.load)")),
}
_CHILD = {"rollup_iterations": "iterations", "rollup_experts": "experts"}


def _columns(table: str) -> list[tuple[str, str]]:
    if table == "rollup_peaks":
        return [("forward_id", "BIGINT"), ("growth_peak", "DOUBLE")]
    return [*_KEY_COLS, *((c, t) for c, t, _ in _VALUES[table])]


def aggregate(table: str, forwards: str) -> str:
    """SELECT of `table`'s rows aggregated from the raw rows of the forwards in relation
    `forwards` (any SQL relation with the forwards columns, aliased `f`)."""
    if table == "rollup_peaks":
        return (f"SELECT i.forward_id, max({_finite('i.growth_ratio')}) AS growth_peak"
                f" FROM iterations i JOIN {forwards} f USING (forward_id) GROUP BY i.forward_id")
    keys = [f"{HOUR} AS hour", *(f"f.{quote(c)}" for c, _ in KEY)]
    values = [f"{agg or 'i.' + quote(c)} AS {quote(c)}" for c, _, agg in _VALUES[table]]
    return (f"SELECT {', '.join(keys + values)} FROM {_CHILD[table]} i JOIN {forwards} f USING (forward_id)"
            " GROUP BY ALL")


def _create(table: str) -> str:
    return f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(f'{quote(c)} {t}' for c, t in _columns(table))})"


# The migration: the tables, filled from every forward already stored (reruns start from empty).
MIGRATION: tuple[str, ...] = tuple(
    statement
    for table in TABLES
    for statement in (_create(table), f"DELETE FROM {table}", f"INSERT INTO {table} {aggregate(table, 'forwards')}")
)


def _delta(rows: pa.Table, table: str) -> pa.Table:
    """`table`'s rows aggregated from raw rows (key, iteration[, expert] and the child's columns),
    in Arrow: the same sums and counts as `aggregate`, without planning a 136-aggregate SQL query
    on every ingest batch (DuckDB spends more time binding that query than running it)."""
    key = [c for c, _ in _KEY_COLS] + [c for c, _, agg in _VALUES[table] if agg is None]
    if table == "rollup_experts":
        return rows.group_by(key, use_threads=False).aggregate([("load", "sum")]).rename_columns([*key, "load"])
    columns, aggs, names = {c: rows[c] for c in key}, [], []
    for m in ROLLED_METRICS:
        values = columns[m] = rows[m]
        columns[f"f:{m}"] = pc.if_else(pc.is_finite(values), values, pa.scalar(None, values.type))
        for source, prefix in ((m, ""), (f"f:{m}", "f")):
            aggs += [(source, "sum"), (source, "count", pc.CountOptions(mode="only_valid"))]
            names += [f"{prefix}sum__{m}", f"{prefix}n__{m}"]
    columns["rows"] = pa.array(np.ones(rows.num_rows, dtype=np.int64))
    aggs.append(("rows", "sum"))
    names.append("rows")
    out = pa.table(columns).group_by(key, use_threads=False).aggregate(aggs)
    return out.rename_columns([*names, *key]) if out.column_names[0] != key[0] else out.rename_columns([*key, *names])


def _merge(cur, table: str, delta: pa.Table) -> None:
    """Add `delta` (new rows of `table`) into `table`, one row per key in the hours it touches."""
    key = [c for c, _ in _KEY_COLS] + [c for c, _, agg in _VALUES[table] if agg is None]
    values = [c for c, _, agg in _VALUES[table] if agg is not None]
    hours = pc.unique(delta["hour"])
    touched = "(list_contains(?, hour) OR (hour IS NULL AND ?))"
    params = [hours.drop_null().to_pylist(), hours.null_count > 0]
    old = cur.sql(f"SELECT * FROM {table} WHERE {touched}", params=params).to_arrow_table()
    both = pa.concat_tables([old.select(key + values), delta.select(key + values).cast(old.select(key + values).schema)])
    merged = both.group_by(key, use_threads=False).aggregate([(c, "sum") for c in values])
    merged = merged.rename_columns([c.removesuffix("_sum") for c in merged.column_names])
    cur.execute(f"DELETE FROM {table} WHERE {touched}", params)
    cur.register("_merged", merged)
    try:
        cur.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _merged")
    finally:
        cur.unregister("_merged")


# The what-if's columns of a lens-sampled position row (`mythos_probe.whatif.INPUTS` and the
# agreement), written out and frozen with the migration.
LENS_COLUMNS: tuple[str, ...] = ("forward_id", "batch_index", "position", "iteration", "lens_top1_agree", "lens_argmax",
                                 "cum_halt", "lens_kl_prev", "rel_residual", "cos_step", "lens_entropy")
LENS_TABLE = "rollup_lens"


def _lens_rows(where: str) -> str:
    return (f"INSERT INTO {LENS_TABLE} SELECT {', '.join(quote(c) for c in LENS_COLUMNS)} FROM positions"
            f" WHERE isfinite(lens_argmax) AND {where}")


LENS_MIGRATION: tuple[str, ...] = (
    f"CREATE TABLE IF NOT EXISTS {LENS_TABLE} AS SELECT {', '.join(quote(c) for c in LENS_COLUMNS)} FROM positions LIMIT 0",
    f"DELETE FROM {LENS_TABLE}",
    _lens_rows("TRUE") + " ORDER BY forward_id, batch_index, position, iteration",
)


def update(cur, first_forward_id: int) -> None:
    """Roll up the forwards numbered from `first_forward_id` on (one ingest batch, just inserted
    in the caller's transaction on cursor `cur`)."""
    new = f"(SELECT * FROM forwards WHERE forward_id >= {int(first_forward_id)})"
    cur.execute(f"INSERT INTO rollup_peaks {aggregate('rollup_peaks', new)}")
    cur.execute(_lens_rows(f"forward_id >= {int(first_forward_id)}"))
    for table, child in _CHILD.items():
        keep = [c for c, _, agg in _VALUES[table] if agg is None] + (["load"] if table == "rollup_experts" else list(ROLLED_METRICS))
        rows = cur.sql(
            f"SELECT {HOUR} AS hour, {', '.join('f.' + quote(c) for c, _ in KEY)}, {', '.join('i.' + quote(c) for c in keep)}"
            f" FROM {child} i JOIN {new} f USING (forward_id)"
        ).to_arrow_table()
        if rows.num_rows:
            _merge(cur, table, _delta(rows, table))

