"""`mythos-probe serve` for real: one process receiving OTLP, writing the store and hosting the
live dashboard. A forward exported with the standard OTLP exporter after the page has loaded
appears in that page, and SIGTERM stops the server cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from mythos_probe.collectors.sinks import otlp_sink
from tests.dashboards.factory import BASE_NS, synthetic_trace
from tests.dashboards.test_browser import first_stat, no_console_errors, wait_text

pytestmark = pytest.mark.browser


def _url(line: str) -> str:
    return "http://" + line.split("http://", 1)[1].split()[0].rstrip(",").removesuffix("/v1/traces")


def test_serve_shows_a_forward_received_over_otlp_in_its_live_dashboard(browser, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "mythos_probe.cli", "serve", "--store", str(tmp_path / "served.duckdb"),
         "--port", "0", "--dashboard-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=os.getcwd(),
    )
    try:
        otlp, dashboard = _url(proc.stdout.readline()), _url(proc.stdout.readline())
        browser.get(dashboard + "/")
        wait_text(browser, "forwards-message", "no forwards yet")
        trace = synthetic_trace(np.random.default_rng(3), start_ns=BASE_NS, run_id="remote-run")
        with otlp_sink(otlp) as sink:
            sink(trace)
            assert sink.flush() and sink.failed_spans == 0
        wait_text(browser, "forwards-list", trace.trace_id)
        assert first_stat(browser) == "1"
        browser.get(f"{dashboard}/forward?trace={trace.trace_id}")
        wait_text(browser, "forward-summary", "remote-run")
        no_console_errors(browser)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
