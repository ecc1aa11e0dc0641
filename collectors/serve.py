"""`mythos-probe serve`: the single writer of a store — OTLP receiver plus the live dashboard.

Remote workers export OTLP/HTTP to `--host:--port` (127.0.0.1:4318 by default; any other address
needs `--token`). The dashboard runs in the same process, reading the same `Store`, on
127.0.0.1:`--dashboard-port`: it has no authentication of its own, so it never leaves loopback.
Either port may be 0 (a free one); the two startup lines name the ports bound. SIGTERM or Ctrl+C
stops both servers and closes the store. A store that cannot be opened, a port in use or a public
bind without a token stop it before it serves, with one line on stderr and exit status 2; every
port is bound before the store is opened, so a port in use creates no store file.
`--prometheus PORT` also serves the loop metrics of every stored forward for Prometheus to scrape
(`prometheus.LoopMetrics`), on 127.0.0.1 like the dashboard.

With `--parquet DIR` it writes a Parquet store folder instead (`parquet_store`): the requests
that arrive while a commit runs are committed together as one file set (a group commit), each
answered 200 once that set is fsynced and committed, so a SIGKILL loses nothing acknowledged.
Other writers, `serve --parquet` included, may add to the same folder: a forward already there is
stored (and counted in Prometheus) once, whichever receiver a retry reaches. Above
`--compact-above` committed files it compacts the folder in the background while it keeps
receiving.

This module is not: the receiver itself (`receiver`) or the dashboard (`mythos_probe.dashboards`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import sys
import threading

from mythos_probe.cli import CommandError, port_number
from mythos_probe.collectors.otlp_decode import Limits
from mythos_probe.collectors.receiver import DEFAULT_HOST, DEFAULT_MAX_BODY_BYTES, DEFAULT_PORT, Receiver, check_bind
from mythos_probe.collectors.parquet_store import ParquetStore
from mythos_probe.collectors.store import Store

logger = logging.getLogger(__name__)

HELP = "receive OTLP from remote workers, write the store, host the dashboard"
# `--parquet`: every group commit adds a file set (~5 files); past this many files, compact
COMPACT_ABOVE_FILES = 200
PROMETHEUS_PORT = 9464  # the OpenTelemetry Prometheus exporter's registered port (prometheus.DEFAULT_PORT)


def configure(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--store", help="DuckDB file to write (created when missing)")
    target.add_argument("--parquet", metavar="DIR",
                        help="Parquet store folder to add to (created when missing; other writers may share it)")
    parser.add_argument("--compact-above", type=int, metavar="FILES", default=COMPACT_ABOVE_FILES,
                        help="with --parquet, compact the folder in the background when it holds more committed "
                        "files than this (default %(default)s; 0 never)")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address for OTLP/HTTP (default %(default)s)")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                        help="OTLP/HTTP port (default %(default)s, the OTLP/HTTP standard); 0 picks a free one")
    parser.add_argument("--token", default=None, help="ingest token senders pass as `Authorization: Bearer`")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="larger requests get 413 (default %(default)s)")
    parser.add_argument("--dashboard-port", type=port_number, default=8050,
                        help="dashboard port on 127.0.0.1 (default %(default)s); 0 picks a free one")
    parser.add_argument("--no-dashboard", action="store_true", help="only receive and store")
    parser.add_argument("--prometheus", type=port_number, metavar="PORT", default=None,
                        help=f"serve loop metrics for Prometheus on 127.0.0.1:PORT/metrics (default: off; "
                             f"{PROMETHEUS_PORT} is the usual port, 0 picks a free one)")


def _quiet_handler():
    """werkzeug's request handler without a stderr line per request (the live dashboard POSTs a
    callback every two seconds); `--debug` logs them."""
    from werkzeug.serving import WSGIRequestHandler

    class QuietHandler(WSGIRequestHandler):
        def log_request(self, code="-", size="-") -> None:
            logger.debug('"%s" %s %s', self.requestline, code, size)

    return QuietHandler


def bind(host: str, port: int, flag: str = "--port") -> socket.socket:
    """A listening socket on host:port, or a one-line `CommandError` naming `flag` when the port is
    in use. Bound before anything is opened or created, so a port in use leaves nothing behind."""
    try:
        return socket.create_server((host, port))
    except OSError as exc:
        raise CommandError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another {flag}") from None
    except OverflowError:  # a port over 65535 from a caller that skipped `port_number`
        raise CommandError(f"{port} is not a port: use 1 to 65535, or 0 for a free one ({flag})") from None


def wsgi_server(app, host: str = "127.0.0.1", port: int = 0, flag: str = "--port", *, sock: socket.socket | None = None):
    """A threaded werkzeug server for `app` on `sock` (or a socket bound here on host:port), bound
    (so port 0 resolves) but not yet serving. The socket is bound by us: werkzeug would print and
    `sys.exit` on a port in use."""
    from werkzeug.serving import make_server

    sock = sock if sock is not None else bind(host, port, flag)
    host, port = sock.getsockname()[:2]
    with sock:  # werkzeug serves on a duplicate of the descriptor
        return make_server(host, port, app, threaded=True, fd=sock.fileno(), request_handler=_quiet_handler())


def _dashboard(store: Store, sock: socket.socket):
    """The live dashboard's WSGI server on `sock` (127.0.0.1), bound but not yet serving."""
    try:
        from mythos_probe.dashboards.app import create_app
    except ImportError as exc:
        raise CommandError(
            f"the dashboard is not available ({exc}); install mythos-probe[server] or pass --no-dashboard"
        ) from None
    return wsgi_server(create_app(store, live=True).server, sock=sock)


