"""Building blocks shared by the pages: messages, figures, tables, the position heatmap and the
guard that turns a failing callback into a message in the page.

This module is not a page and runs no SQL; it only shapes already-queried frames for display.
"""

from __future__ import annotations

import functools
import logging
import math
from urllib.parse import parse_qs, quote

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from dash import Input, dcc, html, no_update

from mythos_probe.dashboards import filters, queries
from mythos_probe.dashboards.theme import LAYOUT

log = logging.getLogger("mythos_probe.dashboards")

# Metrics spanning orders of magnitude get a log colour scale in position heatmaps.
LOG_METRICS = frozenset({"rel_residual", "cos_step", "lens_kl_final"})


def message(text: str | None, kind: str = "info") -> html.Div | str:
    return html.Div(text, className=f"mp-message mp-{kind}") if text else ""


def figure(title: str, xlabel: str, ylabel: str, **layout) -> go.Figure:
    """An empty themed figure; `layout` adds to (and for axes, merges into) the base layout."""
    axes = {
        "xaxis": {**LAYOUT["xaxis"], "title": {"text": xlabel}, **layout.pop("xaxis", {})},
        "yaxis": {**LAYOUT["yaxis"], "title": {"text": ylabel}, **layout.pop("yaxis", {})},
    }
    # One constructor call with a plain dict: plotly.py's update_layout is ~10× slower.
    return go.Figure(
        layout={
            **LAYOUT,
            **axes,
            "title": {"text": title, "font": {"size": 15}, "x": 0.02, "xanchor": "left"},
            # uirevision: a live refresh keeps the user's zoom and legend choices on the same chart.
            "uirevision": title,
            **layout,
        }
    )


def hline(y: float, color: str) -> dict:
    """A dashed horizontal reference line across the plot, as a layout shape."""
    return {"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": y, "y1": y, "line": {"dash": "dash", "color": color}}


def empty_figure(title: str, text: str = "No data for this selection") -> go.Figure:
    hidden = {"visible": False}
    note = {"text": text, "showarrow": False, "font": {"size": 14, "color": "#57606a"}}
    return figure(title, "", "", xaxis=hidden, yaxis=hidden, annotations=[note])


def graph(id_: str) -> html.Div:
    return html.Div(dcc.Graph(id=id_, config={"displaylogo": False}), className="mp-card")


def lines(fig: go.Figure, df: pd.DataFrame, x: str, y: str, group: str = "grp", **trace) -> go.Figure:
    """One line per group, named after the group value (the legend shows them)."""
    for name, part in df.groupby(group, sort=True):
        fig.add_trace(go.Scatter(x=part[x], y=part[y], name=str(name), mode="lines+markers", **trace))
    return fig


def bars(fig: go.Figure, df: pd.DataFrame, x: str, y: str, group: str = "grp") -> go.Figure:
    for name, part in df.groupby(group, sort=True):
        fig.add_trace(go.Bar(x=part[x], y=part[y], name=str(name)))
    fig.layout.barmode = "group"
    return fig


def forward_href(trace_id: str) -> str:
    return f"/forward?trace={quote(trace_id)}"


def _cell(value, column: str, links: frozenset[str]):
    if column in links and isinstance(value, str):
        return html.Td(dcc.Link(value, href=forward_href(value), className="mp-mono"))
    if isinstance(value, pd.Timestamp):
        return html.Td(value.strftime("%Y-%m-%d %H:%M:%S"))
    if isinstance(value, (float, np.floating)):
        text = "–" if math.isnan(value) else f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
        return html.Td(text, className="mp-num")
    if isinstance(value, (int, np.integer)):
        return html.Td(f"{value:,}", className="mp-num")
    return html.Td("–" if value is None or value is pd.NA else str(value))


def table(df: pd.DataFrame, columns: dict[str, str], id_: str, links: tuple[str, ...] = ("trace_id",)) -> html.Table:
    """An HTML table of `columns` (name → header); trace ids link to their forward page."""
    link_set = frozenset(links)
    head = html.Thead(html.Tr([html.Th(label) for label in columns.values()]))
    body = html.Tbody(
        [html.Tr([_cell(row[c], c, link_set) for c in columns]) for row in df[list(columns)].to_dict("records")]
    )
    return html.Table([head, body], id=id_, className="mp-table")


