"""Building blocks shared by the pages: messages, figures and p10–p90 bands, ag-grid tables with
their CSV button, loading spinners, the position heatmap, chart links (a click opens the forwards
a point stands for; a range selected on a time axis sets the time filter), the view callback that
reads its state from the URL, and the guard that turns a failing callback into a message.

This module is not a page and runs no SQL of its own (it shapes already-queried frames; `no_data`
asks `queries` how many forwards each filter hides).
"""

from __future__ import annotations

import dataclasses
import functools
import html as html_text
import json
import logging

import dash_ag_grid as dag
import duckdb
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from dash import MATCH, ClientsideFunction, Input, Output, State, dcc, html, no_update

from mythos_probe.dashboards import filters, queries, urlstate
from mythos_probe.dashboards.theme import LAYOUT
from mythos_probe.records import FORWARD_METRICS, ITERATION_METRICS, POSITION_METRICS

log = logging.getLogger("mythos_probe.dashboards")

# One iteration numbering on every page: the first pass of the loop is iteration 1, so a position
# that used k iterations stopped at iteration k (the halting histogram and the loop distribution
# agree). Records and SQL count from 0 (`t` in the formulas); figures add 1 where they draw.
ITERATION_AXIS = "iteration (1 = first pass)"


def shown_iteration(values):
    """Stored iteration indices (0-based) as every figure and table shows them (1-based)."""
    return values + 1


# Metrics spanning orders of magnitude get a log colour scale in position heatmaps.
LOG_METRICS = frozenset({"rel_residual", "cos_step", "lens_kl_final"})


def message(text: str | None, kind: str = "info") -> html.Div | str:
    return html.Div(text, className=f"mp-message mp-{kind}") if text else ""


def figure(title: str, xlabel: str, ylabel: str, **layout) -> go.Figure:
    """An empty themed figure; `layout` adds to (and for axes, merges into) the base layout."""
    axes = {
        "xaxis": {**LAYOUT["xaxis"], "title": {"text": xlabel}, **layout.pop("xaxis", {})},
        "yaxis": {**LAYOUT["yaxis"], "title": {"text": ylabel}, **layout.pop("yaxis", {})},
    }
    # One constructor call with a plain dict: plotly.py's update_layout is ~10× slower.
    return go.Figure(
        layout={
            **LAYOUT,
            **axes,
            "title": {"text": title, "font": {"size": 15}, "x": 0.02, "xanchor": "left"},
            # uirevision: a live refresh keeps the user's zoom and legend choices on the same chart.
            "uirevision": title,
            **layout,
        }
    )


# An axis of counts (FLOPs, tokens, token-iterations): SI ticks with three digits (4.07G, 250k)
# from zero, instead of plotly's auto ticks, which on a near-flat series print 8.1443778555B.
QUANTITY_AXIS = {"tickformat": ".3~s", "rangemode": "tozero", "hoverformat": ",.4~g"}


def hline(y: float, color: str) -> dict:
    """A dashed horizontal reference line across the plot, as a layout shape."""
    return {"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": y, "y1": y, "line": {"dash": "dash", "color": color}}


def empty_figure(title: str, text: str = "No data for this selection") -> go.Figure:
    hidden = {"visible": False}
    note = {"text": text, "showarrow": False, "font": {"size": 14, "color": "#57606a"}}
    return figure(title, "", "", xaxis=hidden, yaxis=hidden, annotations=[note])


LOADING_DELAY_MS = 150  # quick updates don't flicker a spinner


def loading(child) -> dcc.Loading:
    """A spinner over `child` while a callback that writes into it runs."""
    return dcc.Loading(child, type="circle", delay_show=LOADING_DELAY_MS,
                       overlay_style={"visibility": "visible", "opacity": 0.45})


_FAMILIES = {"iteration": ITERATION_METRICS, "position": POSITION_METRICS, "forward": FORWARD_METRICS}


def about(family: str, *names: str) -> str:
    """What the named metrics are, from their one definition in `records` (description and
    source), as one line for a chart's caption or a tooltip."""
    defined = {m.name: m for m in _FAMILIES[family]}
    return " · ".join(f"{n}: {defined[n].description} ({defined[n].source})" for n in names)


def metric_options(family: str) -> list[dict]:
    """Dropdown options for a metric family, each with its description as the hover tooltip."""
    return [{"label": m.name, "value": m.name, "title": f"{m.description} ({m.source})"} for m in _FAMILIES[family]]


