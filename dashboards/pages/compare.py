"""Compare page (`/compare`): two forwards or two runs, metric by metric, in one view. A and B
are each a trace id or a run id (a run stands for the means over its forwards the filter bar
keeps); left empty, the two newest runs of the selection (else its two newest forwards). The
chosen per-iteration metrics are overlaid, one panel each, and a table lists every per-forward
column and metric of A and B with B − A and B ÷ A.

It is not the convergence page's side-by-side heatmaps (per position) nor the forward detail.
"""

from __future__ import annotations

import html as html_text

import numpy as np
import pandas as pd
from dash import Output, dcc, html

from mythos_probe.dashboards import queries
from mythos_probe.dashboards.components import (
    ITERATION_AXIS, area, empty_figure, figure, graph, message, metric_options, no_data, shown_iteration, table, view_callback,
)
from mythos_probe.dashboards.theme import LAYOUT
from mythos_probe.dashboards.urlstate import KEYS, control_id

PATH = "/compare"
TITLE = "Compare"
COLUMNS = {"metric": "metric", "a": "A", "b": "B", "diff": "B − A", "ratio": "B ÷ A"}
FORMATS = {"a": "number", "b": "number", "diff": "number", "ratio": "number"}
COLORS = {"A": "#2563eb", "B": "#e11d48"}


def layout(state: dict | None = None) -> html.Div:
    state = state or {}
    return html.Div(
        [
            html.H2(TITLE + " two forwards or two runs"),
            html.Div(id="compare-message"),
            html.Div([
                html.Div([html.Label("A (trace id or run)"), dcc.Input(id=control_id("a"), value=state.get("a"), debounce=True,
                                                                       placeholder="older of the two newest runs")]),
                html.Div([html.Label("B (trace id or run)"), dcc.Input(id=control_id("b"), value=state.get("b"), debounce=True,
                                                                       placeholder="newest run")]),
                html.Div([html.Label("Per-iteration metrics"), dcc.Dropdown(
                    id=control_id("cmp"), options=metric_options("iteration"), multi=True,
                    value=list(state.get("cmp", KEYS["cmp"].default)))], style={"minWidth": "420px"}),
            ], className="mp-controls"),
            graph("compare-iterations", "A (blue) and B (red) per iteration; a run is the mean over its selected forwards."),
            html.H2("Per-forward metrics, A against B"),
            area("compare-table"),
        ]
    )


def _name(side: tuple[str, str]) -> str:
    return f"{'forward' if side[0] == 'forward' else 'run'} {side[1][:12] if side[0] == 'forward' else side[1]}"


def _title(first: tuple[str, str], second: tuple[str, str]) -> str:
    # a run id is the sender's text: escaped here, since `as_text` leaves titles alone
    return html_text.escape(f"A: {_name(first)} · B: {_name(second)}", quote=False)


def sides(store, sel: queries.Selection, a: str | None, b: str | None):
    """(A, B, problems): what each box names, the defaults for empty boxes."""
    problems = []
    default_a, default_b = queries.compare_defaults(store, sel) if not (a and b) else (None, None)
    found = []
    for label, text, default in (("A", a, default_a), ("B", b, default_b)):
        side = queries.resolve(store, text) if text else default
        if text and side is None:
            problems.append(f"{label} {text!r} is neither a stored trace id nor a run id")
        found.append(side)
    return found[0], found[1], problems


def metric_table(first: pd.DataFrame, second: pd.DataFrame) -> pd.DataFrame:
    """One row per per-forward column: A, B, B − A and B ÷ A (NULL where a side has no value)."""
    names = [c for c in first.columns if c != "forwards"]
    a = first.iloc[0][names].astype(float).to_numpy()
    b = second.iloc[0][names].astype(float).to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(a != 0, b / a, np.nan)
    rows = pd.DataFrame({"metric": ["forwards", *names], "a": [float(first["forwards"].iloc[0]), *a],
                         "b": [float(second["forwards"].iloc[0]), *b]})
    rows["diff"] = rows["b"] - rows["a"]
    rows["ratio"] = np.r_[np.nan, ratio]
    return rows[rows["a"].notna() | rows["b"].notna()].reset_index(drop=True)


def _axis(row: int) -> str:
    return "y" if row == 1 else f"y{row}"


def panels(title: str, metrics: tuple[str, ...]) -> dict:
    """A layout of one panel per metric stacked on a shared iteration axis, as a plain dict
    (plotly.py's make_subplots and update_layout cost more than the view's queries)."""
    n, gap = len(metrics), 0.06
    height = (1 - gap * (n - 1)) / n
    layout = figure(title, ITERATION_AXIS, "", height=max(360, 220 * n), margin={**LAYOUT["margin"], "t": 80}).layout.to_plotly_json()
    layout["annotations"] = []
    for row, metric in enumerate(metrics, start=1):
        top = 1 - (row - 1) * (height + gap)
        layout["yaxis" if row == 1 else f"yaxis{row}"] = {**LAYOUT["yaxis"], "domain": [top - height, top], "anchor": "x"}
        layout["annotations"].append({"text": metric, "showarrow": False, "xref": "paper", "yref": "paper", "x": 0.5,
                                      "y": top, "xanchor": "center", "yanchor": "bottom", "font": {"size": 13}})
    layout["xaxis"]["anchor"] = _axis(n)
    return layout


def update(store, sel: queries.Selection, _search, a=None, b=None, metrics=()):
    metrics = tuple(metrics or KEYS["cmp"].default)
    first, second, problems = sides(store, sel, a, b)
    if problems:
        empty = empty_figure("Compare")
        return message("; ".join(problems) + ".", "error"), empty, ""
    if first is None or second is None:
        empty = empty_figure("Compare", "Nothing to compare: the selection holds fewer than two forwards")
        return no_data(store, sel) if queries.matching_count(store, sel) == 0 else message(
            "Give A and B: a trace id or a run id each."), empty, ""
    traces = []
    for label, side in (("A", first), ("B", second)):
        per = queries.compare_iterations(store, sel, side, metrics)
        for row, metric in enumerate(metrics, start=1):
            traces.append({"type": "scatter", "x": shown_iteration(per["iteration"]).to_numpy(), "y": per[metric].to_numpy(),
                           "mode": "lines+markers", "xaxis": "x", "yaxis": _axis(row), "name": f"{label}: {_name(side)}",
                           "legendgroup": label, "showlegend": row == 1, "line": {"color": COLORS[label]}})
    fig = {"data": traces, "layout": panels(_title(first, second), metrics)}
    rows = metric_table(queries.compare_forward_metrics(store, sel, first), queries.compare_forward_metrics(store, sel, second))
    return "", fig, table(rows, COLUMNS, "compare-rows", links=(), formats=FORMATS)


def register(app, store) -> None:
    outputs = [Output("compare-message", "children"), Output("compare-iterations", "figure"), Output("compare-table", "children")]
    view_callback(app, store, outputs, ("a", "b", "cmp"), update)
