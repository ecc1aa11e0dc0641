import logging
import socket
import time

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mythos_probe.collectors.exporter import (
    BoundedSpanProcessor, DuckDBSpanExporter, otlp_exporter, request_cost, tracer_provider)
from mythos_probe.collectors.otlp_decode import Limits
from mythos_probe.collectors.receiver import Receiver
from mythos_probe.collectors.spans import emit
from mythos_probe.collectors.store import Store
from tests.collectors.conftest import table
from tests.collectors.factory import make_trace


def test_duckdb_exporter_stores_the_rows_of_a_direct_write(tmp_path):
    traces = [make_trace(i) for i in range(3)]
    with Store(tmp_path / "a.duckdb") as exported, Store(tmp_path / "b.duckdb") as direct:
        processor = BoundedSpanProcessor(DuckDBSpanExporter(exported))
        provider = tracer_provider(processor)
        for t in traces:
            emit(provider.get_tracer("t"), t)
        assert processor.force_flush()
        direct.write_traces(traces)
        for name in ("forwards", "iterations", "positions", "experts"):
            assert table(exported, name).equals(table(direct, name)), name


def test_export_never_raises_into_the_caller(tmp_path, caplog):
    store = Store(tmp_path / "closed.duckdb")
    exporter = DuckDBSpanExporter(store)
    store.close()
    processor = BoundedSpanProcessor(exporter)
    provider = tracer_provider(processor)
    with caplog.at_level(logging.ERROR):
        emit(provider.get_tracer("t"), make_trace(1))
        assert processor.force_flush()
    assert processor.failed_spans == 1 and processor.exported_spans == 0
    assert "could not write 1 spans" in caplog.text


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on exit: nothing listens there


def test_a_dead_endpoint_fills_the_queue_and_counts_overflow_without_blocking(caplog):
    exporter = otlp_exporter(f"http://127.0.0.1:{dead_port()}", timeout=0.5)
    processor = BoundedSpanProcessor(exporter, max_queue_size=64, max_export_batch_size=16)
    provider = tracer_provider(processor)
    tracer = provider.get_tracer("t")
    trace = make_trace(1, detail="summary")
    n = 3000
    with caplog.at_level(logging.WARNING):
        for i in range(n):
            emit(tracer, type(trace)(**{**trace.__dict__, "span_id": f"{i + 1:016x}"}))
        dropped_while_producing = processor.dropped_spans
        processor.shutdown(timeout_millis=100)
    # Every span is accounted for: queued (then exported, failed or dropped at shutdown) or dropped.
    assert processor.dropped_spans + processor.exported_spans + processor.failed_spans == n
    assert processor.exported_spans == 0
    assert dropped_while_producing > 0  # the queue filled and the producer went on
    assert "spans dropped so far" in caplog.text


def test_otlp_settings_resolve_argument_then_environment_then_default(monkeypatch, tmp_path):
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        monkeypatch.delenv(var, raising=False)
    assert otlp_exporter()._endpoint == "http://127.0.0.1:4318/v1/traces"
    with Store(tmp_path / "s.duckdb") as store, Receiver(store, port=0, token="abc") as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "Authorization=Bearer abc")
        for i, exporter in enumerate([
            otlp_exporter(),  # endpoint and headers from the environment
            otlp_exporter(receiver.endpoint, headers={"Authorization": "Bearer abc"}),  # arguments
        ]):
            processor = BoundedSpanProcessor(exporter)
            emit(tracer_provider(processor).get_tracer("t"), make_trace(i))
            assert processor.force_flush() and processor.exported_spans == 1
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "Authorization=Bearer wrong")
        processor = BoundedSpanProcessor(otlp_exporter(timeout=2))
        emit(tracer_provider(processor).get_tracer("t"), make_trace(5))
        assert processor.force_flush() and processor.failed_spans == 1
        assert store.query("SELECT count(*) AS n FROM forwards").n[0] == 2
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    assert type(otlp_exporter("http://127.0.0.1:4317")).__module__.endswith("grpc.trace_exporter")


class SlowExporter(SpanExporter):
    """A real exporter whose export takes `seconds` (a slow network, as far as the processor sees)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def export(self, spans):
        time.sleep(self.seconds)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def test_shutdown_waits_for_the_export_in_flight_and_counts_late_spans():
    processor = BoundedSpanProcessor(SlowExporter(1.5))
    tracer = tracer_provider(processor).get_tracer("t")
    for i in range(3):
        emit(tracer, make_trace(i, detail="summary"))
    while processor._queue.qsize():  # the worker has taken the batch: it is in flight
        time.sleep(0.01)
    processor.shutdown(timeout_millis=50)  # far shorter than the export
    assert (processor.exported_spans, processor.failed_spans, processor.dropped_spans) == (3, 0, 0)
    emit(tracer, make_trace(7, detail="summary"))  # after shutdown: counted, not lost silently
    assert processor.dropped_spans == 1
    processor.shutdown()  # twice is harmless and counts nothing again
    assert (processor.exported_spans, processor.dropped_spans) == (3, 1)


def finished_spans(traces):
    memory = InMemorySpanExporter()
    tracer = tracer_provider(SimpleSpanProcessor(memory)).get_tracer("t")
    for trace in traces:
        emit(tracer, trace)
    return list(memory.get_finished_spans())


def test_request_cost_bounds_the_encoded_size_from_above_and_closely():
    for span in finished_spans([make_trace(0), make_trace(1, detail="summary", with_text=False),
                                make_trace(2, batch=4, seq_len=32, n_loops=8)]):
        exact = encode_spans([span]).ByteSize()
        estimate, rows, refused = request_cost(span, Limits())
        assert exact <= estimate <= 1.5 * exact + 1024, (exact, estimate)
        assert refused is None


def test_requests_are_cut_to_fit_the_limits_and_a_forward_over_them_is_refused(caplog):
    traces = [make_trace(i, batch=8, seq_len=64, n_loops=6) for i in range(6)]
    big = make_trace(9, batch=8, seq_len=256, n_loops=6)
    spans = finished_spans(traces[:3] + [big] + traces[3:])
    one = max(request_cost(s, Limits())[0] for s in spans if s is not spans[3])
    limits = Limits(max_body_bytes=64 * 1024 + 5 * one // 2)  # room for two forwards, never three
    assert encode_spans([spans[3]]).ByteSize() > limits.max_body_bytes
    processor = BoundedSpanProcessor(SlowExporter(0), limits=limits)
    processor._pending = len(spans)
    with caplog.at_level(logging.WARNING, logger="mythos_probe.collectors.exporter"):
        parts = list(processor._requests(spans))
    sent = [s for part in parts for s in part]
    assert sent == spans[:3] + spans[4:]  # every span but the big one, in order
    assert all(encode_spans(part).ByteSize() <= limits.max_body_bytes for part in parts)
    assert len(parts) >= 3  # 6 forwards, at most 2 per request
    assert processor.dropped_spans == 1
    assert f"not sending forward span {big.span_id}" in caplog.text and "Limits.max_body_bytes" in caplog.text
    rows = Limits(max_rows=100)
    assert "Limits.max_rows = 100" in request_cost(spans[3], rows)[2]
    assert "Limits.max_array = 1,000" in request_cost(spans[3], Limits(max_array=1000))[2]
    processor.shutdown()
