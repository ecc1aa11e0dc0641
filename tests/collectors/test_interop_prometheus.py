"""Interop: `mythos-probe serve --prometheus` scraped by a real Prometheus server (Debian's
`prometheus`, loopback only); the values read back through Prometheus's HTTP query API equal the
same aggregates computed here from the traces sent. The same Prometheus loads the rules of
`assets/prometheus` and a worker's `LoopMetrics` watching its OTLP sink; every query of the Grafana
dashboard in `assets/grafana` returns series there, and every rule evaluates without error."""

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

from pathlib import Path

import numpy as np
import pytest

from mythos_probe.collectors.histograms import residual_at_exit
from mythos_probe.collectors.prometheus import LoopMetrics
from mythos_probe.collectors.sinks import otlp_sink
from tests.collectors.factory import make_trace
from tests.collectors.test_receiver import otlp_body, post
from tests.conftest import free_port, get_json, need

pytestmark = [pytest.mark.interop, pytest.mark.slow]

ASSETS = Path(__file__).resolve().parents[2] / "assets"


def traces():
    """Two models, two endpoints, known FLOPs; one forward without per-position counts."""
    out = []
    for i in range(6):
        t = make_trace(500 + i, detail="positions" if i % 2 else "summary", batch=2, seq_len=3, n_loops=5,
                       model_id="mythos-a" if i < 4 else "mythos-b")
        fields = {**t.__dict__, "forward_metrics": {**t.forward_metrics, "flops": 1e9 * (i + 1)},
                  "attributes": {**t.attributes, "endpoint": "/chat" if i % 3 else "/complete"}}
        if i == 5:
            fields["position_iterations"] = None
        out.append(type(t)(**fields))
    return out


@pytest.fixture
def serve(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "mythos_probe.cli", "serve", "--store", str(tmp_path / "s.duckdb"), "--port", "0",
         "--no-dashboard", "--prometheus", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        otlp = proc.stdout.readline()
        metrics = proc.stdout.readline()
        assert "OTLP/HTTP on http://127.0.0.1:" in otlp and "Prometheus metrics on" in metrics, proc.stderr.read()
        otlp_port = int(otlp.split("http://127.0.0.1:")[1].split("/")[0])
        metrics_port = int(metrics.split("http://127.0.0.1:")[1].split("/")[0])
        yield type("Target", (), {"host": "127.0.0.1", "port": otlp_port}), metrics_port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def worker():
    """A worker process's metrics: its OTLP sink (to a port where nothing listens) watched by a
    `LoopMetrics` that records no forwards, so only the exporter counters come from here."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    sink = otlp_sink(f"http://127.0.0.1:{dead}")
    metrics = LoopMetrics(0)
    metrics.watch(sink)
    try:
        yield metrics
    finally:
        metrics.close()
        sink.close()


@pytest.fixture
def prometheus(tmp_path, serve, worker):
    binary = shutil.which("prometheus")
    need(binary is not None, "Debian's prometheus is not installed: run scripts/system-deps.sh")
    _, metrics_port = serve
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files: ['{ASSETS / 'prometheus' / 'recurrent_depth.rules.yml'}']\n"
        f"scrape_configs:\n  - job_name: mythos\n    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
        f"  - job_name: worker\n    static_configs:\n      - targets: ['127.0.0.1:{worker.port}']\n"
    )
    port = free_port()
    log = tmp_path / "prometheus.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):  # bounded: 60 s for a cold start on 2 loaded cores
            if proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(url + "/-/ready", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        need(proc.poll() is None, f"Prometheus did not start: {log.read_text()[-2000:]}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def query(url: str, promql: str) -> dict[tuple, float]:
    data = get_json(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert data["status"] == "success", data
    return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in data["data"]["result"]}


def test_prometheus_scrapes_the_loop_metrics_of_every_stored_forward(serve, prometheus):
    target, _ = serve
    sent = traces()
    body = otlp_body(sent).SerializeToString()
    assert post(target, body)[0] == 200
    assert post(target, body)[0] == 200  # a retried request: stored once, counted once

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        got = query(prometheus, "sum(recurrent_depth_forwards_total)")
        if got and list(got.values())[0] == len(sent):
            break
        time.sleep(0.5)
    assert query(prometheus, "sum(recurrent_depth_forwards_total)") == {(): len(sent)}

    by_model = query(prometheus, "sum by (model) (recurrent_depth_forwards_total)")
    assert by_model == {(("model", "mythos-a"),): 4, (("model", "mythos-b"),): 2}
    by_endpoint = query(prometheus, "sum by (endpoint) (recurrent_depth_flops_total)")
    expected = {}
    for t in sent:
        key = (("endpoint", t.attributes["endpoint"]),)
        expected[key] = expected.get(key, 0.0) + t.forward_metrics["flops"]
    assert by_endpoint == pytest.approx(expected)

    used = np.concatenate([t.position_iterations.ravel() if t.position_iterations is not None
                           else np.full(t.batch * t.seq_len, t.iterations) for t in sent])
    assert query(prometheus, "sum(recurrent_depth_iterations_used_count)") == {(): len(used)}
    assert query(prometheus, "sum(recurrent_depth_iterations_used_sum)") == {(): float(used.sum())}
    le2 = query(prometheus, 'sum(recurrent_depth_iterations_used_bucket{le="2"})')
    assert le2 == {(): float((used <= 2).sum())}
    residuals = np.concatenate([residual_at_exit(t) for t in sent])
    assert query(prometheus, "sum(recurrent_depth_residual_at_exit_sum)")[()] == pytest.approx(residuals.sum())
    assert query(prometheus, "sum(recurrent_depth_tokens_total)") == {(): float(sum(t.batch * t.seq_len for t in sent))}


def grafana_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of the Grafana dashboard, with its variables set as
    Grafana sets them for "All" (`allValue`) and `$__rate_interval` as one minute."""
    dashboard = json.loads((ASSETS / "grafana" / "recurrent_depth.json").read_text())
    variables = {v["name"]: v.get("allValue", ".*") for v in dashboard["templating"]["list"] if v["type"] == "query"}
    out = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "1m")
            for name, value in variables.items():
                expr = expr.replace(f"${name}", value)
            assert "$" not in expr, (panel["title"], expr)
            out.append((panel["title"], expr))
    return out


