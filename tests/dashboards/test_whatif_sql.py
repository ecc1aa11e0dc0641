"""The dashboard's SQL what-if equals `mythos_probe.whatif.evaluate` on the same forwards, row for
row, read back from a real store: every criterion, thresholds that sit exactly on recorded values
(so a `<` written as `<=` shows), positions the lens did not sample, forwards of different depths,
a filter, and a criterion whose metric one forward lacks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mythos_probe import whatif as replay
from mythos_probe.collectors.store import Store
from mythos_probe.dashboards import whatif
from mythos_probe.dashboards.queries import Selection
from mythos_probe.records import LoopTrace

NAN = np.nan


def lens_trace(seed: int, iterations: int, model_id: str = "m", drop: tuple[str, ...] = (),
               exit_policy: str = "fixed", flops: bool = True, lens_flops: bool = True) -> LoopTrace:
    """2 × 6 positions, about half sampled by the lens; metrics drawn from a few values so that
    argmax runs, equal scores and thresholds equal to recorded values all occur, and NaN."""
    rng = np.random.default_rng(seed)
    B, T, I = 2, 6, iterations
    sampled = rng.random((B, T)) < 0.5
    sampled[0, 0] = True
    lens = np.where(sampled[..., None], 1.0, NAN)  # (B, T, 1)
    step = np.ones(I)
    step[0] = NAN  # step metrics are undefined at t = 0
    metrics = {
        "cum_halt": np.minimum(np.cumsum(rng.choice([0.0, 0.25, 0.5], (B, T, I)), axis=-1), 1.0),
        "rel_residual": rng.choice([0.01, 0.1, 0.3, 1.0], (B, T, I)) * step,
        "cos_step": rng.choice([1e-4, 1e-3, 0.01], (B, T, I)) * step,
        "lens_kl_prev": rng.choice([1e-4, 0.01, 0.5], (B, T, I)) * step * lens,
        "lens_entropy": rng.choice([1.0, 1.001, 1.5, 2.0], (B, T, I)) * lens,
        "lens_argmax": rng.choice([3, 7], (B, T, I), p=[0.75, 0.25]) * lens,
        "lens_top1_agree": rng.integers(0, 2, (B, T, I)) * lens,
    }
    metrics["cum_halt"][:, -1, I // 2:] = NAN  # a diverged state: NaN never fires
    return LoopTrace(
        trace_id=f"{seed + 1:032x}", span_id=f"{seed + 1:016x}", run_id="r", model_id=model_id, step=seed,
        start_ns=seed, end_ns=seed + 1, batch=B, seq_len=T, n_loops=8, iterations=I, exit_policy=exit_policy,
        detail="positions", position_metrics={k: v for k, v in metrics.items() if k not in drop},
        forward_metrics=({"flops": 1000.0 + 100 * I, "loop_flops": 100.0 * I} if flops else {})
        | ({"lens_flops": 7.0 + seed} if flops and lens_flops else {}),
    )


def thresholds_on_values(traces) -> dict[str, list[float]]:
    """The default thresholds plus recorded values themselves (float32, exactly as stored)."""
    th = {c: list(v) for c, v in replay.DEFAULT_THRESHOLDS.items()}
    th["act"] += [0.25, 0.5, 0.75, 1.0]
    th["rel_residual"] += [0.01, 0.1, 0.3]
    th["cos_step"] += [float(np.float32(1e-3)), float(np.float32(0.01))]
    th["kl"] += [float(np.float32(0.01)), float(np.float32(0.5))]
    th["entropy"] += [float(np.float32(1.001)) - 1.0, 0.5]
    th["argmax_stable"] += [0, 5, 2.5]
    return th


def stored(tmp_path, traces) -> Store:
    store = Store(tmp_path / "s.duckdb")
    store.write_traces(traces)
    return store


def assert_same_table(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert list(got.columns) == replay.COLUMNS
    assert len(got) == len(want) > 0
    pd.testing.assert_frame_equal(got, want.astype({"positions": "int64"}), check_exact=False, rtol=1e-12, atol=0)


def test_sql_table_equals_the_replay_over_traces(tmp_path):
    traces = [lens_trace(seed, iterations) for seed, iterations in enumerate([5, 8, 1, 6, 8, 3])]
    served = [lens_trace(10 + seed, 3, exit_policy="act") for seed in range(2)]  # no baseline: left out by both
    th = thresholds_on_values(traces)
    with stored(tmp_path, traces + served) as store:
        got = whatif.evaluate(store, Selection(), th)
    want = replay.evaluate(traces + served, th)
    assert set(want["criterion"]) == set(replay.CRITERIA)
    assert want["mean_iterations"].nunique() > 10 and want["agreement"].nunique() > 5  # the thresholds split positions
    assert_same_table(got, want)
    assert_same_table(want, replay.evaluate(traces, th))
    # FLOPs saved: iterations saved × the loop's share of the replayed forwards' FLOPs, less for
    # the lens criteria a readout (7 + seed FLOPs) per position-iteration used, by hand
    total = sum(1000.0 + 100 * t.iterations for t in traces)
    share = sum(100.0 * t.iterations for t in traces) / total
    lens = sum(t.iterations * (7.0 + t.step) for t in traces) / total
    reads = want["criterion"].isin(["kl", "entropy", "argmax_stable"])
    assert reads.any() and (~reads).any()
    cost = np.where(reads, lens * (1 - want["iterations_saved"]), 0.0)
    np.testing.assert_allclose(want["lens_cost"], cost, rtol=1e-12)
    np.testing.assert_allclose(want["flops_saved"], want["iterations_saved"] * share - cost, rtol=1e-12, atol=1e-15)


def test_without_full_depth_forwards_both_replay_the_served_ones_and_say_so(tmp_path):
    served = [lens_trace(seed, 4, exit_policy="act") for seed in range(3)]
    with stored(tmp_path, served) as store:
        got = whatif.evaluate(store, Selection())
    with pytest.warns(UserWarning, match="no full-depth forward"):
        want = replay.evaluate(served)
    assert (got["baseline"] == "served").all()
    assert_same_table(got, want)


def test_flops_saved_is_nan_when_a_forward_lacks_the_cost_probe(tmp_path):
    traces = [lens_trace(0, 5), lens_trace(1, 6, flops=False)]
    with stored(tmp_path, traces) as store:
        got = whatif.evaluate(store, Selection())
    assert got["flops_saved"].isna().all()
    assert_same_table(got, replay.evaluate(traces))


def test_lens_criteria_flops_are_nan_when_a_forward_lacks_lens_flops(tmp_path):
    traces = [lens_trace(0, 5), lens_trace(1, 6, lens_flops=False)]  # e.g. a LoopSpec model's forward
    with stored(tmp_path, traces) as store:
        got = whatif.evaluate(store, Selection())
    reads = got["criterion"].isin(["kl", "entropy", "argmax_stable"])
    assert got.loc[reads, ["flops_saved", "lens_cost"]].isna().all().all()
    assert got.loc[~reads, "flops_saved"].notna().all() and (got.loc[~reads, "lens_cost"] == 0).all()
    assert_same_table(got, replay.evaluate(traces))


def test_a_store_written_before_lens_flops_reads_them_as_unknown(tmp_path):
    """A store from before the `lens_flops` column: its forwards read back NULL, so the lens
    criteria's FLOPs saved are NaN there too, and a forward written after the migration counts."""
    import duckdb

    from mythos_probe.collectors import migrations

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    migrations.migrate(con, str(path))
    con.execute('ALTER TABLE forwards DROP COLUMN "lens_flops"')  # as the previous release left it
    con.execute("DELETE FROM _migrations WHERE name = 'add_column:forwards.lens_flops'")
    con.close()
    old = lens_trace(0, 5, lens_flops=False)  # what the previous release recorded
    with Store(path) as store:
        store.write_traces([old])
        assert store.query('SELECT "lens_flops" FROM forwards')["lens_flops"].isna().all()
        before = whatif.evaluate(store, Selection())
        assert before.loc[before["criterion"] == "kl", "flops_saved"].isna().all()
        new = lens_trace(1, 6, model_id="n")
        store.write_traces([new])
        assert_same_table(whatif.evaluate(store, Selection(models=("n",))), replay.evaluate([new]))


