"""Forwards/s into the DuckDB store (with its rollups), this checkout against a baseline revision.

The workload is `scale_store`'s serving-shaped one (99 % summary forwards, 1 % with positions),
written with `Store.write_traces` in batches of 500 into a fresh store file, as `mythos-probe serve`
or an in-process sink writes it; trace generation is not timed. Each round runs this checkout and
the baseline (default: 81a9b7a, the main branch before batch-columnar ingest), each in its own
interpreter (`benchmarks.baseline`), alternately. Printed per side: the median forwards/s over the
rounds by the wall clock and per CPU second of the process (DuckDB's threads included: on a
machine shared with other work the wall clock measures the load as much as the code), and the
ratios. Not a test.

Usage (repository root): .venv/bin/python -m benchmarks.bench_ingest [--forwards 10000] [--rounds 3] [--baseline REV]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import baseline


def rate(n: int, batch: int) -> list[float]:
    """[forwards/s by the wall clock, forwards per CPU second] ingesting `n` forwards in batches of `batch`."""
    from benchmarks import scale_store
    from mythos_probe.collectors.store import Store

    traces = list(scale_store.forwards(n, start=1))
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "s.duckdb")
        t0, cpu0 = time.perf_counter(), time.process_time()
        for k in range(0, n, batch):
            store.write_traces(traces[k:k + batch])
        store.close()  # the close's work (the rollups' last compaction) counts
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        count = Store.open_read_only(Path(tmp) / "s.duckdb")
        stored = int(count.query("SELECT count(*) AS n FROM forwards")["n"][0])
        count.close()
    assert stored == n, (stored, n)
    return [n / wall, n / cpu]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forwards", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", default="81a9b7a", help="git revision to compare with")
    args = parser.parse_args()
    tree = baseline.checkout(args.baseline)
    try:
        sides = {"this checkout": None, f"baseline {args.baseline}": tree}
        rates: dict[str, list[list[float]]] = {side: [] for side in sides}
        loads = []
        for k in range(args.rounds):
            for side, where in (sides.items() if k % 2 == 0 else reversed(sides.items())):
                rates[side].append(baseline.call(where, "benchmarks.bench_ingest:rate", args.forwards, args.batch))
                loads.append(os.getloadavg()[0])
                print(f"  round {k + 1} {side}: {rates[side][-1][0]:,.0f} forwards/s, {rates[side][-1][1]:,.0f} per CPU s"
                      f" (load {loads[-1]:.1f})", flush=True)
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    (new_wall, new_cpu), (old_wall, old_cpu) = ([statistics.median(r[i] for r in rates[s]) for i in (0, 1)] for s in sides)
    print(f"ingest of {args.forwards:,} forwards in batches of {args.batch}, median of {args.rounds} interleaved rounds, "
          f"load {min(loads):.1f}–{max(loads):.1f} on {os.cpu_count()} CPUs:")
    print(f"  this checkout : {new_wall:,.0f} forwards/s ({new_cpu:,.0f} per CPU second)")
    print(f"  baseline      : {old_wall:,.0f} forwards/s ({old_cpu:,.0f} per CPU second)")
    print(f"  ratio         : {new_wall / old_wall:.2f}x by the wall clock, {new_cpu / old_cpu:.2f}x per CPU second")


if __name__ == "__main__":
    main()
