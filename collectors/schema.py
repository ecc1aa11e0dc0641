"""The DuckDB table layout of the store, derived from the metric tuples in `records.py`.

Each table is an ordered list of (column, DuckDB type): fixed identity columns, then one column
per metric, named exactly as the metric (quoted, so case is kept: `rho_A`). Metric columns are
nullable: NULL means the probe that makes the metric did not run; NaN means it ran and the value
is undefined (t = 0 for step metrics). `start_time` is UTC without a zone.

`forward_id` is a store-local integer key that the store assigns in insertion order: a forward's
rows are then contiguous in every table, so DuckDB's per-row-group min/max (zone maps) skip all
but one or two row groups when a view reads one forward. It is not part of the record and
differs between two stores holding the same forwards; (trace_id, span_id) is the identity.

This module is not: the migrations that create the tables (`migrations`) or the code that fills
them (`rows`, `store`), beyond `insert_arrow`, the one statement they all insert with.
"""

from __future__ import annotations

from mythos_probe.records import FORWARD_METRIC_NAMES, ITERATION_METRIC_NAMES, POSITION_METRIC_NAMES

Columns = tuple[tuple[str, str], ...]

BASE_COLUMNS: dict[str, Columns] = {
    "spans": (
        ("trace_id", "VARCHAR"),
        ("span_id", "VARCHAR"),
        ("parent_span_id", "VARCHAR"),
        ("name", "VARCHAR"),
        ("kind", "VARCHAR"),
        ("start_ns", "BIGINT"),
        ("end_ns", "BIGINT"),
        ("status_code", "VARCHAR"),
        ("status_message", "VARCHAR"),
        ("resource", "JSON"),
        ("attributes", "JSON"),
    ),
    "forwards": (
        ("trace_id", "VARCHAR"),
        ("span_id", "VARCHAR"),
        ("run_id", "VARCHAR"),
        ("model_id", "VARCHAR"),
        ("step", "BIGINT"),
        ("start_ns", "BIGINT"),
        ("end_ns", "BIGINT"),
        ("start_time", "TIMESTAMP"),
        ("duration_ms", "DOUBLE"),
        ("batch", "INTEGER"),
        ("seq_len", "INTEGER"),
        ("tokens", "BIGINT"),
        ("n_loops", "INTEGER"),
        ("iterations", "INTEGER"),
        ("exit_policy", "VARCHAR"),
        ("detail", "VARCHAR"),
        ("n_experts", "INTEGER"),
        ("schema_version", "INTEGER"),
        ("attributes", "JSON"),
    ),
    "iterations": (
        ("trace_id", "VARCHAR"),
        ("span_id", "VARCHAR"),
        ("iteration", "INTEGER"),
    ),
    "positions": (
        ("trace_id", "VARCHAR"),
        ("span_id", "VARCHAR"),
        ("batch_index", "INTEGER"),
        ("position", "INTEGER"),
        ("iteration", "INTEGER"),
        ("token_id", "BIGINT"),
        ("token_text", "VARCHAR"),
        ("iterations_used", "INTEGER"),
    ),
    "experts": (
        ("trace_id", "VARCHAR"),
        ("span_id", "VARCHAR"),
        ("iteration", "INTEGER"),
        ("expert", "INTEGER"),
        ("load", "BIGINT"),
    ),
}

# Positions hold batch × seq × iterations rows per forward: REAL halves their size, and the
# record keeps them as float32 anyway.
METRIC_COLUMNS: dict[str, Columns] = {
    "forwards": tuple((name, "DOUBLE") for name in FORWARD_METRIC_NAMES),
    "iterations": tuple((name, "DOUBLE") for name in ITERATION_METRIC_NAMES),
    "positions": tuple((name, "REAL") for name in POSITION_METRIC_NAMES),
}

FORWARD_ID: Columns = (("forward_id", "BIGINT"),)
KEYED_TABLES = ("forwards", "iterations", "positions", "experts")

# Record version 2's fields (loop name, forward kind, rank family), added by migration
# `m003_loop_kind_rank` with defaults, so forwards stored before it read as a single-process,
# single-loop, served forward. (column, type, default as SQL)
RECORD_V2_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("loop_name", "VARCHAR", "'loop'"),
    ("kind", "VARCHAR", "'served'"),
    ("rank", "INTEGER", "0"),
    ("local_rank", "INTEGER", "0"),
    ("world_size", "INTEGER", "1"),
    ("host", "VARCHAR", "''"),
    ("pid", "BIGINT", "0"),
    ("job_id", "VARCHAR", "''"),
)

