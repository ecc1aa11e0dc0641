"""`dashboards/queries.py`: the defaults the pages rely on (how many buckets, rows and forwards a view
asks for) pinned, and the guards and edges the numpy comparison in test_queries_numpy.py does not
reach (the counts that explain an empty view). Written against survivors of `scripts/mutation.sh dashboards/queries.py`."""

from __future__ import annotations

import dataclasses
import inspect

import pandas as pd
import pytest

from mythos_probe.collectors.store import Store
from mythos_probe.dashboards import queries as Q
from mythos_probe.dashboards.queries import Selection
from tests.dashboards.test_queries_numpy import F, TRACES


def defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not inspect.Parameter.empty}


def test_view_defaults():
    assert defaults(Q.spectral_bands) == {"buckets": 80}
    assert defaults(Q.diverged_points) == {"limit": 2000}
    assert defaults(Q.divergences) == {"limit": 50}
    assert defaults(Q.cost_over_time) == {"buckets": 60}
    assert defaults(Q.position_means) == {"per_group": 500, "groups": 2}
    assert defaults(Q.attribute_values) == {"limit": 200}
    assert defaults(Q.forward_list) == {"sort": None, "filters": None, "offset": 0, "limit": 100}
    assert defaults(Q.select) == {"params": ()}
    assert defaults(Q._select_rolled) == {"params": ()}
    assert defaults(Q._list_sql) == {"count": False}
    assert defaults(Q._per_forward_peaks) == {"where": "TRUE"}


# --- why a view is empty: counts against the traces --------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = Store(tmp_path_factory.mktemp("qdg") / "q.duckdb")
    s.write_traces(TRACES)
    yield s
    s.close()


@pytest.mark.parametrize("sel, keep", [
    (Selection(), F.kind == "served"),
    (Selection(kinds=("shadow",), models=("tiny",)), (F.kind == "shadow") & (F.model_id == "tiny")),
    (Selection(kinds=(), runs=("run-c",)), F.run_id == "run-c"),
    (Selection(models=("nothing",)), F.kind != F.kind),
])
def test_matching_and_kind_counts_against_the_traces(store, sel, keep):
    assert Q.matching_count(store, sel) == int(keep.sum())
    # every kind the rest of the selection keeps, whatever sel.kinds says
    rest = dataclasses.replace(sel, kinds=())
    rest_keep = F.index.isin(F.index)
    if rest.models:
        rest_keep &= F.model_id.isin(rest.models)
    if rest.runs:
        rest_keep &= F.run_id.isin(rest.runs)
    want = F[rest_keep].groupby("kind").size()
    got = Q.kind_counts(store, sel)
    assert got == {k: int(n) for k, n in want.items()}
    assert all(type(n) is int for n in got.values()) and list(got) == sorted(got)


def test_shapes_newest_first_with_counts(store):
    sel = Selection(kinds=())
    got = Q.shapes(store, sel)
    assert list(got.columns) == ["model_id", "loop_name", "forwards", "newest"]
    want = (F.groupby(["model_id", "loop_name"]).agg(forwards=("trace_id", "size"), newest=("start_time", "max"))
            .reset_index().sort_values(["newest", "model_id", "loop_name"], ascending=[False, True, True]))
    assert got[["model_id", "loop_name"]].values.tolist() == want[["model_id", "loop_name"]].values.tolist()
    assert got.forwards.tolist() == want.forwards.tolist()
    assert [pd.Timestamp(t) for t in got.newest] == list(want.newest)
    served = Q.shapes(store, Selection())
    assert served.forwards.sum() == (F.kind == "served").sum()


def test_store_wide_counts(store):
    assert Q.forward_count(store) == len(F) == 18
    assert Q.attribute_values(store, "n", limit=5) == sorted(str(n) for n in F.attr__n)[:5]


# --- the defaults pinned by calls that omit them (mutmut's trampoline keeps the original signature,
# so `inspect.signature` above cannot see a mutated default: only a call without the argument can)

