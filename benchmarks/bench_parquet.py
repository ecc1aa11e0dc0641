"""Parquet folder benchmark: dashboard query latency on a folder of many small file sets, before
and after `compact`, against the same forwards in one DuckDB file, interleaved. Not a test.

Builds (once, then reuses, outside the repository) a Parquet store folder written as `--sets`
file sets of `--per-set` forwards each (as many ranks or `serve --parquet` group commits leave
it) and a DuckDB store of the same forwards; copies the folder and compacts the copy in place
(timed). Then, round after round, runs each dashboard query on the three stores in turn and
prints per query the median time and the ratio to the DuckDB file. Target: compacted ≤ 3×.
With `--spacing 86.4` the forwards span ten days (date partitions), and the queries filtered on a
day, the last 24 h or a model read only the files the manifest says may match (partition pruning).

Run from the repository root:
    .venv/bin/python -m benchmarks.bench_parquet [--sets 1000] [--per-set 10] [--spacing 1] [--cache DIR] [--rounds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mythos_probe.collectors.parquet_store import ParquetStore, compact
from mythos_probe.collectors.store import Store
from mythos_probe.dashboards import queries
from mythos_probe.dashboards.queries import Selection
from tests.dashboards.factory import BASE_NS, synthetic_trace

ENDPOINTS = ("/chat", "/code", "/search", "/summarize")


def traces(first: int, n: int, spacing_s: float = 1.0) -> list:
    rng = np.random.default_rng(first)
    return [synthetic_trace(rng, run_id=f"run-{i % 5}", model_id=("mythos-1b", "mythos-3b")[i % 2], step=i // 5,
                            start_ns=BASE_NS + int(i * spacing_s * 10**9), n_loops=16, seq_len=32, n_experts=8,
                            attributes={"endpoint": ENDPOINTS[i % 4], "user": f"user-{i % 10}"})
            for i in range(first, first + n)]


def build(cache: Path, sets: int, per_set: int, spacing_s: float = 1.0) -> None:
    folder, duck = cache / "folder", cache / "store.duckdb"
    if folder.exists() and duck.exists():
        return
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    t0 = time.perf_counter()
    with ParquetStore(folder) as pq_store, Store(duck) as db:
        for s in range(sets):
            batch = traces(s * per_set, per_set, spacing_s)
            pq_store.write_traces(batch)
            db.write_traces(batch)
            print(f"\rwrote {s + 1:,} / {sets:,} file sets", end="", flush=True)
    print(f"\nbuilt {cache} in {time.perf_counter() - t0:.0f} s")


QUERIES = {
    "forward_list": lambda s, t: queries.forward_list(s, Selection(), ["endpoint"]),
    "totals": lambda s, t: queries.totals(s, Selection()),
    "expert_load": lambda s, t: queries.expert_load(s, Selection()),
    "halting_by_iteration": lambda s, t: queries.halting_by_iteration(s, Selection()),
    "tokens_by_iterations_used": lambda s, t: queries.tokens_by_iterations_used(s, Selection(group="run")),
    "cost_by_group": lambda s, t: queries.cost_by_group(s, Selection(group="attr:endpoint")),
    "one forward": lambda s, t: queries.forward(s, t),
    # filtered on the partitions' keys: a Parquet folder opens only the files that may match
    "halting, one day": lambda s, t: queries.halting_by_iteration(s, _day(s)),
    "totals, last 24h": lambda s, t: queries.totals(s, Selection(window="24h")),
    "expert_load, one model, one day": lambda s, t: queries.expert_load(s, dataclasses.replace(_day(s), models=("mythos-3b",))),
    "one forward's iterations": lambda s, t: queries.forward_iterations(s, t, ("rel_residual", "halt_prob")),
}


class Unpruned:
    """A folder read through its full views, every file opened (as before partition pruning)."""

    has_rollups = False

    def __init__(self, store: ParquetStore) -> None:
        self.query = store.query


_DAYS: dict[int, Selection] = {}


def _day(store) -> Selection:
    """The selection of the day in the middle of the store's forwards (the same for every store)."""
    if not _DAYS:
        span = store.query("SELECT min(start_time) AS lo, max(start_time) AS hi FROM forwards")
        mid = (pd.Timestamp(span["lo"][0]) + (pd.Timestamp(span["hi"][0]) - pd.Timestamp(span["lo"][0])) / 2).floor("D")
        _DAYS[0] = Selection(start=mid, end=mid + pd.Timedelta(days=1) - pd.Timedelta(microseconds=1))
    return _DAYS[0]


