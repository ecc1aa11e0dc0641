"""Every request the receiver gets is answered with the right status, and nothing of a refused
request reaches the store: requests built with the project's own encoder, then altered."""

import gzip
import json
import logging
import socket

import pytest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList

from mythos_probe.collectors import decode_pool, otlp_decode
from mythos_probe.collectors.otlp_decode import Limits
from mythos_probe.collectors.receiver import Receiver
from mythos_probe.collectors.store import Store
from tests.collectors.factory import make_trace
from tests.collectors.test_receiver import otlp_body, post


def count(store, table="forwards"):
    return int(store.query(f"SELECT count(*) AS n FROM {table}").n[0])


def altered(traces, changes, span=0):
    """The encoder's request for `traces` with span `span`'s attributes changed: key → AnyValue,
    or None to remove the key."""
    request = otlp_body(traces)
    target = request.resource_spans[0].scope_spans[0].spans[span]
    kept = [kv for kv in target.attributes if kv.key not in changes]
    del target.attributes[:]
    target.attributes.extend(kept)
    target.attributes.extend(KeyValue(key=k, value=v) for k, v in changes.items() if v is not None)
    return request


def ints(values):
    return AnyValue(array_value=ArrayValue(values=[AnyValue(int_value=v) for v in values]))


def strings(values):
    return AnyValue(array_value=ArrayValue(values=[AnyValue(string_value=v) for v in values]))


def assert_refused(receiver, body, status, *words, content_type="application/x-protobuf", headers=None):
    before = count(receiver.store, "spans")
    got, reply = post(receiver, body, content_type, headers)
    assert got == status, reply
    for word in words:
        assert word in reply.decode(), (word, reply)
    assert count(receiver.store, "spans") == before


TRACE = make_trace(7, batch=2, seq_len=3, n_loops=4)


@pytest.mark.parametrize("changes, words", [
    ({"recurrent_depth.batch": AnyValue(double_value=float("inf"))}, ["recurrent_depth.batch", "integer"]),
    ({"recurrent_depth.batch": AnyValue(int_value=-2)}, ["recurrent_depth.batch", "-2"]),
    ({"recurrent_depth.batch": AnyValue(int_value=2**40)}, ["recurrent_depth.batch"]),
    ({"recurrent_depth.iterations": AnyValue(int_value=10**12)}, ["recurrent_depth.iterations", "max_iterations"]),
    ({"recurrent_depth.schema_version": AnyValue(int_value=999)}, ["schema_version", "upgrade"]),
    ({"recurrent_depth.schema_version": AnyValue(int_value=-1)}, ["schema_version"]),
    ({"recurrent_depth.schema_version": AnyValue(int_value=0)}, ["schema_version"]),
    ({"recurrent_depth.token_text": strings(["a"] * 5)}, ["recurrent_depth.token_text", "5"]),
    ({"recurrent_depth.token_text": strings(["a"] * 7)}, ["recurrent_depth.token_text", "7"]),
    ({"recurrent_depth.token_ids": ints([1] * 7)}, ["recurrent_depth.token_ids"]),
    ({"recurrent_depth.token_ids": strings(["1"] * 6)}, ["recurrent_depth.token_ids", "integer"]),
    ({"recurrent_depth.position.shape": ints([2, 3, 99])}, ["recurrent_depth.position.shape"]),
    ({"recurrent_depth.expert.count": AnyValue(int_value=5)}, ["recurrent_depth.expert.load"]),
    ({"recurrent_depth.iteration.cos_step": ints([1, 2])}, ["recurrent_depth.iteration.cos_step"]),
    ({"recurrent_depth.step": AnyValue(string_value="3")}, ["recurrent_depth.step"]),
    ({"recurrent_depth.detail": AnyValue(string_value="everything")}, ["detail"]),
    ({"recurrent_depth.kind": AnyValue(string_value="canary")}, ["kind"]),
    ({"recurrent_depth.rank.index": AnyValue(int_value=3)}, ["rank"]),
    ({"recurrent_depth.model_id": None}, ["recurrent_depth.model_id"]),
    # the record's own checks (records.FIELD_CHECKS), the same ones LoopTrace construction runs
    ({"recurrent_depth.n_loops": AnyValue(int_value=2)}, ["iterations", "more than n_loops = 2"]),
    ({"recurrent_depth.run_id": AnyValue(string_value="")}, ["run_id", "non-empty"]),
    ({"recurrent_depth.loop_name": AnyValue(string_value="")}, ["loop_name", "non-empty"]),
    ({"recurrent_depth.rank.world_size": AnyValue(int_value=0)}, ["world_size"]),
    ({"recurrent_depth.attr.nested": AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key="a")]))}, ["nested"]),
    ({"recurrent_depth.forward.flops": AnyValue(string_value="1e9")}, ["recurrent_depth.forward.flops"]),
    ({"recurrent_depth.iteration.state_norm": AnyValue(array_value=ArrayValue(values=[
        AnyValue(double_value=1.0), AnyValue(string_value="x"), AnyValue(double_value=1.0)]))}, ["mixes"]),
])
def test_an_inconsistent_forward_gets_400_naming_the_field(receiver, changes, words):
    assert_refused(receiver, altered([TRACE], changes).SerializeToString(), 400, *words)


