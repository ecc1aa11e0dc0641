"""`collectors/otlp_decode.py` called directly (no HTTP server): every guard reached at its
boundary (the last accepted value and the first refused), every default of `Limits` pinned, and
the row count a forward adds computed by hand. tests/collectors/test_receiver_validation.py sends
the same kinds of bodies through the real receiver."""

from __future__ import annotations

import base64
import gzip
import json

import numpy as np
import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList

from mythos_probe.collectors import otlp_decode as D
from mythos_probe.collectors.otlp_decode import Limits, TooLarge, Unsupported
from tests.collectors.test_wire_format import HAND_ATTRS, SPAN_ID, TRACE_ID, hand_trace


def test_limits_defaults_and_constants():
    assert Limits() == Limits(max_body_bytes=64 * 2**20, max_spans=10_000, max_attributes=4_096, max_array=2**22,
                              max_depth=8, max_json_depth=64, max_iterations=4_096, max_rows=2**23)
    assert (D.INT32_MAX, D.INT64_MAX) == (2**31 - 1, 2**63 - 1)
    assert (D.PROTOBUF, D.JSON) == ("application/x-protobuf", "application/json")
    assert issubclass(TooLarge, ValueError) and issubclass(Unsupported, ValueError)


# --- gunzip / parse ------------------------------------------------------------------------------

def test_gunzip_up_to_the_limit():
    data = b"x" * 1000
    assert D.gunzip(gzip.compress(data), 1000) == data
    with pytest.raises(TooLarge, match="inflates past the 999-byte limit"):
        D.gunzip(gzip.compress(data), 999)
    with pytest.raises(ValueError, match="truncated gzip body"):
        D.gunzip(gzip.compress(data)[:-10], 2000)
    with pytest.raises(ValueError, match="bad gzip body"):
        D.gunzip(b"not gzip at all", 2000)


def request_of(*traces):
    from tests.collectors.test_receiver import otlp_body

    return otlp_body(list(traces))


def test_parse_protobuf_and_json_give_the_same_request():
    req = request_of(hand_trace())
    assert D.parse(req.SerializeToString(), "application/x-protobuf") == req
    # OTLP/JSON writes ids as hex, protobuf's JSON mapping as base64
    doc = json_format.MessageToDict(req)
    span = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    span["traceId"] = TRACE_ID
    span["spanId"] = SPAN_ID
    assert D.parse(json.dumps(doc).encode(), "application/json") == req


def test_json_ids_rewrites_every_id_key_and_refuses_non_hex():
    node = {"traceId": "0a0b", "a": [{"spanId": "ff"}, {"parent_span_id": "00"}], "trace_id": "01",
            "span_id": "02", "parentSpanId": "03", "other": "zz"}
    D._json_ids(node, 10)
    b64 = lambda h: base64.b64encode(bytes.fromhex(h)).decode()  # noqa: E731
    assert node == {"traceId": b64("0a0b"), "a": [{"spanId": b64("ff")}, {"parent_span_id": b64("00")}],
                    "trace_id": b64("01"), "span_id": b64("02"), "parentSpanId": b64("03"), "other": "zz"}
    with pytest.raises(ValueError, match="spanId must be hex, got 'xyz'"):
        D._json_ids({"spanId": "xyz"}, 10)


def nest(depth):
    node = {}
    for _ in range(depth):
        node = {"a": node}
    return node


def test_json_depth_boundary():
    D._json_ids(nest(2), 2)
    with pytest.raises(ValueError, match="nests deeper than 2 levels"):
        D._json_ids(nest(3), 2)
    with pytest.raises(ValueError, match="nests deeper than 2 levels"):
        D._json_ids({"x": [nest(2)]}, 2)
    D._json_ids([[[1]]], 2)
    with pytest.raises(ValueError, match="deeper than 1 levels"):
        D._json_ids([[[[]]]], 1)
    body = json.dumps({"resourceSpans": [], "x": nest(70)}).encode()
    with pytest.raises(ValueError, match="nests deeper than 64 levels"):
        D.parse(body, "application/json")  # the default max_json_depth
    D._json_ids(nest(63), 64)


