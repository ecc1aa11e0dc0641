"""The filter bar above every view: model, run, time window, one user attribute and its values,
and the grouping the aggregate views split by. It turns widget values into a `queries.Selection`.

This module is not the SQL that applies the selection (`queries.Selection.cte`).
"""

from __future__ import annotations

from dash import Input, Output, dcc, html

from mythos_probe.dashboards import queries
from mythos_probe.dashboards.queries import Selection

IDS = ("filters-model", "filters-run", "filters-window", "filters-attribute", "filters-value", "filters-group")
INPUTS = [Input(i, "value") for i in IDS]
WINDOW_LABELS = {"all": "all time", "5m": "last 5 min", "1h": "last hour", "24h": "last 24 h", "7d": "last 7 days"}


BUILT_IN_GROUPS = [{"label": "nothing", "value": "none"}, {"label": "model", "value": "model"}, {"label": "run", "value": "run"}]


def _field(label: str, control) -> html.Div:
    return html.Div([html.Label(label), control])


def layout() -> html.Div:
    window = [{"label": WINDOW_LABELS[k], "value": k} for k in queries.WINDOWS]
    return html.Div(
        [
            _field("Model", dcc.Dropdown(id="filters-model", multi=True, placeholder="all models")),
            _field("Run", dcc.Dropdown(id="filters-run", multi=True, placeholder="all runs")),
            _field("Time (to newest forward)", dcc.Dropdown(id="filters-window", options=window, value="all", clearable=False)),
            _field("Attribute", dcc.Dropdown(id="filters-attribute", placeholder="e.g. endpoint")),
            _field("Attribute value", dcc.Dropdown(id="filters-value", multi=True, placeholder="any value")),
            _field("Group by", dcc.Dropdown(id="filters-group", options=BUILT_IN_GROUPS, value="none", clearable=False)),
        ],
        className="mp-filters",
    )


def selection(models, runs, window, attribute, values, group) -> Selection:
    return Selection(
        models=tuple(models or ()),
        runs=tuple(runs or ()),
        window=window or "all",
        attribute=attribute or None,
        values=tuple(values or ()),
        group=group or "none",
    )


def options(store, attribute: str | None) -> tuple[list, list, list, list, list]:
    """Dropdown options for model, run, attribute, attribute value and grouping."""
    keys = queries.attribute_keys(store)
    groups = BUILT_IN_GROUPS + [{"label": k, "value": f"attr:{k}"} for k in keys]
    values = queries.attribute_values(store, attribute) if attribute else []
    return queries.distinct_values(store, "model_id"), queries.distinct_values(store, "run_id"), keys, values, groups


def register(app, store) -> None:
    # Refreshed on every live tick so that new models, runs and endpoints become selectable.
    app.callback(
        [Output(i, "options") for i in ("filters-model", "filters-run", "filters-attribute", "filters-value", "filters-group")],
        Input("app-interval", "n_intervals"),
        Input("filters-attribute", "value"),
    )(lambda _n, attribute: options(store, attribute))
