"""`otlp_fast` reads what the full OTLP parse reads, or declines (MISSING): checked against the real
protobuf messages on every kind of AnyValue, on the canonical and non-canonical layouts a sender
may write (several fields in one AnyValue, long varints, long strings, mixed arrays), and on
whole requests where the decoder's attributes with and without the fast read are the same."""

from __future__ import annotations

import base64
import json
import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from google.protobuf import json_format
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList

from mythos_probe.collectors import otlp_decode, otlp_fast
from mythos_probe.collectors.otlp_decode import Limits
from tests.collectors.factory import make_trace
from tests.collectors.test_receiver import otlp_body

MISSING = otlp_fast.MISSING


def _fast(raw: bytes, max_array: int):
    """The fast read of one value."""
    return otlp_fast.read_values([raw], max_array)[0]


def _full(raw: bytes):
    """The reference: the real AnyValue parse, read as the decoder's slow path reads it."""
    value = AnyValue.FromString(raw)
    return otlp_decode._Values(Limits()).any(value, "x")


def _same(fast, full) -> bool:
    if isinstance(fast, np.ndarray):
        return isinstance(full, np.ndarray) and fast.dtype == np.float64 and np.array_equal(fast, full, equal_nan=True)
    if isinstance(fast, float):
        return type(full) is float and (fast == full or math.isnan(fast) and math.isnan(full)) and \
            math.copysign(1, fast) == math.copysign(1, full)
    return type(fast) is type(full) and fast == full


def _check(raw: bytes, max_array: int = 2**22):
    fast = _fast(raw, max_array)
    if fast is not MISSING:
        assert _same(fast, _full(raw)), (raw, fast, _full(raw))
    return fast


@pytest.mark.parametrize("value, expected", [
    (AnyValue(string_value="recurrent_depth"), "recurrent_depth"),
    (AnyValue(string_value=""), ""),
    (AnyValue(string_value="é→日本"), "é→日本"),
    (AnyValue(double_value=0.0), 0.0),
    (AnyValue(double_value=-0.0), -0.0),
    (AnyValue(double_value=float("inf")), float("inf")),
    (AnyValue(int_value=0), 0),
    (AnyValue(int_value=1), 1),
    (AnyValue(int_value=300), 300),
    (AnyValue(int_value=-1), -1),
    (AnyValue(int_value=2**63 - 1), 2**63 - 1),
    (AnyValue(int_value=-2**63), -2**63),
    (AnyValue(bool_value=True), True),
    (AnyValue(bool_value=False), False),
])
def test_scalars_read_as_the_full_parse_reads_them(value, expected):
    got = _check(value.SerializeToString())
    assert got == expected and type(got) is type(expected)


def test_double_arrays_are_read_in_place():
    values = [0.5, float("nan"), -0.0, 1e308, float("-inf")]
    raw = AnyValue(array_value=ArrayValue(values=[AnyValue(double_value=v) for v in values])).SerializeToString()
    got = _check(raw)
    assert isinstance(got, np.ndarray) and got.tolist()[:1] == [0.5] and len(got) == 5
    many = AnyValue(array_value=ArrayValue(values=[AnyValue(double_value=i / 7) for i in range(300)]))
    assert np.array_equal(_check(many.SerializeToString()), np.arange(300) / 7)  # a 2-byte length


@pytest.mark.parametrize("value", [
    AnyValue(string_value="x" * 128),  # a 2-byte length: left to the full parse
    AnyValue(bytes_value=b"\x00\x01"),
    AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key="a", value=AnyValue(int_value=1))])),
    AnyValue(array_value=ArrayValue(values=[])),
    AnyValue(array_value=ArrayValue(values=[AnyValue(int_value=1), AnyValue(int_value=2)])),
    AnyValue(array_value=ArrayValue(values=[AnyValue(string_value="a")])),
    AnyValue(array_value=ArrayValue(values=[AnyValue(double_value=1.0), AnyValue(int_value=2)])),
    AnyValue(array_value=ArrayValue(values=[AnyValue(array_value=ArrayValue(values=[AnyValue(double_value=1.0)]))])),
    AnyValue(),
])
def test_other_values_are_left_to_the_full_parse(value):
    assert _fast(value.SerializeToString(), 2**22) is MISSING


