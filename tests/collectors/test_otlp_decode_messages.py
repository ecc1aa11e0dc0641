"""`collectors/otlp_decode.py`: the exact error messages (each names the span and the field, with
nothing added), the gzip reader's bound on memory, and the value reader on the inputs the other
decoder tests do not build (a scalar read by `any`, an array of kvlists, a one-element array, a
mixed array whose bytes look like doubles). Written against survivors of `scripts/mutation.sh
collectors/otlp_decode.py`; tests/collectors/test_otlp_decode_unit.py has the boundaries."""

from __future__ import annotations

import gzip
import tracemalloc
import zlib

import numpy as np
import pytest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList

from mythos_probe.collectors import otlp_decode as D
from mythos_probe.collectors.otlp_decode import Limits, TooLarge
from tests.collectors.test_otlp_decode_unit import attrs, one_span, request_of
from tests.collectors.test_wire_format import SPAN_ID, hand_trace


def message(fn, *args, exc=ValueError, **kwargs) -> str:
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    return str(info.value)


# --- gzip --------------------------------------------------------------------------------------

def test_gunzip_messages_are_exact_and_zlib_is_not_gzip():
    data = b"abc" * 100
    assert message(D.gunzip, gzip.compress(data)[:-12], 10_000) == "truncated gzip body"
    assert message(D.gunzip, gzip.compress(data), 299, exc=TooLarge) == "body inflates past the 299-byte limit"
    # Content-Encoding: gzip means the gzip container; a bare zlib stream is refused, not sniffed
    assert message(D.gunzip, zlib.compress(data), 10_000).startswith("bad gzip body: ")
    assert D.gunzip(gzip.compress(data), 300) == data


def test_gunzip_never_inflates_a_bomb_past_the_limit():
    # 64 MiB of zeros in ~64 KiB of gzip, built in pieces so the test itself stays small
    deflater = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    chunk = bytes(1 << 20)
    bomb = b"".join(deflater.compress(chunk) for _ in range(64)) + deflater.flush()
    assert len(bomb) < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(TooLarge, match="inflates past the 4096-byte limit"):
            D.gunzip(bomb, 4096)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"inflating held {peak:,} bytes for a 4,096-byte limit"


def test_json_id_message_quotes_forty_characters():
    bad = "z" * 50
    assert message(D._json_ids, {"traceId": bad}, 8) == f"traceId must be hex, got {'z' * 40!r}"


# --- values ------------------------------------------------------------------------------------

def av(**kw):
    return AnyValue(**kw)


def arr(*values):
    return AnyValue(array_value=ArrayValue(values=list(values)))


def kvl(**pairs):
    return AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key=k, value=v) for k, v in pairs.items()]))


def test_any_reads_each_scalar_itself():
    v = D._Values(Limits())
    assert v.any(av(string_value="x"), "w") == "x"
    assert v.any(av(bool_value=True), "w") is True
    assert v.any(av(int_value=-7), "w") == -7
    assert v.any(av(double_value=2.5), "w") == 2.5
    assert v.any(AnyValue(), "w") is None


def test_array_of_kvlists_reads_as_dicts():
    got = D._Values(Limits()).any(arr(kvl(a=av(int_value=1)), kvl(b=av(string_value="x"))), "w")
    assert got == [{"a": 1}, {"b": "x"}]
    assert all(type(d) is dict for d in got)


def test_mixed_array_that_looks_like_doubles_is_refused():
    # a 7-character string encodes as 0a 09 0a 07 …: 11 bytes with a double's first two bytes
    mixed = arr(av(double_value=1.0), av(string_value="abcdefg"))
    assert len(mixed.array_value.SerializeToString()) == 22
    assert message(D._Values(Limits()).any, mixed, "w") == "w: array mixes value types; OTLP arrays hold one type"
    assert D._doubles(mixed.array_value, 2) is None
    doubles = D._doubles(ArrayValue(values=[av(double_value=1.0), av(double_value=-0.5)]), 2)
    assert doubles.dtype == np.float64 and doubles.tolist() == [1.0, -0.5]


