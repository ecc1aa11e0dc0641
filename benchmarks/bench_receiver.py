"""Spans/s through the OTLP/HTTP receiver with concurrent senders on loopback.

One run, printed figures; not a test. Usage (from the repo root): .venv/bin/python -m benchmarks.bench_receiver
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

SENDERS, BATCHES, PER_BATCH = 4, 20, 100


def main() -> None:
    for detail in ("summary", "positions"):
        base = make_trace(0, batch=1, seq_len=16, n_loops=8, detail=detail)
        bodies = [
            [
                otlp_body([
                    type(base)(**{**base.__dict__, "trace_id": f"{(k * BATCHES + b) * PER_BATCH + j:032x}", "span_id": f"{j + 1:016x}"})
                    for j in range(PER_BATCH)
                ]).SerializeToString()
                for b in range(BATCHES)
            ]
            for k in range(SENDERS)
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

            threads = [threading.Thread(target=send, args=(k,)) for k in range(SENDERS)]
            start = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            elapsed = time.perf_counter() - start
            n = store.query("SELECT count(*) AS n FROM forwards").n[0]
        total = SENDERS * BATCHES * PER_BATCH
        print(f"{detail:9s}: {SENDERS} senders × {BATCHES} requests × {PER_BATCH} spans = {total:,} spans "
              f"({n:,} stored) in {elapsed:.2f} s = {total / elapsed:,.0f} spans/s")


if __name__ == "__main__":
    main()
