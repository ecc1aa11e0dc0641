"""`mythos-probe serve` stops cleanly on SIGTERM (exit 0, no traceback) while dashboard clients
poll its views, as a supervisor stopping it under load would see: real processes, real HTTP."""

import json
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np

from mythos_probe.collectors.store import Store
from tests.dashboards.factory import BASE_NS, synthetic_trace

LOOPS = [("loops-message", "children"), ("loops-tokens", "figure"), ("loops-forwards", "figure"),
         ("loops-shares", "figure"), ("loops-groups", "children"), ("loops-saved", "children")]


def poll_body() -> bytes:
    """The live tick of the Loops view, as the browser posts it every interval."""
    return json.dumps({
        "output": ".." + "...".join(f"{i}.{p}" for i, p in LOOPS) + "..",
        "outputs": [{"id": i, "property": p} for i, p in LOOPS],
        "inputs": [{"id": "app-interval", "property": "n_intervals", "value": 1},
                   {"id": "app-url", "property": "search", "value": ""}],
        "changedPropIds": ["app-interval.n_intervals"], "state": [],
    }).encode()


def test_sigterm_under_six_polling_dashboard_clients_exits_0_without_a_traceback(tmp_path):
    path = tmp_path / "s.duckdb"
    rng = np.random.default_rng(0)
    with Store(path) as store:
        store.write_traces([synthetic_trace(rng, start_ns=BASE_NS + i * 10**9, batch=4, seq_len=32, n_loops=8)
                            for i in range(60)])
    serve = subprocess.Popen([sys.executable, "-m", "mythos_probe.cli", "serve", "--store", str(path), "--port", "0",
                              "--dashboard-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    answered, stop = [], threading.Event()
    try:
        serve.stdout.readline()
        dashboard = re.search(r"(http://127\.0\.0\.1:\d+)", serve.stdout.readline()).group(1)
        body = poll_body()

        def client():
            while not stop.is_set():
                request = urllib.request.Request(dashboard + "/_dash-update-component", body,
                                                 {"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=60) as reply:
                        answered.append(reply.status)
                except urllib.error.HTTPError as e:  # an answer, but not the view (e.g. LOOPS out of date)
                    answered.append(e.code)
                except (urllib.error.URLError, ConnectionError, OSError):
                    if serve.poll() is not None:
                        return

        clients = [threading.Thread(target=client, daemon=True) for _ in range(6)]
        for c in clients:
            c.start()
        while len(answered) < 12 and serve.poll() is None:  # every client polling, views answered
            stop.wait(0.1)
        serve.send_signal(signal.SIGTERM)
        _, err = serve.communicate(timeout=120)
    finally:
        stop.set()
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    assert answered and set(answered) == {200}
    assert serve.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
