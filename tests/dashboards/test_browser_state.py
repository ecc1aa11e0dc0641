"""The dashboard's state and links in real headless Chromium: a link reproduces the view and the
back button undoes a filter change, served forwards are the default, CSV downloads hold what SQL
says, chart points open their forwards, a range selected on a time chart becomes the time
filter, and loading spinners appear while a callback runs."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pandas as pd
import pytest

from mythos_probe.dashboards import components
from mythos_probe.dashboards.app import create_app
from tests.dashboards.conftest import DIVERGED, Served
from tests.dashboards.test_browser import WAIT_S, by_id, choose, ctl, first_stat, grid_rows, read_graph, wait_text

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def site(store):
    served = Served(create_app(store))
    yield served.url
    served.close()


@pytest.fixture(scope="module")
def mixed_site(mixed):
    served = Served(create_app(mixed[0]))
    yield served.url
    served.close()


def query(browser) -> dict:
    return parse_qs(urlparse(browser.current_url).query)


def wait_url(browser, text: str, present: bool = True) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, WAIT_S).until(lambda d: (text in d.current_url) == present,
                                         f"URL never {'had' if present else 'lost'} {text!r}")


def settled(browser) -> None:
    """Wait until no callback is pending, so that a chart is not redrawn under the test's feet."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, WAIT_S).until(
        lambda d: not d.execute_script("return document.querySelector('[data-dash-is-loading]')"), "callbacks never settled")
    time.sleep(0.5)


def dropdown_text(browser, key: str) -> str:
    return by_id(browser, ctl(key)).text


def test_a_link_reproduces_the_view_and_back_undoes_a_filter(browser, site, traces):
    def histogram(subset):
        counts = np.bincount(np.concatenate([t.position_iterations.ravel() for t in subset]))
        return np.flatnonzero(counts).tolist()

    small = [t for t in traces if t.model_id == "mythos-small"]
    browser.get(site + "/loops?model=mythos-small&group=run")
    fig = read_graph(browser, "loops-tokens", "per token")
    assert sorted(d["name"] for d in fig["data"]) == sorted({t.run_id for t in small})  # grouped by run
    assert list(fig["data"][0]["x"]) == histogram(small)
    assert "mythos-small" in dropdown_text(browser, "model") and "run" in dropdown_text(browser, "group")
    choose(browser, ctl("group"), "endpoint")
    wait_url(browser, "group=attr")
    fig = read_graph(browser, "loops-tokens", "per token", changed_from=fig)
    assert sorted(d["name"] for d in fig["data"]) == ["/chat", "/code"]
    browser.back()  # the filter change was a history entry
    wait_url(browser, "group=run")
    fig = read_graph(browser, "loops-tokens", "per token", changed_from=fig)
    assert sorted(d["name"] for d in fig["data"]) == sorted({t.run_id for t in small})
    wait_text(browser, ctl("group"), "run")
    assert query(browser) == {"model": ["mythos-small"], "group": ["run"]}


def test_served_forwards_by_default_and_a_control_for_every_kind(browser, mixed_site, mixed):
    _, traces = mixed
    browser.get(mixed_site + "/")
    wait_text(browser, "forwards-stats", "forwards")
    assert first_stat(browser) == str(sum(t.kind == "served" for t in traces))
    assert "served" in dropdown_text(browser, "kind")
    choose(browser, ctl("kind"), "every kind")
    wait_text(browser, "forwards-stats", f"{len(traces)}\nforwards")
    assert query(browser)["kind"] == ["all"]
    choose(browser, ctl("group"), "rank")
    wait_url(browser, "group=rank")
    browser.get(mixed_site + "/loops?kind=training&group=loop")
    training = [t for t in traces if t.kind == "training"]
    loops = {t.loop_name for t in training}
    rows = grid_rows(browser, "loops-saved-table", len(loops))
    assert {r["grp"]: int(r["forwards"]) for r in rows} == {k: sum(t.loop_name == k for t in training) for k in loops}


def _downloaded(folder: Path, name: str) -> pd.DataFrame:
    from selenium.webdriver.support.ui import WebDriverWait

    path = folder / name
    WebDriverWait(None, WAIT_S, poll_frequency=0.2).until(
        lambda _: path.exists() and not (folder / (name + ".crdownload")).exists(), f"{name} was never downloaded")
    return pd.read_csv(path)


