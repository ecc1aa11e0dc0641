"""What a live reader costs the writer: ingest rate of the OTLP receiver with and without a reader
process replicating the store through serve's read API (`collectors.remote.RemoteStore`, as
`mythos-probe dashboard http://…` and `connect(url)` do), interleaved in one run.

One run, printed figures; not a test. Usage (from the repo root): .venv/bin/python -m benchmarks.bench_read_api
Each round: 4 sender processes post protobuf requests of forward spans (positions detail, batch 1
× 16 positions, 8 loops) as in bench_receiver; in the "reader" rounds one more process queries a
replica every 0.25 s, syncing at most once a second (as the dashboard does), or syncs in a tight
loop (refresh 0 s: the worst case) until the senders are done, then catches up. Printed: spans/s of
each round, the median ratio reader/no reader, and how long the reader took to hold every forward
once the senders finished.
"""

from __future__ import annotations

import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.bench_receiver import SENDERS, _send
from mythos_probe.collectors.receiver import Receiver
from mythos_probe.collectors.store import Store
from tests.collectors.factory import make_trace
from tests.collectors.test_receiver import otlp_body

REQUESTS, PER_REQUEST, ROUNDS = 10, 25, 3


def _read(endpoint: str, start, done, total: int, result, refresh_s: float) -> None:
    from mythos_probe.collectors.remote import RemoteStore

    replica = RemoteStore(endpoint, refresh_s=refresh_s)
    start.wait()
    syncs = 0
    while not done.is_set():  # as the dashboard: a query, which syncs when refresh_s has passed
        replica.query("SELECT count(*) FROM forwards")
        syncs += 1
        if refresh_s:
            time.sleep(0.25)  # a page's views query every 2 s; four times that, to be safe
    t0 = time.perf_counter()
    while replica.max_forward_id < total:
        replica.sync()
    result.put((time.perf_counter() - t0, syncs, len(replica.frame("forwards"))))


def run(refresh_s: float | None, offset: int) -> tuple[float, tuple | None]:
    with_reader = refresh_s is not None
    base = make_trace(0, batch=1, seq_len=16, n_loops=8, detail="positions")
    bodies = [[otlp_body([type(base)(**{**base.__dict__, "trace_id": f"{offset + (k * REQUESTS + b) * PER_REQUEST + j:032x}",
                                         "span_id": f"{j + 1:016x}"}) for j in range(PER_REQUEST)]).SerializeToString()
               for b in range(REQUESTS)] for k in range(SENDERS)]
    total = SENDERS * REQUESTS * PER_REQUEST
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "s.duckdb") as store:
        receiver = Receiver(store, port=0)
        start = context.Barrier(SENDERS + 1 + with_reader)
        done, result = context.Event(), context.Queue()
        procs = [context.Process(target=_send, args=(receiver.port, bodies[k], start)) for k in range(SENDERS)]
        reader = context.Process(target=_read, args=(receiver.endpoint, start, done, total, result, refresh_s)) if with_reader else None
        with receiver:
            for proc in procs + ([reader] if reader else []):
                proc.start()
            start.wait()
            t0 = time.perf_counter()
            for proc in procs:
                proc.join()
            elapsed = time.perf_counter() - t0
            done.set()
            read = result.get(timeout=300) if reader else None
            if reader:
                reader.join()
        assert all(p.exitcode == 0 for p in procs)
        assert store.query("SELECT count(*) AS n FROM forwards").n[0] == total
    if read is not None:
        assert read[2] == total, read  # the replica holds every forward once
    return total / elapsed, read


CASES = (None, 1.0, 0.0)  # no reader; a dashboard-like reader (a query every 0.25 s, a sync at most
# once a second); a reader syncing continuously


def main() -> None:
    rates: dict[float | None, list[float]] = {case: [] for case in CASES}
    for r in range(ROUNDS):
        for i, case in enumerate(CASES):
            rate, read = run(case, offset=(len(CASES) * r + i) * 10**9)
            rates[case].append(rate)
            extra = f"; {read[1]} reads during ingest, caught up {read[0] * 1000:.0f} ms after" if read else ""
            name = "no reader" if case is None else f"reader, refresh {case:g} s"
            print(f"round {r + 1} {name:22s}: {rate:,.0f} spans/s{extra}")
    for case in CASES[1:]:
        ratio = statistics.median(w / wo for w, wo in zip(rates[case], rates[None]))
        print(f"ingest with a reader (refresh {case:g} s) / without: {ratio:.2f} (median of {ROUNDS} interleaved rounds)")


if __name__ == "__main__":
    main()
