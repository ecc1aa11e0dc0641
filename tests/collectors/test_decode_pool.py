"""The receiver's decode worker processes (`collectors.decode_pool`): the same rows as decoding in
the handler thread, the same refusals, and nothing lost when a worker is killed."""

from __future__ import annotations

import os
import signal

import pytest

from mythos_probe.collectors import decode_pool
from mythos_probe.collectors.otlp_decode import Limits, TooLarge
from mythos_probe.collectors.receiver import Receiver
from mythos_probe.collectors.store import Store
from tests.collectors.conftest import TABLE_KEYS, table
from tests.collectors.factory import make_trace
from tests.collectors.test_receiver import otlp_body, post

TRACES = [make_trace(i, batch=2, seq_len=3, n_loops=4, detail=("summary", "positions")[i % 2]) for i in range(6)]


def _workers(rx: Receiver) -> list[int]:
    pool = rx.decoder._pool
    return sorted(pool._processes) if pool is not None else []


def test_worker_decoding_stores_exactly_what_inline_decoding_stores(tmp_path):
    with Store(tmp_path / "inline.duckdb") as a, Store(tmp_path / "pool.duckdb") as b, \
            Receiver(a, port=0, decode_workers=0) as inline, Receiver(b, port=0, decode_workers=2) as pooled:
        for k in range(0, len(TRACES), 2):
            body = otlp_body(TRACES[k:k + 2]).SerializeToString()
            assert post(inline, body)[0] == 200 and post(pooled, body)[0] == 200
        assert _workers(pooled) and all(pid != os.getpid() for pid in _workers(pooled))
        for name in TABLE_KEYS:
            assert len(table(a, name)) > 0
            assert table(a, name).equals(table(b, name)), name


def test_a_worker_refuses_what_the_handler_refused_with_the_same_status(tmp_path):
    with Store(tmp_path / "s.duckdb") as s, Receiver(s, port=0, decode_workers=2,
                                                     limits=Limits(max_spans=2)) as rx:
        status, reply = post(rx, otlp_body(TRACES[:3]).SerializeToString())
        assert status == 413 and b"max_spans" in reply or b"spans" in reply
        status, reply = post(rx, b"\xff\xff not protobuf")
        assert status == 400
        assert post(rx, otlp_body(TRACES[:2]).SerializeToString())[0] == 200
        assert int(s.query("SELECT count(*) AS n FROM forwards").n[0]) == 2
    with pytest.raises(TooLarge):  # the exception crosses the process boundary as itself
        decode_pool.DecodePool(1).decode(otlp_body(TRACES[:3]).SerializeToString(), "application/x-protobuf", False,
                                         Limits(max_spans=2))


def test_killed_workers_lose_no_request(tmp_path):
    with Store(tmp_path / "s.duckdb") as s, Receiver(s, port=0, decode_workers=2) as rx:
        assert post(rx, otlp_body(TRACES[:1]).SerializeToString())[0] == 200
        for pid in _workers(rx):
            os.kill(pid, signal.SIGKILL)
        for k in range(1, len(TRACES)):  # the first after the kill decodes inline, the next in a fresh pool
            assert post(rx, otlp_body(TRACES[k:k + 1]).SerializeToString())[0] == 200
        stored = s.query("SELECT trace_id FROM forwards ORDER BY trace_id").trace_id.tolist()
        assert stored == sorted(t.trace_id for t in TRACES)
