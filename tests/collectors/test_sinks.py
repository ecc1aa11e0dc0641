"""`otlp_sink` and `store_sink` as `attach(on_trace=...)` callbacks: forwards sent through the
OTLP sink to the receiver are stored exactly as the store sink writes them."""

from mythos_probe.collectors.sinks import otlp_sink, store_sink
from tests.collectors.factory import make_trace
from tests.collectors.test_receiver import assert_same_rows


def test_otlp_sink_to_the_receiver_stores_what_the_store_sink_writes(receiver, tmp_path):
    traces = [make_trace(i) for i in range(4)] + [make_trace(9, detail="summary", with_text=False)]
    with otlp_sink(receiver.endpoint) as remote, store_sink(tmp_path / "local.duckdb") as local:
        for trace in traces:
            remote(trace)
            local(trace)
        assert remote.flush()
        assert (remote.dropped_spans, remote.failed_spans) == (0, 0)
        assert receiver.received_spans == len(traces)
        assert_same_rows(receiver.store, local.store)