def test_parse_refusals():
    with pytest.raises(ValueError, match="malformed OTLP protobuf body"):
        D.parse(b"\xff\xff\xff", "application/x-protobuf")
    with pytest.raises(ValueError, match="malformed OTLP JSON body"):
        D.parse(b"{not json", "application/json")
    with pytest.raises(ValueError, match="malformed OTLP JSON body"):
        D.parse(b'{"resourceSpans": 3}', "application/json")
    with pytest.raises(ValueError, match="JSON body nests too deep"):
        D.parse(b"[" * 100_000 + b"]" * 100_000, "application/json")
    with pytest.raises(Unsupported, match="content type must be application/x-protobuf or application/json, got 'text/plain'"):
        D.parse(b"", "text/plain")
    with pytest.raises(Unsupported, match="got 'none'"):
        D.parse(b"", "")
    assert D.parse(b"", "application/x-protobuf") == ExportTraceServiceRequest()


# --- values --------------------------------------------------------------------------------------

def av(**kw):
    return AnyValue(**kw)


def arr(*values):
    return AnyValue(array_value=ArrayValue(values=list(values)))


def kv(**pairs):
    return [KeyValue(key=k, value=v) for k, v in pairs.items()]


def test_values_of_every_kind():
    v = D._Values(Limits())
    got = v.kvlist(kv(s=av(string_value="x"), b=av(bool_value=True), i=av(int_value=-3), d=av(double_value=0.0),
                      by=av(bytes_value=b"\x00\x01"), empty=AnyValue(),
                      ints=arr(av(int_value=1), av(int_value=2)), strs=arr(av(string_value="a")),
                      nested=arr(arr(av(int_value=1))), kvs=AnyValue(kvlist_value=KeyValueList(values=kv(k=av(int_value=5)))),
                      none=arr()), "span")
    doubles = D._Values(Limits()).any(arr(av(double_value=1.5), av(double_value=0.0), av(double_value=-2.0)), "w")
    assert isinstance(doubles, np.ndarray) and doubles.dtype == np.float64 and doubles.tolist() == [1.5, 0.0, -2.0]
    assert got == {"s": "x", "b": True, "i": -3, "d": 0.0, "by": "AAE=", "empty": None, "ints": [1, 2],
                   "strs": ["a"], "nested": [[1]], "kvs": {"k": 5}, "none": []}
    assert type(got["ints"]) is list


def test_doubles_fast_path_and_its_fallback():
    good = ArrayValue(values=[av(double_value=x) for x in (1.0, 2.5)])
    assert D._doubles(good, 2).tolist() == [1.0, 2.5]
    assert D._doubles(good, 3) is None
    ints = ArrayValue(values=[av(int_value=1), av(int_value=2)])
    assert D._doubles(ints, 2) is None


def test_value_limits_at_their_boundaries():
    small = Limits(max_array=3, max_attributes=2, max_depth=2)
    v = D._Values(small)
    assert v.any(arr(*[av(int_value=i) for i in range(3)]), "w") == [0, 1, 2]
    with pytest.raises(TooLarge, match="w: array of 4 values, more than the limit of 3"):
        v.any(arr(*[av(int_value=i) for i in range(4)]), "w")
    assert v.kvlist(kv(a=av(int_value=1), b=av(int_value=2)), "s") == {"a": 1, "b": 2}
    with pytest.raises(TooLarge, match="s: 3 attributes, more than the limit of 2"):
        v.kvlist(kv(a=av(int_value=1), b=av(int_value=2), c=av(int_value=3)), "s")
    assert v.any(arr(arr(av(int_value=1))), "w") == [[1]]  # depth 2
    with pytest.raises(ValueError, match="w: values nest deeper than 2 levels"):
        v.any(arr(arr(arr(av(int_value=1)))), "w")
    deep_kv = AnyValue(kvlist_value=KeyValueList(values=kv(a=AnyValue(kvlist_value=KeyValueList(values=kv(b=av(int_value=1)))))))
    assert v.any(deep_kv, "w") == {"a": {"b": 1}}
    deeper = AnyValue(kvlist_value=KeyValueList(values=kv(x=deep_kv)))
    with pytest.raises(ValueError, match="values nest deeper than 2 levels"):
        v.any(deeper, "w")
    with pytest.raises(ValueError, match="w: array mixes value types"):
        v.any(arr(av(int_value=1), av(string_value="x")), "w")
    with pytest.raises(ValueError, match="w: array mixes value types"):
        v.any(arr(av(double_value=1.0), av(int_value=1)), "w")
    with pytest.raises(ValueError, match="w: array of empty values"):
        v.any(arr(AnyValue(), AnyValue()), "w")
    assert v.any(arr(av(bytes_value=b"\x01")), "w") == ["AQ=="]