COPIES = 2005  # more rows than every default limit (50, 100, 200, 2000) and more sweeps than 12


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    """One diverged forward copied by SQL into COPIES forwards (ids, start times, attributes and
    sweeps apart), with its rollup peaks: more rows than any view's default limit."""
    import numpy as np

    from tests.dashboards.factory import synthetic_trace

    s = Store(tmp_path_factory.mktemp("crowded") / "c.duckdb")
    s.write_traces([synthetic_trace(np.random.default_rng(9), diverged_at=1, attributes={"n": 0})])
    copy = ("forward_id + r AS forward_id, lpad(CAST(r AS VARCHAR), 32, '0') AS trace_id,"
            " start_time + to_seconds(r) AS start_time,"
            " CAST(json_object('n', r, 'sweep', 's' || CAST(r % 20 AS VARCHAR), 'sweep_loops', r) AS JSON) AS attributes")
    s._con.execute(f"INSERT INTO forwards SELECT f.* REPLACE ({copy}) FROM forwards f, range(1, {COPIES}) t(r)")
    s._con.execute(f"INSERT INTO rollup_peaks SELECT p.* REPLACE (forward_id + r AS forward_id)"
                   f" FROM rollup_peaks p, range(1, {COPIES}) t(r)")
    s._con.execute(f"INSERT INTO positions SELECT p.* REPLACE (forward_id + r AS forward_id)"
                   f" FROM positions p, range(1, {COPIES}) t(r) WHERE r >= {COPIES - 520}")  # the newest 520 forwards
    yield s
    s.close()


def test_limits_by_default(crowded):
    sel = Selection()
    assert Q.forward_count(crowded) == COPIES
    div = Q.divergences(crowded, sel)
    assert len(div) == 50 and div.start_time.is_monotonic_decreasing
    assert len(Q.diverged_points(crowded, sel, "step")) == 2000
    assert len(Q.attribute_values(crowded, "n")) == 200
    page, total = Q.forward_list(crowded, sel, [])
    assert total == COPIES and len(page) == 100
    assert page.trace_id.tolist() == Q.forward_list(crowded, sel, [], offset=0, limit=100)[0].trace_id.tolist()
    assert page.trace_id.iloc[0] == f"{COPIES - 1:032d}"  # newest first, from the first row: offset 0
    means = Q.position_means(crowded, sel, "state_norm")  # the newest 500 forwards of the group
    assert len(means) and set(means.forwards) == {500}
    sweeps = Q.sweep_forwards(crowded, sel)
    assert sweeps.sweep.nunique() == 12 == Q.sweep_curves(crowded, sel).sweep.nunique()
    assert Q.sweep_curves(crowded, sel, sweeps=3).sweep.nunique() == 3 == Q.sweep_forwards(crowded, sel, 3).sweep.nunique()


def test_buckets_and_groups_by_default(store):
    sel = Selection(kinds=(), group="run")
    for fn, args, name, value in ((Q.cost_over_time, (), "buckets", 60), (Q.spectral_bands, ("time",), "buckets", 80),
                                  (Q.position_means, ("state_norm",), "groups", 2)):
        implicit = fn(store, sel, *args)
        pd.testing.assert_frame_equal(implicit, fn(store, sel, *args, **{name: value}))
        other = fn(store, sel, *args, **{name: value + 1})
        assert not implicit.equals(other), fn.__name__  # the fixture can tell the default from its neighbour


def test_a_selection_prunes_a_parquet_folder_by_every_label_and_bound(tmp_path, store):
    """`Selection.scoped`: a Parquet folder is read through `pruned` with the selection's start,
    end, window, models and runs (each one passed: a dropped one opens files the view skips);
    a store without `pruned` (DuckDB), or a selection with nothing to prune, reads the store itself."""
    from mythos_probe.collectors.parquet_store import ParquetStore, Pruned

    folder = ParquetStore(tmp_path / "pq")
    folder.write_traces(TRACES[:3])
    sel = Selection(models=("tiny",), runs=("run-a", "run-b"), window="1h", start=F.start_time[1], end=F.start_time[5])
    pruned = sel.scoped(folder)
    assert isinstance(pruned, Pruned) and pruned.store is folder
    assert (pruned.start, pruned.end, pruned.window_s) == (sel.start, sel.end, 3600)
    assert (pruned.models, pruned.runs) == ({"tiny"}, {"run-a", "run-b"})
    assert Selection().scoped(folder) is folder
    assert sel.scoped(store) is store


