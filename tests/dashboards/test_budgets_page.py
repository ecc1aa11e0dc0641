"""The Budgets page in real headless Chromium: the profiles file's groups with their evidence,
and each endpoint's estimated FLOPs over time against its limit (checked against the stored
traces' sums)."""

from __future__ import annotations

import numpy as np
import pytest

from mythos_probe.dashboards.app import create_app
from mythos_probe.dashboards.pages import budgets
from mythos_probe.loop_profiles import CostLimit, LoopProfiles, Profile
from tests.dashboards.conftest import Served
from tests.dashboards.test_browser import read_graph, wait_text

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def profiles_file(tmp_path_factory):
    profiles = LoopProfiles("endpoint", 0.99, {
        "/chat": Profile("/chat", "latent", 5, exit_threshold=0.02, forwards=40, positions=640, agreement=0.998,
                         agreement_lower=0.991, mean_iterations=3.5, iterations_saved=0.56, flops_saved=0.41,
                         full_depth=8),
        "/code": Profile("/code", "fixed", 8, forwards=3, full_depth=8, note="too little evidence: 3 shadows"),
    }, 8, (CostLimit("endpoint", "/chat", 5e9, 600, degraded_max_loops=2),))
    return profiles.save(tmp_path_factory.mktemp("budgets") / "profiles.json")


def test_budgets_page_shows_profiles_and_cost_against_limits(browser, store, traces, profiles_file, monkeypatch):
    monkeypatch.setenv(budgets.ENV, str(profiles_file))
    served = Served(create_app(store))
    try:
        browser.get(served.url + "/budgets")
        wait_text(browser, "budgets-table", "latent τ=0.02, max 5 of 8 loops")
        wait_text(browser, "budgets-table", "too little evidence: 3 shadows")
        wait_text(browser, "budgets-table", "5e+09 FLOPs / 600 s")
        fig = read_graph(browser, "budgets-cost", "against limits")
        drawn = {d["name"]: float(np.sum(np.asarray(d["y"], dtype=float))) for d in fig["data"]}
        expected = {e: sum(t.forward_metrics["flops"] for t in traces if t.attributes["endpoint"] == e
                           and t.kind == "served") for e in ("/chat", "/code")}
        assert drawn == pytest.approx(expected)
    finally:
        served.close()
