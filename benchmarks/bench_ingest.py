"""Rows/s into the positions table: the Arrow path (`Store.write_traces`) vs row-by-row inserts.

One run, printed figures and their ratio; not a test. Usage (from the repo root): .venv/bin/python -m benchmarks.bench_ingest
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from mythos_probe.collectors.rows import positions_table
from mythos_probe.collectors.schema import TABLES
from mythos_probe.collectors.store import Store
from tests.collectors.factory import make_trace


def main() -> None:
    # 16 forwards of 4 × 512 positions × ≤16 iterations: ~0.5M position rows
    traces = [make_trace(i, batch=4, seq_len=512, n_loops=16) for i in range(16)]
    rows = sum(t.batch * t.seq_len * t.iterations for t in traces)
    with tempfile.TemporaryDirectory() as tmp:
        with Store(Path(tmp) / "arrow.duckdb") as store:
            start = time.perf_counter()
            store.write_traces(traces)
            arrow_s = time.perf_counter() - start
        sample = positions_table(traces[:1], 1).slice(0, 2_000).to_pylist()
        with Store(Path(tmp) / "rows.duckdb") as store:
            cols = [c for c, _ in TABLES["positions"]]
            sql = f"INSERT INTO positions ({', '.join(repr(c).replace(chr(39), chr(34)) for c in cols)}) VALUES ({', '.join('?' * len(cols))})"
            cur = store._cursor()
            start = time.perf_counter()
            cur.execute("BEGIN TRANSACTION")
            cur.executemany(sql, [[r[c] for c in cols] for r in sample])
            cur.execute("COMMIT")
            row_s = time.perf_counter() - start
    arrow_rate, row_rate = rows / arrow_s, len(sample) / row_s
    print(f"arrow path : {rows:,} position rows (+ forwards, iterations, experts, spans) in {arrow_s:.2f} s = {arrow_rate:,.0f} rows/s")
    print(f"row by row : {len(sample):,} rows in {row_s:.2f} s = {row_rate:,.0f} rows/s")
    print(f"ratio      : {arrow_rate / row_rate:,.0f}x")


if __name__ == "__main__":
    main()
