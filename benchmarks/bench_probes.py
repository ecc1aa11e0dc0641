"""Probe overhead: forward time with probes attached, as a ratio to the plain forward, from one run.

Targets (issue 3): summary ≤ 1.03×, positions ≤ 1.15×, coda lens on the last position ≤ 1.30×.
For comparison, the same model with naive per-iteration torch hooks that call `.item()` (what a
notebook usually does) and with nnsight capturing one tensor per iteration (`tracer.iter`).
Configurations are timed interleaved, round-robin, and the median is reported, so a background
load affects all of them alike; CPU time (both threads) is printed beside wall time because it
is less sensitive to other tenants of the machine. `--dim` scales the model: the probes cost
O(D) per position and iteration, the loop O(D²).

    .venv/bin/python benchmarks/bench_probes.py [--rounds 7] [--batch 4] [--seq 256]
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch

import mythos_probe
from mythos_probe.collector import DEFAULT_PROBES
from mythos_probe.model import LoopedConfig, LoopedTransformer


@contextmanager
def naive_item_hooks(model):
    """Per-iteration torch hooks reading metrics back with .item(): one host sync per value."""
    values = []

    def hook(module, args, output):
        h_prev = args[0]
        values.append(((output - h_prev).norm() / output.norm()).item())
        values.append(output.norm(dim=-1).mean().item())

    handle = model.recurrent.injection.register_forward_hook(hook)
    try:
        yield values
    finally:
        handle.remove()


def nnsight_capture(model, ids, n_loops):
    import nnsight
    from nnsight import NNsight

    wrapped = NNsight(model)

    def run():
        with wrapped.trace(ids, n_loops=n_loops) as tracer:
            states = nnsight.save(list())
            for _ in tracer.iter[:]:
                states.append(wrapped.recurrent.injection.output.save())
        return states

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--loops", type=int, default=8)
    ap.add_argument("--dim", type=int, default=256, help="model width (bench preset: 256)")
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = LoopedConfig.variant("bench")
    model = LoopedTransformer(cfg.replace(dim=args.dim, expert_dim=args.dim // 2)).eval()
    with torch.no_grad():
        model.recurrent.act.halt.bias.fill_(-20.0)  # every loop runs in every configuration
    ids = torch.randint(0, model.cfg.vocab_size, (args.batch, args.seq))
    n = args.loops

    def with_attach(**kwargs):
        def run():
            with mythos_probe.attach(model, **kwargs) as rec:
                model(ids, n_loops=n)
            return rec.traces  # includes the one host transfer
        return run

    def naive():
        with naive_item_hooks(model):
            model(ids, n_loops=n)

    configs = {
        "plain forward": lambda: model(ids, n_loops=n),
        "probes: summary": with_attach(detail="summary"),
        "probes: positions": with_attach(detail="positions"),
        "probes: summary + coda lens (last position)": with_attach(
            probes=list(DEFAULT_PROBES) + ["lens"], detail="summary"),
        "naive torch hooks with .item()": naive,
    }
    try:
        configs["nnsight tracer.iter, one tensor/iteration"] = nnsight_capture(model, ids, n)
    except ImportError:
        print("nnsight not installed (pip install nnsight): skipped")

    wall = {name: [] for name in configs}
    cpu = {name: [] for name in configs}
    with torch.no_grad():
        for fn in configs.values():
            fn()  # warm-up
        for _ in range(args.rounds):
            for name, fn in configs.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    base_wall = statistics.median(wall["plain forward"])
    base_cpu = statistics.median(cpu["plain forward"])
    print(f"B={args.batch} T={args.seq} dim={model.cfg.dim} experts={model.cfg.n_experts} loops={n} "
          f"threads={torch.get_num_threads()} rounds={args.rounds}")
    print(f"  {'':<45} {'wall':>10}   {'ratio':>6}   {'CPU time':>10}   {'ratio':>6}")
    for name in configs:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"  {name:<45} {w * 1e3:8.1f} ms   {w / base_wall:5.3f}×   {c * 1e3:8.1f} ms   {c / base_cpu:5.3f}×")


if __name__ == "__main__":
    main()
