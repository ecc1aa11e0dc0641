"""`LoopMetrics` scraped over HTTP and every series compared with counts computed from the traces:
names and labels written out literally, histogram counts and sums per token, counters per label
set, the defaults pinned, the bound's warning logged once."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mythos_probe.collectors import prometheus as P
from mythos_probe.collectors.prometheus import LoopMetrics
from tests.collectors.factory import make_trace


def scrape(metrics):
    with urllib.request.urlopen(metrics.url, timeout=30) as resp:
        text = resp.read().decode()
    return text, {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_defaults_and_constants():
    sig = inspect.signature(LoopMetrics.__init__)
    assert sig.parameters["port"].default == P.DEFAULT_PORT == 9464
    assert sig.parameters["max_label_sets"].default == 200
    assert sig.parameters["service_name"].default == "mythos-probe"
    assert P.LABELS == ("model", "endpoint", "exit_policy", "loop_name", "kind", "rank")
    assert P.OTHER == {k: "other" for k in P.LABELS}


def sample(samples, family, suffix, **labels):
    got = [s for s in samples[family] if s.name == family + suffix and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(got) == 1, (family, suffix, labels, got)
    return got[0].value


def test_every_series_against_the_traces():
    a = dataclasses.replace(make_trace(1, batch=2, seq_len=3), attributes={"endpoint": "/chat"}, kind="shadow",
                            loop_name="think")
    b = dataclasses.replace(make_trace(2, batch=1, seq_len=4, detail="summary"), attributes={}, position_iterations=None)
    b = dataclasses.replace(b, forward_metrics={k: v for k, v in b.forward_metrics.items() if k != "flops"})
    c = dataclasses.replace(make_trace(3, batch=2, seq_len=2), attributes={"endpoint": "/chat"}, kind="shadow",
                            loop_name="think", forward_metrics={**make_trace(3).forward_metrics, "flops": math.inf})
    a = dataclasses.replace(a, forward_metrics={**a.forward_metrics, "flops": 1234.5})
    with LoopMetrics(port=0) as m:
        assert m.url == f"http://127.0.0.1:{m.port}/metrics" and m.port > 0
        m.record([a, b])
        m(c)
        text, s = scrape(m)
    la = dict(model=a.model_id, endpoint="/chat", exit_policy=a.exit_policy, loop_name="think", kind="shadow")
    lb = dict(model=b.model_id, endpoint="", exit_policy=b.exit_policy, loop_name="loop", kind="served")
    assert sample(s, "recurrent_depth_forwards", "_total", **la) == 2
    assert sample(s, "recurrent_depth_forwards", "_total", **lb) == 1
    assert sample(s, "recurrent_depth_tokens", "_total", **la) == 6 + 4
    assert sample(s, "recurrent_depth_tokens", "_total", **lb) == 4
    assert sample(s, "recurrent_depth_flops", "_total", **la) == 1234.5  # inf adds 0
    assert sample(s, "recurrent_depth_flops", "_total", **lb) == 0.0  # absent adds 0
    used_a = np.r_[a.position_iterations.ravel(), c.position_iterations.ravel()]
    assert sample(s, "recurrent_depth_iterations_used", "_count", **la) == 10
    assert sample(s, "recurrent_depth_iterations_used", "_sum", **la) == used_a.sum()
    # no per-position counts: every token used the forward's iterations
    assert sample(s, "recurrent_depth_iterations_used", "_count", **lb) == 4
    assert sample(s, "recurrent_depth_iterations_used", "_sum", **lb) == 4 * b.iterations
    res = []
    for t in (a, c):
        last = t.position_iterations - 1
        v = np.take_along_axis(t.position_metrics["rel_residual"], last[..., None], -1).ravel()
        res += [float(x) for x in v if np.isfinite(x)]
    assert sample(s, "recurrent_depth_residual_at_exit", "_count", **la) == len(res)
    assert sample(s, "recurrent_depth_residual_at_exit", "_sum", **la) == pytest.approx(sum(res))
    assert 'service_name="mythos-probe"' in text  # the default service name, on target_info


def test_the_bound_warns_once_and_counts_the_rest_as_other(caplog):
    base = make_trace(1, detail="summary")
    sent = [dataclasses.replace(base, attributes={"endpoint": f"/e{i}"}) for i in range(6)]
    with caplog.at_level(logging.WARNING, logger="mythos_probe.collectors.prometheus"):
        with LoopMetrics(port=0, max_label_sets=3) as m:
            m.record(sent[:4])  # the first combination past the bound warns
            first = [r.getMessage() for r in caplog.records if "label combinations" in r.getMessage()]
            m.record(sent[4:] + sent[:1])  # the second and third do not
            _, s = scrape(m)
    assert first == ["more than 3 label combinations; further ones are counted as 'other'"]
    warned = [r for r in caplog.records if "label combinations" in r.getMessage()]
    assert len(warned) == 1
    got = {x.labels["endpoint"]: x.value for x in s["recurrent_depth_forwards"] if x.name.endswith("_total")}
    assert got == {"/e0": 2, "/e1": 1, "/e2": 1, "other": 3}
    other = [x.labels for x in s["recurrent_depth_forwards"] if x.labels["endpoint"] == "other"][0]
    assert {k: other[k] for k in P.LABELS} == P.OTHER


def test_two_instances_do_not_share_a_registry():
    t = make_trace(4, detail="summary")
    with LoopMetrics(port=0) as one, LoopMetrics(port=0, service_name="other-svc") as two:
        one.record([t, t])
        two.record([t])
        _, s1 = scrape(one)
        _, s2 = scrape(two)
    assert sum(x.value for x in s1["recurrent_depth_forwards"] if x.name.endswith("_total")) == 2
    assert sum(x.value for x in s2["recurrent_depth_forwards"] if x.name.endswith("_total")) == 1
