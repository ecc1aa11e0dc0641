"""Spectral stability page (`/spectral`): state norm and growth ratio across loop iterations, and
ρ(Ā) and each forward's peak growth over training step (or wall clock) per run, drawn as p10–p90
bands over buckets aggregated in DuckDB (a few hundred points per run at any store size), with
diverged forwards (`diverged_at` ≥ 0) marked as points that open their forward, and listed.

Over time, selecting a range on a chart sets the time filter, and clicking a band point opens the
bucket's forwards.
"""

from __future__ import annotations

from dash import Output, dcc, html

from mythos_probe.dashboards import queries
from mythos_probe.dashboards.components import (
    ITERATION_AXIS, about, area, band, empty_figure, figure, graph, hline, lines, no_data, range_ref, register_chart_links,
    shown_iteration, table, view_callback,
)
from mythos_probe.dashboards.theme import LAYOUT
from mythos_probe.dashboards.urlstate import control_id

PATH = "/spectral"
TITLE = "Spectral stability"
DIVERGENCE_COLUMNS = {"start_time": "start (UTC)", "trace_id": "trace id", "run_id": "run", "step": "step",
                      "diverged_at": "diverged at iteration", "rho_A": "ρ(Ā)"}
TIME_CHARTS = ("spectral-rho", "spectral-peak")
_HOVER = ("run %{fullData.name}<br>%{customdata[1]} forwards<br>p10 %{customdata[2]:.4g} · p50 %{y:.4g}"
          " · p90 %{customdata[3]:.4g}<extra>click: list these forwards</extra>")
_POINT_HOVER = ("diverged forward<br>trace %{customdata[0]}<br>model %{customdata[1]}<br>endpoint %{customdata[2]}"
                "<extra>click: open it</extra>")


def layout(state: dict | None = None) -> html.Div:
    x = (state or {}).get("x", "step")
    return html.Div(
        [
            html.H2(TITLE),
            html.Div(id="spectral-message"),
            html.Div(
                [html.Div([html.Label("Over"), dcc.RadioItems(
                    id=control_id("x"), options=[{"label": "training / decode step", "value": "step"},
                                                 {"label": "time (select a range to zoom)", "value": "time"}],
                    value=x, inline=True)])],
                className="mp-controls",
            ),
            html.Div(
                [graph("spectral-norm", about("iteration", "state_norm")), graph("spectral-growth", about("iteration", "growth_ratio")),
                 graph("spectral-rho", about("forward", "rho_A")), graph("spectral-peak", about("iteration", "growth_ratio"))],
                className="mp-grid",
            ),
            html.H2("Diverged forwards"),
            area("spectral-divergences"),
        ]
    )


def _over(title: str, xlabel: str, ylabel: str, bands, points, stat: str, threshold: float | None) -> dict:
    """The figure as a plain dict: its traces skip plotly.py's validation (see `band`)."""
    shapes = [hline(threshold, "#e11d48")] if threshold is not None else []
    # Hover (and click) takes every run's bucket and any diverged marker at the x under the mouse.
    layout = figure(title, xlabel, ylabel, shapes=shapes, hovermode="x").layout.to_plotly_json()
    traces = []
    if len(points):  # few points (capped), so SVG: it also draws without WebGL
        traces.append({"type": "scatter", "x": points["x"].to_numpy(), "y": points[stat].to_numpy(), "mode": "markers",
                       "name": "diverged", "marker": {"color": "#e11d48", "size": 10, "symbol": "x"},
                       "customdata": points[["trace_id", "model_id", "endpoint"]].to_numpy(),
                       "hovertemplate": _POINT_HOVER})
    colors = LAYOUT["colorway"]
    for k, (run, part) in enumerate(bands.groupby("run_id", sort=True)):
        refs = [range_ref(run, lo, hi) for lo, hi in zip(part["t_lo"], part["t_hi"])]
        custom = list(zip(refs, part["forwards"], part[f"{stat}_p10"], part[f"{stat}_p90"]))
        traces += band(part, str(run), f"{stat}_p10", f"{stat}_p50", f"{stat}_p90", colors[k % len(colors)], custom, _HOVER)
    return {"data": traces, "layout": layout}


def update(store, sel: queries.Selection, _search, x):
    per_it = queries.iteration_means(store, sel, ("state_norm", "growth_ratio"))
    if per_it.empty:
        empty = empty_figure("Spectral stability")
        return no_data(store, sel), empty, empty, empty, empty, ""
    norm = lines(figure("State norm across iterations", ITERATION_AXIS, "mean ‖h_t‖"), per_it, "iteration", "state_norm")
    growth = lines(figure("Growth ratio across iterations", ITERATION_AXIS, "‖h_t‖ / ‖h_{t−1}‖", shapes=[hline(1.0, "#888")]),
                   per_it, "iteration", "growth_ratio")
    bands = queries.spectral_bands(store, sel, x)
    if x == "time":
        bands["x"] = bands["x"].astype("datetime64[us]")
    points = queries.diverged_points(store, sel, x)
    xlabel = "step" if x == "step" else "time (UTC)"
    rho = _over("ρ(Ā) per run (p10–p90 band, median line)", xlabel, "ρ(Ā)", bands, points, "rho", 1.0)
    peak = _over("Peak growth ratio per run (p10–p90 band, median line)", xlabel, "max over iterations ‖h_t‖ / ‖h_{t−1}‖",
                 bands, points, "growth", None)
    diverged = queries.divergences(store, sel)
    diverged["diverged_at"] = shown_iteration(diverged["diverged_at"])
    listing = table(diverged, DIVERGENCE_COLUMNS, "spectral-divergences-table",
                    formats={"rho_A": "number"}) if len(diverged) else "No diverged forwards."
    return "", norm, growth, rho, peak, listing


def register(app, store) -> None:
    outputs = [Output("spectral-message", "children"), Output("spectral-norm", "figure"),
               Output("spectral-growth", "figure"), Output("spectral-rho", "figure"),
               Output("spectral-peak", "figure"), Output("spectral-divergences", "children")]
    view_callback(app, store, outputs, ("x",), update, single_shape=True)
    for graph_id in TIME_CHARTS:
        register_chart_links(app, graph_id, time_axis=True)