def test_every_grafana_panel_and_every_rule_has_series_in_prometheus(serve, prometheus):
    target, _ = serve
    sent = [*traces()]
    sent.append(type(sent[0])(**{**sent[0].__dict__, "span_id": "00000000000000aa", "rank": 3, "world_size": 4,
                                 "forward_metrics": {**sent[0].forward_metrics, "diverged_at": 2.0}}))
    assert post(target, otlp_body(sent).SerializeToString())[0] == 200
    assert post(target, b"not protobuf")[0] == 400  # one rejected request for the receiver counter
    queries = grafana_queries()
    assert len(queries) >= 9
    deadline = time.monotonic() + 90
    empty = queries
    while empty and time.monotonic() < deadline:  # rates need two scrapes after the data arrived
        empty = [(title, expr) for title, expr in empty if not query(prometheus, expr)]
        time.sleep(0.5)
    assert not empty, f"panels without series: {empty}"
    by_rank = query(prometheus, "sum by (rank) (recurrent_depth_forwards_total)")
    assert by_rank == {(("rank", "0"),): len(sent) - 1, (("rank", "3"),): 1}
    assert query(prometheus, "sum(recurrent_depth_diverged_forwards_total)") == {(): 1.0}
    used = np.concatenate([t.position_iterations.ravel() if t.position_iterations is not None
                           else np.full(t.batch * t.seq_len, t.iterations) for t in sent])
    budgets = np.concatenate([np.full(t.batch * t.seq_len, t.n_loops) for t in sent])
    assert query(prometheus, "sum(recurrent_depth_tokens_at_budget_total)") == {(): float((used >= budgets).sum())}
    assert query(prometheus, "sum(recurrent_depth_receiver_rejected_requests_total)") == {(): 1.0}

    rules = get_json(f"{prometheus}/api/v1/rules")["data"]["groups"]
    names = [r.get("name") for g in rules for r in g["rules"]]
    declared = re.findall(r"^\s*- (?:record|alert): (\S+)", (ASSETS / "prometheus" / "recurrent_depth.rules.yml").read_text(), re.M)
    assert sorted(names) == sorted(declared) and len(names) == 13
    while time.monotonic() < deadline:
        rules = get_json(f"{prometheus}/api/v1/rules")["data"]["groups"]
        records = [r for g in rules for r in g["rules"] if r["type"] == "recording"]
        if all(query(prometheus, r["name"]) for r in records):
            break
        time.sleep(0.5)
    assert [r["name"] for r in records if not query(prometheus, r["name"])] == []
    assert {r["name"]: r["health"] for g in rules for r in g["rules"] if r["health"] != "ok"} == {}
