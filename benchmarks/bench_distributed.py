"""Probe overhead under DDP: a training step (forward, backward, all-reduce, optimizer step) on 2
CPU ranks with probes attached, as a ratio to the same step without them, from one run.

Run directly, it relaunches itself under `torchrun --standalone --nproc-per-node 2` (gloo). Every
rank trains the same DDP model on its own data; blocks of `--steps` probed and unprobed steps
alternate round-robin for `--rounds`, so a background load affects both alike, and rank 0 prints
the median step time of each and their ratio. The probed step reads its trace (the one
device-to-host copy of the forward's metrics) inside the timed region, so the ratio is the whole
cost of observing the step; the DDP step time is the slowest rank's, as in a real job.

    .venv/bin/python benchmarks/bench_distributed.py [--rounds 5] [--steps 3] [--variant bench] [--seq 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import mythos_probe
from mythos_probe.model import LoopedConfig, LoopedTransformer


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    parser.add_argument("--variant", default="bench", help="LoopedConfig preset (default: the benchmark shape)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--loops", type=int, default=8)
    return parser.parse_args()


def rank_main(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    cfg = LoopedConfig.variant(args.variant)
    net = DistributedDataParallel(LoopedTransformer(cfg).train(), find_unused_parameters=True)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(rank))

    def step() -> None:
        opt.zero_grad()
        logits = net(ids[:, :-1], n_loops=args.loops, exit="fixed")
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
        opt.step()

    def block(probed: bool) -> float:
        """Seconds per step over one block (barrier-aligned so both ranks time the same steps)."""
        dist.barrier()
        t0 = time.perf_counter()
        if probed:
            with mythos_probe.attach(net, optimizer=opt) as rec:
                for _ in range(args.steps):
                    step()
                    rec.traces  # the host copy of this step's metrics, inside the timed region
        else:
            for _ in range(args.steps):
                step()
        dist.barrier()
        return (time.perf_counter() - t0) / args.steps

    block(False), block(True)  # warm-up: allocator, DDP buckets, hook paths
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for probed in (False, True):
            times[probed].append(block(probed))
    if rank == 0:
        plain, probed = statistics.median(times[False]), statistics.median(times[True])
        print(f"DDP, 2 ranks (gloo, CPU), variant {args.variant}, batch {args.batch} × seq {args.seq}, "
              f"{args.loops} loops, median of {args.rounds} blocks of {args.steps} steps")
        print(f"  unprobed step  {plain * 1e3:8.1f} ms")
        print(f"  probed step    {probed * 1e3:8.1f} ms   (default probes, summary detail)")
        print(f"  ratio          {probed / plain:8.3f}×")
    dist.destroy_process_group()


if __name__ == "__main__":
    if "LOCAL_RANK" in os.environ:
        rank_main(parse())
    else:
        parse()  # --help and bad arguments answer here, before launching anything
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        sys.exit(subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  "--nproc-per-node", "2", __file__, *sys.argv[1:]], env=env))
