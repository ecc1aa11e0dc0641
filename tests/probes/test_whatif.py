"""Early-exit what-if: every criterion replayed per lens-sampled position agrees with a hand-worked
example, with a plain-loop replay on random traces, and with the coda lens recomputed from a
cached forward of a tiny LoopedTransformer."""

import dataclasses
import math
import re
import secrets

import numpy as np
import pandas as pd
import pytest
import torch

from mythos_probe import attach, whatif
from mythos_probe.records import LoopTrace

NAN = math.nan


def make_trace(position_metrics, detail="positions", **fields):
    """A LoopTrace holding the given (B, T, I) position metrics, built directly."""
    B, T, I = np.shape(next(iter(position_metrics.values())))
    defaults = dict(
        trace_id=secrets.token_hex(16), span_id=secrets.token_hex(8), run_id="run", model_id="m", step=0,
        start_ns=0, end_ns=1, batch=B, seq_len=T, n_loops=I, iterations=I, exit_policy="fixed", detail=detail,
    )
    return LoopTrace(position_metrics=position_metrics, **{**defaults, **fields})


def hand_trace():
    """Positions 0 and 1 sampled by the lens, position 2 not (NaN lens metrics)."""
    rows = {  # position 0, position 1
        "cum_halt": [[0.3, 0.6, 0.95, 1.0], [0.1, 0.2, 0.3, 0.4]],
        "lens_kl_prev": [[NAN, 0.5, 0.05, 0.001], [NAN, 0.002, 0.3, 0.0005]],
        "rel_residual": [[1.0, 0.2, 0.05, 0.01], [0.9, 0.5, 0.4, 0.3]],
        "cos_step": [[0.5, 0.1, 0.01, 0.001], [0.4, 0.3, 0.2, 0.1]],
        "lens_entropy": [[3.0, 2.0, 1.95, 1.949], [2.0, 2.5, 2.45, 2.44]],
        "lens_argmax": [[5, 7, 7, 7], [3, 3, 9, 9]],
        "lens_top1_agree": [[0, 1, 1, 1], [0, 0, 1, 1]],
    }
    lens = {"lens_kl_prev", "lens_entropy", "lens_argmax", "lens_top1_agree"}
    third = {name: [NAN] * 4 if name in lens else [0.5] * 4 for name in rows}
    return make_trace({name: np.array([values + [third[name]]]) for name, values in rows.items()})


# (criterion, threshold) → iterations used by positions 0 and 1, and their agreement at exit
HAND = {
    ("act", 0.9): ((3, 4), (1, 1)),
    ("act", 0.25): ((1, 3), (0, 1)),
    ("kl", 0.01): ((4, 2), (1, 0)),
    ("rel_residual", 0.1): ((3, 4), (1, 1)),
    ("cos_step", 0.25): ((2, 3), (1, 1)),
    ("entropy", 0.1): ((3, 3), (1, 1)),
    ("entropy", 0.02): ((4, 4), (1, 1)),
    ("argmax_stable", 1): ((3, 2), (1, 0)),
    ("argmax_stable", 2): ((4, 4), (1, 1)),
}


def test_each_criterion_exits_at_the_first_iteration_it_fires():
    thresholds = {}
    for criterion, th in HAND:
        thresholds.setdefault(criterion, []).append(th)
    table = whatif.evaluate([hand_trace()], thresholds).set_index(["criterion", "threshold"])
    assert len(table) == len(HAND)
    for (criterion, th), (used, agree) in HAND.items():
        row = table.loc[(criterion, th)]
        assert row["positions"] == 2  # the unsampled position is left out
        assert row["mean_iterations"] == pytest.approx(np.mean(used))
        assert row["iterations_saved"] == pytest.approx(1 - sum(used) / 8)
        assert row["agreement"] == pytest.approx(np.mean(agree))


def test_position_exits_name_each_sampled_position():
    df = whatif.exits([hand_trace()], "kl", 0.01)
    assert df["position"].tolist() == [0, 1]
    assert df["exit_iteration"].tolist() == [3, 1]
    assert df["iterations_used"].tolist() == [4, 2]
    assert df["iterations_run"].tolist() == [4, 4]
    assert df["agrees"].tolist() == [True, False]


