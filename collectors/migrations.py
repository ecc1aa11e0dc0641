"""Versioned, append-only schema migrations for the DuckDB store, recorded in the database.

In the style of simonw/llm: each migration has a name, is recorded in `_migrations` when applied,
and is safe to run twice (`IF NOT EXISTS`). The list is written out and append-only:
`m001_tables`, one `add_column:<table>.<metric>` per metric of the first stores, then every later
change in order (`m002_forward_id`: the store-local key described in `schema`;
`m003_loop_kind_rank`: the fields of record version 2; `add_column:forwards.lens_flops`). Older
stores pick new ones up on their next read-write open. A store's version (`STORE_VERSION`, not the
record's `records.SCHEMA_VERSION`) is the number of migrations it has applied; a store holding a
migration this code does not know was written by a newer mythos-probe and is refused.

This module is not: the table layout (`schema`) or the connection handling (`store`).
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from mythos_probe.collectors import rollups
from mythos_probe.collectors.schema import (
    BASE_COLUMNS, FIRST_METRICS, KEYED_TABLES, METRIC_COLUMNS, RECORD_V2_COLUMNS, ROW_BUDGET_COLUMNS, quote,
)


@dataclass(frozen=True)
class Migration:
    name: str
    sql: tuple[str, ...]


class SchemaError(RuntimeError):
    """The store's schema version cannot be used by this mythos-probe."""


def _create(table: str) -> str:
    cols = ", ".join(f"{quote(c)} {t}" for c, t in BASE_COLUMNS[table])
    return f"CREATE TABLE IF NOT EXISTS {table} ({cols})"


# Existing forwards are numbered by rowid (insertion order), continuing after any id already set, and
# their child rows take the id by key; both halves skip rows that have one, so a rerun is harmless.
_FORWARD_ID = (
    *(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS forward_id BIGINT" for table in KEYED_TABLES),
    "UPDATE forwards SET forward_id = n.id FROM (SELECT rowid AS r, (SELECT coalesce(max(forward_id), 0) FROM forwards)"
    " + row_number() OVER (ORDER BY rowid) AS id FROM forwards WHERE forward_id IS NULL) n WHERE forwards.rowid = n.r",
    *(
        f"UPDATE {table} SET forward_id = f.forward_id FROM forwards f WHERE {table}.forward_id IS NULL"
        f" AND {table}.trace_id = f.trace_id AND {table}.span_id = f.span_id"
        for table in KEYED_TABLES[1:]
    ),
)

def _add_column(table: str, col: str) -> Migration:
    typ = dict(METRIC_COLUMNS[table])[col]
    return Migration(f"add_column:{table}.{col}", (f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {quote(col)} {typ}",))


MIGRATIONS: tuple[Migration, ...] = (  # append only
    Migration("m001_tables", tuple(_create(t) for t in BASE_COLUMNS)),
    *(_add_column(table, col) for table, cols in FIRST_METRICS.items() for col in cols),
    Migration("m002_forward_id", _FORWARD_ID),
    Migration(
        "m003_loop_kind_rank",
        tuple(
            f"ALTER TABLE forwards ADD COLUMN IF NOT EXISTS {quote(c)} {t} DEFAULT {default}"
            for c, t, default in RECORD_V2_COLUMNS
        ),
    ),
    # metrics added since the first stores, in the order of schema.TABLES (a test holds them equal)
    _add_column("forwards", "lens_flops"),
    # the dashboard's pre-aggregated tables (`rollups`), filled from the forwards already stored
    Migration("m004_issue27_rollups", rollups.MIGRATION),
    # per-request loop budgets as list columns of `forwards` (schema.ROW_BUDGET_COLUMNS); NULL for
    # the forwards stored before, which ran one n_loops for every row as far as the store knew
    Migration(
        "m005_issue26_row_budgets",
        tuple(f"ALTER TABLE forwards ADD COLUMN IF NOT EXISTS {quote(c)} {t}" for c, t in ROW_BUDGET_COLUMNS),
    ),
    # issue 25: the latent-trajectory position metrics (`metrics/trajectory.py`)
    *(_add_column("positions", c) for c in (
        "traj_pc1", "traj_pc2", "traj_pc3", "traj_pc1_share", "traj_pc2_share", "traj_pc3_share", "traj_fixed")),
    # the lens-sampled position rows the what-if replays (`rollups.LENS_TABLE`), from those stored
    Migration("m006_issue27_lens_positions", rollups.LENS_MIGRATION),
)
STORE_VERSION = len(MIGRATIONS)  # a store's version: the number of migrations it has applied

_LEDGER = "CREATE TABLE IF NOT EXISTS _migrations (name VARCHAR PRIMARY KEY, applied_at TIMESTAMP DEFAULT now())"


def applied(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Names of the migrations recorded in the store, oldest first ([] for an empty database)."""
    exists = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = '_migrations' AND table_schema = 'main'"
    ).fetchone()[0]
    if not exists:
        return []
    return [row[0] for row in con.execute("SELECT name FROM _migrations ORDER BY applied_at, rowid").fetchall()]


def check(con: duckdb.DuckDBPyConnection, path: str, writable: bool) -> int:
    """The store's schema version; raises SchemaError when it is newer, or older and read-only."""
    done = applied(con)
    known = {m.name for m in MIGRATIONS}
    unknown = [name for name in done if name not in known]
    if unknown:
        raise SchemaError(
            f"store {path} has schema version {len(done)}, newer than this mythos-probe's {STORE_VERSION} "
            f"(unknown migrations: {', '.join(unknown[:3])}{'…' if len(unknown) > 3 else ''}); upgrade mythos-probe"
        )
    if not writable and len(done) < STORE_VERSION:
        raise SchemaError(
            f"store {path} has schema version {len(done)}, older than this mythos-probe's {STORE_VERSION}; "
            f"open it once read-write (e.g. `mythos-probe serve --store {path}`) to migrate it"
        )
    return len(done)


def migrate(con: duckdb.DuckDBPyConnection, path: str, upto: int | None = None) -> int:
    """Apply every migration not yet recorded (the first `upto` only, for tests); returns the version."""
    check(con, path, writable=True)
    con.execute(_LEDGER)
    done = set(applied(con))
    for migration in MIGRATIONS[:upto]:
        if migration.name in done:
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            for statement in migration.sql:
                con.execute(statement)
            con.execute("INSERT INTO _migrations (name) VALUES (?)", [migration.name])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    return len(applied(con))
