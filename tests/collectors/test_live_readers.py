"""Readers beside the writer (issue 23): `mythos-probe serve` ingests from 4 sender processes
while `mythos-probe dashboard http://…` and a notebook client (`collectors.connect`) read the
store it is writing, through serve's token-guarded read API. Counts are exact at the end (every
forward once, with all its rows); the dashboard keeps its data when serve stops and reads a
restarted serve again without doubling anything; `export` reads through the API too."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import duckdb
import pytest

from mythos_probe import collectors
from mythos_probe.cli import main
from mythos_probe.collectors.store import Store, StoreError
from tests.collectors.factory import make_trace
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "mythos_probe.cli"]
TOKEN = "read-and-write"
SENDERS, PER_SENDER, ROUND = 4, 40, 8

SENDER = """
import sys, time
from mythos_probe.collectors.exporter import BoundedSpanProcessor, otlp_exporter, tracer_provider
from mythos_probe.collectors.spans import emit
from tests.collectors.factory import make_trace
endpoint, index, n, per_round, token = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
processor = BoundedSpanProcessor(otlp_exporter(endpoint, headers={"Authorization": "Bearer " + token}))
provider = tracer_provider(processor, service_name=f"sender-{index}")
tracer = provider.get_tracer("sender")
for start in range(0, n, per_round):
    for i in range(start, min(n, start + per_round)):
        emit(tracer, make_trace(10_000 * (index + 1) + i, seq_len=4, n_loops=5))
    provider.force_flush()
    time.sleep(0.2)
