import gzip
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest
from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mythos_probe.collectors.exporter import BoundedSpanProcessor, otlp_exporter, tracer_provider
from mythos_probe.collectors.otlp_decode import Limits
from mythos_probe.collectors.receiver import Receiver
from mythos_probe.collectors.spans import emit
from mythos_probe.collectors.store import Store
from tests.collectors.conftest import table
from tests.collectors.factory import make_trace


def otlp_body(traces, iteration_spans=False):
    memory = InMemorySpanExporter()
    provider = tracer_provider(SimpleSpanProcessor(memory), service_name="worker-1")
    for t in traces:
        emit(provider.get_tracer("test"), t, iteration_spans=iteration_spans)
    return encode_spans(memory.get_finished_spans())


def post(receiver, body, content_type="application/x-protobuf", headers=None, path="/v1/traces"):
    con = http.client.HTTPConnection(receiver.host, receiver.port, timeout=30)
    try:
        con.request("POST", path, body=body, headers={"Content-Type": content_type, **(headers or {})})
        resp = con.getresponse()
        return resp.status, resp.read()
    finally:
        con.close()


def assert_same_rows(received: Store, direct: Store):
    for name in ("forwards", "iterations", "positions", "experts"):
        a, b = table(received, name), table(direct, name)
        assert len(a) == len(b) > 0, name
        assert a.equals(b), name
    a = table(received, "spans", drop=("resource",))
    b = table(direct, "spans", drop=("resource",))
    assert a.equals(b)


@pytest.fixture
def direct(tmp_path):
    with Store(tmp_path / "direct.duckdb") as s:
        yield s


def test_otlp_through_the_standard_exporter_gives_the_rows_of_a_direct_write(receiver, direct):
    traces = [make_trace(i) for i in range(3)] + [make_trace(9, detail="summary", with_text=False)]
    processor = BoundedSpanProcessor(otlp_exporter(receiver.endpoint, timeout=10))
    provider = tracer_provider(processor, service_name="worker-1")
    for t in traces:
        emit(provider.get_tracer("test"), t)
    assert processor.force_flush()
    provider.shutdown()
    assert processor.exported_spans == len(traces) and processor.dropped_spans == 0
    direct.write_traces(traces)
    assert_same_rows(receiver.store, direct)
    resource = json.loads(receiver.store.query("SELECT resource FROM spans LIMIT 1").resource[0])
    assert resource["service.name"] == "worker-1"


@pytest.mark.parametrize("encoding", ["protobuf", "json", "gzip-protobuf", "gzip-json"])
def test_every_encoding_gives_the_same_rows(receiver, direct, encoding):
    traces = [make_trace(20), make_trace(21, n_experts=0)]
    request = otlp_body(traces)
    if "json" in encoding:
        data = json_format.MessageToDict(request)
        for rs in data["resourceSpans"]:  # OTLP/JSON writes ids as hex, not base64
            for ss in rs["scopeSpans"]:
                for sp in ss["spans"]:
                    for key in ("traceId", "spanId"):
                        sp[key] = __import__("base64").b64decode(sp[key]).hex()
        body, ctype = json.dumps(data).encode(), "application/json"
    else:
        body, ctype = request.SerializeToString(), "application/x-protobuf"
    headers = {}
    if encoding.startswith("gzip"):
        body, headers = gzip.compress(body), {"Content-Encoding": "gzip"}
    status, _ = post(receiver, body, ctype, headers)
    assert status == 200
    direct.write_traces(traces)
    assert_same_rows(receiver.store, direct)


def test_iteration_child_spans_are_stored_raw_with_their_parent(receiver):
    trace = make_trace(3)
    assert post(receiver, otlp_body([trace], iteration_spans=True).SerializeToString())[0] == 200
    df = receiver.store.query("SELECT name, parent_span_id FROM spans WHERE name LIKE 'loop\\_iteration %' ESCAPE '\\'")
    assert len(df) == trace.iterations and set(df.parent_span_id) == {trace.span_id}


def raw_request(receiver, data: bytes):
    with socket.create_connection((receiver.host, receiver.port), timeout=30) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return int(reply.split(b" ", 2)[1])