def random_trace(rng, B, T, I, sampled):
    lens_mask = np.where(sampled[..., None], 1.0, np.nan)  # (B, T, 1)
    metrics = {
        "cum_halt": np.cumsum(rng.uniform(0, 0.4, (B, T, I)), axis=-1),
        "rel_residual": rng.uniform(0, 0.3, (B, T, I)),
        "cos_step": rng.uniform(0, 0.05, (B, T, I)),
        "lens_kl_prev": rng.uniform(0, 0.1, (B, T, I)) * lens_mask,
        "lens_entropy": rng.uniform(1, 1.2, (B, T, I)) * lens_mask,
        "lens_argmax": rng.integers(0, 2, (B, T, I)) * lens_mask,
        "lens_top1_agree": rng.integers(0, 2, (B, T, I)) * lens_mask,
    }
    metrics["lens_kl_prev"][..., 0] = np.nan
    return make_trace(metrics)


def loop_replay(traces, criterion, threshold):
    """The what-if written as the definition reads, one position and one iteration at a time."""
    used, agree, total = [], [], 0
    for tr in traces:
        m = {k: v.astype(float) for k, v in tr.position_metrics.items()}
        for b in range(tr.batch):
            for p in range(tr.seq_len):
                if math.isnan(m["lens_argmax"][b, p, 0]):
                    continue
                exit_at = tr.iterations - 1
                for t in range(tr.iterations):
                    if criterion == "act":
                        fired = m["cum_halt"][b, p, t] >= threshold
                    elif criterion == "kl":
                        fired = m["lens_kl_prev"][b, p, t] < threshold
                    elif criterion in ("rel_residual", "cos_step"):
                        fired = m[criterion][b, p, t] < threshold
                    elif criterion == "entropy":
                        fired = t > 0 and abs(m["lens_entropy"][b, p, t] - m["lens_entropy"][b, p, t - 1]) < threshold
                    else:
                        k = int(threshold)
                        fired = t >= k and all(m["lens_argmax"][b, p, t - j] == m["lens_argmax"][b, p, t] for j in range(1, k + 1))
                    if fired:
                        exit_at = t
                        break
                used.append(exit_at + 1)
                agree.append(m["lens_top1_agree"][b, p, exit_at])
                total += tr.iterations
    return np.mean(used), 1 - sum(used) / total, np.mean(agree), len(used)


def test_table_matches_a_plain_loop_replay_on_random_traces():
    rng = np.random.default_rng(0)
    traces = [
        random_trace(rng, 2, 5, 5, rng.random((2, 5)) < 0.6),
        random_trace(rng, 1, 4, 3, np.array([[True, False, True, True]])),
    ]
    thresholds = {
        "act": [0.3, 0.6, 0.9], "kl": [0.01, 0.05], "rel_residual": [0.05, 0.2], "cos_step": [0.01, 0.03],
        "entropy": [0.02, 0.1], "argmax_stable": [1, 2, 3, 4],
    }
    table = whatif.evaluate(traces, thresholds)
    assert list(table.columns) == whatif.COLUMNS
    assert len(table) == sum(len(v) for v in thresholds.values())
    for row in table.itertuples():
        expected = loop_replay(traces, row.criterion, row.threshold)
        assert (row.mean_iterations, row.iterations_saved, row.agreement) == pytest.approx(expected[:3])
        assert row.positions == expected[3]


def test_missing_lens_metrics_raise_with_the_attach_hint():
    summary = make_trace({"rel_residual": np.zeros((1, 2, 3))}, detail="summary")
    no_lens = make_trace({"rel_residual": np.zeros((1, 2, 3))})
    for traces in ([summary], [no_lens]):
        with pytest.raises(ValueError, match=r"detail='positions'.*'lens'"):
            whatif.evaluate(traces)
    with pytest.raises(ValueError, match="no traces"):
        whatif.evaluate([])