def test_nested_value_errors_name_the_attribute_path():
    v = D._Values(Limits(max_attributes=1, max_depth=8))
    inner = kvl(a=av(int_value=1), b=av(int_value=2))
    assert message(v.any, kvl(x=inner), "span s", exc=TooLarge) == "span s x: 2 attributes, more than the limit of 1"
    assert message(v.kvlist, [KeyValue(key="x", value=inner)], "span s", exc=TooLarge) == \
        "span s x: 2 attributes, more than the limit of 1"


def test_kvlist_counts_depth_from_zero():
    # an attribute value nested max_depth deep is accepted when the span's attributes are read
    node = av(int_value=1)
    for _ in range(2):
        node = arr(node)
    v = D._Values(Limits(max_depth=2))
    assert v.kvlist([KeyValue(key="k", value=node)], "s") == {"k": [[1]]}
    assert message(v.kvlist, [KeyValue(key="k", value=arr(node))], "s") == "s k: values nest deeper than 2 levels"


# --- check_forward -----------------------------------------------------------------------------

def test_check_forward_messages_are_exact():
    assert message(D.check_forward, attrs(batch=-1), Limits()) == \
        "span: recurrent_depth.batch = -1 is outside [0, 2147483647]"
    assert message(D.check_forward, attrs(expert__count=-1), Limits(), where="span ab") == \
        "span ab: recurrent_depth.expert.count = -1 is outside [0, 2147483647]"
    lo, hi = -(2**63), 2**63 - 1
    assert message(D.check_forward, attrs(schema_version=lo - 1), Limits(), where="s") == \
        f"s: recurrent_depth.schema_version = {lo - 1} is outside [{lo}, {hi}]"
    # the lowest int64 is an integer: the record's own version check refuses it
    assert "this mythos-probe reads record versions 1 to" in message(D.check_forward, attrs(schema_version=lo), Limits())


def test_one_element_arrays_are_type_checked():
    assert D._length({"k": [5]}, "k", 1, "integer", "n") is True
    assert D._length({"k": ["a"]}, "k", 1, "string", "n") is True
    assert message(D._length, {"k": [1.5]}, "k", 1, "integer", "n") == "k must be an array of integers, got floats"
    assert D._length({}, "k", 1, "integer", "n") is False


# --- decode: every error names its span --------------------------------------------------------

def test_decode_errors_name_the_span():
    where = f"span {SPAN_ID}"
    req, span = one_span(trace_id=b"\x01" * 15)
    assert message(D.decode, req) == f"{where}: trace_id must be 16 bytes, got 15"
    req, span = one_span(parent_span_id=b"\x01" * 3)
    assert message(D.decode, req) == f"{where}: parent_span_id must be 8 bytes, got 3"
    req, span = one_span()
    for a in span.attributes:
        if a.key == "recurrent_depth.batch":
            a.value.int_value = -1
    assert message(D.decode, req) == f"{where}: recurrent_depth.batch = -1 is outside [0, 2147483647]"
    req = request_of(hand_trace())
    assert message(D.decode, req, Limits(max_attributes=37), exc=TooLarge) == \
        f"{where}: 38 attributes, more than the limit of 37"


def test_parse_messages_are_exact():
    assert message(D.parse, b"[" * 100_000 + b"]" * 100_000, "application/json") == "JSON body nests too deep"
    assert message(D.parse, b"", "text/plain", exc=D.Unsupported) == \
        "content type must be application/x-protobuf or application/json, got 'text/plain'"
    assert message(D.parse, b"{not json", "application/json").startswith("malformed OTLP JSON body: ")
    assert message(D.parse, b"\xff\xff\xff", "application/x-protobuf").startswith("malformed OTLP protobuf body: ")
