"""OTLP/HTTP trace receiver: `POST /v1/traces` (protobuf or JSON, optionally gzip) → the store.

The receiver is the store's single writer in `mythos-probe serve`. It decodes each span with
`rows.decode_span`, the same function the in-process `DuckDBSpanExporter` uses, so a forward
received over OTLP produces exactly the rows a direct write does.

Every request is answered and the server keeps serving: a body that is truncated, malformed,
of another content type or not a valid record → 400; larger than `max_body_bytes` (before or
after gzip) → 413; a missing or wrong `Authorization: Bearer <token>` when a token is set → 401;
a store failure → 503 (OTLP clients retry on it). A request is acknowledged (200) only after its
rows are committed. It binds loopback by default; binding any other address needs a token.

This module is not: the command line (`serve`), the span encoding (`spans`) or gRPC.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import logging
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from mythos_probe.collectors.rows import decode_span
from mythos_probe.collectors.store import Store

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4318
DEFAULT_MAX_BODY_BYTES = 64 * 2**20
PROTOBUF = "application/x-protobuf"
JSON = "application/json"


class BadRequest(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# A double[] element on the wire: AnyValue field 1 of ArrayValue (0x0a), length 9 (0x09), then
# double_value, field 4 fixed64 (0x21), and its 8 little-endian bytes. A oneof member is written
# even when it is 0.0, so an array of n doubles serialises to exactly n such 11-byte records.
_DOUBLE_RECORD = np.dtype([("head", "S3"), ("value", "<f8")])


def _doubles(array: ArrayValue, n: int) -> np.ndarray | None:
    """The array's n doubles read in one pass over its serialised bytes, or None if it is not
    exactly n double records. Several times faster than one Python attribute access per element."""
    raw = array.SerializeToString()
    if len(raw) != 11 * n or raw[0::11] != b"\x0a" * n or raw[1::11] != b"\x09" * n or raw[2::11] != b"\x21" * n:
        return None
    return np.frombuffer(raw, dtype=_DOUBLE_RECORD)["value"].copy()


def _array(array: ArrayValue) -> list | np.ndarray:
    values = array.values
    if not values:
        return []
    # OTel arrays are homogeneous: read every element through the first one's field.
    inner = values[0].WhichOneof("value")
    if inner == "double_value":
        doubles = _doubles(array, len(values))
        if doubles is not None:
            return doubles
    if inner in ("array_value", "kvlist_value"):
        return [any_value(v) for v in values]
    return [getattr(v, inner) for v in values]


def any_value(value: AnyValue) -> Any:
    """An OTLP value as Python: scalars, lists, dicts, and double[] as a float64 numpy array."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return _array(value.array_value)
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return None if kind is None else getattr(value, kind)


def _hex(raw: bytes, size: int, what: str) -> str:
    if len(raw) != size:
        raise BadRequest(400, f"{what} must be {size} bytes, got {len(raw)}")
    return raw.hex()


def decode_request(request: ExportTraceServiceRequest):
    """An OTLP export request → (LoopTraces, `spans` rows)."""
    traces, rows = [], []
    for resource_spans in request.resource_spans:
        resource = {kv.key: any_value(kv.value) for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
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
                    attributes={kv.key: any_value(kv.value) for kv in span.attributes},
                )
                if trace is not None:
                    traces.append(trace)
                rows.append(row)
    return traces, rows


def _hex_ids_to_base64(node: Any) -> None:
    # OTLP/JSON writes ids as hex; protobuf's JSON mapping expects base64 for bytes fields.
    if isinstance(node, dict):
        for key in ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"):
            if isinstance(node.get(key), str):
                node[key] = base64.b64encode(bytes.fromhex(node[key])).decode()
        for value in node.values():
            _hex_ids_to_base64(value)
    elif isinstance(node, list):
        for value in node:
            _hex_ids_to_base64(value)