def stat(label: str, value: str) -> html.Div:
    return html.Div([html.B(value), html.Span(label)], className="mp-stat")


def position_heatmap(df: pd.DataFrame, metric: str, title: str) -> go.Figure:
    """Position × iteration heatmap of one batch row, token text on the y axis and each position's
    halting step (last iteration used) marked. `df` is `queries.position_grid` output."""
    positions = np.sort(df["position"].unique())
    n_iter = int(df["iteration"].max()) + 1
    raw = np.full((len(positions), n_iter), np.nan)
    row = np.searchsorted(positions, df["position"].to_numpy())
    raw[row, df["iteration"].to_numpy()] = df["value"].to_numpy(dtype=float)
    first = df.drop_duplicates("position").set_index("position").loc[positions]
    labels = [f"{p} {t if isinstance(t, str) else ''}".strip() for p, t in zip(positions, first["token_text"])]
    log_scale = metric in LOG_METRICS
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(raw > 0, np.log10(raw), np.nan) if log_scale else raw
    colorbar = {"title": {"text": f"log10 {metric}" if log_scale else metric}}
    fig = figure(
        title, "iteration", "position · token",
        height=max(340, min(900, 60 + 16 * len(positions))),
        yaxis={"type": "category", "autorange": "reversed"},
        legend={"orientation": "h", "y": 1.02, "x": 1, "xanchor": "right", "yanchor": "bottom"},
    )
    fig.add_trace(
        go.Heatmap(
            z=z,
            x=list(range(n_iter)),
            y=labels,
            customdata=raw,
            colorscale="Viridis",
            colorbar=colorbar,
            hovertemplate="position %{y}<br>iteration %{x}<br>" + metric + " %{customdata:.3g}<extra></extra>",
            name=metric,
        )
    )
    used = first["iterations_used"].to_numpy()
    known = ~pd.isna(used)
    fig.add_trace(
        go.Scatter(
            x=(used[known].astype(int) - 1).tolist(),
            y=[label for label, k in zip(labels, known) if k],
            mode="markers",
            marker={"symbol": "x-thin", "size": 9, "line": {"width": 2, "color": "#ff4d4f"}},
            name="halting step",
        )
    )
    return fig


def guarded(fn, n_outputs: int):
    """Wrap a page callback whose first output is its message area: any error becomes a short
    message there (the traceback goes to the server log only) and the other outputs keep their
    last value."""

    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 — the user sees a message, never a traceback
            log.exception("dashboard callback %s failed", fn.__name__)
            text = f"Could not read the store: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            return (message(text, "error"), *([no_update] * (n_outputs - 1)))

    return wrapper


def trace_from_search(search: str | None) -> str | None:
    """The `trace` query parameter of the page URL, if any."""
    values = parse_qs((search or "").lstrip("?")).get("trace")
    return values[0].strip() if values else None


def view_callback(app, store, outputs: list, page_inputs: list, update) -> None:
    """Register a view's one update callback: filter bar, live tick, URL query and the page's own
    controls in; `update(store, selection, search, *page_values)` returns the outputs, message first."""
    n_filters = len(filters.INPUTS)

    def callback(*values):
        sel = filters.selection(*values[:n_filters])
        search = values[n_filters + 1]
        return update(store, sel, search, *values[n_filters + 2 :])

    callback.__name__ = f"{update.__module__}.{update.__name__}"
    app.callback(outputs, [*filters.INPUTS, Input("app-interval", "n_intervals"), Input("app-url", "search"), *page_inputs])(
        guarded(callback, len(outputs))
    )


def no_data(store) -> html.Div:
    """Why a view is empty: nothing stored yet, or nothing matching the filters."""
    if queries.forward_count(store) == 0:
        return message("The store holds no forwards yet. In live mode they appear here as they arrive.")
    return message("No forwards match the filters.")
