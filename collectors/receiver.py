"""OTLP/HTTP trace receiver: `POST /v1/traces` (protobuf or JSON, optionally gzip) → the store.

The receiver is the store's single writer in `mythos-probe serve`. The body is decoded and checked
by `otlp_decode` (the same `rows.decode_span` the in-process `DuckDBSpanExporter` uses, so a forward
received over OTLP produces exactly the rows a direct write does); this module is the HTTP around it.

Every request is answered, and the server keeps serving:
- 200 once the request's rows are committed, all of them at once (one DuckDB transaction, or one
  fsynced commit of a Parquet folder), or were already stored;
- 400 for a body that is truncated, malformed or not a consistent record (the message names the
  span and the field; one bad forward rejects its whole request, nothing of it is stored);
- 401 for a missing or wrong `Authorization: Bearer <token>` when a token is set;
- 404 for a path other than /v1/traces, 405 for a method other than POST;
- GET /healthz: 200 while the process serves; GET /readyz: 200 when the store answers a query,
  503 naming why not (both without a token: they reveal nothing stored);
- GET /v1/read…: the read API (`read_api`), behind the same token as POST;
- 411 without Content-Length or chunked transfer encoding;
- 413 for a body over `Limits.max_body_bytes` (before or after gzip, with or without chunking) and
  for counts over the other `Limits` (spans, attributes, array values, rows per request);
- 415 for a content type other than protobuf or JSON, or a content encoding other than gzip;
- 503 with `Retry-After` only when the store itself fails to write (a full disk; OTLP exporters
  retry on it), nothing of the request being stored;
- 500 for anything unexpected, logged with an id that the response repeats.
It binds loopback by default; binding any other address needs a token.

This module is not: the decoder (`otlp_decode`), the command line (`serve`), the span encoding
(`spans`) or gRPC.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
import secrets
import socket
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Sequence

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from mythos_probe.collectors import decode_pool, otlp_decode, read_api
from mythos_probe.collectors.otlp_decode import JSON, PROTOBUF, Limits, TooLarge, Unsupported
from mythos_probe.collectors.rows import Batch
from mythos_probe.collectors.store import Store
from mythos_probe.records import LoopTrace

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4318
DEFAULT_MAX_BODY_BYTES = Limits.max_body_bytes
LINGER_SECONDS = 2.0  # how long a closing connection reads what its sender still sends (`_Server`)
# A store that cannot write (a full disk, a folder gone read-only) is asked again after this.
RETRY_AFTER_SECONDS = 5
# How long a commit waits for requests still being decoded to join it (`_GroupCommit`).
GROUP_WAIT_SECONDS = 0.25


class _Reject(Exception):
    """An HTTP-level refusal (auth, path, framing) with its status."""

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


_DIGITS = re.compile(r"[0-9]{1,20}")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(;[^\r\n]*)?\r?\n")


class _Job:
    """One request's decoded forwards and span rows, waiting for a group commit: a `Batch` (its
    tables built in the decode worker) for a store that takes one, else (LoopTraces, span rows)."""

    def __init__(self, decoded: Batch | tuple[list[LoopTrace], list[dict]]) -> None:
        self.decoded = decoded
        self.done = False
        self.new: list[LoopTrace] = []
        self.error: BaseException | None = None


class _Ticket:
    """A request of `_GroupCommit.decoding`: counted from `begin` until handed to a commit."""

    counted = False
    handed = False


class _GroupCommit:
    """Writes the requests that arrive while a write is running together, in one transaction.

    A DuckDB transaction has a fixed cost of ~30 ms of CPU (a statement per table and rollup, the
    key check, the commit) against ~5 ms per 100 forwards it adds (`benchmarks/bench_receiver`),
    so concurrent senders share it: the first waiting request writes every pending one, and each
    is answered after that commit. Requests decode at different speeds, so without waiting most
    commits held one request; the writer therefore first waits, up to `GROUP_WAIT_SECONDS`, for
    requests still being decoded (`decoding`) to join, but only while they outnumber those ready
    to commit. Waiting for all of them locked the senders into one group: every request decoded,
    then all committed while the decode workers sat idle, then all were sent again. With half
    committing while the other half decodes, both cores stay busy (`bench_receiver`, 4 senders on
    2 cores: 2,421 against 2,153 spans/s; 2 senders 2,293 against 1,928). A lone sender never
    waits: nothing else is decoding. A request stays atomic (all its rows commit or none) and is
    acknowledged only once committed; a store failure fails every request of the group (503), as
    it would have failed each alone.
    """

    def __init__(self, store: Store, wait_s: float = GROUP_WAIT_SECONDS) -> None:
        self.store = store
        self.wait_s = wait_s
        self._cond = threading.Condition()
        self._pending: list[_Job] = []
        self._writing = False
        self._decoding = 0

    @contextmanager
    def decoding(self):
        """A request's ticket: from `begin(ticket)` (its body read) until `write` takes it, a
        commit starting meanwhile waits for it. `write` hands the request over to the commit in
        the same step, else a commit could start between the end of its decode and its arrival;
        the body's read is not counted, so a sender stalling its body holds no commit back."""
        ticket = _Ticket()
        try:
            yield ticket
        finally:
            with self._cond:
                if ticket.counted and not ticket.handed:  # refused, failed or never written
                    self._decoding -= 1
                    self._cond.notify_all()

    def begin(self, ticket: _Ticket) -> None:
        with self._cond:
            if not ticket.counted:
                ticket.counted = True
                self._decoding += 1

    def write(self, decoded: Batch | tuple[list[LoopTrace], list[dict]], ticket: "_Ticket | None" = None) -> list[LoopTrace]:
        """The request's new forwards (not already stored; none where a `Batch` kept no traces)
        once committed; raises what the store raised."""
        job = _Job(decoded)
        with self._cond:
            self._pending.append(job)
            if ticket is not None and ticket.counted and not ticket.handed:
                ticket.handed = True
                self._decoding -= 1
                self._cond.notify_all()
            while self._writing and not job.done:
                self._cond.wait()
            if not job.done:  # no write running: this thread writes everything pending
                self._writing = True
                deadline = time.monotonic() + self.wait_s
                # the requests being decoded join this commit, while they outnumber those ready
                while self._decoding > len(self._pending) and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                group, self._pending = self._pending, []
        if not job.done:
            try:
                self._commit(group)
            finally:
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()
        if job.error is not None:
            raise job.error
        return job.new

    def _commit(self, group: list[_Job]) -> None:
        try:
            if isinstance(group[0].decoded, Batch):
                kept = self.store.write_batch(Batch.concat([j.decoded for j in group]))
                start = 0
                for job in group:
                    end = start + job.decoded.n_forwards
                    mine = kept[(kept >= start) & (kept < end)] - start
                    job.new = [] if job.decoded.traces is None else [job.decoded.traces[i] for i in mine]
                    start = end
            else:
                traces, rows = [t for j in group for t in j.decoded[0]], [r for j in group for r in j.decoded[1]]
                kept_ids = {id(t) for t in self.store.write_new(traces, rows)}
                for job in group:
                    job.new = [t for t in job.decoded[0] if id(t) in kept_ids]
        except Exception as exc:
            for job in group:
                job.error, job.done = exc, True
            return
        for job in group:
            job.done = True


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"
    timeout = 30  # a stalled sender frees its thread

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if status == 503:  # OTLP exporters wait this long before they resend
            self.send_header("Retry-After", str(RETRY_AFTER_SECONDS))
        self.send_header("Content-Length", str(len(body)))
        if status >= 400 and status != 401:
            # The body may be unread (413, 411) or only partly read: the connection cannot carry on.
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":  # liveness: the process answers HTTP
            self._reply(200, b"ok\n")
        elif path == "/readyz":  # readiness: the store answers too (no token: it tells nothing stored)
            problem = self.server.receiver.not_ready()
            self._reply(503 if problem else 200, (problem or "ready").encode() + b"\n")
        elif path == read_api.READ_PATH or path.startswith(read_api.READ_PATH + "/"):
            self._read(path)
        else:
            self._reply(405, b"POST OTLP to /v1/traces (GET: /healthz, /readyz)\n")

    def _read(self, path: str) -> None:
        """The read API (`read_api`), behind the same token as ingest."""
        receiver = self.server.receiver
        if receiver.token is not None and not self._authorized(receiver.token):
            self.close_connection = True
            self._reply(401, b"missing or wrong bearer token\n")
            return
        try:
            status, body, content_type = read_api.answer(receiver.store, receiver.store_id, path,
                                                         self.path.partition("?")[2])
        except Exception:  # a closed or failing store: the reader retries later
            error_id = secrets.token_hex(4)
            logger.exception("read API error %s answering %s", error_id, self.path)
            status, body, content_type = 503, f"store read failed ({error_id}); retry\n".encode(), "text/plain"
        self._reply(status, body, content_type)

    def _authorized(self, token: str) -> bool:
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    def do_POST(self) -> None:
        receiver = self.server.receiver
        try:
            status, body, content_type = self._answer(receiver)
        except Exception:  # a bug, never the sender's fault: answer, log with an id, keep serving
            error_id = secrets.token_hex(4)
            logger.exception("unexpected error %s answering %s", error_id, self.path)
            status, body, content_type = 500, f"internal error {error_id}; see the receiver's log\n".encode(), "text/plain"
        if status != 200:
            receiver.count(rejected=1)
        self._reply(status, body, content_type)

    def _answer(self, receiver: "Receiver") -> tuple[int, bytes, str]:
        """(status, body, content type) for this request; expected refusals never raise."""
        with receiver.writer.decoding() as ticket:  # a commit starting meanwhile waits for this request
            try:
                decoded, content_type = self._decode(receiver, ticket)
            except _Reject as exc:
                return exc.status, (str(exc) + "\n").encode(), "text/plain; charset=utf-8"
            except TooLarge as exc:
                return 413, (str(exc) + "\n").encode(), "text/plain; charset=utf-8"
            except Unsupported as exc:
                return 415, (str(exc) + "\n").encode(), "text/plain; charset=utf-8"
            except ValueError as exc:
                return 400, (str(exc) + "\n").encode(), "text/plain; charset=utf-8"
            spans = decoded.n_spans if isinstance(decoded, Batch) else len(decoded[1])
            try:
                new = receiver.writer.write(decoded, ticket)
            except Exception:
                logger.exception("could not write %d spans", spans)
                return 503, b"store write failed; retry\n", "text/plain; charset=utf-8"
        receiver.count(spans=spans)
        if receiver.on_stored is not None and new:
            try:
                receiver.on_stored(new)
            except Exception:  # the rows are committed: a metrics failure must not make senders retry
                logger.exception("on_stored failed for %d forwards", len(new))
        response = ExportTraceServiceResponse()
        if content_type == JSON:
            return 200, json_format.MessageToJson(response).encode(), JSON
        return 200, response.SerializeToString(), PROTOBUF

    def _decode(self, receiver: "Receiver", ticket: _Ticket):
        limits = receiver.limits
        if self.path.split("?", 1)[0] != "/v1/traces":
            raise _Reject(404, "only /v1/traces is served")
        if receiver.token is not None:
            if not self._authorized(receiver.token):
                self.close_connection = True
                raise _Reject(401, "missing or wrong bearer token")
        # Checked before reading the body, so a wrong type costs the sender nothing to learn.
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type not in (PROTOBUF, JSON):
            raise Unsupported(f"content type must be {PROTOBUF} or {JSON}, got {content_type or 'none'!r}")
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding not in ("gzip", "identity"):
            raise Unsupported(f"content encoding must be gzip or identity, got {encoding!r}")
        body = self._read_body(limits.max_body_bytes)
        receiver.writer.begin(ticket)  # from here a commit starting waits for this request
        # gunzip, parse, decode (and build the table columns) in a worker process (`decode_pool`):
        # senders decode in parallel
        if receiver.columnar:
            return receiver.decoder.decode_batch(body, content_type, encoding == "gzip", limits,
                                                 receiver.on_stored is not None), content_type
        return receiver.decoder.decode(body, content_type, encoding == "gzip", limits), content_type

    def _read_body(self, limit: int) -> bytes:
        length = self.headers.get("Content-Length")
        chunked = self.headers.get("Transfer-Encoding")
        if chunked is not None:
            if length is not None:  # RFC 9112 §6.3: a request smuggling vector; refuse rather than guess
                raise _Reject(400, "send either Content-Length or Transfer-Encoding, not both")
            if chunked.strip().lower() != "chunked":
                raise _Reject(400, f"transfer encoding must be chunked, got {chunked!r}")
            return self._read_chunked(limit)
        if length is None:
            raise _Reject(411, "Content-Length or Transfer-Encoding: chunked is required")
        if not _DIGITS.fullmatch(length.strip()):
            raise _Reject(400, f"bad Content-Length {length[:40]!r}")
        size = int(length)
        if size > limit:
            raise TooLarge(f"body of {size} bytes exceeds the {limit}-byte limit")
        body = self.rfile.read(size)
        if len(body) != size:
            raise _Reject(400, f"truncated body: {len(body)} of {size} bytes")
        return body

    def _read_chunked(self, limit: int) -> bytes:
        """A chunked body (RFC 9112 §7.1), refused with 413 as soon as it passes `limit`."""
        parts, size = [], 0
        while True:
            line = self.rfile.readline(1024)
            match = _CHUNK_SIZE.fullmatch(line)
            if match is None:
                raise _Reject(400, f"bad chunk size line {line[:40]!r}")
            n = int(match.group(1), 16)
            if n == 0:
                break
            size += n
            if size > limit:
                raise TooLarge(f"chunked body exceeds the {limit}-byte limit")
            data = self.rfile.read(n)
            if len(data) != n or self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise _Reject(400, "truncated or malformed chunk")
            parts.append(data)
        for _ in range(64):  # trailer fields, ignored, up to the empty line that ends the message
            line = self.rfile.readline(8192)
            if line in (b"\r\n", b"\n"):
                return b"".join(parts)
            if not line:
                break
        raise _Reject(400, "chunked body has no end")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    receiver: "Receiver"

    def shutdown_request(self, request: Any) -> None:
        """A lingering close. A refused request (413, 411…) leaves part of its body unread, and
        closing a socket with unread input sends a reset that can reach the sender before our
        answer and destroy it: the sender sees "connection reset" (or ENOTCONN) instead of the 413.
        So our side is shut first, then what the sender still sends is read and dropped, for at
        most `LINGER_SECONDS`, before the socket closes."""
        try:
            request.shutdown(socket.SHUT_WR)
            request.settimeout(LINGER_SECONDS)
            deadline = time.monotonic() + LINGER_SECONDS
            while time.monotonic() < deadline and request.recv(65536):
                pass
        except OSError:  # the sender already went away, or stayed silent past the linger
            pass
        self.close_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Only socket errors reach here (a sender that went away); the handler answers the rest.
        logger.debug("connection from %s failed", client_address, exc_info=True)