def parse_body(body: bytes, content_type: str) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    try:
        if content_type == PROTOBUF:
            request.ParseFromString(body)
        elif content_type == JSON:
            data = json.loads(body)
            _hex_ids_to_base64(data)
            json_format.ParseDict(data, request)
        else:
            raise BadRequest(400, f"content type must be {PROTOBUF} or {JSON}, got {content_type or 'none'!r}")
    except (DecodeError, json_format.ParseError, ValueError, TypeError) as exc:
        if isinstance(exc, BadRequest):
            raise
        raise BadRequest(400, f"malformed OTLP {content_type} body: {exc}") from None
    return request


def _gunzip(body: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)  # never inflate past the limit (gzip bombs)
    except zlib.error as exc:
        raise BadRequest(400, f"bad gzip body: {exc}") from None
    if len(out) > limit:
        raise BadRequest(413, f"body inflates past the {limit}-byte limit")
    if not inflater.eof:
        raise BadRequest(400, "truncated gzip body")
    return out


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"
    timeout = 30  # a stalled sender frees its thread

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if status >= 400 and status != 401:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._reply(405, b"POST OTLP to /v1/traces\n")

    def do_POST(self) -> None:
        receiver = self.server.receiver
        try:
            if self.path.split("?", 1)[0] != "/v1/traces":
                raise BadRequest(404, "only /v1/traces is served")
            if receiver.token is not None:
                given = self.headers.get("Authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {receiver.token}".encode()):
                    self.close_connection = True
                    raise BadRequest(401, "missing or wrong bearer token")
            body = self._read_body(receiver.max_body_bytes)
            encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
            if encoding == "gzip":
                body = _gunzip(body, receiver.max_body_bytes)
            elif encoding != "identity":
                raise BadRequest(400, f"unsupported content encoding {encoding!r}")
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            request = parse_body(body, content_type)
            try:
                traces, rows = decode_request(request)
            except (KeyError, ValueError, TypeError) as exc:
                raise BadRequest(400, f"span is not a valid LoopTrace: {exc!r}") from None
            try:
                receiver.store.write(traces, rows)
            except Exception:
                logger.exception("could not write %d spans", len(rows))
                raise BadRequest(503, "store write failed; retry") from None
            receiver.count(spans=len(rows))
            response = ExportTraceServiceResponse()
            if content_type == JSON:
                self._reply(200, json_format.MessageToJson(response).encode(), JSON)
            else:
                self._reply(200, response.SerializeToString(), PROTOBUF)
        except BadRequest as exc:
            receiver.count(rejected=1)
            self._reply(exc.status, (str(exc) + "\n").encode())

    def _read_body(self, limit: int) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise BadRequest(400, "Content-Length is required")
        size = int(length)
        if size > limit:
            raise BadRequest(413, f"body of {size} bytes exceeds the {limit}-byte limit")
        body = self.rfile.read(size)
        if len(body) != size:
            raise BadRequest(400, f"truncated body: {len(body)} of {size} bytes")
        return body


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    receiver: "Receiver"


class Receiver:
    """An OTLP/HTTP receiver writing `store`; `start()` serves on a background thread."""

    def __init__(
        self,
        store: Store,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        token: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        if not is_loopback(host) and not token:
            raise ValueError(
                f"refusing to bind {host}: a non-loopback address needs an ingest token (--token) "
                "that every sender passes as `Authorization: Bearer <token>`"
            )
        self.store = store
        self.token = token or None
        self.max_body_bytes = max_body_bytes
        self.received_spans = 0
        self.rejected_requests = 0
        self._lock = threading.Lock()
        self._server = _Server((host, port), _Handler)
        self._server.receiver = self
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return self._server.server_address[0]

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        """Base URL for OTLP exporters (they add /v1/traces)."""
        return f"http://{self.host}:{self.port}"

    def count(self, spans: int = 0, rejected: int = 0) -> None:
        with self._lock:
            self.received_spans += spans
            self.rejected_requests += rejected

    def start(self) -> "Receiver":
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "Receiver":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
