"""Per-request loop budgets in one batch against the same requests grouped by budget: KV-cached
greedy decoding of a mixed batch whose rows have different max_loops (one `generate` call, rows
past their budget leave each step's loop through the compaction), against the same rows split by
budget and decoded group after group (what a server without per-row budgets must do), and against
the whole batch at full depth. Tokens per second, interleaved in one process over `--rounds`
rounds (mixed, grouped, full depth in turn), printed as the median and range of the ratios
mixed / grouped (target ≥ 1.0×: a mixed batch is never slower than grouping) and the share of
the FLOPs saved against full depth that turned into time (time saved / loop FLOPs saved).

Model: the `bench` preset (dim 256, 32 experts top-2, 8 loops), random weights (`exit="fixed"`:
only budgets stop rows, so convergence does not matter), prompts of 16 tokens, 16 new tokens,
budgets drawn evenly from {1, 2, 4, 8}.

    .venv/bin/python benchmarks/bench_budgets.py                  # batch 16 and 64, 5 rounds
    .venv/bin/python benchmarks/bench_budgets.py --batches 16 --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mythos_probe.model import LoopedConfig, LoopedTransformer
from mythos_probe.model.budgets import LoopBudget

DEPTHS = (1, 2, 4, 8)


def run(batch: int, rounds: int, prompt: int, new: int) -> dict:
    torch.manual_seed(0)
    model = LoopedTransformer(LoopedConfig.variant("bench")).eval()
    full_depth = model.cfg.max_loop_iters
    ids = torch.randint(0, model.cfg.vocab_size, (batch, prompt))
    depths = [DEPTHS[i % len(DEPTHS)] for i in range(batch)]
    budgets = [LoopBudget(d) for d in depths]
    groups = {d: [i for i, x in enumerate(depths) if x == d] for d in sorted(set(depths))}

    def mixed():
        return model.generate(ids, max_new_tokens=new, temperature=0, exit="fixed", budgets=budgets)

    def grouped():
        out = torch.empty(batch, prompt + new, dtype=ids.dtype)
        for d, rows in groups.items():
            out[rows] = model.generate(ids[rows], max_new_tokens=new, temperature=0, exit="fixed", n_loops=d)
        return out

    def full():
        return model.generate(ids, max_new_tokens=new, temperature=0, exit="fixed", n_loops=full_depth)

    # the same tokens either way: a check, not a timing
    assert torch.equal(mixed(), grouped()), "a mixed batch decoded other tokens than the groups"
    times = {"mixed": [], "grouped": [], "full": []}
    for _ in range(rounds):
        for name, fn in (("mixed", mixed), ("grouped", grouped), ("full", full)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    tokens = batch * new
    ratio = [g / m for m, g in zip(times["mixed"], times["grouped"])]  # tokens/s mixed ÷ tokens/s grouped
    time_saved = [1 - m / f for m, f in zip(times["mixed"], times["full"])]
    flops_saved = 1 - sum(depths) / (batch * full_depth)  # loop FLOPs (the prompt and coda excluded)
    return {
        "batch": batch, "mixed_tok_s": tokens / statistics.median(times["mixed"]),
        "grouped_tok_s": tokens / statistics.median(times["grouped"]),
        "full_tok_s": tokens / statistics.median(times["full"]),
        "ratio": (statistics.median(ratio), min(ratio), max(ratio)),
        "loop_flops_saved": flops_saved,
        "time_saved": (statistics.median(time_saved), min(time_saved), max(time_saved)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"bench preset, exit='fixed', budgets {DEPTHS} loops evenly, prompt {args.prompt}, {args.new} new tokens, "
          f"{args.rounds} interleaved rounds, {torch.get_num_threads()} threads")
    for batch in args.batches:
        r = run(batch, args.rounds, args.prompt, args.new)
        ratio, saved = r["ratio"], r["time_saved"]
        print(f"batch {batch:>3}: mixed {r['mixed_tok_s']:8.1f} tok/s, grouped {r['grouped_tok_s']:8.1f}, full depth "
              f"{r['full_tok_s']:8.1f}; mixed/grouped {ratio[0]:.2f}× (range {ratio[1]:.2f}-{ratio[2]:.2f}, target "
              f"≥ 1.0×); vs full depth: {r['loop_flops_saved']:.1%} of loop FLOPs saved, {saved[0]:.1%} of the time "
              f"(range {saved[1]:.1%} to {saved[2]:.1%}): {saved[0] / r['loop_flops_saved']:.2f} of the FLOPs saved "
              "turned into time")


if __name__ == "__main__":
    main()