def test_csv_downloads_hold_what_sql_says(browser, site, store, tmp_path):
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path)})
    browser.get(site + "/?run=run-b&val=%2Fchat&attr=endpoint")
    grid_rows(browser, "forwards-list")
    by_id(browser, "forwards-csv").click()
    got = _downloaded(tmp_path, "forwards.csv")
    want = store.query(
        "SELECT trace_id, duration_ms, json_extract_string(attributes, '$.user') AS u FROM forwards"
        " WHERE kind = 'served' AND run_id = 'run-b' AND json_extract_string(attributes, '$.endpoint') = '/chat'"
        " ORDER BY start_time DESC, trace_id")
    assert got["trace_id"].tolist() == want["trace_id"].tolist()
    np.testing.assert_allclose(got["duration_ms"], want["duration_ms"])
    assert got["attr__user"].tolist() == want["u"].tolist()
    browser.get(site + "/")
    grid_rows(browser, "forwards-runs-table", 3)
    browser.find_element("css selector", "#forwards-runs-table .mp-csv").click()
    runs = _downloaded(tmp_path, "forwards-runs-table.csv").set_index("run")
    want = store.query("SELECT run_id, count(*) AS n, sum(tokens) AS tokens FROM forwards GROUP BY run_id").set_index("run_id")
    assert runs["forwards"].to_dict() == want["n"].to_dict()
    assert runs["tokens"].astype(int).to_dict() == want["tokens"].to_dict()


def _click_point(browser, graph_id: str, trace_name: str, index: int, height: float = 1.0) -> None:
    """A real mouse click on point `index` of the trace named `trace_name` (for a bar, at
    `height` × its value)."""
    from selenium.webdriver.common.action_chains import ActionChains

    xy = browser.execute_script("""
        const gd = document.querySelector('#' + arguments[0] + ' .js-plotly-plot');
        const k = gd.data.findIndex(t => t.name === arguments[1]);
        const t = gd._fullData[k], L = gd._fullLayout, box = gd.getBoundingClientRect();
        const xa = L[t.xaxis === 'x' ? 'xaxis' : 'xaxis' + t.xaxis.slice(1)], ya = L.yaxis;
        const x = xa.d2p(t.x[arguments[2]]) + xa._offset, y = ya.d2p(t.y[arguments[2]] * arguments[3]) + ya._offset;
        return [x - box.width / 2, y - box.height / 2];
    """, graph_id, trace_name, index, height)
    plot = browser.find_element("css selector", f"#{graph_id} .js-plotly-plot")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", plot)
    ActionChains(browser).move_to_element_with_offset(plot, int(xy[0]), int(xy[1])).pause(0.3).click().perform()


def test_chart_points_open_their_forwards(browser, site, traces):
    bad = traces[DIVERGED]
    browser.get(site + f"/spectral?model={bad.model_id}")
    fig = read_graph(browser, "spectral-rho", "ρ(Ā)")
    marker = next(d for d in fig["data"] if d.get("name") == "diverged")
    assert list(marker["x"]) == [bad.step]
    _click_point(browser, "spectral-rho", "diverged", 0)
    wait_text(browser, "forward-summary", bad.trace_id)
    assert query(browser)["trace"] == [bad.trace_id]
    browser.get(site + "/spectral?x=time&run=run-a")
    read_graph(browser, "spectral-rho", "ρ(Ā)")
    _click_point(browser, "spectral-rho", "run-a", 0)  # a bucket of run-a's forwards
    wait_url(browser, "from=")
    state = query(browser)
    assert urlparse(browser.current_url).path == "/" and state["run"] == ["run-a"]
    lo, hi = pd.Timestamp(state["from"][0]), pd.Timestamp(state["to"][0])
    inside = [t for t in traces if t.run_id == "run-a" and lo <= pd.Timestamp(t.start_ns, unit="ns") <= hi]
    rows = grid_rows(browser, "forwards-list", len(inside))
    assert {r["trace_id"] for r in rows} == {t.trace_id for t in inside}


