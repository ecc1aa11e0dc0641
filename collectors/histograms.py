"""OTel metrics from LoopTraces: iterations used per token and relative residual at exit.

Two histograms with explicit bucket boundaries suited to their values (the SDK default buckets,
0–10000 in coarse steps, would put every loop count in two buckets):
- `recurrent_depth.iterations_used` (per token): integer loop counts, one bucket per count up to
  16, then doubling to 256;
- `recurrent_depth.residual_at_exit` (per token, `rel_residual` at its last iteration, or the
  forward's last summary value without positions detail): log-spaced 1e-6 … 10, since residuals
  fall geometrically while the loop converges.
Attributes: `gen_ai.request.model` and `recurrent_depth.exit_policy`. `meter_provider` wires the
views to any reader, e.g. a PeriodicExportingMetricReader over OTLP (`otlp_metric_reader`).

This module is not: the span encoding (`spans`) or the store.
"""

from __future__ import annotations

import numpy as np
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

from mythos_probe.records import LoopTrace

ITERATIONS_USED = "recurrent_depth.iterations_used"
RESIDUAL_AT_EXIT = "recurrent_depth.residual_at_exit"
ITERATION_BOUNDARIES = (*range(1, 17), 24, 32, 48, 64, 96, 128, 192, 256)
RESIDUAL_BOUNDARIES = tuple(m * 10.0**e for e in range(-6, 1) for m in (1, 3)) + (10.0,)

VIEWS = (
    View(instrument_name=ITERATIONS_USED, aggregation=ExplicitBucketHistogramAggregation(ITERATION_BOUNDARIES)),
    View(instrument_name=RESIDUAL_AT_EXIT, aggregation=ExplicitBucketHistogramAggregation(RESIDUAL_BOUNDARIES)),
)


def meter_provider(*readers: MetricReader, service_name: str = "mythos-probe") -> MeterProvider:
    return MeterProvider(
        metric_readers=list(readers), views=list(VIEWS), resource=Resource.create({"service.name": service_name})
    )


def otlp_metric_reader(endpoint: str | None = None, interval_ms: float = 10_000) -> MetricReader:
    """OTLP/HTTP metrics to `endpoint` (base URL) or the standard environment variables."""
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    url = None if endpoint is None else endpoint.rstrip("/") + "/v1/metrics"
    return PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=url), export_interval_millis=interval_ms)


def residual_at_exit(trace: LoopTrace) -> np.ndarray:
    """rel_residual at each token's last iteration (positions detail), else the forward's last."""
    per_position = trace.position_metrics.get("rel_residual")
    if per_position is not None and trace.position_iterations is not None and trace.iterations:
        last = np.clip(trace.position_iterations - 1, 0, trace.iterations - 1)
        values = np.take_along_axis(per_position, last[..., None], axis=-1)[..., 0].ravel()
    elif "rel_residual" in trace.iteration_metrics and trace.iterations:
        values = trace.iteration_metrics["rel_residual"][-1:]
    else:
        values = np.zeros(0)
    return values[np.isfinite(values)].astype(np.float64)


class LoopHistograms:
    """Records each trace's per-token values into the two histograms of `meter`."""

    def __init__(self, meter: Meter) -> None:
        self.iterations_used = meter.create_histogram(ITERATIONS_USED, unit="{iteration}", description="loop iterations used per token")
        self.residual_at_exit = meter.create_histogram(RESIDUAL_AT_EXIT, unit="1", description="relative residual at the token's exit")

    def record(self, trace: LoopTrace) -> None:
        attrs = {"gen_ai.request.model": trace.model_id, "recurrent_depth.exit_policy": trace.exit_policy}
        if trace.position_iterations is not None:
            used = trace.position_iterations.ravel()
        else:
            used = np.full(trace.batch * trace.seq_len, trace.iterations)
        for value in used.tolist():  # the OTel API takes one value per call
            self.iterations_used.record(value, attrs)
        for value in residual_at_exit(trace).tolist():
            self.residual_at_exit.record(value, attrs)
