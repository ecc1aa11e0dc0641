"""Runs and forwards page (`/`): totals, one row per run, and the newest forwards with links to
their detail. It shows what was recorded; the per-forward detail is the `forward` page.
"""

from __future__ import annotations

from dash import Output, html

from mythos_probe.dashboards import queries
from mythos_probe.dashboards.components import no_data, stat, table, view_callback

PATH = "/"
TITLE = "Runs & forwards"

RUN_COLUMNS = {
    "run_id": "run", "model_id": "model", "forwards": "forwards", "tokens": "tokens", "mean_ms": "mean ms",
    "p95_ms": "p95 ms", "mean_iterations": "iterations / forward", "iterations_per_token": "iterations / token",
    "first": "first", "last": "last",
}
FORWARD_COLUMNS = {
    "start_time": "start", "trace_id": "trace id", "run_id": "run", "model_id": "model", "step": "step",
    "tokens": "tokens", "duration_ms": "ms", "iterations": "iterations", "n_loops": "n_loops",
    "mean_iterations": "iterations / token", "attributes": "attributes",
}


def layout() -> html.Div:
    return html.Div(
        [
            html.H2(TITLE),
            html.Div(id="forwards-message"),
            html.Div(id="forwards-stats", className="mp-stats"),
            html.H2("Runs"),
            html.Div(id="forwards-runs"),
            html.H2("Newest forwards (open one for its per-position detail)"),
            html.Div(id="forwards-list"),
        ]
    )


def update(store, sel: queries.Selection, _search):
    t = queries.totals(store, sel).iloc[0]
    if t["forwards"] == 0:
        return no_data(store), [], "", ""
    stats = [
        stat("forwards", f"{int(t['forwards']):,}"),
        stat("runs", f"{int(t['runs']):,}"),
        stat("tokens", f"{int(t['tokens']):,}"),
        stat("mean latency", f"{t['mean_ms']:.1f} ms"),
        stat("p95 latency", f"{t['p95_ms']:.1f} ms"),
        stat("iterations / token", f"{t['iterations_per_token']:.2f}"),
    ]
    runs = table(queries.runs(store, sel), RUN_COLUMNS, "forwards-runs-table")
    newest = table(queries.forwards(store, sel), FORWARD_COLUMNS, "forwards-list-table")
    return "", stats, runs, newest


def register(app, store) -> None:
    outputs = [Output("forwards-message", "children"), Output("forwards-stats", "children"),
               Output("forwards-runs", "children"), Output("forwards-list", "children")]
    view_callback(app, store, outputs, [], update)
