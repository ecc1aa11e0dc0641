"""Latent trajectories page, click → drawn in real headless Chromium on a 10,000-forward store.
Not a test.

The store: 10,000 forwards, of which the newest `--with-trajectories` (default 20) were recorded
from our model with the trajectory probe (batch 2 × 64 tokens × 16 loops: 2,048 position rows
each), the rest synthetic summary forwards (tests/dashboards/factory.py). `mythos-probe dashboard`
serves it as its own process; the navigation click from the forward page to the trajectories page
and to the forward detail page (a baseline view, the same kind of one-forward position query) are
timed interleaved. A view
counts as drawn as in bench_dashboard_browser.py (every chart newer than the click, two paints).
Target (issue 25): under 1.5 s.

    .venv/bin/python -m benchmarks.bench_trajectories_browser [--repeats 5] [--store PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import mythos_probe
from benchmarks.bench_dashboard_browser import chromium, measure, nav, peak_rss_mib, settle, start_dashboard
from mythos_probe.collectors.store import Store
from mythos_probe.model import LoopedConfig, LoopedTransformer
from mythos_probe.probes.reductions import DEFAULT_PROBES
from tests.dashboards.factory import BASE_NS, synthetic_trace


def build(path: Path, forwards: int, with_trajectories: int) -> None:
    rng = np.random.default_rng(0)
    pool = [dataclasses.replace(synthetic_trace(rng, n_loops=16, seq_len=64), detail="summary", position_metrics={},
                                position_iterations=None, token_ids=None, token_text=None) for _ in range(50)]
    torch.manual_seed(0)
    model = LoopedTransformer(LoopedConfig.variant("tiny-gqa")).eval()
    with torch.no_grad(), mythos_probe.attach(model, probes=[*DEFAULT_PROBES, "trajectory"], detail="positions",
                                              token_text=lambda i: f"t{i}") as rec:
        for _ in range(with_trajectories):
            model(torch.randint(0, 256, (2, 64)), n_loops=16, exit="fixed")
    n = forwards - with_trajectories
    with Store(path) as store:
        for start in range(0, n, 2000):
            store.write_traces(dataclasses.replace(pool[i % 50], trace_id=f"{i + 1:032x}", span_id=f"{i + 1:016x}",
                                                   step=i, start_ns=BASE_NS + i * 10**9, end_ns=BASE_NS + i * 10**9 + 10**6)
                               for i in range(start, min(start + 2000, n)))
        store.write_traces(dataclasses.replace(t, start_ns=BASE_NS + (n + k) * 10**9, end_ns=BASE_NS + (n + k) * 10**9 + 1)
                           for k, t in enumerate(rec.traces))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forwards", type=int, default=10_000)
    parser.add_argument("--with-trajectories", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--store", type=Path, default=None, help="default: a temporary store, removed after")
    args = parser.parse_args()
    folder = None
    if args.store is None:
        folder = tempfile.mkdtemp(prefix="mythos-traj-bench-")
        args.store = Path(folder) / "store.duckdb"
    if not args.store.exists():
        build(args.store, args.forwards, args.with_trajectories)
    proc, base = start_dashboard(sys.executable, os.getcwd(), args.store)
    driver, profile = chromium()
    try:
        print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        views = {"Latent trajectories (page, from /forward)": [], "Forward detail (page, from /loops), baseline": []}
        for _ in range(args.repeats):  # interleaved
            views["Latent trajectories (page, from /forward)"].append(measure(driver, base + "/forward", nav("trajectories")))
            views["Forward detail (page, from /loops), baseline"].append(measure(driver, base + "/loops", nav("forward")))
        print(f"{'view (click → drawn, median of ' + str(args.repeats) + ')':<52}{'seconds':>9}")
        for name, seconds in views.items():
            print(f"{name:<52}{statistics.median(seconds) if seconds else float('nan'):>8.2f}s  "
                  f"({', '.join(f'{s:.2f}' for s in seconds)})")
        page, baseline = (statistics.median(views[k]) for k in list(views)[:2])
        print(f"ratio trajectories / forward detail: {page / baseline:.2f}")
        print(f"dashboard peak RSS: {peak_rss_mib(proc.pid):.0f} MiB; load average after: {os.getloadavg()[0]:.1f}")
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
        proc.terminate()
        proc.wait()
        if folder:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
