"""Cost of the trajectory probe (issue 25): a recorded forward at detail="positions" with the
default probes, against the same with "trajectory" added, interleaved round-robin in one process
(so background load falls on both alike), median wall and CPU time, and their ratio. The time
includes reading the traces (the one host transfer, where the probe's eigh runs).

    .venv/bin/python benchmarks/bench_trajectory.py                 # dim 256, T 64 and 256, 8 and 32 loops
    .venv/bin/python benchmarks/bench_trajectory.py --threads 1 --rounds 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mythos_probe
from mythos_probe.model import LoopedConfig, LoopedTransformer
from mythos_probe.probes.reductions import DEFAULT_PROBES

CONFIGS = {
    "positions": dict(detail="positions"),
    "positions + trajectory": dict(detail="positions", probes=[*DEFAULT_PROBES, "trajectory"]),
}


def build(dim: int, seq: int, batch: int):
    torch.manual_seed(0)
    cfg = LoopedConfig.variant("bench")
    model = LoopedTransformer(cfg.replace(dim=dim, expert_dim=dim // 2)).eval()
    with torch.no_grad():
        model.recurrent.act.halt.bias.fill_(-20.0)  # every loop runs in both configurations
    return model, torch.randint(0, model.cfg.vocab_size, (batch, seq))


def point(dim: int, seq: int, loops: int, batch: int, rounds: int) -> dict[str, tuple[float, float]]:
    model, ids = build(dim, seq, batch)

    def recorded(kwargs):
        def run():
            with mythos_probe.attach(model, **kwargs) as rec:
                model(ids, n_loops=loops)
            return rec.traces
        return run

    runs = {name: recorded(kw) for name, kw in CONFIGS.items()}
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    with torch.no_grad():
        for fn in runs.values():
            fn()  # warm-up
        for _ in range(rounds):
            for name, fn in runs.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--seq", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--loops", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"trajectory probe cost, dim {args.dim}, batch {args.batch}, median of {args.rounds} interleaved rounds "
          f"({torch.get_num_threads()} threads)")
    print(f"{'T':>5} {'loops':>5}  {'positions ms':>13} {'+ trajectory ms':>16}  {'ratio wall':>10} {'ratio cpu':>9}")
    for seq in args.seq:
        for loops in args.loops:
            r = point(args.dim, seq, loops, args.batch, args.rounds)
            (w0, c0), (w1, c1) = r["positions"], r["positions + trajectory"]
            print(f"{seq:>5} {loops:>5}  {w0 * 1e3:>13.1f} {w1 * 1e3:>16.1f}  {w1 / w0:>9.3f}x {c1 / c0:>8.3f}x", flush=True)


if __name__ == "__main__":
    main()
