"""Probe overhead and peak memory, as ratios to the plain forward, from one run.

Targets (issue 13), every default probe family on: summary ≤ 1.03× time at dim 256, T=256
(≤ 1.05× at T=64), positions ≤ 1.10×, coda lens on the last position ≤ 1.20×; peak memory of a
probed forward ≤ 1.10× of a plain one at 8 loops, ≤ 1.25× at 64.

Time: at each grid point the configurations run interleaved, round-robin, and the median is
reported, so a background load affects all of them alike; CPU time (all threads) is printed beside
wall time because it is less sensitive to other tenants. For comparison, the same model with
naive per-iteration torch hooks calling `.item()` and with nnsight capturing one tensor per
iteration (`tracer.iter`).

Memory: the peak resident memory of one forward above the resident memory before it, read from
the kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs; Linux only). It runs in
a child process started with MALLOC_MMAP_THRESHOLD_=65536, so glibc gives every allocation of
64 KiB or more back to the kernel when it is freed and the resident size follows the live tensors
(with the default, freed blocks stay resident and later forwards look free). Median of three.

    .venv/bin/python benchmarks/bench_probes.py            # dim 256, T=64 and 256, 8 loops
    .venv/bin/python benchmarks/bench_probes.py --threads 1  # on a machine shared with other jobs
    .venv/bin/python benchmarks/bench_probes.py --full     # dim 256/384/512 × T 64/256 × 8/64 loops
    .venv/bin/python benchmarks/bench_probes.py --compile  # torch.compile of one iteration's reductions
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager

import torch

import mythos_probe
from mythos_probe.probes.reductions import DEFAULT_PROBES
from mythos_probe.model import LoopedConfig, LoopedTransformer

PROBED = {
    "probes: summary": dict(detail="summary"),
    "probes: positions": dict(detail="positions"),
    "probes: summary + coda lens (last position)": dict(probes=list(DEFAULT_PROBES) + ["lens"], detail="summary"),
}


def build(dim: int, seq: int, batch: int):
    torch.manual_seed(0)
    cfg = LoopedConfig.variant("bench")
    model = LoopedTransformer(cfg.replace(dim=dim, expert_dim=dim // 2)).eval()
    with torch.no_grad():
        model.recurrent.act.halt.bias.fill_(-20.0)  # every loop runs in every configuration
    return model, torch.randint(0, model.cfg.vocab_size, (batch, seq))


def probed_configs(model, ids, n):
    def with_attach(**kwargs):
        def run():
            with mythos_probe.attach(model, **kwargs) as rec:
                model(ids, n_loops=n)
            return rec.traces  # includes the one host transfer
        return run

    return {"plain forward": lambda: model(ids, n_loops=n), **{k: with_attach(**v) for k, v in PROBED.items()}}


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


# -- time ------------------------------------------------------------------------------------


def time_point(dim: int, seq: int, loops: int, batch: int, rounds: int) -> dict[str, tuple[float, float]]:
    model, ids = build(dim, seq, batch)
    configs = probed_configs(model, ids, loops)

    def naive():
        with naive_item_hooks(model):
            model(ids, n_loops=loops)

    configs["naive torch hooks with .item()"] = naive
    try:
        configs["nnsight tracer.iter, one tensor/iteration"] = nnsight_capture(model, ids, loops)
    except ImportError:
        print("nnsight not installed (pip install nnsight): skipped")
    wall = {name: [] for name in configs}
    cpu = {name: [] for name in configs}
    with torch.no_grad():
        for fn in configs.values():
            fn()  # warm-up
        for _ in range(rounds):
            for name, fn in configs.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in configs}


# -- memory (child process) ------------------------------------------------------------------


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+) kB", f.read()).group(1)) * 1024


def memory_point(dim: int, seq: int, loops: int, batch: int) -> dict[str, float]:
    """Runs in the child: peak bytes above the pre-forward resident size, per configuration."""
    model, ids = build(dim, seq, batch)
    configs = probed_configs(model, ids, loops)
    peaks = {name: [] for name in configs}
    with torch.no_grad():
        for fn in configs.values():
            fn()  # warm-up: lazily built buffers and imports are not a forward's memory
        for _ in range(3):
            for name, fn in configs.items():
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the high-water mark to the current resident size
                base = _status_bytes("VmRSS")
                fn()
                peaks[name].append(_status_bytes("VmHWM") - base)
    return {name: statistics.median(v) for name, v in peaks.items()}


def measure_memory(dim: int, seq: int, loops: int, batch: int) -> dict[str, float]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", f"{dim},{seq},{loops},{batch}"],
        env=env, capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- torch.compile of the reductions -----------------------------------------------------------


def iteration_reductions(h, hp, delta_prev, A, block, lora):
    """The per-position reductions of one iteration as the collector makes them (convergence,
    spectral, LoRA), stacked and averaged: what torch.compile could fuse into one pass."""
    norm_h = torch.linalg.vector_norm(h, dim=-1)
    norm_hp = torch.linalg.vector_norm(hp, dim=-1)
    delta = h - hp
    norm_delta = torch.linalg.vector_norm(delta, dim=-1)
    norm_block = torch.linalg.vector_norm(block, dim=-1)
    norm_lora = torch.linalg.vector_norm(lora, dim=-1)
    maps = torch.stack([
        norm_delta / norm_h.clamp_min(1e-12),
        1 - torch.linalg.vecdot(h, hp) / (norm_h * norm_hp).clamp_min(1e-12),
        norm_h,
        norm_h / norm_hp.clamp_min(1e-12),
        torch.linalg.vector_norm(A * hp, dim=-1),
        (norm_block.square() + norm_lora.square() + 2 * torch.linalg.vecdot(block, lora)).clamp_min(0).sqrt(),
        norm_lora / norm_block.clamp_min(1e-12),
    ])
    ortho = (torch.linalg.vecdot(delta, delta_prev) / (norm_delta * torch.linalg.vector_norm(delta_prev, dim=-1))
             .clamp_min(1e-12)).mean()
    return torch.cat([maps.mean(dim=(1, 2)), ortho[None]]), delta


def compile_cost(batch: int, seq: int, dim: int, calls: int = 50) -> None:
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(batch, seq, dim, generator=g) for _ in range(5)]
    args.insert(3, torch.rand(dim, generator=g))
    compiled = torch.compile(iteration_reductions)
    t0 = time.perf_counter()
    compiled(*args)
    compile_s = time.perf_counter() - t0
    eager, fused = [], []
    for _ in range(calls):  # interleaved
        for fn, times in ((iteration_reductions, eager), (compiled, fused)):
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)
    e, c = statistics.median(eager), statistics.median(fused)
    print(f"torch.compile of one iteration's reductions, B={batch} T={seq} dim={dim}: compile {compile_s:.1f} s; "
          f"per call eager {e * 1e3:.3f} ms, compiled {c * 1e3:.3f} ms ({e / c:.2f}× faster); "
          f"the compile pays back after {compile_s / max(e - c, 1e-9):,.0f} iterations")


# -- main -----------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads; 1 on a shared machine, where spinning thread pools distort the timings")
    ap.add_argument("--full", action="store_true", help="dim 256/384/512 × T 64/256 × 8/64 loops")
    ap.add_argument("--compile", action="store_true", help="only: torch.compile of one iteration's reductions")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.memory_child:
        dim, seq, loops, batch = map(int, args.memory_child.split(","))
        print(json.dumps(memory_point(dim, seq, loops, batch)))
        return
    if args.compile:
        for seq in (64, 256):
            compile_cost(args.batch, seq, 256)
        return

    grid = itertools.product((256, 384, 512), (64, 256), (8, 64)) if args.full else itertools.product((256,), (64, 256), (8,))
    print(f"B={args.batch} threads={torch.get_num_threads()} rounds={args.rounds}; time: medians of interleaved "
          "rounds; memory: peak RSS of a forward above its start (see the docstring)")
    for dim, seq, loops in grid:
        timing = time_point(dim, seq, loops, args.batch, args.rounds)
        memory = measure_memory(dim, seq, loops, args.batch)
        base_wall, base_cpu = timing["plain forward"]
        base_mem = memory["plain forward"]
        print(f"dim={dim} T={seq} loops={loops}")
        print(f"  {'':<45} {'wall':>10}   {'ratio':>6}   {'CPU time':>10}   {'ratio':>6}   {'peak mem':>9}   {'ratio':>6}")
        for name, (w, c) in timing.items():
            mem = f"{memory[name] / 2**20:6.1f} MiB   {memory[name] / base_mem:5.3f}×" if name in memory else ""
            print(f"  {name:<45} {w * 1e3:8.1f} ms   {w / base_wall:5.3f}×   {c * 1e3:8.1f} ms   "
                  f"{c / base_cpu:5.3f}×   {mem}", flush=True)


if __name__ == "__main__":
    main()
