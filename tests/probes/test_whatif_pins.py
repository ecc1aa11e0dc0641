"""The early-exit what-if's fixed parts, pinned: the default thresholds (half-decade grids), the
criterion tables, scores sitting exactly on their threshold (which side fires), the refusals'
wording, the sentence `describe` prints and the figure's labels. tests/probes/test_whatif.py
checks the replay itself against hand-worked and plain-loop replays."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

# the model package and what `verify` imports, imported at collection: a mutation run's fork
# server then holds them, and test_whatif.py's verify refusals skip that import in every fork
import mythos_probe.executed_flops  # noqa: F401
import mythos_probe.model  # noqa: F401
from mythos_probe import whatif
from tests.probes.test_whatif import hand_trace, make_trace, table_of

# ... and the first counted operation (~3 s: torch's dispatch-mode machinery loads then), which
# every forked verify test would otherwise pay again
with mythos_probe.executed_flops.ExecutedFlops():
    torch.ones(2, 2) @ torch.ones(2, 2)

NAN = math.nan


def half_decades(low: int) -> list[float]:
    """10^low, 10^(low + 1/2), ..., 1."""
    return [10 ** (e / 2) for e in range(2 * low, 1)]


def test_default_thresholds():
    d = whatif.DEFAULT_THRESHOLDS
    assert d["act"] == (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
    assert d["argmax_stable"] == (1, 2, 3, 4)
    for criterion, low in (("kl", -5), ("rel_residual", -4), ("cos_step", -6), ("entropy", -4)):
        assert d[criterion] == pytest.approx(half_decades(low), rel=1e-12), criterion
        assert all(type(x) is float for x in d[criterion])
    assert list(d) == list(whatif.CRITERIA)


def test_criterion_tables():
    assert whatif.CRITERIA == ("act", "kl", "rel_residual", "cos_step", "entropy", "argmax_stable")
    assert whatif.INPUTS == {"act": "cum_halt", "kl": "lens_kl_prev", "rel_residual": "rel_residual",
                             "cos_step": "cos_step", "entropy": "lens_entropy", "argmax_stable": "lens_argmax"}
    assert whatif.FIRES == {"act": "at_least", "kl": "below", "rel_residual": "below", "cos_step": "below",
                            "entropy": "below", "argmax_stable": "at_least"}
    assert whatif.LENS_CRITERIA == ("kl", "entropy", "argmax_stable")
    assert whatif.COLUMNS == ["criterion", "threshold", "mean_iterations", "iterations_saved", "flops_saved",
                              "lens_cost", "agreement", "positions", "baseline"]
    assert (whatif.BASELINE, whatif.BASELINES) == ("fixed", ("full depth", "served"))
    assert whatif.POLICY_CRITERIA == {"act": "act", "kl": "kl", "latent": "rel_residual"}


def on_threshold_trace():
    """One sampled position whose every score reaches exactly 0.5 (or k = 2) at iteration 1 and
    passes it at iteration 2: "at least" criteria exit at 1, "below" criteria at 2."""
    metrics = {
        "cum_halt": [0.25, 0.5, 0.75, 1.0],
        "lens_kl_prev": [NAN, 0.5, 0.25, 0.125],
        "rel_residual": [1.0, 0.5, 0.25, 0.125],
        "cos_step": [1.0, 0.5, 0.25, 0.125],
        "lens_entropy": [3.0, 2.5, 2.25, 2.125],  # changes 0.5, 0.25, 0.125: exact in binary
        "lens_argmax": [4, 4, 4, 4],  # stable for 1, 2, 3 iterations at t = 1, 2, 3
        "lens_top1_agree": [0, 1, 0, 1],
    }
    return make_trace({k: np.array([[v]], dtype=float) for k, v in metrics.items()})


def test_a_score_on_its_threshold_fires_only_for_at_least_criteria():
    th = {"act": [0.5], "kl": [0.5], "rel_residual": [0.5], "cos_step": [0.5], "entropy": [0.5], "argmax_stable": [2]}
    table = whatif.evaluate([on_threshold_trace()], th).set_index("criterion")
    used = table["mean_iterations"].to_dict()
    assert used == {"act": 2.0, "kl": 3.0, "rel_residual": 3.0, "cos_step": 3.0, "entropy": 3.0, "argmax_stable": 3.0}
    assert table.loc["act", "agreement"] == 1.0 and table.loc["kl", "agreement"] == 0.0
    exits = whatif.exits([on_threshold_trace()], "argmax_stable", 1)
    assert exits["exit_iteration"].tolist() == [1] and exits["agrees"].tolist() == [True]
    never = whatif.exits([on_threshold_trace()], "rel_residual", 0.1)  # never fires: the last iteration
    assert (never["exit_iteration"].tolist(), never["iterations_used"].tolist()) == ([3], [4])


def test_the_default_grid_is_what_evaluate_runs():
    table = whatif.evaluate([hand_trace()])
    for criterion, values in whatif.DEFAULT_THRESHOLDS.items():
        assert table[table["criterion"] == criterion]["threshold"].tolist() == list(values)


def test_refusals_name_what_to_do():
    tr = hand_trace()
    with pytest.raises(ValueError, match=r"^unknown exit criteria \['patience', 'zz'\]; choose from \('act', "):
        whatif.evaluate([tr], {"zz": [1], "patience": [2], "kl": [0.1]})
    without = make_trace({k: v for k, v in tr.position_metrics.items() if k not in ("cum_halt", "cos_step")})
    with pytest.raises(ValueError, match=r"^criteria \['act', 'cos_step'\] need position metrics \['cum_halt', "
                                         r"'cos_step'\], which these traces lack: attach with the 'convergence' and "
                                         r"'halting' probes and detail='positions'$"):
        whatif.evaluate([without], {"act": [0.5], "cos_step": [0.1], "kl": [0.1]})
    with pytest.raises(ValueError, match=r"^criterion 'act' is not available in these traces; available: \('kl', "):
        whatif.exits([without], "act", 0.5)
    with pytest.raises(ValueError, match=r"^no traces: record forwards with attach\(model, probes=\[..., 'lens'\], "
                                         r"detail='positions'\)$"):
        whatif.evaluate([])
    summary = make_trace({"lens_argmax": np.zeros((1, 2, 3)), "lens_top1_agree": np.zeros((1, 2, 3))},
                         detail="summary")
    with pytest.raises(ValueError, match=r"^the early-exit what-if needs per-position lens metrics: attach with "
                                         r"detail='positions' and probes including 'lens' \(e.g. lens_positions='all'\); "
                                         r"trace [0-9a-f]{16} has detail='summary' and position metrics "
                                         r"\['lens_argmax', 'lens_top1_agree'\]$"):
        whatif.evaluate([summary])
    no_agree = make_trace({"lens_argmax": np.zeros((1, 2, 3))})
    with pytest.raises(ValueError, match=r"position metrics \['lens_argmax'\]$"):
        whatif.evaluate([no_agree])
    unsampled = make_trace({"lens_argmax": np.full((1, 2, 3), NAN), "lens_top1_agree": np.full((1, 2, 3), NAN)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"^the lens sampled no positions in these traces$"):
            whatif.evaluate([unsampled])
    with pytest.raises(ValueError, match=r"^the what-if table is empty: no criterion could be evaluated$"):
        whatif.recommend(pd.DataFrame(columns=whatif.COLUMNS))
    with pytest.raises(ValueError, match=r"^the what-if table is empty"):
        whatif.pareto_figure(pd.DataFrame(columns=whatif.COLUMNS))


def test_a_full_depth_forward_without_lens_samples_is_no_baseline():
    full_unsampled = make_trace({"lens_argmax": np.full((1, 2, 4), NAN), "lens_top1_agree": np.full((1, 2, 4), NAN)})
    served = make_trace(hand_trace().position_metrics, exit_policy="act")
    with pytest.warns(UserWarning) as caught:
        table = whatif.evaluate([full_unsampled, served])
    assert str(caught[0].message) == whatif.NO_FULL_DEPTH
    assert whatif.NO_FULL_DEPTH.startswith("no full-depth forward (exit='fixed') among the traces: agreement is "
                                           "measured against the served forwards' own outputs, not full depth.")
    assert (table["baseline"] == "served").all() and (table["positions"] == 2).all()


def test_no_criterion_evaluable_gives_an_empty_table_with_the_columns():
    tr = hand_trace()
    empty = whatif.evaluate([tr], {})
    assert empty.empty and list(empty.columns) == whatif.COLUMNS


def test_describe_and_saving_sentences():
    row = table_of([("rel_residual", 0.0123, 2.5, 0.375, 0.9876, 12345)], flops_saved=0.25, lens_cost=0.0).iloc[0]
    assert whatif.describe(row) == (
        "exit on rel_residual at threshold 0.0123: saves 37.5% of loop iterations (25.0% of the forward's FLOPs) "
        "and keeps the baseline's prediction on 98.8% of 12,345 positions (baseline: full-depth shadow forwards, "
        "exit='fixed')")
    lens = table_of([("kl", 0.001, 2.5, 0.5, 1.0, 4)], flops_saved=0.125, lens_cost=0.0625).iloc[0]
    assert whatif._saving(lens) == ("saves 50.0% of loop iterations (12.5% of the forward's FLOPs, net of 6.2% "
                                    "spent reading the coda lens every iteration)")
    unknown = table_of([("act", 0.9, 2.5, 0.5, 1.0, 4)]).iloc[0]
    assert whatif._saving(unknown) == "saves 50.0% of loop iterations"
    unknown_lens = table_of([("entropy", 0.01, 2.5, 0.5, 1.0, 4)]).iloc[0]
    assert whatif._saving(unknown_lens) == ("saves 50.0% of loop iterations (FLOPs saved unknown: no recorded cost "
                                            "for the loop or the coda lens it reads every iteration)")
    served = row.copy()
    served["baseline"] = "served"
    assert whatif.describe(served).endswith("(baseline: the served forwards' own outputs, NOT full depth: record "
                                            "exit='fixed' shadow forwards)")


def test_recommend_default_floor_and_ties():
    table = table_of([
        ("kl", 0.1, 1.0, 0.75, 0.989, 10),  # below the default floor 0.99
        ("act", 0.9, 2.0, 0.50, 0.99, 10),  # exactly on it: kept
        ("rel_residual", 0.5, 2.0, 0.50, 0.995, 10),  # same saving, higher agreement: first
    ])
    assert whatif.recommend(table)["criterion"] == "rel_residual"
    assert whatif.recommend(table.iloc[:2])["criterion"] == "act"
    with pytest.raises(ValueError, match=r"^no exit criterion keeps agreement ≥ 0\.999 with the full-depth "
                                         r"prediction; the best, rel_residual at threshold 0\.5, agrees on 99\.5% of 10 "
                                         r"positions\. Lower min_agreement or record more forwards\.$"):
        whatif.recommend(table, 0.999)
    with pytest.raises(ValueError, match=r"^no exit criterion with agreement ≥ 0\.99 saves compute: the best, act at "
                                         r"threshold 0\.9, saves 0\.0% of loop iterations \(-1\.0% of the forward's "
                                         r"FLOPs\)\. Keep exit='fixed' \(full depth costs less\), or lower "
                                         r"min_agreement\.$"):
        whatif.recommend(table_of([("act", 0.9, 4.0, 0.0, 1.0, 10)], flops_saved=-0.01, lens_cost=0.0))


def test_pareto_front_and_the_axis_it_ranks_by():
    table = table_of([
        ("kl", 0.1, 1.0, 0.75, 0.90, 10),
        ("act", 0.9, 3.0, 0.25, 0.90, 10),  # same agreement, less saved: dominated
        ("rel_residual", 0.1, 3.0, 0.25, 1.00, 10),
        ("cos_step", 0.1, 3.0, 0.25, 1.00, 10),  # a tie with rel_residual: the first kept
    ])
    assert whatif._axis(table) == ("iterations_saved", "loop iterations saved (share of executed iterations)")
    front = whatif.pareto_front(table)
    assert list(front["criterion"]) == ["rel_residual", "kl"]
    known = table.assign(flops_saved=[0.1, 0.2, 0.05, 0.0])
    assert whatif._axis(known) == ("flops_saved", "FLOPs saved (share of the forward's FLOPs, lens readouts paid)")
    assert list(whatif.pareto_front(known)["criterion"]) == ["rel_residual", "act"]  # act saves the most FLOPs
    assert whatif._axis(known.assign(flops_saved=[0.1, NAN, 0.05, 0.0]))[0] == "iterations_saved"
    assert whatif._axis(known.iloc[:0])[0] == "iterations_saved"


def test_pareto_figure_labels():
    table = table_of([("kl", 0.1, 1.0, 0.75, 0.99, 10), ("act", 0.9, 3.0, 0.25, 1.0, 10)])
    fig = whatif.pareto_figure(table)  # default floor 0.99
    assert [t.name for t in fig.data] == ["kl", "act", "Pareto front", "recommended: kl τ=0.1"]
    kl = fig.data[0]
    assert kl.mode == "markers" and list(kl.customdata[0]) == [0.1, 1.0]
    assert kl.hovertemplate == ("kl τ=%{customdata[0]:.3g}<br>saved %{x:.1%}, agreement %{y:.1%}"
                                "<br>mean iterations %{customdata[1]:.2f}<extra></extra>")
    line = fig.data[2]
    assert (line.mode, line.line.color, line.line.dash, line.hoverinfo) == ("lines", "grey", "dot", "skip")
    star = fig.data[3]
    assert (star.marker.symbol, star.marker.size, star.marker.color) == ("star", 16, "gold")
    assert fig.layout.title.text == "Early-exit what-if: compute saved vs agreement with full depth"
    assert fig.layout.legend.title.text == "criterion"
    assert fig.layout.xaxis.title.text == "loop iterations saved (share of executed iterations)"
    assert fig.layout.xaxis.tickformat == ".0%" and fig.layout.yaxis.tickformat == ".0%"
    assert fig.layout.yaxis.title.text == "top-1 agreement with the full-depth prediction (share of positions)"
    (hline,) = fig.layout.shapes
    assert (hline.y0, hline.line.color, hline.line.dash, hline.line.width) == (0.99, "firebrick", "dash", 1)
    assert fig.layout.annotations[0].text == "agreement 99%"
    none = whatif.pareto_figure(table, min_agreement=None)
    assert [t.name for t in none.data] == ["kl", "act", "Pareto front"] and not none.layout.shapes
    unmet = whatif.pareto_figure(table, min_agreement=1.5)  # nothing qualifies: no star, no error
    assert [t.name for t in unmet.data] == ["kl", "act", "Pareto front"]


def test_a_threshold_given_as_text_exits_as_its_number_and_the_served_warning_names_the_callers_line():
    """`exits` takes a threshold as a dashboard or command line hands it over (text) as well as a
    number; the warning that no full-depth forward was given points at the caller's line, for
    `evaluate` and `exits` alike (stacklevel)."""
    tr = hand_trace()
    for criterion, threshold in (("kl", "0.01"), ("argmax_stable", "1"), ("act", "0.9")):
        pd.testing.assert_frame_equal(whatif.exits([tr], criterion, threshold),
                                      whatif.exits([tr], criterion, float(threshold)))
    assert whatif.exits([tr], "kl", "0.01")["iterations_used"].tolist() == [4, 2]
    served = make_trace(tr.position_metrics, exit_policy="act")
    for call in (lambda: whatif.evaluate([served]), lambda: whatif.exits([served], "kl", 0.01)):
        with pytest.warns(UserWarning) as caught:
            call()
        assert [str(w.message) for w in caught] == [whatif.NO_FULL_DEPTH]
        assert caught[0].filename == __file__  # the caller's line (under mutmut too: tests/conftest.py)


def test_pareto_figure_points_are_the_tables_rows_and_its_front():
    """Every plotted coordinate against the table: each criterion's markers at (saving, agreement)
    of its rows, the front's line through `pareto_front`'s rows, the star on the recommended row
    (FLOPs known on every row here, so the x axis is flops_saved, not iterations_saved)."""
    table = table_of([
        ("kl", 0.1, 1.0, 0.75, 0.90, 10),
        ("act", 0.5, 2.0, 0.50, 0.80, 10),  # dominated by the kl row below
        ("kl", 0.01, 2.0, 0.50, 0.99, 10),
        ("act", 0.9, 3.0, 0.25, 1.00, 10),
    ], flops_saved=[0.30, 0.10, 0.20, 0.05], lens_cost=[0.1, 0.0, 0.1, 0.0])
    fig = whatif.pareto_figure(table, min_agreement=0.95)
    kl, act, front, star = fig.data
    assert (list(kl.x), list(kl.y)) == ([0.30, 0.20], [0.90, 0.99])
    assert (list(act.x), list(act.y)) == ([0.10, 0.05], [0.80, 1.00])
    assert [list(c) for c in act.customdata] == [[0.5, 2.0], [0.9, 3.0]]
    want = whatif.pareto_front(table)
    assert list(want["flops_saved"]) == [0.05, 0.20, 0.30]
    assert (list(front.x), list(front.y)) == (list(want["flops_saved"]), list(want["agreement"]))
    assert (list(star.x), list(star.y), star.mode) == ([0.20], [0.99], "markers")
    assert (star.marker.line.color, star.marker.line.width) == ("black", 1)
    assert star.name == "recommended: kl τ=0.01"


def test_pareto_front_drops_the_lower_agreement_of_two_rows_that_save_the_same():
    table = table_of([
        ("kl", 0.1, 2.0, 0.50, 0.80, 10),  # saves as much as act 0.9, agrees less: dominated
        ("act", 0.9, 2.0, 0.50, 0.90, 10),
        ("rel_residual", 0.1, 3.0, 0.25, 1.00, 10),
    ])
    front = whatif.pareto_front(table)
    assert list(zip(front["criterion"], front["agreement"])) == [("rel_residual", 1.00), ("act", 0.90)]


def test_thresholds_given_as_text_evaluate_as_their_numbers():
    """`evaluate` takes thresholds as a dashboard or command line hands them over (text, or whole
    numbers for argmax_stable's k): the same rows as the floats, the threshold column float."""
    tr = hand_trace()
    as_floats = whatif.evaluate([tr], {"kl": [0.01, 0.1], "argmax_stable": [1.0, 2.0]})
    assert as_floats["threshold"].dtype == np.float64
    for given in ({"kl": ["0.01", "0.1"], "argmax_stable": ["1", "2"]}, {"kl": [0.01, 0.1], "argmax_stable": [1, 2]}):
        pd.testing.assert_frame_equal(whatif.evaluate([tr], given), as_floats)
    alone = whatif.evaluate([tr], {"argmax_stable": [1, 2]})
    assert alone["threshold"].dtype == np.float64 and alone["threshold"].tolist() == [1.0, 2.0]


def test_verify_refusals_word_for_word():
    from mythos_probe.model import LoopedConfig, LoopedTransformer

    model = LoopedTransformer(LoopedConfig.variant("tiny-gqa")).eval()
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(TypeError, match=r"^verify runs exit policies of a mythos_probe\.model\.LoopedTransformer, "
                                        r"got Linear$"):
        whatif.verify(torch.nn.Linear(2, 2), ids, "kl", 0.1)
    with pytest.raises(ValueError, match=r"^policy 'act' halts at model\.cfg\.act_threshold: pass threshold=None$"):
        whatif.verify(model, ids, "act", 0.5)
    with pytest.raises(ValueError, match=r"^verify measures the model as served, but it is in training mode \(exited "
                                         r"positions would still be computed, and dropout would move the agreement\): "
                                         r"call model\.eval\(\) first$"):
        whatif.verify(model.train(), ids, "kl", 0.1)
    model.eval()
    with model.hooks(fwd_hooks=[("hook_logits", lambda x, hook: x)]):
        with pytest.raises(ValueError, match=r"^verify measures the model as served, but forward hooks are attached to "
                                             r"it \(an open attach\(\.\.\.\) recorder, model\.hooks\(\.\.\.\) or a module "
                                             r"hook\): the loop then computes every position, and verify's runs would "
                                             r"land in your recording; call verify outside that context$"):
            whatif.verify(model, ids, "kl", 0.1)


def test_exits_of_several_traces_every_column_in_order():
    """One row per lens-sampled position of every trace, numbered 0..P-1 across the traces, with
    the keys that find the position again (trace, span, batch row, position) named as documented."""
    a, b = hand_trace(), hand_trace()
    got = whatif.exits([a, b], "kl", 0.01)
    want = pd.DataFrame({
        "trace_id": [a.trace_id] * 2 + [b.trace_id] * 2, "span_id": [a.span_id] * 2 + [b.span_id] * 2,
        "batch_index": [0, 0, 0, 0], "position": [0, 1, 0, 1], "exit_iteration": [3, 1, 3, 1],
        "iterations_used": [4, 2, 4, 2], "iterations_run": [4, 4, 4, 4], "agrees": [True, False, True, False],
    })
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
