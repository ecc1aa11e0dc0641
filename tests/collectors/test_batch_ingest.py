"""Batch-columnar ingest (`rows` builds each table's columns once per batch; `rollups` appends a
batch's increments and sums an hour to one row per key once ingest moves past it).

Each table is checked cell by cell against the records themselves, read in plain Python, over a
batch that mixes what the column building must keep apart: forwards of different iteration counts
and shapes, summary and positions detail, metrics some forwards lack (NULL), NaN, forwards without
expert load, token text or token ids. The rollups are checked against the migration's SQL backfill.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest

from mythos_probe.collectors import rollups, rows
from mythos_probe.collectors.store import Store
from mythos_probe.records import ITERATION_METRIC_NAMES, POSITION_METRIC_NAMES
from tests.collectors.factory import make_trace
from tests.dashboards.factory import BASE_NS, synthetic_trace

FIRST = 41


def _batch():
    out = []
    for i in range(7):
        t = make_trace(i, batch=1 + i % 2, seq_len=3 + i % 3, n_loops=3 + i % 4, n_experts=2 + i % 3,
                       detail=("positions", "summary")[i % 3 == 1], all_metrics=i % 2 == 0, with_text=i != 4)
        t = dataclasses.replace(t, trace_id=f"{i + 1:032x}", span_id=f"{i + 1:016x}")
        if i == 2:
            t = dataclasses.replace(t, expert_load=None, token_ids=None)
        if i == 5:
            t = dataclasses.replace(t, position_iterations=None)
        out.append(t)
    assert len({t.iterations for t in out}) > 1 and any(t.expert_load is None for t in out)
    return out


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def test_iterations_rows_cell_by_cell():
    traces = _batch()
    got = rows.iterations_table(traces, FIRST).to_pylist()
    want = [
        {"forward_id": FIRST + k, "trace_id": t.trace_id, "span_id": t.span_id, "iteration": it,
         **{m: (float(t.iteration_metrics[m][it]) if m in t.iteration_metrics else None) for m in ITERATION_METRIC_NAMES}}
        for k, t in enumerate(traces) for it in range(t.iterations)
    ]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert all(_same(g[c], w[c]) for c in w), (w["forward_id"], w["iteration"])


def test_positions_rows_cell_by_cell():
    traces = _batch()
    got = rows.positions_table(traces, FIRST).to_pylist()
    want = []
    for k, t in enumerate(traces):
        if t.detail != "positions":
            continue
        for b in range(t.batch):
            for s in range(t.seq_len):
                for it in range(t.iterations):
                    want.append({
                        "forward_id": FIRST + k, "trace_id": t.trace_id, "batch_index": b, "position": s, "iteration": it,
                        "token_id": None if t.token_ids is None else int(t.token_ids[b, s]),
                        "token_text": None if t.token_text is None else t.token_text[b][s],
                        "iterations_used": None if t.position_iterations is None else int(t.position_iterations[b, s]),
                        **{m: (float(t.position_metrics[m][b, s, it]) if m in t.position_metrics else None)
                           for m in POSITION_METRIC_NAMES},
                    })
    assert len(got) == len(want) and len({w["forward_id"] for w in want}) >= 3
    for g, w in zip(got, want):
        assert all(_same(g[c], w[c]) for c in w), (w["forward_id"], w["batch_index"], w["position"], w["iteration"])


def test_experts_rows_cell_by_cell():
    traces = _batch()
    got = rows.experts_table(traces, FIRST).to_pylist()
    want = [{"forward_id": FIRST + k, "span_id": t.span_id, "iteration": it, "expert": e, "load": int(t.expert_load[it, e])}
            for k, t in enumerate(traces) if t.expert_load is not None
            for it in range(t.iterations) for e in range(t.expert_load.shape[1])]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert all(g[c] == w[c] for c in w), w


def _hourly_traces():
    """Forwards every 7 minutes over 5 hours, in time order, as a live sender sends them."""
    rng = np.random.default_rng(3)
    return [dataclasses.replace(
        synthetic_trace(rng, run_id=("run-a", "run-b")[i % 2], n_loops=(4, 6)[i % 3 == 0], seq_len=4, n_experts=3,
                        start_ns=BASE_NS + i * 7 * 60 * 10**9),
        kind=("served", "shadow")[i % 4 == 0], rank=i % 2, world_size=2) for i in range(43)]


def _key_rows(store, table: str) -> pd.DataFrame:
    key = ", ".join(c for c, _ in rollups._KEY_COLS + (("iteration", ""),) + ((("expert", ""),) if table == "rollup_experts" else ()))
    return store.query(f"SELECT hour, count(*) AS n, count(DISTINCT ({key})) AS keys FROM {table} GROUP BY hour ORDER BY hour")


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(list(df.columns[:10])).reset_index(drop=True)


def test_rollups_sum_each_hour_once_ingest_moves_past_it(tmp_path):
    traces = _hourly_traces()
    path = tmp_path / "s.duckdb"
    store = Store(path)
    several = False
    for k in range(0, len(traces), 3):
        batch = traces[k:k + 3]
        store.write_traces(batch)
        newest = pd.Timestamp(batch[0].start_ns, unit="ns").floor("h")
        for table in ("rollup_iterations", "rollup_experts"):
            per_hour = _key_rows(store, table)
            past = per_hour[per_hour["hour"] < newest]
            assert (past["n"] == past["keys"]).all(), (table, k, past)  # hours ingest left: one row per key
            several |= bool((per_hour["n"] > per_hour["keys"]).any())
    assert several, "no hour ever held a batch's rows beside an earlier batch's: the fixture cannot show a merge"
    store.close()
    with Store(path) as store:
        for table in ("rollup_iterations", "rollup_experts"):
            per_hour = _key_rows(store, table)
            assert len(per_hour) == 5 and (per_hour["n"] == per_hour["keys"]).all(), per_hour  # closed: all summed
            kept = _sorted(store.query(f"SELECT * FROM {table}"))
            rebuilt = _sorted(store.query(rollups.aggregate(table, "forwards")).reindex(columns=kept.columns))
            pd.testing.assert_frame_equal(kept, rebuilt, check_dtype=False, rtol=1e-12)
        peaks = store.query("SELECT * FROM rollup_peaks ORDER BY forward_id")
        assert peaks["forward_id"].tolist() == list(range(1, len(traces) + 1))
        assert np.allclose(peaks["growth_peak"], [np.nanmax(np.where(np.isfinite(g := t.iteration_metrics["growth_ratio"]), g, np.nan))
                                                   for t in traces], rtol=1e-12)


@pytest.mark.parametrize("duplicate", ["in the batch", "already stored"])
def test_a_forward_twice_is_stored_and_rolled_up_once(tmp_path, duplicate):
    traces = _hourly_traces()[:6]
    with Store(tmp_path / "s.duckdb") as store:
        if duplicate == "in the batch":
            assert store.write_traces(traces + traces[2:4]) == 6
        else:
            assert store.write_traces(traces[:4]) == 4
            assert store.write_traces(traces[2:]) == 2
        counts = store.query("SELECT (SELECT count(*) FROM forwards) AS f, (SELECT count(*) FROM spans) AS s,"
                             " (SELECT sum(rows) FROM rollup_iterations) AS r, (SELECT count(*) FROM rollup_peaks) AS p,"
                             " (SELECT sum(load) FROM rollup_experts) AS l").iloc[0].tolist()
    assert counts == [6, 6, sum(t.iterations for t in traces), 6, sum(int(t.expert_load.sum()) for t in traces)]


def _dump(store) -> dict:
    out = {}
    for table in ("forwards", "iterations", "positions", "experts", "spans", "rollup_peaks", "rollup_lens"):
        df = store.query(f"SELECT * FROM {table}")
        out[table] = df.sort_values(list(df.columns[:4])).reset_index(drop=True)
    for table in ("rollup_iterations", "rollup_experts"):  # summed per key: how rows were split may differ
        key = [c for c, _ in rollups._KEY_COLS] + ["iteration"] + (["expert"] if table == "rollup_experts" else [])
        sums = ", ".join(f'sum("{c}") AS "{c}"' for c, _, agg in rollups._VALUES[table] if agg is not None)
        out[table] = store.query(f"SELECT {', '.join(key)}, {sums} FROM {table} GROUP BY ALL ORDER BY ALL")
    return out


def test_batches_built_in_the_decoder_store_what_write_traces_stores(tmp_path):
    """`rows.Batch` (built where a request is decoded, numbered 0 … n-1, with its rollup increments)
    through `Store.write_batch`, in groups as the receiver commits them, with a forward repeated
    inside a request and across requests, equals the same forwards through `write_traces`."""
    traces = _hourly_traces()[:20] + _batch()
    requests = [traces[0:5], traces[5:9] + traces[6:7], traces[3:12], traces[12:27]]  # repeats inside and across
    with Store(tmp_path / "direct.duckdb") as direct:
        for request in requests:
            direct.write_traces(request)
        want = _dump(direct)
    with Store(tmp_path / "batch.duckdb") as batched:
        groups = [[requests[0]], [requests[1], requests[2]], [requests[3]]]
        new = []
        for group in groups:
            made = [rows.Batch.of(r, [rows.trace_span_row(t) for t in r]) for r in group]
            kept = batched.write_batch(rows.Batch.concat(made))
            new.append(len(kept))
        got = _dump(batched)
    assert new == [5, 4 + 3, 15] and len(want["forwards"]) == len(traces) - 0 == 27
    # the what-if's lens rows: some positions sampled, not all (a receiver's batch keeps them too)
    assert 0 < len(want["rollup_lens"]) < len(want["positions"])
    for table in want:
        pd.testing.assert_frame_equal(got[table], want[table], check_dtype=False, rtol=1e-12, obj=table)
