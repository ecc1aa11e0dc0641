import dataclasses
import os
import subprocess
import sys

import duckdb
import pytest

from mythos_probe.collectors import migrations
from mythos_probe.collectors.migrations import MIGRATIONS, STORE_VERSION, SchemaError
from mythos_probe.collectors.schema import BASE_COLUMNS, TABLES
from mythos_probe.collectors.spans import trace_to_attributes
from mythos_probe.collectors.store import Store, StoreError, StoreLockedError
from mythos_probe.records import FORWARD_METRIC_NAMES, ITERATION_METRIC_NAMES, POSITION_METRIC_NAMES
from tests.collectors.factory import make_trace


def columns(store_or_con, table):
    con = store_or_con
    rows = con.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
        [table],
    ).fetchall()
    return tuple(rows)


def test_tables_and_span_attributes_agree_with_records(store):
    for table, metrics, typ in (
        ("forwards", FORWARD_METRIC_NAMES, "DOUBLE"),
        ("iterations", ITERATION_METRIC_NAMES, "DOUBLE"),
        ("positions", POSITION_METRIC_NAMES, "FLOAT"),
    ):
        cols = dict(store.query(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ?", [table]
        ).itertuples(index=False))
        assert {m: cols.get(m) for m in metrics} == {m: typ for m in metrics}
        assert not set(metrics) & {c for c, _ in BASE_COLUMNS[table]}  # no metric shadows an identity column
    attrs = trace_to_attributes(make_trace(0))
    assert {k.removeprefix("recurrent_depth.iteration.") for k in attrs if k.startswith("recurrent_depth.iteration.")} == set(ITERATION_METRIC_NAMES)
    assert {k.removeprefix("recurrent_depth.forward.") for k in attrs if k.startswith("recurrent_depth.forward.")} == set(FORWARD_METRIC_NAMES)
    assert {k.removeprefix("recurrent_depth.position.") for k in attrs if k.startswith("recurrent_depth.position.")} == set(POSITION_METRIC_NAMES) | {"shape", "iterations_used"}


def schema_snapshot(con):
    return {t: columns(con, t) for t in TABLES}


def test_every_metric_column_is_added_by_a_written_migration():
    """The migrations are a written, append-only list (a renamed metric must not change the names
    existing stores recorded): a metric added to records.py needs its migration appended."""
    from mythos_probe.collectors.schema import FIRST_METRICS, METRIC_COLUMNS

    names = [m.name for m in MIGRATIONS]
    missing = [f"add_column:{t}.{c}" for t, cols in METRIC_COLUMNS.items() for c, _ in cols
               if f"add_column:{t}.{c}" not in names]
    assert not missing, f"append a migration to collectors/migrations.MIGRATIONS for {missing}"
    assert len(names) == len(set(names))
    # later metrics: migrated after m003, in the order TABLES lists them last
    later = [n for n in names[names.index("m003_loop_kind_rank") + 1:] if n.startswith("add_column:")]
    in_tables = [f"add_column:{t}.{c}" for t, cols in TABLES.items() for c, _ in cols
                 if c in dict(METRIC_COLUMNS.get(t, ())) and c not in FIRST_METRICS.get(t, ())]
    assert later == in_tables == ["add_column:forwards.lens_flops", *(f"add_column:positions.traj_{c}" for c in (
        "pc1", "pc2", "pc3", "pc1_share", "pc2_share", "pc3_share", "fixed"))]


def test_migrate_from_empty_and_from_every_earlier_version_gives_the_same_schema(tmp_path):
    fresh = duckdb.connect(str(tmp_path / "fresh.duckdb"))
    assert migrations.migrate(fresh, "fresh") == STORE_VERSION == len(MIGRATIONS)
    want = schema_snapshot(fresh)
    assert migrations.migrate(fresh, "fresh") == STORE_VERSION  # twice is harmless
    for upto in range(1, STORE_VERSION):
        con = duckdb.connect()
        assert migrations.migrate(con, "old", upto=upto) == upto
        assert migrations.migrate(con, "old") == STORE_VERSION
        assert schema_snapshot(con) == want, upto
        assert [r[0] for r in con.execute("SELECT name FROM _migrations ORDER BY applied_at, rowid").fetchall()] == [
            m.name for m in MIGRATIONS
        ]


