"""What the record's validation (`records.FIELD_CHECKS`) costs on `LoopTrace` construction. Not a test.

Builds the same traces with the checks on and with the field checks switched off (an empty table;
the shape checks of the arrays stay, they were there before), interleaved round by round in one
process, and prints the median time per trace of each and their ratio. Two shapes: a summary
forward as a served decode step records it (batch 8 × 1 position, 16 iterations, every metric)
and a positions forward (batch 8 × 256 × 16, with token text).

Run from the repository root:  .venv/bin/python -m benchmarks.bench_records [--rounds N]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from unittest import mock

from mythos_probe import records
from tests.collectors.factory import make_trace


def per_trace(trace, n: int) -> float:
    fields = {f.name: getattr(trace, f.name) for f in dataclasses.fields(trace)}
    t0 = time.perf_counter()
    for _ in range(n):
        records.LoopTrace(**fields)
    return (time.perf_counter() - t0) / n


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    shapes = {
        "summary 8×1×16": (make_trace(1, detail="summary", batch=8, seq_len=1, n_loops=16), 2000),
        "positions 8×256×16": (make_trace(2, detail="positions", batch=8, seq_len=256, n_loops=16), 50),
    }
    for label, (trace, n) in shapes.items():
        on, off = [], []
        for _ in range(args.rounds):
            on.append(per_trace(trace, n))
            with mock.patch.dict(records.FIELD_CHECKS, clear=True):
                off.append(per_trace(trace, n))
        a, b = statistics.median(on), statistics.median(off)
        print(f"{label}: {a * 1e6:8.1f} µs per trace with the checks, {b * 1e6:8.1f} µs without: "
              f"ratio {a / b:.3f} (+{(a - b) * 1e6:.1f} µs)")


if __name__ == "__main__":
    main()
