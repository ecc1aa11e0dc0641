"""Every column of every dashboard query compared with the same aggregate computed in numpy/pandas
from the traces themselves, on a fixture where the aggregates cannot agree by accident: forwards
of different sizes (so a token-weighted mean differs from a plain mean), loop budgets that differ
inside a run, every forward kind, two ranks, two loops, two exit policies, a diverged forward,
NaN and ±Inf values that the aggregates must skip. Every filter of the `Selection` is checked
against the same filter applied to the traces."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest

from mythos_probe.collectors.store import Store
from mythos_probe.dashboards import queries as Q
from mythos_probe.dashboards.queries import Selection
from tests.dashboards.factory import BASE_NS, synthetic_trace

MIN_NS = 60 * 10**9
RUNS = (("run-a", "tiny", 6), ("run-b", "tiny", 5), ("run-c", "small", 4))
DIVERGED = 5


def build_traces():
    rng = np.random.default_rng(24)
    out = []
    for i in range(18):
        run, model, n_loops = RUNS[i % 3]
        t = synthetic_trace(
            rng, run_id=run, model_id=model, step=(i // 3) * 10 + i % 2, start_ns=BASE_NS + i * 7 * MIN_NS + i * 13_000,
            attributes={"endpoint": ("/chat", "/code")[i % 2], "user": ("al", "bo", 'c"q')[i % 3], "n": i},
            n_loops=n_loops - (i % 4 == 1), batch=1 + i % 3, seq_len=3 + (i * 5) % 7,
            diverged_at=2 if i == DIVERGED else -1)
        fm = dict(t.forward_metrics, ponder_cost=float(rng.uniform(1, 5)), remainder_mass=float(rng.uniform(0, 1)))
        if i == 4:
            fm["rho_A"] = math.nan  # skipped by the quantiles, not propagated
        it = dict(t.iteration_metrics)
        if i == 8:
            it["routing_entropy"] = np.r_[math.inf, it["routing_entropy"][1:]]
        kind = "shadow" if i % 5 == 2 else "training" if i % 7 == 3 else "served"
        out.append(dataclasses.replace(
            t, forward_metrics=fm, iteration_metrics=it, kind=kind, loop_name="inner" if i % 6 == 0 else "outer",
            rank=i % 2, world_size=2, exit_policy="fixed" if i % 4 == 0 else "act"))
    return out


TRACES = build_traces()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = Store(tmp_path_factory.mktemp("qnp") / "q.duckdb")
    s.write_traces(TRACES)
    yield s
    s.close()


def frame(traces=TRACES) -> pd.DataFrame:
    rows = []
    for t in traces:
        tokens = t.batch * t.seq_len
        rows.append(dict(trace_id=t.trace_id, run_id=t.run_id, model_id=t.model_id, kind=t.kind, loop_name=t.loop_name,
                         rank=t.rank, exit_policy=t.exit_policy, step=t.step, start_ns=t.start_ns,
                         start_time=pd.Timestamp(t.start_ns // 1000, unit="us"), duration_ms=t.duration_ms,
                         tokens=tokens, iterations=t.iterations, n_loops=t.n_loops, batch=t.batch, seq_len=t.seq_len,
                         detail=t.detail, **{f"attr__{k}": v for k, v in t.attributes.items()},
                         **{k: t.forward_metrics.get(k, math.nan) for k in
                            ("mean_iterations", "flops", "flops_saved", "halted_first_share", "reached_last_share",
                             "remainder_mass", "ponder_cost", "rho_A", "diverged_at")}))
    return pd.DataFrame(rows)


F = frame()
SERVED = F[F.kind == "served"]
BY_ID = {t.trace_id: t for t in TRACES}


def ids(store, sel):
    return set(Q.select(store, sel, "SELECT trace_id FROM sel")["trace_id"])


def close(a, b, **kw):
    np.testing.assert_allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=1e-9, atol=1e-12, **kw)


def test_fixture_separates_the_aggregates():
    w = (F.mean_iterations * F.tokens).sum() / F.tokens.sum()
    assert abs(w - F.mean_iterations.mean()) > 0.05  # token-weighted ≠ plain mean
    assert F.groupby("run_id").iterations.nunique().min() > 1  # loop budgets differ inside a run
    assert set(F.kind) == {"served", "shadow", "training"}


# --- the selection --------------------------------------------------------------------------------

def test_selection_defaults():
    assert Selection() == Selection(models=(), runs=(), window="all", attribute=None, values=(), group="none",
                                    kinds=("served",), loops=(), ranks=(), policies=(), min_iterations=None,
                                    max_iterations=None, start=None, end=None)
    assert Q.WINDOWS == {"all": None, "5m": 300, "1h": 3600, "24h": 86400, "7d": 604800}


@pytest.mark.parametrize("sel, keep", [
    (Selection(), F.kind == "served"),
    (Selection(kinds=()), F.kind == F.kind),
    (Selection(kinds=("shadow", "training")), F.kind != "served"),
    (Selection(kinds=(), models=("small",)), F.model_id == "small"),
    (Selection(kinds=(), runs=("run-a", "run-b")), F.run_id != "run-c"),
    (Selection(kinds=(), loops=("inner",)), F.loop_name == "inner"),
    (Selection(kinds=(), ranks=(1,)), F["rank"] == 1),
    (Selection(kinds=(), policies=("fixed",)), F.exit_policy == "fixed"),
    (Selection(kinds=(), min_iterations=5), F.iterations >= 5),
    (Selection(kinds=(), max_iterations=5), F.iterations <= 5),
    (Selection(kinds=(), min_iterations=5, max_iterations=5), F.iterations == 5),
    (Selection(kinds=(), start=F.start_time[3]), F.start_time >= F.start_time[3]),
    (Selection(kinds=(), end=F.start_time[3]), F.start_time <= F.start_time[3]),
    (Selection(kinds=(), window="1h"), F.start_time >= F.start_time.max() - pd.Timedelta(seconds=3600)),
    (Selection(kinds=(), window="5m"), F.start_time >= F.start_time.max() - pd.Timedelta(seconds=300)),
    (Selection(kinds=(), attribute="endpoint", values=("/code",)), F.attr__endpoint == "/code"),
    (Selection(kinds=(), attribute="user", values=('c"q',)), F.attr__user == 'c"q'),
    (Selection(kinds=(), attribute="endpoint"), F.kind == F.kind),  # no values: no filter
    (Selection(kinds=(), values=("/code",)), F.kind == F.kind),  # no attribute: no filter
])
def test_each_filter_matches_the_traces(store, sel, keep):
    want = set(F.trace_id[keep])
    assert 0 < len(want)
    assert ids(store, sel) == want


@pytest.mark.parametrize("group, key", [("none", lambda r: "all"), ("model", lambda r: r.model_id),
                                        ("run", lambda r: r.run_id), ("kind", lambda r: r.kind),
                                        ("loop", lambda r: r.loop_name), ("rank", lambda r: str(r["rank"])),
                                        ("policy", lambda r: r.exit_policy), ("attr:user", lambda r: r.attr__user),
                                        ("attr:missing", lambda r: "(unset)")])
def test_groups(store, group, key):
    got = Q.select(store, Selection(kinds=(), group=group), "SELECT trace_id, grp FROM sel")
    assert dict(zip(got.trace_id, got.grp)) == {r.trace_id: key(r) for _, r in F.iterrows()}


def test_a_bad_group_names_the_choices():
    with pytest.raises(ValueError, match="cannot group by 'x'; choose none, model, run, kind, loop, rank, policy or attr:<key>"):
        Selection(group="x").cte()


def test_helpers():
    assert Q._json_path('a"b') == '$."a\\"b"'
    assert Q.metric_column("state_norm", ("state_norm",)) == '"state_norm"'
    with pytest.raises(ValueError, match="unknown metric 'x'"):
        Q.metric_column("x", ("state_norm",))
    assert Q.finite("c") == "CASE WHEN isfinite(c) THEN c END"
    assert Q._quote('a"b') == '"a""b"'


def test_filter_bar_lists(store):
    for col in Q.FILTER_COLUMNS:
        assert Q.distinct_values(store, col) == sorted(set(F[col if col != "rank" else "rank"]))
    with pytest.raises(ValueError, match="not a filter column: 'trace_id'"):
        Q.distinct_values(store, "trace_id")
    assert Q.attribute_keys(store) == ["endpoint", "n", "user"]
    assert Q.attribute_values(store, "user") == sorted(set(F.attr__user))
    assert Q.attribute_values(store, "user", limit=2) == sorted(set(F.attr__user))[:2]
    assert len(Q.attribute_values(store, "n")) == 18  # the default limit is far above
    assert Q.forward_count(store) == 18


# --- runs and forwards ----------------------------------------------------------------------------

def test_totals_every_column(store):
    for sel, f in ((Selection(), SERVED), (Selection(kinds=()), F)):
        got = Q.totals(store, sel).iloc[0]
        assert got.forwards == len(f) and got.runs == f.run_id.nunique() and got.tokens == f.tokens.sum()
        close(got.mean_ms, f.duration_ms.mean())
        close(got.p95_ms, np.percentile(f.duration_ms, 95))
        close(got.mean_iterations, f.iterations.mean())
        close(got.iterations_per_token, (f.mean_iterations * f.tokens).sum() / f.tokens.sum())
        assert got["last"] == f.start_time.max()
    empty = Q.totals(store, Selection(models=("none",))).iloc[0]
    assert empty.forwards == 0 and empty.tokens == 0


def test_runs_every_column(store):
    got = Q.runs(store, Selection(kinds=()))
    f = F.assign(w=F.mean_iterations * F.tokens)
    g = f.groupby(["run_id", "model_id"])
    want = pd.DataFrame({"forwards": g.size(), "tokens": g.tokens.sum(), "mean_ms": g.duration_ms.mean(),
                         "p95_ms": g.duration_ms.quantile(0.95), "mean_iterations": g.iterations.mean(),
                         "iterations_per_token": g.w.sum() / g.tokens.sum(), "first": g.start_time.min(),
                         "last": g.start_time.max()}).reset_index().sort_values("last", ascending=False)
    assert got.run_id.tolist() == want.run_id.tolist() and got.model_id.tolist() == want.model_id.tolist()
    for col in ("forwards", "tokens", "mean_ms", "p95_ms", "mean_iterations", "iterations_per_token"):
        close(got[col], want[col])
    assert got["first"].tolist() == want["first"].tolist() and got["last"].tolist() == want["last"].tolist()


def test_forward_list_columns_sort_filter_and_pages(store):
    sel = Selection(kinds=())
    page, total = Q.forward_list(store, sel, ["user", "endpoint"])
    assert total == 18 and len(page) == 18
    assert list(page.columns) == list(Q.LIST_COLUMNS) + ["attr__user", "attr__endpoint"]
    want = F.sort_values(["start_time", "trace_id"], ascending=[False, True])
    assert page.trace_id.tolist() == want.trace_id.tolist()
    assert page.attr__user.tolist() == want.attr__user.tolist()
    close(page.mean_iterations, want.mean_iterations)
    close(page.duration_ms, want.duration_ms)
    assert page.tokens.tolist() == want.tokens.tolist() and page.step.tolist() == want.step.tolist()
    # sort, then page
    page, total = Q.forward_list(store, sel, [], sort=[{"colId": "tokens", "sort": "asc"}], offset=2, limit=3)
    want = F.sort_values(["tokens", "start_time", "trace_id"], ascending=[True, False, True])
    assert total == 18 and page.trace_id.tolist() == want.trace_id.tolist()[2:5]
    page, _ = Q.forward_list(store, sel, [], sort=[{"colId": "duration_ms", "sort": "desc"}])
    assert page.trace_id.tolist()[:100] == F.sort_values(["duration_ms", "start_time", "trace_id"],
                                                         ascending=[False, False, True]).trace_id.tolist()
    everything, total = Q.forward_list(store, sel, [], limit=None)
    assert len(everything) == total == 18
    assert len(Q.forward_list(store, sel, [])[0]) == 18 and len(Q.forward_list(store, Selection(kinds=()), [], limit=4)[0]) == 4


@pytest.mark.parametrize("column, spec, keep", [
    ("run_id", {"filterType": "text", "type": "contains", "filter": "-b"}, F.run_id.str.contains("-b")),
    ("run_id", {"filterType": "text", "type": "notContains", "filter": "-b"}, ~F.run_id.str.contains("-b")),
    ("model_id", {"filterType": "text", "type": "equals", "filter": "small"}, F.model_id == "small"),
    ("model_id", {"filterType": "text", "type": "notEqual", "filter": "small"}, F.model_id != "small"),
    ("run_id", {"filterType": "text", "type": "startsWith", "filter": "run-c"}, F.run_id == "run-c"),
    ("run_id", {"filterType": "text", "type": "endsWith", "filter": "a"}, F.run_id == "run-a"),
    ("rank", {"filterType": "text", "type": "equals", "filter": "1"}, F["rank"] == 1),
    ("tokens", {"filterType": "number", "type": "equals", "filter": 12}, F.tokens == 12),
    ("tokens", {"filterType": "number", "type": "notEqual", "filter": 12}, F.tokens != 12),
    ("tokens", {"filterType": "number", "type": "greaterThan", "filter": 12}, F.tokens > 12),
    ("tokens", {"filterType": "number", "type": "greaterThanOrEqual", "filter": 12}, F.tokens >= 12),
    ("tokens", {"filterType": "number", "type": "lessThan", "filter": 12}, F.tokens < 12),
    ("tokens", {"filterType": "number", "type": "lessThanOrEqual", "filter": 12}, F.tokens <= 12),
    ("tokens", {"filterType": "number", "type": "inRange", "filter": 6, "filterTo": 12}, F.tokens.between(6, 12)),
    ("attr__user", {"filterType": "text", "type": "equals", "filter": "bo"}, F.attr__user == "bo"),
])
def test_forward_list_filters(store, column, spec, keep):
    page, total = Q.forward_list(store, Selection(kinds=()), ["user"], filters={column: spec}, limit=None)
    assert 0 < keep.sum() < 18
    assert set(page.trace_id) == set(F.trace_id[keep]) and total == keep.sum()


def test_forward_list_refusals(store):
    sel = Selection(kinds=())
    with pytest.raises(ValueError, match="cannot filter the forwards list on 'attr__user'"):
        Q.forward_list(store, sel, [], filters={"attr__user": {"filterType": "text", "type": "equals", "filter": "x"}})
    with pytest.raises(ValueError, match="unsupported filter text/blank on 'run_id'"):
        Q.forward_list(store, sel, [], filters={"run_id": {"filterType": "text", "type": "blank"}})
    with pytest.raises(ValueError, match="unsupported filter number/contains"):
        Q.forward_list(store, sel, [], filters={"tokens": {"filterType": "number", "type": "contains", "filter": 1}})
    with pytest.raises(ValueError, match="cannot sort the forwards list by"):
        Q.forward_list(store, sel, [], sort=[{"colId": "tokens", "sort": "up"}])
    with pytest.raises(ValueError, match="cannot sort the forwards list by"):
        Q.forward_list(store, sel, [], sort=[{"colId": "secret", "sort": "asc"}])


def test_one_forward_and_the_newest(store):
    t = TRACES[4]
    row = Q.forward(store, t.trace_id).iloc[0]
    assert (row.run_id, row.step, row.tokens) == (t.run_id, t.step, t.batch * t.seq_len)
    assert '"user": "bo"' in row.attributes_text
    assert Q.newest_trace(store, Selection(kinds=())) == F.sort_values("start_time").trace_id.iloc[-1]
    assert Q.newest_trace(store, Selection()) == SERVED.sort_values("start_time").trace_id.iloc[-1]
    assert Q.newest_trace(store, Selection(models=("none",))) is None


def test_position_grid(store):
    t = TRACES[7]
    got = Q.position_grid(store, t.trace_id, 1, "state_norm")
    assert list(got.columns) == ["position", "iteration", "value", "token_text", "iterations_used"]
    S, I = t.seq_len, t.iterations
    assert got.position.tolist() == list(np.arange(S).repeat(I)) and got.iteration.tolist() == list(range(I)) * S
    close(got.value, t.position_metrics["state_norm"][1].ravel())
    assert got.token_text.tolist() == [w for w in t.token_text[1] for _ in range(I)]
    assert got.iterations_used.tolist() == list(t.position_iterations[1].repeat(I))


def test_forward_iterations(store):
    t = TRACES[2]
    got = Q.forward_iterations(store, t.trace_id, ("state_norm", "halt_prob"))
    assert got.iteration.tolist() == list(range(t.iterations))
    close(got.state_norm, t.iteration_metrics["state_norm"])
    close(got.halt_prob, t.iteration_metrics["halt_prob"])


def test_position_means_newest_per_group(store):
    sel = Selection(kinds=(), group="run")
    got = Q.position_means(store, sel, "rel_residual", per_group=2, groups=2)
    assert set(got.grp) == {"run-a", "run-b"}
    for run in ("run-a", "run-b"):
        picked = F[F.run_id == run].sort_values("start_time").trace_id.tolist()[-2:]
        ts = [BY_ID[i] for i in picked]
        cells = {}
        for t in ts:
            v, used = t.position_metrics["rel_residual"], t.position_iterations
            for b in range(t.batch):
                for s in range(t.seq_len):
                    for it in range(t.iterations):
                        cells.setdefault((s, it), ([], []))
                        if np.isfinite(v[b, s, it]):
                            cells[(s, it)][0].append(v[b, s, it])
                        cells[(s, it)][1].append(used[b, s])
        g = got[got.grp == run].sort_values(["position", "iteration"])
        keys = sorted(cells)
        assert list(zip(g.position, g.iteration)) == keys
        close(g.value, [np.mean(cells[k][0], dtype=np.float64) if cells[k][0] else np.nan for k in keys])
        close(g.used, [np.mean(cells[k][1]) for k in keys])
        assert (g.forwards == 2).all()
    # the defaults: 500 per group, 2 groups
    default = Q.position_means(store, sel, "rel_residual")
    assert set(default.grp) == {"run-a", "run-b"}
    assert (default.groupby("grp").forwards.first() == F.groupby("run_id").size()[["run-a", "run-b"]]).all()
    empty = Q.position_means(store, Selection(models=("none",)), "rel_residual")
    assert empty.empty and list(empty.columns) == ["grp", "position", "iteration", "value", "used", "forwards"]


# --- loops and halting ----------------------------------------------------------------------------

def iteration_frame(metrics, traces=TRACES):
    rows = []
    for t in traces:
        for i in range(t.iterations):
            rows.append(dict(trace_id=t.trace_id, run_id=t.run_id, iteration=i,
                             **{m: t.iteration_metrics.get(m, np.full(t.iterations, np.nan))[i] for m in metrics}))
    return pd.DataFrame(rows)


def test_tokens_by_iterations_used_and_forwards_by_iterations(store):
    sel = Selection(kinds=(), group="run")
    got = Q.tokens_by_iterations_used(store, sel)
    it = iteration_frame(["exit_count"])
    want = it.assign(used=it.iteration + 1).groupby(["run_id", "used"]).exit_count.sum()
    want = want[want > 0].reset_index()
    assert got.grp.tolist() == want.run_id.tolist() and got.used.tolist() == want.used.tolist()
    close(got.tokens, want.exit_count)
    got = Q.forwards_by_iterations(store, sel)
    want = F.groupby(["run_id", "iterations"]).size().reset_index()
    assert got.grp.tolist() == want.run_id.tolist() and got.iterations.tolist() == want.iterations.tolist()
    assert got.forwards.tolist() == want[0].tolist()


def test_compute_saved_every_column(store):
    got = Q.compute_saved(store, Selection(kinds=(), group="run"))
    f = F.assign(used=F.mean_iterations * F.tokens, budget=F.n_loops * F.tokens)
    g = f.groupby("run_id")
    assert got.grp.tolist() == sorted(set(F.run_id))
    assert got.forwards.tolist() == g.size().tolist() and got.tokens.tolist() == g.tokens.sum().tolist()
    close(got.iterations_per_token, g.used.sum() / g.tokens.sum())
    close(got.max_per_token, g.budget.sum() / g.tokens.sum())
    assert got.max_n_loops.tolist() == g.n_loops.max().tolist()
    close(got.saved_share, 1 - g.used.sum() / g.budget.sum())


def test_halting_by_iteration_every_column(store):
    names = ["exit_count", "halted_fraction", "cum_halt", "halt_low_share", "halt_high_share"]
    got = Q.halting_by_iteration(store, Selection(kinds=(), group="run"))
    it = iteration_frame(names)
    g = it.groupby(["run_id", "iteration"])
    want = g[names[1:]].mean().assign(exits=g.exit_count.sum()).reset_index()
    want["cumulative_halted"] = want.groupby("run_id").exits.cumsum() / want.groupby("run_id").exits.transform("sum")
    assert got.grp.tolist() == want.run_id.tolist() and got.iteration.tolist() == want.iteration.tolist()
    for col in ["exits", "cumulative_halted", *names[1:]]:
        close(got[col], want[col])


def test_saturation_every_column(store):
    got = Q.saturation(store, Selection(kinds=(), group="policy"))
    cols = ["halted_first_share", "reached_last_share", "remainder_mass", "ponder_cost"]
    want = F.groupby("exit_policy")[cols].mean()
    assert got.grp.tolist() == want.index.tolist()
    for col in cols:
        close(got[col], want[col])


def test_iteration_means_skip_nan_and_inf(store):
    names = ("routing_entropy", "growth_ratio", "state_norm")
    got = Q.iteration_means(store, Selection(kinds=(), group="model"), names)
    it = iteration_frame(names).merge(F[["trace_id", "model_id"]])
    for m in names:
        it[m] = it[m].where(np.isfinite(it[m]))
    want = it.groupby(["model_id", "iteration"])[list(names)].mean().reset_index()
    assert got.grp.tolist() == want.model_id.tolist() and got.iteration.tolist() == want.iteration.tolist()
    for m in names:
        close(got[m], want[m])


# --- spectral, experts, cost ----------------------------------------------------------------------

def per_forward_peaks(traces=TRACES):
    out = {}
    for t in traces:
        g = t.iteration_metrics["growth_ratio"]
        g = g[np.isfinite(g)]
        out[t.trace_id] = g.max() if g.size else np.nan
    return out


@pytest.mark.parametrize("buckets", [3, 80])
def test_spectral_bands_every_column(store, buckets):
    got = Q.spectral_bands(store, Selection(kinds=()), "step", buckets=buckets)
    peak = per_forward_peaks()
    f = F.assign(x=F.step.astype(float), rho=F.rho_A.where(np.isfinite(F.rho_A)), growth=F.trace_id.map(peak))
    width = max((f.x.max() - f.x.min()) / buckets, 1.0)
    f["bucket"] = np.floor((f.x - f.x.min()) / width)
    g = f.groupby(["run_id", "bucket"])
    assert list(zip(got.run_id, got.bucket)) == list(g.groups)
    close(got.x, g.x.mean())
    assert got.forwards.tolist() == g.size().tolist()
    assert got.t_lo.tolist() == g.start_time.min().tolist() and got.t_hi.tolist() == g.start_time.max().tolist()
    for q in (10, 50, 90):
        close(got[f"rho_p{q}"], g.rho.quantile(q / 100))
        close(got[f"growth_p{q}"], g.growth.quantile(q / 100))


def test_spectral_bands_over_time_use_microseconds_and_a_second_at_least(store):
    got = Q.spectral_bands(store, Selection(kinds=()), "time")
    x = F.start_ns // 1000
    width = max((x.max() - x.min()) / 80, 1e6)
    bucket = np.floor((x - x.min()) / width)
    g = F.assign(x=x.astype(float), bucket=bucket).groupby(["run_id", "bucket"])
    assert list(zip(got.run_id, got.bucket)) == list(g.groups)
    close(got.x, g.x.mean())
    one = Q.spectral_bands(store, Selection(kinds=(), runs=("run-a",), max_iterations=3), "time")
    assert one.bucket.tolist() == [0.0] * len(one)  # a single forward: width falls back to one second


def test_diverged_points_and_divergences(store):
    t = TRACES[DIVERGED]
    g = t.iteration_metrics["growth_ratio"]
    got = Q.diverged_points(store, Selection(kinds=()), "step")
    assert got.to_dict("records") == [dict(trace_id=t.trace_id, run_id=t.run_id, model_id=t.model_id,
                                           endpoint=t.attributes["endpoint"], x=t.step,
                                           rho=t.forward_metrics["rho_A"], growth=np.nanmax(g[np.isfinite(g)]))]
    assert Q.diverged_points(store, Selection(kinds=()), "time").x.iloc[0] == pd.Timestamp(t.start_ns // 1000, unit="us")
    assert Q.diverged_points(store, Selection(kinds=()), "step", limit=0).empty
    got = Q.divergences(store, Selection(kinds=()))
    assert got.to_dict("records") == [dict(start_time=pd.Timestamp(t.start_ns // 1000, unit="us"), trace_id=t.trace_id,
                                           run_id=t.run_id, step=t.step, diverged_at=2, rho_A=t.forward_metrics["rho_A"])]
    assert Q.divergences(store, Selection(kinds=()), limit=0).empty


def test_expert_load_every_column(store):
    sel = Selection(kinds=(), runs=("run-a", "run-c"))
    got = Q.expert_load(store, sel)
    keep = [t for t in TRACES if t.run_id in ("run-a", "run-c")]
    I = max(t.iterations for t in keep)
    total = np.zeros((I, 4))
    for t in keep:
        total[: t.iterations] += t.expert_load
    want = [(i, e, total[i, e], total[i, e] / total[i].sum()) for i in range(I) for e in range(4)]
    assert list(zip(got.iteration, got.expert)) == [(i, e) for i, e, _, _ in want]
    close(got.load, [w[2] for w in want])
    close(got.share, [w[3] for w in want])


def test_cost_by_group_every_column(store):
    got = Q.cost_by_group(store, Selection(kinds=(), group="run"))
    f = F.assign(ti=F.mean_iterations * F.tokens)
    g = f.groupby("run_id")
    want = pd.DataFrame({"forwards": g.size(), "tokens": g.tokens.sum(), "token_iterations": g.ti.sum(),
                         "flops": g.flops.sum(), "flops_saved": g.flops_saved.mean(),
                         "mean_ms": g.duration_ms.mean()}).sort_values("flops", ascending=False)
    assert got.grp.tolist() == want.index.tolist()
    for col in want.columns:
        close(got[col], want[col])


@pytest.mark.parametrize("buckets", [5, 60])
def test_cost_over_time_every_column(store, buckets):
    got = Q.cost_over_time(store, Selection(kinds=(), group="model"), buckets=buckets)
    us = F.start_ns // 1000
    width = int(math.ceil(max(us.max() - us.min(), 1) / buckets))
    origin = pd.Timestamp("2000-01-03").value // 1000  # DuckDB's time_bucket origin for sub-month widths
    t = pd.to_datetime(origin + (us - origin) // width * width, unit="us")
    f = F.assign(t=t, ti=F.mean_iterations * F.tokens)
    want = f.groupby(["t", "model_id"]).agg(flops=("flops", "sum"), ti=("ti", "sum")).reset_index()
    assert got.t.tolist() == want.t.tolist() and got.grp.tolist() == want.model_id.tolist()
    close(got.flops, want.flops)
    close(got.token_iterations, want.ti)


def test_cross_rank_joins_the_ranks_of_a_step(store):
    got = Q.cross_rank(store, Selection(kinds=()))
    f = F.groupby(["run_id", "loop_name", "step"])
    assert got.drop_duplicates(["run_id", "loop_name", "step"]).shape[0] == len(f)
    first = got.drop_duplicates(["run_id", "loop_name", "step"]).set_index(["run_id", "loop_name", "step"])
    assert first.forwards.to_dict() == f.size().to_dict()
