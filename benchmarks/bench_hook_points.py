"""Cost of the layer hook points (issue 25) with nothing attached, against the code before them.

The baseline is `model/looped.py` as of a git revision (default: the commit before the layer
sites, d25cea5), loaded from git into its own module, given the same weights, and run interleaved
with the current model in the same process: the ratio is the median of CPU-time ratios of pairs.
Target: ≤ 1.01×. Also prints the cost of caching every layer site (for information).

    .venv/bin/python benchmarks/bench_hook_points.py [--rev d25cea5] [--repeats 30]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def baseline_module(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:model/looped.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "looped_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("looped_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["looped_baseline"] = module
    spec.loader.exec_module(module)
    return module


def paired_ratio(a, b, repeats: int) -> tuple[float, float, float]:
    """Median CPU time of a and of b, and the median of the per-pair ratios a/b, run alternately
    (the order too alternates, so that running second is no advantage)."""
    a(), b()
    ta, tb = [], []
    for i in range(repeats):
        first, second = (a, b) if i % 2 == 0 else (b, a)  # alternate the order too
        t0 = time.process_time()
        first()
        t1 = time.process_time()
        second()
        t2 = time.process_time()
        (ta, tb)[first is b].append(t1 - t0)
        (tb, ta)[first is b].append(t2 - t1)
    return statistics.median(ta), statistics.median(tb), statistics.median(x / y for x, y in zip(ta, tb))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="d25cea5", help="git revision of the baseline model/looped.py")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from mythos_probe.model import LoopedConfig, LoopedTransformer

    old = baseline_module(args.rev)
    cases = [("tiny-gqa B=1 T=8", "tiny-gqa", 1, 8, 4), ("tiny-mla B=1 T=8", "tiny-mla", 1, 8, 4),
             ("tiny-gqa B=4 T=64", "tiny-gqa", 4, 64, 8)]
    print(f"{'case':<22} {'baseline ms':>12} {'now ms':>8} {'ratio of medians':>17} {'median ratio':>13}"
          f"  ({args.repeats} interleaved pairs, CPU time)")
    for label, variant, B, T, loops in cases:
        cfg = LoopedConfig.variant(variant)
        torch.manual_seed(0)
        new = LoopedTransformer(cfg).eval()
        base = old.LoopedTransformer(cfg).eval()
        base.load_state_dict(new.state_dict())
        ids = torch.randint(0, cfg.vocab_size, (B, T))
        with torch.inference_mode():
            for exit in ("fixed", "act"):
                tb, tn, ratio = paired_ratio(lambda: base(ids, n_loops=loops, exit=exit),
                                             lambda: new(ids, n_loops=loops, exit=exit), args.repeats)
                print(f"{label + ' ' + exit:<22} {tb * 1e3:>12.3f} {tn * 1e3:>8.3f} {tn / tb:>16.3f}× {1 / ratio:>12.3f}×")
    cfg = LoopedConfig.variant("tiny-gqa")
    model = LoopedTransformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (4, 64))
    with torch.inference_mode():
        plain, cached, ratio = paired_ratio(lambda: model(ids, n_loops=8, exit="fixed"),
                                            lambda: model.run_with_cache(ids, n_loops=8, exit="fixed"), 10)
    print(f"run_with_cache of every site (tiny-gqa B=4 T=64, 8 loops): {cached / plain:.2f}× a plain forward")


if __name__ == "__main__":
    main()