def check_bind(host: str, token: str | None) -> None:
    """Raises ValueError for a non-loopback `host` without an ingest token."""
    if not is_loopback(host) and not token:
        raise ValueError(
            f"refusing to bind {host}: a non-loopback address needs an ingest token (--token) "
            "that every sender passes as `Authorization: Bearer <token>`"
        )


class Receiver:
    """An OTLP/HTTP receiver writing `store`; `start()` serves on a background thread. With
    `sock`, it serves on that listening socket instead of binding host:port itself.

    `on_stored`, when given, is called with the forwards each request added to the store (never
    a retried duplicate), e.g. `LoopMetrics.record` for Prometheus. `decode_workers` processes
    decode request bodies (`decode_pool`; default one per core up to 4, 0 decodes in the handler
    threads).
    """

    def __init__(
        self,
        store: Store,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        token: str | None = None,
        *,
        limits: Limits = Limits(),
        on_stored: Callable[[Sequence[LoopTrace]], None] | None = None,
        sock: socket.socket | None = None,
        decode_workers: int | None = None,
    ) -> None:
        check_bind(host, token)
        self.store = store
        self.writer = _GroupCommit(store)
        self.store_id = secrets.token_hex(8)  # the read API's: readers start again when it changes
        self.token = token or None
        self.limits = limits
        self.on_stored = on_stored
        # decode_workers: processes decoding request bodies (None: `decode_pool.default_workers`; 0: inline)
        # a store that takes a `Batch` (the DuckDB store) gets the tables built in the decode workers
        self.columnar = hasattr(store, "write_batch")
        workers = decode_pool.default_workers() if decode_workers is None else decode_workers
        self.decoder = decode_pool.shared(workers)
        if self.columnar and workers:
            # DuckDB's own threads get the cores the decode workers leave (at least one): where the
            # workers take every core, more threads only contend with them (`bench_receiver`)
            store.query(f"SET threads = {max(1, decode_pool.cores() - workers)}")
        self.received_spans = 0
        self.rejected_requests = 0
        self._lock = threading.Lock()
        if sock is None:
            self._server = _Server((host, port), _Handler)
        else:  # a socket the caller bound and listens on (serve binds every port before opening the store)
            self._server = _Server(sock.getsockname()[:2], _Handler, bind_and_activate=False)
            self._server.socket.close()
            self._server.socket = sock
            self._server.server_address = sock.getsockname()
        self._server.receiver = self
        self._thread: threading.Thread | None = None
        self._serving = False

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

    def not_ready(self) -> str | None:
        """Why the receiver cannot store a request now (the store is closed or fails a query), or None."""
        try:
            self.store.query("SELECT 1")
        except Exception as exc:  # a closed or broken store: say it, never raise into the handler
            return f"store not ready: {exc}"
        return None

    def count(self, spans: int = 0, rejected: int = 0) -> None:
        with self._lock:
            self.received_spans += spans
            self.rejected_requests += rejected

    def start(self) -> "Receiver":
        self._serving = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._serving = True
        self._server.serve_forever()

    def stop(self) -> None:
        if self._serving:  # shutdown() would wait forever for a loop never started
            self._server.shutdown()
        if self._thread is not None:
            self._thread.join()
        self._server.server_close()

    def __enter__(self) -> "Receiver":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
