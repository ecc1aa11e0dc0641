"""Cost page (`/cost`): loop iterations and estimated FLOPs per group of the chosen grouping
(endpoint, user, model, run …) and over time. FLOPs are the probes' estimate (`flops`), not a
measurement.
"""

from __future__ import annotations

from dash import Output, html

from mythos_probe.dashboards import queries
from mythos_probe.dashboards.components import (
    QUANTITY_AXIS, about, area, bars, empty_figure, figure, forwards_link, graph, lines, no_data, register_chart_links, table,
    view_callback,
)

PATH = "/cost"
TITLE = "Cost"
COLUMNS = {"grp": "group", "forwards": "forwards", "tokens": "tokens", "token_iterations": "token-iterations",
           "flops": "estimated FLOPs", "flops_saved": "loop FLOPs saved (mean share)", "mean_ms": "mean ms"}
FORMATS = {"forwards": "integer", "tokens": "integer", "token_iterations": "number", "flops": "number",
           "flops_saved": "percent", "mean_ms": "number"}


def layout(_state=None) -> html.Div:
    return html.Div(
        [
            html.H2(TITLE + " (pick an attribute such as endpoint or user under “Group by”)"),
            html.Div(id="cost-message"),
            html.Div([graph("cost-flops", about("forward", "flops")),
                      graph("cost-iterations", "Token-iterations: each token counted once per loop iteration it ran."),
                      graph("cost-time", about("forward", "flops"))], className="mp-grid"),
            area("cost-table"),
        ]
    )


def update(store, sel: queries.Selection, search):
    groups = queries.cost_by_group(store, sel)
    if groups.empty:
        empty = empty_figure("Cost")
        return no_data(store, sel), empty, empty, empty, ""
    flops = bars(figure("Estimated FLOPs by group", "group", "FLOPs", yaxis=QUANTITY_AXIS), groups, "grp", "flops",
                 links=lambda group, _x: forwards_link(search, sel.group, group))
    iters = bars(figure("Loop iterations (token-iterations) by group", "group", "token-iterations",
                         yaxis=QUANTITY_AXIS),
                 groups, "grp", "token_iterations")
    over_time = lines(figure("Estimated FLOPs over time", "time (UTC)", "FLOPs per bucket", yaxis=QUANTITY_AXIS),
                      queries.cost_over_time(store, sel), "t", "flops")
    return "", flops, iters, over_time, table(groups, COLUMNS, "cost-rows", links=(), formats=FORMATS)


def register(app, store) -> None:
    register_chart_links(app, "cost-flops")
    register_chart_links(app, "cost-time", time_axis=True)
    outputs = [Output("cost-message", "children"), Output("cost-flops", "figure"),
               Output("cost-iterations", "figure"), Output("cost-time", "figure"), Output("cost-table", "children")]
    view_callback(app, store, outputs, (), update)
