"""The filter bar above every view: forward kind (served by default), model, run, loop, rank,
exit policy, iterations, time (a window to the newest forward or an absolute range), one user
attribute and its values, and the grouping the aggregate views split by. It turns a URL state
(`urlstate.parse`) into a `queries.Selection`.

This module is not the SQL that applies the selection (`queries.Selection.cte`) nor the URL sync
(`app.py`): its widgets only carry `urlstate` ids.
"""

from __future__ import annotations

import pandas as pd
from dash import Input, Output, dcc, html

from mythos_probe.dashboards import queries
from mythos_probe.dashboards.queries import Selection
from mythos_probe.dashboards.urlstate import control_id
from mythos_probe.records import FORWARD_KINDS

WINDOW_LABELS = {"all": "all time", "5m": "last 5 min", "1h": "last hour", "24h": "last 24 h", "7d": "last 7 days"}
KIND_OPTIONS = [{"label": k, "value": k} for k in FORWARD_KINDS] + [{"label": "every kind", "value": "all"}]
BUILT_IN_GROUPS = [{"label": "nothing", "value": "none"}, {"label": "model", "value": "model"},
                   {"label": "run", "value": "run"}, {"label": "forward kind", "value": "kind"},
                   {"label": "loop", "value": "loop"}, {"label": "rank", "value": "rank"},
                   {"label": "exit policy", "value": "policy"}]
# (key, store column) of the dropdowns whose options are the store's distinct values
DISTINCT = (("model", "model_id"), ("run", "run_id"), ("loop", "loop_name"), ("rank", "rank"), ("policy", "exit_policy"))
TIME_FORMAT = "YYYY-MM-DD HH:MM[:SS] (UTC)"


def _field(label: str, control) -> html.Div:
    return html.Div([html.Label(label), control])


def _dropdown(key: str, state: dict, **kw) -> dcc.Dropdown:
    value = state[key]
    return dcc.Dropdown(id=control_id(key), value=list(value) if isinstance(value, tuple) else value, **kw)


def layout(state: dict, store=None) -> html.Div:
    """The bar with every control set from `state`. Its dropdowns start with their options (from
    `store`; without one, the state's own values): a dropdown drops a value missing from its
    options, which would write the link's filter away."""
    window = [{"label": WINDOW_LABELS[k], "value": k} for k in queries.WINDOWS]
    if store is not None:
        opts = dict(zip([k for k, _ in DISTINCT] + ["attr", "val", "group"], options(store, state["attr"])))
    else:
        opts = {k: list(state[k]) for k, _ in DISTINCT} | {"attr": [state["attr"]] if state["attr"] else [],
                                                           "val": list(state["val"]), "group": BUILT_IN_GROUPS}
    return html.Div(
        [
            _field("Forward kind", _dropdown("kind", state, options=KIND_OPTIONS, clearable=False)),
            _field("Model", _dropdown("model", state, options=opts["model"], multi=True, placeholder="all models")),
            _field("Run", _dropdown("run", state, options=opts["run"], multi=True, placeholder="all runs")),
            _field("Loop", _dropdown("loop", state, options=opts["loop"], multi=True, placeholder="all loops")),
            _field("Rank", _dropdown("rank", state, options=opts["rank"], multi=True, placeholder="all ranks")),
            _field("Exit policy", _dropdown("policy", state, options=opts["policy"], multi=True, placeholder="any policy")),
            _field("Iterations from", dcc.Input(id=control_id("imin"), type="number", min=0, step=1, value=state["imin"],
                                                debounce=True, placeholder="any")),
            _field("Iterations to", dcc.Input(id=control_id("imax"), type="number", min=0, step=1, value=state["imax"],
                                              debounce=True, placeholder="any")),
            _field("Time (to newest forward)", _dropdown("window", state, options=window, clearable=False)),
            _field("From (UTC)", dcc.Input(id=control_id("from"), value=state["from"], debounce=True, placeholder=TIME_FORMAT)),
            _field("To (UTC)", dcc.Input(id=control_id("to"), value=state["to"], debounce=True, placeholder=TIME_FORMAT)),
            _field("Attribute", _dropdown("attr", state, options=opts["attr"], placeholder="e.g. endpoint")),
            _field("Attribute value", _dropdown("val", state, options=opts["val"], multi=True, placeholder="any value")),
            _field("Group by", _dropdown("group", state, options=opts["group"], clearable=False)),
        ],
        className="mp-filters",
    )


def time_range(low: str | None, high: str | None, names: tuple[str, str] = ("From", "To")):
    """(start, end) of an absolute range typed as text; ValueError saying what to write."""
    start, end = _time(low, names[0]), _time(high, names[1])
    if start is not None and end is not None and start > end:
        raise ValueError(f"{names[0]} ({start}) is after {names[1]} ({end}): swap them")
    return start, end


def _time(text: str | None, name: str) -> pd.Timestamp | None:
    if not text:
        return None
    try:
        value = pd.Timestamp(text)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not a time: write {TIME_FORMAT}, e.g. 2026-01-01 09:30") from None
    return value.tz_convert("UTC").tz_localize(None) if value.tzinfo else value


def selection(state: dict) -> Selection:
    """The `Selection` a URL state asks for; a bad time or an inverted range raises ValueError
    saying what to write instead."""
    start, end = time_range(state["from"], state["to"])
    return Selection(
        models=tuple(state["model"]),
        runs=tuple(state["run"]),
        window=state["window"] or "all",
        attribute=state["attr"] or None,
        values=tuple(state["val"]),
        group=state["group"] or "none",
        kinds=() if state["kind"] == "all" else (state["kind"] or "served",),
        loops=tuple(state["loop"]),
        ranks=tuple(state["rank"]),
        policies=tuple(state["policy"]),
        min_iterations=state["imin"],
        max_iterations=state["imax"],
        start=start,
        end=end,
    )


def options(store, attribute: str | None) -> list[list]:
    """Dropdown options for the distinct-value filters, the attribute, its values and grouping."""
    keys = queries.attribute_keys(store)
    groups = BUILT_IN_GROUPS + [{"label": k, "value": f"attr:{k}"} for k in keys]
    values = queries.attribute_values(store, attribute) if attribute else []
    return [queries.distinct_values(store, column) for _, column in DISTINCT] + [keys, values, groups]


def register(app, store) -> None:
    # Refreshed on every live tick so that new models, runs and endpoints become selectable, and
    # when the attribute changes (its values).
    targets = [key for key, _ in DISTINCT] + ["attr", "val", "group"]
    app.callback(
        [Output(control_id(k), "options") for k in targets],
        Input("app-interval", "n_intervals"),
        Input(control_id("attr"), "value"),
        prevent_initial_call=True,
    )(lambda _n, attribute: options(store, attribute))
