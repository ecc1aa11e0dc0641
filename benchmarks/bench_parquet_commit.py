"""What durable acknowledgement costs: the OTLP receiver writing a Parquet folder (each group of
concurrent requests committed as one fsynced file set before any of them is answered 200, with
compaction above 200 files as `serve --parquet` runs it) against the same receiver writing a
DuckDB file, interleaved, with 4 sender processes. Not a test.

Prints per store the spans/s and the median and 95th percentile time from sending a request to
its 200 (the wait a sender sees), and the Parquet/DuckDB ratios; then the forwards/s of one
in-process writer (`write_traces` of batches of 128, as `to_parquet` / `to_duckdb` do), interleaved.

Run from the repository root:  .venv/bin/python -m benchmarks.bench_parquet_commit [--rounds 3]
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

from mythos_probe.collectors.parquet_store import ParquetStore
from mythos_probe.collectors.receiver import Receiver
from mythos_probe.collectors.serve import COMPACT_ABOVE_FILES
from mythos_probe.collectors.store import Store
from tests.collectors.factory import make_trace
from tests.collectors.test_receiver import otlp_body

SENDERS, REQUESTS, PER_REQUEST = 4, 25, 20


def _send(port: int, bodies: list[bytes], start, out) -> None:
    start.wait()
    con = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    waits = []
    for body in bodies:
        t0 = time.perf_counter()
        con.request("POST", "/v1/traces", body=body, headers={"Content-Type": "application/x-protobuf"})
        resp = con.getresponse()
        resp.read()
        waits.append(time.perf_counter() - t0)
        if resp.status != 200:
            raise SystemExit(f"status {resp.status}")
    con.close()
    out.put(waits)


def bodies(round_: int) -> list[list[bytes]]:
    base = make_trace(0, batch=1, seq_len=16, n_loops=8, detail="summary")
    n = 0
    out = []
    for _ in range(SENDERS):
        mine = []
        for _ in range(REQUESTS):
            mine.append(otlp_body([type(base)(**{**base.__dict__, "trace_id": f"{round_:08x}{n + j:024x}",
                                                 "span_id": f"{j + 1:016x}"}) for j in range(PER_REQUEST)]).SerializeToString())
            n += PER_REQUEST
        out.append(mine)
    return out


def run(store, payload) -> tuple[float, list[float]]:
    receiver = Receiver(store, port=0)
    context = multiprocessing.get_context("fork")
    start, out = context.Barrier(SENDERS + 1), context.Queue()
    procs = [context.Process(target=_send, args=(receiver.port, payload[k], start, out)) for k in range(SENDERS)]
    for proc in procs:
        proc.start()
    with receiver:
        start.wait()
        t0 = time.perf_counter()
        waits = [w for _ in procs for w in out.get()]
        for proc in procs:
            proc.join()
        elapsed = time.perf_counter() - t0
    assert all(proc.exitcode == 0 for proc in procs)
    stored = int(store.query("SELECT count(*) AS n FROM forwards")["n"].iloc[0])
    assert stored == SENDERS * REQUESTS * PER_REQUEST, stored
    return SENDERS * REQUESTS * PER_REQUEST / elapsed, waits


def ingest(rounds: int, tmp: Path) -> None:
    for detail in ("summary", "positions"):
        batches = [[make_trace(1000 * b + i, batch=1, seq_len=64, n_loops=8, detail=detail) for i in range(128)]
                   for b in range(4)]
        rates = {"duckdb": [], "parquet": []}
        for r in range(rounds):
            for label in rates:
                path = tmp / f"ingest-{detail}-{label}-{r}"
                with (Store(f"{path}.duckdb") if label == "duckdb" else ParquetStore(path)) as store:
                    t0 = time.perf_counter()
                    for batch in batches:
                        store.write_traces(batch)
                    rates[label].append(sum(map(len, batches)) / (time.perf_counter() - t0))
        d, p = statistics.median(rates["duckdb"]), statistics.median(rates["parquet"])
        print(f"ingest, {detail} detail (64 positions, batches of 128): duckdb {d:,.0f} forwards/s, "
              f"parquet {p:,.0f} forwards/s ({p / d:.2f}×)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = {"duckdb": ([], []), "parquet": ([], [])}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            payload = bodies(r)
            for label in ("duckdb", "parquet"):  # interleaved, each round on a fresh store
                path = Path(tmp) / f"{label}-{r}"
                with (Store(f"{path}.duckdb") if label == "duckdb" else ParquetStore(path, compact_above=COMPACT_ABOVE_FILES)) as store:
                    rate, waits = run(store, payload)
                results[label][0].append(rate)
                results[label][1].extend(waits)
    summary = {}
    for label, (rates, waits) in results.items():
        waits = sorted(waits)
        summary[label] = (statistics.median(rates), statistics.median(waits), waits[int(0.95 * (len(waits) - 1))])
        print(f"{label:8s}: {summary[label][0]:7,.0f} spans/s; request → 200: median {summary[label][1] * 1e3:6.1f} ms, "
              f"p95 {summary[label][2] * 1e3:6.1f} ms")
    (dr, dm, dp), (pr, pm, pp) = summary["duckdb"], summary["parquet"]
    print(f"parquet / duckdb: throughput {pr / dr:.2f}×, median wait {pm / dm:.2f}×, p95 wait {pp / dp:.2f}× "
          f"({SENDERS} senders × {REQUESTS} requests × {PER_REQUEST} summary spans, {args.rounds} rounds)")
    with tempfile.TemporaryDirectory() as tmp:
        ingest(args.rounds, Path(tmp))


if __name__ == "__main__":
    main()
