"""Loop distribution page (`/loops`): how many loop iterations tokens and forwards used, and how
much compute that saved against running the full `n_loops` budget, split by the chosen grouping.
"""

from __future__ import annotations

from dash import Output, html

from mythos_probe.dashboards import queries
from mythos_probe.dashboards.components import bars, empty_figure, figure, graph, no_data, table, view_callback

PATH = "/loops"
TITLE = "Loop distribution"
SAVED_COLUMNS = {
    "grp": "group", "forwards": "forwards", "tokens": "tokens", "iterations_per_token": "iterations / token",
    "max_per_token": "maximum (n_loops)", "saved_share": "loop compute saved",
}


def layout() -> html.Div:
    return html.Div(
        [
            html.H2(TITLE),
            html.Div(id="loops-message"),
            html.Div([graph("loops-tokens"), graph("loops-forwards")], className="mp-grid"),
            html.H2("Compute saved relative to the maximum"),
            html.Div(id="loops-saved"),
        ]
    )


def update(store, sel: queries.Selection, _search):
    tokens = queries.tokens_by_iterations_used(store, sel)
    if tokens.empty:
        empty = empty_figure("Iterations used")
        return no_data(store), empty, empty, ""
    per_token = bars(figure("Iterations used per token", "iterations used", "tokens", xaxis={"dtick": 1}), tokens, "used", "tokens")
    per_forward = bars(
        figure("Iterations executed per forward", "iterations executed", "forwards", xaxis={"dtick": 1}),
        queries.forwards_by_iterations(store, sel), "iterations", "forwards",
    )
    saved = table(queries.compute_saved(store, sel), SAVED_COLUMNS, "loops-saved-table", links=())
    return "", per_token, per_forward, saved


def register(app, store) -> None:
    outputs = [Output("loops-message", "children"), Output("loops-tokens", "figure"),
               Output("loops-forwards", "figure"), Output("loops-saved", "children")]
    view_callback(app, store, outputs, [], update)