def test_default_depth_limit_is_eight():
    node = av(int_value=1)
    for _ in range(8):
        node = arr(node)
    assert D._Values(Limits()).any(node, "w") is not None
    with pytest.raises(ValueError, match="deeper than 8 levels"):
        D._Values(Limits()).any(arr(node), "w")


# --- check_forward -------------------------------------------------------------------------------

def attrs(**changes):
    out = dict(HAND_ATTRS)
    for k, v in changes.items():
        key = "recurrent_depth." + k.replace("__", ".")
        if v is None:
            out.pop(key, None)
        else:
            out[key] = v
    return out


def test_rows_of_a_forward_by_hand():
    # 1 forward + 2 iterations + 2·3·2 positions + 2·3 expert rows
    assert D.check_forward(attrs(), Limits()) == 1 + 2 + 12 + 6
    assert D.check_forward(attrs(detail="summary"), Limits()) == 1 + 2 + 6
    assert D.check_forward(attrs(expert__load=None, expert__count=None), Limits()) == 1 + 2 + 12
    # positions carried only by token ids still count their rows
    only_ids = attrs(position__shape=None, position__state_norm=None)
    assert D.check_forward(only_ids, Limits()) == 1 + 2 + 12 + 6
    empty = attrs(batch=0, position__shape=[0, 3, 2], position__state_norm=[], token_ids=[], token_text=[],
                  position__iterations_used=[])
    assert D.check_forward(empty, Limits()) == 1 + 2 + 6


def refused(message, *, limits=Limits(), exc=ValueError, **changes):
    with pytest.raises(exc) as info:
        D.check_forward(attrs(**changes), limits, where="span ab")
    assert message in str(info.value), str(info.value)
    assert str(info.value).startswith("span ab: ") or exc is TooLarge
    return info.value


@pytest.mark.parametrize("version, ok", [(0, False), (1, True), (2, True), (3, False), (-1, False)])
def test_schema_versions(version, ok):
    a = attrs(schema_version=version)
    if ok:
        D.check_forward(a, Limits())
    else:
        err = refused(f"recurrent_depth.schema_version = {version}: this mythos-probe reads record versions 1 to 2",
                      schema_version=version)
        assert ("upgrade mythos-probe" in str(err)) == (version > 2)


def test_required_strings_and_integers():
    for key in ("run_id", "model_id", "exit_policy", "detail"):
        refused(f"recurrent_depth.{key} must be a string, got 3", **{key: 3})
        refused(f"recurrent_depth.{key} must be a string, got None", **{key: None})
    refused("recurrent_depth.schema_version is missing", schema_version=None)
    refused("recurrent_depth.step must be an integer (OTLP intValue), got '3'", step="3")
    refused("recurrent_depth.batch must be an integer (OTLP intValue), got True", batch=True)
    refused("recurrent_depth.batch must be an integer (OTLP intValue), got 2.0", batch=2.0)


@pytest.mark.parametrize("key, lo, hi", [("batch", 0, 2**31 - 1), ("seq_len", 0, 2**31 - 1), ("n_loops", 0, 2**31 - 1),
                                         ("step", -(2**63 - 1), 2**63 - 1), ("rank__index", 0, 2**31 - 1),
                                         ("rank__local_index", 0, 2**31 - 1), ("rank__world_size", 0, 2**31 - 1),
                                         ("rank__pid", 0, 2**63 - 1)])