# The metric columns of the first stores (migrations `add_column:<table>.<metric>` right after
# `m001_tables`), written out once from records.py and frozen: renaming or removing a metric later
# must leave this list alone, or every existing store would hold a migration this code does not
# know and be refused. Metrics added since come last in TABLES, each with a migration appended to
# `migrations.MIGRATIONS` (tests/collectors/test_schema_and_migrations.py fails until it has one).
FIRST_METRICS: dict[str, tuple[str, ...]] = {
    "forwards": (
        "rho_A", "mean_contraction", "mean_iterations", "ponder_cost", "remainder_mass",
        "halted_first_share", "reached_last_share", "diverged_at", "flops", "flops_saved", "loop_flops",
        "useful_flops",
    ),
    "iterations": (
        "rel_residual", "cos_step", "dist_to_final", "step_orthogonality", "token_correlation", "state_norm",
        "growth_ratio", "norm_decay", "norm_inject", "norm_block", "jacobian_sigma_max",
        "nonfinite_fraction", "halt_prob", "cum_halt", "halted_fraction", "act_weight", "halt_low_share",
        "halt_high_share", "exit_count", "expert_max_vio", "expert_cv", "expert_load_entropy", "expert_dead",
        "expert_active_ratio", "routing_entropy", "bias_changed_share", "shared_routed_ratio",
        "topk_overlap", "lens_kl_final", "lens_kl_prev", "lens_entropy", "lens_top1_agree",
        "lens_final_rank", "lora_rel_norm",
    ),
    "positions": (
        "rel_residual", "cos_step", "state_norm", "halt_prob", "cum_halt", "act_weight", "lens_kl_final",
        "lens_kl_prev", "lens_entropy", "lens_argmax", "lens_top1_agree",
    ),
}


# Per-request loop budgets (issue 26; `LoopTrace.row_*`), added by migration
# `m005_issue26_row_budgets`: one list entry per batch row, in row order; NULL when the forward ran
# one n_loops for every row, as the record's None. List columns on `forwards`, not a table of their
# own: a budget is only ever read with its forward (the export, profiles, the Budgets page), a list
# is as long as the batch (a row of the forward, never a million rows), and the budgets then commit,
# deduplicate and partition with the forward's row itself, so the store, the Parquet folder, the
# read API and Spark need no new key table. A reader wanting one row per request UNNESTs them
# (`SELECT UNNEST(row_max_loops) ...`). NaN in `row_exit_threshold` is the policy's default threshold.
ROW_BUDGET_COLUMNS: Columns = (
    ("row_max_loops", "BIGINT[]"),
    ("row_min_loops", "BIGINT[]"),
    ("row_exit_threshold", "DOUBLE[]"),
    ("row_budget_reason", "VARCHAR[]"),
)


def _metrics(table: str, first: bool) -> Columns:
    return tuple((c, t) for c, t in METRIC_COLUMNS.get(table, ()) if (c in FIRST_METRICS.get(table, ())) == first)


# Column order as a store built by the migrations has it (a parquet export and a DuckDB store
# then return the same frames).
TABLES: dict[str, Columns] = {
    table: cols
    + _metrics(table, first=True)
    + (FORWARD_ID if table in KEYED_TABLES else ())
    + (tuple((c, t) for c, t, _ in RECORD_V2_COLUMNS) if table == "forwards" else ())
    + _metrics(table, first=False)
    # after the metrics added before it (lens_flops): a forward metric added later must come after these
    + (ROW_BUDGET_COLUMNS if table == "forwards" else ())
    for table, cols in BASE_COLUMNS.items()
}


def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def insert_arrow(cur, table: str, rows) -> None:
    """INSERT the Arrow table `rows` into `table` by column name, in the cursor's transaction.

    `rows` reaches DuckDB by its replacement scan of this frame's local variable `_rows`, not by
    `register`: registering a view and dropping it again are catalog changes, which for a wide
    table cost more than the insert itself (rollup_iterations' 146 columns: 6.4 against 3.9 ms
    a statement) and add to the commit. The statement names the table's columns from `rows`.
    DuckDB looks for `_rows` only in the frame that calls `execute` (`python_scan_all_frames` is
    off), so the statement runs here, never through a wrapper of the cursor."""
    _rows = rows  # noqa: F841 (read by DuckDB's replacement scan, by this name)
    cur.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _rows")
