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

Ingest (`update`) aggregates the batch's new forwards and appends them to the rollups, inside the
batch's transaction: a reader never sees a forward in the raw tables and not in the rollups. An
hour's appended rows are summed into one row per key when ingest moves past the hour (`compact`). Sums merged in another order than a raw query adds them may differ in the
last bits of a double (as two runs of the same parallel SQL sum may); counts are exact.

This module is not: the migration list (`migrations` appends `MIGRATION`) or the views
(`mythos_probe.dashboards.queries`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mythos_probe.collectors.schema import insert_arrow, quote

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


def compact(cur, hours) -> None:
    """Rewrite the rollup rows of `hours` (datetimes; None for a NULL hour) as one row per key."""
    hours = list(hours)
    if not hours:
        return
    touched = "(list_contains(?, hour) OR (hour IS NULL AND ?))"
    params = [[h for h in hours if h is not None], any(h is None for h in hours)]
    for table in _CHILD:
        key = [c for c, _ in _KEY_COLS] + [c for c, _, agg in _VALUES[table] if agg is None]
        values = [c for c, _, agg in _VALUES[table] if agg is not None]
        old = cur.sql(f"SELECT * FROM {table} WHERE {touched}", params=params).to_arrow_table()
        merged = old.group_by(key, use_threads=False).aggregate([(c, "sum") for c in values])
        if merged.num_rows == old.num_rows:  # already one row per key
            continue
        merged = merged.rename_columns([c.removesuffix("_sum") for c in merged.column_names])
        cur.execute(f"DELETE FROM {table} WHERE {touched}", params)
        insert_arrow(cur, table, merged)


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


_HOUR_US = 3_600 * 10**6


def _keyed(child: pa.Table, forwards: pa.Table, keep: list[str]) -> pa.Table:
    """`child`'s columns `keep`, each row beside its forward's key (hour and `KEY` labels): the
    join `aggregate` does in SQL, done by position since a batch numbers its forwards 1, 2, 3…"""
    ids = forwards["forward_id"].to_numpy()
    row = child["forward_id"].to_numpy() - ids[0] if len(ids) else np.zeros(0, np.int64)
    if len(ids) and not np.array_equal(ids, np.arange(ids[0], ids[0] + len(ids))):
        raise ValueError("a batch's forwards must be numbered consecutively")
    start = forwards["start_time"].cast(pa.int64()).to_numpy(zero_copy_only=False)
    hour = pa.array(start - start % _HOUR_US, pa.int64()).cast(pa.timestamp("us"))  # date_trunc('hour'): floored
    take = pa.array(row)
    columns = {"hour": hour.take(take), **{c: forwards[c].take(take) for c, _ in KEY}}
    return pa.table({**columns, **{c: child[c] for c in keep}})


def increments(tables: dict[str, pa.Table]) -> dict[str, pa.Table]:
    """The rollup rows a batch adds, from its `forwards`, `iterations` and `experts` tables
    (`rows.trace_tables`): per rollup table, its rows aggregated over the batch alone (the
    per-forward peaks numbered as `tables` number the forwards). Sums of increments are increments:
    a decode worker computes them per request, the writer appends a group's side by side."""
    forwards, iterations = tables["forwards"], tables["iterations"]
    out = {}
    growth = iterations["growth_ratio"]
    finite = pc.if_else(pc.is_finite(growth), growth, pa.scalar(None, growth.type))
    peaks = (pa.table({"forward_id": iterations["forward_id"], "g": finite})
             .group_by("forward_id", use_threads=False).aggregate([("g", "max")]))
    out["rollup_peaks"] = peaks.rename_columns(["forward_id", "growth_peak"] if peaks.column_names[0] == "forward_id"
                                               else ["growth_peak", "forward_id"]).select(["forward_id", "growth_peak"])
    for table, child in _CHILD.items():
        keep = [c for c, _, agg in _VALUES[table] if agg is None] + (["load"] if table == "rollup_experts" else list(ROLLED_METRICS))
        if tables[child].num_rows:
            out[table] = _delta(_keyed(tables[child], forwards, keep), table)
    return out


def update(cur, tables: dict[str, pa.Table], dirty: frozenset = frozenset(),
           added: dict[str, pa.Table] | None = None) -> frozenset:
    """Roll up one ingest batch's new forwards: `tables` are their `forwards`, `iterations` and
    `experts` rows as just inserted in the caller's transaction on cursor `cur` (`rows.trace_tables`);
    `added`, where the caller has them, their `increments` (numbered as `tables`), else they are
    aggregated here from those Arrow columns (never read back from the store).

    The increments are appended: an hour's rows are summed into one per key (`compact`) once a
    batch arrives that no longer touches it. `dirty` are the hours appended to and not compacted
    yet; returns the new set, for the caller to keep once it committed. Until then an hour holds a
    few rows per key, which the views sum like any other."""
    if not tables["forwards"].num_rows:
        return dirty
    added = increments(tables) if added is None else added
    hours: set = set()
    for table in TABLES:
        if table in added and added[table].num_rows:
            if table != "rollup_peaks":
                hours.update(pc.unique(added[table]["hour"]).to_pylist())
            insert_arrow(cur, table, added[table])
    positions = tables.get("positions")
    if positions is not None and positions.num_rows:  # the lens-sampled rows the what-if replays
        insert_arrow(cur, LENS_TABLE, positions.filter(pc.is_finite(positions["lens_argmax"])).select(list(LENS_COLUMNS)))
    done = dirty - hours
    compact(cur, done)
    return (dirty - done) | hours

