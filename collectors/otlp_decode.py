"""Pure OTLP trace-request decoder: a request body → (LoopTraces, `spans` rows), or ValueError.

Everything a sender controls is checked here, before anything reaches the store, against the
documented `Limits`: body size (before and after gzip), JSON and attribute nesting depth, spans per
request, attributes per span, values per array, iterations per forward and table rows per request.
A forward span (`spans.is_loop_span`) is then checked against its own declared shape: batch, seq_len,
iterations and expert count are non-negative integers within their columns, every array it sends
has exactly the length the shape implies, `token_text` included, and `schema_version` is one this
version reads (1 … `records.SCHEMA_VERSION`; older records read with the defaults of the newer
fields). Rows follow what a request carries: a forward at detail="positions" must carry per-position
values, so a small request cannot declare a million positions and have them stored.

Errors are `ValueError`s whose message names the span and the field: `TooLarge` for a size or count
over a limit, `Unsupported` for a content type or encoding this decoder does not read, plain
`ValueError` for anything malformed or inconsistent. Mapping them to HTTP statuses is the server's job.

This module is not: the HTTP server (`receiver`), the span encoding (`spans`) or the rows (`rows`).
"""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import dataclass
from operator import attrgetter, methodcaller
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from mythos_probe.collectors import otlp_fast
from mythos_probe.collectors import spans as S
from mythos_probe.collectors.rows import decode_span
from mythos_probe.records import LoopTrace, check_field

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
INT32_MAX = 2**31 - 1  # batch, seq_len, n_loops, iterations… are INTEGER columns
INT64_MAX = 2**63 - 1  # timestamps and steps are BIGINT columns; OTLP times are unsigned 64-bit


@dataclass(frozen=True)
class Limits:
    """What one request may hold. The defaults fit the largest forward the probes record (batch 8 ×
    2,048 positions × 64 iterations at detail="positions" is 1,048,576 values per array)."""

    max_body_bytes: int = 64 * 2**20  # the body, before and after gzip
    max_spans: int = 10_000  # spans per request
    max_attributes: int = 4_096  # attributes per span or resource, and entries per kvlist (the SDK's SPAN_LIMITS)
    max_array: int = 2**22  # values in one array attribute
    max_depth: int = 8  # arrays and kvlists nested inside one attribute value; ours are flat (depth 1)
    max_json_depth: int = 64  # nesting of an OTLP/JSON document; a valid request nests ~20 deep
    max_iterations: int = 4_096  # loop iterations per forward, each an `iterations` row
    max_rows: int = 2**23  # rows one request may add across the forwards/iterations/positions/experts tables


class TooLarge(ValueError):
    """A size or count over one of the `Limits` (HTTP 413)."""


class Unsupported(ValueError):
    """A content type or content encoding this decoder does not read (HTTP 415)."""