def test_criteria_without_their_metric_are_left_out_or_refused():
    tr = hand_trace()
    without_halting = make_trace({k: v for k, v in tr.position_metrics.items() if k != "cum_halt"})
    assert "act" not in set(whatif.evaluate([without_halting])["criterion"])
    with pytest.raises(ValueError, match="cum_halt"):
        whatif.evaluate([without_halting], {"act": [0.5]})


def table_of(rows, flops_saved=NAN, lens_cost=NAN):
    columns = [c for c in whatif.COLUMNS if c not in ("flops_saved", "lens_cost", "baseline")]
    return pd.DataFrame(rows, columns=columns).assign(
        flops_saved=flops_saved, lens_cost=lens_cost, baseline="full depth")[whatif.COLUMNS]


def test_recommend_picks_the_largest_saving_at_the_agreement_floor():
    table = table_of([
        ("kl", 0.1, 1.0, 0.75, 0.90, 10),
        ("kl", 0.01, 2.0, 0.50, 0.99, 10),
        ("act", 0.9, 2.0, 0.50, 1.00, 10),  # same saving, higher agreement: preferred
        ("rel_residual", 0.5, 3.0, 0.25, 1.00, 10),
    ])
    best = whatif.recommend(table, min_agreement=0.99)
    assert (best["criterion"], best["threshold"]) == ("act", 0.9)
    assert whatif.recommend(table, min_agreement=0.9)["criterion"] == "kl"
    with pytest.raises(ValueError, match=r"no exit criterion keeps agreement ≥ 1\.5.*act at threshold 0\.9"):
        whatif.recommend(table, min_agreement=1.5)


def test_pareto_figure_draws_the_undominated_rows_and_the_recommendation():
    table = table_of([
        ("kl", 0.1, 1.0, 0.75, 0.90, 10),
        ("kl", 0.01, 2.0, 0.50, 0.99, 10),
        ("act", 0.5, 2.0, 0.50, 0.80, 10),  # dominated by kl 0.01
        ("act", 0.9, 3.0, 0.25, 1.00, 10),
    ])
    front = whatif.pareto_front(table)
    assert list(zip(front["criterion"], front["threshold"])) == [("act", 0.9), ("kl", 0.01), ("kl", 0.1)]
    fig = whatif.pareto_figure(table, min_agreement=0.95)
    names = [t.name for t in fig.data]
    assert names[:2] == ["kl", "act"] and "Pareto front" in names
    star = fig.data[-1]
    assert star.name.startswith("recommended: kl") and (star.x[0], star.y[0]) == (0.5, 0.99)
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text


