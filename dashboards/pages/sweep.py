"""Loop sweep page (`/sweep`): accuracy, or agreement with full depth, against the number of
loops, from stored sweeps (`mythos_probe.sweep(model, inputs, loops=…, on_trace=[store_sink(path)])`),
showing where extra loops hurt (the "overthinking" drop of Loop, Think & Generalize).

How a sweep is stored: one forward per loop count, tagged `sweep` (one id per call) and
`sweep_loops`, with `sweep_correct` / `sweep_positions` where the sweep had targets, recorded as
`shadow` forwards (so the page reads every forward kind). Agreement is computed in SQL
(`queries.sweep_curves`): each position's lens argmax at its last iteration against the same
batch row and position of the sweep's deepest forward. The newest `SWEEPS` sweeps are drawn.
"""

from __future__ import annotations

import numpy as np
from dash import Output, html

from mythos_probe.dashboards import queries
from mythos_probe.dashboards.components import area, empty_figure, figure, graph, message, no_data, table, view_callback

PATH = "/sweep"
TITLE = "Loop sweep"
SWEEPS = 12
COLUMNS = {"sweep": "sweep", "model_id": "model", "loops": "loops", "positions": "positions compared",
           "agreement": "agreement with deepest", "accuracy": "accuracy", "drop": "below the best by", "best": "best"}
FORMATS = {"loops": "integer", "positions": "integer", "agreement": "percent", "accuracy": "percent", "drop": "percent"}


def layout(_state=None) -> html.Div:
    return html.Div(
        [
            html.H2(TITLE + " (accuracy or agreement against the number of loops)"),
            html.Div(id="sweep-message"),
            html.Div(
                [graph("sweep-score", "Per sweep: accuracy against the targets where the sweep had them, else "
                                      "agreement with its deepest forward. ★ marks the best loop count; red ✕, loop "
                                      "counts past the best that score lower: there extra loops hurt."),
                 graph("sweep-agreement", "Share of positions whose final prediction equals that of the sweep's "
                                          "deepest forward (same batch row and position), computed in the store.")],
                className="mp-grid",
            ),
            html.H2("Per sweep and loop count"),
            area("sweep-table"),
        ]
    )


def overthinking(df):
    """`df` (`queries.sweep_curves`) with `score` (accuracy, else agreement), `drop` (best score
    of the sweep − score) and `hurts` (a loop count past the sweep's first best that scores lower)."""
    df = df.copy()
    df["score"] = df["accuracy"].astype(float).where(df["accuracy"].notna(), df["agreement"].astype(float))
    best = df.groupby("sweep")["score"].transform("max")
    df["drop"] = best - df["score"]
    first_best = df[df["best"]].groupby("sweep")["loops"].min()
    df["hurts"] = (df["loops"] > df["sweep"].map(first_best)) & (df["drop"] > 0)
    return df


def update(store, sel: queries.Selection, _search):
    df = queries.sweep_curves(store, sel, SWEEPS)
    if df.empty:
        empty = empty_figure("Loop sweep", "No stored sweep: run mythos_probe.sweep(model, inputs, on_trace=[store_sink(path)])")
        note = no_data(store, sel) if queries.matching_count(store, sel) == 0 else message(
            "No loop sweep among the selected forwards: record one with "
            "mythos_probe.sweep(model, inputs, loops=range(1, 17), on_trace=[store_sink(path)]).")
        return note, empty, empty, ""
    df = overthinking(df)
    has_accuracy = df["accuracy"].notna().any()
    score = figure("Accuracy against loops" if has_accuracy else "Agreement with full depth against loops",
                   "loops (fixed depth)", "accuracy" if has_accuracy else "agreement with the deepest forward",
                   xaxis={"dtick": 1}, yaxis={"tickformat": ".0%"})
    agreement = figure("Agreement with the sweep's deepest forward", "loops (fixed depth)", "share of positions",
                       xaxis={"dtick": 1}, yaxis={"tickformat": ".0%"})
    for name, part in df.groupby("sweep", sort=False):
        label = f"{name} · {part['model_id'].iloc[0]}"
        custom = np.stack([part["positions"], part["drop"]], axis=-1)
        score.add_scatter(x=part["loops"], y=part["score"], name=label, mode="lines+markers", legendgroup=label,
                          customdata=custom, hovertemplate="%{x} loops: %{y:.1%}<br>%{customdata[0]:,} positions"
                                                           "<br>below the best by %{customdata[1]:.1%}<extra></extra>")
        best = part[part["best"]]
        score.add_scatter(x=best["loops"], y=best["score"], mode="markers", name=f"{label} · best", legendgroup=label,
                          showlegend=False, marker={"symbol": "star", "size": 13, "color": "#f59e0b"})
        hurts = part[part["hurts"]]
        if len(hurts):
            score.add_scatter(x=hurts["loops"], y=hurts["score"], mode="markers", name=f"{label} · extra loops hurt",
                              legendgroup=label, marker={"symbol": "x", "size": 10, "color": "#e11d48"})
        agreement.add_scatter(x=part["loops"], y=part["agreement"], name=label, mode="lines+markers")
    return "", score, agreement, table(df, COLUMNS, "sweep-rows", links=(), formats=FORMATS)


def register(app, store) -> None:
    outputs = [Output("sweep-message", "children"), Output("sweep-score", "figure"), Output("sweep-agreement", "figure"),
               Output("sweep-table", "children")]
    view_callback(app, store, outputs, (), update)
