"""The dashboard explains itself (page callbacks called as plain functions): a link's unreadable
values are named, an empty view says which filter hides which forwards, views that average per
iteration or position show one model · loop at a time and say so, iterations are numbered from 1
on every page, each metric carries its description from `records`, and counts get human ticks.
The same behaviours in Chromium are in `test_browser_explains.py`."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mythos_probe import records
from mythos_probe.collectors.store import Store
from mythos_probe.dashboards import components, urlstate
from mythos_probe.dashboards.pages import convergence, cost, halting, loops
from mythos_probe.dashboards.queries import Selection
from tests.dashboards.conftest import make_mixed_traces


def _text(component) -> str:
    return str(component.children) if hasattr(component, "children") else str(component)


@pytest.mark.parametrize("query, problem", [
    ("kind=bogus", "URL parameter kind='bogus' is not one of served, shadow, training, all"),
    ("window=3d", "URL parameter window='3d' is not one of all, 5m, 1h, 24h, 7d"),
    ("x=epoch", "URL parameter x='epoch' is not one of step, time"),
    ("metric=loss", "URL parameter metric='loss' is not one of " + ", ".join(records.POSITION_METRIC_NAMES)),
    ("group=colour", "URL parameter group='colour' is not a valid grouping"),
    ("group=attr:", "URL parameter group='attr:' is not a valid grouping"),
    ("imin=abc", "URL parameter imin='abc' is not a valid int"),
])
def test_a_link_value_outside_its_choices_is_named_and_the_default_kept(query, problem):
    state, problems = urlstate.parse("?" + query)
    assert problems == [problem]
    name = query.split("=")[0]
    assert state[name] == urlstate.KEYS[name].default


def test_link_values_inside_their_choices_are_kept():
    state, problems = urlstate.parse("?kind=all&window=1h&x=time&metric=cos_step&group=attr:endpoint&criterion=act")
    assert problems == []
    assert (state["kind"], state["window"], state["x"], state["metric"], state["group"], state["criterion"]) == (
        "all", "1h", "time", "cos_step", "attr:endpoint", "act")


@pytest.fixture()
def training_only(tmp_path):
    """A store holding only training forwards (as after recording a training run): 3 of them."""
    traces = [dataclasses.replace(t, kind="training") for t in make_mixed_traces()[:3]]
    s = Store(tmp_path / "training.duckdb")
    s.write_traces(traces)
    yield s
    s.close()


def test_an_empty_view_names_the_kind_filter_that_hides_the_stored_forwards(training_only):
    out = loops.update(training_only, Selection(), "")
    assert _text(out[0]) == ("No forwards match the filters. Lifting one filter alone would show some: "
                             "Forward kind (served) hides 3 training — choose 'every kind' or that kind.")
    assert loops.update(training_only, Selection(kinds=()), "")[0] == ""  # every kind: drawn


def test_views_averaging_per_iteration_show_the_newest_model_and_loop_only(mixed):
    store, traces = mixed
    served = [t for t in traces if t.kind == "served"]
    newest = max(served, key=lambda t: t.start_ns)
    pairs = {(t.model_id, t.loop_name) for t in served}
    assert len(pairs) > 1  # the fixture mixes loops, so the property can show
    sel, note = components.one_shape(store, Selection())
    assert (sel.models, sel.loops) == ((newest.model_id,), (newest.loop_name,))
    assert note.startswith(f"Showing model {newest.model_id} · loop {newest.loop_name} only, the newest of {len(pairs)}")
    for model, loop in pairs - {(newest.model_id, newest.loop_name)}:
        n = sum((t.model_id, t.loop_name) == (model, loop) for t in served)
        assert f"{model} · {loop} ({n})" in note
    # an explicit grouping, or a single pair, is left alone
    assert components.one_shape(store, Selection(group="model")) == (Selection(group="model"), "")
    one = Selection(loops=(newest.loop_name,), models=(newest.model_id,))
    assert components.one_shape(store, one) == (one, "")
    # what the narrowed halting view draws: exits of that pair's forwards only, from numpy
    kept = [t for t in served if (t.model_id, t.loop_name) == (newest.model_id, newest.loop_name)]
    steps = halting.update(store, sel, "")[3]
    want = np.zeros(max(t.iterations for t in kept))
    for t in kept:
        want[: t.iterations] += t.iteration_metrics["exit_count"]
    np.testing.assert_array_equal(np.asarray(steps.data[0].y, dtype=float), want)
    assert len(steps.data) == 1


def test_halting_and_the_loop_distribution_number_iterations_alike(store, traces):
    """Tokens that used k iterations are drawn at k on both pages (the halt-step histogram counted
    from 0 before, the loop distribution from 1)."""
    sel = Selection(models=("mythos-tiny",))
    steps = halting.update(store, sel, "")[3].data[0]
    used = loops.update(store, sel, "")[1].data[0]
    drawn = {int(x): y for x, y in zip(steps.x, steps.y) if y}
    assert drawn == {int(x): y for x, y in zip(used.x, used.y)}
    tiny = [t for t in traces if t.model_id == "mythos-tiny"]
    counts = np.bincount(np.concatenate([t.position_iterations.ravel() for t in tiny]))
    assert drawn == {k: float(c) for k, c in enumerate(counts) if c}
    assert min(drawn) >= 1 and steps.x[0] == 1  # the first pass is iteration 1


def test_every_metric_caption_is_its_one_definition_in_records():
    rel = next(m for m in records.POSITION_METRICS if m.name == "rel_residual")
    assert components.about("position", "rel_residual") == f"rel_residual: {rel.description} ({rel.source})"
    flops = next(m for m in records.FORWARD_METRICS if m.name == "flops")
    low, high = (next(m for m in records.ITERATION_METRICS if m.name == n) for n in ("halt_low_share", "halt_high_share"))
    assert components.about("iteration", "halt_low_share", "halt_high_share") == (
        f"halt_low_share: {low.description} ({low.source}) · halt_high_share: {high.description} ({high.source})")
    assert flops.description in components.about("forward", "flops")
    options = components.metric_options("position")
    assert [o["value"] for o in options] == list(records.POSITION_METRIC_NAMES)
    assert options[0]["title"] == f"{rel.description} ({rel.source})"
    page = str(halting.layout())
    assert components.about("iteration", "exit_count") in page  # the halting charts carry theirs


def test_the_convergence_view_captions_the_chosen_metric(store):
    out = convergence.update(store, Selection(models=("mythos-tiny",)), "", "state_norm")
    assert _text(out[0]) == components.about("position", "state_norm")


def test_counts_get_si_ticks_from_zero(store):
    out = cost.update(store, Selection(), "")
    for fig in out[1:4]:
        assert (fig.layout.yaxis.tickformat, fig.layout.yaxis.rangemode) == (".3~s", "tozero")


def test_a_band_of_few_buckets_draws_its_markers():
    """A run whose forwards fall in one bucket drew a median line of one point: nothing visible."""
    import pandas as pd

    one = pd.DataFrame({"x": [3.0], "lo": [1.0], "mid": [2.0], "hi": [3.0]})
    assert components.band(one, "run", "lo", "mid", "hi", "#636efa")[2]["mode"] == "lines+markers"
    many = pd.DataFrame({"x": np.arange(components.FEW_BUCKETS + 1.0), "lo": 1.0, "mid": 2.0, "hi": 3.0})
    assert components.band(many, "run", "lo", "mid", "hi", "#636efa")[2]["mode"] == "lines"