def caption(text: str) -> html.Div | str:
    return html.Div(text, className="mp-about") if text else ""


def graph(id_: str, about_text: str = "") -> html.Div:
    """A chart card with its spinner, a CSV download of the numbers it draws, and a caption saying
    what it shows (`about`)."""
    return html.Div(
        [
            loading(dcc.Graph(id=id_, config={"displaylogo": False})),
            caption(about_text),
            html.Button("CSV", id={"type": "chart-csv", "graph": id_}, className="mp-csv mp-chart-csv",
                        title="download the numbers this chart draws"),
            dcc.Download(id={"type": "chart-download", "graph": id_}),
        ],
        className="mp-card",
    )


def area(id_: str, **kw) -> dcc.Loading:
    """A container for a table or text that a view callback fills, with its loading spinner."""
    return loading(html.Div(id=id_, **kw))


def lines(fig: go.Figure, df: pd.DataFrame, x: str, y: str, group: str = "grp", **trace) -> go.Figure:
    """One line per group, named after the group value (the legend shows them). An `iteration`
    x is drawn 1-based (`shown_iteration`)."""
    for name, part in df.groupby(group, sort=True):
        xs = shown_iteration(part[x]) if x == "iteration" else part[x]
        fig.add_trace(go.Scatter(x=xs, y=part[y], name=str(name), mode="lines+markers", **trace))
    return fig


def bars(fig: go.Figure, df: pd.DataFrame, x: str, y: str, group: str = "grp", links=None) -> go.Figure:
    """One bar series per group. With `links(group value, x value)` → URL, a click on a bar opens
    the forwards it counts. An `iteration` x is drawn 1-based (`shown_iteration`)."""
    for name, part in df.groupby(group, sort=True):
        custom = [[links(name, v)] for v in part[x]] if links else None
        xs = shown_iteration(part[x]) if x == "iteration" else part[x]
        fig.add_trace(go.Bar(x=xs, y=part[y], name=str(name), customdata=custom))
    fig.layout.barmode = "group"
    return fig


def group_filter(group: str, value) -> dict:
    """The filter that keeps one group of a grouping, as `urlstate` values."""
    if group == "none":
        return {}
    if group.startswith("attr:"):
        return {"attr": group[5:], "val": (str(value),)}
    if group == "kind":
        return {"kind": str(value)}
    if group == "rank":
        return {"rank": (int(value),)}
    key = {"model": "model", "run": "run", "loop": "loop", "policy": "policy"}[group]
    return {key: (str(value),)}


def forwards_link(search: str | None, group: str, value, **values) -> str:
    """The forwards list of one group (of the current grouping), narrowed by `values`."""
    return "/" + urlstate.with_values(search, trace=None, **group_filter(group, value), **values)


FEW_BUCKETS = 20  # up to this many points a band's median line also draws its markers


def band(df: pd.DataFrame, name: str, low: str, mid: str, high: str, color: str, customdata=None,
         hover: str = "") -> list[dict]:
    """A p10–p90 band with its median line: three traces of one point per bucket, as plain dicts
    (plotly.py's validation of a few thousand band points costs more than the query)."""
    x = df["x"].to_numpy()
    edge = {"type": "scatter", "x": x, "mode": "lines", "line": {"width": 0}, "showlegend": False,
            "hoverinfo": "skip", "legendgroup": name}
    return [
        {**edge, "y": df[low].to_numpy()},
        {**edge, "y": df[high].to_numpy(), "fill": "tonexty", "fillcolor": _transparent(color)},
        # lines only: a marker per bucket is an SVG node each, and hover and click work on the line;
        # but a line of one point draws nothing, so a group of few buckets gets its markers
        {"type": "scatter", "x": x, "y": df[mid].to_numpy(), "mode": "lines" if len(x) > FEW_BUCKETS else "lines+markers",
         "name": name, "legendgroup": name,
         "line": {"color": color}, "customdata": customdata, "hovertemplate": hover or None},
    ]


def _transparent(color: str, alpha: float = 0.22) -> str:
    r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


# What a clickable point stands for, as its customdata[0]: a trace id opens that forward; a
# "run|from|to" range opens the forwards list filtered to it; a path ("/?…") is opened as is.
def range_ref(run: str, lo: pd.Timestamp, hi: pd.Timestamp) -> str:
    def text(t: pd.Timestamp) -> str:  # microseconds kept, trailing zeros dropped
        return f"{t:%Y-%m-%d %H:%M:%S.%f}".rstrip("0").rstrip(".")

    return f"{run}|{text(lo)}|{text(hi)}"


