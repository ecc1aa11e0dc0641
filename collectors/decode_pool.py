"""Decoding OTLP request bodies in worker processes, so that concurrent senders decode in parallel.

The receiver's handler threads share one interpreter: decoding a forward span into its LoopTrace
and `spans` row is ~0.3 ms of Python, so threads alone cap a receiver near one core whatever the
number of senders. `DecodePool.decode` runs the same `otlp_decode.decode_body`
(every check and limit unchanged) in a worker process and returns its result, or raises the
`ValueError` it raised (TooLarge, Unsupported and plain ValueError pickle as themselves). The
handler thread waits without holding the GIL, and commits as before. `decode_batch` also builds
the request's table columns in the worker (`rows.Batch`): what crosses back is a few Arrow
buffers, not every record's arrays pickled one by one, and the writer has less left to do.

Workers are forked from a forkserver (never from the threaded server itself), started on first use
and shared by every receiver of the process. A worker that dies (killed, out of memory) breaks the
pool: that request is decoded in the handler thread and the next one starts a fresh pool, so a
crash costs speed, never a request. With `workers=0` everything decodes in the handler thread.

This module is not: the decoder (`otlp_decode`) or the HTTP server (`receiver`).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from mythos_probe.collectors import otlp_decode
from mythos_probe.collectors.otlp_decode import Limits
from mythos_probe.collectors.rows import Batch
from mythos_probe.records import LoopTrace


def decode_body(body: bytes, content_type: str, gzipped: bool, limits: Limits) -> tuple[list[LoopTrace], list[dict]]:
    """A request body → (forwards, span rows), exactly as the receiver decodes it inline."""
    if gzipped:
        body = otlp_decode.gunzip(body, limits.max_body_bytes)
    return otlp_decode.decode_body(body, content_type, limits)


def decode_batch(body: bytes, content_type: str, gzipped: bool, limits: Limits, keep_traces: bool) -> Batch:
    """As `decode_body`, with the forwards and span rows built into their tables here (`rows.Batch`):
    Arrow columns cross back to the receiver, not a few thousand small arrays per request."""
    traces, span_rows = decode_body(body, content_type, gzipped, limits)
    return Batch.of(traces, span_rows, keep_traces)


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers() -> int:
    """One worker per core the process may use, up to 4 (the gain stops where the commit, which
    stays in the receiver, becomes the bottleneck); none on a single core."""
    n = cores()
    return 0 if n < 2 else min(n, 4)


class DecodePool:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload(["mythos_probe.collectors.decode_pool"])
                self._pool = ProcessPoolExecutor(self.workers, mp_context=context)
            return self._pool

    def decode(self, body: bytes, content_type: str, gzipped: bool, limits: Limits):
        return self._run(decode_body, body, content_type, gzipped, limits)

    def decode_batch(self, body: bytes, content_type: str, gzipped: bool, limits: Limits, keep_traces: bool) -> Batch:
        return self._run(decode_batch, body, content_type, gzipped, limits, keep_traces)

    def _run(self, function, *args):
        if self.workers <= 0:
            return function(*args)
        pool = self._executor()
        try:
            return pool.submit(function, *args).result()
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:
                    self._pool = None  # the next request starts a fresh pool
            pool.shutdown(wait=False, cancel_futures=True)
            return function(*args)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


_shared: dict[int, DecodePool] = {}
_shared_lock = threading.Lock()


def shared(workers: int) -> DecodePool:
    """The process's pool of `workers` workers (receivers share it; tests start it once)."""
    with _shared_lock:
        if workers not in _shared:
            _shared[workers] = DecodePool(workers)
        return _shared[workers]
