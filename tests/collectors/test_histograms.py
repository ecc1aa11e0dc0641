import numpy as np
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from mythos_probe.collectors.histograms import (
    ITERATION_BOUNDARIES,
    ITERATIONS_USED,
    RESIDUAL_AT_EXIT,
    RESIDUAL_BOUNDARIES,
    LoopHistograms,
    meter_provider,
)
from tests.collectors.factory import make_trace


def bucket_counts(values, boundaries):
    # OTel buckets are (b[i-1], b[i]]: numpy's right-closed digitize
    return np.bincount(np.digitize(values, boundaries, right=True), minlength=len(boundaries) + 1).tolist()


def test_histograms_use_explicit_buckets_and_count_every_token():
    reader = InMemoryMetricReader()
    provider = meter_provider(reader)
    histograms = LoopHistograms(provider.get_meter("test"))
    traces = [make_trace(i, batch=3, seq_len=7, n_loops=12) for i in range(4)]
    for t in traces:
        histograms.record(t)
    metrics = {
        m.name: m.data.data_points[0]
        for rm in reader.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    used = np.concatenate([t.position_iterations.ravel() for t in traces])
    point = metrics[ITERATIONS_USED]
    assert tuple(point.explicit_bounds) == ITERATION_BOUNDARIES
    assert list(point.bucket_counts) == bucket_counts(used, ITERATION_BOUNDARIES)
    residual = np.concatenate([
        np.take_along_axis(t.position_metrics["rel_residual"], (t.position_iterations - 1)[..., None], -1).ravel()
        for t in traces
    ]).astype(np.float64)
    residual = residual[np.isfinite(residual)]  # tokens exiting at t = 0 have no residual
    point = metrics[RESIDUAL_AT_EXIT]
    assert tuple(point.explicit_bounds) == RESIDUAL_BOUNDARIES
    assert point.count == residual.size
    assert list(point.bucket_counts) == bucket_counts(residual, RESIDUAL_BOUNDARIES)
    provider.shutdown()