def gunzip(body: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        # never inflate past the limit (gzip bombs); any bound above `limit` is the same to the check below
        out = inflater.decompress(body, limit + 1)  # pragma: no mutate (limit + 2 also tells "past the limit")
    except zlib.error as exc:
        raise ValueError(f"bad gzip body: {exc}") from None
    if len(out) > limit:
        raise TooLarge(f"body inflates past the {limit}-byte limit")
    if not inflater.eof:
        raise ValueError("truncated gzip body")
    return out


def _json_ids(node: Any, max_depth: int, depth: int = 0) -> None:
    """Rewrites OTLP/JSON's hex ids as base64 (protobuf's JSON mapping of bytes) in place, and
    bounds the document's nesting before protobuf's recursive parser sees it."""
    if depth > max_depth:
        raise ValueError(f"JSON body nests deeper than {max_depth} levels")
    if isinstance(node, dict):
        for key in ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"):
            if isinstance(node.get(key), str):
                try:
                    node[key] = base64.b64encode(bytes.fromhex(node[key])).decode()
                except ValueError:
                    raise ValueError(f"{key} must be hex, got {node[key][:40]!r}") from None
        for value in node.values():
            if isinstance(value, (dict, list)):
                _json_ids(value, max_depth, depth + 1)
    elif isinstance(node, list):
        for value in node:
            if isinstance(value, (dict, list)):
                _json_ids(value, max_depth, depth + 1)


def parse(body: bytes, content_type: str, limits: Limits = Limits()) -> ExportTraceServiceRequest:
    """An (already inflated) OTLP/HTTP body of `content_type` → the export request."""
    request = ExportTraceServiceRequest()
    if content_type == PROTOBUF:
        try:
            request.ParseFromString(body)  # protobuf bounds its own recursion (DecodeError past 100)
        except DecodeError as exc:
            raise ValueError(f"malformed OTLP protobuf body: {exc}") from None
    elif content_type == JSON:
        try:
            data = json.loads(body)
        except RecursionError:
            raise ValueError("JSON body nests too deep") from None
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise ValueError(f"malformed OTLP JSON body: {exc}") from None
        _json_ids(data, limits.max_json_depth)
        try:
            json_format.ParseDict(data, request)
        except (json_format.ParseError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed OTLP JSON body: {exc}") from None
    else:
        raise Unsupported(f"content type must be {PROTOBUF} or {JSON}, got {content_type or 'none'!r}")
    return request


def _doubles(array: ArrayValue, n: int) -> np.ndarray | None:
    """The array's n doubles read from its serialised bytes in one pass (`otlp_fast.double_records`),
    or None if it is not exactly n double records: several times faster than one Python attribute
    access per element."""
    return otlp_fast.double_records(array.SerializeToString(), 0, n)


_SCALARS = frozenset(("string_value", "bool_value", "int_value", "double_value"))
_KIND = methodcaller("WhichOneof", "value")


class _Values:
    """AnyValue → Python under the request's limits: scalars, lists, dicts, double[] as float64."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    def any(self, value: AnyValue, where: str, depth: int = 0) -> Any:
        kind = value.WhichOneof("value")
        if kind == "array_value":
            return self.array(value.array_value, where, depth + 1)
        if kind == "kvlist_value":
            return self.kvlist(value.kvlist_value.values, where, depth + 1)
        if kind == "bytes_value":  # as OTLP/JSON writes bytes, so the JSON columns can hold it
            return base64.b64encode(value.bytes_value).decode()
        return None if kind is None else getattr(value, kind)

    def kvlist(self, pairs, where: str, depth: int = 0, fast: tuple[list, list] | None = None) -> dict[str, Any]:
        """`pairs` (KeyValues) → a dict. `fast`, where given, holds the same pairs' keys and values
        as read from the shallow parse (`fast_attributes`), a value `otlp_fast.MISSING` where it
        was not read there: those are read from `pairs`."""
        limits = self.limits
        if depth > limits.max_depth:
            raise ValueError(f"{where}: values nest deeper than {limits.max_depth} levels")
        if len(pairs) > limits.max_attributes:
            raise TooLarge(f"{where}: {len(pairs)} attributes, more than the limit of {limits.max_attributes}")
        if fast is not None and len(fast[0]) == len(pairs):  # pragma: no mutate (a fast path: the slow one reads the same)
            keys, values = fast
            out = dict(zip(keys, values))
            missing = otlp_fast.MISSING
            if len(out) == len(keys):  # no key twice: each missing value goes back to its own place
                for i, value in enumerate(values):
                    if value is missing:
                        out[keys[i]] = self._value(pairs[i], where, depth)
                return out
            out = {}  # a key twice: the last one wins, as below
            for i, value in enumerate(values):
                out[keys[i]] = self._value(pairs[i], where, depth) if value is missing else value
            return out
        return {kv.key: self._value(kv, where, depth) for kv in pairs}

    def _value(self, kv, where: str, depth: int) -> Any:
        value = kv.value
        kind = value.WhichOneof("value")  # pragma: no mutate (only picks a fast path: `any` reads every kind)
        if kind in _SCALARS:  # pragma: no mutate (the same: `any` returns getattr(value, kind) for a scalar)
            return getattr(value, kind)
        if kind == "array_value" and depth < self.limits.max_depth:  # pragma: no mutate (fast path only, as above)
            array = value.array_value
            values = array.values
            n = len(values)
            # pragma below: `array` reads a double[] the same way; this skips two calls per array
            if 0 < n <= self.limits.max_array and values[0].WhichOneof("value") == "double_value":  # pragma: no mutate
                doubles = _doubles(array, n)  # pragma: no mutate (fast path only: `any` reads a double[] the same)
                if doubles is not None:  # pragma: no mutate (as above)
                    return doubles
        return self.any(value, f"{where} {kv.key}", depth)

    def array(self, array: ArrayValue, where: str, depth: int) -> list | np.ndarray:
        if depth > self.limits.max_depth:
            raise ValueError(f"{where}: values nest deeper than {self.limits.max_depth} levels")
        values = array.values
        n = len(values)
        if n > self.limits.max_array:
            raise TooLarge(f"{where}: array of {n:,} values, more than the limit of {self.limits.max_array:,}")
        if not n:
            return []
        inner = values[0].WhichOneof("value")
        if inner == "double_value":
            doubles = _doubles(array, n)
            if doubles is not None:
                return doubles
        values = list(values)  # one wrapper per element, read twice below by C-level maps
        # OTel arrays are homogeneous; a mixed one would otherwise read its odd elements as 0.
        if list(map(_KIND, values)).count(inner) != n:
            raise ValueError(f"{where}: array mixes value types; OTLP arrays hold one type")
        if inner in ("array_value", "kvlist_value", "bytes_value"):
            return [self.any(v, where, depth) for v in values]
        if inner is None:
            raise ValueError(f"{where}: array of empty values")
        return list(map(attrgetter(inner), values))  # half the time of a Python loop over upb values


def decode_body(body: bytes, content_type: str, limits: Limits = Limits()) -> tuple[list[LoopTrace], list[dict]]:
    """An (already inflated) request body → `decode` of its `parse`; a protobuf body's span
    attributes are read through a second, shallow parse of the same bytes (`otlp_fast`)."""
    request = parse(body, content_type, limits)
    return decode(request, limits, otlp_fast.parse(body) if content_type == PROTOBUF else None)


def decode(request: ExportTraceServiceRequest, limits: Limits = Limits(),
           fast_spans: list | None = None) -> tuple[list[LoopTrace], list[dict]]:
    """An export request → (its forwards as LoopTraces, one `spans` row per span). `fast_spans`:
    the request's spans from `otlp_fast.parse` of its body, whose attributes are read in place
    where they can be (the same values; anything else comes from `request`)."""
    n_spans = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
    if n_spans > limits.max_spans:
        raise TooLarge(f"{n_spans:,} spans in one request, more than the limit of {limits.max_spans:,}; send smaller batches")
    values = _Values(limits)
    traces, rows, n_rows = [], [], 0
    if fast_spans is not None and len(fast_spans) != n_spans:  # pragma: no mutate (both parse one body: never)
        fast_spans = None
    # span attributes sit at depth 0: an array nests one deeper, so past the limit none is read fast
    fast = iter(fast_attributes(fast_spans, limits.max_array if limits.max_depth > 0 else 0) if fast_spans else ())
    for resource_spans in request.resource_spans:
        resource = values.kvlist(resource_spans.resource.attributes, "resource")
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                where = f"span {span.span_id.hex() or '(no id)'}"
                attributes = values.kvlist(span.attributes, where, fast=next(fast) if fast_spans else None)
                for field in ("start_time_unix_nano", "end_time_unix_nano"):
                    if getattr(span, field) > INT64_MAX:
                        raise ValueError(f"{where}: {field} = {getattr(span, field)} is past the year 2262 (> 2^63 − 1 ns)")
                if S.is_loop_span(span.name, attributes):
                    n_rows += check_forward(attributes, limits, where)
                    if n_rows > limits.max_rows:
                        raise TooLarge(f"the request would add more than {limits.max_rows:,} table rows; send fewer forwards per request")
                try:
                    trace, row = decode_span(
                        trace_id=_hex(span.trace_id, 16, "trace_id"),
                        span_id=_hex(span.span_id, 8, "span_id"),
                        parent_span_id=_hex(span.parent_span_id, 8, "parent_span_id") if span.parent_span_id else None,
                        name=span.name,
                        kind=Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        status_code=Status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_"),
                        status_message=span.status.message,
                        resource=resource,
                        attributes=attributes,
                    )
                except (KeyError, TypeError, OverflowError) as exc:
                    raise ValueError(f"{where}: not a valid LoopTrace: {exc}") from None
                except ValueError as exc:
                    raise type(exc)(f"{where}: {exc}") from None
                if trace is not None:
                    traces.append(trace)
                rows.append(row)
    return traces, rows


def fast_attributes(fast_spans: list, max_array: int) -> list[tuple[list[str], list]]:
    """Per span of the shallow parse, its attributes' (keys, values), the values read for the whole
    request at once (`otlp_fast.read_values`), `MISSING` where they are left to the full parse."""
    keys = [kv.key for span in fast_spans for kv in span.attributes]
    read = otlp_fast.read_values([kv.value for span in fast_spans for kv in span.attributes], max_array)
    out, at = [], 0
    for span in fast_spans:
        n = len(span.attributes)
        out.append((keys[at:at + n], read[at:at + n]))
        at += n
    return out


def _hex(raw: bytes, size: int, what: str) -> str:
    if len(raw) != size:  # `decode` prefixes the span
        raise ValueError(f"{what} must be {size} bytes, got {len(raw)}")
    return raw.hex()


def _integer(attrs: dict, key: str, lo: int, hi: int, hint: str = "") -> int | None:
    value = attrs.get(key)
    if value is None:
        return None
    if type(value) is not int:
        raise ValueError(f"{key} must be an integer (OTLP intValue), got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{key} = {value} is outside [{lo}, {hi}]{hint}")
    return value


def _required(attrs: dict, key: str, lo: int, hi: int, hint: str = "") -> int:
    value = _integer(attrs, key, lo, hi, hint)
    if value is None:
        raise ValueError(f"{key} is missing")
    return value


def _length(attrs: dict, key: str, n: int, kind: str, shape: str) -> bool:
    """Whether `key` is present; raises unless it is an array of `n` values of `kind`."""
    value = attrs.get(key)
    if value is None:
        return False
    if not isinstance(value, (list, np.ndarray)):
        raise ValueError(f"{key} must be an array, got {type(value).__name__}")
    if len(value) != n:
        raise ValueError(f"{key} holds {len(value):,} values but {shape} = {n:,}")
    if n and isinstance(value, list):  # homogeneous (checked on decoding): the first tells the type
        first = value[0]
        ok = {"number": type(first) in (int, float), "integer": type(first) is int, "string": type(first) is str}[kind]
        if not ok:
            raise ValueError(f"{key} must be an array of {kind}s, got {type(first).__name__}s")
    elif n and kind != "number":  # a float64 array from the doubles fast path
        raise ValueError(f"{key} must be an array of {kind}s, got doubles")
    return True


def check_forward(attrs: dict, limits: Limits, where: str = "span") -> int:
    """Checks a forward span's attributes against its declared shape and `limits`; returns the
    table rows it will add. Raises ValueError (TooLarge for a limit) naming the field."""
    try:
        # first, with the record's own check: the other fields' meaning depends on the version
        check_field("schema_version", _required(attrs, S.ATTR_SCHEMA_VERSION, -INT64_MAX - 1, INT64_MAX),
                    S.ATTR_SCHEMA_VERSION)
        for key in (S.ATTR_RUN_ID, S.ATTR_MODEL_ID, S.ATTR_EXIT_POLICY, S.ATTR_DETAIL):
            if not isinstance(attrs.get(key), str):
                raise ValueError(f"{key} must be a string, got {attrs.get(key)!r}")
        _required(attrs, S.ATTR_STEP, -INT64_MAX, INT64_MAX)
        batch = _required(attrs, S.ATTR_BATCH, 0, INT32_MAX)
        seq_len = _required(attrs, S.ATTR_SEQ_LEN, 0, INT32_MAX)
        _required(attrs, S.ATTR_N_LOOPS, 0, INT32_MAX)
        iterations = _required(attrs, S.ATTR_ITERATIONS, 0, limits.max_iterations, " (Limits.max_iterations)")
        for field, (key, cast) in S.RANK_ATTRS.items():
            if cast is int:
                _integer(attrs, key, 0, INT32_MAX if field != "pid" else INT64_MAX)
            elif key in attrs and not isinstance(attrs[key], str):
                raise ValueError(f"{key} must be a string, got {attrs[key]!r}")
        for key in S.ITERATION_ATTRS.values():
            _length(attrs, key, iterations, "number", S.ATTR_ITERATIONS)
        for key in S.FORWARD_ATTRS.values():
            if key in attrs and type(attrs[key]) not in (int, float):
                raise ValueError(f"{key} must be a number, got {attrs[key]!r}")
        grid = batch * seq_len
        grids = [
            _length(attrs, key, grid, kind, f"{S.ATTR_BATCH} × {S.ATTR_SEQ_LEN}")
            for key, kind in ((S.ATTR_TOKEN_IDS, "integer"), (S.ATTR_POSITION_ITERATIONS, "integer"),
                              (S.ATTR_TOKEN_TEXT, "string"))
        ]
        cells = grid * iterations
        shape = attrs.get(S.ATTR_POSITION_SHAPE)
        per_position = [key for key in S.POSITION_ATTRS.values() if key in attrs]
        if shape is not None or per_position:
            if not isinstance(shape, list) or shape != [batch, seq_len, iterations]:
                raise ValueError(
                    f"{S.ATTR_POSITION_SHAPE} must be [batch, seq_len, iterations] = {[batch, seq_len, iterations]} "
                    f"when per-position metrics are sent, got {shape!r}"
                )
            for key in per_position:
                _length(attrs, key, cells, "number", "batch × seq_len × iterations")
        n_rows = 1 + iterations
        if attrs[S.ATTR_DETAIL] == "positions" and cells:
            # Each positions row must come from values the request carries (no amplification).
            if not per_position and not any(grids):
                raise ValueError(
                    f"{S.ATTR_DETAIL} = 'positions' declares {cells:,} position rows (batch × seq_len × iterations) "
                    "but the span carries none of their values (per-position metrics, token ids or iterations used)"
                )
            n_rows += cells
        experts = _integer(attrs, S.ATTR_EXPERT_COUNT, 0, INT32_MAX)
        if S.ATTR_EXPERT_LOAD in attrs:
            if experts is None:
                raise ValueError(f"{S.ATTR_EXPERT_LOAD} needs {S.ATTR_EXPERT_COUNT}")
            _length(attrs, S.ATTR_EXPERT_LOAD, iterations * experts, "integer",
                    f"{S.ATTR_ITERATIONS} × {S.ATTR_EXPERT_COUNT}")
            n_rows += iterations * experts
        return n_rows
    except TooLarge:
        raise
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