def test_older_store_is_migrated_on_read_write_open_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    migrations.migrate(con, str(path), upto=1)
    con.execute("INSERT INTO forwards (trace_id, span_id, run_id) VALUES ('a', 'b', 'r')")
    con.close()
    with pytest.raises(SchemaError, match=f"version 1, older .* {STORE_VERSION}"):
        Store.open_read_only(path)
    with Store(path) as store:
        assert store.schema_version == STORE_VERSION
        assert store.query("SELECT run_id, rho_A IS NULL AS absent FROM forwards").to_dict("records") == [{"run_id": "r", "absent": True}]


def test_newer_store_is_refused_naming_both_versions(tmp_path):
    path = tmp_path / "new.duckdb"
    Store(path).close()
    con = duckdb.connect(str(path))
    con.execute("INSERT INTO _migrations (name) VALUES ('m999_from_the_future')")
    con.close()
    for open_ in (Store, Store.open_read_only):
        with pytest.raises(SchemaError, match=f"version {STORE_VERSION + 1}, newer than this mythos-probe's {STORE_VERSION}"):
            open_(path)


def test_a_file_that_is_not_duckdb_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "notes.duckdb"
    payload = b"this is somebody's notes, not a database\n" * 100
    path.write_bytes(payload)
    for open_ in (Store, Store.open_read_only):
        with pytest.raises(StoreError, match="not a readable DuckDB store"):
            open_(path)
    assert path.read_bytes() == payload


def test_read_only_open_of_a_missing_file_says_so(tmp_path):
    with pytest.raises(StoreError, match="no store at"):
        Store.open_read_only(tmp_path / "nope.duckdb")
    assert not (tmp_path / "nope.duckdb").exists()


def test_read_only_open_while_another_process_writes_points_to_serve(tmp_path):
    path = tmp_path / "held.duckdb"
    Store(path).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from mythos_probe.collectors.store import Store; s = Store({str(path)!r}); print('held', flush=True); input()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreLockedError, match="serve"):
            Store.open_read_only(path)
    finally:
        holder.kill()
        holder.wait()


def test_forward_id_migration_numbers_stored_forwards_in_insertion_order_and_keys_their_rows(tmp_path):
    path = tmp_path / "before_forward_id.duckdb"
    con = duckdb.connect(str(path))
    migrations.migrate(con, str(path), upto=_index("m002_forward_id"))
    for trace_id in ("ff", "00", "aa"):  # insertion order, not key order, decides the numbers
        con.execute("INSERT INTO forwards (trace_id, span_id) VALUES (?, 's')", [trace_id])
        con.execute("INSERT INTO positions (trace_id, span_id, position) SELECT ?, 's', range FROM range(3)", [trace_id])
    con.close()
    with Store(path) as store:
        assert store.query("SELECT trace_id, forward_id FROM forwards ORDER BY forward_id").values.tolist() == [
            ["ff", 1], ["00", 2], ["aa", 3]
        ]
        keyed = store.query("SELECT trace_id, list(DISTINCT forward_id) AS ids FROM positions GROUP BY trace_id ORDER BY trace_id")
        assert [(t, list(ids)) for t, ids in keyed.values.tolist()] == [("00", [2]), ("aa", [3]), ("ff", [1])]
        store.write_traces([make_trace(0)])
        assert store.query("SELECT max(forward_id) AS m FROM forwards").m[0] == 4


def _index(name: str) -> int:
    return [m.name for m in migrations.MIGRATIONS].index(name)


def test_record_v2_migration_gives_forwards_stored_before_it_the_single_process_served_defaults(tmp_path):
    path = tmp_path / "before_v2.duckdb"
    con = duckdb.connect(str(path))
    migrations.migrate(con, str(path), upto=_index("m003_loop_kind_rank"))
    con.execute("INSERT INTO forwards (trace_id, span_id, forward_id) VALUES ('aa', 's', 1)")
    con.close()
    with Store(path) as store:
        row = store.query("SELECT loop_name, kind, rank, local_rank, world_size, host, pid, job_id FROM forwards")
        assert row.values.tolist() == [["loop", "served", 0, 0, 1, "", 0, ""]]


def test_record_v2_fields_reach_their_own_store_columns(tmp_path):
    trace = dataclasses.replace(
        make_trace(0), loop_name="low", kind="shadow", rank=1, local_rank=1, world_size=2, host="node-7",
        pid=4242, job_id="job-9",
    )
    with Store(tmp_path / "v2.duckdb") as store:
        store.write_traces([trace])
        row = store.query("SELECT loop_name, kind, rank, local_rank, world_size, host, pid, job_id FROM forwards")
    assert row.values.tolist() == [["low", "shadow", 1, 1, 2, "node-7", 4242, "job-9"]]
