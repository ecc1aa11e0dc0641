"""Fixtures for the dashboard tests: a deterministic set of synthetic traces in a real store,
Dash apps served on free loopback ports, and one headless Chromium for the browser tests."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import threading

import numpy as np
import pytest

from mythos_probe.collectors.store import Store
from tests.conftest import need
from tests.dashboards.factory import BASE_NS, synthetic_trace

RUNS = (("run-a", "mythos-tiny", 8), ("run-b", "mythos-tiny", 8), ("run-c", "mythos-small", 6))
ENDPOINTS = ("/chat", "/code")
USERS = ("alice", "bob", "carol")
MINUTE_NS = 60 * 10**9
DIVERGED = 7  # index of the one forward whose state blew up


def make_traces() -> list:
    """24 forwards, ten minutes apart, over three runs, two models, two endpoints and three users."""
    rng = np.random.default_rng(7)
    traces = []
    for i in range(24):
        run, model, n_loops = RUNS[i % 3]
        traces.append(
            synthetic_trace(
                rng, run_id=run, model_id=model, step=i // 3, start_ns=BASE_NS + i * 10 * MINUTE_NS,
                attributes={"endpoint": ENDPOINTS[i % 2], "user": USERS[i % 3], "request_id": f"req-{i}"},
                n_loops=n_loops, batch=2, seq_len=10, diverged_at=4 if i == DIVERGED else -1,
            )
        )
    # Jaeger prints trace ids without leading zeros: keep one that has them.
    traces[0] = dataclasses.replace(traces[0], trace_id="00" + traces[0].trace_id[2:])
    return traces


@pytest.fixture(scope="session")
def traces() -> list:
    return make_traces()


@pytest.fixture(scope="session")
def store(traces, tmp_path_factory):
    s = Store(tmp_path_factory.mktemp("store") / "traces.duckdb")
    s.write_traces(traces)
    yield s
    s.close()


KINDS = ("served", "served", "shadow", "training")


def make_mixed_traces() -> list:
    """16 forwards a minute apart: every forward kind, two loops, two ranks, two exit policies."""
    rng = np.random.default_rng(11)
    traces = []
    for i in range(16):
        t = synthetic_trace(rng, run_id=f"run-{i % 2}", step=i, start_ns=BASE_NS + i * MINUTE_NS, n_loops=4 + i % 3,
                            attributes={"endpoint": ENDPOINTS[i % 2], "user": USERS[i % 3]})
        traces.append(dataclasses.replace(t, kind=KINDS[i % 4], loop_name="inner" if i % 8 == 0 else "outer",
                                          rank=i % 2, world_size=2, exit_policy="fixed" if i % 3 == 0 else "act"))
    return traces


@pytest.fixture(scope="session")
def mixed(tmp_path_factory):
    """(store, traces) of `make_mixed_traces`."""
    traces = make_mixed_traces()
    s = Store(tmp_path_factory.mktemp("mixed") / "mixed.duckdb")
    s.write_traces(traces)
    yield s, traces
    s.close()


@pytest.fixture()
def empty_store(tmp_path):
    s = Store(tmp_path / "empty.duckdb")
    yield s
    s.close()


class Served:
    """A Dash app on a free loopback port, served from a thread until `close`."""

    def __init__(self, app):
        from werkzeug.serving import make_server

        self._server = make_server("127.0.0.1", 0, app.server, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self):
        self._server.shutdown()
        self._thread.join()


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="session")
def browser():
    need(os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER), "chromium and chromedriver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="mythos-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1440,1100", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "SEVERE"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)
