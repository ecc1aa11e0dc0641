"""A shallow second parse of an OTLP/protobuf trace request, for reading span attributes fast.

`otlp_decode` parses every request with the real OTLP messages: that parse decides what is valid
(structure, UTF-8, sizes) and stays the reference. Reading ~80 attributes of a forward span through
protobuf's Python objects then costs ~3 µs each (a wrapper per value, `WhichOneof`, `getattr`).
`parse` reads the same bytes with a schema (built here on first use) that declares only the path
to the span attributes and keeps each attribute's `AnyValue` as its serialized bytes;
`read_values` reads a string, an int, a bool, a double or an array of doubles from those
bytes in a few byte operations, and returns `MISSING` for anything else (other arrays, kvlists,
bytes, an `AnyValue` holding more than one field, a string longer than 127 bytes), which the
caller then reads from the full parse as before. Both parses walk the same bytes, so their spans
and attributes line up one to one.

This module is not: the decoder or its checks (`otlp_decode`), which falls back to the full parse.
"""

from __future__ import annotations

import functools
import struct

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

MISSING = object()  # "not read here": read the value from the full parse


@functools.cache
def _request_class():
    """(Built on first use, once.) ExportTraceServiceRequest → resource_spans (1) → scope_spans (2) → spans (2) → attributes
    (9), each a KeyValue whose value (2) stays bytes. Other fields are skipped as unknown."""
    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="mythos_probe_otlp_fast.proto", package="mythos_probe_otlp_fast",
                                               syntax="proto3")
    for name, fields in (
        ("KeyValue", [(1, "key", field.TYPE_STRING, None), (2, "value", field.TYPE_BYTES, None)]),
        ("Span", [(9, "attributes", field.TYPE_MESSAGE, "KeyValue")]),
        ("ScopeSpans", [(2, "spans", field.TYPE_MESSAGE, "Span")]),
        ("ResourceSpans", [(2, "scope_spans", field.TYPE_MESSAGE, "ScopeSpans")]),
        ("Request", [(1, "resource_spans", field.TYPE_MESSAGE, "ResourceSpans")]),
    ):
        message = proto.message_type.add(name=name)
        for number, fname, ftype, type_name in fields:
            f = message.field.add(name=fname, number=number, type=ftype,
                                  label=field.LABEL_REPEATED if type_name else field.LABEL_OPTIONAL)
            if type_name:
                f.type_name = f".mythos_probe_otlp_fast.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("mythos_probe_otlp_fast.Request"))


def parse(body: bytes) -> list:
    """The request's spans, in order, as messages whose `attributes` hold (key, value bytes)."""
    request = _request_class()()
    request.ParseFromString(body)  # after the full parse accepted the same bytes
    return [span for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans]


_DOUBLE = struct.Struct("<d").unpack_from
# A double[] element: AnyValue (ArrayValue field 1, 0x0a), length 9, double_value (field 4,
# fixed64: 0x21), 8 little-endian bytes. A oneof member is written even when 0.0.
_RECORD, _HEAD = 11, b"\x0a\x09\x21"
_HEADS = np.frombuffer(_HEAD, np.uint8)


def read_values(values: list[bytes], max_array: int) -> list:
    """Each of `values` (AnyValues' serialized bytes, a request's attribute values) → its string,
    int, bool, float or float64 array (a read-only view), or `MISSING` where it is anything else or
    not in the one canonical layout read here. The double arrays of one byte length are checked
    and viewed together: one numpy pass for the ~35 arrays of a forward span, or the ~3,500 of a
    request, instead of a few Python calls each."""
    out = [MISSING] * len(values)
    arrays: dict[tuple[int, int], list[int]] = {}  # (byte length, offset of the first record) → indices
    for i, value in enumerate(values):
        if len(value) < 2:
            continue
        tag = value[0]
        if tag == 0x2A:  # array_value: its length as a varint, then the elements (the commonest: first)
            if value[1] < 0x80:  # pragma: no mutate (a one-byte length; 0x80 read as one fails the size check below)
                size, at = value[1], 2
            else:
                size, at = _varint(value, 1)
            # pragma below: `1 < size // _RECORD` only leaves one-double arrays to the slow path, which reads them the same
            if size == len(value) - at and size % _RECORD == 0 and 0 < size // _RECORD <= max_array:  # pragma: no mutate
                arrays.setdefault((len(value), at), []).append(i)
        elif tag == 0x21:  # double_value
            if len(value) == 9:
                out[i] = _DOUBLE(value, 1)[0]
        elif tag == 0x0A:  # string_value, 0-127 bytes: one length byte, and nothing after the string
            if value[1] == len(value) - 2:
                try:
                    out[i] = value[2:].decode()
                except UnicodeDecodeError:  # the full parse refused it first; never read here
                    pass
        elif tag == 0x18:  # int_value: a varint ending the value, two's complement
            number, end = _varint(value, 1)
            if end == len(value):
                number &= (1 << 64) - 1  # a tenth byte past bit 63 is dropped, as protobuf drops it
                out[i] = number - (1 << 64) if number >= 1 << 63 else number
        elif tag == 0x10:  # bool_value
            if len(value) == 2 and value[1] <= 1:
                out[i] = value[1] == 1
    for (length, at), where in arrays.items():
        rows = _double_rows(b"".join([values[i] for i in where]), len(where), length, at)
        for i, row in zip(where, rows):
            if row is not None:
                out[i] = row
    return out


def double_records(raw: bytes, at: int, n: int) -> np.ndarray | None:
    """The n 11-byte double records of an ArrayValue's elements starting at `at` in `raw` (which
    must end with them), as a read-only float64 view, or None if any record is not a double."""
    if len(raw) - at != n * _RECORD:
        return None
    return _double_rows(raw, 1, len(raw), at)[0]


def _double_rows(blob: bytes, k: int, length: int, at: int) -> list[np.ndarray | None]:
    """`blob` holds k values of `length` bytes each, whose double records start `at` bytes in:
    each value's read-only float64 view (a row of one strided view of `blob`), or None for a value
    any of whose records is not a double (all three head bytes checked)."""
    n = (length - at) // _RECORD  # pragma: no mutate (`length + at`: at is 2-5 here, under half a record, so the same n)
    records = np.frombuffer(blob, np.uint8).reshape(k, length)[:, at:].reshape(k, n, _RECORD)
    good = (records[:, :, : len(_HEAD)] == _HEADS).all(axis=(1, 2)).tolist()
    # float64 is numpy's default; "<f8" says the wire's byte order, for a big-endian host
    doubles = np.ndarray((k, n), "<f8", blob, at + len(_HEAD), (length, _RECORD))  # pragma: no mutate
    return [doubles[j] if ok else None for j, ok in enumerate(good)]


def _varint(value: bytes, at: int) -> tuple[int, int]:
    """(the varint at `at`, the offset after it); an offset of -1 where it is cut short or past 10 bytes."""
    number = 0
    for shift in range(0, 70, 7):
        if at >= len(value):
            return 0, -1  # pragma: no mutate (any offset but the value's end fails the caller's check)
        byte = value[at]
        number |= (byte & 0x7F) << shift
        at += 1
        if byte < 0x80:
            return number, at
    return 0, -1  # pragma: no mutate (as above)
