"""Latent trajectories page (`/trajectories?trace=…`): Huginn's per-token view of the loop. For one
forward and batch row, each position's states h_0 … h_{I−1} projected on that position's own first
principal directions (the trajectory probe, `mythos_probe.metrics.trajectory`), drawn as paths:
tokens that settle on a fixed point (★), orbit, or slide. Beside it, the first direction against
the iteration. Without a trace id it shows the newest selected forward recorded with the probe.

It is not the probe (which computes the projections on the device) nor the notebook figure
(`rec.plot.trajectories`, from a trace in memory); it reads the stored position rows.
"""

from __future__ import annotations

import numpy as np
from dash import Input, Output, dcc, html

from mythos_probe.dashboards import queries
from mythos_probe.dashboards.components import (
    ITERATION_AXIS, about, area, empty_figure, figure, graph, message, no_data, stat, trace_from_search, view_callback,
)

PATH = "/trajectories"
TITLE = "Latent trajectories"
PAIRS = {"1-2": (1, 2), "1-3": (1, 3), "2-3": (2, 3)}
MAX_POSITIONS = 64  # paths drawn at most: beyond that a plot is a tangle (the first 64 are shown, and said so)
NOT_RECORDED = ("This forward was recorded without the trajectory probe. Record with attach(model, "
                "probes=[*DEFAULT_PROBES, 'trajectory'], detail='positions').")


def layout(state: dict | None = None) -> html.Div:
    return html.Div(
        [
            html.H2("Latent trajectories: each token's states over the loop, on its own principal directions"),
            html.Div(id="traj-message"),
            area("traj-summary", className="mp-stats"),
            html.Div(
                [
                    html.Div([html.Label("Batch row"), dcc.Dropdown(id="traj-batch", options=[0], value=0, clearable=False)]),
                    html.Div([html.Label("Directions"), dcc.Dropdown(
                        id="traj-pair", options=[{"label": f"PC{a} × PC{b}", "value": k} for k, (a, b) in PAIRS.items()],
                        value="1-2", clearable=False)]),
                ],
                className="mp-controls",
            ),
            html.Div([graph("traj-paths", about("position", "traj_pc1", "traj_fixed")),
                      graph("traj-over-iterations", about("position", "traj_pc1_share"))], className="mp-grid"),
        ]
    )


def _label(position: int, text) -> str:
    return f"{position}: {text!r}" if isinstance(text, str) else str(position)


