"""Coda lens and early exit page (`/lens`): KL to the final distribution per position and
iteration for one forward, top-1 agreement with the final answer by iteration, and the early-exit
what-if: every lens-sampled position of the selected forwards replayed under each exit criterion
and threshold (`whatif.evaluate`, the SQL form of `mythos_probe.whatif.evaluate`), drawn as
`mythos_probe.whatif.pareto_figure`, with the recommended criterion at ≥ 99 % agreement and the
thresholds of one criterion as a table. Above `SAMPLE_FORWARDS` selected full-depth forwards the
replay is a deterministic sample of them, and the page says so, with each figure's 95 % interval.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import numpy as np
from dash import Output, dcc, html

from mythos_probe import whatif as replay
from mythos_probe.dashboards import queries, whatif
from mythos_probe.dashboards.components import (
    ITERATION_AXIS, about, area, empty_figure, figure, graph, lines, message, no_data, position_heatmap, table,
    trace_from_search,
    view_callback, who,
)
from mythos_probe.dashboards.theme import LAYOUT
from mythos_probe.dashboards.urlstate import control_id

PATH = "/lens"
TITLE = "Coda lens & early exit"
log = logging.getLogger("mythos_probe.dashboards")
RANGE_STEPS = 12  # thresholds replayed across a user-given range
CACHE_SIZE = 32
# The replay's sample: above this many selected full-depth forwards the what-if replays this many
# (the same ones each time) and states its 95 % intervals. At a million forwards (10,000 shadows)
# a full replay takes over a second; 2,000 keep each figure within about ±2 points.
SAMPLE_FORWARDS = 2000
WHATIF_COLUMNS = {"threshold": "threshold", "mean_iterations": "iterations at exit",
                  "iterations_saved": "iterations saved", "flops_saved": "FLOPs saved",
                  "lens_cost": "FLOPs reading the lens", "agreement": "top-1 agreement at exit",
                  "positions": "positions"}
WHATIF_FORMATS = {"threshold": "number", "mean_iterations": "number", "iterations_saved": "percent",
                  "flops_saved": "percent", "lens_cost": "percent", "agreement": "percent", "positions": "integer",
                  "agreement_ci": "percent", "iterations_saved_ci": "percent", "flops_saved_ci": "percent"}
# beside their estimates when the replay is a sample: 95 % interval half-widths
SAMPLE_COLUMNS = {"agreement_ci": "agreement ± (95 %)", "iterations_saved_ci": "iterations saved ± (95 %)",
                  "flops_saved_ci": "FLOPs saved ± (95 %)"}
NO_POSITIONS = ("No per-position lens metrics in the selected full-depth forwards: the what-if replays positions "
                "the coda lens sampled in forwards run with exit='fixed' (shadow runs beside the served ones). "
                "Record with attach(model, probes=[..., 'lens'], detail='positions').")


def layout(state: dict | None = None) -> html.Div:
    state = state or {"criterion": "kl", "target": 0.99, "tmin": None, "tmax": None}
    criteria = [{"label": c, "value": c} for c in replay.CRITERIA]
    return html.Div(
        [
            html.H2(TITLE),
            html.Div(id="lens-message"),
            html.Div([graph("lens-heatmap"), graph("lens-agreement", about("iteration", "lens_top1_agree"))], className="mp-grid"),
            html.H2("Early-exit what-if: each lens-sampled position stops at the first iteration its criterion fires"),
            html.Div([
                html.Div([html.Label("Thresholds of"), dcc.Dropdown(
                    id=control_id("criterion"), options=criteria, value=state["criterion"], clearable=False)]),
                html.Div([html.Label("Agreement target"), dcc.Input(
                    id=control_id("target"), type="number", min=0, max=1, step=0.001, value=state["target"], debounce=True)]),
                html.Div([html.Label("Threshold range: from"), dcc.Input(
                    id=control_id("tmin"), type="number", value=state["tmin"], debounce=True, placeholder="default grid")]),
                html.Div([html.Label("to"), dcc.Input(
                    id=control_id("tmax"), type="number", value=state["tmax"], debounce=True, placeholder="default grid")]),
            ], className="mp-controls"),
            html.Div([graph("lens-pareto"), area("lens-whatif", className="mp-card")], className="mp-grid"),
        ]
    )


_cache: OrderedDict = OrderedDict()
_cache_lock = threading.Lock()


def thresholds(criterion: str, low: float | None, high: float | None) -> dict | None:
    """The replay's thresholds: the default grid, with `criterion`'s replaced by RANGE_STEPS
    values across [low, high] (log-spaced when both are positive) when a range is given."""
    if low is None or high is None:
        return None
    if low >= high:
        raise ValueError(f"threshold range {low:g} to {high:g} is empty: give a lower 'from' than 'to'")
    grid = np.geomspace(low, high, RANGE_STEPS) if low > 0 else np.linspace(low, high, RANGE_STEPS)
    return {**replay.DEFAULT_THRESHOLDS, criterion: [float(v) for v in grid]}


def cached_evaluate(store, sel: queries.Selection, chosen: dict | None):
    """`whatif.evaluate`, remembered per (store contents, selection, thresholds): switching the
    criterion, the target or the page again is instant after the first replay. The key carries the
    store's forward count and newest id, so forwards arriving live start a new replay."""
    version = tuple(store.query("SELECT count(*) AS n, max(forward_id) AS m FROM forwards").iloc[0].tolist())
    key = (id(store), version, sel, None if chosen is None else tuple((c, tuple(v)) for c, v in sorted(chosen.items())))
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    exits = whatif.evaluate(store, sel, chosen, sample=SAMPLE_FORWARDS)
    with _cache_lock:
        _cache[key] = exits
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return exits