def test_integer_ranges_at_their_ends(key, lo, hi):
    name = "recurrent_depth." + key.replace("__", ".")
    for bad in (lo - 1, hi + 1):
        refused(f"{name} = {bad} is outside [{lo}, {hi}]", **{key: bad})
    if key in ("n_loops", "step", "rank__pid"):  # the others change the shape the arrays must have
        for good in (lo, hi):
            D.check_forward(attrs(**{key: good}), Limits())


def test_iterations_limit():
    refused("recurrent_depth.iterations = 3 is outside [0, 2] (Limits.max_iterations)", limits=Limits(max_iterations=2),
            iterations=3)
    assert D.check_forward(attrs(), Limits(max_iterations=2)) == 21
    refused("recurrent_depth.iterations = 4097 is outside [0, 4096]", iterations=4097)


def test_rank_strings():
    refused("recurrent_depth.rank.host must be a string, got 5", rank__host=5)
    refused("recurrent_depth.rank.job_id must be a string, got 5", rank__job_id=5)
    D.check_forward(attrs(rank__host=None, rank__job_id=None, rank__pid=None), Limits())


def test_array_lengths_and_types():
    refused("recurrent_depth.iteration.halt_prob holds 3 values but recurrent_depth.iterations = 2",
            iteration__halt_prob=[1.0, 2.0, 3.0])
    refused("recurrent_depth.iteration.halt_prob must be an array, got float", iteration__halt_prob=1.0)
    refused("recurrent_depth.iteration.halt_prob must be an array of numbers, got strs", iteration__halt_prob=["a", "b"])
    D.check_forward(attrs(iteration__halt_prob=[1, 2]), Limits())  # integers are numbers
    D.check_forward(attrs(iteration__halt_prob=np.array([1.0, 2.0])), Limits())
    refused("recurrent_depth.token_ids must be an array of integers, got floats", token_ids=[1.0] * 6)
    refused("recurrent_depth.token_ids must be an array of integers, got doubles", token_ids=np.ones(6))
    refused("recurrent_depth.token_text must be an array of strings, got ints", token_text=[1] * 6)
    refused("recurrent_depth.token_text holds 5 values but recurrent_depth.batch × recurrent_depth.seq_len = 6",
            token_text=["a"] * 5)
    refused("recurrent_depth.position.iterations_used holds 7 values", position__iterations_used=[1] * 7)
    refused("recurrent_depth.forward.flops must be a number, got '1'", forward__flops="1")
    D.check_forward(attrs(forward__flops=7), Limits())


def test_position_shape_rules():
    refused("recurrent_depth.position.shape must be [batch, seq_len, iterations] = [2, 3, 2] when per-position "
            "metrics are sent, got [2, 3, 3]", position__shape=[2, 3, 3])
    refused("got None", position__shape=None)  # metrics without a shape
    refused("got (2, 3, 2)", position__shape=(2, 3, 2))
    refused("[2, 3, 2]", position__state_norm=None, position__shape=[2, 3, 9])  # a shape alone is checked too
    refused("recurrent_depth.position.state_norm holds 11 values but batch × seq_len × iterations = 12",
            position__state_norm=[0.0] * 11)


def test_positions_declared_without_values():
    bare = dict(position__shape=None, position__state_norm=None, token_ids=None, token_text=None,
                position__iterations_used=None)
    refused("recurrent_depth.detail = 'positions' declares 12 position rows (batch × seq_len × iterations) but the "
            "span carries none of their values", **bare)
    assert D.check_forward(attrs(**bare, detail="summary"), Limits()) == 1 + 2 + 6
    assert D.check_forward(attrs(**bare, iterations=0, iteration__halt_prob=[], iteration__rel_residual=[],
                                 expert__load=[]), Limits()) == 1


