"""Convergence page (`/convergence`): per-position convergence across forwards — a position ×
iteration heatmap of one position metric averaged over the selected forwards (the newest
`PER_GROUP` of them), with each position's mean halting step marked. Compare mode, side by side
on the same axes and the same colour scale: with a grouping chosen (run, model, kind, …) its
first two groups; with a second time range, the selection in the filter bar's time against the
same selection in that range.

It is not the one-forward heatmap (the `forward` page).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from dash import Output, dcc, html

from mythos_probe.dashboards import filters, queries
from mythos_probe.dashboards.components import (
    ITERATION_AXIS, LOG_METRICS, about, caption, empty_figure, figure, graph, message, metric_options, no_data,
    view_callback,
)
from mythos_probe.dashboards.urlstate import control_id

PATH = "/convergence"
TITLE = "Convergence across forwards"
PER_GROUP = 500


def layout(state: dict | None = None) -> html.Div:
    state = state or {}
    metric = state.get("metric", "rel_residual")
    return html.Div(
        [
            html.H2(TITLE + " (group by run, model … or give a second time range to compare two side by side)"),
            html.Div(id="convergence-message"),
            html.Div([html.Div([html.Label("Metric"), dcc.Dropdown(
                id=control_id("metric"), options=metric_options("position"), value=metric, clearable=False)]),
                html.Div([html.Label("Compare with time from (UTC)"), dcc.Input(
                    id=control_id("from2"), value=state.get("from2"), debounce=True, placeholder=filters.TIME_FORMAT)]),
                html.Div([html.Label("to (UTC)"), dcc.Input(
                    id=control_id("to2"), value=state.get("to2"), debounce=True, placeholder=filters.TIME_FORMAT)]),
            ], className="mp-controls"),
            html.Div([graph("convergence-a"), graph("convergence-b")], className="mp-grid"),
        ]
    )


def heatmap(part, metric: str, name: str, zrange: tuple[float, float], positions: int, iterations: int) -> go.Figure:
    grid = np.full((positions, iterations), np.nan)
    grid[part["position"].to_numpy(), part["iteration"].to_numpy()] = part["value"].to_numpy(dtype=float)
    log = metric in LOG_METRICS
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(grid > 0, np.log10(grid), np.nan) if log else grid
    n = int(part["forwards"].max())
    fig = figure(f"{name}: mean {metric} over {n:,} forwards", ITERATION_AXIS, "position",
                 height=420, yaxis={"autorange": "reversed"}, xaxis={"range": [0.5, iterations + 0.5]},
                 legend={"orientation": "h", "y": 1.02, "x": 1, "xanchor": "right", "yanchor": "bottom"})
    fig.add_trace(go.Heatmap(z=z, customdata=grid, x=list(range(1, iterations + 1)), colorscale="Viridis", zmin=zrange[0], zmax=zrange[1], name=metric,
                             colorbar={"title": {"text": f"log10 {metric}" if log else metric}},
                             hovertemplate="position %{y}, iteration %{x}<br>mean " + metric + " %{customdata:.3g}<extra></extra>"))
    used = part.groupby("position")["used"].first()
    fig.add_trace(go.Scatter(x=used.to_numpy(), y=used.index.to_numpy(), mode="markers", showlegend=True,
                             name="mean iterations used by the position",
                             marker={"symbol": "line-ns", "size": 7, "line": {"width": 2, "color": "#ff4d4f"}}))
    return fig


def _label(start, end) -> str:
    return f"{start or 'first'} – {end or 'newest'}"


def means(store, sel: queries.Selection, metric: str, low: str | None, high: str | None) -> pd.DataFrame:
    """Per-group means; with a second range (`low`, `high`), the selection against that range."""
    if not (low or high):
        return queries.position_means(store, sel, metric, PER_GROUP)
    start, end = filters.time_range(low, high, ("Compare from", "Compare to"))
    first = dataclasses.replace(sel, group="none")
    second = dataclasses.replace(first, start=start, end=end, window="all")
    return pd.concat([
        queries.position_means(store, first, metric, PER_GROUP, groups=1).assign(grp="A: " + _label(sel.start, sel.end)),
        queries.position_means(store, second, metric, PER_GROUP, groups=1).assign(grp="B: " + _label(start, end)),
    ], ignore_index=True)


def update(store, sel: queries.Selection, _search, metric, low=None, high=None):
    try:
        df = means(store, sel, metric, low, high)
    except ValueError as exc:
        empty = empty_figure("Convergence")
        return message(str(exc), "error"), empty, empty
    if df.empty or df["value"].isna().all():
        empty = empty_figure("Convergence", "No per-position values: record with detail='positions'")
        return no_data(store, sel) if df.empty else "", empty, empty
    values = df["value"].to_numpy(dtype=float)
    if metric in LOG_METRICS:
        values = np.log10(values[values > 0])
    zrange = (float(np.nanmin(values)), float(np.nanmax(values)))  # one scale for both sides
    positions, iterations = int(df["position"].max()) + 1, int(df["iteration"].max()) + 1
    groups = list(df.groupby("grp", sort=True))
    figs = [heatmap(part, metric, str(name), zrange, positions, iterations) for name, part in groups]
    second = figs[1] if len(figs) > 1 else empty_figure("Compare", "Group by run, model, kind … to compare two")
    return caption(about("position", metric)), figs[0], second


def register(app, store) -> None:
    outputs = [Output("convergence-message", "children"), Output("convergence-a", "figure"),
               Output("convergence-b", "figure")]
    view_callback(app, store, outputs, ("metric", "from2", "to2"), update, single_shape=True)
