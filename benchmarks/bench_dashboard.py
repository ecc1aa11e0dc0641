"""Dashboard query benchmark: how long each view takes to update on a large store. Not a test.

Builds (once, then reuses) a store of synthetic forwards — by default 10,000 forwards of 256
positions and 16 iterations, i.e. ~41M position rows — and times every page's `update` (its SQL
plus figure building, as the Dash callback runs it) unfiltered and with a filter and a grouping.
The target is under half a second per view.

Run from the repository root:  .venv/bin/python -m benchmarks.bench_dashboard [--forwards N] [--store PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np

from mythos_probe.collectors.store import Store
from mythos_probe.dashboards.pages import PAGES
from mythos_probe.dashboards.queries import Selection
from tests.dashboards.factory import BASE_NS, synthetic_trace

ENDPOINTS = ("/chat", "/code", "/search", "/summarize")
PAGE_ARGS = {"forward": ("rel_residual", 0), "spectral": ("time",), "lens": ("kl",), "convergence": ("rel_residual",)}


def kind(i: int) -> str:
    """A serving mix: one forward in ten a full-depth shadow, one in twenty a training forward."""
    return "shadow" if i % 10 == 9 else "training" if i % 20 == 3 else "served"


def build(path: Path, n_forwards: int, batch_size: int = 200) -> None:
    rng = np.random.default_rng(0)
    with Store(path) as store:
        for start in range(0, n_forwards, batch_size):
            store.write_traces(
                dataclasses.replace(synthetic_trace(
                    rng, run_id=f"run-{i % 5}", model_id=("mythos-1b", "mythos-3b")[i % 2], step=i // 5,
                    start_ns=BASE_NS + i * 10**9, n_loops=16, seq_len=256, n_experts=16,
                    attributes={"endpoint": ENDPOINTS[i % 4], "user": f"user-{i % 10}", "request_id": f"req-{i}"},
                    diverged_at=5 if i % 997 == 0 else -1,
                ), kind=kind(i), rank=i % 4, local_rank=i % 4, world_size=4)
                for i in range(start, min(start + batch_size, n_forwards))
            )
            print(f"\rwrote {min(start + batch_size, n_forwards):,} / {n_forwards:,} forwards", end="", flush=True)
    print()


def time_view(page, store, sel: Selection, repeats: int = 3) -> float:
    args = PAGE_ARGS.get(page.__name__.rsplit(".", 1)[1], ())
    page.update(store, sel, "", *args)  # warm DuckDB's caches like a second visit would
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        page.update(store, sel, "", *args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forwards", type=int, default=10_000)
    parser.add_argument("--store", type=Path, default=Path("artifacts/bench_dashboard.duckdb"))
    args = parser.parse_args()
    if not args.store.exists():
        args.store.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        build(args.store, args.forwards)
        print(f"built {args.store} in {time.perf_counter() - t0:.0f} s")
    with Store.open_read_only(args.store) as store:
        counts = store.query("SELECT (SELECT count(*) FROM forwards) AS f, (SELECT count(*) FROM positions) AS p")
        print(f"{int(counts['f'][0]):,} forwards, {int(counts['p'][0]):,} position rows")
        selections = {
            "all": Selection(),
            "endpoint=/chat, 1h, by run": Selection(attribute="endpoint", values=("/chat",), window="1h", group="run"),
        }
        print(f"{'view':<24}" + "".join(f"{name:>30}" for name in selections))
        for page in PAGES:
            row = [time_view(page, store, sel) for sel in selections.values()]
            print(f"{page.TITLE:<24}" + "".join(f"{t * 1000:>28.0f}ms" for t in row))


if __name__ == "__main__":
    main()
