"""The Dash application: the shell (header, navigation, trace-id box, filter bar, live tick) and
routing to the pages. `create_app(store, live=...)` is what `mythos-probe serve` and
`mythos-probe dashboard` call.

This module is not a view (see `pages/`), runs no SQL (`queries.py`) and does not open stores
(`cli.py`, `collectors.serve`). It imports no torch: the dashboard process never needs the model.
"""

from __future__ import annotations

import re
import threading

import dash
from dash import ALL, Input, Output, State, ctx, dcc, html, no_update

from mythos_probe.dashboards import filters, urlstate
from mythos_probe.dashboards.components import message, register_csv
from mythos_probe.dashboards.pages import PAGES, lens
from mythos_probe.dashboards.theme import CSS

LIVE_INTERVAL_MS = 2000
_HEX = re.compile(r"[0-9a-f]{1,32}")


def normalize_trace_id(text: str | None) -> str | None:
    """A pasted trace id as stored: 32 lowercase hex chars. Jaeger shows ids without leading zeros
    and some tools prefix `0x`, so both are accepted."""
    value = (text or "").strip().lower().removeprefix("0x")
    return value.zfill(32) if _HEX.fullmatch(value) else None


def _shell(live: bool) -> html.Div:
    nav = [dcc.Link(p.TITLE, href=p.PATH, id=f"app-nav-{p.__name__.rsplit('.', 1)[1]}") for p in PAGES]
    return html.Div(
        [
            dcc.Location(id="app-url", refresh="callback-nav"),
            dcc.Interval(id="app-interval", interval=LIVE_INTERVAL_MS, disabled=not live),
            html.Div(
                [
                    html.H1("mythos-probe"),
                    html.Span("live", className="mp-live") if live else None,
                    html.Nav(nav, className="mp-nav"),
                    html.Div(
                        [dcc.Input(id="app-trace-input", placeholder="paste a trace id (Phoenix, Jaeger…)", debounce=True),
                         html.Button("Open", id="app-trace-open")],
                        className="mp-open",
                    ),
                ],
                className="mp-header",
            ),
            html.Div(id="app-page"),
        ]
    )


def route(pathname: str | None, problem: str | None = None, search: str | None = None, store=None):
    if problem:
        return message(problem, "error")
    page = next((p for p in PAGES if p.PATH == (pathname or "/")), None)
    if page is None:
        return message(f"No page at {pathname}.", "error")
    # The filter bar is built with the page, both from the URL: every control starts with the
    # link's value, so nothing is written back over the link before the controls have it.
    state = urlstate.parse(search)[0]
    try:
        bar = filters.layout(state, store)
    except Exception:  # noqa: BLE001 — a store not readable yet (a writer holds it): the views say why
        bar = filters.layout(state, None)
    return [bar, html.Div(page.layout(state), className="mp-page")]


def open_trace(_clicks, _submits, text, search: str | None = None):
    trace_id = normalize_trace_id(text)
    if trace_id is None:
        return dash.no_update, message("A trace id is up to 32 hexadecimal characters.", "error") if text else ""
    return "/forward" + urlstate.with_values(search, trace=trace_id), ""


def nav_hrefs(search: str | None) -> list[str]:
    """Navigation links keep the whole state (filters, selected forward) so every view refers to
    the same forwards."""
    query = urlstate.encode(urlstate.parse(search)[0])
    return [p.PATH + query for p in PAGES]


def sync_controls(search: str | None, values: list, keys: list[str], from_url: bool):
    """The URL and the controls on the page agree: after the URL changed (a link, the back
    button, a chart selection) the controls take its values; after a control changed the URL
    takes the controls' values (a history entry, so back undoes it). Returns (search, values)."""
    state, _ = urlstate.parse(search)
    if from_url:
        shown = [list(state[k]) if urlstate.KEYS[k].multi else state[k] for k in keys]
        return no_update, [no_update if v == w else v for v, w in zip(shown, values)]
    state.update({k: tuple(v or ()) if urlstate.KEYS[k].multi else v for k, v in zip(keys, values)})
    wanted = urlstate.encode(state)
    return (no_update if wanted == urlstate.encode(urlstate.parse(search)[0]) else wanted), [no_update] * len(keys)


def create_app(store, live: bool = False, *, problem: str | None = None) -> dash.Dash:
    """The dashboard over `store` (a `collectors.store.Store`). With `live`, views refresh every
    two seconds. With `store=None`, every page shows `problem` (why no store could be opened)."""
    app = dash.Dash(__name__, title="mythos-probe", update_title=None, suppress_callback_exceptions=True)
    app.index_string = app.index_string.replace("{%css%}", "{%css%}<style>" + CSS + "</style>")
    app.layout = html.Div([_shell(live), html.Div(id="app-trace-message")])
    if store is None:
        problem = problem or "No store is open."
    else:
        filters.register(app, store)
        for page in PAGES:
            page.register(app, store)
        if not live:
            # A read-only store does not change: replay the default what-if once in the background so
            # the first visit finds it cached. A live store's next forward would void that replay, and
            # its writer may close the store at any time (serve on a port in use), so it runs none.
            threading.Thread(target=lens.prewarm, args=(store,), name="whatif-prewarm", daemon=True).start()
    register_csv(app)
    app.callback(Output("app-page", "children"), Input("app-url", "pathname"), State("app-url", "search"))(
        lambda path, search: route(path, problem, search, store))
    app.callback([Output(f"app-nav-{p.__name__.rsplit('.', 1)[1]}", "href") for p in PAGES], Input("app-url", "search"))(nav_hrefs)

    @app.callback(Output("app-url", "search"), Output({"type": "ctl", "key": ALL}, "value"),
                  Input("app-url", "search"), Input({"type": "ctl", "key": ALL}, "value"))
    def sync(search, values):
        keys = [item["id"]["key"] for item in ctx.inputs_list[1]]
        return sync_controls(search, values, keys, from_url=ctx.triggered_id in (None, "app-url"))

    app.callback(
        Output("app-url", "href", allow_duplicate=True), Output("app-trace-message", "children"),
        Input("app-trace-open", "n_clicks"), Input("app-trace-input", "n_submit"), State("app-trace-input", "value"),
        State("app-url", "search"), prevent_initial_call=True,
    )(open_trace)
    return app