def click_target(click: dict | None, search: str | None) -> str | None:
    """The URL a click on a chart point opens, from its customdata; None when the point stands
    for no forwards."""
    refs = []
    for point in (click or {}).get("points") or []:
        data = point.get("customdata")
        ref = data[0] if isinstance(data, list) and data else data
        if isinstance(ref, str):
            refs.append(html_text.unescape(ref))  # escaped for Plotly by `as_text`
    if not refs:
        return None
    # A click can hit several traces at one x: a single forward's marker wins over a bucket.
    ref = next((r for r in refs if "|" not in r and not r.startswith("/")), refs[0])
    if ref.startswith("/"):  # a ready link (a bar's forwards)
        return ref
    if "|" in ref:
        run, lo, hi = ref.rsplit("|", 2)  # a run id may hold "|" itself; the two times never do
        return "/" + urlstate.with_values(search, run=(run,), from_=lo, to=hi, trace=None)
    return "/forward" + urlstate.with_values(search, trace=ref)


def zoom_range(relayout: dict | None, search: str | None) -> str | None:
    """The URL after a selection on a time axis: the absolute range becomes the From/To filter
    (a double click, which resets the axis, clears it). None for anything else."""
    relayout = relayout or {}
    # A drag reports the two ends separately, Plotly.relayout calls may report the pair.
    ends = relayout.get("xaxis.range") or [relayout.get("xaxis.range[0]"), relayout.get("xaxis.range[1]")]
    if all(isinstance(end, str) for end in ends):  # a date axis reports text, a step axis numbers
        lo, hi = sorted(ends)
        return urlstate.with_values(search, from_=lo[:23], to=hi[:23])
    if relayout.get("xaxis.autorange") and (urlstate.parse(search)[0]["from"] or urlstate.parse(search)[0]["to"]):
        return urlstate.with_values(search, from_=None, to=None)
    return None


def register_chart_links(app, graph_id: str, time_axis: bool = False) -> None:
    """Clicking a point of `graph_id` that stands for forwards opens them; with `time_axis`,
    selecting a range on it sets the time filter (zoom to range)."""
    app.callback(Output("app-url", "href", allow_duplicate=True), Input(graph_id, "clickData"),
                 State("app-url", "search"), prevent_initial_call=True)(
        lambda click, search: click_target(click, search) or no_update)
    if time_axis:
        app.callback(Output("app-url", "search", allow_duplicate=True), Input(graph_id, "relayoutData"),
                     State("app-url", "search"), prevent_initial_call=True)(
            lambda relayout, search: zoom_range(relayout, search) or no_update)


# Cell formats for grid columns: d3-format in the browser, so sorting still sees the numbers.
FORMATS = {
    "number": "d3.format(',.4~g')(params.value)",
    "integer": "d3.format(',d')(params.value)",
    "percent": "d3.format('.1%')(params.value)",
}


def grid_columns(columns: dict[str, str], links: tuple[str, ...] = ("trace_id",),
                 formats: dict[str, str] | None = None) -> list[dict]:
    """ag-grid column definitions: trace ids rendered as links to their forward (the value stays
    the plain id, for sorting, filtering and CSV), formatted numbers right-aligned."""
    defs = []
    for field, header in columns.items():
        col = {"field": field, "headerName": header}
        if field in links:
            col.update(cellRenderer="TraceLink", cellClass="mp-mono", minWidth=290)  # 32 hex chars, untruncated
        fmt = (formats or {}).get(field)
        if fmt:
            col.update(valueFormatter={"function": f"params.value == null ? '–' : {FORMATS[fmt]}"}, type="rightAligned")
        defs.append(col)
    return defs


def records(df: pd.DataFrame) -> list[dict]:
    """Rows for a grid: timestamps as UTC text, NaN and NULL as null."""
    out = df.copy()
    for column in out.columns:
        if pd.api.types.is_datetime64_any_dtype(out[column]):
            out[column] = out[column].dt.strftime("%Y-%m-%d %H:%M:%S.%f").str[:-3]
    return out.astype(object).where(out.notna(), None).to_dict("records")


