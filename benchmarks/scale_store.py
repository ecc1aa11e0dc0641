"""A serving-shaped synthetic store of N forwards, built once and cached outside the repository.

Not a test and not a benchmark by itself: `bench_scale` times the dashboard on it. The workload is
what a deployment at a million forwards looks like, not the dashboard benchmark's all-positions
store (which at 1M forwards would hold billions of position rows):
- batch 1 × 64 tokens, 6 / 8 / 12 loop iterations, 8 routed experts;
- 99 % served / training forwards at detail "summary" (forward, iteration and expert rows);
- 1 % full-depth shadows at detail "positions" (64 × iterations position rows, lens on the last
  position), which the what-if replays;
- 5 runs, 2 models, 4 ranks, 4 endpoints, one forward per second (1M forwards span 11.6 days).

Traces are drawn from a pool of synthetic traces (tests/dashboards/factory.py) and given fresh
identities, times and labels, so building is bound by the store's ingest, not by numpy.

Usage: .venv/bin/python -m benchmarks.scale_store --forwards 100000 --store /work/cache/mythos-probe/scale-100k.duckdb
       .venv/bin/python -m benchmarks.scale_store --forwards 1000000 --store /work/cache/mythos-probe/scale-1m.duckdb \
           --copies-of /work/cache/mythos-probe/scale-100k.duckdb
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from mythos_probe.collectors.store import Store
from mythos_probe.records import LoopTrace
from tests.dashboards.factory import BASE_NS, synthetic_trace

ENDPOINTS = ("/chat", "/code", "/search", "/summarize")
POOL = 512
SHADOW_EVERY = 100


def _pool(seed: int = 0) -> tuple[list[LoopTrace], list[LoopTrace]]:
    rng = np.random.default_rng(seed)
    summary, shadows = [], []
    for k in range(POOL):
        t = synthetic_trace(rng, n_loops=(6, 8, 12)[k % 3], seq_len=64, n_experts=8,
                            diverged_at=3 if k % 97 == 0 else -1)
        shadows.append(dataclasses.replace(t, exit_policy="fixed"))
        summary.append(dataclasses.replace(t, detail="summary", position_metrics={}, position_iterations=None,
                                           token_ids=None, token_text=None))
    return summary, shadows


def forwards(n: int, start: int = 0, seed: int = 0) -> Iterator[LoopTrace]:
    """Forward number `start` … `start + n - 1` of the workload (the same forward for the same number)."""
    summary, shadows = _pool(seed)
    for i in range(start, start + n):
        shadow = i % SHADOW_EVERY == SHADOW_EVERY - 1
        base = (shadows if shadow else summary)[(i * 7919) % POOL]
        yield dataclasses.replace(
            base, trace_id=f"{i * 2654435761 % (1 << 64) or 1:016x}{i:016x}", span_id=f"{i + 1:016x}",
            run_id=f"run-{i % 5}", model_id=("mythos-1b", "mythos-3b")[i % 2], step=i // 20,
            start_ns=BASE_NS + i * 10**9, end_ns=BASE_NS + i * 10**9 + (base.end_ns - base.start_ns),
            kind="shadow" if shadow else "training" if i % 20 == 3 else "served",
            rank=i % 4, local_rank=i % 4, world_size=4,
            attributes={"endpoint": ENDPOINTS[i % 4], "user": f"user-{i % 10}"},
        )


def build(path: Path, n: int, batch: int = 500, quiet: bool = False) -> float:
    """Write forwards 0 … n-1 into a new store at `path` in batches of `batch`; returns forwards/s
    (the store's ingest, trace generation excluded)."""
    spent = 0.0
    with Store(path) as store:
        have = int(store.query("SELECT count(*) AS n FROM forwards")["n"][0])
        it = forwards(n - have, start=have)
        done = have
        while done < n:
            chunk = [next(it) for _ in range(min(batch, n - done))]
            t0 = time.perf_counter()
            store.write_traces(chunk)
            spent += time.perf_counter() - t0
            done += len(chunk)
            if not quiet:
                print(f"\rwrote {done:,} / {n:,} forwards ({(done - have) / spent:,.0f}/s)", end="", flush=True)
    if not quiet:
        print()
    return (n - have) / spent if spent else float("nan")


def replicate(source: Path, path: Path, times: int) -> None:
    """`path` := `times` copies of the store at `source` laid end to end in time, with fresh trace
    ids and forward numbers, then its rollups rebuilt from the raw rows (the migration's backfill).

    Copy k of forward i is forward i + k·N of the same workload in every label the views read
    (run, model, rank, kind, endpoint repeat with periods dividing N); only its trace id prefix and
    its pool draw differ. This is how the 1M store is made in minutes rather than the ~10 minutes of
    ingest it would take on an idle 2-core machine (ingest is measured by `bench_scale`)."""
    import duckdb

    from mythos_probe.collectors import rollups

    shutil.copyfile(source, path)
    con = duckdb.connect(str(path))
    n = con.execute("SELECT max(forward_id) FROM forwards").fetchall()[0][0]
    assert n % 100 == 0 and con.execute("SELECT count(*) FROM forwards").fetchall()[0][0] == n, "source must hold forwards 1..N"

    def moved(table: str, k: int) -> str:
        new_id = f"(forward_id + {k * n})"
        trace = f"left(trace_id, 16) || printf('%016x', {new_id} - 1)"
        extra = {
            "forwards": f", {trace} AS trace_id, start_ns + {k * n}::BIGINT * 1000000000 AS start_ns,"
                        f" end_ns + {k * n}::BIGINT * 1000000000 AS end_ns,"
                        f" start_time + to_seconds({k * n}) AS start_time, step + {k * n // 20} AS step",
        }.get(table, f", {trace} AS trace_id")
        return f"SELECT * REPLACE ({new_id} AS forward_id{extra}) FROM {table} WHERE forward_id <= {n}"

    for k in range(1, times):
        con.execute("BEGIN TRANSACTION")
        for table in ("forwards", "iterations", "positions", "experts"):
            con.execute(f"INSERT INTO {table} {moved(table, k)}")
        con.execute(
            "INSERT INTO spans SELECT s.* REPLACE (f2.trace_id AS trace_id, s.start_ns + f2.start_ns - f.start_ns AS start_ns,"
            " s.end_ns + f2.start_ns - f.start_ns AS end_ns) FROM spans s JOIN forwards f USING (trace_id, span_id)"
            f" JOIN forwards f2 ON f2.forward_id = f.forward_id + {k * n} WHERE f.forward_id <= {n}"
        )
        con.execute("COMMIT")
        print(f"copy {k + 1} / {times}", flush=True)
    con.close()
    with Store(path):  # migrates: the rollups' backfill runs over every copy
        pass
    con = duckdb.connect(str(path))
    for statement in rollups.MIGRATION:  # a store migrated before the copies holds the source's only
        con.execute(statement)
    con.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forwards", type=int, default=1_000_000)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--copies-of", type=Path, help="make the store as copies of this smaller one (see `replicate`)")
    args = parser.parse_args()
    args.store.parent.mkdir(parents=True, exist_ok=True)
    if args.copies_of:
        with Store.open_read_only(args.copies_of) as small:
            have = int(small.query("SELECT count(*) AS n FROM forwards")["n"][0])
        replicate(args.copies_of, args.store, args.forwards // have)
        print(f"{args.store}: {args.forwards:,} forwards ({args.forwards // have} copies of {args.copies_of})")
        return
    rate = build(args.store, args.forwards)
    print(f"{args.store}: {args.forwards:,} forwards, ingest {rate:,.0f} forwards/s")


if __name__ == "__main__":
    main()