def test_end_to_end_kl_exit_matches_the_coda_lens_of_a_cached_forward():
    from mythos_probe import attach
    from mythos_probe.model import LoopedConfig, LoopedTransformer

    torch.manual_seed(0)
    model = LoopedTransformer(LoopedConfig.variant("tiny-gqa")).eval()
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with attach(model, probes=["convergence", "halting", "lens"], detail="positions", lens_positions="all") as rec:
            model(ids, n_loops=5, exit="fixed")
        # independent: the lens recomputed from the cached states of the same forward
        logits, cache = model.run_with_cache(ids, n_loops=5, exit="fixed")
        logp = torch.stack([model.coda_lens(s) for s in cache.stack("recurrent.hook_state_out")])  # (I, B, T, V)
    kl_prev = (logp[1:].exp() * (logp[1:] - logp[:-1])).sum(-1)  # (I-1, B, T)
    agree = logp.argmax(-1) == logits.argmax(-1)
    # thresholds midway between neighbouring observed values (float noise cannot flip a comparison)
    values = kl_prev.flatten().sort().values
    thresholds = [float(values[i] + values[i + 1]) / 2 for i in (0, len(values) // 4, len(values) // 2, 3 * len(values) // 4)]
    thresholds.append(float(values[-1]) * 2)
    table = whatif.evaluate(rec.traces, {"kl": thresholds}).set_index("threshold")
    for th in thresholds:
        fired = torch.cat([torch.zeros_like(kl_prev[:1], dtype=torch.bool), kl_prev < th])  # (I, B, T)
        exit_at = torch.where(fired.any(0), fired.float().argmax(0), torch.full_like(fired[0], 4, dtype=torch.long))
        agree_at = agree.gather(0, exit_at[None])[0]
        assert table.loc[th, "positions"] == 16
        assert table.loc[th, "mean_iterations"] == pytest.approx((exit_at + 1).float().mean().item())
        assert table.loc[th, "agreement"] == pytest.approx(agree_at.float().mean().item())
    assert (table["mean_iterations"] % 1 != 0).any()  # some threshold splits the positions
    full = whatif.evaluate(rec.traces)
    assert set(full["criterion"]) == set(whatif.CRITERIA)
    assert full["iterations_saved"].between(0, 1).all() and full["agreement"].between(0, 1).all()


def test_forwards_that_stopped_early_are_no_baseline():
    trace = hand_trace()
    served = dataclasses.replace(trace, exit_policy="act", span_id="f" * 16)
    both = whatif.evaluate([trace, served])  # the full-depth forward only
    pd.testing.assert_frame_equal(both, whatif.evaluate([trace]))
    assert (both["baseline"] == "full depth").all()
    assert "baseline: full-depth shadow forwards" in whatif.describe(both.iloc[0])
    with pytest.warns(UserWarning, match="no full-depth forward.*kind='shadow'"):
        alone = whatif.evaluate([served])  # none given: the served forwards, and every row says so
    assert (alone["baseline"] == "served").all()
    assert "NOT full depth" in whatif.describe(alone.iloc[0])


@pytest.mark.parametrize("policy", ["latent", "kl"])
def test_verify_reports_what_a_hand_run_policy_measures(policy):
    from mythos_probe.model import LoopedConfig, LoopedTransformer
    from mythos_probe.executed_flops import ExecutedFlops
    from mythos_probe.model.variants import forward_flops

    torch.manual_seed(0)
    model = LoopedTransformer(LoopedConfig.variant("tiny-gqa")).eval()
    ids = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(2))
    threshold = {"latent": 0.2, "kl": 1e-3}[policy]
    model.recurrent.compact_below = 2.0  # compact at every iteration after the first, however many run
    report = whatif.verify(model, ids, policy, threshold, n_loops=6, repeats=1)
    with torch.no_grad():  # by hand: the policy's exits, its output and the full-depth output
        _, cache = model.run_with_cache(ids, n_loops=6, exit=policy, exit_threshold=threshold)
        halted = cache.stack("recurrent.hook_halted")
        out = model(ids, n_loops=6, exit=policy, exit_threshold=threshold)
        full = model(ids, n_loops=6, exit="fixed")
    used = [next((t + 1 for t in range(halted.shape[0]) if halted[t, b, p]), halted.shape[0])
            for b in range(3) for p in range(10)]
    assert report["iterations_saved"] == pytest.approx(1 - sum(used) / (30 * 6))
    assert 0 < report["iterations_saved"] < 1  # the threshold splits the positions
    assert report["agreement"] == pytest.approx((out.argmax(-1) == full.argmax(-1)).float().mean().item())
    # FLOPs: counted at the dispatcher on the real runs (ExecutedFlops, tested against hand counts
    # in test_executed_flops.py)
    with torch.no_grad():
        with ExecutedFlops() as policy_flops:
            model(ids, n_loops=6, exit=policy, exit_threshold=threshold)
        with ExecutedFlops() as full_flops:
            model(ids, n_loops=6, exit="fixed")
    assert report["flops_saved"] == pytest.approx(1 - policy_flops.total / full_flops.total)
    # Bounds by hand. At most what running only the positions still running would save (Kaplan,
    # and kl's lens read out on those positions): the compacted loop also computes keys and
    # values of exited positions, which later ones attend to.
    running = 30 + sum(int((~halted[t]).sum()) for t in range(halted.shape[0] - 1))
    executed = forward_flops(model.cfg, 3, 10, running)
    if policy == "kl":
        coda_head = sum(p.numel() for p in [*model.coda.parameters(), *model.norm.parameters()]) + model.head.weight.numel()
        per_key = 2 * 4 * 2 * 16  # 2·H·(d_qk + d_v) for tiny-gqa's 4 heads of 16
        executed += running * (2 * coda_head + per_key * (10 + 1) / 2)
    running_only = 1 - executed / forward_flops(model.cfg, 3, 10, 30 * 6)
    assert report["flops_saved"] < running_only
    # At least what it would save if each exited position-iteration still ran its key, value and
    # query projections and its query's attention over all 10 keys (an upper bound of what a
    # compacted step runs for it), and as much again in kl's coda lens: tiny-gqa, dim 64, 4 query
    # heads and 2 key/value heads of 16, 2·4·(16 + 16) FLOPs per attended key
    per_exited = (2 * 64 * (64 + 32 + 32) + 10 * 2 * 4 * (16 + 16)) * (2 if policy == "kl" else 1)
    exited = 30 * 6 - running
    assert report["flops_saved"] > running_only - exited * per_exited / forward_flops(model.cfg, 3, 10, 30 * 6)
    assert report["predicted_iterations_saved"] == pytest.approx(report["iterations_saved"], abs=0.15)
    assert report["time_fixed_s"] > 0 and report["time_policy_s"] > 0


def test_verify_times_are_the_median_of_paired_ratios(monkeypatch):
    """time_saved and cpu_time_saved are 1 − the median over pairs of policy time / full-depth
    time. The clocks are fake and deterministic (no timed assertion): each forward advances the
    wall clock by the iterations it ran and the CPU clock by one more, so the savings must be
    1 − iterations of the policy / n_loops and 1 − (iterations + 1) / (n_loops + 1) exactly (two
    different numbers, so a report that swapped or shared the clocks would show)."""
    import time

    from mythos_probe.model import LoopedConfig, LoopedTransformer

    torch.manual_seed(0)
    model = LoopedTransformer(LoopedConfig.variant("tiny-gqa")).eval()
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(ids, n_loops=6, exit="latent", exit_threshold=0.5)
    ran = model.last_forward["iterations"]
    assert ran < 6  # the policy stops the loop early, so an inverted ratio would show
    clock, cpu = [0.0], [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(time, "process_time", lambda: cpu[0])
    class Ticking(LoopedTransformer):
        """Not a hook, nor a forward replaced on the instance (nnsight's way): verify refuses a
        watched model."""

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            clock[0] += self.last_forward["iterations"]
            cpu[0] += self.last_forward["iterations"] + 1
            return out

    model.__class__ = Ticking
    report = whatif.verify(model, ids, "latent", 0.5, n_loops=6, repeats=3)
    assert report["time_saved"] == pytest.approx(1 - ran / 6)
    assert report["cpu_time_saved"] == pytest.approx(1 - (ran + 1) / 7)
    assert (report["time_fixed_s"], report["time_policy_s"]) == (6, ran)


def test_verify_refuses_what_the_model_cannot_run():
    from mythos_probe.model import LoopedConfig, LoopedTransformer

    model = LoopedTransformer(LoopedConfig.variant("tiny-gqa")).eval()
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="policy must be one of"):
        whatif.verify(model, ids, "entropy", 0.1)
    with pytest.raises(ValueError, match="act_threshold"):
        whatif.verify(model, ids, "act", 0.5)
    with pytest.raises(ValueError, match="non-negative"):
        whatif.verify(model, ids, "kl", -1.0)
    with pytest.raises(ValueError, match=r"training mode .* call model.eval\(\)"):
        whatif.verify(model.train(), ids, "kl", 0.1)
    model.eval()
    with attach(model, probes=["convergence"]) as rec:  # watched: the loop would run every position
        with pytest.raises(ValueError, match="forward hooks are attached .* outside that context"):
            whatif.verify(model, ids, "kl", 0.1)
    assert rec.traces == []  # and nothing of verify's landed in the user's recording
    with model.hooks(fwd_hooks=[("hook_logits", lambda x, hook: x)]):  # outside the loop: still not as served
        with pytest.raises(ValueError, match="forward hooks are attached"):
            whatif.verify(model, ids, "kl", 0.1)


def costed(trace, flops, loop_flops, lens_flops=None, iterations=None, span="a"):
    """`trace` cut to its first `iterations`, with the cost probe's forward metrics."""
    I = iterations or trace.iterations
    forward = {"flops": flops, "loop_flops": loop_flops} | ({} if lens_flops is None else {"lens_flops": lens_flops})
    return dataclasses.replace(
        trace, span_id=span * 16, iterations=I, n_loops=I, forward_metrics=forward,
        position_metrics={k: v[..., :I] for k, v in trace.position_metrics.items()},
    )


# Two forwards of the hand trace: A runs 4 iterations, B its first 2. Iterations used by positions
# 0 and 1 of A (from HAND) and of B (worked out from the first two columns of hand_trace).
TWO = {("kl", 0.01): (4, 2, 2, 2), ("rel_residual", 0.1): (3, 4, 2, 2), ("argmax_stable", 1): (3, 2, 2, 2),
       ("entropy", 0.1): (3, 3, 2, 2)}


def two_forwards(lens_b=60.0):
    # A: 1000 FLOPs, 400 in the loop, 30 per lens readout; B: 3000, 1600, 60 (or none recorded)
    return [costed(hand_trace(), 1000.0, 400.0, 30.0), costed(hand_trace(), 3000.0, 1600.0, lens_b, iterations=2, span="b")]


def test_flops_saved_pays_for_the_lens_readouts_of_the_lens_criteria():
    table = whatif.evaluate(two_forwards(), {c: [th] for c, th in TWO}).set_index("criterion")
    # by hand: loop share (400 + 1600) / 4000 = 0.5; lens share (4 iterations · 30 + 2 · 60) / 4000 = 0.06,
    # paid on the share of position-iterations a lens policy still runs
    for (criterion, _), used in TWO.items():
        saved = 1 - sum(used) / 12  # 2 positions · 4 iterations + 2 · 2
        lens = 0.06 * (1 - saved) if criterion != "rel_residual" else 0.0
        row = table.loc[criterion]
        assert row["iterations_saved"] == pytest.approx(saved)
        assert row["lens_cost"] == pytest.approx(lens, abs=1e-15)
        assert row["flops_saved"] == pytest.approx(0.5 * saved - lens)
    assert table.loc["kl", "flops_saved"] < 0.5 * table.loc["kl", "iterations_saved"]  # the lens is not free


def test_lens_criteria_without_a_lens_cost_give_nan_flops_not_the_loop_alone():
    rows = whatif.evaluate(two_forwards(lens_b=None), {c: [th] for c, th in TWO})
    table = rows.set_index("criterion")
    for criterion in ("kl", "entropy", "argmax_stable"):
        assert np.isnan(table.loc[criterion, "flops_saved"]) and np.isnan(table.loc[criterion, "lens_cost"])
    assert table.loc["rel_residual", "flops_saved"] == pytest.approx(0.5 / 12)  # reads no lens: still known
    assert "FLOPs saved unknown: no recorded cost for the loop or the coda lens" in whatif.describe(rows[rows["criterion"] == "kl"].iloc[0])


def test_recommend_ranks_by_flops_and_never_recommends_a_policy_that_saves_nothing():
    table = table_of([
        ("kl", 1e-5, 1.0, 0.75, 1.00, 10),  # most iterations saved, but its lens readouts eat them
        ("rel_residual", 0.1, 2.0, 0.50, 1.00, 10),
        ("act", 0.9, 3.0, 0.25, 0.99, 10),
    ], flops_saved=[-0.10, 0.20, 0.10], lens_cost=[0.40, 0.0, 0.0])
    best = whatif.recommend(table)  # the default floor, 0.99
    assert (best["criterion"], best["threshold"]) == ("rel_residual", 0.1)
    assert "net of 40.0% spent reading the coda lens" in whatif.describe(table.iloc[0])
    assert "net of" not in whatif.describe(best) and "20.0% of the forward's FLOPs" in whatif.describe(best)
    losing = table.assign(flops_saved=[-0.10, 0.0, -0.01])
    with pytest.raises(ValueError, match=r"agreement ≥ 0\.99 saves compute: the best, rel_residual at threshold 0\.1.*"
                                         r"Keep exit='fixed'.*lower min_agreement") as err:
        whatif.recommend(losing)
    assert "keeps agreement" not in str(err.value)  # not the agreement error: the rows keep it
    # FLOPs unknown (no cost probe): iterations decide, and a row saving none is never chosen
    assert whatif.recommend(table.assign(flops_saved=NAN))["criterion"] == "kl"
    with pytest.raises(ValueError, match="saves compute"):
        whatif.recommend(table_of([("act", 0.9, 4.0, 0.0, 1.0, 10)]))
    # a row of unknown cost only when no row of known cost saves: known 0.01 beats unknown 0.75
    mixed = table.assign(flops_saved=[NAN, 0.01, -0.2])
    assert whatif.recommend(mixed)["criterion"] == "rel_residual"
    assert whatif.recommend(mixed.assign(flops_saved=[NAN, 0.0, -0.2]))["criterion"] == "kl"


def test_verify_predicts_the_kl_flops_of_the_running_positions():
    """The prediction counts a lens readout per position-iteration the policy uses, as the
    compacted run reads the lens out on exactly the positions still running."""
    from mythos_probe.model import LoopedConfig, LoopedTransformer
    from mythos_probe.model.variants import forward_flops

    torch.manual_seed(0)
    model = LoopedTransformer(LoopedConfig.variant("tiny-gqa")).eval()
    with torch.no_grad():  # a loop that settles at different iterations per position
        model.recurrent.injection.log_A.normal_(0, 1)
        model.recurrent.lora.scale.weight.normal_(0, 1)
    model.recurrent.compact_below = 2.0
    ids = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(2))
    coda_head = sum(p.numel() for p in [*model.coda.parameters(), *model.norm.parameters()]) + model.head.weight.numel()
    per_row = 2 * coda_head + 2 * 4 * 2 * 16 * (10 + 1) / 2  # tiny-gqa: 4 heads of 16, one coda layer
    for threshold in (1e-3, 1e-4):
        report = whatif.verify(model, ids, "kl", threshold, n_loops=8, repeats=1)
        with torch.no_grad():
            _, cache = model.run_with_cache(ids, n_loops=8, exit="kl", exit_threshold=threshold)
        halted = cache.stack("recurrent.hook_halted")  # (I, B, T)
        used = int(torch.where(halted.any(0), halted.float().argmax(0) + 1, halted.shape[0]).sum())
        assert report["predicted_iterations_saved"] == report["iterations_saved"] == 1 - used / 240
        full = forward_flops(model.cfg, 3, 10, 30 * 8)
        by_hand = 1 - (forward_flops(model.cfg, 3, 10, used) + used * per_row) / full
        assert report["predicted_flops_saved"] == pytest.approx(by_hand, rel=1e-9)
        # the real run also computes keys and values of exited positions (in the loop and in the
        # lens): it saves less than the prediction, which counts running positions only
        assert report["flops_saved"] < report["predicted_flops_saved"]
    assert report["flops_saved"] < 0  # 1e-4: a split exit, and the lens costs more than it saves


