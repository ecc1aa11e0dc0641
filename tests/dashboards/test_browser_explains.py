"""The dashboard explains itself, in real headless Chromium: a bad link's problems are shown and
its dropdowns keep valid values, an empty view names the filter that hides the stored forwards,
no page scrolls sideways at 800 px, every control is dark in the dark theme, and table CSVs hold
plain numbers without a byte-order mark."""

from __future__ import annotations

import dataclasses

import pytest

from mythos_probe.collectors.store import Store
from mythos_probe.dashboards.app import create_app
from mythos_probe.dashboards.pages import PAGES
from tests.dashboards.conftest import Served, make_mixed_traces
from tests.dashboards.test_browser import WAIT_S, by_id, ctl, grid_rows, read_graph, wait_text
from tests.dashboards.test_browser_state import _downloaded

pytestmark = pytest.mark.browser

DARK = {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}


@pytest.fixture(scope="module")
def site(store):
    served = Served(create_app(store))
    yield served.url
    served.close()


def test_a_bad_link_says_what_it_ignored_and_keeps_valid_controls(browser, site):
    browser.get(site + "/?kind=bogus&imin=abc")
    text = wait_text(browser, "forwards-message", "Ignored in this link")
    assert "kind='bogus' is not one of served, shadow, training, all" in text
    assert "imin='abc' is not a valid int" in text
    assert "served" in by_id(browser, ctl("kind")).text  # not a blank dropdown


def test_an_empty_view_names_the_filter_that_hides_the_forwards(browser, tmp_path):
    store = Store(tmp_path / "training.duckdb")
    store.write_traces([dataclasses.replace(t, kind="training") for t in make_mixed_traces()[:3]])
    served = Served(create_app(store))
    try:
        browser.get(served.url + "/loops")
        text = wait_text(browser, "loops-message", "No forwards match")
        assert "Forward kind (served) hides 3 training" in text
    finally:
        served.close()
        store.close()


def _side_scroll(browser) -> int:
    return browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")


def test_no_page_scrolls_sideways_at_800px_and_controls_are_dark_in_the_dark_theme(browser, site):
    browser.set_window_size(800, 1000)
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", DARK)
    try:
        for page in PAGES:
            browser.get(site + page.PATH)
            from selenium.webdriver.support.ui import WebDriverWait

            WebDriverWait(browser, WAIT_S).until(
                lambda d: d.execute_script("return document.querySelectorAll('.mp-page').length")
                and not d.execute_script("return document.querySelector('[data-dash-is-loading]')"),
                f"{page.PATH} never settled")
            assert _side_scroll(browser) <= 0, page.PATH
            # the kind dropdown's box: Dash 4 draws it from --Dash-Fill-Inverse-Strong
            box = browser.execute_script(
                "const e = document.getElementById(arguments[0]);"
                "const c = e.querySelector('button, [class*=dropdown]') || e;"
                "return getComputedStyle(c).backgroundColor", ctl("kind"))
            rgb = [int(v) for v in box[box.index("(") + 1: box.index(")")].split(",")[:3]]
            assert max(rgb) < 80, (page.PATH, box)
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
        browser.set_window_size(1440, 1100)


def test_table_csv_holds_plain_numbers_without_a_byte_order_mark(browser, site, store, tmp_path):
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path)})
    browser.get(site + "/loops?group=model")
    read_graph(browser, "loops-tokens", "per token")
    grid_rows(browser, "loops-saved-table", 2)
    browser.find_element("css selector", "#loops-saved-table .mp-csv").click()
    _downloaded(tmp_path, "loops-saved-table.csv")
    raw = (tmp_path / "loops-saved-table.csv").read_bytes()
    assert not raw.startswith(b"\xef\xbb\xbf"), raw[:20]
    assert b"%" not in raw, raw
    want = store.query("SELECT model_id, 1 - sum(mean_iterations * batch * seq_len) / sum(n_loops * batch * seq_len) AS s"
                       " FROM forwards WHERE kind = 'served' GROUP BY model_id ORDER BY model_id")
    import io

    import pandas as pd

    got = pd.read_csv(io.BytesIO(raw))
    share = [c for c in got.columns if "saved" in c.lower()][0]
    assert got[share].tolist() == pytest.approx(want["s"].tolist(), rel=1e-9)