@pytest.mark.parametrize("raw", [
    AnyValue(string_value="a").SerializeToString() + AnyValue(int_value=5).SerializeToString(),  # two fields: the last wins
    AnyValue(double_value=1.5).SerializeToString() + AnyValue(double_value=2.5).SerializeToString(),
    b"\x10\x02",  # a bool written as 2 (protobuf reads True)
    b"\x10\x81\x00",  # a bool as a padded varint
    b"\x21" + struct.pack("<d", 1.0) + b"\x10\x01",
    b"\x18\x05\x18\x06",
])
def test_non_canonical_layouts_are_left_to_the_full_parse(raw):
    AnyValue.FromString(raw)  # valid protobuf, read differently than a naive reader would
    assert _fast(raw, 2**22) is MISSING


def test_a_padded_varint_reads_as_protobuf_reads_it():
    assert _check(b"\x18\x85\x00") == 5
    assert _check(b"\x18\x80\x80\x80\x80\x80\x80\x80\x80\x80\x00") == 0  # ten bytes, the most a varint has
    assert _check(b"\x18" + b"\xff" * 9 + b"\x7f") == -1  # bits past 64 in the tenth byte are dropped
    assert _check(b"\x18" + b"\x80" * 9 + b"\x02") == 0


def test_a_corrupt_varint_is_declined():
    raw = b"\x18" + b"\xff" * 10 + b"\x01"
    with pytest.raises(Exception):
        AnyValue.FromString(raw)
    assert _fast(raw, 2**22) is MISSING
    assert _fast(b"\x18\x80", 2**22) is MISSING  # cut short


def test_an_array_whose_records_are_all_eleven_bytes_but_not_all_doubles_is_declined():
    """A 7-character string is an 11-byte record too (0a 09 0a 07 …): only its third byte tells it
    from a double; the full parse refuses the mixed array."""
    for values in ([AnyValue(double_value=1.0), AnyValue(string_value="abcdefg")],
                   [AnyValue(string_value="abcdefg"), AnyValue(double_value=1.0)]):
        raw = AnyValue(array_value=ArrayValue(values=values)).SerializeToString()
        assert len(raw) == 2 + 22
        with pytest.raises(ValueError, match="mixes value types"):
            _full(raw)
        assert _fast(raw, 2**22) is MISSING


def test_arrays_past_the_limit_or_the_depth_are_left_to_the_full_parse():
    raw = AnyValue(array_value=ArrayValue(values=[AnyValue(double_value=1.0)] * 4)).SerializeToString()
    assert _fast(raw, 4) is not MISSING
    assert _fast(raw, 3) is MISSING  # the full parse raises TooLarge
    assert _fast(raw, 0) is MISSING  # past max_depth the decoder passes 0


_any_value = st.deferred(lambda: st.one_of(
    st.builds(lambda s: AnyValue(string_value=s), st.text(max_size=200)),
    st.builds(lambda f: AnyValue(double_value=f), st.floats(allow_nan=True, allow_infinity=True)),
    st.builds(lambda i: AnyValue(int_value=i), st.integers(-2**63, 2**63 - 1)),
    st.builds(lambda b: AnyValue(bool_value=b), st.booleans()),
    st.builds(lambda b: AnyValue(bytes_value=b), st.binary(max_size=20)),
    st.builds(lambda vs: AnyValue(array_value=ArrayValue(values=vs)), st.lists(_any_value, max_size=4)),
    st.builds(lambda fs: AnyValue(array_value=ArrayValue(values=[AnyValue(double_value=f) for f in fs])),
              st.lists(st.floats(allow_nan=True), max_size=40)),
))


@settings(max_examples=400, deadline=None)
@given(st.lists(_any_value, min_size=1, max_size=3))
def test_any_value_or_concatenation_reads_as_the_full_parse(values):
    """Whatever a sender writes, including several AnyValues' bytes run together (one message
    with repeated oneof fields, where protobuf keeps the last), the fast read agrees or declines."""
    raw = b"".join(v.SerializeToString() for v in values)
    try:
        _full(raw)
    except ValueError:  # mixed arrays and the like: the decoder refuses them; the fast read must decline
        assert _fast(raw, 2**22) is MISSING
        return
    _check(raw)


