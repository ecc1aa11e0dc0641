"""Span export: `DuckDBSpanExporter` into the store, OTLP exporters, and a non-blocking processor.

- `DuckDBSpanExporter`: an OTel `SpanExporter` that decodes each span (`rows.decode_span`) and
  writes the store. `export` never raises into the caller: a failure is logged and returned.
- `otlp_exporter(...)`: the standard OTLP/HTTP or OTLP/gRPC span exporter, with settings
  resolved argument → environment variable (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
  `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL`, `OTEL_EXPORTER_OTLP_HEADERS`,
  `OTEL_EXPORTER_OTLP_TIMEOUT`) → default (our receiver on 127.0.0.1).
- `BoundedSpanProcessor`: batching kept apart from exporting, on a bounded queue. `on_end` never
  blocks: when the endpoint is down and the queue is full, the span is dropped and counted in
  `dropped_spans` (logged on the 1st, 2nd, 4th, 8th… drop), and the model runs on at full speed.
  The SDK's `BatchSpanProcessor` also drops on overflow, but only counts drops when its internal
  metrics are switched on by an environment variable; we need a count to query and test.
- `tracer_provider(*processors)`: a TracerProvider with `LoopTraceIdGenerator` (span ids equal
  the LoopTrace's), explicit `SPAN_LIMITS` (nothing dropped from a full record) and the process's
  resource: `host.name`, `process.pid` and `recurrent_depth.rank.*` (`process_resource`).

This module is not: the span encoding (`spans`), the OTLP receiver (`receiver`) or metrics
(`histograms`).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Mapping, Sequence

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from mythos_probe.collectors.rows import decode_span
from mythos_probe.collectors.spans import RANK_ATTRS, SPAN_LIMITS, LoopTraceIdGenerator
from mythos_probe.collectors.store import Store
from mythos_probe.probes.distributed import Where, where

logger = logging.getLogger(__name__)

DEFAULT_HTTP_ENDPOINT = "http://127.0.0.1:4318"
DEFAULT_GRPC_ENDPOINT = "http://127.0.0.1:4317"


def readable_span_record(span: ReadableSpan):
    """An SDK span → (LoopTrace or None, `spans` row)."""
    ctx = span.context
    return decode_span(
        trace_id=f"{ctx.trace_id:032x}",
        span_id=f"{ctx.span_id:016x}",
        parent_span_id=f"{span.parent.span_id:016x}" if span.parent else None,
        name=span.name,
        kind=span.kind.name,
        start_ns=span.start_time or 0,
        end_ns=span.end_time or 0,
        status_code=span.status.status_code.name,
        status_message=span.status.description,
        resource=dict(span.resource.attributes),
        attributes=dict(span.attributes or {}),
    )


class DuckDBSpanExporter(SpanExporter):
    """Writes finished spans into a `Store` (forwards decoded, every span as a raw row)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            decoded = [readable_span_record(s) for s in spans]
            self.store.write([t for t, _ in decoded if t is not None], [row for _, row in decoded])
            return SpanExportResult.SUCCESS
        except Exception:
            logger.exception("could not write %d spans to %s", len(spans), self.store.path)
            return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        """The store belongs to the caller, who closes it."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # writes are synchronous


def _headers(value: str | None) -> dict[str, str]:
    pairs = (item.split("=", 1) for item in (value or "").split(",") if "=" in item)
    return {k.strip(): v.strip() for k, v in pairs}


def otlp_exporter(
    endpoint: str | None = None,
    protocol: str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> SpanExporter:
    """The standard OTLP span exporter; `endpoint` is the base URL (`/v1/traces` is added for HTTP)."""
    protocol = protocol or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    headers = dict(headers) if headers is not None else _headers(os.environ.get("OTEL_EXPORTER_OTLP_HEADERS"))
    timeout = timeout if timeout is not None else float(os.environ.get("OTEL_EXPORTER_OTLP_TIMEOUT", "10"))
    traces_endpoint = None if endpoint else os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        target = endpoint or traces_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", DEFAULT_GRPC_ENDPOINT)
        return GrpcExporter(endpoint=target, headers=headers, timeout=timeout, insecure=target.startswith("http://"))
    if protocol != "http/protobuf":
        raise ValueError(f"OTLP protocol must be 'http/protobuf' or 'grpc', got {protocol!r}")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    if traces_endpoint:
        url = traces_endpoint
    else:
        base = endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", DEFAULT_HTTP_ENDPOINT)
        url = base.rstrip("/") + "/v1/traces"
    return HttpExporter(endpoint=url, headers=headers, timeout=timeout)


class BoundedSpanProcessor(SpanProcessor):
    """Queues ended spans for a worker thread that exports them; drops (and counts) on overflow."""

    def __init__(self, exporter: SpanExporter, max_queue_size: int = 2048, max_export_batch_size: int = 512) -> None:
        self.exporter = exporter
        self.max_export_batch_size = max_export_batch_size
        self.dropped_spans = 0
        self.exported_spans = 0
        self.failed_spans = 0
        self._queue: queue.Queue[ReadableSpan] = queue.Queue(max_queue_size)
        self._pending = 0  # queued or being exported
        self._idle = threading.Condition()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="mythos-probe-span-export", daemon=True)
        self._worker.start()

    def on_start(self, span, parent_context=None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if self._stop.is_set() or not span.context.trace_flags.sampled:
            return
        with self._idle:
            try:
                self._queue.put_nowait(span)
                self._pending += 1
                return
            except queue.Full:
                self.dropped_spans += 1
                dropped = self.dropped_spans
        if dropped & (dropped - 1) == 0:
            logger.warning(
                "span export queue full (%d spans): %d spans dropped so far; is the exporter's endpoint up?",
                self._queue.maxsize,
                dropped,
            )

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batch = [self._queue.get(timeout=0.1)]
            except queue.Empty:
                continue
            while len(batch) < self.max_export_batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                ok = self.exporter.export(batch) is SpanExportResult.SUCCESS
            except Exception:  # an exporter that raises must not kill the worker
                logger.exception("span exporter raised")
                ok = False
            with self._idle:
                if ok:
                    self.exported_spans += len(batch)
                else:
                    self.failed_spans += len(batch)
                self._pending -= len(batch)
                self._idle.notify_all()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout_millis / 1000)

    def shutdown(self, timeout_millis: int = 5000) -> None:
        """Flushes for at most `timeout_millis`; what is still queued then is dropped and counted."""
        self.force_flush(timeout_millis)
        self._stop.set()
        self._worker.join(timeout_millis / 1000)
        with self._idle:
            left = self._queue.qsize()
            self.dropped_spans += left
        if left:
            logger.warning("shutdown dropped %d queued spans that could not be exported", left)
        self.exporter.shutdown()


def process_resource(w: Where | None = None) -> dict[str, str | int]:
    """This process's resource attributes: OTel's `host.name` and `process.pid`, and the rest of
    the rank family under the span attributes' names (`recurrent_depth.rank.index`, …), so a
    backend can group the spans of one rank by resource."""
    fields = (w or where()).fields()
    attrs: dict[str, str | int] = {"host.name": fields.pop("host"), "process.pid": fields.pop("pid")}
    attrs.update({RANK_ATTRS[field][0]: value for field, value in fields.items()})
    return attrs


def tracer_provider(*processors: SpanProcessor, service_name: str = "mythos-probe") -> TracerProvider:
    """A TracerProvider for `spans.emit`: record ids, explicit limits, this process's resource
    (`process_resource`), the given processors."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name, **process_resource()}),
        id_generator=LoopTraceIdGenerator(),
        span_limits=SPAN_LIMITS,
    )
    for processor in processors:
        provider.add_span_processor(processor)
    return provider
