"""Forward detail page (`/forward?trace=…`): one forward's identity and budget, and its
per-position convergence heatmap (position × iteration, token text on the axis, each position's
halting step marked). Without a trace id it shows the newest forward matching the filters.

It is not the aggregate views; those live on the other pages.
"""

from __future__ import annotations

import json

from dash import Output, dcc, html

from mythos_probe.dashboards import queries
from mythos_probe.dashboards.components import (
    ITERATION_AXIS, about, area, caption, empty_figure, figure, graph, lines, message, metric_options, no_data, position_heatmap, stat, trace_from_search,
    shown_iteration, view_callback, who,
)
from mythos_probe.dashboards.urlstate import control_id

PATH = "/forward"
TITLE = "Forward detail"
LINE_METRICS = ("rel_residual", "halted_fraction", "lens_top1_agree")


def layout(state: dict | None = None) -> html.Div:
    state = state or {"metric": "rel_residual", "batch": 0}
    metrics = metric_options("position")
    return html.Div(
        [
            html.H2("Forward detail: per-position convergence"),
            html.Div(id="forward-message"),
            area("forward-summary", className="mp-stats"),
            html.Div(
                [
                    html.Div([html.Label("Metric"), dcc.Dropdown(id=control_id("metric"), options=metrics, value=state["metric"], clearable=False)]),
                    html.Div([html.Label("Batch row"), dcc.Dropdown(id=control_id("batch"), options=[state["batch"]], value=state["batch"], clearable=False)]),
                ],
                className="mp-controls",
            ),
            html.Div([graph("forward-heatmap"), graph("forward-iterations")], className="mp-grid"),
        ]
    )


def summary(row) -> list:
    attributes = json.loads(row["attributes_text"] or "{}")
    items = [
        ("trace id", row["trace_id"]),
        ("run · model", f"{row['run_id']} · {row['model_id']}"),
        ("step", str(row["step"])),
        ("start (UTC)", row["start_time"].strftime("%Y-%m-%d %H:%M:%S")),
        ("duration", f"{row['duration_ms']:.1f} ms"),
        ("batch × seq", f"{row['batch']} × {row['seq_len']}"),
        ("iterations / n_loops", f"{row['iterations']} / {row['n_loops']} ({row['exit_policy']})"),
        ("iterations / token", f"{row['mean_iterations']:.2f}"),
    ]
    if row["diverged_at"] >= 0:
        items.append(("diverged at iteration", str(int(shown_iteration(row["diverged_at"])))))
    items += [(k, str(v)) for k, v in attributes.items()]
    return [stat(label, value) for label, value in items]


def update(store, sel: queries.Selection, search, metric, batch_index):
    asked = trace_from_search(search)
    trace_id = asked or queries.newest_trace(store, sel)
    if trace_id is None:
        empty = empty_figure("Per-position convergence", "")
        return no_data(store, sel), [], [0], empty, empty
    row = queries.forward(store, trace_id)
    if row.empty:
        empty = empty_figure("Per-position convergence", "")
        text = f"No forward with trace id {trace_id!r} in this store."
        return message(text, "error"), [], [0], empty, empty
    row = row.iloc[0]
    note = "" if asked else message("Showing the newest forward; open another from the Runs & forwards page.")
    batches = list(range(int(row["batch"])))
    if batch_index not in batches:
        note = message(f"This forward has batch rows 0–{batches[-1]}; showing row 0.", "error")
        batch_index = 0
    grid = queries.position_grid(store, trace_id, batch_index, metric)
    if grid.empty:
        heat = empty_figure("Per-position convergence", "This forward was recorded without per-position detail")
    else:
        heat = position_heatmap(grid, metric, f"{metric} by position and iteration (batch row {batch_index})", who(row))
    per_it = queries.forward_iterations(store, trace_id, LINE_METRICS).melt("iteration", var_name="grp")
    its = lines(figure("Per-iteration summary", ITERATION_AXIS, "value"), per_it, "iteration", "value")
    return html.Div([note, caption(about("position", metric))]), summary(row), batches, heat, its


def register(app, store) -> None:
    outputs = [Output("forward-message", "children"), Output("forward-summary", "children"),
               Output(control_id("batch"), "options"),
               Output("forward-heatmap", "figure"), Output("forward-iterations", "figure")]
    view_callback(app, store, outputs, ("metric", "batch"), update)