def test_default_thresholds_and_a_filter_select_the_same_forwards(tmp_path):
    traces = [lens_trace(seed, 4 + seed % 5, model_id=("a", "b")[seed % 2]) for seed in range(8)]
    with stored(tmp_path, traces) as store:
        got = whatif.evaluate(store, Selection(models=("b",)))
        everything = whatif.evaluate(store, Selection())
    assert_same_table(got, replay.evaluate([t for t in traces if t.model_id == "b"]))
    assert_same_table(everything, replay.evaluate(traces))
    assert (got["positions"] < everything["positions"]).all()


def test_a_criterion_some_forward_lacks_is_left_out(tmp_path):
    traces = [lens_trace(0, 6), lens_trace(1, 6, drop=("cum_halt",))]
    with stored(tmp_path, traces) as store:
        got = whatif.evaluate(store, Selection())
    assert "act" not in set(got["criterion"])
    assert_same_table(got, replay.evaluate(traces))


def test_forwards_without_lens_positions_give_an_empty_table(tmp_path):
    bare = lens_trace(0, 4, drop=("lens_kl_prev", "lens_entropy", "lens_argmax", "lens_top1_agree"))
    with stored(tmp_path, [bare]) as store:
        got = whatif.evaluate(store, Selection())
    assert got.empty and list(got.columns) == replay.COLUMNS
    with pytest.raises(ValueError, match="unknown exit criteria"):
        whatif.evaluate(None, Selection(), {"halting": [0.5]})
