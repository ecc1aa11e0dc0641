"""Trace sinks: callables taking one `LoopTrace`, for `attach(model, on_trace=[sink])`.

- `otlp_sink(endpoint, protocol)`: emits each forward as its span and exports it over OTLP
  (to `mythos-probe serve`, a Collector, Phoenix…) through the standard exporter, on a
  `BoundedSpanProcessor`: calling the sink never blocks on the network, and a full queue drops
  (counted in `dropped_spans`) rather than stalling the model. Every span not delivered is
  counted, `dropped_spans` (never sent: queue full, over the receiver's `Limits`, left at close)
  or `failed_spans` (refused or unreachable: a 401 for a wrong token), and logged. `limits` are
  the receiver's (`serve --max-body-bytes` sets its body limit); requests are cut to fit them.
  `headers` (e.g. `{"Authorization": "Bearer <token>"}` for `serve --token`) as in `otlp_exporter`.
  Settings resolve as in `exporter.otlp_exporter`: argument → `OTEL_EXPORTER_OTLP_*` environment
  variable → our receiver on 127.0.0.1.
- `store_sink(path)`: writes each forward straight into a DuckDB store this process owns.

Both have `flush()` and `close()` (which flushes, and waits for the export in flight) and are
context managers.

This module is not: the span encoding (`spans`), the exporters (`exporter`) or the store (`store`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from mythos_probe.collectors.exporter import BoundedSpanProcessor, otlp_exporter, tracer_provider
from mythos_probe.collectors.otlp_decode import Limits
from mythos_probe.collectors.spans import emit
from mythos_probe.collectors.store import Store
from mythos_probe.records import LoopTrace


class _Sink:
    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class OtlpSink(_Sink):
    """Exports each trace as an OTLP span; see `otlp_sink`."""

    def __init__(self, endpoint: str | None = None, protocol: str | None = None,
                 service_name: str = "mythos-probe", iteration_spans: bool = False,
                 limits: Limits = Limits(), headers: Mapping[str, str] | None = None) -> None:
        self._processor = BoundedSpanProcessor(otlp_exporter(endpoint, protocol, headers), limits=limits)
        self._provider = tracer_provider(self._processor, service_name=service_name)
        self._tracer = self._provider.get_tracer("mythos_probe")
        self.iteration_spans = iteration_spans

    @property
    def dropped_spans(self) -> int:
        return self._processor.dropped_spans

    @property
    def failed_spans(self) -> int:
        return self._processor.failed_spans

    def __call__(self, trace: LoopTrace) -> None:
        emit(self._tracer, trace, iteration_spans=self.iteration_spans)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Waits until every queued span is exported (or failed); False on timeout."""
        return self._processor.force_flush(int(timeout_s * 1000))

    def close(self, timeout_s: float = 30.0) -> None:
        """Exports what is queued for at most `timeout_s` (what is left then is dropped and
        counted), waits for the export in flight, then shuts the exporter down."""
        self._processor.force_flush(int(timeout_s * 1000))
        self._provider.shutdown()


class StoreSink(_Sink):
    """Writes each trace into the DuckDB store at `path` (created when missing)."""

    def __init__(self, path: str | Path) -> None:
        self.store = Store(path)

    def __call__(self, trace: LoopTrace) -> None:
        self.store.write_traces([trace])

    def flush(self) -> bool:
        return True  # each write commits before the call returns

    def close(self) -> None:
        self.store.close()


def otlp_sink(endpoint: str | None = None, protocol: str | None = None, **kwargs: Any) -> OtlpSink:
    """A sink exporting OTLP to `endpoint` (base URL; `/v1/traces` is added for HTTP)."""
    return OtlpSink(endpoint, protocol, **kwargs)


def store_sink(path: str | Path) -> StoreSink:
    """A sink writing the DuckDB store at `path`."""
    return StoreSink(path)
