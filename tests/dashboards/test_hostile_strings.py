"""Every stored string is shown as text, never as markup: a real headless Chromium loads every page
(and hovers its charts) over a store whose token text, run ids, model ids, exit policies, loop
names and endpoints are Plotly markup pointing at a local listener, and the listener must see no
request. A run id with `|` still opens its forwards from a chart click."""

from __future__ import annotations

import dataclasses
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from mythos_probe.collectors.store import Store
from mythos_probe.dashboards.app import create_app
from mythos_probe.dashboards.components import click_target
from tests.dashboards.conftest import Served
from tests.dashboards.factory import BASE_NS, synthetic_trace
from tests.dashboards.test_browser import WAIT_S, no_console_errors

pytestmark = pytest.mark.browser


class Listener:
    """A local HTTP server that counts every request it gets (none may come)."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                listener.paths.append(self.path)
                self.send_response(204)
                self.end_headers()

            do_POST = do_HEAD = do_GET

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_port}"

    def evil(self, tag: str) -> str:
        """Plotly pseudo-HTML that fetches `tag` from the listener when rendered as markup."""
        return (f'<span style="background-image:url({self.base}/{tag}-q)">{tag}</span>'
                f'<span style=url({self.base}/{tag}-u)>x</span><a href="{self.base}/{tag}-a">a</a>')

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def hostile_traces(listener: Listener) -> list:
    rng = np.random.default_rng(5)
    out = []
    for i in range(6):
        t = synthetic_trace(rng, run_id=f"run|{i % 2}|" + listener.evil("run"), model_id=listener.evil("model"),
                            step=i, start_ns=BASE_NS + i * 60 * 10**9, attributes={"endpoint": listener.evil("endpoint")},
                            seq_len=4)
        out.append(dataclasses.replace(
            t, exit_policy=listener.evil("policy"), loop_name=listener.evil("loop"),
            token_text=tuple(tuple(listener.evil(f"tok{b}{s}") for s in range(t.seq_len)) for b in range(t.batch))))
    return out


_HOVER_ALL = """
const done = arguments[arguments.length - 1];
const graphs = [...document.querySelectorAll('.js-plotly-plot')];
for (const gd of graphs) {
  (gd.data || []).forEach((trace, curve) => {
    const n = Math.min(5, (trace.x || trace.z || trace.y || []).length || 1);
    // on the trace's own subplot: plotly.js throws later (uncaught, in its throttled hover) when a
    // trace of panel x2y2 is hovered as if on the default xy, as a real mouse never does
    const subplot = (trace.xaxis || 'x') + (trace.yaxis || 'y');
    for (let p = 0; p < n; p++) { try { Plotly.Fx.hover(gd, [{curveNumber: curve, pointNumber: p}], subplot); } catch (e) {} }
  });
}
setTimeout(() => done(graphs.length), 300);
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    listener = Listener()
    traces = hostile_traces(listener)
    store = Store(tmp_path_factory.mktemp("hostile") / "hostile.duckdb")
    store.write_traces(traces)
    served = Served(create_app(store))
    yield served.url, listener, traces
    served.close()
    store.close()
    listener.close()


def test_no_page_fetches_a_url_written_in_a_stored_string(browser, hostile):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, listener, traces = hostile
    pages = ["/", f"/forward?trace={traces[0].trace_id}", "/loops", "/halting", "/spectral", "/experts", "/cost",
             "/lens", "/convergence", "/depth", "/sweep", "/compare"]
    drawn, texts = 0, []
    for page in pages:
        browser.get(url + page)
        WebDriverWait(browser, WAIT_S).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .main-svg") or d.find_elements(By.CSS_SELECTOR, ".ag-row"),
            f"{page} never drew")
        WebDriverWait(browser, WAIT_S).until(  # the views' callbacks have answered
            lambda d: not d.find_elements(By.CSS_SELECTOR, "[data-dash-is-loading='true']"))
        drawn += browser.execute_async_script(_HOVER_ALL)
        texts += browser.execute_script(
            "return [...document.querySelectorAll('.main-svg text, .hoverlayer text')].map(e => e.textContent)")
    assert drawn >= 8  # charts were there to hover on
    no_console_errors(browser)  # read here, so that a page's script error is not blamed on a later test
    browser.get(url + f"/forward?trace={traces[0].trace_id}")
    # the forward's summary names the run and the model as text: the markup is visible, not applied
    summary = WebDriverWait(browser, WAIT_S).until(
        lambda d: (e := d.find_elements(By.ID, "forward-summary")) and "<span" in e[0].text and e[0].text)
    assert listener.evil("model") in summary
    assert listener.paths == []
    # and they were drawn, as the text they are: legends, ticks and hover labels show the markup
    # itself, escaped exactly once (no "&lt;" left over)
    assert any("<span style=\"background-image:url(" in t for t in texts)
    assert not any("&lt;" in t or "&amp;" in t for t in texts)