def test_a_text_filter_without_text_keeps_every_row(store):
    """ag-grid sends a text filter with no `filter` while the user has typed nothing: every row."""
    sel = Selection(kinds=())
    for op in ("contains", "startsWith", "endsWith"):
        _, total = Q.forward_list(store, sel, [], filters={"run_id": {"filterType": "text", "type": op}})
        assert total == len(F), op
    _, none = Q.forward_list(store, sel, [], filters={"run_id": {"filterType": "text", "type": "equals"}})
    assert none == 0  # equals "" matches no run


def test_the_forwards_list_counts_unsorted_reading_only_the_filtered_attributes(store):
    """The list's count query (`_list_sql(count=True)`) has no ORDER BY and extracts only the
    attributes a filter reads; the page is sorted as asked and carries every attribute column."""
    sent = []

    class Recording:  # the real store, with the SQL it is sent kept
        def query(self, sql, params=()):
            sent.append(sql)
            return store.query(sql, params)

    sel = Selection(kinds=())
    filters = {"attr__user": {"filterType": "text", "type": "equals", "filter": "al"}}
    page, total = Q.forward_list(Recording(), sel, ["endpoint", "user"], sort=[{"colId": "tokens", "sort": "asc"}],
                                 filters=filters)
    counts = [s for s in sent if "count(*) AS n" in s]
    assert len(counts) == 1 and len(sent) == 2
    assert "ORDER BY" not in counts[0] and '"attr__user"' in counts[0] and '"attr__endpoint"' not in counts[0]
    want = F[F.attr__user == "al"].sort_values(["tokens", "start_time", "trace_id"], ascending=[True, False, True])
    assert total == len(want) == len(page) > 1
    assert page.trace_id.tolist() == want.trace_id.tolist()
    assert page.attr__endpoint.tolist() == want.attr__endpoint.tolist()


class Bare:
    """A store that says nothing of rollups (only `query`): the views read its raw rows."""

    def __init__(self, store):
        self.query = store.query


def test_the_views_read_the_rollups_a_store_keeps_and_raw_rows_otherwise(tmp_path):
    """With the rollup rows deleted, a store that keeps rollups shows nothing (the views do read
    them) and the same store seen without rollups shows what it showed before, from its raw rows."""
    sel = Selection(kinds=())
    views = {"experts": Q.expert_load, "bands": lambda s, sel: Q.spectral_bands(s, sel, "step"),
             "diverged": lambda s, sel: Q.diverged_points(s, sel, "step"), "tokens": Q.tokens_by_iterations_used,
             "means": lambda s, sel: Q.iteration_means(s, sel, ("state_norm", "halt_prob"))}
    with Store(tmp_path / "r.duckdb") as s:
        s.write_traces(TRACES)
        before = {name: view(s, sel) for name, view in views.items()}
        assert all(len(df) for df in before.values())
        with s._cursors.cursor(read=False) as cur:
            cur.execute("DELETE FROM rollup_experts")
            cur.execute("DELETE FROM rollup_peaks")
            cur.execute("DELETE FROM rollup_iterations")
        for name, view in views.items():
            assert view(s, sel).empty, name
            pd.testing.assert_frame_equal(view(Bare(s), sel), before[name], check_dtype=False, rtol=1e-12, obj=name)


def test_spectral_bands_over_a_few_seconds_are_whole_seconds_wide(tmp_path):
    """Over time the buckets are at least a second wide: six forwards half a second apart fall
    two by two into buckets 0, 1, 2 (80 buckets over 2.5 s would be 31 ms wide), the one exactly
    a second after the first into bucket 1."""
    import numpy as np

    from tests.dashboards.factory import BASE_NS, synthetic_trace

    rng = np.random.default_rng(5)
    traces = [synthetic_trace(rng, run_id="r", start_ns=BASE_NS + k * 500_000_000, n_loops=3, seq_len=2)
              for k in range(6)]
    with Store(tmp_path / "s.duckdb") as s:
        s.write_traces(traces)
        got = Q.spectral_bands(s, Selection(), "time")
    x = np.array([t.start_ns // 1000 for t in traces], dtype=float)
    assert got.bucket.tolist() == [0.0, 1.0, 2.0] and got.forwards.tolist() == [2, 2, 2]
    np.testing.assert_allclose(got.x, [x[0:2].mean(), x[2:4].mean(), x[4:6].mean()])