def test_pareto_figure_plots_flops_saved_when_every_row_knows_them():
    table = table_of([
        ("kl", 1e-5, 1.0, 0.75, 1.00, 10),
        ("rel_residual", 0.1, 2.0, 0.50, 1.00, 10),
    ], flops_saved=[-0.10, 0.20], lens_cost=[0.40, 0.0])
    fig = whatif.pareto_figure(table)
    assert list(fig.data[0].x) == [-0.10] and list(fig.data[1].x) == [0.20]
    assert [t for t in fig.data if t.name.startswith("recommended")][0].x[0] == 0.20
    assert "FLOPs saved" in fig.layout.xaxis.title.text
    assert list(whatif.pareto_front(table)["criterion"]) == ["rel_residual"]  # kl saves more iterations, fewer FLOPs


def test_demo_summary_says_to_keep_fixed_when_no_policy_saves_compute():
    from mythos_probe.demo.run import summary

    free_loop = costed(hand_trace(), 1000.0, 0.0, 10.0)  # skipping iterations saves nothing; the lens costs
    line = summary([], [free_loop], []).splitlines()[-1]
    assert line.startswith("what-if at ≥99% agreement: no early-exit policy recommended: no exit criterion with "
                           "agreement ≥ 0.99 saves compute")
    assert "Keep exit='fixed'" in line


