"""`otlp_sink` and `store_sink` as `attach(on_trace=...)` callbacks: forwards sent through the
OTLP sink to the receiver are stored exactly as the store sink writes them."""

import logging

from mythos_probe.collectors.otlp_decode import Limits
from mythos_probe.collectors.receiver import Receiver
from mythos_probe.collectors.sinks import otlp_sink, store_sink
from mythos_probe.collectors.store import Store
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


def failure_lines(caplog):
    return [r for r in caplog.records if r.name == "mythos_probe.collectors.exporter" and "failed to export" in r.getMessage()]


def test_a_wrong_token_is_counted_on_the_sink_and_logged_on_the_1st_and_2nd_failure(tmp_path, caplog):
    with Store(tmp_path / "r.duckdb") as store, Receiver(store, port=0, token="right") as receiver, \
            caplog.at_level(logging.WARNING):
        with otlp_sink(receiver.endpoint, headers={"Authorization": "Bearer wrong"}) as sink:
            for i in range(3):  # one at a time, so that each is its own failed request
                sink(make_trace(i, detail="summary"))
                assert sink.flush()
            assert (sink.failed_spans, sink.dropped_spans) == (3, 0)
        assert receiver.rejected_requests == 3 and receiver.received_spans == 0
    assert len(failure_lines(caplog)) == 2  # 1st and 2nd; the 4th would be next


def test_a_forward_over_the_receivers_limits_is_refused_at_the_sender_not_lost(tmp_path, caplog):
    limits = Limits(max_array=1000)
    small = [make_trace(i) for i in range(4)]  # 2 × 5 positions × ≤ 6 iterations: ≤ 60 values per array
    big = make_trace(9, batch=8, seq_len=32, n_loops=6)
    assert big.batch * big.seq_len * big.iterations > 1000
    with Store(tmp_path / "r.duckdb") as store, Receiver(store, port=0, limits=limits) as receiver, \
            caplog.at_level(logging.WARNING):
        with otlp_sink(receiver.endpoint, limits=limits) as sink:
            for trace in small[:2] + [big] + small[2:]:
                sink(trace)
            assert sink.flush()
            assert (sink.dropped_spans, sink.failed_spans) == (1, 0)
        assert receiver.received_spans == 4 and receiver.rejected_requests == 0
        stored = store.query("SELECT span_id FROM forwards ORDER BY span_id").span_id.tolist()
    assert stored == sorted(t.span_id for t in small)
    assert f"not sending forward span {big.span_id}" in caplog.text and "Limits.max_array = 1,000" in caplog.text
