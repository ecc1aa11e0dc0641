"""`LoopMetrics` (collectors/prometheus.py): what a scrape says about each series (its name, type
and HELP text written out literally, the instrumentation scope), the counters of watched senders
and receivers, and the thresholds at their edges (a token that used exactly its budget, a forward
that diverged at iteration 0, a record without `diverged_at` or `flops`, a label of exactly 128
characters or with a lone surrogate). Written against survivors of `scripts/mutation.sh
collectors/prometheus.py`; tests/collectors/test_prometheus_exact.py has the counts."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import types
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mythos_probe.collectors import prometheus as P
from mythos_probe.collectors.prometheus import LoopMetrics
from tests.collectors.factory import make_trace


def scrape(metrics):
    with urllib.request.urlopen(metrics.url, timeout=60) as resp:
        text = resp.read().decode()
    return text, {f.name: f for f in text_string_to_metric_families(text)}


def total(families, name):
    return sum(s.value for s in families[name].samples if s.name == name + "_total")


HELP = {
    "recurrent_depth_forwards": ("counter", "forwards recorded"),
    "recurrent_depth_tokens": ("counter", "tokens (batch × seq) recorded"),
    "recurrent_depth_flops": ("counter", "estimated FLOPs of the forwards"),
    "recurrent_depth_tokens_at_budget": ("counter", "tokens that used every iteration of the budget n_loops"),
    "recurrent_depth_diverged_forwards": ("counter", "forwards whose loop state held a NaN or Inf"),
    "recurrent_depth_iterations_used": ("histogram", "loop iterations used per token"),
    "recurrent_depth_residual_at_exit": ("histogram", "relative residual at the token's exit"),
    "recurrent_depth_exporter_dropped_spans": ("counter", "spans an OTLP sink dropped (queue full)"),
    "recurrent_depth_exporter_failed_spans": ("counter", "spans the OTLP endpoint did not accept"),
    "recurrent_depth_receiver_rejected_requests": ("counter", "OTLP requests the receiver answered with an error"),
}


def test_series_names_types_help_and_scope():
    sink = types.SimpleNamespace(dropped_spans=3, failed_spans=5)  # what `OtlpSink` keeps
    receiver = types.SimpleNamespace(rejected_requests=7)  # what `Receiver` keeps
    with LoopMetrics(port=0) as m:
        assert m.watch(sink) is sink and m.watch(receiver) is receiver
        m.record([make_trace(1)])
        text, families = scrape(m)
    got = {name: (f.type, f.documentation) for name, f in families.items() if name.startswith("recurrent_depth")}
    assert got == HELP
    assert 'otel_scope_name="mythos_probe"' in text
    assert total(families, "recurrent_depth_exporter_dropped_spans") == 3
    assert total(families, "recurrent_depth_exporter_failed_spans") == 5
    assert total(families, "recurrent_depth_receiver_rejected_requests") == 7


def test_watched_counters_sum_over_sources_and_exist_only_where_kept():
    with LoopMetrics(port=0) as m:
        _, before = scrape(m)
        m.watch(types.SimpleNamespace(dropped_spans=2, failed_spans=0))
        m.watch(types.SimpleNamespace(dropped_spans=40, failed_spans=1))
        _, after = scrape(m)
    assert not any(name.startswith("recurrent_depth_exporter") for name in before)
    assert total(after, "recurrent_depth_exporter_dropped_spans") == 42
    assert total(after, "recurrent_depth_exporter_failed_spans") == 1
    assert "recurrent_depth_receiver_rejected_requests" not in after  # no receiver watched
    (sample,) = [s for s in after["recurrent_depth_exporter_dropped_spans"].samples if s.name.endswith("_total")]
    assert {k: v for k, v in sample.labels.items() if not k.startswith("otel_scope")} == {}


def test_budget_and_divergence_at_their_edges():
    base = make_trace(5, batch=1, seq_len=4, n_loops=4)
    # one token used exactly the budget (counted), one used budget - 1 (not)
    at_budget = dataclasses.replace(base, position_iterations=np.array([[4, 3, 1, 2]]), iterations=4,
                                    forward_metrics={"diverged_at": 0.0, "flops": 0.0})
    summary = make_trace(7, batch=1, seq_len=4, detail="summary")
    no_fields = dataclasses.replace(summary, forward_metrics={}, position_iterations=None,
                                    n_loops=summary.iterations + 1)  # 4 tokens below their budget
    with LoopMetrics(port=0) as m:
        m.record([at_budget])
        _, one = scrape(m)
        m.record([no_fields])
        _, two = scrape(m)
    assert total(one, "recurrent_depth_tokens_at_budget") == 1
    assert total(one, "recurrent_depth_diverged_forwards") == 1  # diverged at iteration 0
    assert total(two, "recurrent_depth_tokens_at_budget") == 1
    assert total(two, "recurrent_depth_diverged_forwards") == 1  # no diverged_at: not diverged
    assert total(two, "recurrent_depth_flops") == 0.0  # no flops: adds 0


def test_bounded_label_edges():
    assert P.MAX_LABEL_CHARS == 128
    exact = "x" * 128
    assert P.bounded_label(exact) is exact
    longer = "x" * 129
    cut = P.bounded_label(longer)
    assert cut == "x" * 119 + "~" + hashlib.sha256(longer.encode()).hexdigest()[:8] and len(cut) == 128
    # a lone surrogate (from a client's broken UTF-16) is hashed, not an error
    odd = "\ud800" * 200
    digest = hashlib.sha256(odd.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    assert P.bounded_label(odd) == "\ud800" * 119 + "~" + digest


@pytest.mark.parametrize("flops, added", [(0.0, 0.0), (0.5, 0.5), (2.5, 2.5), (-1.0, 0.0), (-0.0, 0.0)])
def test_flops_counter_adds_only_positive_finite_values(flops, added):
    t = dataclasses.replace(make_trace(6, detail="summary"), forward_metrics={"flops": flops})
    with LoopMetrics(port=0) as m:
        m.record([t])
        _, families = scrape(m)
    assert total(families, "recurrent_depth_flops") == added


def test_every_label_of_every_series_written_out():
    t = dataclasses.replace(make_trace(8, detail="summary"), attributes={"endpoint": "/e"}, rank=3, world_size=4,
                            kind="shadow", loop_name="think", exit_policy="kl", model_id="m")
    with LoopMetrics(port=0) as m:
        m.record([t])
        _, families = scrape(m)
    want = {"model": "m", "endpoint": "/e", "exit_policy": "kl", "loop_name": "think", "kind": "shadow", "rank": "3"}
    for name in ("recurrent_depth_forwards", "recurrent_depth_tokens", "recurrent_depth_flops",
                 "recurrent_depth_tokens_at_budget", "recurrent_depth_diverged_forwards",
                 "recurrent_depth_iterations_used", "recurrent_depth_residual_at_exit"):
        samples = families[name].samples
        assert samples, name
        for s in samples:
            labels = {k: v for k, v in s.labels.items() if not k.startswith("otel_scope") and k != "le"}
            assert labels == want, (name, s)


def test_the_default_bound_is_200_label_sets():
    base = make_trace(9, batch=1, seq_len=1, detail="summary")
    with LoopMetrics(port=0) as m:  # max_label_sets left at its default
        m.record([dataclasses.replace(base, attributes={"endpoint": f"/e{i}"}) for i in range(201)])
        with urllib.request.urlopen(m.url, timeout=60) as resp:
            lines = [ln for ln in resp.read().decode().splitlines() if ln.startswith(
                ("recurrent_depth_forwards", "# HELP recurrent_depth_forwards ", "# TYPE recurrent_depth_forwards "))]
    # only the forwards counter's lines are parsed: the 2 × 201 histograms make a slow full parse
    got = {s.labels["endpoint"]: s.value for f in text_string_to_metric_families("\n".join(lines) + "\n")
           for s in f.samples if s.name == "recurrent_depth_forwards_total"}
    assert got == {**{f"/e{i}": 1.0 for i in range(200)}, "other": 1.0}


def test_served_on_loopback_only_with_the_service_name_given():
    with LoopMetrics(port=0, service_name="probe-svc") as m:
        assert m._server.server_address[0] == "127.0.0.1"  # never on every interface
        m.record([make_trace(10, detail="summary")])  # target_info comes with the first series
        text, _ = scrape(m)
    assert 'service_name="probe-svc"' in text and 'service_name="mythos-probe"' not in text


@pytest.mark.parametrize("diverged_at, counted", [(-1.0, 0), (0.0, 1), (2.0, 1), (float("nan"), 0), (float("inf"), 0)])
def test_a_forward_counts_as_diverged_at_a_finite_iteration_only(diverged_at, counted):
    t = dataclasses.replace(make_trace(11, detail="summary"), forward_metrics={"diverged_at": diverged_at})
    with LoopMetrics(port=0) as m:
        m.record([t])
        _, families = scrape(m)
    assert total(families, "recurrent_depth_diverged_forwards") == counted


def test_non_finite_flops_add_zero_without_the_sdks_warning_per_forward(caplog):
    traces = [dataclasses.replace(make_trace(12, detail="summary"), forward_metrics={"flops": v})
              for v in (float("inf"), float("nan"), 3.0)]
    with caplog.at_level(logging.WARNING), LoopMetrics(port=0) as m:
        m.record(traces)
        _, families = scrape(m)
    assert total(families, "recurrent_depth_flops") == 3.0
    assert [r.getMessage() for r in caplog.records if r.name.startswith("opentelemetry")] == []
