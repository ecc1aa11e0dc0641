"""Collectors: LoopTrace → OpenTelemetry spans/metrics → DuckDB store, OTLP out and in.

Modules: `spans` (encoder/decoder, `emit`), `histograms` (OTel metrics), `schema` and
`migrations` (table layout), `rows` (Arrow batches), `store` (`Store`, the one DuckDB opener),
`parquet_store` (`ParquetStore`: a Parquet folder many processes write, read like a `Store`),
`ranks` (the cross-rank join in SQL),
`exporter` (`DuckDBSpanExporter`, OTLP exporters, `BoundedSpanProcessor`, `tracer_provider`),
`sinks` (`otlp_sink`, `store_sink` for `attach(on_trace=...)`), `receiver` (OTLP/HTTP), `serve` and `export_cli` (CLI subcommands),
`read_api` and `remote` (readers of a store `serve` is writing: `connect(url).frame("forwards")`).
Nothing here imports torch; import the submodule you need (this package imports nothing eagerly).
"""


def connect(url: str, token: str | None = None, refresh_s: float = 1.0):
    """A live, read-only view of the store a running `mythos-probe serve` writes (its OTLP base
    URL, e.g. "http://127.0.0.1:4318"; `token`: serve's --token): `.frame("forwards")`,
    `.query(sql)`. See `remote.RemoteStore`."""
    from mythos_probe.collectors.remote import connect as _connect

    return _connect(url, token=token, refresh_s=refresh_s)
