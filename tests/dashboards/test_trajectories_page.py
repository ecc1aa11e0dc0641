"""The Latent trajectories page in real headless Chromium over a store of 10,000 forwards: the paths
drawn are the stored projections of each position (checked against the trace's own arrays, read
back from the plotly graph div), fixed points are starred where the probe put them, the newest
forward with trajectories is found among thousands without, and a forward recorded without the
probe says how to record it. No timing here: click → drawn is measured by
benchmarks/bench_dashboard_browser.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mythos_probe.collectors.store import Store
from mythos_probe.dashboards.app import create_app
from mythos_probe.dashboards.pages import trajectories as page
from tests.dashboards.conftest import Served
from tests.dashboards.factory import BASE_NS, synthetic_trace
from tests.dashboards.test_browser import read_graph, wait_text
from tests.probes.test_trajectory import H, SETTLE, run

pytestmark = pytest.mark.browser

FORWARDS = 10_000


def summary_forwards(n: int) -> list:
    """`n` forwards at detail "summary" (no trajectories), from a pool of 20 with fresh identities."""
    rng = np.random.default_rng(3)
    pool = [dataclasses.replace(synthetic_trace(rng, n_loops=8, seq_len=12), detail="summary", position_metrics={},
                                position_iterations=None, token_ids=None, token_text=None) for _ in range(20)]
    return [dataclasses.replace(pool[i % 20], trace_id=f"{i + 1:032x}", span_id=f"{i + 1:016x}", step=i,
                                start_ns=BASE_NS + i * 10**9, end_ns=BASE_NS + i * 10**9 + 10**6)
            for i in range(n)]


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """(url, the trajectory trace, a summary trace): 9,998 summary forwards, one older forward with
    trajectories and, newest, the made-up paths of tests/probes/test_trajectory.py."""
    made_up = run(H)
    older = dataclasses.replace(run(H[::-1].copy()), start_ns=BASE_NS - 10**9, end_ns=BASE_NS)
    made_up = dataclasses.replace(made_up, start_ns=BASE_NS + FORWARDS * 10**9, end_ns=BASE_NS + FORWARDS * 10**9 + 1)
    rest = summary_forwards(FORWARDS - 2)
    with Store(tmp_path_factory.mktemp("traj") / "big.duckdb") as store:
        for i in range(0, len(rest), 2500):
            store.write_traces(rest[i : i + 2500])
        store.write_traces([older, made_up])
        assert int(store.query("SELECT count(*) AS n FROM forwards")["n"][0]) == FORWARDS
        served = Served(create_app(store))
        yield served.url, made_up, rest[-1]
        served.close()


def test_paths_are_the_stored_projections_with_fixed_points_starred(browser, big):
    url, trace, _ = big
    browser.get(f"{url}/trajectories?trace={trace.trace_id}")
    fig = read_graph(browser, "traj-paths", "Paths on PC1 × PC2")
    paths = [d for d in fig["data"] if d["name"] not in ("t=0", "fixed point")]
    assert len(paths) == trace.seq_len
    for p, d in enumerate(paths):
        assert d["name"].startswith(f"{p} (")
        np.testing.assert_array_equal(np.asarray(d["x"], np.float32), trace.position_metrics["traj_pc1"][0, p])
        np.testing.assert_array_equal(np.asarray(d["y"], np.float32), trace.position_metrics["traj_pc2"][0, p])
    (stars,) = [d for d in fig["data"] if d["name"] == "fixed point"]  # one trace, a star per settled position
    starred = {(float(x), float(y)) for x, y in zip(stars["x"], stars["y"])}
    assert len(stars["x"]) == 3
    want = {(float(trace.position_metrics["traj_pc1"][0, p, at]), float(trace.position_metrics["traj_pc2"][0, p, at]))
            for p, at in {**SETTLE, 4: 0}.items()}
    assert starred == want
    wait_text(browser, "traj-summary", "3 of 6")  # positions on a fixed point
    over = read_graph(browser, "traj-over-iterations", "PC1 over iterations")
    np.testing.assert_array_equal(np.asarray(over["data"][0]["x"]), np.arange(trace.iterations))
    # a settled state no longer moves, so its coordinates are the same at every later iteration:
    # the iteration each star stands at is what tells the first settled one from the last
    (over_stars,) = [d for d in over["data"] if d["name"] == "fixed point"]
    assert sorted(np.asarray(over_stars["x"]).tolist()) == sorted({**SETTLE, 4: 0}.values())


def test_without_a_trace_id_the_newest_forward_with_trajectories_is_shown(browser, big):
    url, trace, _ = big
    browser.get(f"{url}/trajectories")
    wait_text(browser, "traj-message", "Showing the newest forward recorded with the trajectory probe")
    wait_text(browser, "traj-summary", trace.trace_id)
    fig = read_graph(browser, "traj-paths", "batch row 0")
    assert len([d for d in fig["data"] if d["name"] not in ("t=0", "fixed point")]) == trace.seq_len


def test_a_forward_recorded_without_the_probe_says_how_to_record_it(browser, big):
    url, _, summary = big
    browser.get(f"{url}/trajectories?trace={summary.trace_id}")
    wait_text(browser, "traj-message", "probes=[*DEFAULT_PROBES, 'trajectory'], detail='positions'")
    assert page.NOT_RECORDED.startswith("This forward was recorded without the trajectory probe")