provider.shutdown()
print(processor.exported_spans, processor.dropped_spans, processor.failed_spans, flush=True)
"""

pytestmark = pytest.mark.slow


def start_serve(store: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([*CLI, "serve", "--store", str(store), "--port", str(port), "--no-dashboard",
                             "--token", TOKEN], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "OTLP/HTTP on" in line, (line, proc.poll())
    return proc


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return err


def dashboard_forwards(url: str, messages: list | None = None) -> int | None:
    """The "forwards" figure the dashboard's Runs page shows (its view callback, as the page POSTs
    it); the text of its message area is appended to `messages`."""
    outputs = [("forwards-message", "children"), ("forwards-stats", "children"), ("forwards-runs", "children"),
               ("forwards-list", "children"), ("forwards-shown", "data")]
    body = {
        "output": ".." + "...".join(f"{i}.{p}" for i, p in outputs) + "..",
        "outputs": [{"id": i, "property": p} for i, p in outputs],
        "inputs": [{"id": "app-interval", "property": "n_intervals", "value": 1},
                   {"id": "app-url", "property": "search", "value": ""}],
        "state": [{"id": "forwards-shown", "property": "data", "value": None}],
        "changedPropIds": ["app-interval.n_intervals"],
    }
    request = urllib.request.Request(url + "_dash-update-component", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=60) as reply:
        response = json.loads(reply.read())["response"]
    if messages is not None:
        messages.append(json.dumps(response.get("forwards-message", {})))
    stats = response.get("forwards-stats", {}).get("children") or []
    for stat in stats:
        value, label = (c["props"]["children"] for c in stat["props"]["children"])
        if label == "forwards":
            return int(value.replace(",", ""))
    return None


def wait_for(fn, expected, timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while (got := fn()) != expected and time.monotonic() < deadline:
        time.sleep(0.3)
    return got


def test_four_senders_while_a_dashboard_and_a_notebook_read(tmp_path):
    store_path, port = tmp_path / "live.duckdb", free_port()
    endpoint = f"http://127.0.0.1:{port}"
    serve = start_serve(store_path, port)
    dashboard = subprocess.Popen([*CLI, "dashboard", endpoint, "--port", "0", "--token", TOKEN],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        dashboard_url = dashboard.stdout.readline().split()[2]
        notebook = collectors.connect(endpoint, token=TOKEN, refresh_s=0)
        senders = [subprocess.Popen([sys.executable, "-c", SENDER, endpoint, str(i), str(PER_SENDER), str(ROUND), TOKEN],
                                    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for i in range(SENDERS)]
        seen, shown = [], []
        while any(s.poll() is None for s in senders):  # read while they write
            frame = notebook.frame("forwards")
            assert not frame.duplicated(["trace_id", "span_id"]).any()
            seen.append(len(frame))
            shown.append(dashboard_forwards(dashboard_url))
        for s in senders:
            out, err = s.communicate(timeout=120)
            assert s.returncode == 0, err
            assert out.split() == [str(PER_SENDER), "0", "0"], out + err
        total = SENDERS * PER_SENDER
        assert seen == sorted(seen) and all(n <= total for n in seen)  # never more, never going back
        assert [n for n in shown if n is not None] == sorted(n for n in shown if n is not None)
        assert wait_for(lambda: len(notebook.frame("forwards")), total) == total
        assert wait_for(lambda: dashboard_forwards(dashboard_url), total) == total
        tables = {t: notebook.frame(t) for t in ("forwards", "iterations", "positions", "experts", "spans")}
        notebook.close()

        stop(serve)  # the writer goes away: the dashboard keeps what it read
        assert dashboard_forwards(dashboard_url) == total
        with Store.open_read_only(store_path) as written:
            for name, frame in tables.items():
                stored = written.query(f"SELECT * FROM {name}")
                assert len(frame) == len(stored) > 0, name
                keys = ["trace_id", "span_id"] + {"iterations": ["iteration"], "positions": ["batch_index", "position",
                                                  "iteration"], "experts": ["iteration", "expert"]}.get(name, [])
                assert sorted(map(tuple, frame[keys].to_numpy())) == sorted(map(tuple, stored[keys].to_numpy())), name
            stored_sum = written.query("SELECT rel_residual FROM iterations")["rel_residual"].sum()  # NaN skipped
            assert tables["iterations"]["rel_residual"].sum() == pytest.approx(stored_sum) and stored_sum > 0

        serve = start_serve(store_path, port)  # a new serve of the same file: read again, not doubled
        assert wait_for(lambda: dashboard_forwards(dashboard_url), total) == total
        exported = tmp_path / "exported"
        assert main(["export", endpoint, "--parquet", str(exported), "--token", TOKEN]) == 0
        n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{exported}/forwards/*/*/*.parquet')").fetchall()[0][0]
        assert n == total
    finally:
        if serve.poll() is None:
            stop(serve)
        dashboard.terminate()
        dashboard.communicate(timeout=60)


def test_the_read_api_is_guarded_by_the_ingest_token(tmp_path):
    port = free_port()
    serve = start_serve(tmp_path / "guarded.duckdb", port)
    try:
        for path in ("/v1/read", "/v1/read/forwards?after=0&upto=10"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30)
            assert refused.value.code == 401
        with pytest.raises(StoreError, match="authentication failed"):
            collectors.connect(f"http://127.0.0.1:{port}", token="wrong")
        with collectors.connect(f"http://127.0.0.1:{port}", token=TOKEN) as empty:
            assert len(empty.frame("forwards")) == 0
    finally:
        stop(serve)


def test_a_file_dashboard_recovers_when_the_writer_stops_and_when_the_file_appears(tmp_path):
    held, later = tmp_path / "held.duckdb", tmp_path / "later.duckdb"
    with Store(held) as store:
        store.write_traces([make_trace(i) for i in range(7)])
    holder = subprocess.Popen([sys.executable, "-c", "import sys, duckdb; con = duckdb.connect(sys.argv[1]); "
                               "print('held', flush=True); sys.stdin.read()", str(held)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    dashboards = [subprocess.Popen([*CLI, "dashboard", str(path), "--port", "0"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for path in (held, later)]
    try:
        urls = [d.stdout.readline().split()[2] for d in dashboards]
        for url, why in zip(urls, ("held by a writer process", "no store at")):
            messages: list = []
            assert dashboard_forwards(url, messages) is None
            assert why in messages[-1] and "retrying" in messages[-1], messages
        holder.stdin.close()  # the writer stops
        holder.wait(timeout=60)
        with Store(later) as store:  # the file appears
            store.write_traces([make_trace(i) for i in range(3)])
        assert wait_for(lambda: dashboard_forwards(urls[0]), 7) == 7
        assert wait_for(lambda: dashboard_forwards(urls[1]), 3) == 3
    finally:
        if holder.poll() is None:
            holder.kill()
        for d in dashboards:
            d.terminate()
            d.communicate(timeout=60)