def test_positions_declared_without_values_are_refused_not_amplified(receiver):
    # 1.5 KB declaring 100 × 100 × 100 positions used to store 1,000,000 rows
    small = make_trace(3, batch=1, seq_len=1, n_loops=1, detail="summary", n_experts=0, all_metrics=False)
    gone = {k: None for k in ("recurrent_depth.token_ids", "recurrent_depth.position.iterations_used",
                              "recurrent_depth.token_text")}
    body = altered([small], {
        **gone, **{f"recurrent_depth.iteration.{m}": None for m in small.iteration_metrics},
        "recurrent_depth.batch": AnyValue(int_value=100), "recurrent_depth.seq_len": AnyValue(int_value=100),
        "recurrent_depth.iterations": AnyValue(int_value=100), "recurrent_depth.n_loops": AnyValue(int_value=100),
        "recurrent_depth.detail": AnyValue(string_value="positions"),
    }).SerializeToString()
    assert len(body) < 2000
    assert_refused(receiver, body, 400, "1,000,000 position rows", "carries none")
    assert count(receiver.store, "positions") == 0
    # the same declaration at summary detail stores its forward row and 100 iteration rows, no more
    summary = altered([small], {**gone, **{f"recurrent_depth.iteration.{m}": None for m in small.iteration_metrics},
                                "recurrent_depth.batch": AnyValue(int_value=100),
                                "recurrent_depth.seq_len": AnyValue(int_value=100),
                                "recurrent_depth.iterations": AnyValue(int_value=100),
                                "recurrent_depth.n_loops": AnyValue(int_value=100)})
    assert post(receiver, summary.SerializeToString())[0] == 200
    assert (count(receiver.store), count(receiver.store, "iterations"), count(receiver.store, "positions")) == (1, 100, 0)


def test_a_version_1_record_is_stored_with_the_defaults_of_version_2(receiver):
    v2_only = ["recurrent_depth.loop_name", "recurrent_depth.kind", *(f"recurrent_depth.rank.{k}" for k in
               ("index", "local_index", "world_size", "host", "pid", "job_id"))]
    body = altered([TRACE], {"recurrent_depth.schema_version": AnyValue(int_value=1), **{k: None for k in v2_only}})
    assert post(receiver, body.SerializeToString())[0] == 200
    row = receiver.store.query("SELECT schema_version, loop_name, kind, rank, world_size FROM forwards").iloc[0]
    assert tuple(row) == (1, "loop", "served", 0, 1)


def test_a_foreign_span_past_int64_time_gets_400(receiver):
    request = otlp_body([TRACE])
    request.resource_spans[0].scope_spans[0].spans[0].name = "http.request"
    request.resource_spans[0].scope_spans[0].spans[0].start_time_unix_nano = 2**64 - 1
    assert_refused(receiver, request.SerializeToString(), 400, "start_time_unix_nano")


def test_a_forward_ending_before_it_starts_gets_400(receiver):
    request = otlp_body([TRACE])
    span = request.resource_spans[0].scope_spans[0].spans[0]
    span.end_time_unix_nano = span.start_time_unix_nano - 1
    assert_refused(receiver, request.SerializeToString(), 400, "end_ns", "before start_ns")


def test_one_bad_forward_refuses_its_whole_request(receiver):
    traces = [make_trace(i) for i in range(3)]
    assert_refused(receiver, altered(traces, {"recurrent_depth.batch": AnyValue(int_value=-1)}, span=2).SerializeToString(), 400)
    assert count(receiver.store) == 0
    assert post(receiver, otlp_body(traces).SerializeToString())[0] == 200
    assert count(receiver.store) == 3


def nested_kvlist(depth):
    value = AnyValue(string_value="leaf")
    for _ in range(depth):
        value = AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key="k", value=value)]))
    return value


def test_deep_nesting_and_huge_json_get_400(receiver):
    assert_refused(receiver, b"[" * 100_000, 400, "deep", content_type="application/json")
    deep = {"resourceSpans": []}
    node = deep
    for _ in range(300):
        node["x"] = {}
        node = node["x"]
    assert_refused(receiver, json.dumps(deep).encode(), 400, "deep", content_type="application/json")
    # a kvlist nested 300 deep, written as text (json.dumps itself would recurse too deep)
    kv = '{"kvlistValue": {"values": [{"key": "k", "value": ' * 300 + '{"stringValue": "leaf"}' + "}]}}" * 300
    span = '{"traceId": "%s", "spanId": "%s", "name": "x", "attributes": [{"key": "deep", "value": %s}]}' % (
        "ab" * 16, "cd" * 8, kv)
    body = '{"resourceSpans": [{"scopeSpans": [{"spans": [%s]}]}]}' % span
    assert_refused(receiver, body.encode(), 400, "deep", content_type="application/json")
    assert_refused(receiver, altered([TRACE], {"recurrent_depth.attr.deep": nested_kvlist(12)}).SerializeToString(),
                   400, "deeper")
    assert post(receiver, otlp_body([TRACE]).SerializeToString())[0] == 200