def figures(df, pair: tuple[int, int], title_note: str) -> tuple[dict, dict]:
    """(paths on the two directions, first direction against the iteration) from `queries.trajectories`
    rows, as figure dicts: a path per position, and one trace each for all starts and all fixed points
    (plotly.py validates every trace it builds, ~5 ms each: 64 positions would take a second)."""
    a, b = pair
    paths = {"data": [], "layout": figure(f"Paths on PC{a} × PC{b}{title_note}: ○ t=0, ★ fixed point",
                                          f"PC{a} of the position's own states (projection)",
                                          f"PC{b} (projection)", showlegend=False).layout.to_plotly_json()}
    # No legend: 64 entries took half of the page's click → drawn time in Chromium (2.4 s against
    # 1.2 s, benchmarks/bench_trajectories_browser.py); a path's hover names its token and shares.
    over = {"data": [], "layout": figure(f"PC1 over iterations{title_note}", ITERATION_AXIS, "PC1 (projection)",
                                         showlegend=False).layout.to_plotly_json()}
    starts: dict[str, list] = {"x": [], "y": [], "text": []}
    stars: dict[str, list] = {"x": [], "y": [], "text": [], "t": [], "pc1": []}
    for position, rows in df.groupby("position", sort=True):
        label = _label(int(position), rows["token_text"].iloc[0])
        shares = [rows[f"traj_pc{c}_share"].iloc[0] for c in (a, b)]
        share = " + ".join(f"{s:.0%}" if np.isfinite(s) else "–" for s in shares)
        x, y = rows[f"traj_pc{a}"].to_numpy().tolist(), rows[f"traj_pc{b}"].to_numpy().tolist()
        t, pc1 = rows["iteration"].to_numpy().tolist(), rows["traj_pc1"].to_numpy().tolist()
        paths["data"].append({"type": "scatter", "x": x, "y": y, "mode": "lines+markers", "name": f"{label} ({share})",
                              "legendgroup": str(position), "customdata": t,
                              "hovertemplate": "t=%{customdata}<br>%{x:.3g}, %{y:.3g}"})
        over["data"].append({"type": "scatter", "x": t, "y": pc1, "mode": "lines+markers", "name": label,
                             "legendgroup": str(position)})
        starts["x"].append(x[0]), starts["y"].append(y[0]), starts["text"].append(label)
        fixed = np.flatnonzero(rows["traj_fixed"].to_numpy() > 0)
        if fixed.size:
            at = int(fixed[0])
            for key, value in (("x", x[at]), ("y", y[at]), ("text", label), ("t", t[at]), ("pc1", pc1[at])):
                stars[key].append(value)
    star = {"symbol": "star", "size": 14, "color": "gold", "line": {"width": 1, "color": "#24292f"}}
    paths["data"].append({"type": "scatter", "mode": "markers", "name": "t=0", "x": starts["x"], "y": starts["y"],
                          "text": starts["text"], "hovertemplate": "%{text}: t=0<extra></extra>",
                          "marker": {"symbol": "circle-open", "size": 11, "color": "#24292f"}})
    if stars["x"]:
        hover = "%{text}: fixed point from t=%{customdata}<extra></extra>"
        paths["data"].append({"type": "scatter", "mode": "markers", "name": "fixed point", "x": stars["x"],
                              "y": stars["y"], "text": stars["text"], "customdata": stars["t"], "marker": star,
                              "hovertemplate": hover})
        over["data"].append({"type": "scatter", "mode": "markers", "name": "fixed point", "x": stars["t"],
                             "y": stars["pc1"], "text": stars["text"], "customdata": stars["t"], "marker": star,
                             "hovertemplate": hover})
    return paths, over


def update(store, sel: queries.Selection, search, batch_index=0, pair="1-2"):
    asked = trace_from_search(search)
    empty = empty_figure("Latent trajectories", "")
    trace_id = asked or queries.newest_trajectory_trace(store, sel)
    if trace_id is None:
        note = no_data(store, sel) if queries.matching_count(store, sel) == 0 else message(
            "No selected forward was recorded with the trajectory probe. " + NOT_RECORDED.split(". ", 1)[1])
        return note, [], [0], empty, empty
    row = queries.forward(store, trace_id)
    if row.empty:
        return message(f"No forward with trace id {trace_id!r} in this store.", "error"), [], [0], empty, empty
    row = row.iloc[0]
    batches = list(range(int(row["batch"])))
    notes = [] if asked else [message("Showing the newest forward recorded with the trajectory probe.")]
    if batch_index not in batches:
        notes.append(message(f"This forward has batch rows 0–{batches[-1]}; showing row 0.", "error"))
        batch_index = 0
    df = queries.trajectories(store, trace_id, batch_index)
    summary = [stat("trace id", trace_id), stat("iterations", str(row["iterations"])),
               stat("batch × seq", f"{row['batch']} × {row['seq_len']}")]
    if df.empty:
        return html.Div([*notes, message(NOT_RECORDED, "error")]), summary, batches, empty, empty
    positions = df["position"].unique()
    if len(positions) > MAX_POSITIONS:
        notes.append(message(f"Showing the first {MAX_POSITIONS} of {len(positions)} positions."))
        df = df[df["position"].isin(positions[:MAX_POSITIONS])]
    settled = df.groupby("position")["traj_fixed"].max()
    summary.append(stat("positions on a fixed point", f"{int((settled > 0).sum())} of {len(settled)}"))
    paths, over = figures(df, PAIRS.get(pair, (1, 2)), f" (batch row {batch_index})")
    return html.Div(notes), summary, batches, paths, over


def register(app, store) -> None:
    outputs = [Output("traj-message", "children"), Output("traj-summary", "children"), Output("traj-batch", "options"),
               Output("traj-paths", "figure"), Output("traj-over-iterations", "figure")]
    view_callback(app, store, outputs, (), update, states=(Input("traj-batch", "value"), Input("traj-pair", "value")))
