"""Spectral stability page (`/spectral`): state norm and growth ratio across loop iterations, and
ρ(Ā), peak norm and peak growth over training step (or wall clock) per run, with diverged forwards
(`diverged_at` ≥ 0) marked in red and listed.
"""

from __future__ import annotations

import plotly.graph_objects as go
from dash import Input, Output, dcc, html

from mythos_probe.dashboards import queries
from mythos_probe.dashboards.components import empty_figure, figure, graph, hline, lines, no_data, table, view_callback

PATH = "/spectral"
TITLE = "Spectral stability"
DIVERGENCE_COLUMNS = {"start_time": "start", "trace_id": "trace id", "run_id": "run", "step": "step",
                      "diverged_at": "diverged at iteration", "rho_A": "ρ(Ā)"}


def layout() -> html.Div:
    return html.Div(
        [
            html.H2(TITLE),
            html.Div(id="spectral-message"),
            html.Div(
                [html.Div([html.Label("Over"), dcc.RadioItems(
                    id="spectral-x", options=[{"label": "training / decode step", "value": "step"},
                                              {"label": "time", "value": "time"}], value="step", inline=True)])],
                className="mp-controls",
            ),
            html.Div(
                [graph("spectral-norm"), graph("spectral-growth"), graph("spectral-rho"), graph("spectral-peak")],
                className="mp-grid",
            ),
            html.H2("Diverged forwards"),
            html.Div(id="spectral-divergences"),
        ]
    )


def _mark_divergences(fig: go.Figure, df, y: str) -> None:
    bad = df[df["diverged"] > 0]
    fig.add_trace(go.Scatter(x=bad["x"], y=bad[y], mode="markers", name="diverged",
                             marker={"color": "#e11d48", "size": 11, "symbol": "x"}))


def update(store, sel: queries.Selection, _search, x):
    per_it = queries.iteration_means(store, sel, ("state_norm", "growth_ratio"))
    if per_it.empty:
        empty = empty_figure("Spectral stability")
        return no_data(store), empty, empty, empty, empty, ""
    norm = lines(figure("State norm across iterations", "iteration", "mean ‖h_t‖"), per_it, "iteration", "state_norm")
    growth = lines(figure("Growth ratio across iterations", "iteration", "‖h_t‖ / ‖h_{t−1}‖", shapes=[hline(1.0, "#888")]),
                   per_it, "iteration", "growth_ratio")
    steps = queries.spectral_over_steps(store, sel, x)
    xlabel = "step" if x == "step" else "time (UTC)"
    rho = lines(figure("ρ(Ā) per run", xlabel, "ρ(Ā)", shapes=[hline(1.0, "#e11d48")]), steps, "x", "rho_A", group="run_id")
    _mark_divergences(rho, steps, "rho_A")
    peak = lines(figure("Peak growth ratio per run", xlabel, "max ‖h_t‖ / ‖h_{t−1}‖"), steps, "x", "growth_ratio", group="run_id")
    _mark_divergences(peak, steps, "growth_ratio")
    diverged = queries.divergences(store, sel)
    listing = table(diverged, DIVERGENCE_COLUMNS, "spectral-divergences-table") if len(diverged) else "No diverged forwards."
    return "", norm, growth, rho, peak, listing


def register(app, store) -> None:
    outputs = [Output("spectral-message", "children"), Output("spectral-norm", "figure"),
               Output("spectral-growth", "figure"), Output("spectral-rho", "figure"),
               Output("spectral-peak", "figure"), Output("spectral-divergences", "children")]
    view_callback(app, store, outputs, [Input("spectral-x", "value")], update)
