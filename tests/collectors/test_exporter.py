import logging
import socket

from mythos_probe.collectors.exporter import BoundedSpanProcessor, DuckDBSpanExporter, otlp_exporter, tracer_provider
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
