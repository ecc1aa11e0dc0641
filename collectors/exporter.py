"""Span export: `DuckDBSpanExporter` into the store, OTLP exporters, and a non-blocking processor.

- `DuckDBSpanExporter`: an OTel `SpanExporter` that decodes each span (`rows.decode_span`) and
  writes the store. `export` never raises into the caller: a failure is logged and returned.
- `otlp_exporter(...)`: the standard OTLP/HTTP or OTLP/gRPC span exporter, with settings
  resolved argument → environment variable (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
  `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL`, `OTEL_EXPORTER_OTLP_HEADERS`,
  `OTEL_EXPORTER_OTLP_TIMEOUT`) → default (our receiver on 127.0.0.1).
- `BoundedSpanProcessor`: batching kept apart from exporting, on a bounded queue. `on_end` never
  blocks: when the endpoint is down and the queue is full, the span is dropped and counted in
  `dropped_spans`, and the model runs on at full speed. The SDK's `BatchSpanProcessor` also drops
  on overflow, but only counts drops when its internal metrics are switched on by an environment
  variable; we need a count to query and test. Nothing leaves without a count and a log line
  (the 1st, 2nd, 4th, 8th… of each reason): `dropped_spans` counts spans never sent (queue full,
  ended after shutdown, still queued when shutdown's wait ran out, or over the receiver's
  `Limits`), `failed_spans` spans the exporter could not deliver (a 401 for a wrong token, a 413,
  an endpoint down after the exporter's retries). Each request is cut to fit the receiver's
  `otlp_decode.Limits` (body bytes, spans, rows), so a batch of forwards each within the limits
  is never refused for their sum; a single forward over them is refused here, naming the limit,
  rather than sent to be refused there. `shutdown` waits for the export in flight (the exporter's
  own timeout bounds it), so every span is counted once it returns.
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

from mythos_probe.collectors import spans as S
from mythos_probe.collectors.otlp_decode import Limits
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


# What a request costs beyond its spans' attributes (resource, scope, framing), in bytes
_REQUEST_OVERHEAD = 64 * 1024
_SPAN_OVERHEAD = 256  # ids, name, times, status and the span's own framing


def request_cost(span: ReadableSpan, limits: Limits) -> tuple[int, int, str | None]:
    """(encoded bytes, at most; table rows it adds at our receiver; the `Limits` field it breaks on
    its own, or None). Bytes are counted per OTLP value: 11 per double (exact: see
    `otlp_decode._doubles`), at most 13 per integer, the UTF-8 length plus 6 per string."""
    attrs = span.attributes or {}
    size = _SPAN_OVERHEAD
    longest = 0
    for key, value in attrs.items():
        size += len(key) + 8
        if isinstance(value, (tuple, list)):
            n = len(value)
            longest = max(longest, n)
            if n and isinstance(value[0], str):
                size += sum(len(v.encode()) for v in value) + 6 * n
            else:
                size += (11 if n and isinstance(value[0], float) else 13) * n
        elif isinstance(value, str):
            size += len(value.encode()) + 6
        else:
            size += 13
    rows = 1
    if S.is_loop_span(span.name, attrs):
        iterations = int(attrs.get(S.ATTR_ITERATIONS, 0))
        rows += iterations + iterations * int(attrs.get(S.ATTR_EXPERT_COUNT, 0))
        if attrs.get(S.ATTR_DETAIL) == "positions":
            rows += int(attrs.get(S.ATTR_BATCH, 0)) * int(attrs.get(S.ATTR_SEQ_LEN, 0)) * iterations
        if iterations > limits.max_iterations:
            return size, rows, f"{iterations:,} iterations, over Limits.max_iterations = {limits.max_iterations:,}"
    if size + _REQUEST_OVERHEAD > limits.max_body_bytes:
        return size, rows, (f"~{size / 2**20:,.1f} MiB encoded, over Limits.max_body_bytes = "
                            f"{limits.max_body_bytes / 2**20:,.1f} MiB (`serve --max-body-bytes`)")
    if longest > limits.max_array:
        return size, rows, f"an array of {longest:,} values, over Limits.max_array = {limits.max_array:,}"
    if rows > limits.max_rows:
        return size, rows, f"{rows:,} table rows, over Limits.max_rows = {limits.max_rows:,}"
    if len(attrs) > limits.max_attributes:
        return size, rows, f"{len(attrs):,} attributes, over Limits.max_attributes = {limits.max_attributes:,}"
    return size, rows, None


class _Tally:
    """A count that logs its 1st, 2nd, 4th, 8th… increment: every loss has a line, and a flood
    of them a few lines."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.count = 0

    def add(self, n: int, *args) -> None:
        before, self.count = self.count, self.count + n
        if n and (before == 0 or before.bit_length() != self.count.bit_length()):
            logger.warning(self.message, *args, self.count)