def test_counts_over_the_limits_get_413(tmp_path):
    limits = Limits(max_spans=3, max_attributes=200, max_array=1000, max_rows=500)
    with Store(tmp_path / "s.duckdb") as store, Receiver(store, port=0, limits=limits) as rx:
        many = otlp_body([make_trace(i, batch=1, seq_len=2, detail="summary") for i in range(4)])
        assert_refused(rx, many.SerializeToString(), 413, "4 spans", "limit of 3")
        wide = altered([TRACE], {f"recurrent_depth.attr.k{i}": AnyValue(int_value=i) for i in range(200)})
        assert_refused(rx, wide.SerializeToString(), 413, "attributes")
        long = altered([TRACE], {"recurrent_depth.attr.long": ints(range(1001))})
        assert_refused(rx, long.SerializeToString(), 413, "1,001 values")
        rows = otlp_body([make_trace(i, batch=4, seq_len=10, n_loops=6) for i in range(3)])
        assert_refused(rx, rows.SerializeToString(), 413, "500 table rows")
        assert post(rx, otlp_body([make_trace(1, batch=1, seq_len=2)]).SerializeToString())[0] == 200


def test_content_type_and_encoding_get_415(receiver):
    good = otlp_body([TRACE]).SerializeToString()
    assert_refused(receiver, good, 415, "content type", content_type="text/plain")
    assert_refused(receiver, good, 415, "content type", content_type="")
    assert_refused(receiver, good, 415, "content encoding", headers={"Content-Encoding": "br"})
    assert post(receiver, gzip.compress(good), headers={"Content-Encoding": "gzip"})[0] == 200


def raw(receiver, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    with socket.create_connection((receiver.host, receiver.port), timeout=30) as sock:
        sock.sendall(head + body)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return int(reply.split(b" ", 2)[1]), reply


def chunked(body: bytes, size: int) -> bytes:
    pieces = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\nX-Trailer: 1\r\n\r\n"


HEAD = b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"


def test_chunked_requests_are_read_with_the_same_limits(tmp_path):
    good = otlp_body([make_trace(1), make_trace(2)]).SerializeToString()
    with Store(tmp_path / "s.duckdb") as store, Receiver(store, port=0, limits=Limits(max_body_bytes=len(good))) as rx:
        status, _ = raw(rx, HEAD + b"Transfer-Encoding: chunked\r\n\r\n", chunked(good, 1000))
        assert status == 200 and count(store) == 2
        gz = gzip.compress(otlp_body([make_trace(3)]).SerializeToString())
        status, _ = raw(rx, HEAD + b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n", chunked(gz, 100))
        assert status == 200 and count(store) == 3
        too_big = otlp_body([make_trace(i) for i in range(4, 7)]).SerializeToString()
        assert raw(rx, HEAD + b"Transfer-Encoding: chunked\r\n\r\n", chunked(too_big, 1000))[0] == 413
        assert raw(rx, HEAD + b"Transfer-Encoding: chunked\r\n\r\n", b"zz\r\nabc\r\n0\r\n\r\n")[0] == 400
        assert raw(rx, HEAD + b"Transfer-Encoding: chunked\r\n\r\n", chunked(good, 1000)[:-30])[0] == 400
        both = HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n\r\n" % len(good)
        assert raw(rx, both, chunked(good, 1000))[0] == 400
        assert raw(rx, HEAD + b"Transfer-Encoding: gzip\r\n\r\n", good)[0] == 400
        assert raw(rx, HEAD + b"\r\n", good)[0] == 411
        assert raw(rx, HEAD + b"Content-Length: \xc2\xb2\r\n\r\n", good)[0] == 400
        assert count(store) == 3


def test_an_unexpected_error_is_a_500_with_an_id_and_the_server_keeps_serving(receiver, monkeypatch, caplog):
    def broken(request, limits):
        raise RuntimeError("a bug")

    with monkeypatch.context() as m:
        m.setattr(otlp_decode, "decode", broken)
        m.setattr(receiver, "decoder", decode_pool.DecodePool(0))  # decode here, where the patch is
        with caplog.at_level(logging.ERROR, logger="mythos_probe.collectors.receiver"):
            status, reply = post(receiver, otlp_body([TRACE]).SerializeToString())
    assert status == 500
    error_id = reply.decode().split()[2].rstrip(";")
    assert any(error_id in r.getMessage() for r in caplog.records)
    assert post(receiver, otlp_body([TRACE]).SerializeToString())[0] == 200
    assert count(receiver.store) == 1


def test_only_a_failing_store_gets_503(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    with Receiver(store, port=0) as rx:
        store.close()  # every write now fails inside DuckDB
        status, reply = post(rx, otlp_body([TRACE]).SerializeToString())
        assert status == 503 and b"retry" in reply
        assert post(rx, b"\xff\xff not protobuf")[0] == 400
