"""The Parquet store: three processes write one folder at once; a reader running meanwhile never
fails nor sees a partial file or a forward without its rows; afterwards every dashboard query
returns what it returns on a DuckDB store holding the same traces; and the CLI reads the folder."""

from __future__ import annotations

import inspect
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from mythos_probe.collectors.parquet_store import ParquetStore, forward_ids, open_read_only
from mythos_probe.collectors.store import Store, StoreError
from mythos_probe.dashboards import queries, whatif
from tests.dashboards.conftest import make_traces

ROOT = Path(__file__).resolve().parents[2]
WRITERS = 3
BATCHES = 4

# Each writer process writes every third trace, one small batch at a time.
WRITER = """
import sys, time
from mythos_probe.collectors.parquet_store import ParquetStore
from tests.dashboards.conftest import make_traces
folder, k, writers, batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
mine = make_traces()[k::writers]
with ParquetStore(folder) as store:
    for b in range(batches):
        store.write_traces(mine[b::batches])
        time.sleep(0.05)
"""


def check_consistent(store: ParquetStore) -> int:
    """Every visible forward has all its child rows; every visible file reads whole."""
    for path in store.path.glob("[!.]*/date=*/*.parquet"):
        pq.read_table(path)  # a half-written file would fail to parse
    df = store.query(
        "SELECT f.forward_id, f.batch * f.seq_len * f.iterations AS want_pos, f.iterations * f.n_experts AS want_exp,"
        " f.iterations AS want_it,"
        " (SELECT count(*) FROM positions p WHERE p.forward_id = f.forward_id) AS pos,"
        " (SELECT count(*) FROM experts e WHERE e.forward_id = f.forward_id) AS exp,"
        " (SELECT count(*) FROM iterations i WHERE i.forward_id = f.forward_id) AS it FROM forwards f")
    assert (df["pos"] == df["want_pos"]).all() and (df["exp"] == df["want_exp"]).all() and (df["it"] == df["want_it"]).all()
    assert df["forward_id"].is_unique
    return len(df)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(Parquet folder written by 3 concurrent processes, reader observations, DuckDB store of the same traces)."""
    tmp = tmp_path_factory.mktemp("parquet")
    folder = tmp / "pq"
    ParquetStore(folder).close()  # the folder exists before the reader opens it
    reader = ParquetStore.open_read_only(folder)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(folder), str(k), str(WRITERS), str(BATCHES)], cwd=ROOT)
             for k in range(WRITERS)]
    seen = []
    while any(p.poll() is None for p in procs):
        seen.append(check_consistent(reader))
        time.sleep(0.01)
    assert [p.returncode for p in procs] == [0] * WRITERS
    seen.append(check_consistent(reader))
    reader.close()
    store = Store(tmp / "same.duckdb")
    store.write_traces(make_traces())
    yield folder, seen, store
    store.close()


def test_concurrent_writers_and_a_reader_meanwhile(folders):
    folder, seen, _ = folders
    assert seen == sorted(seen) and seen[-1] == len(make_traces())
    assert len(set(seen)) > 2, f"the reader saw no intermediate state ({seen}); it did not overlap the writes"
    files = sorted(p.name for p in (folder / "forwards").glob("date=*/*.parquet"))
    assert len({name.rsplit("-", 2)[0] for name in files}) == WRITERS  # one file set per writer
    assert not list(folder.glob(".tmp-*")), "writers leave no staging folder behind"


def test_forward_id_is_the_hash_of_the_key_independently_computed():
    import hashlib

    t, s = "00" * 16, "ab" * 8
    expected = int(hashlib.blake2b((t + s).encode(), digest_size=8).hexdigest(), 16) >> 1
    assert forward_ids([t], [s]).tolist() == [expected]


def _query_calls():
    """Every public query of the dashboard with arguments; a new required parameter name fails here
    so that the comparison below keeps covering every query."""
    trace_id = make_traces()[3].trace_id
    values = {"trace_id": trace_id, "batch_index": 1, "metric": "rel_residual",
              "metrics": ("rel_residual", "halt_prob"), "x": "step", "column": "run_id", "key": "endpoint",
              "keys": ["endpoint", "user"], "side": ("run", "run-a"), "text": "run-a"}
    sels = [queries.Selection(), queries.Selection(group="run", window="1h"),
            queries.Selection(runs=("run-a", "run-c"), attribute="endpoint", values=("/chat",), group="attr:user")]
    calls = []
    for module in (queries, whatif):
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if name.startswith("_") or fn.__module__ != module.__name__ or name in ("select", "metric_column", "finite"):
                continue
            params = [p for p in inspect.signature(fn).parameters.values() if p.default is inspect.Parameter.empty]
            names = [p.name for p in params[1:] if p.name != "sel"]
            missing = [n for n in names if n not in values]
            assert not missing, f"{module.__name__}.{name}: give test values for {missing}"
            for sel in (sels if any(p.name == "sel" for p in params) else [None]):
                kwargs = {n: values[n] for n in names}
                if sel is not None:
                    kwargs["sel"] = sel
                calls.append((f"{name}({sel})", fn, kwargs))
    return calls


def _canonical(result):
    if not isinstance(result, pd.DataFrame):
        return result
    df = result.drop(columns=[c for c in result.columns if c == "forward_id"])
    return df.sort_values(list(df.columns), ignore_index=True, key=lambda c: c.astype(str))


def test_dashboard_queries_match_a_duckdb_store(folders):
    folder, _, store = folders
    with open_read_only(folder) as parquet:
        assert isinstance(parquet, ParquetStore)
        for label, fn, kwargs in _query_calls():
            got, want = fn(parquet, **kwargs), fn(store, **kwargs)
            if isinstance(want, tuple):  # (one page, rows in all)
                (got, got_total), (want, want_total) = got, want
                assert got_total == want_total, label
            if isinstance(want, pd.DataFrame):
                pd.testing.assert_frame_equal(_canonical(got), _canonical(want), obj=label)
                # these fixtures hold no sweep and no trajectory-probe forwards (their own tests,
                # tests/dashboards/test_issue25_views.py and test_trajectories_page.py, build them)
                assert len(want) or any(k in label for k in ("diverge", "forward", "sweep", "trajector")), \
                    f"{label} is empty: it shows nothing"
            else:
                assert got == want, label


def test_dashboard_queries_read_compacted_and_fresh_file_sets_together(folders, tmp_path):
    _, _, store = folders
    traces = make_traces()
    with ParquetStore(tmp_path / "pq") as w:
        for t in traces[:16]:
            w.write_traces([t])
        w.compact()
        assert len(w.snapshot().files("forwards")) == len({t.start_ns // (86400 * 10**9) for t in traces[:16]})
        for t in traces[16:]:
            w.write_traces([t])
    with ParquetStore.open_read_only(tmp_path / "pq") as parquet:
        for label, fn, kwargs in _query_calls():
            got, want = fn(parquet, **kwargs), fn(store, **kwargs)
            if isinstance(want, tuple):
                (got, got_total), (want, want_total) = got, want
                assert got_total == want_total, label
            if isinstance(want, pd.DataFrame):
                pd.testing.assert_frame_equal(_canonical(got), _canonical(want), obj=label)
            else:
                assert got == want, label


def test_a_span_delivered_twice_stays_once(tmp_path):
    traces = make_traces()[:3]
    with ParquetStore(tmp_path / "pq") as w:
        assert w.write_traces(traces) == 3
        assert w.write_traces(traces[1:]) == 0
    with ParquetStore(tmp_path / "pq") as w:  # a restarted writer knows what the folder holds
        assert w.write_traces(traces) == 0
        assert w.query("SELECT count(*) AS n FROM spans")["n"].iloc[0] == 3


def test_bad_folders_say_what_to_do(tmp_path):
    with pytest.raises(StoreError, match="nothing has been recorded"):
        ParquetStore.open_read_only(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(StoreError, match="new or empty folder"):
        ParquetStore(tmp_path / "other")
    with pytest.raises(StoreError, match="no mythos-probe.json"):
        ParquetStore.open_read_only(tmp_path / "other")


def test_export_and_dashboard_cli_read_the_folder(folders, tmp_path):
    from mythos_probe.dashboards.cli import open_store

    folder, _, store = folders
    out = tmp_path / "exported"
    result = subprocess.run([sys.executable, "-m", "mythos_probe.cli", "export", str(folder), "--parquet", str(out)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    exported = pq.read_table(out / "forwards", partitioning="hive").to_pandas()
    assert sorted(exported["trace_id"]) == sorted(t.trace_id for t in make_traces())
    from mythos_probe.dashboards.app import create_app

    opened, problem = open_store(str(folder))
    assert problem is None and opened.query("SELECT count(*) AS n FROM forwards")["n"].iloc[0] == 24
    create_app(opened)  # every page registers its callbacks on the folder
    opened.close()


def test_a_folder_written_before_a_column_existed_reads_it_as_null(tmp_path, monkeypatch):
    from mythos_probe.collectors import schema

    with monkeypatch.context() as m:  # as an older writer, without `rho_A`, wrote them
        m.setitem(schema.TABLES, "forwards", tuple(c for c in schema.TABLES["forwards"] if c[0] != "rho_A"))
        with ParquetStore(tmp_path / "pq") as w:
            w.write_traces(make_traces()[:2])
    with ParquetStore(tmp_path / "pq") as w:
        w.write_traces(make_traces()[2:3])
    with ParquetStore.open_read_only(tmp_path / "pq") as r:
        df = r.query('SELECT count(*) AS n, count("rho_A") AS rho FROM forwards')
        assert (df["n"].iloc[0], df["rho"].iloc[0]) == (3, 1)
