"""The cross-rank join on traces whose right answer is known: two runs, three ranks, two steps,
one rank missing at one step, micro-batches (two forwards of one rank at one step), and ranks tied
on iterations; each column checked against numpy over the traces."""

import dataclasses

import numpy as np

from mythos_probe import frames
from mythos_probe.collectors.store import Store
from mythos_probe.dashboards import queries
from tests.collectors.factory import make_trace


def traces():
    out, seed = [], 0
    for run in ("run-a", "run-b"):
        for step in (0, 1):
            for rank in (0, 1, 2):
                if run == "run-b" and step == 1 and rank == 2:
                    continue  # this rank's trace was lost
                for _ in range(2 if rank == 1 else 1):  # rank 1 runs two micro-batches
                    seed += 1
                    t = make_trace(seed, detail="summary", run_id=run, step=step)
                    out.append(dataclasses.replace(t, rank=rank, local_rank=rank, world_size=3, job_id="j"))
    return out


def expected(ts):
    want = {}
    for key in sorted({(t.run_id, t.step) for t in ts}):
        group = [t for t in ts if (t.run_id, t.step) == key]
        most = max(t.iterations for t in group)
        slowest = max(t.duration_ms for t in group)
        want[key] = dict(
            ranks=len({t.rank for t in group}), forwards=len(group), iterations_max=most,
            iterations_min=min(t.iterations for t in group),
            rank_most_iterations=min(t.rank for t in group if t.iterations == most),
            slowest_rank=min(t.rank for t in group if t.duration_ms == slowest),
            duration_ms_max=slowest, load=np.sum([t.expert_load.sum(0) for t in group], axis=0).tolist(),
        )
    return want


def check(got, want):
    assert len(got) == sum(len(w["load"]) for w in want.values())
    for (run, step), w in want.items():
        rows = got[(got.run_id == run) & (got.step == step)].sort_values("expert")
        assert rows["load"].tolist() == w["load"], (run, step)
        assert rows["expert"].tolist() == list(range(len(w["load"])))
        for column in ("ranks", "forwards", "iterations_max", "iterations_min", "rank_most_iterations", "slowest_rank"):
            assert set(rows[column]) == {w[column]}, (run, step, column)
        assert np.allclose(rows["duration_ms_max"], w["duration_ms_max"])
        assert set(rows["world_size"]) == {3} and set(rows["loop_name"]) == {"loop"}


def test_frame_from_traces_and_query_on_a_store_equal_numpy(tmp_path):
    ts = traces()
    want = expected(ts)
    assert want[("run-b", 1)]["ranks"] == 2 and want[("run-a", 0)]["forwards"] == 4
    check(frames.cross_rank(ts), want)
    with Store(tmp_path / "s.duckdb") as store:
        store.write_traces(ts)
        check(frames.cross_rank(store), want)
        check(queries.cross_rank(store, queries.Selection()), want)
        only_a = queries.cross_rank(store, queries.Selection(runs=("run-a",)))
        check(only_a, {k: v for k, v in want.items() if k[0] == "run-a"})
