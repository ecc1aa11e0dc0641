"""The dashboard in real headless Chromium: every view draws the stored data (checked against
numpy on the synthetic traces, read back from the plotly graph divs), filters change what is
drawn, pasted trace ids open their forward, live mode shows a forward written after page load,
and a store that cannot be opened is a message. Screenshots go to artifacts/screenshots/."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from mythos_probe import whatif as replay
from mythos_probe.dashboards import cli
from mythos_probe.dashboards.app import create_app
from mythos_probe.dashboards.components import ITERATION_AXIS
from tests.dashboards.conftest import DIVERGED, Served
from tests.dashboards.factory import BASE_NS, synthetic_trace

pytestmark = pytest.mark.browser

SCREENSHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"
WAIT_S = 30  # generous: a slow CI machine only makes the tests slower, never wrong

_READ_GRAPH = """
const gd = document.querySelector('#' + arguments[0] + ' .js-plotly-plot');
if (!gd || !gd.data || !gd.layout || !gd.layout.title) return null;
const title = (a) => (gd.layout[a] && gd.layout[a].title && gd.layout[a].title.text) || '';
return JSON.stringify({
  title: gd.layout.title.text || '', xaxis: title('xaxis'), yaxis: title('yaxis'),
  data: gd.data.map(t => ({name: t.name, type: t.type, x: t.x, y: t.y, z: t.z})),
});
"""


def _decode(value):
    """Plotly ships numpy arrays as base64 typed arrays; nested lists stay lists."""
    if isinstance(value, dict) and "bdata" in value:
        arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape") or (value.get("_inputArray") or {}).get("shape")
        return arr.reshape([int(s) for s in str(shape).split(",")]) if shape else arr
    return value


def read_graph(browser, graph_id: str, title: str, changed_from=None) -> dict:
    """The graph's title, axis titles and traces once its title contains `title` (and, when given,
    its data differs from `changed_from`)."""
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(driver):
        raw = driver.execute_script(_READ_GRAPH, graph_id)
        if not raw:
            return False
        fig = json.loads(raw)
        if title not in fig["title"] or not fig["data"]:
            return False
        if changed_from is not None and fig["data"] == changed_from["raw"]:
            return False
        return {**fig, "raw": fig["data"], "data": [{k: _decode(v) for k, v in t.items()} for t in fig["data"]]}

    return WebDriverWait(browser, WAIT_S).until(ready, f"graph {graph_id} titled {title!r} never drew")


def wait_text(browser, element_id: str, text: str) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(driver):
        found = driver.find_elements(By.XPATH, f"//*[@id='{element_id}']")
        return found[0].text if found and text in found[0].text else False

    return WebDriverWait(browser, WAIT_S).until(ready, f"#{element_id} never showed {text!r}")


def ctl(key: str) -> str:
    """The DOM id Dash gives the control of URL key `key` (its dict id, keys sorted)."""
    return json.dumps({"key": key, "type": "ctl"}, separators=(",", ":"))


def by_id(browser, element_id: str):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.XPATH, f"//*[@id='{element_id}']")


def choose(browser, dropdown_id: str, label: str) -> None:
    """Pick `label` in a dcc.Dropdown the way a user does: open it, click the option, close it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    by_id(browser, dropdown_id).click()
    option = WebDriverWait(browser, WAIT_S).until(
        lambda d: next((o for o in d.find_elements(By.CSS_SELECTOR, "[role=option]") if o.text == label), False),
        f"{dropdown_id} never offered {label!r}",
    )
    option.click()
    browser.switch_to.active_element.send_keys(Keys.ESCAPE)


_GRID_ROWS = """
const rows = [...document.querySelectorAll('#' + arguments[0] + ' .ag-center-cols-container .ag-row')];
rows.sort((a, b) => +a.getAttribute('row-index') - +b.getAttribute('row-index'));
return rows.map(r => [...r.querySelectorAll('.ag-cell')].sort((a, b) => a.getBoundingClientRect().left - b.getBoundingClientRect().left)
  .map(c => [c.getAttribute('col-id'), c.innerText]));
"""


def grid_rows(browser, container_id: str, count: int | None = None) -> list[dict]:
    """The rows an ag-grid inside `container_id` shows (column id → text), once it shows any (or,
    with `count`, exactly that many)."""
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(driver):
        rows = driver.execute_script(_GRID_ROWS, container_id)
        if not rows or not all(r and all(text for _, text in r[:1]) for r in rows):
            return False
        return [dict(r) for r in rows] if count is None or len(rows) == count else False

    return WebDriverWait(browser, WAIT_S).until(ready, f"grid in #{container_id} never showed {count or 'any'} rows")


def screenshot(browser, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1440, max(900, min(height + 160, 2400)))
    browser.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
    browser.set_window_size(1440, 1100)


def no_console_errors(browser) -> None:
    severe = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


@pytest.fixture(scope="module")
def site(store):
    served = Served(create_app(store))
    yield served.url
    served.close()


