"""`LoopMetrics`: the label set stays bounded, and a forward without usable FLOPs adds none."""

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from mythos_probe.collectors.prometheus import LoopMetrics
from tests.collectors.factory import make_trace


def scrape(metrics: LoopMetrics) -> dict[str, list]:
    with urllib.request.urlopen(metrics.url, timeout=10) as resp:
        text = resp.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def with_(trace, endpoint, flops):
    return type(trace)(**{**trace.__dict__, "attributes": {"endpoint": endpoint},
                          "forward_metrics": {**trace.forward_metrics, "flops": flops}})


def test_label_combinations_beyond_the_bound_are_counted_as_other():
    base = make_trace(1, detail="summary")
    sent = [with_(base, f"/e{i}", 10.0) for i in range(5)] + [with_(base, "/e0", float("nan")),
                                                               with_(base, "/e1", -3.0)]
    with LoopMetrics(port=0, max_label_sets=2) as metrics:
        for trace in sent:
            metrics(trace)  # as an attach(on_trace=[...]) sink
        samples = scrape(metrics)
    forwards = {s.labels["endpoint"]: s.value for s in samples["recurrent_depth_forwards"] if s.name.endswith("_total")}
    assert forwards == {"/e0": 2, "/e1": 2, "other": 3}
    flops = {s.labels["endpoint"]: s.value for s in samples["recurrent_depth_flops"] if s.name.endswith("_total")}
    assert flops == {"/e0": 10.0, "/e1": 10.0, "other": 30.0}
    other = [s.labels for s in samples["recurrent_depth_forwards"] if s.labels["endpoint"] == "other"][0]
    assert {other[k] for k in ("model", "exit_policy", "loop_name", "kind")} == {"other"}


def test_long_label_values_are_cut_to_128_characters_and_stay_distinct():
    import hashlib

    base = make_trace(1, detail="summary")
    long_a, long_b = "/" + "a" * 256 * 1024, "/" + "a" * (256 * 1024 - 1) + "b"  # differ past the cut
    sent = [with_(base, long_a, 1.0), with_(base, long_b, 1.0), with_(base, long_a, 1.0), with_(base, "/" + "c" * 127, 1.0)]
    with LoopMetrics(port=0) as metrics:
        for trace in sent:
            metrics(trace)
        with urllib.request.urlopen(metrics.url, timeout=10) as resp:
            size = len(resp.read())
        samples = scrape(metrics)
    forwards = {s.labels["endpoint"]: s.value for s in samples["recurrent_depth_forwards"] if s.name.endswith("_total")}
    cut = {("/" + "a" * 118 + "~" + hashlib.sha256(v.encode()).hexdigest()[:8]) for v in (long_a, long_b)}
    assert set(forwards) == cut | {"/" + "c" * 127}  # 128 characters: kept as is
    assert sorted(forwards[k] for k in cut) == [1.0, 2.0] and forwards["/" + "c" * 127] == 1.0
    assert all(len(k) <= 128 for k in forwards)
    assert size < 200 * 1024  # the scrape no longer carries the values (it was ~1 MiB per series)