def test_bad_payloads_are_rejected_and_the_receiver_keeps_serving(receiver):
    good = otlp_body([make_trace(1)]).SerializeToString()
    wrong_ids = otlp_body([make_trace(2)])
    wrong_ids.resource_spans[0].scope_spans[0].spans[0].trace_id = b"\x01\x02"
    missing_attr = otlp_body([make_trace(3)])
    span = missing_attr.resource_spans[0].scope_spans[0].spans[0]
    keep = [kv for kv in span.attributes if kv.key != "recurrent_depth.batch"]
    del span.attributes[:]
    span.attributes.extend(keep)
    cases = {
        "malformed protobuf": (b"\xff\xff\xff\xff not protobuf", "application/x-protobuf", {}),
        "malformed json": (b"{not json", "application/json", {}),
        "bad gzip": (b"not gzip", "application/x-protobuf", {"Content-Encoding": "gzip"}),
        "truncated gzip": (gzip.compress(good)[:-20], "application/x-protobuf", {"Content-Encoding": "gzip"}),
        "short trace id": (wrong_ids.SerializeToString(), "application/x-protobuf", {}),
        "not a LoopTrace": (missing_attr.SerializeToString(), "application/x-protobuf", {}),
    }
    for name, (body, ctype, headers) in cases.items():
        assert post(receiver, body, ctype, headers)[0] == 400, name
    assert post(receiver, good, path="/v1/logs")[0] == 404
    truncated = b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\nContent-Length: %d\r\n\r\n" % len(good)
    assert raw_request(receiver, truncated + good[: len(good) // 2]) == 400
    assert receiver.store.query("SELECT count(*) AS n FROM spans").n[0] == 0
    assert post(receiver, good)[0] == 200
    assert receiver.store.query("SELECT count(*) AS n FROM forwards").n[0] == 1
    assert receiver.rejected_requests == len(cases) + 2


def test_oversized_bodies_get_413_before_and_after_gzip(tmp_path):
    with Store(tmp_path / "s.duckdb") as store, Receiver(store, port=0, limits=Limits(max_body_bytes=4096)) as receiver:
        big = otlp_body([make_trace(1, batch=4, seq_len=32)]).SerializeToString()
        assert len(big) > 4096
        assert post(receiver, big)[0] == 413
        bomb = gzip.compress(b"\0" * 100_000)
        assert len(bomb) < 4096
        assert post(receiver, bomb, headers={"Content-Encoding": "gzip"})[0] == 413
        small = otlp_body([make_trace(2, batch=1, seq_len=1, n_loops=2, detail="summary", all_metrics=False)]).SerializeToString()
        assert post(receiver, small)[0] == 200


def test_a_token_is_required_on_every_request_when_set(tmp_path):
    body = otlp_body([make_trace(1)]).SerializeToString()
    with Store(tmp_path / "s.duckdb") as store, Receiver(store, port=0, token="s3cret") as receiver:
        assert post(receiver, body)[0] == 401
        assert post(receiver, body, headers={"Authorization": "Bearer wrong"})[0] == 401
        assert post(receiver, body, headers={"Authorization": "Bearer s3cret"})[0] == 200
        exporter = otlp_exporter(receiver.endpoint, headers={"Authorization": "Bearer s3cret"}, timeout=10)
        processor = BoundedSpanProcessor(exporter)
        emit(tracer_provider(processor).get_tracer("t"), make_trace(2))
        assert processor.force_flush() and processor.exported_spans == 1
        assert store.query("SELECT count(*) AS n FROM forwards").n[0] == 2


def test_binding_beyond_loopback_without_a_token_is_refused(store):
    with pytest.raises(ValueError, match="needs an ingest token"):
        Receiver(store, host="0.0.0.0", port=0)


def test_concurrent_senders_store_every_span_exactly_once(receiver):
    senders, batches, per_batch = 4, 25, 40  # 4000 forwards, loopback only, bounded
    base = [make_trace(i, batch=1, seq_len=4, n_loops=3, detail="summary", all_metrics=False) for i in range(4)]
    errors = []

    def sender(k):
        try:
            for b in range(batches):
                traces = []
                for j in range(per_batch):
                    n = (k * batches + b) * per_batch + j
                    t = base[n % 4]
                    traces.append(type(t)(**{**t.__dict__, "trace_id": f"{n + 1:032x}", "span_id": f"{n + 1:016x}"}))
                status, _ = post(receiver, otlp_body(traces).SerializeToString())
                assert status == 200
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(senders)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    total = senders * batches * per_batch
    counts = receiver.store.query("SELECT count(*) AS n, count(DISTINCT (trace_id, span_id)) AS d FROM forwards")
    assert (counts.n[0], counts.d[0]) == (total, total)
    assert receiver.received_spans == total


def test_everything_acknowledged_before_a_sigkill_survives(tmp_path):
    path = tmp_path / "killed.duckdb"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mythos_probe.cli", "serve", "--store", str(path), "--port", "0", "--no-dashboard"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=os.getcwd(),
    )
    acked = []
    try:
        line = proc.stdout.readline()
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])

        target = type("T", (), {"host": "127.0.0.1", "port": port})
        stop = threading.Event()

        def sender():
            n = 0
            while not stop.is_set() and n < 2000:
                traces = [make_trace(1000 + n + j, batch=1, seq_len=8, detail="positions", all_metrics=False) for j in range(5)]
                n += 5
                try:
                    status, _ = post(target, otlp_body(traces).SerializeToString())
                except OSError:
                    return
                if status == 200:
                    acked.extend(t.trace_id for t in traces)

        th = threading.Thread(target=sender)
        th.start()
        while len(acked) < 100 and th.is_alive():
            th.join(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stop.set()
        th.join()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(acked) >= 100
    with Store(path) as store:
        stored = set(store.query("SELECT trace_id FROM forwards").trace_id)
        assert set(acked) <= stored
        # each acknowledged forward is complete, not half-written
        n_pos = store.query("SELECT count(*) AS n FROM positions WHERE trace_id IN (SELECT trace_id FROM forwards)").n[0]
        assert n_pos == store.query("SELECT sum(batch * seq_len * iterations) AS n FROM forwards").n[0]
