"""Experts page (`/experts`): how routing spreads tokens over experts at each loop iteration
(expert × iteration load share), MaxVio and routing entropy per iteration, and how much the top-k
choice changes between successive iterations.
"""

from __future__ import annotations

import plotly.graph_objects as go
from dash import Output, html

from mythos_probe.dashboards import queries
from mythos_probe.dashboards.components import empty_figure, figure, graph, lines, message, no_data, view_callback

PATH = "/experts"
TITLE = "Experts"


def layout() -> html.Div:
    return html.Div(
        [
            html.H2(TITLE),
            html.Div(id="experts-message"),
            html.Div(
                [graph("experts-load"), graph("experts-maxvio"), graph("experts-entropy"), graph("experts-overlap")],
                className="mp-grid",
            ),
        ]
    )


def update(store, sel: queries.Selection, _search):
    per_it = queries.iteration_means(store, sel, ("expert_max_vio", "routing_entropy", "topk_overlap"))
    if per_it.empty:
        empty = empty_figure("Experts")
        return no_data(store), empty, empty, empty, empty
    load = queries.expert_load(store, sel)
    if load.empty:
        heat = empty_figure("Expert load", "No expert loads recorded for this selection")
        note = message("These forwards carry no expert loads (a dense model, or routing probes off).")
    else:
        grid = load.pivot(index="expert", columns="iteration", values="share")  # already aggregated in SQL
        heat = figure("Share of routed tokens per expert", "iteration", "expert")
        heat.add_trace(go.Heatmap(z=grid.to_numpy(), x=grid.columns.tolist(), y=grid.index.tolist(),
                                  colorscale="Blues", colorbar={"title": {"text": "share"}}, name="load share"))
        note = ""
    maxvio = lines(figure("MaxVio per iteration", "iteration", "max load / mean − 1"), per_it, "iteration", "expert_max_vio")
    entropy = lines(figure("Routing entropy per iteration", "iteration", "entropy (nats)"), per_it, "iteration", "routing_entropy")
    overlap = lines(figure("Top-k overlap with the previous iteration", "iteration", "|topk_t ∩ topk_{t−1}| / k"),
                    per_it, "iteration", "topk_overlap")
    return note, heat, maxvio, entropy, overlap


def register(app, store) -> None:
    outputs = [Output("experts-message", "children"), Output("experts-load", "figure"),
               Output("experts-maxvio", "figure"), Output("experts-entropy", "figure"),
               Output("experts-overlap", "figure")]
    view_callback(app, store, outputs, [], update)