def table(df: pd.DataFrame, columns: dict[str, str], id_: str, links: tuple[str, ...] = ("trace_id",),
          formats: dict[str, str] | None = None) -> html.Div:
    """A sortable, filterable grid of `columns` (name → header) with a CSV download of all its
    rows. For small, already aggregated frames: every row travels to the browser (the forwards
    list pages on the server instead)."""
    grid = dag.AgGrid(
        id={"type": "grid", "name": id_},
        rowData=records(df[list(columns)]),
        columnDefs=grid_columns(columns, links, formats),
        defaultColDef={"sortable": True, "filter": True, "resizable": True},
        columnSize="autoSize",
        dashGridOptions={"domLayout": "autoHeight", "suppressCellFocus": True},
    )
    button = html.Button("Download CSV", id={"type": "csv", "name": id_}, className="mp-csv")
    return html.Div([button, grid, dcc.Download(id={"type": "csv-download", "name": id_})], id=id_,
                    className="mp-table-card")


def table_csv(_clicks, rows: list[dict] | None, columns: list[dict], id_: dict) -> dict:
    """A `table`'s rows as a CSV download: headers as the grid shows them, cells as stored
    numbers (0.317, not the "31.7%" the cell shows) and no byte-order mark, which ag-grid's own
    export prepends and which turns the first header into "\ufeffgroup" for most CSV readers."""
    frame = pd.DataFrame(rows or [], columns=[c["field"] for c in columns])
    frame.columns = [c.get("headerName", c["field"]) for c in columns]
    return {"content": frame.to_csv(index=False), "filename": f"{id_['name']}.csv", "base64": False}


def register_csv(app) -> None:
    """Every `table`'s CSV button exports its grid's rows (all of them: the grid holds them all);
    every chart's CSV button downloads the points it draws (in the browser: assets/chart_csv.js)."""
    app.callback(Output({"type": "csv-download", "name": MATCH}, "data"),
                 Input({"type": "csv", "name": MATCH}, "n_clicks"), State({"type": "grid", "name": MATCH}, "rowData"),
                 State({"type": "grid", "name": MATCH}, "columnDefs"), State({"type": "csv", "name": MATCH}, "id"),
                 prevent_initial_call=True)(table_csv)
    app.clientside_callback(
        ClientsideFunction(namespace="mp", function_name="chartCsv"),
        Output({"type": "chart-download", "graph": MATCH}, "data"),
        Input({"type": "chart-csv", "graph": MATCH}, "n_clicks"),
        State({"type": "chart-csv", "graph": MATCH}, "id"),
        prevent_initial_call=True,
    )


def stat(label: str, value: str) -> html.Div:
    return html.Div([html.B(value), html.Span(label)], className="mp-stat")


def who(row) -> str:
    """A forward's tooltip lines: trace id, model and endpoint (from a `queries.forward` row)."""
    attributes = json.loads(row["attributes_text"] or "{}")
    return f"trace {row['trace_id']}<br>model {row['model_id']}<br>endpoint {attributes.get('endpoint', '–')}<br>"


def position_heatmap(df: pd.DataFrame, metric: str, title: str, about: str = "") -> go.Figure:
    """Position × iteration heatmap of one batch row, token text on the y axis and each position's
    halting step (last iteration used) marked. `df` is `queries.position_grid` output; `about`
    (see `who`) heads each tooltip."""
    positions = np.sort(df["position"].unique())
    n_iter = int(df["iteration"].max()) + 1
    raw = np.full((len(positions), n_iter), np.nan)
    row = np.searchsorted(positions, df["position"].to_numpy())
    raw[row, df["iteration"].to_numpy()] = df["value"].to_numpy(dtype=float)
    first = df.drop_duplicates("position").set_index("position").loc[positions]
    labels = [f"{p} {t if isinstance(t, str) else ''}".strip() for p, t in zip(positions, first["token_text"])]
    log_scale = metric in LOG_METRICS
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(raw > 0, np.log10(raw), np.nan) if log_scale else raw
    colorbar = {"title": {"text": f"log10 {metric}" if log_scale else metric}}
    fig = figure(
        title, ITERATION_AXIS, "position · token",
        height=max(340, min(900, 60 + 16 * len(positions))),
        yaxis={"type": "category", "autorange": "reversed"},
        legend={"orientation": "h", "y": 1.02, "x": 1, "xanchor": "right", "yanchor": "bottom"},
    )
    fig.add_trace(
        go.Heatmap(
            z=z,
            x=list(range(1, n_iter + 1)),
            y=labels,
            customdata=raw,
            colorscale="Viridis",
            colorbar=colorbar,
            hovertemplate=about + "position %{y}<br>iteration %{x}<br>" + metric + " %{customdata:.3g}<extra></extra>",
            name=metric,
        )
    )
    used = first["iterations_used"].to_numpy()
    known = ~pd.isna(used)
    fig.add_trace(
        go.Scatter(
            x=used[known].astype(int).tolist(),
            y=[label for label, k in zip(labels, known) if k],
            mode="markers",
            marker={"symbol": "x-thin", "size": 9, "line": {"width": 2, "color": "#ff4d4f"}},
            name="last iteration this position ran",
            showlegend=True,  # plotly hides a lone legend entry; the mark needs its key
        )
    )
    return fig


