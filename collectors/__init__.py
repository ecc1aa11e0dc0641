"""Collectors: LoopTrace → OpenTelemetry spans/metrics → DuckDB store, OTLP out and in.

Modules: `spans` (encoder/decoder, `emit`), `histograms` (OTel metrics), `schema` and
`migrations` (table layout), `rows` (Arrow batches), `store` (`Store`, the one DuckDB opener),
`parquet_store` (`ParquetStore`: a Parquet folder many processes write, read like a `Store`),
`ranks` (the cross-rank join in SQL),
`exporter` (`DuckDBSpanExporter`, OTLP exporters, `BoundedSpanProcessor`, `tracer_provider`),
`sinks` (`otlp_sink`, `store_sink` for `attach(on_trace=...)`), `receiver` (OTLP/HTTP), `serve` and `export_cli` (CLI subcommands). Nothing here imports torch;
import the submodule you need (this package imports nothing eagerly).
"""
