"""Coda lens and early exit page (`/lens`): KL to the final distribution per position and
iteration for one forward, top-1 agreement with the final answer by iteration, and the early-exit
what-if (iterations saved versus agreement for a range of thresholds) as a table and Pareto plot.

The what-if itself lives in `whatif.py` so that it can be swapped for `mythos_probe.whatif`.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from dash import Input, Output, dcc, html

from mythos_probe.dashboards import queries, whatif
from mythos_probe.dashboards.components import (
    empty_figure, figure, graph, lines, no_data, position_heatmap, table, trace_from_search, view_callback,
)

PATH = "/lens"
TITLE = "Coda lens & early exit"
WHATIF_COLUMNS = {"threshold": "threshold", "forwards": "forwards", "mean_iterations": "iterations at exit",
                  "saved_share": "iterations saved", "agreement": "top-1 agreement at exit"}


def layout() -> html.Div:
    criteria = [{"label": c, "value": c} for c in whatif.CRITERIA]
    return html.Div(
        [
            html.H2(TITLE),
            html.Div(id="lens-message"),
            html.Div([graph("lens-heatmap"), graph("lens-agreement")], className="mp-grid"),
            html.H2("Early-exit what-if: exit at the first iteration whose criterion falls below the threshold"),
            html.Div([html.Div([html.Label("Criterion"), dcc.Dropdown(
                id="lens-criterion", options=criteria, value=whatif.CRITERIA[0], clearable=False)])],
                className="mp-controls"),
            html.Div([graph("lens-pareto"), html.Div(id="lens-whatif", className="mp-card")], className="mp-grid"),
        ]
    )


def pareto(df) -> go.Figure:
    fig = figure("Iterations saved vs agreement", "share of iterations saved", "top-1 agreement with final")
    fig.add_trace(go.Scatter(x=df["saved_share"], y=df["agreement"], mode="lines+markers+text", name="thresholds",
                             text=[f"{t:.0e}" if float(np.log10(t)).is_integer() else "" for t in df["threshold"]],
                             textposition="top right"))
    return fig


def update(store, sel: queries.Selection, search, criterion):
    per_it = queries.iteration_means(store, sel, ("lens_top1_agree", "lens_kl_final"))
    if per_it.empty:
        empty = empty_figure("Coda lens")
        return no_data(store), empty, empty, empty, ""
    trace_id = trace_from_search(search) or queries.newest_trace(store, sel)
    grid = queries.position_grid(store, trace_id, 0, "lens_kl_final")
    if grid.empty or grid["value"].isna().all():
        heat = empty_figure("KL to final", "No per-position lens values for this forward")
    else:
        heat = position_heatmap(grid, "lens_kl_final", f"KL to final, forward {trace_id[:8]}… (batch row 0)")
    agreement = lines(figure("Top-1 agreement with the final answer", "iteration", "share agreeing"),
                      per_it, "iteration", "lens_top1_agree")
    exits = whatif.early_exit(store, sel, criterion)
    return "", heat, agreement, pareto(exits), table(exits, WHATIF_COLUMNS, "lens-whatif-table", links=())


def register(app, store) -> None:
    outputs = [Output("lens-message", "children"), Output("lens-heatmap", "figure"),
               Output("lens-agreement", "figure"), Output("lens-pareto", "figure"), Output("lens-whatif", "children")]
    view_callback(app, store, outputs, [Input("lens-criterion", "value")], update)
