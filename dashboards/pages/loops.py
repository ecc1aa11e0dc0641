"""Loop distribution page (`/loops`): how many loop iterations tokens and forwards used, and how
much compute that saved against running the full `n_loops` budget, split by the chosen grouping.
"""

from __future__ import annotations

from dash import Output, html

from mythos_probe.dashboards import queries
from mythos_probe.dashboards.components import (
    area, bars, empty_figure, figure, forwards_link, graph, no_data, register_chart_links, table, view_callback,
)

PATH = "/loops"
TITLE = "Loop distribution"
SAVED_COLUMNS = {
    "grp": "group", "forwards": "forwards", "tokens": "tokens", "iterations_per_token": "iterations / token",
    "max_per_token": "n_loops per token (mean)", "max_n_loops": "n_loops (largest)", "saved_share": "loop compute saved",
}
SAVED_FORMATS = {"forwards": "integer", "tokens": "integer", "iterations_per_token": "number", "max_per_token": "number",
                 "max_n_loops": "integer", "saved_share": "percent"}


def layout(_state=None) -> html.Div:
    return html.Div(
        [
            html.H2(TITLE),
            html.Div(id="loops-message"),
            html.Div([graph("loops-tokens", "Tokens by the number of loop iterations each used (its own depth)."),
                      graph("loops-forwards", "Forwards by the number of loop iterations they executed (the deepest position).")], className="mp-grid"),
            html.H2("Compute saved relative to the maximum"),
            area("loops-saved"),
        ]
    )


def update(store, sel: queries.Selection, search):
    tokens = queries.tokens_by_iterations_used(store, sel)
    if tokens.empty:
        empty = empty_figure("Iterations used")
        return no_data(store, sel), empty, empty, ""
    per_token = bars(figure("Iterations used per token", "iterations used", "tokens", xaxis={"dtick": 1}), tokens, "used", "tokens")
    per_forward = bars(
        figure("Iterations executed per forward", "iterations executed", "forwards", xaxis={"dtick": 1}),
        queries.forwards_by_iterations(store, sel), "iterations", "forwards",
        links=lambda group, n: forwards_link(search, sel.group, group, imin=int(n), imax=int(n)),
    )
    saved = table(queries.compute_saved(store, sel), SAVED_COLUMNS, "loops-saved-table", links=(), formats=SAVED_FORMATS)
    return "", per_token, per_forward, saved


def register(app, store) -> None:
    register_chart_links(app, "loops-forwards")
    outputs = [Output("loops-message", "children"), Output("loops-tokens", "figure"),
               Output("loops-forwards", "figure"), Output("loops-saved", "children")]
    view_callback(app, store, outputs, (), update)