def test_a_request_decodes_the_same_with_and_without_the_fast_read():
    traces = [make_trace(i, batch=2, seq_len=3, n_loops=5) for i in range(3)]
    body = otlp_body(traces).SerializeToString()
    limits = Limits()
    fast_traces, fast_rows = otlp_decode.decode_body(body, otlp_decode.PROTOBUF, limits)
    slow_traces, slow_rows = otlp_decode.decode(otlp_decode.parse(body, otlp_decode.PROTOBUF, limits), limits)
    assert fast_rows == slow_rows
    for a, b in zip(fast_traces, slow_traces, strict=True):
        assert a.to_dict() == b.to_dict()
    spans = otlp_fast.parse(body)
    assert len(spans) == 3 and len(spans[0].attributes) > 40  # the fast read saw every span and attribute


def _doubles_value(values) -> bytes:
    return AnyValue(array_value=ArrayValue(values=[AnyValue(double_value=v) for v in values])).SerializeToString()


def test_arrays_of_one_length_are_read_together_and_a_bad_one_among_them_is_declined_alone():
    """`read_values` views the double arrays of one byte length as rows of one array: a 7-character
    string in the middle row must decline that row only, and each row must hold its own values."""
    good = [_doubles_value([i + 0.25, -i, i / 3]) for i in range(5)]
    bad = AnyValue(array_value=ArrayValue(values=[AnyValue(double_value=1.0), AnyValue(string_value="abcdefg"),
                                                  AnyValue(double_value=2.0)])).SerializeToString()
    assert len(bad) == len(good[0])
    values = [*good[:2], bad, AnyValue(string_value="x").SerializeToString(), *good[2:], _doubles_value([7.0] * 300)]
    read = otlp_fast.read_values(values, 2**22)
    assert read[2] is MISSING and read[3] == "x"
    for i, got in zip((0, 1, 4, 5, 6), (read[0], read[1], read[4], read[5], read[6])):
        k = (0, 1, None, None, 2, 3, 4)[i]
        assert got.tolist() == [k + 0.25, -k, k / 3] and not got.flags.writeable
    assert read[7].tolist() == [7.0] * 300  # another length (a 2-byte one): its own group
    assert otlp_fast.read_values([], 2**22) == []


@settings(max_examples=150, deadline=None)
@given(st.lists(_any_value, min_size=1, max_size=12))
def test_a_request_of_values_reads_each_as_the_full_parse_or_declines_it(values):
    """Read together (grouped by length), each value still reads as the full parse reads it alone."""
    raws = [v.SerializeToString() for v in values]
    for raw, fast in zip(raws, otlp_fast.read_values(raws, 2**22), strict=True):
        try:
            full = _full(raw)
        except ValueError:
            assert fast is MISSING
            continue
        if fast is not MISSING:
            assert _same(fast, full), (raw, fast, full)


@pytest.mark.parametrize("extra", [
    # a key sent twice, read fast the first time and left to the full parse the second: the last wins
    [("recurrent_depth.attr.x", AnyValue(double_value=1.5)),
     ("recurrent_depth.attr.x", AnyValue(string_value="z" * 200))],  # a 2-byte length: the full parse's
    # the other way round
    [("recurrent_depth.attr.y", AnyValue(string_value="é" * 100)),
     ("recurrent_depth.attr.y", AnyValue(string_value="b"))],
])
def test_a_key_sent_twice_decodes_as_without_the_fast_read(extra):
    body = otlp_body([make_trace(i, batch=1, seq_len=4, n_loops=3) for i in range(2)])
    span = body.resource_spans[0].scope_spans[0].spans[1]
    for key, value in extra:
        span.attributes.append(KeyValue(key=key, value=value))
    raw, limits = body.SerializeToString(), Limits()
    fast_traces, fast_rows = otlp_decode.decode_body(raw, otlp_decode.PROTOBUF, limits)
    slow_traces, slow_rows = otlp_decode.decode(otlp_decode.parse(raw, otlp_decode.PROTOBUF, limits), limits)
    assert fast_rows == slow_rows and [t.to_dict() for t in fast_traces] == [t.to_dict() for t in slow_traces]
    key = extra[0][0]
    last = otlp_decode._Values(limits).any(extra[-1][1], "x")
    assert fast_traces[1].attributes[key.removeprefix("recurrent_depth.attr.")] == last


