"""Halting page (`/halting`): when positions stop looping. Cumulative halting curves, the halted
fraction by iteration, the halt-step histogram and ACT saturation (probabilities pinned near 0 or
1, positions halting at once or never), split by the chosen grouping.
"""

from __future__ import annotations

from dash import Output, html

from mythos_probe.dashboards import queries
from mythos_probe.dashboards.components import (
    ITERATION_AXIS, about, area, bars, empty_figure, figure, graph, lines, no_data, table, view_callback,
)

PATH = "/halting"
TITLE = "Halting"
SATURATION_FORMATS = {"halted_first_share": "percent", "reached_last_share": "percent", "remainder_mass": "number",
                      "ponder_cost": "number"}
SATURATION_COLUMNS = {
    "grp": "group", "halted_first_share": "halted at first iteration", "reached_last_share": "reached last iteration",
    "remainder_mass": "ACT remainder", "ponder_cost": "ponder cost",
}


def layout(_state=None) -> html.Div:
    return html.Div(
        [
            html.H2(TITLE),
            html.Div(id="halting-message"),
            html.Div(
                [graph("halting-cumulative", about("iteration", "exit_count")),
                 graph("halting-fraction", about("iteration", "halted_fraction")),
                 graph("halting-steps", about("iteration", "exit_count")),
                 graph("halting-saturation", about("iteration", "halt_low_share", "halt_high_share"))],
                className="mp-grid",
            ),
            html.H2("Saturation per forward"),
            area("halting-saturation-table"),
        ]
    )


def update(store, sel: queries.Selection, _search):
    df = queries.halting_by_iteration(store, sel)
    if df.empty:
        empty = empty_figure("Halting")
        return no_data(store, sel), empty, empty, empty, empty, ""
    cumulative = lines(figure("Cumulative share of tokens halted", ITERATION_AXIS, "share halted"), df, "iteration", "cumulative_halted")
    # Each point: of a forward's positions, the share that had stopped by the end of that
    # iteration, averaged over forwards. It rises to 1 at the last iteration by construction.
    fraction = lines(figure("Share of positions done by each iteration (mean over forwards)", ITERATION_AXIS,
                            "share of positions done", yaxis={"range": [0, 1.02]}), df, "iteration", "halted_fraction")
    steps = bars(figure("Halt-step histogram", "last iteration run (= iterations used)", "tokens"), df, "iteration", "exits")
    low = df.assign(grp=df["grp"] + " · p<0.01")
    high = df.assign(grp=df["grp"] + " · p>0.99")
    saturation = figure("Halting-probability saturation", ITERATION_AXIS, "share of positions")
    lines(saturation, low, "iteration", "halt_low_share", line={"dash": "dot"})
    lines(saturation, high, "iteration", "halt_high_share")
    sat_table = table(queries.saturation(store, sel), SATURATION_COLUMNS, "halting-saturation-rows", links=(), formats=SATURATION_FORMATS)
    return "", cumulative, fraction, steps, saturation, sat_table


def register(app, store) -> None:
    outputs = [Output("halting-message", "children"), Output("halting-cumulative", "figure"),
               Output("halting-fraction", "figure"), Output("halting-steps", "figure"),
               Output("halting-saturation", "figure"), Output("halting-saturation-table", "children")]
    view_callback(app, store, outputs, (), update, single_shape=True)
