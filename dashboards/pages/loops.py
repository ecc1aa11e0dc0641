"""Loop distribution page (`/loops`): how many loop iterations tokens and forwards used, and how
much compute that saved against running the full `n_loops` budget, split by the chosen grouping.
The exit-step distribution per group (Group by: any attribute present, e.g. task or endpoint)
is drawn both in tokens, each bar labelled with its count, and as the share of each group's
tokens, so that groups of different sizes compare; a table gives each group's counts.
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
GROUP_COLUMNS = {"grp": "group", "forwards": "forwards", "tokens": "tokens", "mean_used": "mean exit step",
                 "max_used": "deepest exit step", "deepest_share": "share at the deepest step"}
GROUP_FORMATS = {"forwards": "integer", "tokens": "integer", "mean_used": "number", "max_used": "integer",
                 "deepest_share": "percent"}
SAVED_FORMATS = {"forwards": "integer", "tokens": "integer", "iterations_per_token": "number", "max_per_token": "number",
                 "max_n_loops": "integer", "saved_share": "percent"}


def layout(_state=None) -> html.Div:
    return html.Div(
        [
            html.H2(TITLE),
            html.Div(id="loops-message"),
            html.Div([graph("loops-tokens", "Tokens by the number of loop iterations each used (its own depth, "
                                            "= exit step); each bar is labelled with its count. Group by (filter bar) "
                                            "splits it by any attribute: task, endpoint…"),
                      graph("loops-forwards", "Forwards by the number of loop iterations they executed (the deepest position)."),
                      graph("loops-shares", "Each group's tokens by exit step, as a share of the group's tokens "
                                            "(groups of different sizes side by side); the legend gives each group's "
                                            "token count.")], className="mp-grid"),
            html.H2("Exit steps per group"),
            area("loops-groups"),
            html.H2("Compute saved relative to the maximum"),
            area("loops-saved"),
        ]
    )


def update(store, sel: queries.Selection, search):
    tokens = queries.tokens_by_iterations_used(store, sel)
    if tokens.empty:
        empty = empty_figure("Iterations used")
        return no_data(store, sel), empty, empty, empty, "", ""
    per_token = bars(figure("Iterations used per token", "iterations used", "tokens", xaxis={"dtick": 1}), tokens, "used", "tokens")
    for bar in per_token.data:  # the count on each bar
        bar.update(text=bar.y, textposition="outside", texttemplate="%{text:,}", cliponaxis=False)
    steps = queries.exit_steps(store, sel)
    shares = figure("Exit step per token, share of each group", "exit step (iterations used)", "share of the group's tokens",
                    xaxis={"dtick": 1}, yaxis={"tickformat": ".0%"})
    for name, part in steps.groupby("grp", sort=True):
        n = int(part["group_tokens"].iloc[0])
        shares.add_bar(x=part["used"], y=part["share"], name=f"{name} ({n:,} tokens)", customdata=part[["tokens"]].to_numpy(),
                       hovertemplate="exit step %{x}<br>%{y:.1%} of the group<br>%{customdata[0]:,} tokens<extra></extra>")
    shares.layout.barmode = "group"
    groups = table(queries.exit_step_groups(store, sel), GROUP_COLUMNS, "loops-groups-table", links=(), formats=GROUP_FORMATS)
    per_forward = bars(
        figure("Iterations executed per forward", "iterations executed", "forwards", xaxis={"dtick": 1}),
        queries.forwards_by_iterations(store, sel), "iterations", "forwards",
        links=lambda group, n: forwards_link(search, sel.group, group, imin=int(n), imax=int(n)),
    )
    saved = table(queries.compute_saved(store, sel), SAVED_COLUMNS, "loops-saved-table", links=(), formats=SAVED_FORMATS)
    return "", per_token, per_forward, shares, groups, saved


def register(app, store) -> None:
    register_chart_links(app, "loops-forwards")
    outputs = [Output("loops-message", "children"), Output("loops-tokens", "figure"),
               Output("loops-forwards", "figure"), Output("loops-shares", "figure"), Output("loops-groups", "children"),
               Output("loops-saved", "children")]
    view_callback(app, store, outputs, (), update)