# -- the decoder takes the fast read by default, and only where the full parse agrees -------------

SLOW_KEYS = {"recurrent_depth.token_ids", "recurrent_depth.position.iterations_used", "recurrent_depth.token_text",
             "recurrent_depth.expert.load"}  # int and string arrays: the shallow read leaves them to the full parse


def _slow_reads(monkeypatch) -> list[str]:
    """The span attributes (not the resource's) `_Values._value`, the full parse's reader, is asked
    for, in order."""
    asked, real = [], otlp_decode._Values._value

    def spy(self, kv, where, depth):
        if where != "resource":
            asked.append(kv.key)
        return real(self, kv, where, depth)

    monkeypatch.setattr(otlp_decode._Values, "_value", spy)
    return asked


def test_a_protobuf_request_reads_every_attribute_fast_but_int_and_string_arrays(monkeypatch):
    """The fast read is the default path: of a forward span's ~80 attributes only its four int and
    string arrays go to the full parse's reader (a decoder that silently fell back to it for
    everything would decode the same values, several times slower)."""
    traces = [make_trace(i, detail="summary", batch=1, seq_len=4, n_loops=3) for i in range(3)]
    raw = otlp_body(traces).SerializeToString()
    asked = _slow_reads(monkeypatch)
    decoded, _ = otlp_decode.decode_body(raw, otlp_decode.PROTOBUF, Limits())
    assert len(decoded) == 3 and len(asked) == 3 * len(SLOW_KEYS) and set(asked) == SLOW_KEYS
    asked.clear()
    from_json, _ = otlp_decode.decode_body(_json(traces), otlp_decode.JSON, Limits())
    assert [t.to_dict() for t in from_json] == [t.to_dict() for t in decoded]
    assert len(asked) > 3 * 40  # JSON has no shallow read: every attribute from the full parse