def _store_closing(exc: Exception) -> bool:
    """Whether `exc` is a read cut short by the store closing (`store.Cursors.close` interrupts the
    reads still running, then refuses new ones)."""
    from mythos_probe.collectors.store import StoreError

    return isinstance(exc, duckdb.InterruptException) or (isinstance(exc, StoreError) and "store is closed" in str(exc))


def guarded(fn, n_outputs: int):
    """Wrap a page callback whose first output is its message area: any error becomes a short
    message there (the traceback goes to the server log only) and the other outputs keep their
    last value."""

    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 — the user sees a message, never a traceback
            if _store_closing(exc):  # `serve` stopping (SIGTERM) interrupts the reads in flight: no crash
                log.info("dashboard callback %s stopped: the store is closing", fn.__name__)
                return (message("The server is stopping.", "error"), *([no_update] * (n_outputs - 1)))
            log.exception("dashboard callback %s failed", fn.__name__)
            text = f"Could not read the store: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            return (message(text, "error"), *([no_update] * (n_outputs - 1)))

    return wrapper


def trace_from_search(search: str | None) -> str | None:
    """The `trace` query parameter of the page URL, if any."""
    return urlstate.parse(search)[0]["trace"]


# Plotly reads the strings it draws (legend names, tick labels, hover text, and any value a hover
# template inserts: %{x}, %{customdata[0]}…) as its own HTML subset, where `<span style=…>` can make
# every viewer's browser fetch a URL. Stored values (run ids, model ids, exit policies, token text,
# endpoints) are the sender's, so each reaches a figure escaped (Plotly shows &lt; as <): as text.
_DATA_STRINGS = ("name", "text", "hovertext", "x", "y", "customdata", "labels", "ids", "legendgroup")


def _escape(value):
    if isinstance(value, str):
        return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "OUS":  # numbers, times: nothing to escape
            return value
        return np.array([_escape(v) for v in value.ravel().tolist()], dtype=object).reshape(value.shape)
    if isinstance(value, (list, tuple)):
        return type(value)(_escape(v) for v in value)
    return value


def as_text(fig):
    """`fig` (a go.Figure, or a figure dict {"data": [...], "layout": ...}) with every string of
    its traces' data (names, labels, x/y categories, custom data, hover text) and axis tick texts
    escaped, so Plotly draws stored values as text, never as markup. Our own hover templates and
    titles are left alone. `click_target` unescapes what it reads back. In place: escape a
    figure once."""
    is_dict = isinstance(fig, dict)
    for trace in fig["data"] if is_dict else fig.data:
        for key in _DATA_STRINGS:
            value = trace.get(key) if is_dict else (trace[key] if key in trace else None)
            if value is not None:
                escaped = _escape(value)
                if escaped is not value:
                    trace[key] = escaped
    layout = (fig.get("layout") or {}) if is_dict else fig.layout
    for axis in [a for a in (layout if is_dict else layout.to_plotly_json()) if a.startswith(("xaxis", "yaxis"))]:
        ticktext = (layout[axis] or {}).get("ticktext") if is_dict else layout[axis].ticktext
        if ticktext is not None:
            layout[axis]["ticktext"] = _escape(list(ticktext))
    return fig


