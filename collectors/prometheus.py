"""Loop metrics for Prometheus: the OpenTelemetry Prometheus exporter serving `/metrics`.

`LoopMetrics(port)` serves, on 127.0.0.1:port, what most dashboards ask of a looped model:
- `recurrent_depth_iterations_used` (histogram, per token: loop iterations the token used; the
  forward's `iterations` for every token when the record has no per-position counts);
- `recurrent_depth_residual_at_exit` (histogram, per token: `rel_residual` at its exit, see
  `histograms.residual_at_exit`);
- `recurrent_depth_forwards_total`, `recurrent_depth_tokens_total` and `recurrent_depth_flops_total`
  (counters; FLOPs from the record's `flops` forward metric; a forward without it, or with a
  NaN or negative value, adds 0);
- `recurrent_depth_tokens_at_budget_total` (tokens that used every iteration of their forward's
  budget `n_loops`: the loop saturated rather than converged) and
  `recurrent_depth_diverged_forwards_total` (forwards whose state held a NaN or ±Inf, the record's
  `diverged_at` ≥ 0);
- `recurrent_depth_exporter_dropped_spans_total` and `..._failed_spans_total` of the OTLP sinks
  passed to `watch` (spans a full queue dropped, spans the endpoint refused), and
  `recurrent_depth_receiver_rejected_requests_total` of the receiver passed to `watch` (serve does).
The histogram buckets are `histograms.VIEWS` (one per loop count, log-spaced residuals). Recording
and alerting rules and a Grafana dashboard over these series are in `assets/` (README).

Labels: `model`, `endpoint` (the record's user attribute `endpoint`, "" when absent), `exit_policy`,
`loop_name`, `kind` and `rank` (the torch.distributed rank; "0" for a single process). The label set is bounded: after `max_label_sets` distinct combinations,
a new one is counted under every label = "other" (and logged once), so a runaway attribute can
never grow Prometheus's series without bound. So is each label's length: a value longer than
`MAX_LABEL_CHARS` (128) characters is cut to its first 119 and ends in "~" and 8 hex digits of its
SHA-256, so two long values stay two series and the scrape stays small (twelve 256 KiB endpoints
once made a 144 MiB scrape).

Use it from `mythos-probe serve --prometheus PORT` (each forward the receiver stores, counted
once even when a sender retries) or in a notebook as an `attach(on_trace=[...])` sink:

    with LoopMetrics(port=9464) as metrics, mythos_probe.attach(model, on_trace=[metrics]):
        model.generate(...)

This module is not: the OTLP metrics path (`histograms.otlp_metric_reader`) or the receiver.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from typing import Any, Iterable

import numpy as np
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from prometheus_client import CollectorRegistry, start_http_server

from mythos_probe.collectors import histograms
from mythos_probe.records import LoopTrace

logger = logging.getLogger(__name__)

DEFAULT_PORT = 9464  # the OpenTelemetry Prometheus exporter's registered default port
LABELS = ("model", "endpoint", "exit_policy", "loop_name", "kind", "rank")
OTHER = dict.fromkeys(LABELS, "other")
MAX_LABEL_CHARS = 128


def bounded_label(value: str) -> str:
    """`value`, or when longer than `MAX_LABEL_CHARS` its first 119 characters + "~" + 8 hex
    digits of its SHA-256 (128 characters in all)."""
    if len(value) <= MAX_LABEL_CHARS:
        return value
    digest = hashlib.sha256(value.encode(errors="surrogatepass")).hexdigest()[:8]
    return value[: MAX_LABEL_CHARS - 9] + "~" + digest


class LoopMetrics:
    """Loop histograms and counters of the forwards passed to `record`, served for Prometheus."""

    def __init__(self, port: int = DEFAULT_PORT, max_label_sets: int = 200, service_name: str = "mythos-probe") -> None:
        registry = CollectorRegistry()  # our own: two LoopMetrics in one process never clash
        self._reader = PrometheusMetricReader(registry=registry)
        self._provider = histograms.meter_provider(self._reader, service_name=service_name)
        meter = self._provider.get_meter("mythos_probe")
        # The SDK lower-cases instrument names and the Prometheus exporter drops `{annotation}`
        # units (and "1"): a change of case in a name or of a unit shows in no scrape, so those
        # lines are not mutated (the names themselves are pinned by the scrape tests).
        self._iterations = meter.create_histogram(
            histograms.ITERATIONS_USED,
            unit="{iteration}",  # pragma: no mutate (the exporter drops {annotation} units)
            description="loop iterations used per token")
        self._residual = meter.create_histogram(
            histograms.RESIDUAL_AT_EXIT,
            unit="1",  # pragma: no mutate (the exporter maps unit "1" to no suffix)
            description="relative residual at the token's exit")
        self._forwards = meter.create_counter(
            "recurrent_depth.forwards",  # pragma: no mutate (the SDK lower-cases names)
            unit="{forward}",  # pragma: no mutate (the exporter drops {annotation} units)
            description="forwards recorded")
        self._tokens = meter.create_counter(
            "recurrent_depth.tokens",  # pragma: no mutate (the SDK lower-cases names)
            unit="{token}",  # pragma: no mutate (the exporter drops {annotation} units)
            description="tokens (batch × seq) recorded")
        self._flops = meter.create_counter(
            "recurrent_depth.flops",  # pragma: no mutate (the SDK lower-cases names)
            unit="{flop}",  # pragma: no mutate (the exporter drops {annotation} units)
            description="estimated FLOPs of the forwards")
        self._at_budget = meter.create_counter(
            "recurrent_depth.tokens_at_budget",  # pragma: no mutate (the SDK lower-cases names)
            unit="{token}",  # pragma: no mutate (the exporter drops {annotation} units)
            description="tokens that used every iteration of the budget n_loops")
        self._diverged = meter.create_counter(
            "recurrent_depth.diverged_forwards",  # pragma: no mutate (the SDK lower-cases names)
            unit="{forward}",  # pragma: no mutate (the exporter drops {annotation} units)
            description="forwards whose loop state held a NaN or Inf")
        self._watched: list[Any] = []
        for name, attribute, unit, description in (
            ("recurrent_depth.exporter.dropped_spans",  # pragma: no mutate (the SDK lower-cases names)
             "dropped_spans",
             "{span}",  # pragma: no mutate (the exporter drops {annotation} units)
             "spans an OTLP sink dropped (queue full)"),
            ("recurrent_depth.exporter.failed_spans",  # pragma: no mutate (the SDK lower-cases names)
             "failed_spans",
             "{span}",  # pragma: no mutate (the exporter drops {annotation} units)
             "spans the OTLP endpoint did not accept"),
            ("recurrent_depth.receiver.rejected_requests",  # pragma: no mutate (the SDK lower-cases names)
             "rejected_requests",
             "{request}",  # pragma: no mutate (the exporter drops {annotation} units)
             "OTLP requests the receiver answered with an error"),
        ):
            meter.create_observable_counter(
                name, callbacks=[self._observe(attribute)], description=description,
                unit=unit)  # pragma: no mutate (the exporter drops {annotation} units)
        self.max_label_sets = max_label_sets
        self._label_sets: set[tuple[str, ...]] = set()
        self._overflowed = 0  # forwards counted as "other"
        self._lock = threading.Lock()
        self._server, self._thread = start_http_server(port, addr="127.0.0.1", registry=registry)

    def watch(self, source: Any) -> Any:
        """Also serve the counters `source` keeps: an `OtlpSink` (`dropped_spans`, `failed_spans`)
        or a `Receiver` (`rejected_requests`). Returns `source`."""
        with self._lock:
            self._watched.append(source)
        return source

    def _observe(self, attribute: str):
        from opentelemetry.metrics import Observation

        def callback(_options):
            with self._lock:
                sources = [s for s in self._watched if hasattr(s, attribute)]
            if sources:  # one series per process: a counter that exists only where it is kept
                yield Observation(sum(getattr(s, attribute) for s in sources))  # no attributes

        return callback

    @property
    def port(self) -> int:
        return self._server.server_port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def _labels(self, trace: LoopTrace) -> dict[str, str]:
        labels = {
            "model": bounded_label(trace.model_id),
            "endpoint": bounded_label(str(trace.attributes.get("endpoint", ""))),
            "exit_policy": bounded_label(trace.exit_policy),
            "loop_name": bounded_label(trace.loop_name),
            "kind": trace.kind,
            "rank": str(trace.rank),
        }
        key = tuple(labels.values())
        with self._lock:
            if key in self._label_sets:
                return labels
            if len(self._label_sets) < self.max_label_sets:
                self._label_sets.add(key)
                return labels
            self._overflowed += 1
            if self._overflowed == 1:
                logger.warning("more than %d label combinations; further ones are counted as 'other'", self.max_label_sets)
        return OTHER

    def record(self, traces: Iterable[LoopTrace]) -> None:
        for trace in traces:
            labels = self._labels(trace)
            tokens = trace.batch * trace.seq_len
            self._forwards.add(1, labels)
            self._tokens.add(tokens, labels)
            flops = trace.forward_metrics.get("flops", 0.0)
            self._flops.add(max(flops, 0.0) if np.isfinite(flops) else 0.0, labels)
            if trace.position_iterations is not None:
                used = trace.position_iterations.ravel().tolist()
            else:
                used = [trace.iterations] * tokens
            self._at_budget.add(int((np.asarray(used) >= trace.n_loops).sum()), labels)
            diverged_at = trace.forward_metrics.get("diverged_at", np.nan)  # absent: not diverged
            self._diverged.add(1 if np.isfinite(diverged_at) and diverged_at >= 0 else 0, labels)
            for value in used:  # the OTel API takes one value per call
                self._iterations.record(value, labels)
            for value in histograms.residual_at_exit(trace).tolist():
                self._residual.record(value, labels)

    def __call__(self, trace: LoopTrace) -> None:
        """A sink for `attach(on_trace=[...])`."""
        self.record([trace])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._provider.shutdown()

    def __enter__(self) -> "LoopMetrics":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