def _metrics(port: int):
    from mythos_probe.collectors.prometheus import LoopMetrics

    try:
        return LoopMetrics(port)
    except OSError as exc:
        raise CommandError(f"cannot serve Prometheus metrics on 127.0.0.1:{port} ({exc.strerror or exc}); "
                           "choose another --prometheus port") from None


def run(args: argparse.Namespace) -> int:
    try:
        check_bind(args.host, args.token)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.ExitStack() as stack:  # whatever was opened is closed, also when a later step fails
        # Every port first: one in use stops serve before it creates a store file or folder.
        otlp_sock = stack.enter_context(bind(args.host, args.port, "--port"))
        dashboard_sock = None if args.no_dashboard else stack.enter_context(
            bind("127.0.0.1", args.dashboard_port, "--dashboard-port"))
        metrics = None if args.prometheus is None else stack.enter_context(_metrics(args.prometheus))
        store = stack.enter_context(
            Store(args.store) if args.store else ParquetStore(args.parquet, compact_above=args.compact_above or None)
        )
        receiver = Receiver(store, args.host, args.port, args.token, limits=Limits(max_body_bytes=args.max_body_bytes),
                            on_stored=None if metrics is None else metrics.record, sock=otlp_sock)
        stack.callback(receiver.stop)
        if metrics is not None:
            metrics.watch(receiver)
        dashboard = None if dashboard_sock is None else _dashboard(store, dashboard_sock)
        receiver.start()
        # Tests and scripts read these lines to learn the ports when they were given as 0.
        print(f"mythos-probe serve: OTLP/HTTP on {receiver.endpoint}/v1/traces, store {store.path}", flush=True)
        if dashboard is not None:
            threading.Thread(target=dashboard.serve_forever, name="dashboard", daemon=True).start()
            stack.callback(dashboard.shutdown)
            print(f"mythos-probe serve: dashboard on http://127.0.0.1:{dashboard.port}", flush=True)
        if metrics is not None:
            print(f"mythos-probe serve: Prometheus metrics on {metrics.url}", flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=HELP)
    configure(parser)
    sys.exit(run(parser.parse_args()))
