"""The issue-25 views in real headless Chromium over a store of 10,000 served forwards (three
tasks of different sizes and depths) plus one stored loop sweep: exit steps split by an
attribute chosen in the Group-by, the depth profile, the sweep's overthinking drop and the
compare view, each read back from the drawn plotly graph and checked against numpy on the traces."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mythos_probe.collectors.store import Store
from mythos_probe.dashboards.app import create_app
from tests.dashboards.conftest import Served
from tests.dashboards.factory import BASE_NS, synthetic_trace
from tests.dashboards.test_browser import choose, ctl, grid_rows, no_console_errors, read_graph, screenshot, wait_text
from tests.dashboards.test_issue25_views import sweep_traces

pytestmark = pytest.mark.browser

FORWARDS = 10_000
TASKS = ("add", "copy", "sort")


def many_traces() -> list:
    """10,000 forwards from 60 distinct shapes (ids and times their own): per-iteration rows only,
    so that the store builds in seconds; task `sort` has half the forwards of the others."""
    rng = np.random.default_rng(10)
    base = [synthetic_trace(rng, n_loops=4 + i % 5, seq_len=4 + i % 7, batch=1 + i % 2) for i in range(60)]
    out = []
    for i in range(FORWARDS):
        b = base[i % 60]
        task = TASKS[i % 5 % 3]  # 0,1,2,0,1: sort gets one in five
        out.append(dataclasses.replace(b, trace_id=f"{i + 1:032x}", span_id=f"{i + 1:016x}", run_id=f"run-{i % 4}",
                                       start_ns=BASE_NS + i * 10**9, end_ns=BASE_NS + i * 10**9 + (5 + i % 40) * 10**6,
                                       detail="summary", position_metrics={}, attributes={"task": task}))
    return out


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    rng = np.random.default_rng(3)
    deepest = rng.integers(0, 9, size=(2, 5))
    preds = {}
    for n, wrong in ((1, 6), (2, 1), (3, 4), (4, 0), (5, 2)):
        pred = deepest.copy()
        pred.ravel()[:wrong] = (pred.ravel()[:wrong] + 1) % 9
        preds[n] = pred
    targets = preds[2].copy()
    traces = many_traces()
    sweep = sweep_traces(rng, "big-sweep", preds, FORWARDS + 10, targets)
    store = Store(tmp_path_factory.mktemp("big") / "big.duckdb")
    store.write_traces(traces + sweep)
    served = Served(create_app(store))
    yield served.url, traces, (preds, targets)
    served.close()
    store.close()


def test_exit_steps_split_by_task_with_counts(browser, big):
    url, traces, _ = big
    browser.get(url + "/loops")
    before = read_graph(browser, "loops-shares", "share of each group")
    choose(browser, ctl("group"), "task")
    fig = read_graph(browser, "loops-shares", "share of each group", changed_from=before)
    tokens = read_graph(browser, "loops-tokens", "per token")
    per_task = {task: np.zeros(10) for task in TASKS}
    for t in traces:
        per_task[t.attributes["task"]] += np.bincount(t.position_iterations.ravel(), minlength=10)
    for task, counts in per_task.items():
        used = np.flatnonzero(counts)
        drawn = next(d for d in fig["data"] if d["name"].startswith(task + " "))
        assert drawn["name"] == f"{task} ({int(counts.sum()):,} tokens)"
        assert list(drawn["x"]) == used.tolist()
        np.testing.assert_allclose(drawn["y"], counts[used] / counts.sum())
        np.testing.assert_allclose(next(d for d in tokens["data"] if d["name"] == task)["y"], counts[used])
    rows = {r["grp"]: r for r in grid_rows(browser, "loops-groups", 3)}
    assert {k: int(v["forwards"].replace(",", "")) for k, v in rows.items()} == {
        task: sum(t.attributes["task"] == task for t in traces) for task in TASKS}
    screenshot(browser, "loops-exit-steps-by-task")
    no_console_errors(browser)


def test_depth_profile_counts_active_positions(browser, big):
    url, traces, _ = big
    browser.get(url + "/depth?group=attr%3Atask")
    fig = read_graph(browser, "depth-active", "Active positions")
    share = read_graph(browser, "depth-share", "still running")
    for task in TASKS:
        mine = [t for t in traces if t.attributes["task"] == task]
        width = max(t.iterations for t in mine)
        active = sum((t.position_iterations.ravel()[:, None] > np.arange(width)).sum(axis=0)
                     for t in mine if t.iterations == width) + sum(
            np.r_[(t.position_iterations.ravel()[:, None] > np.arange(t.iterations)).sum(axis=0), np.zeros(width - t.iterations)]
            for t in mine if t.iterations < width)
        bar = next(d for d in fig["data"] if d["name"] == task)
        assert list(bar["x"]) == list(range(1, width + 1))  # iterations drawn 1-based
        np.testing.assert_allclose(bar["y"], active)
        pooled = next(d for d in share["data"] if d["name"] == f"{task} · pooled")
        np.testing.assert_allclose(pooled["y"], active / sum(t.position_iterations.size for t in mine))
    screenshot(browser, "depth")
    no_console_errors(browser)


def test_sweep_page_shows_accuracy_and_where_extra_loops_hurt(browser, big):
    url, _, (preds, targets) = big
    browser.get(url + "/sweep")
    fig = read_graph(browser, "sweep-score", "Accuracy against loops")
    line = next(d for d in fig["data"] if d["name"] == "big-sweep · mythos-tiny")
    assert list(line["x"]) == sorted(preds)
    accuracy = np.array([(preds[n] == targets).mean() for n in sorted(preds)])
    np.testing.assert_allclose(line["y"], accuracy)
    best = int(np.argmax(accuracy)) + 1
    hurt = next(d for d in fig["data"] if "extra loops hurt" in (d["name"] or ""))
    assert list(hurt["x"]) == [n for n in sorted(preds) if n > best and accuracy[n - 1] < accuracy.max()]
    agreement = read_graph(browser, "sweep-agreement", "deepest forward")
    np.testing.assert_allclose(agreement["data"][0]["y"], [(preds[n] == preds[5]).mean() for n in sorted(preds)])
    wait_text(browser, "sweep-table", "big-sweep")
    screenshot(browser, "sweep")
    no_console_errors(browser)


def test_compare_overlays_two_runs_then_a_forward(browser, big):
    from selenium.webdriver.common.keys import Keys

    from tests.dashboards.test_browser import by_id

    url, traces, _ = big
    browser.get(url + "/compare?cmp=state_norm")
    fig = read_graph(browser, "compare-iterations", "A: run run-2 · B: run run-3")
    for label, run in (("A", "run-2"), ("B", "run-3")):
        mine = [t for t in traces if t.run_id == run]
        width = max(t.iterations for t in mine)
        sums, counts = np.zeros(width), np.zeros(width)
        for t in mine:
            sums[: t.iterations] += t.iteration_metrics["state_norm"]
            counts[: t.iterations] += 1
        drawn = next(d for d in fig["data"] if d["name"] == f"{label}: run {run}")
        np.testing.assert_allclose(drawn["y"], sums / counts)
    rows = {r["metric"]: r for r in grid_rows(browser, "compare-table")}
    assert rows["forwards"]["a"] == f"{sum(t.run_id == 'run-2' for t in traces):,}"
    one = traces[42]
    box = by_id(browser, ctl("b"))
    box.send_keys(one.trace_id + Keys.ENTER)
    fig = read_graph(browser, "compare-iterations", f"B: forward {one.trace_id[:12]}")
    drawn = next(d for d in fig["data"] if d["name"].startswith("B: forward"))
    np.testing.assert_allclose(drawn["y"], one.iteration_metrics["state_norm"])
    screenshot(browser, "compare")
    no_console_errors(browser)
