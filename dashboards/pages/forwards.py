"""Runs & forwards page (`/`): totals for the current filters, one row per run, and every
selected forward in a grid that sorts, filters and pages on the server (user attributes as
columns), with a CSV download of all matching rows. A forward's trace id opens its detail, which
is the `forward` page.
"""

from __future__ import annotations

import dash_ag_grid as dag
from werkzeug.exceptions import BadRequest
from dash import Input, Output, State, dcc, html, no_update

from mythos_probe.dashboards import filters, queries, urlstate
from mythos_probe.dashboards.components import area, grid_columns, no_data, records, stat, table, view_callback

PATH = "/"
TITLE = "Runs & forwards"
PAGE_SIZE = 50
MAX_PAGE = 1000  # rows one grid request may ask for (the grid asks for PAGE_SIZE)

RUN_COLUMNS = {
    "run_id": "run", "model_id": "model", "forwards": "forwards", "tokens": "tokens", "mean_ms": "mean ms",
    "p95_ms": "p95 ms", "mean_iterations": "iterations / forward", "iterations_per_token": "iterations / token",
    "first": "first (UTC)", "last": "last (UTC)",
}
RUN_FORMATS = {"forwards": "integer", "tokens": "integer", "mean_ms": "number", "p95_ms": "number",
               "mean_iterations": "number", "iterations_per_token": "number"}
LIST_HEADERS = {
    "start_time": "start (UTC)", "trace_id": "trace id", "run_id": "run", "model_id": "model", "kind": "kind",
    "loop_name": "loop", "rank": "rank", "step": "step", "tokens": "tokens", "duration_ms": "ms",
    "iterations": "iterations", "n_loops": "n_loops", "exit_policy": "exit policy", "mean_iterations": "iterations / token",
}
LIST_FORMATS = {"rank": "integer", "step": "integer", "tokens": "integer", "duration_ms": "number",
                "iterations": "integer", "n_loops": "integer", "mean_iterations": "number"}
NUMERIC = {"rank", "step", "tokens", "duration_ms", "iterations", "n_loops", "mean_iterations"}


def layout(_state=None) -> html.Div:
    return html.Div(
        [
            html.H2(TITLE),
            html.Div(id="forwards-message"),
            area("forwards-stats", className="mp-stats"),
            html.H2("Runs"),
            area("forwards-runs"),
            html.H2("Forwards (sort, filter and page on the server; a trace id opens the forward)"),
            html.Button("Download CSV (all matching rows)", id="forwards-csv", className="mp-csv"),
            dcc.Download(id="forwards-download"),
            area("forwards-list"),
            dcc.Store(id="forwards-shown"),
        ]
    )


def list_grid(keys: list[str]) -> dag.AgGrid:
    headers = {**LIST_HEADERS, **{queries.ATTRIBUTE_PREFIX + k: k for k in keys}}
    columns = grid_columns(headers, ("trace_id",), LIST_FORMATS)
    for col in columns:
        col["filter"] = "agNumberColumnFilter" if col["field"] in NUMERIC else "agTextColumnFilter"
        col["filterParams"] = {"maxNumConditions": 1, "buttons": ["reset"]}
    return dag.AgGrid(
        id="forwards-grid",
        rowModelType="infinite",
        columnDefs=columns,
        defaultColDef={"sortable": True, "resizable": True, "minWidth": 90},
        dashGridOptions={"pagination": True, "paginationPageSize": PAGE_SIZE, "cacheBlockSize": PAGE_SIZE,
                         "maxBlocksInCache": 4, "suppressFieldDotNotation": True, "suppressCellFocus": True,
                         "domLayout": "autoHeight"},
        style={"width": "100%"},
    )


