import duckdb

from mythos_probe.cli import main
from mythos_probe.collectors.schema import TABLES
from mythos_probe.collectors.store import Store
from tests.collectors.conftest import TABLE_KEYS, table
from tests.collectors.factory import make_trace


def test_parquet_export_reads_back_to_the_same_rows(tmp_path, capsys):
    path = tmp_path / "s.duckdb"
    with Store(path) as store:
        store.write_traces([make_trace(i, model_id=m) for i, m in enumerate(["a", "b", "a"])])
    assert main(["export", str(path), "--parquet", str(tmp_path / "pq")]) == 0
    assert sorted(p.name for p in (tmp_path / "pq" / "positions").glob("date=*/model_id=*")) == ["model_id=a", "model_id=b"]
    with Store.open_read_only(path) as store:
        for name in TABLES:
            glob = str(tmp_path / "pq" / name / "**" / "*.parquet")
            cols = ", ".join(f'"{c}"' for c, _ in TABLES[name])
            back = duckdb.sql(
                f"SELECT {cols} FROM read_parquet('{glob}', hive_partitioning = true, hive_types_autocast = false) "
                f"ORDER BY {TABLE_KEYS[name]}"
            ).df()
            want = table(store, name, drop=())
            assert len(back) == len(want) > 0, name
            assert back.astype(object).equals(want.astype(object)), name
