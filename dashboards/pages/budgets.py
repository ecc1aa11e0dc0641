"""Budgets page (`/budgets`): the loop profiles file in force (`mythos-probe profiles`), per group:
its policy, threshold and max loops, the evidence (forwards, agreement against the target with its
lower bound), the predicted iterations and FLOPs saved; and each group's estimated FLOPs over
time against its cost limit (the limit scaled to the chart's bucket width).

The file comes from `mythos-probe dashboard STORE --profiles FILE` (the environment variable
`MYTHOS_PROBE_PROFILES`); without one the page says how to make it. This module is not: the
profiles themselves (`mythos_probe.loop_profiles`) or the governor.
"""

from __future__ import annotations

import dataclasses
import os

import pandas as pd
from dash import Output, html

from mythos_probe.dashboards import queries
from mythos_probe.dashboards.components import area, empty_figure, figure, graph, lines, message, no_data, table, \
    view_callback

PATH = "/budgets"
TITLE = "Budgets"
ENV = "MYTHOS_PROBE_PROFILES"
COLUMNS = {"group": "group", "in_force": "profile in force", "note": "note", "limit": "cost limit",
           "forwards": "shadow forwards", "agreement": "agreement", "agreement_lower": "lower bound",
           "target": "target", "mean_iterations": "iterations per position", "iterations_saved": "iterations saved",
           "flops_saved": "FLOPs saved"}
FORMATS = {"forwards": "integer", "agreement": "percent", "agreement_lower": "percent", "target": "percent",
           "mean_iterations": "number", "iterations_saved": "percent", "flops_saved": "percent"}


def layout(_state=None) -> html.Div:
    return html.Div(
        [
            html.H2(TITLE + ": loop profiles in force and cost against limits"),
            html.Div(id="budgets-message"),
            area("budgets-table"),
            html.Div([graph("budgets-cost")], className="mp-grid"),
        ]
    )


def profile_rows(profiles) -> pd.DataFrame:
    rows = []
    for group, p in profiles.profiles.items():
        th = "" if p.exit_threshold is None else f" τ={p.exit_threshold:.3g}"
        limits = [f"{lim.flops:.3g} FLOPs / {lim.window_s:g} s" for lim in profiles.limits
                  if lim.key == profiles.by and lim.value in (group, "*")]
        rows.append({
            "group": group, "in_force": f"{p.policy}{th}, max {p.max_loops} of {p.full_depth} loops",
            "forwards": p.forwards, "agreement": p.agreement if p.positions else None,
            "agreement_lower": p.agreement_lower if p.positions else None, "target": profiles.target,
            "mean_iterations": p.mean_iterations if p.positions else None, "iterations_saved": p.iterations_saved,
            "flops_saved": p.flops_saved, "limit": "; ".join(limits) or "none", "note": p.note,
        })
    return pd.DataFrame(rows, columns=list(COLUMNS))


def update(store, sel: queries.Selection, search):
    from mythos_probe.loop_profiles import LoopProfiles

    if queries.forward_count(store) == 0:
        return no_data(store), "", empty_figure("Cost against limits")
    path = os.environ.get(ENV)
    if not path:
        return (message("No profiles file: run `mythos-probe profiles STORE --out FILE`, then open the dashboard "
                        "with `--profiles FILE`.", "info"), "", empty_figure("Cost against limits"))
    try:
        profiles = LoopProfiles.load(path)
    except (OSError, ValueError) as exc:
        return message(f"Cannot read the profiles file {path}: {exc}", "error"), "", empty_figure("Cost against limits")
    rows = table(profile_rows(profiles), COLUMNS, "budgets-rows", links=(), formats=FORMATS)
    cost = queries.cost_over_time(store, dataclasses.replace(sel, group=f"attr:{profiles.by}"))
    if cost.empty:
        return no_data(store), rows, empty_figure("Cost against limits")
    fig = lines(figure(f"Estimated FLOPs over time by {profiles.by}, against limits", "time (UTC)",
                       "FLOPs per bucket"), cost, "t", "flops")
    times = pd.to_datetime(cost["t"]).drop_duplicates().sort_values()
    bucket_s = (times.diff().dt.total_seconds().min() if len(times) > 1 else None) or 1.0
    for lim in profiles.limits:
        if lim.key == profiles.by:
            fig.add_hline(y=lim.flops * bucket_s / lim.window_s, line=dict(color="firebrick", dash="dash", width=1),
                          annotation_text=f"limit {profiles.by}={lim.value}: {lim.flops:.3g} / {lim.window_s:g} s")
    return "", rows, fig


def register(app, store) -> None:
    outputs = [Output("budgets-message", "children"), Output("budgets-table", "children"),
               Output("budgets-cost", "figure")]
    view_callback(app, store, outputs, (), update)