def update(store, sel: queries.Selection, search, shown=None):
    t = queries.totals(store, sel).iloc[0]
    if t["forwards"] == 0:
        return no_data(store, sel), [], "", "", None
    stats = [
        stat("forwards", f"{int(t['forwards']):,}"),
        stat("runs", f"{int(t['runs']):,}"),
        stat("tokens", f"{int(t['tokens']):,}"),
        stat("mean latency", f"{t['mean_ms']:.1f} ms"),
        stat("p95 latency", f"{t['p95_ms']:.1f} ms"),
        stat("iterations / token", f"{t['iterations_per_token']:.2f}"),
    ]
    runs = table(queries.runs(store, sel), RUN_COLUMNS, "forwards-runs-table", links=(), formats=RUN_FORMATS)
    # A new grid (back to its first page and default order) only when the filters or the rows
    # changed: a live tick with nothing new keeps the user's page, sort and grid filters.
    now = [search or "", int(t["forwards"]), str(t["last"])]
    grid = no_update if shown == now else list_grid(queries.attribute_keys(store))
    return "", stats, runs, grid, now


def _page(request) -> tuple[int, int, list, dict]:
    """(start, count, sort model, filter model) of a `getRowsRequest`; ValueError naming what is
    malformed (the grid sends well-formed ones: these come from elsewhere)."""
    if not isinstance(request, dict):
        raise ValueError(f"a grid request is an object, got {type(request).__name__}")
    start, end = request.get("startRow", 0), request.get("endRow", None)
    end = start + PAGE_SIZE if end is None and isinstance(start, int) else end
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (start, end)) or not 0 <= start <= end:
        raise ValueError(f"startRow and endRow must be integers with 0 ≤ startRow ≤ endRow, got {start!r}, {end!r}")
    sort, filter_model = request.get("sortModel") or [], request.get("filterModel") or {}
    if not isinstance(sort, list) or not all(isinstance(item, dict) for item in sort):
        raise ValueError(f"sortModel must be a list of {{colId, sort}}, got {sort!r:.80}")
    if not isinstance(filter_model, dict) or not all(isinstance(spec, dict) for spec in filter_model.values()):
        raise ValueError(f"filterModel must map columns to filters, got {filter_model!r:.80}")
    return start, min(end - start, MAX_PAGE), sort, filter_model


def rows(store, search: str | None, request: dict | None) -> dict:
    """One page of the forwards grid for its `getRowsRequest` (startRow, endRow, sortModel,
    filterModel). A malformed request is answered 400 with what is wrong, never a bare 500."""
    try:
        start, count, sort, filter_model = _page(request or {})
        sel = filters.selection(urlstate.parse(search)[0])
        page, total = queries.forward_list(store, sel, queries.attribute_keys(store), sort, filter_model, start, count)
    except (ValueError, TypeError, KeyError) as exc:  # the request's fault: queries name the column or filter
        raise BadRequest(f"malformed forwards-grid request: {exc}") from None
    return {"rowData": records(page), "rowCount": total}


def csv(store, search: str | None, sort: list | None, filter_model: dict | None) -> dict:
    """Every forward matching the filters and the grid's own sort and filter, as CSV."""
    sel = filters.selection(urlstate.parse(search)[0])
    df, _ = queries.forward_list(store, sel, queries.attribute_keys(store), sort, filter_model, limit=None)
    df["start_time"] = df["start_time"].dt.strftime("%Y-%m-%d %H:%M:%S.%f")
    return dcc.send_data_frame(df.to_csv, "forwards.csv", index=False)


def register(app, store) -> None:
    outputs = [Output("forwards-message", "children"), Output("forwards-stats", "children"),
               Output("forwards-runs", "children"), Output("forwards-list", "children"), Output("forwards-shown", "data")]
    view_callback(app, store, outputs, (), update, (State("forwards-shown", "data"),))
    app.callback(Output("forwards-grid", "getRowsResponse"), Input("forwards-grid", "getRowsRequest"),
                 State("app-url", "search"))(lambda request, search: rows(store, search, request))
    app.callback(Output("forwards-download", "data"), Input("forwards-csv", "n_clicks"), State("app-url", "search"),
                 State("forwards-grid", "getRowsRequest"), prevent_initial_call=True)(
        lambda _n, search, request: csv(store, search, (request or {}).get("sortModel"), (request or {}).get("filterModel")))