def first_stat(browser) -> str:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # a live tick may redraw the stats between finding the element and reading it: read again
    return WebDriverWait(browser, WAIT_S, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#forwards-stats .mp-stat b").text)


def test_runs_page_counts_forwards_and_filters_by_run(browser, site, traces):
    from selenium.webdriver.common.by import By

    browser.get(site + "/")
    wait_text(browser, "forwards-stats", "forwards")
    assert first_stat(browser) == str(len(traces))
    runs = grid_rows(browser, "forwards-runs-table", 3)
    assert sorted(r["run_id"] for r in runs) == ["run-a", "run-b", "run-c"]
    grid_rows(browser, "forwards-list", min(len(traces), 50))
    screenshot(browser, "runs")
    choose(browser, ctl("run"), "run-b")
    wanted = [t for t in traces if t.run_id == "run-b"]
    wait_text(browser, "forwards-stats", f"{len(wanted)}\nforwards")
    rows = grid_rows(browser, "forwards-list", len(wanted))
    assert all(r["run_id"] == "run-b" for r in rows)
    newest = max(wanted, key=lambda t: t.start_ns)
    assert rows[0]["trace_id"] == newest.trace_id  # newest first
    browser.find_element(By.CSS_SELECTOR, "#forwards-list .ag-row[row-index='0'] a").click()  # opens its detail
    wait_text(browser, "forward-summary", newest.trace_id)
    assert browser.current_url.endswith(f"/forward?run=run-b&trace={newest.trace_id}")
    no_console_errors(browser)


def test_pasted_trace_id_opens_the_same_forward(browser, site, traces):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(site + "/")
    wait_text(browser, "forwards-stats", "forwards")
    box = browser.find_element(By.ID, "app-trace-input")
    box.send_keys(traces[0].trace_id.lstrip("0") + Keys.ENTER)  # as Jaeger shows it
    wait_text(browser, "forward-summary", traces[0].trace_id)
    assert "/forward?trace=" + traces[0].trace_id in browser.current_url


def test_unknown_trace_id_is_a_message_in_the_page(browser, site):
    browser.get(site + "/forward?trace=" + "e" * 32)
    wait_text(browser, "forward-message", "No forward with trace id")


def test_forward_heatmap_shows_positions_iterations_and_halting(browser, site, traces):
    t = traces[4]
    browser.get(site + f"/forward?trace={t.trace_id}")
    fig = read_graph(browser, "forward-heatmap", "batch row 0")
    assert (fig["xaxis"], fig["yaxis"]) == (ITERATION_AXIS, "position · token")
    heat, marks = fig["data"]
    np.testing.assert_allclose(heat["z"], np.log10(t.position_metrics["rel_residual"][0]), rtol=1e-5)
    assert heat["y"] == [f"{p} {w}" for p, w in enumerate(t.token_text[0])]
    assert list(marks["x"]) == list(t.position_iterations[0])  # iterations count from 1
    screenshot(browser, "forward")
    choose(browser, ctl("batch"), "1")
    fig = read_graph(browser, "forward-heatmap", "batch row 1")
    np.testing.assert_allclose(fig["data"][0]["z"], np.log10(t.position_metrics["rel_residual"][1]), rtol=1e-5)
    no_console_errors(browser)


def test_loop_distribution_counts_tokens_and_follows_the_model_filter(browser, site, traces):
    browser.get(site + "/loops")
    fig = read_graph(browser, "loops-tokens", "per token")
    assert (fig["xaxis"], fig["yaxis"]) == ("iterations used", "tokens")

    def histogram(subset):
        counts = np.bincount(np.concatenate([t.position_iterations.ravel() for t in subset]))
        used = np.flatnonzero(counts)
        return used.tolist(), counts[used].tolist()

    bar = fig["data"][0]
    assert (list(bar["x"]), list(bar["y"])) == histogram(traces)
    wait_text(browser, "loops-saved", "loop compute saved")
    screenshot(browser, "loops")
    choose(browser, ctl("model"), "mythos-small")
    fig = read_graph(browser, "loops-tokens", "per token", changed_from=fig)
    bar = fig["data"][0]
    assert (list(bar["x"]), list(bar["y"])) == histogram([t for t in traces if t.model_id == "mythos-small"])


def test_halting_histogram_and_cumulative_curve(browser, site, traces):
    """Two models are stored: the view shows the newest one's forwards, and says so."""
    newest = max(traces, key=lambda t: t.start_ns)
    browser.get(site + "/halting")
    wait_text(browser, "halting-message", f"Showing model {newest.model_id} · loop loop only")
    steps = read_graph(browser, "halting-steps", "Halt-step")
    exits = np.zeros(newest.n_loops)
    for t in traces:
        if t.model_id == newest.model_id:
            exits[: t.iterations] += t.iteration_metrics["exit_count"]
    np.testing.assert_allclose(steps["data"][0]["y"], exits)
    cumulative = read_graph(browser, "halting-cumulative", "Cumulative")
    np.testing.assert_allclose(cumulative["data"][0]["y"], np.cumsum(exits) / exits.sum())
    read_graph(browser, "halting-saturation", "saturation")
    screenshot(browser, "halting")


def test_spectral_view_marks_the_diverged_forward(browser, site, traces):
    bad = traces[DIVERGED]
    browser.get(site + f"/spectral?model={bad.model_id}")
    fig = read_graph(browser, "spectral-rho", "ρ(Ā)")
    assert fig["xaxis"] == "step"
    runs = sorted({t.run_id for t in traces if t.model_id == bad.model_id})
    assert sorted({d.get("name") for d in fig["data"] if d.get("name")}) == ["diverged", *runs]
    marker = next(d for d in fig["data"] if d.get("name") == "diverged")
    assert list(marker["x"]) == [bad.step]
    wait_text(browser, "spectral-divergences", bad.trace_id)
    read_graph(browser, "spectral-growth", "Growth ratio")
    screenshot(browser, "spectral")


def test_expert_heatmap_shows_load_shares(browser, site, traces):
    browser.get(site + "/experts?model=mythos-tiny")
    fig = read_graph(browser, "experts-load", "balanced share")
    load = np.zeros((8, 4))
    for t in traces:
        if t.model_id == "mythos-tiny":
            load[: t.iterations] += t.expert_load
    share = (load / load.sum(axis=1, keepdims=True)).T  # expert × iteration
    np.testing.assert_allclose(fig["data"][0]["z"], share * 4)  # relative to 1/E
    assert (fig["xaxis"], fig["yaxis"]) == (ITERATION_AXIS, "expert")
    assert list(fig["data"][0]["x"]) == list(range(1, 9))
    read_graph(browser, "experts-overlap", "Top-k overlap")
    screenshot(browser, "experts")


def test_cost_grouped_by_endpoint(browser, site, traces):
    browser.get(site + "/cost")
    before = read_graph(browser, "cost-flops", "FLOPs by group")
    assert [d["name"] for d in before["data"]] == ["all"]
    choose(browser, ctl("group"), "endpoint")
    fig = read_graph(browser, "cost-flops", "FLOPs by group", changed_from=before)
    by_endpoint = {d["name"]: float(np.asarray(d["y"])[0]) for d in fig["data"]}
    expected = {e: sum(t.forward_metrics["flops"] for t in traces if t.attributes["endpoint"] == e) for e in ("/chat", "/code")}
    assert by_endpoint == pytest.approx(expected)
    read_graph(browser, "cost-time", "over time")
    screenshot(browser, "cost")


def test_lens_page_shows_kl_heatmap_and_the_early_exit_pareto(browser, site, traces):
    newest = max(traces, key=lambda t: t.start_ns)
    browser.get(site + "/lens")
    heat = read_graph(browser, "lens-heatmap", newest.trace_id[:8])
    np.testing.assert_allclose(np.asarray(heat["data"][0]["z"])[:, :-1],
                               np.log10(newest.position_metrics["lens_kl_final"][0][:, :-1]), rtol=1e-5)
    fig = read_graph(browser, "lens-pareto", "saved vs agreement")
    expected = replay.evaluate(traces)  # the replay over the traces themselves, not the store
    for drawn in fig["data"][: expected["criterion"].nunique()]:
        rows = expected[expected["criterion"] == drawn["name"]]
        np.testing.assert_allclose(drawn["x"], rows["iterations_saved"])
        np.testing.assert_allclose(drawn["y"], rows["agreement"])
    wait_text(browser, "lens-whatif", "top-1 agreement at exit")
    screenshot(browser, "lens")
    no_console_errors(browser)


def test_convergence_compares_two_runs_on_one_scale(browser, site, traces):
    browser.get(site + "/convergence?group=run&run=run-a&run=run-c")
    sides = [read_graph(browser, "convergence-a", "run-a"), read_graph(browser, "convergence-b", "run-c")]
    for fig, run in zip(sides, ("run-a", "run-c")):
        mine = np.concatenate([t.position_metrics["rel_residual"] for t in traces if t.run_id == run])
        z = np.asarray(fig["data"][0]["z"], dtype=float)
        np.testing.assert_allclose(z[:, : mine.shape[-1]], np.log10(mine.mean(axis=0)), rtol=1e-5)
    screenshot(browser, "convergence")


def test_live_mode_shows_forwards_written_after_page_load(browser, empty_store):
    served = Served(create_app(empty_store, live=True))
    try:
        browser.get(served.url + "/")
        wait_text(browser, "forwards-message", "no forwards yet")
        trace = synthetic_trace(np.random.default_rng(1), start_ns=BASE_NS, run_id="live-run")
        empty_store.write_traces([trace])
        wait_text(browser, "forwards-list", trace.trace_id)
        assert first_stat(browser) == "1"
    finally:
        browser.get("about:blank")  # stop the page polling first: its failed polls would be the next test's console errors
        served.close()


def test_store_that_cannot_be_opened_is_a_message_in_the_page(browser, tmp_path):
    store, problem = cli.open_store(str(tmp_path / "missing.duckdb"))
    served = Served(create_app(store, problem=problem))
    try:
        browser.get(served.url + "/loops")
        wait_text(browser, "app-page", "no store at")
        no_console_errors(browser)
    finally:
        served.close()
