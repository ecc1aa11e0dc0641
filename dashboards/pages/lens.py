"""Coda lens and early exit page (`/lens`): KL to the final distribution per position and
iteration for one forward, top-1 agreement with the final answer by iteration, and the early-exit
what-if: every lens-sampled position of the selected forwards replayed under each exit criterion
and threshold (`whatif.evaluate`, the SQL form of `mythos_probe.whatif.evaluate`), drawn as
`mythos_probe.whatif.pareto_figure`, with the recommended criterion at ≥ 99 % agreement and the
thresholds of one criterion as a table.
"""

from __future__ import annotations

from dash import Input, Output, dcc, html

from mythos_probe import whatif as replay
from mythos_probe.dashboards import queries, whatif
from mythos_probe.dashboards.components import (
    empty_figure, figure, graph, lines, message, no_data, position_heatmap, table, trace_from_search, view_callback,
)
from mythos_probe.dashboards.theme import LAYOUT

PATH = "/lens"
TITLE = "Coda lens & early exit"
MIN_AGREEMENT = 0.99
WHATIF_COLUMNS = {"threshold": "threshold", "mean_iterations": "iterations at exit",
                  "iterations_saved": "iterations saved", "flops_saved": "FLOPs saved",
                  "agreement": "top-1 agreement at exit",
                  "positions": "positions"}
NO_POSITIONS = ("No per-position lens metrics in the selected full-depth forwards: the what-if replays positions "
                "the coda lens sampled in forwards run with exit='fixed' (shadow runs beside the served ones). "
                "Record with attach(model, probes=[..., 'lens'], detail='positions').")


def layout() -> html.Div:
    criteria = [{"label": c, "value": c} for c in replay.CRITERIA]
    return html.Div(
        [
            html.H2(TITLE),
            html.Div(id="lens-message"),
            html.Div([graph("lens-heatmap"), graph("lens-agreement")], className="mp-grid"),
            html.H2("Early-exit what-if: each lens-sampled position stops at the first iteration its criterion fires"),
            html.Div([html.Div([html.Label("Thresholds of"), dcc.Dropdown(
                id="lens-criterion", options=criteria, value="kl", clearable=False)])],
                className="mp-controls"),
            html.Div([graph("lens-pareto"), html.Div(id="lens-whatif", className="mp-card")], className="mp-grid"),
        ]
    )


def recommendation(exits) -> html.Div | str:
    try:
        best = replay.recommend(exits, MIN_AGREEMENT)
    except ValueError as exc:
        return message(str(exc))
    return message(f"Recommended at ≥ {MIN_AGREEMENT:.0%} agreement: {replay.describe(best)}.")


def pareto(exits):
    fig = replay.pareto_figure(exits, MIN_AGREEMENT)
    # The dashboard's theme over the figure's own: plotly's named templates cost ~30 ms each.
    return fig.update_layout(LAYOUT, height=420, title={"font": {"size": 15}, "x": 0.02, "xanchor": "left"})


def update(store, sel: queries.Selection, search, criterion):
    per_it = queries.iteration_means(store, sel, ("lens_top1_agree", "lens_kl_final"))
    if per_it.empty:
        empty = empty_figure("Coda lens")
        return no_data(store), empty, empty, empty, ""
    trace_id = trace_from_search(search) or queries.newest_trace(store, sel)
    grid = queries.position_grid(store, trace_id, 0, "lens_kl_final")
    if grid.empty or grid["value"].isna().all():
        heat = empty_figure("KL to final", "No per-position lens values for this forward")
    else:
        heat = position_heatmap(grid, "lens_kl_final", f"KL to final, forward {trace_id[:8]}… (batch row 0)")
    agreement = lines(figure("Top-1 agreement with the final answer", "iteration", "share agreeing"),
                      per_it, "iteration", "lens_top1_agree")
    exits = whatif.evaluate(store, sel)
    if exits.empty:
        return "", heat, agreement, empty_figure("Early-exit what-if", NO_POSITIONS), message(NO_POSITIONS)
    rows = exits[exits["criterion"] == criterion]
    listed = table(rows, WHATIF_COLUMNS, "lens-whatif-table", links=()) if len(rows) else message(
        f"{criterion} cannot be replayed: its input metric was not recorded at every sampled position.")
    return "", heat, agreement, pareto(exits), html.Div([recommendation(exits), listed])


def register(app, store) -> None:
    outputs = [Output("lens-message", "children"), Output("lens-heatmap", "figure"),
               Output("lens-agreement", "figure"), Output("lens-pareto", "figure"), Output("lens-whatif", "children")]
    view_callback(app, store, outputs, [Input("lens-criterion", "value")], update)