def _json(traces) -> bytes:
    """The OTLP/JSON body of `traces`: protobuf's JSON mapping, the ids written as hex."""
    doc = json_format.MessageToDict(otlp_body(traces))
    for rs in doc["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for span in ss["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64decode(span[key]).hex()
    return json.dumps(doc).encode()


def test_a_key_sent_twice_still_reads_the_rest_fast(monkeypatch):
    body = otlp_body([make_trace(0, detail="summary", batch=1, seq_len=4, n_loops=3)])
    span = body.resource_spans[0].scope_spans[0].spans[0]
    span.attributes.append(KeyValue(key="recurrent_depth.attr.x", value=AnyValue(double_value=1.5)))
    span.attributes.append(KeyValue(key="recurrent_depth.attr.x", value=AnyValue(double_value=2.5)))
    asked = _slow_reads(monkeypatch)
    (trace,), _ = otlp_decode.decode_body(body.SerializeToString(), otlp_decode.PROTOBUF, Limits())
    assert set(asked) == SLOW_KEYS and trace.attributes["x"] == 2.5


@pytest.mark.parametrize("n_loops", [1, 3])
def test_past_max_depth_no_array_is_read_fast_and_the_full_parse_refuses_it(n_loops, monkeypatch):
    """Span attributes sit at depth 0 and an array one deeper: with `max_depth` 0 every array is
    refused, one-value arrays included (a fast read must not let one through); from 1 they are
    read, and fast."""
    raw = otlp_body([make_trace(0, detail="summary", batch=1, seq_len=2, n_loops=n_loops)]).SerializeToString()
    with pytest.raises(ValueError, match=r"values nest deeper than 0 levels"):
        otlp_decode.decode_body(raw, otlp_decode.PROTOBUF, Limits(max_depth=0))
    asked = _slow_reads(monkeypatch)
    (trace,), _ = otlp_decode.decode_body(raw, otlp_decode.PROTOBUF, Limits(max_depth=1))
    assert set(asked) == SLOW_KEYS
    assert trace.n_loops == n_loops and len(trace.iteration_metrics["rel_residual"]) == trace.iterations


@pytest.mark.parametrize("values", [[1.5], [1.5, 2.5]])
def test_past_max_depth_a_plain_spans_double_array_is_refused_too(values):
    """A span that is not a forward, whose only array holds doubles (one, or more): at `max_depth`
    0 the full parse refuses it, so the fast read must leave it alone whatever its length."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

    span = Span(trace_id=bytes(range(1, 17)), span_id=bytes(range(1, 9)), name="other",
                attributes=[KeyValue(key="x", value=AnyValue(array_value=ArrayValue(
                    values=[AnyValue(double_value=v) for v in values])))])
    raw = ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[span])])]) \
        .SerializeToString()
    with pytest.raises(ValueError, match="values nest deeper than 0 levels"):
        otlp_decode.decode_body(raw, otlp_decode.PROTOBUF, Limits(max_depth=0))
    assert otlp_decode.decode_body(raw, otlp_decode.PROTOBUF, Limits(max_depth=1))[1][0]["attributes"] == \
        json.dumps({"x": values})


def test_a_value_the_full_parse_refuses_is_named_by_its_span_and_key():
    """An int array past `max_array` (the doubles of the same span are within it) is refused by the
    full parse's reader, whose message names the span and the attribute."""
    trace = make_trace(0, detail="summary", batch=1, seq_len=20, n_loops=4)
    raw = otlp_body([trace]).SerializeToString()
    with pytest.raises(otlp_decode.TooLarge) as err:
        otlp_decode.decode_body(raw, otlp_decode.PROTOBUF, Limits(max_array=16))
    assert str(err.value) == (f"span {trace.span_id} recurrent_depth.position.iterations_used: array of 20 values, "
                              "more than the limit of 16")


def test_a_value_refused_in_a_span_sending_a_key_twice_is_named_too():
    trace = make_trace(0, detail="summary", batch=1, seq_len=20, n_loops=4)
    body = otlp_body([trace])
    span = body.resource_spans[0].scope_spans[0].spans[0]
    span.attributes.extend([KeyValue(key="recurrent_depth.attr.x", value=AnyValue(int_value=v)) for v in (1, 2)])
    with pytest.raises(otlp_decode.TooLarge) as err:
        otlp_decode.decode_body(body.SerializeToString(), otlp_decode.PROTOBUF, Limits(max_array=16))
    assert str(err.value).startswith(f"span {trace.span_id} recurrent_depth.position.iterations_used: array of 20")


def test_a_json_body_nesting_past_its_limit_is_refused_through_decode_body():
    body = _json([make_trace(0, detail="summary", batch=1, seq_len=2, n_loops=2)])
    with pytest.raises(ValueError, match="JSON body nests deeper than 3 levels"):
        otlp_decode.decode_body(body, otlp_decode.JSON, Limits(max_json_depth=3))
    assert len(otlp_decode.decode_body(body, otlp_decode.JSON, Limits())[0]) == 1


def test_a_short_value_leaves_the_values_after_it_read():
    empty = AnyValue().SerializeToString()  # b"": an attribute with no value
    assert otlp_fast.read_values([empty, b"\x10", AnyValue(double_value=1.5).SerializeToString()], 2**22) == \
        [MISSING, MISSING, 1.5]


def test_double_records_read_after_any_offset():
    records = _doubles_value([0.5, -2.0])[2:]  # the ArrayValue's records, after the AnyValue's tag and length
    assert otlp_fast.double_records(b"\x00\x00\x00" + records, 3, 2).tolist() == [0.5, -2.0]
    assert otlp_fast.double_records(b"\x00\x00\x00" + records, 3, 3) is None
    assert otlp_fast.double_records(records, 0, 2).tolist() == [0.5, -2.0]