def timed(fn, store, trace_id) -> float:
    t0 = time.perf_counter()
    fn(store, trace_id)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=int, default=1000)
    parser.add_argument("--per-set", type=int, default=10)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/mythos-probe-bench-parquet"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--spacing", type=float, default=1.0, help="seconds between forwards (86.4: 10,000 over ten days)")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    cache = args.cache / (f"{args.sets}x{args.per_set}" + (f"-{args.spacing:g}s" if args.spacing != 1 else ""))
    build(cache, args.sets, args.per_set, args.spacing)
    compacted = cache / "compacted"
    shutil.rmtree(compacted, ignore_errors=True)
    shutil.copytree(cache / "folder", compacted)
    t0 = time.perf_counter()
    result = compact(compacted, retain_removed_seconds=0)
    print(f"compact: {result['before']:,} committed files → {result['after']:,} in {time.perf_counter() - t0:.1f} s")
    stores = {"duckdb": Store.open_read_only(cache / "store.duckdb"),
              "compacted": ParquetStore.open_read_only(compacted),
              "uncompacted": ParquetStore.open_read_only(cache / "folder")}
    stores["uncompacted, unpruned"] = Unpruned(stores["uncompacted"])
    trace_id = stores["duckdb"].query("SELECT trace_id FROM forwards ORDER BY start_ns LIMIT 1 OFFSET (SELECT count(*) // 2 FROM forwards)")["trace_id"].iloc[0]
    times = {(q, s): [] for q in QUERIES for s in stores}
    for name, fn in QUERIES.items():  # warm: footers cached, views bound, like a second page visit
        for store in stores.values():
            fn(store, trace_id)
    for _ in range(args.rounds):  # interleaved: load on the machine hits every store alike
        for name, fn in QUERIES.items():
            for label, store in stores.items():
                times[name, label].append(timed(fn, store, trace_id))
    print(f"{'query':<34}{'duckdb':>10}{'compacted':>12}{'ratio':>8}{'uncompacted':>14}{'ratio':>8}"
          f"{'unpruned':>12}{'pruned gain':>13}")
    ratios = []
    for name in QUERIES:
        med = {label: statistics.median(times[name, label]) for label in stores}
        ratios.append(med["compacted"] / med["duckdb"])
        print(f"{name:<34}{med['duckdb'] * 1e3:>8.1f}ms{med['compacted'] * 1e3:>10.1f}ms{ratios[-1]:>7.2f}×"
              f"{med['uncompacted'] * 1e3:>12.1f}ms{med['uncompacted'] / med['duckdb']:>7.1f}×"
              f"{med['uncompacted, unpruned'] * 1e3:>10.1f}ms{med['uncompacted, unpruned'] / med['uncompacted']:>12.1f}×")
    print(f"compacted / duckdb: worst {max(ratios):.2f}×, geometric mean {statistics.geometric_mean(ratios):.2f}× (target ≤ 3×)")
    for label in ("compacted", "uncompacted"):
        snapshot = stores[label].snapshot()
        kept = _day(stores["duckdb"]).scoped(stores[label]).keep(snapshot)
        data = [rel for rel, e in snapshot.entries.items() if e["table"] != "spans"]  # spans: not pruned, not read
        print(f"{label}: the one-day selection opens {sum(rel in kept for rel in data):,} of {len(data):,}"
              f" committed files of forwards, iterations, positions and experts")
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    for label, store in stores.items():
        if label != "uncompacted, unpruned":
            store.close()


if __name__ == "__main__":
    main()