def sampled(exits) -> str | None:
    """What the page says when the replay was a sample (`whatif.evaluate(sample=…)`), else None."""
    if exits.empty or "forwards_replayed" not in exits:
        return None
    m, big_m = int(exits["forwards_replayed"].iloc[0]), int(exits["forwards_selected"].iloc[0])
    if m >= big_m:
        return None
    return (f"Estimated from a sample of {m:,} of the {big_m:,} selected full-depth forwards (the same ones on every "
            f"replay, chosen by a hash of their id): each figure is within its ± of the full replay with 95 % "
            f"confidence (agreement at most ±{exits['agreement_ci'].max():.1%}, iterations saved at most "
            f"±{exits['iterations_saved_ci'].max():.1%}). Narrow the selection to replay every forward.")


def recommendation(exits, target: float) -> html.Div | str:
    try:
        best = replay.recommend(exits, target)
    except ValueError as exc:
        return message(str(exc))
    return message(f"Recommended at ≥ {target:.1%} agreement: {replay.describe(best)}.")


def pareto(exits, target: float):
    fig = replay.pareto_figure(exits, target)
    # The dashboard's theme over the figure's own: plotly's named templates cost ~30 ms each.
    return fig.update_layout(LAYOUT, height=420, title={"font": {"size": 15}, "x": 0.02, "xanchor": "left"})


def update(store, sel: queries.Selection, search, criterion, target=0.99, low=None, high=None):
    per_it = queries.iteration_means(store, sel, ("lens_top1_agree", "lens_kl_final"))
    if per_it.empty:
        empty = empty_figure("Coda lens")
        return no_data(store, sel), empty, empty, empty, ""
    trace_id = trace_from_search(search) or queries.newest_trace(store, sel)
    grid = queries.position_grid(store, trace_id, 0, "lens_kl_final")
    if grid.empty or grid["value"].isna().all():
        heat = empty_figure("KL to final", "No per-position lens values for this forward")
    else:
        row = queries.forward(store, trace_id)
        about = who(row.iloc[0]) if len(row) else ""
        heat = position_heatmap(grid, "lens_kl_final", f"KL to final, forward {trace_id[:8]}… (batch row 0)", about)
    agreement = lines(figure("Top-1 agreement with the final answer", ITERATION_AXIS, "share agreeing"),
                      per_it, "iteration", "lens_top1_agree")
    target = 0.99 if target is None else target
    try:
        if not 0 < target <= 1:
            raise ValueError(f"Agreement target {target} must lie in (0, 1], e.g. 0.99.")
        chosen = thresholds(criterion, low, high)
    except ValueError as exc:
        return message(str(exc), "error"), heat, agreement, empty_figure("Early-exit what-if"), ""
    exits = cached_evaluate(store, sel, chosen)
    if exits.empty:
        return "", heat, agreement, empty_figure("Early-exit what-if", NO_POSITIONS), message(NO_POSITIONS)
    rows = exits[exits["criterion"] == criterion]
    note = sampled(exits)
    columns = {**WHATIF_COLUMNS, **SAMPLE_COLUMNS} if note else WHATIF_COLUMNS
    listed = table(rows, columns, "lens-whatif-table", links=(), formats=WHATIF_FORMATS) if len(rows) else message(
        f"{criterion} cannot be replayed: its input metric was not recorded at every sampled position.")
    return "", heat, agreement, pareto(exits, target), html.Div([recommendation(exits, target), listed, *([message(note)] if note else [])])


def prewarm(store) -> None:
    """Replay the default selection once, so that the first visit to the page finds it cached
    (`create_app` runs it in the background for a read-only store: it reads every lens-sampled
    position, seconds on a large store)."""
    try:
        cached_evaluate(store, queries.Selection(), None)
    except Exception:  # noqa: BLE001 — the page will run the replay itself and report any error
        log.warning("what-if prewarm failed; the lens page will replay on first visit", exc_info=True)


def register(app, store) -> None:
    outputs = [Output("lens-message", "children"), Output("lens-heatmap", "figure"),
               Output("lens-agreement", "figure"), Output("lens-pareto", "figure"), Output("lens-whatif", "children")]
    view_callback(app, store, outputs, ("criterion", "target", "tmin", "tmax"), update)