def test_verify_runs_act_at_the_configs_threshold_with_the_default_depth_and_repeats():
    """policy="act" with neither threshold, n_loops nor repeats given: the model halts at its
    config's act_threshold (0.6 here, not the 0.99 default, on a halting head that splits the
    positions over iterations 2, 3 and 4), over cfg.max_loop_iters iterations, timed in three
    pairs; the replay predicts the same threshold on a probed full-depth forward."""
    import dataclasses

    from mythos_probe.model import LoopedConfig, LoopedTransformer
    from mythos_probe.model.looped import ACTHalting

    forwards = []

    class Counting(LoopedTransformer):
        """Counts forwards without a hook (verify refuses a watched model)."""

        def forward(self, *args, **kwargs):
            forwards.append(kwargs.get("exit"))
            return super().forward(*args, **kwargs)

    cfg = dataclasses.replace(LoopedConfig.variant("tiny-gqa"), act_threshold=0.6)
    torch.manual_seed(0)
    model = Counting(cfg).eval()
    (halt,) = [m.halt for m in model.modules() if isinstance(m, ACTHalting)]
    with torch.no_grad():
        halt.weight.copy_(0.3 * torch.randn(halt.weight.shape, generator=torch.Generator().manual_seed(0)))
        halt.bias.zero_()
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(2))
    report = whatif.verify(model, ids, "act")
    # validation, the probed full-depth forward, the cached one, two counted ones, three timed pairs
    assert forwards == ["act", "fixed", "act", "act", "fixed"] + ["act", "fixed"] * 3
    assert list(report.index) == [
        "policy", "threshold", "criterion", "predicted_iterations_saved", "predicted_flops_saved",
        "predicted_agreement", "iterations_saved", "flops_saved", "time_saved", "cpu_time_saved", "agreement",
        "time_fixed_s", "time_policy_s"]
    assert (report["policy"], report["threshold"], report["criterion"]) == ("act", 0.6, "act")
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, n_loops=4, exit="act")
        with attach(model, probes=["convergence", "halting", "cost", "lens"], detail="positions",
                    lens_positions="all") as rec:
            model(ids, n_loops=4, exit="fixed")
        out, full = model(ids, n_loops=4, exit="act"), model(ids, n_loops=4, exit="fixed")
    halted = cache.stack("recurrent.hook_halted")
    used = torch.where(halted.any(0), halted.float().argmax(0) + 1, halted.shape[0])
    assert sorted(set(used.flatten().tolist())) == [2, 3, 4]  # the positions exit at different iterations
    assert report["iterations_saved"] == pytest.approx(1 - used.sum().item() / (2 * 6 * 4))
    assert report["agreement"] == pytest.approx((out.argmax(-1) == full.argmax(-1)).float().mean().item())
    predicted = whatif.evaluate(rec.traces, {"act": [0.6]}).iloc[0]
    assert whatif.evaluate(rec.traces, {"act": [0.99]}).iloc[0]["iterations_saved"] != predicted["iterations_saved"]
    for name in ("iterations_saved", "flops_saved", "agreement"):
        assert report[f"predicted_{name}"] == pytest.approx(predicted[name]), name


@pytest.mark.parametrize("repeats", [0, -1, 2.0, True, "3"])
def test_verify_refuses_a_repeat_count_that_is_not_a_positive_integer(repeats):
    from mythos_probe.model import LoopedConfig, LoopedTransformer

    model = LoopedTransformer(LoopedConfig.variant("tiny-gqa")).eval()
    with pytest.raises(ValueError, match=f"^repeats must be a positive integer, got {re.escape(repr(repeats))}$"):
        whatif.verify(model, torch.zeros(1, 4, dtype=torch.long), "kl", 0.1, repeats=repeats)