def test_a_run_id_with_a_bar_still_opens_its_forwards():
    ref = "run|1|<b>x</b>" + "|2026-01-01 00:00:00|2026-01-01 00:01:00"
    target = click_target({"points": [{"customdata": [ref]}]}, "")
    assert target is not None and "2026-01-01" in target
    from mythos_probe.dashboards import urlstate

    assert target.startswith("/?")
    state, problems = urlstate.parse(target[1:])
    assert state["run"] == ("run|1|<b>x</b>",) and not problems
    # as the browser sends it back: escaped by as_text
    escaped = ref.replace("<", "&lt;").replace(">", "&gt;")
    assert click_target({"points": [{"customdata": [escaped, 3]}]}, "") == target


def post_callback(client, outputs, inputs, state=()):
    body = {"output": ".." + "...".join(f"{i}.{p}" for i, p in outputs) + ".." if len(outputs) > 1
            else f"{outputs[0][0]}.{outputs[0][1]}",
            "outputs": [{"id": i, "property": p} for i, p in outputs] if len(outputs) > 1
            else {"id": outputs[0][0], "property": outputs[0][1]},
            "inputs": [{"id": i, "property": p, "value": v} for i, p, v in inputs],
            "changedPropIds": [f"{inputs[0][0]}.{inputs[0][1]}"],
            "state": [{"id": i, "property": p, "value": v} for i, p, v in state]}
    reply = client.post("/_dash-update-component", json=body)
    return reply.status_code, reply.get_data(as_text=True)


@pytest.fixture(scope="module")
def client(store):
    return create_app(store).server.test_client()


@pytest.mark.parametrize("request_, words", [
    ({"startRow": "x"}, ["startRow and endRow must be integers"]),
    ({"startRow": -5, "endRow": 10}, ["0 ≤ startRow ≤ endRow"]),
    ([1, 2], ["a grid request is an object"]),
    ({"startRow": 0, "endRow": 10, "sortModel": "run_id"}, ["sortModel must be a list"]),
    ({"startRow": 0, "endRow": 10, "sortModel": [{"colId": "nope", "sort": "asc"}]}, ["cannot sort", "nope"]),
    ({"startRow": 0, "endRow": 10, "filterModel": [1]}, ["filterModel must map"]),
    ({"startRow": 0, "endRow": 10, "filterModel": {"run_id": {"filterType": "zzz"}}}, ["unsupported filter zzz"]),
    ({"startRow": 0, "endRow": 10, "filterModel": {"iterations": {"filterType": "number", "type": "equals",
                                                                   "filter": "many"}}}, ["malformed"]),
])
def test_a_malformed_grid_request_is_a_400_naming_what_is_wrong(client, request_, words):
    grid = [("forwards-grid", "getRowsResponse")]
    status, text = post_callback(client, grid, [("forwards-grid", "getRowsRequest", request_)], [("app-url", "search", "")])
    assert status == 400, text[:300]
    for word in ["malformed forwards-grid request", *words]:
        assert word in text, (word, text[:300])
    good = post_callback(client, grid, [("forwards-grid", "getRowsRequest", {"startRow": 0, "endRow": 5})],
                         [("app-url", "search", "")])
    assert good[0] == 200 and '"rowCount":24' in good[1]


def test_a_lens_link_with_a_nan_range_says_so(client):
    outputs = [("lens-message", "children"), ("lens-heatmap", "figure"), ("lens-agreement", "figure"),
               ("lens-pareto", "figure"), ("lens-whatif", "children")]
    status, text = post_callback(client, outputs, [("app-interval", "n_intervals", 0),
                                                  ("app-url", "search", "?tmin=nan&tmax=inf")])
    assert status == 200
    assert "Ignored in this link" in text and "tmin='nan' is not a valid number" in text
    assert "tmax='inf' is not a valid number" in text
