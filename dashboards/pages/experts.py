"""Experts page (`/experts`): how routing spreads tokens over experts at each loop iteration
(expert × iteration load share), MaxVio and routing entropy per iteration, and how much the top-k
choice changes between successive iterations.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from dash import Output, html

from mythos_probe.dashboards import queries
from mythos_probe.dashboards.components import (
    ITERATION_AXIS, about, empty_figure, figure, graph, lines, message, no_data, shown_iteration, view_callback,
)

PATH = "/experts"
TITLE = "Experts"


def layout(_state=None) -> html.Div:
    return html.Div(
        [
            html.H2(TITLE),
            html.Div(id="experts-message"),
            html.Div(
                [graph("experts-load", "Tokens routed to each expert at each iteration, as a share of the iteration's routed tokens, over 1/E."),
                 graph("experts-maxvio", about("iteration", "expert_max_vio")),
                 graph("experts-entropy", about("iteration", "routing_entropy")),
                 graph("experts-overlap", about("iteration", "topk_overlap"))],
                className="mp-grid",
            ),
        ]
    )


def update(store, sel: queries.Selection, _search):
    per_it = queries.iteration_means(store, sel, ("expert_max_vio", "routing_entropy", "topk_overlap"))
    if per_it.empty:
        empty = empty_figure("Experts")
        return no_data(store, sel), empty, empty, empty, empty
    load = queries.expert_load(store, sel)
    if load.empty:
        heat = empty_figure("Expert load", "No expert loads recorded for this selection")
        note = message("These forwards carry no expert loads (a dense model, or routing probes off).")
    else:
        grid = load.pivot(index="expert", columns="iteration", values="share")  # already aggregated in SQL
        # Relative to the balanced share 1/E on a fixed scale centred on 1: a balanced router is
        # a flat white map, not a checkerboard stretched over the data's own min–max.
        relative = grid.to_numpy() * len(grid.index)
        heat = figure("Expert load relative to the balanced share 1/E", ITERATION_AXIS, "expert")
        heat.add_trace(go.Heatmap(z=relative, x=shown_iteration(grid.columns.to_numpy()).tolist(), y=grid.index.tolist(), customdata=grid.to_numpy(),
                                  colorscale="RdBu_r", zmin=0, zmax=max(2.0, float(np.nanmax(relative))), zmid=1,
                                  colorbar={"title": {"text": "load × E"}}, name="load relative to 1/E",
                                  hovertemplate="expert %{y}, iteration %{x}<br>load × E %{z:.3f}"
                                                "<br>share %{customdata:.2%}<extra></extra>"))
        note = ""
    maxvio = lines(figure("MaxVio per iteration", ITERATION_AXIS, "max load / mean − 1"), per_it, "iteration", "expert_max_vio")
    entropy = lines(figure("Routing entropy per iteration", ITERATION_AXIS, "entropy (nats)"), per_it, "iteration", "routing_entropy")
    overlap = lines(figure("Top-k overlap with the previous iteration", ITERATION_AXIS, "|topk_t ∩ topk_{t−1}| / k"),
                    per_it, "iteration", "topk_overlap")
    return note, heat, maxvio, entropy, overlap


def register(app, store) -> None:
    outputs = [Output("experts-message", "children"), Output("experts-load", "figure"),
               Output("experts-maxvio", "figure"), Output("experts-entropy", "figure"),
               Output("experts-overlap", "figure")]
    view_callback(app, store, outputs, (), update, single_shape=True)
