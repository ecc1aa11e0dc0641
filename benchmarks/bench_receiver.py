"""Spans/s through the OTLP/HTTP receiver with concurrent senders on loopback.

One run, printed figures; not a test. Usage (from the repo root): .venv/bin/python -m benchmarks.bench_receiver
Each line: 4 senders each posting protobuf requests of `per request` forward spans (batch 1 × 16
positions, 8 loops) over one keep-alive connection; the clock covers every request answered (200)
and committed.
"""

from __future__ import annotations

import http.client
import tempfile
import threading
import time
from pathlib import Path

from mythos_probe.collectors.receiver import Receiver
from mythos_probe.collectors.store import Store
from tests.collectors.factory import make_trace
from tests.collectors.test_receiver import otlp_body

SENDERS = 4
CASES = (("summary", 20, 100), ("summary", 25, 1), ("positions", 20, 100))  # detail, requests per sender, spans per request


def run(detail: str, requests: int, per_request: int, senders: int = SENDERS) -> float:
    """Spans/s for `senders` threads each posting `requests` requests of `per_request` spans."""
    base = make_trace(0, batch=1, seq_len=16, n_loops=8, detail=detail)
    bodies = [
        [
            otlp_body([
                type(base)(**{**base.__dict__, "trace_id": f"{(k * requests + b) * per_request + j:032x}",
                              "span_id": f"{j + 1:016x}"})
                for j in range(per_request)
            ]).SerializeToString()
            for b in range(requests)
        ]
        for k in range(senders)
    ]
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "s.duckdb") as store, Receiver(store, port=0) as rx:

        def send(k: int) -> None:
            con = http.client.HTTPConnection(rx.host, rx.port, timeout=60)
            for body in bodies[k]:
                con.request("POST", "/v1/traces", body=body, headers={"Content-Type": "application/x-protobuf"})
                resp = con.getresponse()
                resp.read()
                assert resp.status == 200, resp.status
            con.close()

        threads = [threading.Thread(target=send, args=(k,)) for k in range(senders)]
        start = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        elapsed = time.perf_counter() - start
        stored = store.query("SELECT count(*) AS n FROM forwards").n[0]
    total = senders * requests * per_request
    assert stored == total, (stored, total)
    return total / elapsed


def main() -> None:
    for detail, requests, per_request in CASES:
        rate = run(detail, requests, per_request)
        print(f"{detail:9s}: {SENDERS} senders × {requests} requests × {per_request:3d} spans: "
              f"{rate:,.0f} spans/s ({rate / per_request:,.0f} requests/s)")


if __name__ == "__main__":
    main()
