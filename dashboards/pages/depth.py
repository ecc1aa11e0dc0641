"""Depth profile page (`/depth`): how many positions are still running at each iteration, for
models with per-token depths (ACT, early exit, Mixture-of-Recursions routers), split by the
chosen grouping: active positions summed over the selected forwards, and the share still running,
pooled over tokens and as the mean over forwards (a forward that had stopped counts 0).

It is not the halting page (cumulative halting and the halt-step histogram) nor the loop
distribution (iterations used per token): the same counts, read as the width of the loop.
"""

from __future__ import annotations

from dash import Output, html

from mythos_probe.dashboards import queries
from mythos_probe.dashboards.components import (
    ITERATION_AXIS, about, area, bars, empty_figure, figure, graph, lines, no_data, shown_iteration, table,
    view_callback,
)

PATH = "/depth"
TITLE = "Depth profile"
COLUMNS = {"grp": "group", "iteration": "iteration", "active": "active positions", "pooled_share": "share active (pooled)",
           "mean_share": "share active (mean over forwards)", "forwards": "forwards", "positions": "positions"}
FORMATS = {"iteration": "integer", "active": "integer", "pooled_share": "percent", "mean_share": "percent",
           "forwards": "integer", "positions": "integer"}


def layout(_state=None) -> html.Div:
    return html.Div(
        [
            html.H2(TITLE + " (positions still running at each iteration)"),
            html.Div(id="depth-message"),
            html.Div(
                [graph("depth-active", "Positions whose last iteration is this one or later, summed over the selected "
                                       "forwards, labelled with the count. " + about("iteration", "exit_count")),
                 graph("depth-share", "Share of positions still running: pooled (active ÷ all positions of the group) "
                                      "and the mean over forwards of each forward's share; they differ when forwards "
                                      "differ in size.")],
                className="mp-grid",
            ),
            html.H2("Active positions per iteration"),
            area("depth-table"),
        ]
    )


def update(store, sel: queries.Selection, _search):
    df = queries.depth_profile(store, sel)
    if df.empty:
        empty = empty_figure("Depth profile", "No exit counts: record with a model whose positions have their own depths")
        return no_data(store, sel), empty, empty, ""
    active = bars(figure("Active positions per iteration", ITERATION_AXIS, "positions still running"), df, "iteration", "active")
    for bar in active.data:
        bar.update(text=bar.y, textposition="outside", texttemplate="%{text:,}", cliponaxis=False)
    share = figure("Share of positions still running", ITERATION_AXIS, "share of positions",
                   yaxis={"range": [0, 1.05], "tickformat": ".0%"})
    lines(share, df.assign(grp=df["grp"] + " · pooled"), "iteration", "pooled_share")
    lines(share, df.assign(grp=df["grp"] + " · mean over forwards"), "iteration", "mean_share", line={"dash": "dot"})
    shown = df.assign(iteration=shown_iteration(df["iteration"]))
    return "", active, share, table(shown, COLUMNS, "depth-rows", links=(), formats=FORMATS)


def register(app, store) -> None:
    outputs = [Output("depth-message", "children"), Output("depth-active", "figure"), Output("depth-share", "figure"),
               Output("depth-table", "children")]
    view_callback(app, store, outputs, (), update, single_shape=True)