class BoundedSpanProcessor(SpanProcessor):
    """Queues ended spans for a worker thread that exports them; drops (and counts) on overflow.

    `limits`: the receiver's (`otlp_decode.Limits`, our receiver's defaults unless given); each
    request is cut to fit them and a span over them alone is refused (dropped, counted, logged).
    None sends batches as they come (an exporter without request limits, e.g. DuckDB)."""

    def __init__(self, exporter: SpanExporter, max_queue_size: int = 2048, max_export_batch_size: int = 512,
                 limits: Limits | None = Limits()) -> None:
        self.exporter = exporter
        self.max_export_batch_size = max_export_batch_size
        self.limits = limits
        self.exported_spans = 0
        self._full = _Tally("span export queue full (%d spans): %d spans dropped so far; is the exporter's endpoint up?")
        self._late = _Tally("%d spans ended after the exporter shut down: %d dropped so far")
        self._left = _Tally("shutdown dropped %d queued spans that could not be exported in time (%d so far)")
        self._refused = _Tally("not sending forward span %s: %s; record it at detail='summary' or in smaller "
                               "batches, or raise the receiver's limit (%d refused so far)")
        self._failed = _Tally("%d spans failed to export (the exporter's own log line says why: a wrong token "
                              "is a 401, an endpoint down a connection error); %d failed so far")
        self._queue: queue.Queue[ReadableSpan] = queue.Queue(max_queue_size)
        self._pending = 0  # queued or being exported
        self._idle = threading.Condition()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="mythos-probe-span-export", daemon=True)
        self._worker.start()

    @property
    def dropped_spans(self) -> int:
        """Spans never sent: queue full, ended after shutdown, left at shutdown, or over `limits`."""
        with self._idle:
            return self._full.count + self._late.count + self._left.count + self._refused.count

    @property
    def failed_spans(self) -> int:
        """Spans sent that the exporter could not deliver."""
        with self._idle:
            return self._failed.count

    def on_start(self, span, parent_context=None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if not span.context.trace_flags.sampled:
            return
        with self._idle:
            if self._stop.is_set():
                self._late.add(1, 1)
                return
            try:
                self._queue.put_nowait(span)
                self._pending += 1
            except queue.Full:
                self._full.add(1, self._queue.maxsize)

    def _requests(self, batch: list[ReadableSpan]):
        """`batch` cut into requests that fit `limits`; spans over them alone are refused here."""
        if self.limits is None:
            yield batch
            return
        part, size, rows = [], _REQUEST_OVERHEAD, 0
        for span in batch:
            cost, n_rows, too_large = request_cost(span, self.limits)
            if too_large:
                with self._idle:
                    self._refused.add(1, f"{span.context.span_id:016x}", too_large)
                    self._pending -= 1
                    self._idle.notify_all()
                continue
            if part and (size + cost > self.limits.max_body_bytes or rows + n_rows > self.limits.max_rows
                         or len(part) >= self.limits.max_spans):
                yield part
                part, size, rows = [], _REQUEST_OVERHEAD, 0
            part.append(span)
            size, rows = size + cost, rows + n_rows
        if part:
            yield part

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
            for part in self._requests(batch):
                try:
                    ok = self.exporter.export(part) is SpanExportResult.SUCCESS
                except Exception:  # an exporter that raises must not kill the worker
                    logger.exception("span exporter raised")
                    ok = False
                with self._idle:
                    if ok:
                        self.exported_spans += len(part)
                    else:
                        self._failed.add(len(part), len(part))
                    self._pending -= len(part)
                    self._idle.notify_all()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout_millis / 1000)

    def shutdown(self, timeout_millis: int = 5000) -> None:
        """Flushes for at most `timeout_millis`; what is still queued then is dropped and counted.
        An export in flight is waited for (the exporter's own timeout bounds it): once this
        returns, every span is counted as exported, failed or dropped."""
        if self._stop.is_set():
            return
        self.force_flush(timeout_millis)
        with self._idle:
            self._stop.set()
        self._worker.join()
        left = 0
        while True:
            try:
                self._queue.get_nowait()
                left += 1
            except queue.Empty:
                break
        with self._idle:
            self._left.add(left, left)
            self._pending -= left
            self._idle.notify_all()
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
