"""Spans/s through the OTLP/HTTP receiver with concurrent senders on loopback.

One run, printed figures; not a test. Usage (from the repo root): .venv/bin/python -m benchmarks.bench_receiver
Each line: 1, 2 or 4 sender processes (as remote workers are; sender threads would share the receiver's
GIL) each posting protobuf requests of forward spans (batch 1 × 16 positions, 8 loops) over one
keep-alive connection; the clock runs from their common start until every request is answered
(200) and committed. Each line compares this checkout's receiver with a baseline revision's
(default 81a9b7a, before batch-columnar ingest), each run in its own interpreter
(`benchmarks.baseline`), alternating round by round.
"""

from __future__ import annotations

import http.client
import os
import multiprocessing
import tempfile
import time
from pathlib import Path

from mythos_probe.collectors.receiver import Receiver
from mythos_probe.collectors.store import Store
from tests.collectors.factory import make_trace
from tests.collectors.test_receiver import otlp_body

SENDERS = 4
CASES = (("summary", 20, 100), ("summary", 25, 1), ("positions", 20, 100))  # detail, requests per sender, spans per request


def _send(port: int, bodies: list[bytes], start) -> None:
    start.wait()
    con = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for body in bodies:
        con.request("POST", "/v1/traces", body=body, headers={"Content-Type": "application/x-protobuf"})
        resp = con.getresponse()
        resp.read()
        if resp.status != 200:
            raise SystemExit(f"status {resp.status}")
    con.close()


def _cpu_seconds(pids) -> float:
    """User + system CPU seconds the processes `pids` have used (Linux /proc)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _package_file() -> str:
    import mythos_probe.collectors

    return mythos_probe.collectors.__file__


def _same_code_in_the_workers(receiver: Receiver) -> None:
    """Raises unless the decode workers import the package this process does: they start from a
    forkserver, a fresh interpreter, so a baseline must reach them too (`benchmarks.baseline`)."""
    pool = receiver.decoder._pool
    if pool is not None:
        theirs = pool.submit(_package_file).result()
        if theirs != _package_file():
            raise RuntimeError(f"the decode workers import {theirs}, this process {_package_file()}")


CPU: dict[str, float] = {}  # the last run's receiver CPU µs per span: "main" (this process), "workers"


def run(detail: str, requests: int, per_request: int, senders: int = SENDERS, decode_workers: int | None = None) -> float:
    """Spans/s for `senders` processes each posting `requests` requests of `per_request` spans;
    the receiver's CPU time per span lands in `CPU` (on a loaded machine wall time hides what
    parallel decoding saves; CPU time per span does not)."""
    base = make_trace(0, batch=1, seq_len=16, n_loops=8, detail=detail)
    bodies = [
        [
            otlp_body([
                type(base)(**{**base.__dict__, "trace_id": f"{(k * requests + b) * per_request + j + 1:032x}",
                              "span_id": f"{j + 1:016x}"})
                for j in range(per_request)
            ]).SerializeToString()
            for b in range(requests)
        ]
        for k in range(senders)
    ]
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "s.duckdb") as store:
        receiver = Receiver(store, port=0, decode_workers=decode_workers)  # bound, so the forked senders know the port
        receiver.decoder.decode(bodies[0][0], "application/x-protobuf", False, receiver.limits)  # workers started
        _same_code_in_the_workers(receiver)
        # fork: the senders need only http.client and their bodies, already in memory
        context = multiprocessing.get_context("fork")
        start = context.Barrier(senders + 1)
        procs = [context.Process(target=_send, args=(receiver.port, bodies[k], start)) for k in range(senders)]
        for proc in procs:
            proc.start()
        pool = receiver.decoder._pool

        def workers() -> dict[int, float]:  # the pool starts workers as requests arrive: read them all
            return {pid: _cpu_seconds([pid]) for pid in list(pool._processes)} if pool is not None else {}

        with receiver:
            start.wait()
            t0, main0, workers0 = time.perf_counter(), time.process_time(), workers()
            for proc in procs:
                proc.join()
            elapsed = time.perf_counter() - t0
            main_s = time.process_time() - main0
            workers_s = sum(cpu - workers0.get(pid, 0.0) for pid, cpu in workers().items())
        assert all(proc.exitcode == 0 for proc in procs), [proc.exitcode for proc in procs]
        stored = store.query("SELECT count(*) AS n FROM forwards").n[0]
    total = senders * requests * per_request
    assert stored == total, (stored, total)
    CPU.update(main=main_s / total * 1e6, workers=workers_s / total * 1e6)
    return total / elapsed


def rate(detail: str, requests: int, per_request: int, senders: int) -> list[float]:
    """[spans/s, receiver CPU µs per span (its process and its decode workers)] of one `run`."""
    spans_s = run(detail, requests, per_request, senders)
    return [spans_s, CPU["main"] + CPU["workers"]]


def main() -> None:
    import argparse
    import shutil
    import statistics

    from benchmarks import baseline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10, help="requests per sender (100 summary spans each)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--senders", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--baseline", default="81a9b7a", help="git revision to compare with")
    args = parser.parse_args()
    tree = baseline.checkout(args.baseline)
    sides = {"this checkout": None, f"baseline {args.baseline}": tree}
    try:
        for senders in args.senders:
            rates: dict[str, list[list[float]]] = {side: [] for side in sides}
            loads = []
            for k in range(args.rounds):  # interleaved, each side in a fresh interpreter, so that a load spike hits both
                for side, where in (sides.items() if k % 2 == 0 else reversed(sides.items())):
                    rates[side].append(baseline.call(where, "benchmarks.bench_receiver:rate", "summary", args.requests,
                                                     100, senders))
                    loads.append(os.getloadavg()[0])
            (new, new_cpu), (old, old_cpu) = ([statistics.median(r[i] for r in rates[s]) for i in (0, 1)] for s in sides)
            print(f"{senders} sender(s) × {args.requests} requests × 100 summary spans, median of {args.rounds} rounds: "
                  f"{new:,.0f} spans/s against {old:,.0f} for {args.baseline} ({new / old:.2f}x); receiver CPU per span "
                  f"{new_cpu:,.0f} µs against {old_cpu:,.0f} ({old_cpu / new_cpu:.2f}x less); "
                  f"load {min(loads):.1f}–{max(loads):.1f} on {os.cpu_count()} CPUs", flush=True)
    finally:
        shutil.rmtree(tree, ignore_errors=True)


if __name__ == "__main__":
    main()
