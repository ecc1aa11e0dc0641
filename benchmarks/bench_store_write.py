"""One receiver commit (100 new forwards) into a store that already holds N forwards.

One run, printed figures; not a test. Usage (from the repo root):
    .venv/bin/python -m benchmarks.bench_store_write [--forwards 100000] [--writes 8] [--rounds 2] [--baseline REV]
The store is a copy of the serving-shaped store `benchmarks.scale_store` builds and caches (default
/work/cache/mythos-probe/scale-<N/1000>k.duckdb, built if missing). Each write is one
`Store.write_batch` of a decoded 100-span request, as the receiver commits it; the first write of a
process is reported apart (it reads the stored keys, `known_keys`). Each line compares this checkout
with a baseline revision, each side in its own interpreter (`benchmarks.baseline`), alternating.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("MYTHOS_PROBE_CACHE", "/work/cache/mythos-probe"))


def write_ms(source: str, writes: int) -> list[float]:
    """[median wall ms, median CPU ms of the writes after the first, the first write's wall ms]."""
    from mythos_probe.collectors import decode_pool, otlp_decode
    from mythos_probe.collectors.otlp_decode import Limits
    from mythos_probe.collectors.store import Store
    from tests.collectors.factory import make_trace
    from tests.collectors.test_receiver import otlp_body

    base = make_trace(0, batch=1, seq_len=16, n_loops=8, detail="summary")
    batches = []
    for b in range(writes):  # fresh keys, none of them stored
        body = otlp_body([type(base)(**{**base.__dict__, "trace_id": f"{0xbe00 + b * 100 + j:032x}",
                                        "span_id": f"{j + 1:016x}"}) for j in range(100)]).SerializeToString()
        batches.append(decode_pool.decode_batch(body, otlp_decode.PROTOBUF, False, Limits(), False))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.duckdb"
        shutil.copy(source, path)
        walls, cpus = [], []
        with Store(path) as store:
            for batch in batches:
                t0, c0 = time.perf_counter(), time.process_time()
                kept = store.write_batch(batch)
                walls.append((time.perf_counter() - t0) * 1e3)
                cpus.append((time.process_time() - c0) * 1e3)
                assert len(kept) == 100
    return [statistics.median(walls[1:]), statistics.median(cpus[1:]), walls[0]]


def main() -> None:
    import argparse

    from benchmarks import baseline, scale_store

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forwards", type=int, default=100_000, help="forwards the store holds before the writes")
    parser.add_argument("--writes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", default="d25d050", help="git revision to compare with")
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args()
    source = args.cache / f"scale-{args.forwards // 1000}k.duckdb"
    if not source.exists():
        source.parent.mkdir(parents=True, exist_ok=True)
        scale_store.build(source, args.forwards)
    tree = baseline.checkout(args.baseline)
    sides = {"this checkout": None, f"baseline {args.baseline}": tree}
    results: dict[str, list[list[float]]] = {side: [] for side in sides}
    loads = []
    try:
        for k in range(args.rounds):
            for side, where in (sides.items() if k % 2 == 0 else reversed(sides.items())):
                results[side].append(baseline.call(where, "benchmarks.bench_store_write:write_ms", str(source), args.writes))
                loads.append(os.getloadavg()[0])
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    (new_wall, new_cpu, new_first), (old_wall, old_cpu, old_first) = (
        [statistics.median(r[i] for r in results[s]) for i in range(3)] for s in sides)
    print(f"100-forward writes into a store of {args.forwards:,} forwards, median of {args.rounds} rounds × "
          f"{args.writes - 1} writes: {new_wall:,.0f} ms wall, {new_cpu:,.0f} ms CPU against {old_wall:,.0f} / "
          f"{old_cpu:,.0f} for {args.baseline} ({old_wall / new_wall:.2f}x / {old_cpu / new_cpu:.2f}x less); first write "
          f"{new_first:,.0f} ms against {old_first:,.0f}; load {min(loads):.1f}–{max(loads):.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