def one_shape(store, sel: queries.Selection) -> tuple[queries.Selection, str]:
    """`sel` narrowed to the newest (model, loop) pair when it spans several and nothing groups
    them, with a note saying so: averaging per iteration or position over models of different
    depths, lengths or experts draws a figure of no model. ("" when `sel` is kept as it is.)"""
    if sel.group != "none":
        return sel, ""
    pairs = queries.shapes(store, sel)
    if len(pairs) < 2:
        return sel, ""
    model, loop = pairs["model_id"].iloc[0], pairs["loop_name"].iloc[0]
    others = ", ".join(f"{m} · {lp} ({n:,})" for m, lp, n in pairs[["model_id", "loop_name", "forwards"]].iloc[1:].itertuples(index=False))
    note = (f"Showing model {model} · loop {loop} only, the newest of {len(pairs)} model · loop pairs selected "
            f"(their iterations and positions differ); also selected: {others}. Choose under Model and Loop, "
            "or Group by model to see them side by side.")
    return dataclasses.replace(sel, models=(model,), loops=(loop,)), note


def view_callback(app, store, outputs: list, page_keys: tuple[str, ...], update, states: tuple = (),
                  single_shape: bool = False) -> None:
    """Register a view's one update callback. It reads the whole state from the URL (filters and
    the page's own controls, `urlstate.KEYS`), so a link reproduces the view;
    `update(store, selection, search, *page_values, *state_values)` returns the outputs, message
    first. With `single_shape`, the view sees one (model, loop) pair at a time (`one_shape`)."""

    def callback(_tick, search, *state_values):
        state, problems = urlstate.parse(search)
        try:
            sel = filters.selection(state)
        except ValueError as exc:
            return (message(str(exc), "error"), *([no_update] * (len(outputs) - 1)))
        note = ""
        if single_shape:
            sel, note = one_shape(store, sel)
        out = update(store, sel, search, *(state[k] for k in page_keys), *state_values)
        figures = {id(o): o for o in out if isinstance(o, go.Figure) or (isinstance(o, dict) and "data" in o)}
        for fig in figures.values():  # once each: a view may return one empty figure several times
            as_text(fig)
        notes = [message("Ignored in this link: " + "; ".join(problems) + ".", "error") if problems else "",
                 message(note)]
        if any(notes):
            return (html.Div([*notes, out[0]]), *out[1:])
        return out

    callback.__name__ = f"{update.__module__}.{update.__name__}"
    app.callback(outputs, [Input("app-interval", "n_intervals"), Input("app-url", "search"), *states])(
        guarded(callback, len(outputs)))


# Each filter of the bar: its label, whether a selection uses it, and the selection without it.
_FILTERS = (
    ("Forward kind", lambda s: bool(s.kinds), {"kinds": ()}),
    ("Model", lambda s: bool(s.models), {"models": ()}),
    ("Run", lambda s: bool(s.runs), {"runs": ()}),
    ("Loop", lambda s: bool(s.loops), {"loops": ()}),
    ("Rank", lambda s: bool(s.ranks), {"ranks": ()}),
    ("Exit policy", lambda s: bool(s.policies), {"policies": ()}),
    ("Iterations from/to", lambda s: s.min_iterations is not None or s.max_iterations is not None,
     {"min_iterations": None, "max_iterations": None}),
    ("Time", lambda s: s.window != "all" or s.start is not None or s.end is not None,
     {"window": "all", "start": None, "end": None}),
    ("Attribute value", lambda s: bool(s.attribute and s.values), {"attribute": None, "values": ()}),
)


def hidden_by(store, sel: queries.Selection) -> list[str]:
    """For each filter in use that alone hides stored forwards: what it hides, as a phrase."""
    phrases = []
    for label, used, lifted in _FILTERS:
        if not used(sel):
            continue
        n = queries.matching_count(store, dataclasses.replace(sel, **lifted))
        if not n:
            continue
        if label == "Forward kind":
            others = {k: c for k, c in queries.kind_counts(store, sel).items() if k not in sel.kinds}
            kinds = ", ".join(f"{c:,} {k}" for k, c in others.items())
            phrases.append(f"Forward kind ({', '.join(sel.kinds)}) hides {kinds} — choose 'every kind' or that kind")
        else:
            phrases.append(f"{label} hides {n:,}")
    return phrases


def no_data(store, sel: queries.Selection | None = None) -> html.Div:
    """Why a view is empty: nothing stored yet, or which filters hide the stored forwards."""
    if queries.forward_count(store) == 0:
        return message("The store holds no forwards yet. In live mode they appear here as they arrive.")
    phrases = hidden_by(store, sel) if sel is not None else []
    if phrases:
        return message("No forwards match the filters. Lifting one filter alone would show some: "
                       + "; ".join(phrases) + ".")
    return message("No forwards match the filters together (no single filter hides them all): clear some filters.")
