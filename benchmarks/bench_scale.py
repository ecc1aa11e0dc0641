"""The dashboard at 100k and 1M forwards: every page's update with rollups against raw rows, the
what-if over a new range, and ingest with and without keeping rollups. Not a test.

Stores: `benchmarks.scale_store` (serving-shaped: 99 % summary forwards, 1 % full-depth shadows
with positions), built once and cached outside the repository (default /work/cache/mythos-probe;
built on first use, the 1M one as ten copies of the 100k one). Each page's `update` (its SQL and
figure building, as its Dash callback runs it) is timed on the store with rollups and on the same
store read through its raw rows (as a store without rollups would be), interleaved, median of
three after a warm-up; the what-if is timed uncached over a range no earlier call used.

Usage (repository root): .venv/bin/python -m benchmarks.bench_scale [--sizes 100000 1000000] [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd

from benchmarks import scale_store
from mythos_probe.collectors import rollups
from mythos_probe.collectors import store as store_module
from mythos_probe.collectors.store import Store
from mythos_probe.dashboards import queries, whatif
from mythos_probe.dashboards.pages import PAGES, lens
from mythos_probe.dashboards.queries import Selection
from tests.dashboards.factory import BASE_NS

PAGE_ARGS = {"forward": ("rel_residual", 0), "spectral": ("time",), "lens": ("kl",), "convergence": ("rel_residual",)}


class Raw:
    """The store read through its raw rows only (the views' path without rollups)."""

    has_rollups = False

    def __init__(self, store: Store) -> None:
        self.query = store.query


def _time(fn, repeats: int = 3) -> float:
    fn()  # warm DuckDB's caches, as a second visit would
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _update(page, store, sel):
    def run():
        lens._cache.clear()  # the what-if uncached: a new selection replays
        page.update(store, sel, "", *PAGE_ARGS.get(page.__name__.rsplit(".", 1)[1], ()))
    return run


def pages(store: Store, n: int) -> None:
    day = pd.Timestamp(BASE_NS, unit="ns") + pd.Timedelta(seconds=n // 2)
    selections = {
        "all": Selection(),
        "2 days, by run": Selection(start=day + pd.Timedelta(minutes=17), end=day + pd.Timedelta(days=2, minutes=3), group="run"),
        "/chat, 1h, by run": Selection(attribute="endpoint", values=("/chat",), window="1h", group="run"),
    }
    print(f"{'page':<14}" + "".join(f"{name:>34}" for name in selections))
    print(f"{'':<14}" + "".join(f"{'rollups':>12}{'raw':>11}{'ratio':>11}" for _ in selections))
    worst = 0.0
    for page in PAGES:
        cells = []
        for sel in selections.values():
            rolled = _time(_update(page, store, sel))
            raw = _time(_update(page, Raw(store), sel))
            worst = max(worst, rolled)
            cells.append(f"{rolled * 1000:>10.0f}ms{raw * 1000:>9.0f}ms{raw / rolled:>10.1f}x")
        print(f"{page.TITLE:<14}" + "".join(cells), flush=True)
    print(f"slowest page update with rollups: {worst * 1000:.0f} ms")


def whatif_new_range(store: Store, n: int) -> None:
    """The lens page's replay over ranges no earlier call used (uncached), 3 ranges of 3 days."""
    times = []
    for k in range(3):
        start = pd.Timestamp(BASE_NS, unit="ns") + pd.Timedelta(seconds=n // 4 + k * 4711)
        sel = Selection(start=start, end=start + pd.Timedelta(days=3))
        t0 = time.perf_counter()
        df = whatif.evaluate(store, sel)
        times.append(time.perf_counter() - t0)
    print(f"what-if over a new 3-day range: median {statistics.median(times) * 1000:.0f} ms "
          f"({int(df['positions'].max()):,} lens-sampled positions replayed)")


def ingest(n: int = 20_000, batch: int = 500) -> None:
    """Forwards/s into a fresh store, keeping rollups or not, interleaved (two rounds each)."""
    traces = list(scale_store.forwards(n))
    keep = rollups.update
    rates: dict[str, list[float]] = {"with rollups": [], "without": []}
    for _ in range(2):
        for label in rates:
            store_module.rollups.update = keep if label == "with rollups" else (lambda cur, tables, dirty, added=None: dirty)
            with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "s.duckdb") as store:
                t0 = time.perf_counter()
                for k in range(0, n, batch):
                    store.write_traces(traces[k:k + batch])
                rates[label].append(n / (time.perf_counter() - t0))
    store_module.rollups.update = keep
    w, wo = statistics.median(rates["with rollups"]), statistics.median(rates["without"])
    print(f"ingest, {n:,} forwards in batches of {batch}: {w:,.0f} forwards/s with rollups, {wo:,.0f} without "
          f"(ratio {w / wo:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("MYTHOS_PROBE_CACHE", "/work/cache/mythos-probe")))
    parser.add_argument("--skip-ingest", action="store_true")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if not args.skip_ingest:
        ingest()
    for n in args.sizes:
        path = args.cache / f"scale-{n // 1000}k.duckdb"
        if not path.exists():
            args.cache.mkdir(parents=True, exist_ok=True)
            small = args.cache / "scale-100k.duckdb"
            if n > 100_000 and small.exists():
                scale_store.replicate(small, path, n // 100_000)
            else:
                scale_store.build(path, n)
        with Store.open_read_only(path) as store:
            rows = store.query("SELECT (SELECT count(*) FROM forwards) AS f, (SELECT count(*) FROM iterations) AS i,"
                               " (SELECT count(*) FROM experts) AS e, (SELECT count(*) FROM positions) AS p")
            print(f"\n{path}: {int(rows.f[0]):,} forwards, {int(rows.i[0]):,} iteration rows, {int(rows.e[0]):,} expert rows,"
                  f" {int(rows.p[0]):,} position rows; load average {os.getloadavg()[0]:.1f}")
            pages(store, n)
            whatif_new_range(store, n)


if __name__ == "__main__":
    main()