def test_a_bar_opens_the_forwards_it_counts(browser, site, traces):
    browser.get(site + "/loops")
    fig = read_graph(browser, "loops-forwards", "per forward")
    bars = fig["data"][0]
    k = list(bars["x"]).index(6)  # forwards that ran 6 iterations
    _click_point(browser, "loops-forwards", "all", k, height=0.5)
    wait_url(browser, "imin=6")
    assert query(browser) == {"imin": ["6"], "imax": ["6"]}
    rows = grid_rows(browser, "forwards-list", int(np.asarray(bars["y"])[k]))
    assert {r["trace_id"] for r in rows} == {t.trace_id for t in traces if t.iterations == 6}


def test_selecting_a_range_on_a_time_chart_sets_the_time_filter(browser, site, traces):
    browser.get(site + "/spectral?x=time")
    read_graph(browser, "spectral-rho", "ρ(Ā)")
    settled(browser)
    browser.execute_script("""
        const gd = document.querySelector('#spectral-rho .js-plotly-plot');
        Plotly.relayout(gd, {'xaxis.range': ['2026-01-01 01:00:00', '2026-01-01 02:30:00']});
    """)
    wait_url(browser, "from=")
    assert query(browser)["from"] == ["2026-01-01 01:00:00"] and query(browser)["to"] == ["2026-01-01 02:30:00"]
    assert by_id(browser, ctl("from")).get_attribute("value") == "2026-01-01 01:00:00"


def test_loading_spinners_appear_while_a_view_updates(browser, store, monkeypatch):
    monkeypatch.setattr(components, "LOADING_DELAY_MS", 0)
    served = Served(create_app(store))
    try:
        browser.get(served.url + "/halting")
        read_graph(browser, "halting-steps", "Halt-step")
        # Record every spinner that appears from now on, however briefly.
        browser.execute_script("""
            window.__spinners = new Set();
            new MutationObserver(() => document.querySelectorAll('.dash-spinner').forEach(s => {
                const card = s.closest('.mp-card');  // the graph the spinner covers
                window.__spinners.add(card && card.querySelector('[id]') ? card.querySelector('[id]').id : '?');
            })).observe(document.body, {subtree: true, childList: true, attributes: true});
        """)
        choose(browser, ctl("model"), "mythos-small")
        read_graph(browser, "halting-steps", "Halt-step")
        deadline = time.time() + WAIT_S
        while time.time() < deadline and not browser.execute_script("return window.__spinners.size"):
            time.sleep(0.1)
        seen = browser.execute_script("return [...window.__spinners]")
        assert any("halting" in s for s in seen), seen
    finally:
        served.close()


def test_dark_theme_follows_the_system_setting(browser, site):
    dark = {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", dark)
    try:
        browser.get(site + "/loops")
        read_graph(browser, "loops-tokens", "per token")
        grid_rows(browser, "loops-saved-table")
        background = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
        r, g, b = (int(v) for v in background[background.index("(") + 1 : -1].split(",")[:3])
        assert max(r, g, b) < 60, background
        assert browser.execute_script("return document.documentElement.dataset.agThemeMode") == "dark"
        text = browser.execute_script(
            "return getComputedStyle(document.querySelector('#loops-tokens .main-svg text')).fill")
        assert int(text[text.index("(") + 1 :].split(",")[0]) > 150, text  # light chart text on the dark card
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})


def test_a_chart_downloads_the_numbers_it_draws(browser, site, store, tmp_path):
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path)})
    browser.get(site + "/loops?group=model")
    read_graph(browser, "loops-tokens", "per token")
    by_id(browser, '{"graph":"loops-tokens","type":"chart-csv"}').click()
    got = _downloaded(tmp_path, "loops-tokens.csv")
    want = store.query(
        "SELECT f.model_id AS series, i.iteration + 1 AS x, sum(i.exit_count) AS y FROM iterations i"
        " JOIN forwards f USING (forward_id) WHERE f.kind = 'served' GROUP BY ALL HAVING sum(i.exit_count) > 0"
        " ORDER BY series, x")
    assert list(got.columns) == ["series", "iterations used", "tokens"]  # named after the chart's axes
    assert got[["series", "iterations used"]].values.tolist() == want[["series", "x"]].values.tolist()
    np.testing.assert_allclose(got["tokens"], want["y"])