def test_expert_rules():
    refused("recurrent_depth.expert.load needs recurrent_depth.expert.count", expert__count=None)
    refused("recurrent_depth.expert.load holds 6 values but recurrent_depth.iterations × recurrent_depth.expert.count = 8",
            expert__count=4)
    refused("recurrent_depth.expert.count = -1 is outside", expert__count=-1)
    assert D.check_forward(attrs(expert__load=None), Limits()) == 1 + 2 + 12  # a count alone adds no rows


# --- decode --------------------------------------------------------------------------------------

def test_decode_gives_traces_and_rows():
    traces, rows = D.decode(request_of(hand_trace()))
    assert [t.to_dict() for t in traces] == [hand_trace().to_dict()]
    (row,) = rows
    assert (row["trace_id"], row["span_id"], row["parent_span_id"], row["name"], row["kind"], row["status_code"]) == (
        TRACE_ID, SPAN_ID, None, "looped_forward", "INTERNAL", "UNSET")
    assert json.loads(row["resource"])["service.name"] == "worker-1"


def one_span(**fields):
    req = request_of(hand_trace())
    span = req.resource_spans[0].scope_spans[0].spans[0]
    for k, v in fields.items():
        setattr(span, k, v)
    return req, span


def test_decode_foreign_span_fields():
    req, span = one_span(name="http", parent_span_id=b"\x01" * 8, kind=2)
    span.status.code = 2
    span.status.message = "boom"
    traces, (row,) = D.decode(req)
    assert traces == []
    assert (row["parent_span_id"], row["kind"], row["status_code"], row["status_message"]) == ("01" * 8, "SERVER", "ERROR", "boom")


def test_decode_refusals():
    req, span = one_span(span_id=b"\x01" * 7)
    with pytest.raises(ValueError, match="span 01010101010101: span_id must be 8 bytes, got 7"):
        D.decode(req)
    req, span = one_span(trace_id=b"\x01" * 15)
    with pytest.raises(ValueError, match="trace_id must be 16 bytes, got 15"):
        D.decode(req)
    req, span = one_span(parent_span_id=b"\x01" * 3)
    with pytest.raises(ValueError, match="parent_span_id must be 8 bytes, got 3"):
        D.decode(req)
    req, span = one_span(span_id=b"")
    with pytest.raises(ValueError, match=r"span \(no id\): span_id"):
        D.decode(req)
    req, span = one_span(name="x", end_time_unix_nano=2**63)
    with pytest.raises(ValueError, match=r"end_time_unix_nano = 9223372036854775808 is past the year 2262"):
        D.decode(req)
    req, span = one_span(name="x", start_time_unix_nano=2**63 - 1, end_time_unix_nano=2**63 - 1)
    assert D.decode(req)[1][0]["start_ns"] == 2**63 - 1
    req, span = one_span(name="x", start_time_unix_nano=2**63)
    with pytest.raises(ValueError, match="start_time_unix_nano"):
        D.decode(req)


def test_decode_wraps_record_errors_with_the_span():
    req, span = one_span()
    for a in span.attributes:
        if a.key == "recurrent_depth.kind":
            a.value.string_value = "canary"
    with pytest.raises(ValueError, match=f"span {SPAN_ID}: not a valid LoopTrace: kind must be one of"):
        D.decode(req)


def test_request_limits():
    req = request_of(hand_trace(), hand_trace(span_id="c" * 16))
    assert len(D.decode(req, Limits(max_spans=2))[0]) == 2
    with pytest.raises(TooLarge, match="3 spans in one request, more than the limit of 2; send smaller batches"):
        D.decode(request_of(hand_trace(), hand_trace(span_id="c" * 16), hand_trace(span_id="d" * 16)), Limits(max_spans=2))
    assert len(D.decode(req, Limits(max_rows=42))[0]) == 2
    with pytest.raises(TooLarge, match="more than 41 table rows; send fewer forwards per request"):
        D.decode(req, Limits(max_rows=41))
    with pytest.raises(TooLarge, match="resource: "):
        D.decode(req, Limits(max_attributes=3))
